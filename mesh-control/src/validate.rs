//! Semantic validation of the policy CRDs: CRD object → domain policy, or an [`Error`] whose
//! `reason()` and message go into `status.conditions` (Kubernetes) or the status endpoint (file
//! mode). A rejected object is left out whole; the others keep working.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use kube::ResourceExt as _;

use crate::{
    crd,
    model::{self, Action, MtlsMode, NamespacedName, Scope},
};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "{field}: principal {value:?} must look like <trust-domain>/ns/<namespace>/sa/<service-account> (without spiffe://), or use one * at its start or end"
    )]
    InvalidPrincipal { field: String, value: String },
    #[error("{field}: port {value} is out of range 1-65535")]
    PortOutOfRange { field: String, value: i64 },
    #[error("{field}: {value:?} is not a port number")]
    InvalidPort { field: String, value: String },
    #[error("spec.action: unknown action {value:?} (expected ALLOW, DENY or AUDIT)")]
    UnknownAction { value: String },
    #[error("{field}: unknown mTLS mode {value:?} (expected UNSET, STRICT, PERMISSIVE or DISABLE)")]
    UnknownMode { field: String, value: String },
    #[error("{field}: {value:?} is not an IP address or CIDR")]
    InvalidIpBlock { field: String, value: String },
    #[error("{field}: {value:?} is not a namespace name (or a pattern with one * at its start or end)")]
    InvalidNamespace { field: String, value: String },
    #[error("spec.selector.matchLabels: {key:?}={value:?} is not a valid label selector entry")]
    InvalidSelector { key: String, value: String },
    #[error("{field}: path {value:?} must start with / or *")]
    InvalidPath { field: String, value: String },
    #[error("{field}: a condition needs a key and values or notValues")]
    InvalidCondition { field: String },
    #[error(
        "{field}.key: unknown condition key {key:?} (supported: request.headers[<name>], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>]..., source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port; connection.sni is accepted and fails closed until supported)"
    )]
    UnknownConditionKey { field: String, key: String },
    #[error("metadata.annotations[{key}]: {value:?} is not \"true\" or \"false\"")]
    InvalidAnnotation { key: String, value: String },
    #[error("selects the same workloads as {other}, which is older and wins; delete one of them or make the selectors differ")]
    ConflictingSelector { other: String },
    #[error("{field}: not supported: {what}")]
    Unsupported { field: String, what: &'static str },
    #[error("{field}: request principal {value:?} must be <issuer>/<subject>, or use one * at its start or end")]
    InvalidRequestPrincipal { field: String, value: String },
    #[error("{field}: unknown field (not one of Istio's, or not implemented by this mesh)")]
    UnknownField { field: String },
    #[error("{field}: {problem}")]
    InvalidJwtRule { field: String, problem: String },
    #[error("{field}: {problem}")]
    InvalidTelemetry { field: String, problem: String },
}

impl Error {
    /// Machine-readable reason (condition `reason`, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidPrincipal { .. } => "InvalidPrincipal",
            Self::PortOutOfRange { .. } => "PortOutOfRange",
            Self::InvalidPort { .. } => "InvalidPort",
            Self::UnknownAction { .. } => "UnknownAction",
            Self::UnknownMode { .. } => "UnknownMode",
            Self::InvalidIpBlock { .. } => "InvalidIpBlock",
            Self::InvalidNamespace { .. } => "InvalidNamespace",
            Self::InvalidSelector { .. } => "InvalidSelector",
            Self::InvalidPath { .. } => "InvalidPath",
            Self::InvalidCondition { .. } => "InvalidCondition",
            Self::UnknownConditionKey { .. } => "UnknownConditionKey",
            Self::InvalidAnnotation { .. } => "InvalidAnnotation",
            Self::ConflictingSelector { .. } => "ConflictingSelector",
            Self::Unsupported { .. } => "UnsupportedField",
            Self::InvalidRequestPrincipal { .. } => "InvalidRequestPrincipal",
            Self::UnknownField { .. } => "UnknownField",
            Self::InvalidJwtRule { .. } => "InvalidJwtRule",
            Self::InvalidTelemetry { .. } => "InvalidTelemetry",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    Telemetry,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::RequestAuthentication => "RequestAuthentication",
            Self::Telemetry => "Telemetry",
        }
    }
}

