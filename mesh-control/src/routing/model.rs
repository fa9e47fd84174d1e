//! The route model of the controller: what validation makes of the four routing kinds, and the
//! per-Service route tables compilation makes of that. It mirrors `RouteTable` of
//! `mesh/config/v1/config.proto` (the contract with the nodes, whose comments define the
//! semantics) in domain types; `view` turns it into the proto.

use std::{collections::BTreeMap, time::Duration};

use crate::model::{Labels, NamespacedName};

/// The routes of one Service, in evaluation order (first match wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub service: NamespacedName,
    /// Producer routes: for every client.
    pub routes: Vec<Route>,
    /// Consumer routes by client namespace: they replace `routes` for those clients.
    pub consumers: BTreeMap<String, Vec<Route>>,
    /// The DestinationRule's `trafficPolicy`: how the clients' nodes treat the endpoints.
    pub traffic_policy: Option<TrafficPolicy>,
    /// Subsets with a `trafficPolicy` of their own, already laid over the Service's.
    pub subset_policies: BTreeMap<String, TrafficPolicy>,
    /// A `LocalRateLimit` on the Service's pods, enforced by their nodes.
    pub rate_limit: Option<RateLimit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    HttpRoute,
    GrpcRoute,
    VirtualService,
}

impl SourceKind {
    /// The Kubernetes kind (the proto's `RouteSource.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
            Self::VirtualService => "VirtualService",
        }
    }
}

/// Where a route came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub kind: SourceKind,
    pub key: NamespacedName,
    /// `rules[i]` / `http[i]`.
    pub rule: u32,
    pub rule_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub source: Source,
    /// Alternatives; empty: every request.
    pub matches: Vec<Match>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub rewrite: Option<UrlRewrite>,
    pub action: Action,
    pub mirrors: Vec<Mirror>,
    pub timeouts: Timeouts,
    /// Executed by the source node (`mesh_l7::layer::retry`).
    pub retry: Option<Retry>,
    /// Executed by the source node (`mesh_l7::layer::fault`).
    pub fault: Option<Fault>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Forward(Vec<Backend>),
    Redirect(Redirect),
    Respond { status: u16, body: String },
}

impl Action {
    /// What Gateway API asks for when no backend can be used.
    pub fn internal_error() -> Self {
        Self::Respond {
            status: 500,
            body: String::new(),
        }
    }
}

/// Every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    pub path: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryMatch>,
    /// Service port the request arrived on.
    pub port: Option<u16>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    /// Plain string prefix (VirtualService `prefix`).
    Prefix(String),
    /// Gateway API `PathPrefix`: whole path segments.
    PathPrefix(String),
    /// RE2 syntax; the node anchors it (`^(?:...)$`).
    Regex(String),
    /// Headers and query parameters: present, any value.
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub value: StringMatch,
    /// VirtualService `withoutHeaders`.
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryMatch {
    pub name: String,
    pub value: StringMatch,
}

/// Set (replace), add (append), remove, in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    /// Replace the whole path.
    Full(String),
    /// Replace what the matching prefix matched (the whole path after another kind of match).
    Prefix(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// A Service (all its endpoints, or one subset) and port on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub service: NamespacedName,
    /// `None`: the port the request arrived on.
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: u32,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
}

impl Backend {
    /// All endpoints of a Service, without header changes.
    pub fn plain(service: NamespacedName, port: Option<u16>, weight: u32) -> Self {
        Self {
            service,
            port,
            subset: None,
            weight,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: Backend,
    /// Share of requests mirrored, in millionths.
    pub per_million: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries included; `None`: none.
    pub request: Option<Duration>,
    /// One attempt to a backend.
    pub backend_request: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Istio `retryOn` conditions.
    pub retry_on: Vec<String>,
    pub codes: Vec<u16>,
    pub backoff: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(u32, Duration)>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    pub per_million: u32,
    pub http_status: Option<u16>,
    pub grpc_status: Option<String>,
}

/// A DestinationRule's `trafficPolicy`, validated. Executed by the source node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    /// `loadBalancer.localityLbSetting.enabled: false`: no locality preference even with
    /// outlier detection.
    pub locality_lb_disabled: bool,
}

impl TrafficPolicy {
    /// A subset's policy over the Service's: Istio replaces each of the three settings whole.
    #[must_use]
    pub fn overlaid_by(&self, subset: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: subset.load_balancer.clone().or_else(|| self.load_balancer.clone()),
            connection_pool: subset.connection_pool.clone().or_else(|| self.connection_pool.clone()),
            outlier_detection: subset.outlier_detection.clone().or_else(|| self.outlier_detection.clone()),
            locality_lb_disabled: if subset.load_balancer.is_some() { subset.locality_lb_disabled } else { self.locality_lb_disabled },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
    /// Maglev over the key's hash, with a table of `table_size` (prime) entries.
    ConsistentHash { key: HashKey, table_size: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    /// With a TTL the node sets the cookie when the request has none.
    Cookie { name: String, path: Option<String>, ttl: Option<Duration> },
    SourceIp,
    QueryParameter(String),
}

/// Limits per Service (or subset) on each client node; `None`: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
}

/// Envoy's outlier detection as Istio configures it; a count of 0 disables that trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

/// A token bucket per destination pod (or per pod and key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    pub key: RateLimitKey,
    pub max_keys: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateLimitKey {
    /// One bucket per pod.
    None,
    SourcePrincipal,
    /// Lower case.
    RequestHeader(String),
}
