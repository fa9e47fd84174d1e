//! `Telemetry` → [`model::Telemetry`], and the mesh config's `extensionProviders` →
//! [`model::MeshConfig`]: providers of a type we do not export to, a second provider in one
//! tracing entry (Istio allows one), a sampling percentage outside 0-100, a custom tag with no
//! or two sources, are each refused with the field named. A Telemetry naming a provider that is
//! missing or refused is refused too: its workloads keep what the enclosing scopes set.

use std::collections::BTreeMap;

use super::{Error, PolicyKind, Policies, Verdict, key_of, scope};
use crate::{
    crd::{self, telemetry as t},
    model::{self, TracingMode},
};

/// Zipkin's collector path when the provider sets none.
const ZIPKIN_PATH: &str = "/api/v2/spans";
/// The access log's provider name (Istio's built-in Envoy file logger).
const ACCESS_LOG_PROVIDER: &str = "envoy";

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::InvalidTelemetry { field: field.into(), problem: problem.into() }
}

/// The mesh config's providers: the usable ones, and why each other one is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshConfigCheck {
    pub config: model::MeshConfig,
    /// Provider name → why it cannot be used.
    pub refused: BTreeMap<String, String>,
}

pub fn mesh_config(c: &t::MeshConfig) -> MeshConfigCheck {
    let mut out = MeshConfigCheck::default();
    for (i, p) in c.extension_providers.iter().enumerate() {
        let field = format!("extensionProviders[{i}]");
        match provider(p, &field) {
            Ok(Some(provider)) => {
                out.config.tracing_providers.insert(p.name.clone(), provider);
            }
            // Not a tracing provider (an ext-authz server, a log sink): nothing to check here.
            Ok(None) => {}
            Err(problem) => {
                tracing::warn!(provider = %p.name, "mesh config: {problem}");
                out.refused.insert(p.name.clone(), problem);
            }
        }
    }
    match c.default_providers.tracing.as_slice() {
        [] => {}
        [name] if out.config.tracing_providers.contains_key(name) => out.config.default_tracing_provider = Some(name.clone()),
        [name] => {
            let why = out.refused.get(name).map_or("no such tracing provider", String::as_str);
            tracing::warn!(provider = %name, "mesh config: defaultProviders.tracing ignored: {why}");
        }
        more => tracing::warn!(?more, "mesh config: defaultProviders.tracing names more than one provider (one is supported); ignored"),
    }
    out
}

fn provider(p: &t::ExtensionProvider, field: &str) -> Result<Option<model::TracingProvider>, String> {
    let port = |port: u32, f: &str| u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| format!("{f}.port: {port} is out of range 1-65535"));
    let tag_length = |l: Option<u32>| l.unwrap_or(0);
    match (&p.zipkin, &p.opentelemetry) {
        (Some(_), Some(_)) => Err(format!("{field}: set one of zipkin and opentelemetry, not both")),
        (Some(z), None) => {
            let path = z.path.clone().unwrap_or_else(|| ZIPKIN_PATH.to_owned());
            if !path.starts_with('/') {
                return Err(format!("{field}.zipkin.path: {path:?} must start with /"));
            }
            Ok(Some(model::TracingProvider {
                protocol: model::TraceProtocol::Zipkin { path },
                service: service(&z.service, &format!("{field}.zipkin"))?,
                port: port(z.port, &format!("{field}.zipkin"))?,
                max_tag_length: tag_length(z.max_tag_length),
            }))
        }
        (None, Some(o)) => {
            if o.http.is_some() {
                return Err(format!("{field}.opentelemetry.http: OTLP over HTTP is not exported by this mesh; omit http for OTLP over gRPC"));
            }
            if let Some(k) = o.other.keys().next() {
                return Err(format!("{field}.opentelemetry.{k}: not supported by this mesh"));
            }
            Ok(Some(model::TracingProvider {
                protocol: model::TraceProtocol::OpenTelemetry,
                service: service(&o.service, &format!("{field}.opentelemetry"))?,
                port: port(o.port, &format!("{field}.opentelemetry"))?,
                max_tag_length: tag_length(o.max_tag_length),
            }))
        }
        (None, None) => match p.other.keys().next() {
            Some(kind) if TRACERS.contains(&kind.as_str()) => {
                Err(format!("{field}.{kind}: tracing provider type {kind:?} is not supported by this mesh (zipkin and opentelemetry are)"))
            }
            // Istio's other provider types (ext authz, access log sinks, Prometheus) are not
            // tracing providers; a Telemetry naming one for tracing is refused by name below.
            Some(kind) => Err(format!("{field}.{kind}: provider type {kind:?} is not supported by this mesh")),
            None => Err(format!("{field}: no provider type (zipkin or opentelemetry)")),
        },
    }
}

/// Istio's other tracing provider types, refused by name.
const TRACERS: [&str; 5] = ["datadog", "lightstep", "skywalking", "stackdriver", "sds"];

fn service(s: &str, field: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.contains('/') || s.contains(':') && s.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("{field}.service: {s:?} must be a Service host (name.namespace[.svc.<domain>]) or an IP address"));
    }
    Ok(s.to_owned())
}