/// The outcome of validating one policy object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: PolicyKind,
    pub key: NamespacedName,
    pub generation: Option<i64>,
    pub result: Result<(), Error>,
    /// For an AuthorizationPolicy that cannot be applied as written: what is enforced instead
    /// (it fails closed), for the status message.
    pub enforced_as: Option<&'static str>,
}

impl Verdict {
    /// The status message: the error, and what is enforced instead when the policy fails closed.
    pub fn message(&self) -> String {
        match (&self.result, self.enforced_as) {
            (Ok(()), _) => String::new(),
            (Err(e), None) => e.to_string(),
            (Err(e), Some(instead)) => format!("{e}; enforced as {instead} (fails closed)"),
        }
    }
}

/// The accepted policies plus one verdict per object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub authorization: BTreeMap<NamespacedName, model::AuthorizationPolicy>,
    pub peer_authentication: BTreeMap<NamespacedName, model::PeerAuthentication>,
    pub request_authentication: BTreeMap<NamespacedName, model::RequestAuthentication>,
    /// Added by [`telemetry::apply`].
    pub telemetry: BTreeMap<NamespacedName, model::Telemetry>,
    pub mesh_config: model::MeshConfig,
    pub verdicts: Vec<Verdict>,
}

/// Validates every policy object. `root_namespace` holds the mesh-wide policies.
pub fn policies(
    authz: &[crd::AuthorizationPolicy],
    peer: &[crd::PeerAuthentication],
    request_authn: &[crd::Read<crd::RequestAuthentication>],
    root_namespace: &str,
) -> Policies {
    let mut out = Policies::default();
    for p in authz {
        let key = key_of(p);
        let result = authorization_policy(p, root_namespace);
        let (policy, enforced_as) = match &result {
            Ok(policy) => (policy.clone(), None),
            Err(_) => {
                let (policy, instead) = fail_closed(p, root_namespace);
                (policy, Some(instead))
            }
        };
        out.verdicts.push(Verdict {
            kind: PolicyKind::AuthorizationPolicy,
            key: key.clone(),
            generation: p.metadata.generation,
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
            enforced_as,
        });
        out.authorization.insert(key, policy);
    }
    // Oldest first (then by name), so that of two conflicting PeerAuthentications the older one
    // wins, as in Istio, whatever order they arrive in.
    let mut peer: Vec<&crd::PeerAuthentication> = peer.iter().collect();
    peer.sort_by_key(|p| (p.metadata.creation_timestamp.as_ref().map(|t| t.0), key_of(*p)));
    for p in peer {
        let key = key_of(p);
        let result = peer_authentication(p, root_namespace).and_then(|policy| {
            let clash = out.peer_authentication.values().find(|o| {
                o.namespace == policy.namespace && o.scope == policy.scope && o.selector == policy.selector
            });
            match clash {
                Some(o) => Err(Error::ConflictingSelector {
                    other: format!("PeerAuthentication {}/{}", o.namespace, o.name),
                }),
                None => Ok(policy),
            }
        });
        out.verdicts.push(Verdict {
            kind: PolicyKind::PeerAuthentication,
            key: key.clone(),
            generation: p.metadata.generation,
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
            enforced_as: None,
        });
        if let Ok(policy) = result {
            out.peer_authentication.insert(key, policy);
        }
    }
    for r in request_authn {
        let key = key_of(&r.object);
        let result = jwt::request_authentication(r, root_namespace);
        out.verdicts.push(Verdict {
            kind: PolicyKind::RequestAuthentication,
            key: key.clone(),
            generation: r.object.metadata.generation,
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
            enforced_as: result.is_err().then_some(jwt::NOT_APPLIED),
        });
        if let Ok(policy) = result {
            out.request_authentication.insert(key, policy);
        }
    }
    out
}

