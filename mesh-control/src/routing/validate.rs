//! Semantic validation of the routing kinds: CRD object → validated object (below), or an
//! [`Error`] naming the field (`spec.rules[0].matches[1].path.value: regex "(" is invalid: ...`).
//! An invalid object is left out whole (its status says why); the others keep working.
//!
//! [`gateway`] validates `HTTPRoute`/`GRPCRoute`, [`istio`] `VirtualService`/`DestinationRule`;
//! the checks both need are here. What a valid object refers to (Services, subsets, grants) is
//! resolved later, by `compile`: a reference that does not resolve is a condition, not a
//! validation error, and fixes itself when the object appears.

pub mod gateway;
pub mod istio;
pub mod rate_limit;
pub mod traffic_policy;

use std::{collections::BTreeMap, sync::LazyLock, time::Duration};

use k8s_openapi::jiff::Timestamp;

use super::model::{
    Fault, HeaderModifier, Match, PathModifier, Redirect, Retry, SourceKind, Timeouts,
    TrafficPolicy, UrlRewrite,
};
use crate::{
    crd,
    model::{Labels, NamespacedName},
};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{field}: regex {pattern:?} is invalid: {reason}")]
    Regex {
        field: String,
        pattern: String,
        reason: String,
    },
    #[error("{field}: {value:?} is not a duration ({expected})")]
    Duration {
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{field}: {value:?} is not a valid header name")]
    HeaderName { field: String, value: String },
    #[error("{field}: {value:?} is not a valid header value")]
    HeaderValue { field: String, value: String },
    #[error("{field}: {value} is out of range {min}-{max}")]
    OutOfRange {
        field: String,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("{field}: unknown value {value:?} (expected {expected})")]
    UnknownValue {
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{field}: path {value:?} {why}")]
    Path {
        field: String,
        value: String,
        why: &'static str,
    },
    #[error("{field}: {value:?} is not a valid hostname")]
    Hostname { field: String, value: String },
    #[error(
        "{field}: {value:?} is not a valid name (lower-case letters, digits and '-', at most 63)"
    )]
    Name { field: String, value: String },
    #[error("{field}: {what} is required")]
    Missing { field: String, what: &'static str },
    #[error("{field}: {name:?} is listed twice")]
    Duplicate { field: String, name: String },
    #[error(
        "{field}: the weights add up to {sum}; with more than one destination they must add up to 100"
    )]
    WeightSum { field: String, sum: i64 },
    #[error("{field}: {what}")]
    Conflict { field: String, what: String },
    #[error("{field}: {what}")]
    IncompatibleFilters { field: String, what: String },
    #[error("{field}: not supported: {what}")]
    Unsupported { field: String, what: String },
}

impl Error {
    /// Machine-readable reason of our own kinds' `Accepted=False` (and the `/status` document).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Regex { .. } => "InvalidRegex",
            Self::Duration { .. } => "InvalidDuration",
            Self::HeaderName { .. } | Self::HeaderValue { .. } => "InvalidHeader",
            Self::OutOfRange { .. } => "OutOfRange",
            Self::UnknownValue { .. } => "UnknownValue",
            Self::Path { .. } => "InvalidPath",
            Self::Hostname { .. } => "InvalidHostname",
            Self::Name { .. } => "InvalidName",
            Self::Missing { .. } => "MissingField",
            Self::Duplicate { .. } => "Duplicate",
            Self::WeightSum { .. } => "InvalidWeights",
            Self::Conflict { .. } => "Conflict",
            Self::IncompatibleFilters { .. } => "IncompatibleFilters",
            Self::Unsupported { .. } => "UnsupportedField",
        }
    }

    /// The reason Gateway API's spec names for a route that is not accepted.
    pub fn gateway_reason(&self) -> &'static str {
        match self {
            Self::IncompatibleFilters { .. } => "IncompatibleFilters",
            _ => "UnsupportedValue",
        }
    }
}