/// Validates every Telemetry against the mesh config and adds them (and the config) to `out`.
pub fn apply(out: &mut Policies, objects: &[crd::Read<t::Telemetry>], mesh: &MeshConfigCheck, root_namespace: &str) {
    out.mesh_config = mesh.config.clone();
    // Oldest first, so of two with the same scope the older one wins (as for PeerAuthentication).
    let mut objects: Vec<&crd::Read<t::Telemetry>> = objects.iter().collect();
    objects.sort_by_key(|r| (r.object.metadata.creation_timestamp.as_ref().map(|t| t.0), key_of(&r.object)));
    for r in objects {
        let key = key_of(&r.object);
        let result = telemetry(r, mesh, root_namespace).and_then(|tm| {
            let clash = out.telemetry.values().find(|o| o.namespace == tm.namespace && o.scope == tm.scope && o.selector == tm.selector);
            match clash {
                Some(o) => Err(Error::ConflictingSelector { other: format!("Telemetry {}/{}", o.namespace, o.name) }),
                None => Ok(tm),
            }
        });
        out.verdicts.push(Verdict {
            kind: PolicyKind::Telemetry,
            key: key.clone(),
            generation: r.object.metadata.generation,
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
            enforced_as: None,
        });
        if let Ok(tm) = result {
            out.telemetry.insert(key, tm);
        }
    }
}

pub fn telemetry(r: &crd::Read<t::Telemetry>, mesh: &MeshConfigCheck, root_namespace: &str) -> Result<model::Telemetry, Error> {
    if let Some(field) = r.unknown_fields.first() {
        return Err(Error::UnknownField { field: field.clone() });
    }
    let o = &r.object;
    let key = key_of(o);
    let (scope, selector) = scope(o.spec.selector.as_ref(), &key.namespace, root_namespace)?;
    let mut tracing = Vec::new();
    for (i, rule) in o.spec.tracing.iter().enumerate() {
        let rule = tracing_rule(rule, &format!("spec.tracing[{i}]"), mesh)?;
        if tracing.iter().any(|t: &model::TracingRule| t.mode == rule.mode) {
            return Err(invalid(format!("spec.tracing[{i}].match.mode"), "two tracing entries match the same mode"));
        }
        tracing.push(rule);
    }
    let mut access_log_disabled = None;
    for (i, a) in o.spec.access_logging.iter().enumerate() {
        if let Some(p) = a.providers.iter().find(|p| p.name != ACCESS_LOG_PROVIDER) {
            return Err(invalid(
                format!("spec.accessLogging[{i}].providers"),
                format!("provider {:?}: the node's access log is the only one (name it {ACCESS_LOG_PROVIDER:?} or omit providers)", p.name),
            ));
        }
        if access_log_disabled.is_some() {
            return Err(invalid(format!("spec.accessLogging[{i}]"), "one accessLogging entry is supported"));
        }
        access_log_disabled = Some(a.disabled.unwrap_or(false));
    }
    Ok(model::Telemetry { name: key.name, namespace: key.namespace, scope, selector, tracing, access_log_disabled })
}

fn tracing_rule(rule: &t::Tracing, field: &str, mesh: &MeshConfigCheck) -> Result<model::TracingRule, Error> {
    let mode = match rule.match_.as_ref().and_then(|m| m.mode.as_deref()) {
        None | Some("CLIENT_AND_SERVER") => TracingMode::ClientAndServer,
        Some("CLIENT") => TracingMode::Client,
        Some("SERVER") => TracingMode::Server,
        Some(other) => return Err(invalid(format!("{field}.match.mode"), format!("unknown mode {other:?} (expected CLIENT_AND_SERVER, CLIENT or SERVER)"))),
    };
    let provider = match rule.providers.as_slice() {
        [] => None,
        [p] => {
            if let Some(why) = mesh.refused.get(&p.name) {
                return Err(invalid(format!("{field}.providers[0]"), format!("provider {:?} is refused in the mesh config: {why}", p.name)));
            }
            if !mesh.config.tracing_providers.contains_key(&p.name) {
                let known: Vec<&str> = mesh.config.tracing_providers.keys().map(String::as_str).collect();
                return Err(invalid(
                    format!("{field}.providers[0]"),
                    format!("no tracing provider {:?} in the mesh config's extensionProviders (it has {known:?})", p.name),
                ));
            }
            Some(p.name.clone())
        }
        _ => return Err(invalid(format!("{field}.providers"), "one provider per tracing entry is supported (as in Istio)")),
    };
    let sampling_ppm = match rule.random_sampling_percentage {
        None => None,
        Some(p) if (0.0..=100.0).contains(&p) => {
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0..=100 checked, times 10,000 fits")]
            Some((p * 10_000.0).round() as u32)
        }
        Some(p) => return Err(invalid(format!("{field}.randomSamplingPercentage"), format!("{p} is outside 0-100"))),
    };
    let mut custom_tags = BTreeMap::new();
    for (name, tag) in &rule.custom_tags {
        let f = format!("{field}.customTags[{name}]");
        let header = |h: &t::FromSource| -> Result<model::CustomTag, Error> {
            http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| invalid(format!("{f}.header.name"), format!("{:?} is not a header name", h.name)))?;
            Ok(model::CustomTag::Header { name: h.name.to_ascii_lowercase(), default: h.default_value.clone() })
        };
        let value = match (&tag.literal, &tag.environment, &tag.header) {
            (Some(l), None, None) => model::CustomTag::Literal(l.value.clone()),
            (None, Some(e), None) if !e.name.is_empty() => model::CustomTag::Environment { name: e.name.clone(), default: e.default_value.clone() },
            (None, None, Some(h)) => header(h)?,
            _ => return Err(invalid(f, "set exactly one of literal, environment (with a name) and header")),
        };
        custom_tags.insert(name.clone(), value);
    }
    Ok(model::TracingRule { mode, provider, sampling_ppm, disable_span_reporting: rule.disable_span_reporting, custom_tags })
}