fn key_of(o: &impl kube::Resource) -> NamespacedName {
    NamespacedName::new(o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

/// What an AuthorizationPolicy that cannot be applied as written enforces instead: never more
/// access than it would have given. An ALLOW (or dry-run, or AUDIT) policy still selects its
/// workloads but matches nothing, so they accept only what other ALLOW policies allow; a DENY
/// (or an unknown action, such as Istio's CUSTOM) denies every request to them. An invalid
/// selector selects the policy's whole namespace.
fn fail_closed(p: &crd::AuthorizationPolicy, root_namespace: &str) -> (model::AuthorizationPolicy, &'static str) {
    let key = key_of(p);
    let (scope, selector) = scope(p.spec.selector.as_ref(), &key.namespace, root_namespace)
        .unwrap_or_else(|_| (if key.namespace == root_namespace { Scope::Mesh } else { Scope::Namespace }, model::Labels::new()));
    let (action, rules, instead) = match p.spec.action.as_deref() {
        None | Some("ALLOW" | "AUDIT") => (Action::Allow, Vec::new(), "an ALLOW policy that matches nothing: its workloads accept only what other ALLOW policies allow"),
        _ => (Action::Deny, vec![model::Rule::default()], "a DENY of every request to its workloads"),
    };
    (model::AuthorizationPolicy { name: key.name, namespace: key.namespace, scope, selector, action, dry_run: false, rules }, instead)
}

pub fn authorization_policy(p: &crd::AuthorizationPolicy, root_namespace: &str) -> Result<model::AuthorizationPolicy, Error> {
    let key = key_of(p);
    let (scope, selector) = scope(p.spec.selector.as_ref(), &key.namespace, root_namespace)?;
    let action = match p.spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some(other) => return Err(Error::UnknownAction { value: other.to_owned() }),
    };
    let dry_run = match p.annotations().get(crd::DRY_RUN_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Error::InvalidAnnotation { key: crd::DRY_RUN_ANNOTATION.into(), value: other.into() });
        }
    };
    let rules = p.spec.rules.iter().enumerate().map(|(i, r)| rule(r, &format!("spec.rules[{i}]"))).collect::<Result<_, _>>()?;
    Ok(model::AuthorizationPolicy { name: key.name, namespace: key.namespace, scope, selector, action, dry_run, rules })
}

pub fn peer_authentication(p: &crd::PeerAuthentication, root_namespace: &str) -> Result<model::PeerAuthentication, Error> {
    let key = key_of(p);
    let (scope, selector) = scope(p.spec.selector.as_ref(), &key.namespace, root_namespace)?;
    let mode = mtls_mode(p.spec.mtls.as_ref(), "spec.mtls.mode")?;
    let mut port_level = BTreeMap::new();
    for (port, m) in &p.spec.port_level_mtls {
        let field = format!("spec.portLevelMtls[{port}]");
        port_level.insert(port_number(port, &field)?, mtls_mode(Some(m), &format!("{field}.mode"))?);
    }
    Ok(model::PeerAuthentication { name: key.name, namespace: key.namespace, scope, selector, mode, port_level })
}

fn scope(selector: Option<&crd::WorkloadSelector>, namespace: &str, root: &str) -> Result<(Scope, model::Labels), Error> {
    let labels = selector.map(|s| s.match_labels.clone()).unwrap_or_default();
    for (k, v) in &labels {
        if !valid_label_key(k) || !valid_label_value(v) {
            return Err(Error::InvalidSelector { key: k.clone(), value: v.clone() });
        }
    }
    // In the root namespace a policy covers the whole mesh; a selector then filters workloads
    // of every namespace (Istio's rule).
    let scope = if namespace == root {
        Scope::Mesh
    } else if labels.is_empty() {
        Scope::Namespace
    } else {
        Scope::Workload
    };
    Ok((scope, labels))
}

