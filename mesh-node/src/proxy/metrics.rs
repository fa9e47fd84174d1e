//! Connection metrics with Istio's names and labels (so existing dashboards work), and the
//! proxy's own `mesh_*` metrics.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    identity::Identity,
    state::{Service, Workload},
};

pub use mesh_l7::metrics::{PeerLabels, Reporter, SecurityPolicy};
use mesh_l7::metrics::UNKNOWN;

/// Istio's TCP metric labels: the peers, plus what a TCP connection can say of its protocol and
/// outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
}

fn label(w: Option<&Workload>, key: &[&str]) -> Arc<str> {
    w.and_then(|w| key.iter().find_map(|k| w.labels.get(*k))).map_or_else(|| Arc::from(UNKNOWN), |v| Arc::from(v.as_str()))
}

/// A workload's canonical service and revision, as Istio derives them from its labels.
pub fn canonical(w: &Workload) -> (Arc<str>, Arc<str>) {
    let service = label(Some(w), &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]);
    let service = if &*service == UNKNOWN { Arc::from(w.workload_name()) } else { service };
    let revision = label(Some(w), &["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]);
    let revision = if &*revision == UNKNOWN { Arc::from("latest") } else { revision };
    (service, revision)
}

/// One side of a connection, as far as it is known.
#[derive(Clone, Copy)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    pub identity: Option<&'a Identity>,
}

/// Istio's labels of a source and a destination (the set every TCP and HTTP metric carries).
pub fn peer_labels(reporter: Reporter, src: Peer<'_>, dst: Peer<'_>, policy: SecurityPolicy, cluster: &str) -> PeerLabels {
    let unknown = || Arc::from(UNKNOWN);
    let name = |p: Peer<'_>| p.workload.map_or_else(unknown, |w| Arc::from(w.workload_name()));
    let ns = |p: Peer<'_>| p.workload.map_or_else(unknown, |w| Arc::from(w.namespace.as_str()));
    let principal = |p: Peer<'_>| p.identity.map_or_else(unknown, |i| Arc::from(i.to_string()));
    // Workload-less peers are `unknown` for both (Istio's value when nothing is known).
    let service = |p: Peer<'_>| p.workload.map_or_else(unknown, |w| canonical(w).0);
    let revision = |p: Peer<'_>| p.workload.map_or_else(unknown, |w| canonical(w).1);
    let cluster_of = |p: Peer<'_>| if p.workload.is_some() { Arc::from(cluster) } else { unknown() };
    PeerLabels {
        reporter,
        source_workload: name(src),
        source_canonical_service: service(src),
        source_canonical_revision: revision(src),
        source_workload_namespace: ns(src),
        source_principal: principal(src),
        source_app: label(src.workload, &["app"]),
        source_version: label(src.workload, &["version"]),
        source_cluster: cluster_of(src),
        destination_service: unknown(),
        destination_service_name: unknown(),
        destination_service_namespace: unknown(),
        destination_workload: name(dst),
        destination_canonical_service: service(dst),
        destination_canonical_revision: revision(dst),
        destination_workload_namespace: ns(dst),
        destination_principal: principal(dst),
        destination_app: label(dst.workload, &["app"]),
        destination_version: label(dst.workload, &["version"]),
        destination_cluster: cluster_of(dst),
        connection_security_policy: policy,
    }
}

/// Fills Istio's `destination_service*` labels with the Service the traffic reached; they stay
/// "unknown" for a pod no Service selects.
pub fn set_service(peers: &mut PeerLabels, service: Option<&Service>, cluster_domain: &str) {
    if let Some(s) = service {
        peers.destination_service = Arc::from(s.hostname(cluster_domain));
        peers.destination_service_name = Arc::from(s.name.as_str());
        peers.destination_service_namespace = Arc::from(s.namespace.as_str());
    }
}

impl ConnLabels {
    pub fn new(reporter: Reporter, src: Peer<'_>, dst: Peer<'_>, policy: SecurityPolicy, cluster: &str) -> Self {
        Self { peers: peer_labels(reporter, src, dst, policy, cluster), request_protocol: "tcp", response_flags: "-" }
    }

