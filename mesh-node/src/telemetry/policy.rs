//! Istio's `Telemetry` as this node applies it: which provider, sampling percentage and custom
//! tags a local workload's requests are traced with, on the client side (its outbound requests)
//! and the server side (requests to it), and whether its access log is on.
//!
//! Scopes nest as in Istio: the root namespace's Telemetry (no selector) sets mesh defaults, the
//! workload's namespace's (no selector) overrides what it sets, and one with a selector matching
//! the workload overrides that. Within one Telemetry, a tracing entry for the exact side
//! (`CLIENT` or `SERVER`) wins over `CLIENT_AND_SERVER`. Fields left unset are inherited; custom
//! tags merge by name. The provider defaults to the mesh config's `defaultProviders.tracing`, the
//! sampling percentage to Istio's 1 %.

use std::collections::BTreeMap;

use crate::state::Workload;

/// Istio's default `randomSamplingPercentage`.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

/// One Telemetry resource (validated by the controller).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub tracing: Vec<TracingRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_disabled: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    ClientAndServer,
    Client,
    Server,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingRule {
    pub mode: Mode,
    pub provider: Option<String>,
    pub sampling_percent: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: BTreeMap<String, TagSource>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TagSource {
    Literal(String),
    Environment { name: String, default: Option<String> },
    Header { name: String, default: Option<String> },
}

/// Which side of a request this node traces for the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The workload is the client (source node, outbound).
    Client,
    /// The workload is the server (destination node, inbound).
    Server,
}

/// The mesh config's tracing providers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshTracing {
    pub providers: BTreeMap<String, Provider>,
    pub default_provider: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Provider {
    pub name: String,
    /// A Service host or an IP address.
    pub service: String,
    pub port: u16,
    /// 0: unlimited.
    pub max_tag_length: u32,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    Zipkin { path: String },
    OpenTelemetry,
}

/// What a workload's requests on one side are traced with.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub provider: Provider,
    pub sampling_percent: f64,
    pub custom_tags: BTreeMap<String, TagSource>,
}

/// The Telemetries that apply to `w`, least specific first.
fn levels<'a>(all: &'a [Telemetry], root_namespace: &'a str, w: &'a Workload) -> impl Iterator<Item = &'a Telemetry> {
    let selects = |t: &Telemetry| t.selector.as_ref().is_some_and(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
    let mesh = all.iter().filter(move |t| t.namespace == root_namespace && t.selector.is_none());
    let namespace = all.iter().filter(move |t| *t.namespace == *w.namespace && t.namespace != root_namespace && t.selector.is_none());
    let workload = all.iter().filter(move |t| (*t.namespace == *w.namespace || t.namespace == root_namespace) && selects(t));
    mesh.chain(namespace).chain(workload)
}