fn mtls_mode(m: Option<&crd::Mtls>, field: &str) -> Result<MtlsMode, Error> {
    match m.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Ok(MtlsMode::Unset),
        Some("STRICT") => Ok(MtlsMode::Strict),
        Some("PERMISSIVE") => Ok(MtlsMode::Permissive),
        Some("DISABLE") => Ok(MtlsMode::Disable),
        Some(other) => Err(Error::UnknownMode { field: field.into(), value: other.into() }),
    }
}

fn rule(r: &crd::Rule, field: &str) -> Result<model::Rule, Error> {
    let from = r.from.iter().enumerate().map(|(i, f)| source(&f.source, &format!("{field}.from[{i}].source"))).collect::<Result<_, _>>()?;
    let to = r.to.iter().enumerate().map(|(i, t)| operation(&t.operation, &format!("{field}.to[{i}].operation"))).collect::<Result<_, _>>()?;
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.key.is_empty() || (c.values.is_empty() && c.not_values.is_empty()) {
                return Err(Error::InvalidCondition { field: format!("{field}.when[{i}]") });
            }
            if !known_condition_key(&c.key) {
                return Err(Error::UnknownConditionKey { field: format!("{field}.when[{i}]"), key: c.key.clone() });
            }
            Ok(model::Condition { key: c.key.clone(), values: c.values.clone(), not_values: c.not_values.clone() })
        })
        .collect::<Result<_, _>>()?;
    Ok(model::Rule { from, to, when })
}

/// Istio's condition keys. The nodes evaluate the request and connection attributes; JWT
/// keys (`request.auth.*`) need a token verified by a RequestAuthentication; the SNI key is Istio's
/// too and reaches the nodes, which fail closed on it
/// (an ALLOW rule with one never matches, a DENY rule with one matches on its other parts).
fn known_condition_key(key: &str) -> bool {
    let header = key.strip_prefix("request.headers[").and_then(|h| h.strip_suffix(']')).is_some_and(|h| !h.is_empty());
    let claim = key.strip_prefix("request.auth.claims[").and_then(|h| h.strip_suffix(']')).is_some_and(|h| !h.is_empty());
    header
        || claim
        || matches!(
            key,
            "source.ip"
                | "remote.ip"
                | "source.namespace"
                | "source.principal"
                | "destination.ip"
                | "destination.port"
                | "request.auth.principal"
                | "request.auth.audiences"
                | "request.auth.presenter"
                | "connection.sni"
        )
}

fn source(s: &crd::Source, field: &str) -> Result<model::Source, Error> {
    let principals = |list: &[String], name: &str| -> Result<Vec<String>, Error> {
        each(list, field, name, |v, f| if valid_principal(v) { Ok(v.to_owned()) } else { Err(Error::InvalidPrincipal { field: f, value: v.into() }) })
    };
    let namespaces = |list: &[String], name: &str| -> Result<Vec<String>, Error> {
        each(list, field, name, |v, f| if valid_pattern(v, valid_dns_label) { Ok(v.to_owned()) } else { Err(Error::InvalidNamespace { field: f, value: v.into() }) })
    };
    let blocks = |list: &[String], name: &str| each(list, field, name, ip_block);
    let request_principals = |list: &[String], name: &str| -> Result<Vec<String>, Error> {
        each(list, field, name, |v, f| if valid_request_principal(v) { Ok(v.to_owned()) } else { Err(Error::InvalidRequestPrincipal { field: f, value: v.into() }) })
    };
    for (list, name, what) in [
        (&s.remote_ip_blocks, "remoteIpBlocks", "remote (X-Forwarded-For) addresses; use ipBlocks"),
        (&s.not_remote_ip_blocks, "notRemoteIpBlocks", "remote (X-Forwarded-For) addresses; use notIpBlocks"),
    ] {
        if !list.is_empty() {
            return Err(Error::Unsupported { field: format!("{field}.{name}"), what });
        }
    }
    Ok(model::Source {
        principals: principals(&s.principals, "principals")?,
        not_principals: principals(&s.not_principals, "notPrincipals")?,
        namespaces: namespaces(&s.namespaces, "namespaces")?,
        not_namespaces: namespaces(&s.not_namespaces, "notNamespaces")?,
        ip_blocks: blocks(&s.ip_blocks, "ipBlocks")?,
        not_ip_blocks: blocks(&s.not_ip_blocks, "notIpBlocks")?,
        request_principals: request_principals(&s.request_principals, "requestPrincipals")?,
        not_request_principals: request_principals(&s.not_request_principals, "notRequestPrincipals")?,
    })
}