/// A valid `HTTPRoute` or `GRPCRoute`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRoute {
    pub kind: SourceKind,
    pub id: Identity,
    pub parents: Vec<Parent>,
    pub rules: Vec<GatewayRule>,
    /// Fields accepted but not enforced (yet), each prefixed with its path.
    pub notes: Vec<String>,
}

/// One `parentRefs` entry: echoed verbatim in `status.parents[].parentRef`, as the spec asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub reference: crd::gateway::ParentReference,
    pub target: ParentTarget,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentTarget {
    /// A Service (GAMMA): ours.
    Service {
        service: NamespacedName,
        port: Option<u16>,
        section: Option<String>,
    },
    /// Meant for the mesh but cannot be one (`kind: Service` without `group: ""`, another core
    /// kind): ours to report, `Accepted=False`.
    Invalid { why: String },
    /// A Gateway, or another controller's kind: not ours; no status entry.
    NotOurs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRule {
    pub index: u32,
    pub name: Option<String>,
    /// Never empty: no `matches` means one match of every request (`PathPrefix /`).
    pub matches: Vec<Match>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub rewrite: Option<UrlRewrite>,
    pub redirect: Option<Redirect>,
    /// (backend, share in millionths).
    pub mirrors: Vec<(BackendRef, u32)>,
    pub backends: Vec<BackendRef>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

/// A `backendRefs` (or mirror `backendRef`) entry, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    /// Its path, for conditions (`spec.rules[0].backendRefs[1]`).
    pub field: String,
    pub group: String,
    pub kind: String,
    pub target: NamespacedName,
    pub port: Option<u16>,
    pub weight: u32,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
}

/// A valid `VirtualService`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualService {
    pub id: Identity,
    /// (field, the Service the host names).
    pub hosts: Vec<(String, NamespacedName)>,
    /// `exportTo: ["."]`: only clients in its own namespace.
    pub own_namespace_only: bool,
    pub rules: Vec<VsRule>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsRule {
    pub index: u32,
    pub name: Option<String>,
    /// Empty: every request.
    pub matches: Vec<Match>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub rewrite: Option<UrlRewrite>,
    pub action: VsAction,
    pub mirrors: Vec<(Destination, u32)>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    pub fault: Option<Fault>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsAction {
    Route(Vec<Destination>),
    Redirect(Redirect),
    Respond { status: u16, body: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub field: String,
    pub service: NamespacedName,
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: u32,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
}

/// A valid `DestinationRule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    pub id: Identity,
    pub host: NamespacedName,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<(String, Labels)>,
    /// Subsets with a `trafficPolicy` of their own (not yet laid over the Service's).
    pub subset_policies: BTreeMap<String, TrafficPolicy>,
    pub notes: Vec<String>,
}

/// Which object a validated one is: namespace and name, when it was created (the older one wins
/// a conflict) and the generation its status is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub key: NamespacedName,
    pub created: Option<Timestamp>,
    pub generation: Option<i64>,
}

/// The identity of an object from its metadata.
pub(crate) fn identity(meta: &kube::api::ObjectMeta) -> Identity {
    Identity {
        key: NamespacedName::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        ),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        generation: meta.generation,
    }
}

/// Fields the types do not know → [`Error::Unsupported`] for the first one (the others listed),
/// with what `hint` can say about it.
pub(crate) fn no_unknown_fields(
    unknown: &[String],
    hint: impl Fn(&str) -> &'static str,
) -> Result<(), Error> {
    match unknown.first() {
        None => Ok(()),
        Some(field) => {
            let leaf = field.rsplit('.').next().unwrap_or(field);
            let leaf = leaf.split('[').next().unwrap_or(leaf);
            let what = hint(leaf).to_owned();
            let more = if unknown.len() > 1 {
                format!(" (and {})", unknown[1..].join(", "))
            } else {
                String::new()
            };
            Err(Error::Unsupported {
                field: field.clone(),
                what: what + &more,
            })
        }
    }
}

