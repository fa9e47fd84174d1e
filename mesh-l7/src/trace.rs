//! Distributed tracing as Envoy does it for Istio: each proxy continues the caller's trace
//! ([`context`]: W3C `traceparent`, B3 single and multi), makes one span per request
//! ([`crate::layer::trace`]), tells the next hop about it in the same headers, and hands finished
//! spans to a [`SpanSink`] (the node's exporters; [`zipkin`] is the JSON they send to Zipkin).
//!
//! The source node reports a [`SpanKind::Client`] span, the destination node a
//! [`SpanKind::Server`] span whose parent is the client span, so one call shows as the two sides
//! of one hop, as with sidecars.

pub mod context;
pub mod span;
pub mod zipkin;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use span::{Span, SpanId, SpanKind, TagText, TraceId};

/// Where finished spans go. `submit` runs on the request path: it must never block or wait
/// (queue the span, or drop it and count the drop).
pub trait SpanSink: Send + Sync + 'static {
    fn submit(&self, span: Span);
}

/// Where a custom tag's value comes from (Istio's Telemetry `customTags`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagValue {
    Literal(String),
    /// A request header's value, else `default`, else no tag.
    Header {
        name: http::HeaderName,
        default: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomTag {
    pub name: String,
    pub value: TagValue,
}

/// The proxied workload, as its spans name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalInfo {
    pub node_id: Arc<str>,
    pub mesh_id: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub namespace: Arc<str>,
    /// `{canonical_service}.{namespace}`: Istio's service name for the workload's spans.
    pub service: Arc<str>,
    pub ip: Option<IpAddr>,
}

/// The trace headers a proxy writes for the next hop, besides the formats the request came with
/// (those are always written back, updated, so no stale context goes on): Envoy writes B3 for a
/// Zipkin provider and W3C `traceparent` for OpenTelemetry, and so does this mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Propagation {
    pub w3c: bool,
    pub b3: bool,
}

impl Propagation {
    pub const W3C: Self = Self {
        w3c: true,
        b3: false,
    };
    pub const B3: Self = Self {
        w3c: false,
        b3: true,
    };
}

/// What the node builds for each connection's stack (cheap: `Arc`s inside).
pub struct Tracer {
    /// Which headers carry the context on (see [`Propagation`]).
    pub propagation: Propagation,
    pub kind: SpanKind,
    /// 0.0..=100.0: Istio's `randomSamplingPercentage`, for requests whose caller did not decide.
    pub sampling_percent: f64,
    pub custom_tags: Arc<[CustomTag]>,
    pub local: Arc<LocalInfo>,
    /// The peer that sent us the request (`peer.address`).
    pub downstream: SocketAddr,
    /// The Service port (client spans) or the pod port (server spans), for `upstream_cluster`.
    pub port: u16,
    pub sink: Arc<dyn SpanSink>,
}

impl Tracer {
    /// This proxy's own sampling decision.
    pub fn sample(&self) -> bool {
        let p = self.sampling_percent;
        p >= 100.0 || (p > 0.0 && fastrand::f64() * 100.0 < p)
    }
}