fn operation(o: &crd::Operation, field: &str) -> Result<model::Operation, Error> {
    let ports = |list: &[String], name: &str| each(list, field, name, |v, f| port_number(v, &f));
    let paths = |list: &[String], name: &str| {
        each(list, field, name, |v, f| if v.starts_with('/') || v.starts_with('*') { Ok(v.to_owned()) } else { Err(Error::InvalidPath { field: f, value: v.into() }) })
    };
    Ok(model::Operation {
        ports: ports(&o.ports, "ports")?,
        not_ports: ports(&o.not_ports, "notPorts")?,
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: paths(&o.paths, "paths")?,
        not_paths: paths(&o.not_paths, "notPaths")?,
        hosts: o.hosts.clone(),
        not_hosts: o.not_hosts.clone(),
    })
}

/// Checks every entry of a list, naming the failing entry's field path.
fn each<T>(list: &[String], field: &str, name: &str, check: impl Fn(&str, String) -> Result<T, Error>) -> Result<Vec<T>, Error> {
    list.iter().enumerate().map(|(i, v)| check(v, format!("{field}.{name}[{i}]"))).collect()
}

fn port_number(v: &str, field: &str) -> Result<u16, Error> {
    let n: i64 = v.trim().parse().map_err(|_| Error::InvalidPort { field: field.into(), value: v.into() })?;
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::PortOutOfRange { field: field.into(), value: n }),
    }
}

fn ip_block(v: &str, field: String) -> Result<IpNet, Error> {
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| Error::InvalidIpBlock { field, value: v.into() })
}

/// `<trust-domain>/ns/<ns>/sa/<sa>`, `*`, or such a string with one `*` at its start or end.
fn valid_principal(v: &str) -> bool {
    if v == "*" {
        return true;
    }
    if v.starts_with("spiffe://") || v.matches('*').count() > 1 {
        return false;
    }
    if v.starts_with('*') || v.ends_with('*') {
        return v.len() > 1 && !v.contains(char::is_whitespace);
    }
    let parts: Vec<&str> = v.split('/').collect();
    matches!(parts.as_slice(), [td, "ns", ns, "sa", sa]
        if !td.is_empty() && valid_dns_label(ns) && !sa.is_empty() && !sa.contains(char::is_whitespace))
}

/// `<issuer>/<subject>` (the issuer may contain `/`), `*`, or such a string with one `*` at its
/// start or end.
fn valid_request_principal(v: &str) -> bool {
    if v == "*" {
        return true;
    }
    let stars = v.matches('*').count();
    let wildcard = stars == 1 && (v.starts_with('*') || v.ends_with('*'));
    !v.is_empty() && !v.contains(char::is_whitespace) && (stars == 0 && v.contains('/') || wildcard && v.len() > 1)
}

/// An exact name, `*`, or a name fragment with one `*` at its start or end (`kube-*`).
fn valid_pattern(v: &str, check: fn(&str) -> bool) -> bool {
    match v.strip_prefix('*').or_else(|| v.strip_suffix('*')) {
        _ if v == "*" => true,
        Some(fragment) => !fragment.is_empty() && fragment.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        None => check(v),
    }
}

pub(crate) fn valid_dns_label(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

pub(crate) fn valid_label_key(k: &str) -> bool {
    let name = k.rsplit_once('/').map_or(k, |(_, n)| n);
    !name.is_empty() && name.len() <= 63 && valid_label_value(name)
}

pub(crate) fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

mod jwt;
pub mod telemetry;

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