/// An RE2-syntax regex as the node compiles it (anchored), so the node never meets one it
/// cannot compile.
pub(crate) fn regex(field: &str, pattern: &str) -> Result<String, Error> {
    match mesh_l7::route::matching::StringMatch::regex(pattern) {
        Ok(_) => Ok(pattern.to_owned()),
        Err(e) => Err(Error::Regex {
            field: field.into(),
            pattern: pattern.into(),
            reason: e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }),
    }
}

/// Lower-cased, as the proto wants.
pub(crate) fn header_name(field: &str, name: &str) -> Result<String, Error> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_owned())
        .map_err(|_| Error::HeaderName {
            field: field.into(),
            value: name.into(),
        })
}

pub(crate) fn header_value(field: &str, value: &str) -> Result<String, Error> {
    http::HeaderValue::from_str(value)
        .map(|_| value.to_owned())
        .map_err(|_| Error::HeaderValue {
            field: field.into(),
            value: value.into(),
        })
}

/// GEP-2257: 1 to 4 `<1-5 digits><h|m|s|ms>` parts ("10s", "500ms", "1h2m"); `None` for zero,
/// which Gateway API uses to disable a timeout.
pub(crate) fn gep_duration(field: &str, value: &str) -> Result<Option<Duration>, Error> {
    static SYNTAX: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$").expect("valid regex"));
    let bad = || Error::Duration {
        field: field.into(),
        value: value.into(),
        expected: "GEP-2257: like \"10s\", \"500ms\", \"1h2m\"; \"0s\" disables",
    };
    if !SYNTAX.is_match(value) {
        return Err(bad());
    }
    let d: kube::core::Duration = value.parse().map_err(|_| bad())?;
    let d = Duration::from(d);
    Ok((!d.is_zero()).then_some(d))
}

/// Istio's durations (protobuf's "1.5s" and Go's "500ms", "1m30s"); `None` for zero.
pub(crate) fn istio_duration(field: &str, value: &str) -> Result<Option<Duration>, Error> {
    let bad = || Error::Duration {
        field: field.into(),
        value: value.into(),
        expected: "like \"10s\", \"0.5s\" or \"500ms\"; \"0s\" disables",
    };
    let d: kube::core::Duration = value.trim().parse().map_err(|_| bad())?;
    if d.is_negative() {
        return Err(bad());
    }
    let d = Duration::from(d);
    Ok((!d.is_zero()).then_some(d))
}

/// A number in `min..=max`.
pub(crate) fn in_range(field: &str, value: i64, min: i64, max: i64) -> Result<i64, Error> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Error::OutOfRange {
            field: field.into(),
            value,
            min,
            max,
        })
    }
}

pub(crate) fn port(field: &str, value: i64) -> Result<u16, Error> {
    in_range(field, value, 1, 65535).map(|p| u16::try_from(p).expect("in range"))
}

pub(crate) fn weight(field: &str, value: i64) -> Result<u32, Error> {
    in_range(field, value, 0, 1_000_000).map(|w| u32::try_from(w).expect("in range"))
}

/// A percentage (0-100, fractions allowed) in millionths.
pub(crate) fn percent_per_million(field: &str, value: f64) -> Result<u32, Error> {
    if !(0.0..=100.0).contains(&value) {
        #[expect(clippy::cast_possible_truncation, reason = "only shown in the message")]
        return Err(Error::OutOfRange {
            field: field.into(),
            value: value as i64,
            min: 0,
            max: 100,
        });
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "0..=100 × 10000 fits a u32"
    )]
    Ok((value * 10_000.0).round() as u32)
}

