//! A Service's traffic policy (a DestinationRule's `trafficPolicy`) as the source node runs it:
//! how an endpoint is picked, how many requests and connections may be in flight to the Service
//! (circuit breaking, [`crate::circuit`]), and when an endpoint that keeps failing is ejected
//! ([`crate::outlier`]). The controller filled in Istio's defaults; `None` limits mean none.

use std::time::Duration;

use serde::Serialize;

use crate::route::opt_ms;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// `None`: the mesh's default (least request for HTTP, weighted random for connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(skip_serializing_if = "ConnectionPool::is_unlimited")]
    pub connection_pool: ConnectionPool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Prefer endpoints in the client's zone, then region (Istio: on with outlier detection
    /// unless `localityLbSetting.enabled: false`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub locality_failover: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    RoundRobin,
    /// Power of two choices over outstanding requests × peak-EWMA latency.
    LeastRequest,
    Random,
    /// Maglev over the hash of `key`, `table_size` (prime) entries.
    ConsistentHash {
        key: HashKey,
        table_size: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// Lower case.
    Header(String),
    Cookie {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Set on a response to a request that had no such cookie.
        #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// Circuit-breaking limits per Service (or subset) on this node; `None`: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub connect_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

impl ConnectionPool {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Envoy's consecutive-error outlier detection; a count of 0 disables that trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    #[serde(with = "crate::route::ms")]
    pub interval: Duration,
    #[serde(with = "crate::route::ms")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

/// A `LocalRateLimit`: a token bucket per destination pod (or per pod and key), Envoy's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(with = "crate::route::ms")]
    pub fill_interval: Duration,
    pub key: RateLimitKey,
    pub max_keys: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitKey {
    None,
    SourcePrincipal,
    /// Lower case.
    RequestHeader(String),
}