/// How `w`'s requests on `side` are traced; `None` when tracing is off for them (no provider,
/// or span reporting disabled).
pub fn tracing_for(all: &[Telemetry], mesh: &MeshTracing, root_namespace: &str, w: &Workload, side: Side) -> Option<Resolved> {
    let mut provider = mesh.default_provider.clone();
    let mut sampling = None;
    let mut disabled = false;
    let mut custom_tags = BTreeMap::new();
    for t in levels(all, root_namespace, w) {
        let exact = match side {
            Side::Client => Mode::Client,
            Side::Server => Mode::Server,
        };
        let Some(rule) = t.tracing.iter().find(|r| r.mode == exact).or_else(|| t.tracing.iter().find(|r| r.mode == Mode::ClientAndServer)) else {
            continue;
        };
        if let Some(p) = &rule.provider {
            provider = Some(p.clone());
        }
        if let Some(s) = rule.sampling_percent {
            sampling = Some(s);
        }
        if let Some(d) = rule.disable_span_reporting {
            disabled = d;
        }
        custom_tags.extend(rule.custom_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if disabled {
        return None;
    }
    let provider = mesh.providers.get(provider.as_deref()?)?.clone();
    Some(Resolved { provider, sampling_percent: sampling.unwrap_or(DEFAULT_SAMPLING_PERCENT), custom_tags })
}

/// Whether requests to and from `w` get access log lines (on unless a Telemetry disables it).
pub fn access_log_for(all: &[Telemetry], root_namespace: &str, w: &Workload) -> bool {
    !levels(all, root_namespace, w).filter_map(|t| t.access_log_disabled).last().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, app: &str) -> Workload {
        Workload {
            name: format!("{app}-1").into(),
            namespace: ns.into(),
            service_account: "default".into(),
            workload_name: None,
            ip: "198.18.1.10".parse().expect("ip"),
            node: "n1".into(),
            node_ip: "198.18.0.1".parse().expect("ip"),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]).into(),
            protocol: crate::state::Protocol::Hbone,
            locality: None,
        }
    }

    fn rule(mode: Mode, provider: Option<&str>, sampling: Option<f64>) -> TracingRule {
        TracingRule { mode, provider: provider.map(str::to_owned), sampling_percent: sampling, disable_span_reporting: None, custom_tags: BTreeMap::new() }
    }

    fn telemetry(ns: &str, selector: Option<(&str, &str)>, tracing: Vec<TracingRule>) -> Telemetry {
        Telemetry {
            name: "t".into(),
            namespace: ns.into(),
            selector: selector.map(|(k, v)| [(k.to_owned(), v.to_owned())].into()),
            tracing,
            access_log_disabled: None,
        }
    }

    fn mesh(default: Option<&str>) -> MeshTracing {
        let p = |name: &str, protocol| (name.to_owned(), Provider { name: name.into(), service: "zipkin.mesh-system".into(), port: 9411, max_tag_length: 0, protocol });
        MeshTracing {
            providers: [p("zipkin", Protocol::Zipkin { path: "/api/v2/spans".into() }), p("otel", Protocol::OpenTelemetry)].into(),
            default_provider: default.map(str::to_owned),
        }
    }

    #[test]
    fn nothing_configured_means_no_tracing_and_the_default_provider_traces_at_one_percent() {
        let w = workload("demo", "whoami");
        assert_eq!(tracing_for(&[], &mesh(None), "mesh-system", &w, Side::Client), None);
        let r = tracing_for(&[], &mesh(Some("zipkin")), "mesh-system", &w, Side::Server).expect("default provider traces");
        assert_eq!((r.provider.name.as_str(), r.sampling_percent), ("zipkin", 1.0));
    }

    #[test]
    fn the_most_specific_scope_wins_field_by_field() {
        let w = workload("demo", "whoami");
        let all = [
            telemetry("mesh-system", None, vec![rule(Mode::ClientAndServer, Some("zipkin"), Some(5.0))]),
            telemetry("demo", None, vec![rule(Mode::ClientAndServer, None, Some(50.0))]),
            telemetry("demo", Some(("app", "whoami")), vec![rule(Mode::Server, Some("otel"), None)]),
            telemetry("other", None, vec![rule(Mode::ClientAndServer, None, Some(0.0))]),
        ];
        let client = tracing_for(&all, &mesh(None), "mesh-system", &w, Side::Client).expect("on");
        assert_eq!((client.provider.name.as_str(), client.sampling_percent), ("zipkin", 50.0));
        let server = tracing_for(&all, &mesh(None), "mesh-system", &w, Side::Server).expect("on");
        assert_eq!((server.provider.name.as_str(), server.sampling_percent), ("otel", 50.0));
        let elsewhere = workload("prod", "whoami");
        let mesh_wide = tracing_for(&all, &mesh(None), "mesh-system", &elsewhere, Side::Client).expect("mesh-wide");
        assert!((mesh_wide.sampling_percent - 5.0).abs() < f64::EPSILON);
    }

    #[test]
    fn disabled_span_reporting_and_tags_and_access_log() {
        let w = workload("demo", "whoami");
        let mut root = telemetry("mesh-system", None, vec![rule(Mode::ClientAndServer, Some("zipkin"), None)]);
        root.tracing[0].custom_tags.insert("team".into(), TagSource::Literal("a".into()));
        root.tracing[0].custom_tags.insert("env".into(), TagSource::Literal("prod".into()));
        let mut ns = telemetry("demo", None, vec![rule(Mode::ClientAndServer, None, None)]);
        ns.tracing[0].custom_tags.insert("team".into(), TagSource::Literal("b".into()));
        ns.access_log_disabled = Some(true);
        let r = tracing_for(&[root.clone(), ns.clone()], &mesh(None), "mesh-system", &w, Side::Client).expect("on");
        assert_eq!(r.custom_tags["team"], TagSource::Literal("b".into()));
        assert_eq!(r.custom_tags["env"], TagSource::Literal("prod".into()));
        assert!(!access_log_for(&[root.clone(), ns.clone()], "mesh-system", &w));
        assert!(access_log_for(&[root.clone()], "mesh-system", &w));
        let mut off = telemetry("demo", Some(("app", "whoami")), vec![rule(Mode::Client, None, None)]);
        off.tracing[0].disable_span_reporting = Some(true);
        assert_eq!(tracing_for(&[root.clone(), off.clone()], &mesh(None), "mesh-system", &w, Side::Client), None);
        assert!(tracing_for(&[root, off], &mesh(None), "mesh-system", &w, Side::Server).is_some());
    }
}