/// An absolute path without `//`, `/./`, `/../`, encoded slashes or a fragment (Gateway API's
/// rules for path values; Istio paths get the same).
pub(crate) fn path(field: &str, value: &str) -> Result<String, Error> {
    let why = if !value.starts_with('/') {
        Some("must start with /")
    } else if value.contains("//")
        || value.contains("/./")
        || value.contains("/../")
        || value.ends_with("/..")
        || value.ends_with("/.")
    {
        Some("must not contain //, /./ or /../")
    } else if value.to_ascii_lowercase().contains("%2f") || value.contains('#') {
        Some("must not contain %2F or #")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::Path {
            field: field.into(),
            value: value.into(),
            why,
        }),
        None => Ok(value.to_owned()),
    }
}

/// An RFC 1123 hostname (an optional `*.` first label where `wildcard`), not an IP.
pub(crate) fn hostname(field: &str, value: &str, wildcard: bool) -> Result<String, Error> {
    let name = if wildcard {
        value.strip_prefix("*.").unwrap_or(value)
    } else {
        value
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(crate::validate::valid_dns_label);
    if ok {
        Ok(value.to_owned())
    } else {
        Err(Error::Hostname {
            field: field.into(),
            value: value.into(),
        })
    }
}

/// A DNS-1123 label (subset names, ports' section names).
pub(crate) fn dns_label(field: &str, value: &str) -> Result<String, Error> {
    if crate::validate::valid_dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err(Error::Name {
            field: field.into(),
            value: value.into(),
        })
    }
}

/// Header modifier lists: valid, and no name twice in `set` or in `add`.
pub(crate) fn header_modifier<'a>(
    field: &str,
    set: impl IntoIterator<Item = (&'a str, &'a str)>,
    add: impl IntoIterator<Item = (&'a str, &'a str)>,
    remove: &[String],
) -> Result<HeaderModifier, Error> {
    let pairs = |list: &str, entries: Vec<(&str, &str)>| -> Result<Vec<(String, String)>, Error> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, (name, value)) in entries.into_iter().enumerate() {
            let f = format!("{field}.{list}[{i}]");
            let name = header_name(&format!("{f}.name"), name)?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(Error::Duplicate {
                    field: format!("{field}.{list}"),
                    name,
                });
            }
            out.push((name, header_value(&format!("{f}.value"), value)?));
        }
        Ok(out)
    };
    Ok(HeaderModifier {
        set: pairs("set", set.into_iter().collect())?,
        add: pairs("add", add.into_iter().collect())?,
        remove: remove
            .iter()
            .enumerate()
            .map(|(i, n)| header_name(&format!("{field}.remove[{i}]"), n))
            .collect::<Result<_, _>>()?,
    })
}

/// A redirect's scheme: http or https.
pub(crate) fn redirect_scheme(field: &str, value: Option<&str>) -> Result<Option<String>, Error> {
    match value {
        None => Ok(None),
        Some(s @ ("http" | "https")) => Ok(Some(s.to_owned())),
        Some(other) => Err(Error::UnknownValue {
            field: field.into(),
            value: other.into(),
            expected: "http or https",
        }),
    }
}

/// A redirect's status code; `default` when absent (Gateway API: 302, Istio: 301).
pub(crate) fn redirect_status(field: &str, value: Option<i64>, default: u16) -> Result<u16, Error> {
    match value {
        None => Ok(default),
        Some(c @ (301 | 302 | 303 | 307 | 308)) => Ok(u16::try_from(c).expect("listed")),
        Some(other) => Err(Error::UnknownValue {
            field: field.into(),
            value: other.to_string(),
            expected: "301, 302, 303, 307 or 308",
        }),
    }
}

/// The path modifier of a rewrite or redirect.
pub(crate) fn path_modifier(
    field: &str,
    kind_prefix: bool,
    value: &str,
) -> Result<PathModifier, Error> {
    // An empty prefix replacement is meaningful: it strips the matched prefix.
    let value = if kind_prefix && value.is_empty() {
        String::new()
    } else {
        path(field, value)?
    };
    Ok(if kind_prefix {
        PathModifier::Prefix(value)
    } else {
        PathModifier::Full(value)
    })
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
