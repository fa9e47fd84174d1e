//! Connection metrics with Istio's names and labels (so existing dashboards work), and the
//! proxy's own `mesh_*` metrics.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    identity::Identity,
    state::{Service, State, StateRx, Workload},
};

pub use mesh_l7::metrics::{PeerLabels, Reporter, SecurityPolicy};
use mesh_l7::metrics::{PrunableFamily, UNKNOWN};

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
    let ns = |p: Peer<'_>| p.workload.map_or_else(unknown, |w| w.namespace.clone());
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
    pub opened: PrunableFamily<ConnLabels, Counter>,
    pub closed: PrunableFamily<ConnLabels, Counter>,
    pub sent: PrunableFamily<ConnLabels, Counter>,
    pub received: PrunableFamily<ConnLabels, Counter>,
    /// Label sets dropped because their workloads left the config (`Pruner`).
    pub pruned: Counter,
    pub pool_connections: Gauge,
    pub pool_streams: Gauge,
    pub tls_handshakes: Family<DirectionLabel, Counter>,
    pub tls_errors: Family<DirectionLabel, Counter>,
    /// HBONE handshakes (TLS + HTTP/2) cut off at `handshake_timeout`.
    pub handshake_timeouts: Family<DirectionLabel, Counter>,
    /// Relayed TCP connections closed after `tcp_idle_timeout` without a byte.
    pub idle_timeouts: Family<KindLabel, Counter>,
    /// HTTP/1.1 connections closed because a request's headers took longer than
    /// `MESH_HTTP_HEADER_TIMEOUT_SECS` from their first byte.
    pub header_timeouts: Family<DirectionLabel, Counter>,
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
            opened: PrunableFamily::default(),
            closed: PrunableFamily::default(),
            sent: PrunableFamily::default(),
            received: PrunableFamily::default(),
            pruned: Counter::default(),
            pool_connections: Gauge::default(),
            pool_streams: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_errors: Family::default(),
            handshake_timeouts: Family::default(),
            idle_timeouts: Family::default(),
            header_timeouts: Family::default(),
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
        registry.register(
            "mesh_metric_label_sets_pruned",
            "Label sets of Istio's metrics dropped because their workloads left the config more than 5 minutes ago",
            m.pruned.clone(),
        );
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
            "mesh_http_header_timeouts",
            "HTTP/1.1 connections closed because a request's headers were not complete within MESH_HTTP_HEADER_TIMEOUT_SECS of their first byte, by direction",
            m.header_timeouts.clone(),
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

    /// Counts an L7 connection that ended at the request-header deadline.
    pub fn http_connection_ended(&self, direction: &'static str, error: &mesh_l7::body::BoxError) {
        if mesh_l7::server::header_timeout::is_header_timeout(&**error) {
            self.header_timeouts.get_or_create(&DirectionLabel { direction }).inc();
        }
    }

    pub fn handshake_timeout(&self, direction: &'static str) {
        self.handshake_timeouts.get_or_create(&DirectionLabel { direction }).inc();
    }

    pub fn handshake(&self, direction: &'static str, ok: bool) {
        let fam = if ok { &self.tls_handshakes } else { &self.tls_errors };
        fam.get_or_create(&DirectionLabel { direction }).inc();
    }
}

/// How long a workload may be gone from the config before its label sets go: a rolling update,
/// or a pod deleted with connections still draining, keeps its series meanwhile.
pub const PRUNE_AFTER: Duration = Duration::from_mins(5);
const SWEEP: Duration = Duration::from_mins(1);

/// Drops the label sets of Istio's TCP and request metrics that name a workload (source or
/// destination) gone from the config for [`PRUNE_AFTER`]: without it, every workload a node
/// ever talked to would stay in its metrics, and in its memory, for good.
#[derive(Default)]
pub struct Pruner {
    /// Workloads (namespace, name) named by some label set but absent from the config.
    missing_since: HashMap<(Arc<str>, Arc<str>), Instant>,
}

