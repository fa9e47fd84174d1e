//! Connection metrics with Istio's names and labels (so existing dashboards work), and the
//! proxy's own `mesh_*` metrics.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    identity::Identity,
    state::{Service, Workload},
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values are Istio's exact strings")]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values are Istio's exact strings")]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Istio's TCP metric labels (the subset a TCP proxy can know).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

fn label(w: Option<&Workload>, key: &[&str]) -> String {
    w.and_then(|w| key.iter().find_map(|k| w.labels.get(*k)).cloned()).unwrap_or_else(|| UNKNOWN.into())
}

/// One side of a connection, as far as it is known.
#[derive(Clone, Copy)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    pub identity: Option<&'a Identity>,
}

impl ConnLabels {
    pub fn new(reporter: Reporter, src: Peer<'_>, dst: Peer<'_>, policy: SecurityPolicy, cluster: &str) -> Self {
        let name = |p: Peer<'_>| p.workload.map_or_else(|| UNKNOWN.into(), |w| w.workload_name().to_owned());
        let ns = |p: Peer<'_>| p.workload.map_or_else(|| UNKNOWN.into(), |w| w.namespace.clone());
        let principal = |p: Peer<'_>| p.identity.map_or_else(|| UNKNOWN.into(), ToString::to_string);
        let canonical = |p: Peer<'_>| {
            let l = label(p.workload, &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]);
            if l == UNKNOWN { name(p) } else { l }
        };
        let revision = |p: Peer<'_>| {
            let l = label(p.workload, &["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]);
            if l == UNKNOWN && p.workload.is_some() { "latest".into() } else { l }
        };
        let cluster_of = |p: Peer<'_>| if p.workload.is_some() { cluster.to_owned() } else { UNKNOWN.into() };
        Self {
            reporter,
            source_workload: name(src),
            source_canonical_service: canonical(src),
            source_canonical_revision: revision(src),
            source_workload_namespace: ns(src),
            source_principal: principal(src),
            source_app: label(src.workload, &["app"]),
            source_version: label(src.workload, &["version"]),
            source_cluster: cluster_of(src),
            destination_service: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
            destination_workload: name(dst),
            destination_canonical_service: canonical(dst),
            destination_canonical_revision: revision(dst),
            destination_workload_namespace: ns(dst),
            destination_principal: principal(dst),
            destination_app: label(dst.workload, &["app"]),
            destination_version: label(dst.workload, &["version"]),
            destination_cluster: cluster_of(dst),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: policy,
        }
    }

    /// Fills Istio's `destination_service*` labels with the Service the connection reached
    /// (`State::serving`); they stay "unknown" for a pod no Service selects.
    #[must_use]
    pub fn with_service(mut self, service: Option<&Service>, cluster_domain: &str) -> Self {
        if let Some(s) = service {
            self.destination_service = s.hostname(cluster_domain);
            self.destination_service_name.clone_from(&s.name);
            self.destination_service_namespace.clone_from(&s.namespace);
        }
        self
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Default)]
pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    pub pool_connections: Gauge,
    pub pool_streams: Gauge,
    pub tls_handshakes: Family<DirectionLabel, Counter>,
    pub tls_errors: Family<DirectionLabel, Counter>,
    pub denials: Family<ReasonLabel, Counter>,
    pub dry_run_denials: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client of a TCP connection", m.sent.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received from the client of a TCP connection", m.received.clone());
        registry.register("mesh_pool_connections", "Pooled outbound HBONE connections", m.pool_connections.clone());
        registry.register("mesh_pool_streams", "HBONE streams open on pooled connections", m.pool_streams.clone());
        registry.register("mesh_tls_handshakes", "Completed mTLS handshakes", m.tls_handshakes.clone());
        registry.register("mesh_tls_handshake_errors", "Failed mTLS handshakes", m.tls_errors.clone());
        registry.register("mesh_authz_denials", "Connections refused by policy, by reason", m.denials.clone());
        registry.register(
            "mesh_authz_dry_run_denials",
            "Connections a dry-run or AUDIT policy matched (not enforced)",
            m.dry_run_denials.clone(),
        );
        m
    }

    pub fn deny(&self, reason: &'static str) {
        self.denials.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn handshake(&self, direction: &'static str, ok: bool) {
        let fam = if ok { &self.tls_handshakes } else { &self.tls_errors };
        fam.get_or_create(&DirectionLabel { direction }).inc();
    }
}
