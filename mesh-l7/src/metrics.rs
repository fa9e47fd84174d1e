//! Istio's metric labels and its request metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`) with
//! Istio's histogram buckets, so existing dashboards and alerts work unchanged. The TCP metrics
//! of the node daemon share [`PeerLabels`].

pub mod prunable;

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};

pub use prunable::PrunableFamily;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are Istio's exact strings"
)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are Istio's exact strings"
)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Who talked to whom, in Istio's label names: everything but the per-request labels. Values
/// are shared strings: one set is built per peer pair and reused by every request between them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub connection_security_policy: SecurityPolicy,
}

/// Istio's value for anything not known.
pub const UNKNOWN: &str = "unknown";

/// One request's labels: the peers plus what the request itself decided.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// gRPC status code (`0` OK ...) for gRPC requests, else empty.
    pub grpc_response_status: Arc<str>,
    pub response_flags: &'static str,
}

/// Istio's `istio_request_duration_milliseconds` buckets.
pub const DURATION_MS_BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];
/// Istio's `istio_request_bytes`/`istio_response_bytes` buckets (1 B to 1 GB, ×10).
pub const BYTES_BUCKETS: [f64; 10] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100_000.0,
    1_000_000.0,
    10_000_000.0,
    100_000_000.0,
    1_000_000_000.0,
];

type HistogramFamily = PrunableFamily<RequestLabels, Histogram, fn() -> Histogram>;

pub struct RequestMetrics {
    pub requests: PrunableFamily<RequestLabels, Counter>,
    pub duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
}

/// The four metrics of one label set, resolved once and reused.
#[derive(Clone)]
pub struct Handles {
    pub requests: Counter,
    pub duration: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

impl RequestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: PrunableFamily::default(),
            duration: PrunableFamily::new_with_constructor(|| Histogram::new(DURATION_MS_BUCKETS)),
            request_bytes: PrunableFamily::new_with_constructor(|| Histogram::new(BYTES_BUCKETS)),
            response_bytes: PrunableFamily::new_with_constructor(|| Histogram::new(BYTES_BUCKETS)),
        };
        registry.register(
            "istio_requests",
            "Requests, by Istio's labels",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration until the last response byte",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        m
    }

    pub fn handles(&self, labels: &RequestLabels) -> Handles {
        Handles {
            requests: self.requests.get_or_create(labels),
            duration: self.duration.get_or_create(labels),
            request_bytes: self.request_bytes.get_or_create(labels),
            response_bytes: self.response_bytes.get_or_create(labels),
        }
    }

    /// Drops the label sets whose peers `keep` refuses (workloads gone); how many went.
    pub fn retain(&self, mut keep: impl FnMut(&PeerLabels) -> bool) -> usize {
        self.requests.retain(|l| keep(&l.peers))
            + self.duration.retain(|l| keep(&l.peers))
            + self.request_bytes.retain(|l| keep(&l.peers))
            + self.response_bytes.retain(|l| keep(&l.peers))
    }
}