impl Pruner {
    /// One pass at `now`; returns how many label sets went.
    pub fn sweep(&mut self, metrics: &Metrics, state: &State, now: Instant) -> usize {
        let live: HashSet<(&str, &str)> = state.workloads.values().map(|w| (&*w.namespace, w.workload_name())).collect();
        let mut still_missing = HashSet::new();
        let missing_since = &mut self.missing_since;
        let mut keep = |p: &PeerLabels| {
            let mut keep = true;
            for (ns, name) in [(&p.source_workload_namespace, &p.source_workload), (&p.destination_workload_namespace, &p.destination_workload)] {
                if &**name == UNKNOWN || live.contains(&(&**ns, &**name)) {
                    continue;
                }
                let key = (ns.clone(), name.clone());
                let since = *missing_since.entry(key.clone()).or_insert(now);
                if now.duration_since(since) >= PRUNE_AFTER {
                    keep = false;
                } else {
                    still_missing.insert(key);
                }
            }
            keep
        };
        let mut removed = 0;
        for family in [&metrics.opened, &metrics.closed, &metrics.sent, &metrics.received] {
            removed += family.retain(|l| keep(&l.peers));
        }
        removed += metrics.requests.retain(&mut keep);
        // Forget workloads that came back, and those whose sets are all gone.
        missing_since.retain(|k, _| still_missing.contains(k));
        metrics.pruned.inc_by(removed as u64);
        removed
    }
}

/// Sweeps every minute until `stop`.
pub async fn run_pruner(metrics: Arc<Metrics>, state: StateRx, stop: impl Future<Output = ()>) {
    let mut pruner = Pruner::default();
    let mut tick = tokio::time::interval(SWEEP);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let state = state.borrow().clone();
                let removed = pruner.sweep(&metrics, &state, Instant::now());
                if removed > 0 {
                    tracing::debug!(removed, "dropped the metric label sets of workloads gone from the config");
                }
            }
            () = &mut stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Protocol, Snapshot};

    fn workload(name: &str, ip: &str) -> Workload {
        Workload {
            name: format!("{name}-pod").into(),
            namespace: "demo".into(),
            service_account: name.into(),
            workload_name: Some(name.into()),
            ip: ip.parse().expect("ip"),
            node: "n1".into(),
            node_ip: "198.18.0.1".parse().expect("ip"),
            labels: BTreeMap::new().into(),
            protocol: Protocol::Hbone,
            locality: None,
        }
    }

    fn state(workloads: Vec<Workload>) -> State {
        State::build("cluster.local", "mesh-system", Snapshot { workloads, ..Snapshot::default() }).expect("state")
    }

    fn series(m: &Metrics, src: &Workload, dst: Option<&Workload>) {
        let peer = |w| Peer { workload: w, identity: None };
        let labels = ConnLabels::new(Reporter::source, peer(Some(src)), peer(dst), SecurityPolicy::mutual_tls, "Kubernetes");
        m.opened.get_or_create(&labels).inc();
        m.sent.get_or_create(&labels).inc_by(10);
    }

    #[test]
    fn label_sets_of_workloads_gone_past_the_grace_period_are_dropped() {
        let m = Metrics::new(&mut Registry::default());
        let (client, server, gone) = (workload("client", "10.0.0.1"), workload("server", "10.0.0.2"), workload("gone", "10.0.0.3"));
        series(&m, &client, Some(&server));
        series(&m, &client, Some(&gone));
        series(&m, &gone, None);
        series(&m, &client, None);
        assert_eq!(m.opened.len(), 4);
        let now = state(vec![client.clone(), server.clone()]);
        let mut pruner = Pruner::default();
        let t0 = Instant::now();
        assert_eq!(pruner.sweep(&m, &now, t0), 0, "gone only now: kept through the grace period");
        assert_eq!(pruner.sweep(&m, &now, t0 + PRUNE_AFTER - Duration::from_secs(1)), 0);
        assert_eq!(pruner.sweep(&m, &now, t0 + PRUNE_AFTER), 4, "two sets naming it, in two families");
        assert_eq!(m.opened.len(), 2, "client to server, and client to an unknown peer, stay");
        assert_eq!(m.pruned.get(), 4);
        assert!(pruner.missing_since.is_empty(), "nothing left to remember");

        // A workload back before the grace period ends keeps its sets.
        series(&m, &client, Some(&gone));
        let t1 = t0 + PRUNE_AFTER * 2;
        assert_eq!(pruner.sweep(&m, &now, t1), 0);
        let back = state(vec![client, server, gone]);
        assert_eq!(pruner.sweep(&m, &back, t1 + PRUNE_AFTER), 0);
        assert!(pruner.missing_since.is_empty());
        assert_eq!(m.opened.len(), 3);
    }
}
