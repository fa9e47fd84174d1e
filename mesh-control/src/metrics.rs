//! Prometheus metrics of the controller (prefix `mesh_control_`), served on `/metrics` of the
//! status endpoint. Label values are fixed strings, never `Debug` output.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::validate::Verdict;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    /// "full" or "incremental".
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The node's name (a bounded set: the mesh's nodes).
    pub node: String,
}

#[derive(Default)]
pub struct Metrics {
    pub connected_nodes: Gauge,
    pub config_version: Gauge,
    pub pushes: Family<PushLabels, Counter>,
    pub acks: Counter,
    pub nacks: Counter,
    pub policies_rejected: Family<RejectedLabels, Gauge>,
    pub routes_rejected: Family<RejectedLabels, Gauge>,
    pub file_errors: Gauge,
    pub certificates_issued: Counter,
    pub node_certificates_issued: Counter,
    pub certificate_refusals: Family<ReasonLabels, Counter>,
    /// 1 while this replica holds the leader Lease (set at each scrape from `election`).
    pub leader: Gauge,
    pub status_writes: Counter,
    /// Scrapes of a node's metrics for the service graph that failed (`graph`).
    pub graph_scrape_failures: Family<NodeLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("mesh_control");
        r.register("connected_nodes", "Node daemons with an open config stream", m.connected_nodes.clone());
        r.register("config_version", "Version of the published config", m.config_version.clone());
        r.register("config_pushes", "Config updates sent to nodes", m.pushes.clone());
        r.register("config_acks", "Config updates nodes acknowledged", m.acks.clone());
        r.register("config_nacks", "Config updates nodes rejected", m.nacks.clone());
        r.register("policies_rejected", "Policy objects currently rejected by validation", m.policies_rejected.clone());
        r.register(
            "routes_rejected",
            "Routing objects (HTTPRoute, GRPCRoute, VirtualService, DestinationRule) currently not accepted (on some parent), by the first reason",
            m.routes_rejected.clone(),
        );
        r.register("config_file_errors", "Config-folder files or documents that could not be read (file mode)", m.file_errors.clone());
        r.register("certificates_issued", "Workload certificates signed", m.certificates_issued.clone());
        r.register("node_certificates_issued", "Node certificates signed (first start and renewals)", m.node_certificates_issued.clone());
        r.register("certificate_refusals", "Certificate requests refused", m.certificate_refusals.clone());
        r.register("leader", "1 while this replica is the leader (writes status, creates the CA Secret), else 0", m.leader.clone());
        r.register("status_writes", "Status subresource writes this replica made (only the leader writes)", m.status_writes.clone());
        r.register("graph_scrape_failures", "Scrapes of a node daemon's metrics for the service graph that failed", m.graph_scrape_failures.clone());
        m
    }

    /// Sets the rejected-route gauges from the current routing verdicts.
    pub fn set_route_verdicts(&self, verdicts: &[crate::routing::Verdict]) {
        self.routes_rejected.clear();
        for v in verdicts {
            if let Some(reason) = v.rejection() {
                self.routes_rejected.get_or_create(&RejectedLabels { kind: v.kind.as_str(), reason }).inc();
            }
        }
    }

    /// Sets the rejected-policy gauges from the current verdicts.
    pub fn set_verdicts(&self, verdicts: &[Verdict]) {
        self.policies_rejected.clear();
        for v in verdicts {
            if let Err(e) = &v.result {
                self.policies_rejected.get_or_create(&RejectedLabels { kind: v.kind.as_str(), reason: e.reason() }).inc();
            }
        }
    }
}

/// Text exposition of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}