    /// Fills Istio's `destination_service*` labels with the Service the connection reached
    /// (`State::serving`); they stay "unknown" for a pod no Service selects.
    #[must_use]
    pub fn with_service(mut self, service: Option<(&Service, &crate::state::ServicePort)>, cluster_domain: &str) -> Self {
        set_service(&mut self.peers, service.map(|(s, _)| s), cluster_domain);
        self
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// Which relay a connection went through (`relay::Record::kind`: outbound, inbound, same-node,
/// passthrough, inbound-plaintext).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    pub pool_connections: Gauge,
    pub pool_streams: Gauge,
    pub tls_handshakes: Family<DirectionLabel, Counter>,
    pub tls_errors: Family<DirectionLabel, Counter>,
    /// HBONE handshakes (TLS + HTTP/2) cut off at `handshake_timeout`.
    pub handshake_timeouts: Family<DirectionLabel, Counter>,
    /// Relayed TCP connections closed after `tcp_idle_timeout` without a byte.
    pub idle_timeouts: Family<KindLabel, Counter>,
    /// Connections closed at accept by a listener's connection limits (`accept::Limits`).
    pub connections_refused: super::accept::Refused,
    pub denials: Family<ReasonLabel, Counter>,
    pub dry_run_denials: Counter,
    /// Requests refused for an invalid JWT, by `mesh_l7::jwt::Error` label.
    pub jwt_failures: Family<ReasonLabel, Counter>,
    /// Istio's request metrics (HTTP ports).
    pub requests: Arc<mesh_l7::metrics::RequestMetrics>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            pool_connections: Gauge::default(),
            pool_streams: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_errors: Family::default(),
            handshake_timeouts: Family::default(),
            idle_timeouts: Family::default(),
            connections_refused: Family::default(),
            denials: Family::default(),
            dry_run_denials: Counter::default(),
            jwt_failures: Family::default(),
            requests: Arc::new(mesh_l7::metrics::RequestMetrics::new(registry)),
        };
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client of a TCP connection", m.sent.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received from the client of a TCP connection", m.received.clone());
        registry.register("mesh_pool_connections", "Pooled outbound HBONE connections", m.pool_connections.clone());
        registry.register("mesh_pool_streams", "HBONE streams open on pooled connections", m.pool_streams.clone());
        registry.register("mesh_tls_handshakes", "Completed mTLS handshakes", m.tls_handshakes.clone());
        registry.register("mesh_tls_handshake_errors", "Failed mTLS handshakes", m.tls_errors.clone());
        registry.register(
            "mesh_handshake_timeouts",
            "HBONE connections closed because TLS and HTTP/2 setup did not finish within MESH_HANDSHAKE_TIMEOUT_SECS",
            m.handshake_timeouts.clone(),
        );
        registry.register(
            "mesh_tcp_idle_timeouts",
            "Relayed TCP connections closed because no byte moved either way for MESH_TCP_IDLE_TIMEOUT_SECS, by relay",
            m.idle_timeouts.clone(),
        );
        registry.register(
            "mesh_connections_refused",
            "Connections closed at accept because a listener's limit (in all, or per source address) was reached",
            m.connections_refused.clone(),
        );
        registry.register("mesh_authz_denials", "Connections and requests refused by policy, by reason", m.denials.clone());
        registry.register(
            "mesh_authz_dry_run_denials",
            "Connections a dry-run or AUDIT policy matched (not enforced)",
            m.dry_run_denials.clone(),
        );
        registry.register("mesh_jwt_failures", "Requests refused with 401 for an invalid JWT (RequestAuthentication), by reason", m.jwt_failures.clone());
        m
    }

    pub fn deny(&self, reason: &'static str) {
        self.denials.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn handshake_timeout(&self, direction: &'static str) {
        self.handshake_timeouts.get_or_create(&DirectionLabel { direction }).inc();
    }

    pub fn handshake(&self, direction: &'static str, ok: bool) {
        let fam = if ok { &self.tls_handshakes } else { &self.tls_errors };
        fam.get_or_create(&DirectionLabel { direction }).inc();
    }
}
