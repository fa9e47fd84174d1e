//! The route model: what the controller compiled from `HTTPRoute`, `GRPCRoute` and
//! `VirtualService` for one Service, as the node runs it. Built once per config (regexes
//! compiled there), shared read-only by every request.
//!
//! A table is evaluated first-match: the controller already ordered the routes by their API's
//! precedence. Matching is in [`matching`], the request changes a route makes in [`filter`].

pub mod filter;
pub mod matching;

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use serde::Serialize;

use crate::policy::{RateLimit, TrafficPolicy};

/// The routes of one Service (its parent). A Service with no routes has no table: its HTTP ports
/// get [`RouteTable::default_for`].
#[derive(Clone, Debug, Serialize)]
pub struct RouteTable {
    pub namespace: String,
    pub name: String,
    /// Producer routes: for every client.
    pub routes: Vec<Route>,
    /// Consumer routes by client namespace: they replace `routes` for those clients (GAMMA).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub consumers: BTreeMap<String, Vec<Route>>,
    /// The DestinationRule's `trafficPolicy`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "shared::option"
    )]
    pub traffic_policy: Option<Arc<TrafficPolicy>>,
    /// Subsets with a policy of their own (already laid over `traffic_policy`).
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "shared::map"
    )]
    pub subset_policies: BTreeMap<String, Arc<TrafficPolicy>>,
    /// A `LocalRateLimit` on the Service's pods (enforced by their nodes).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "shared::option"
    )]
    pub rate_limit: Option<Arc<RateLimit>>,
}

impl RouteTable {
    /// The implicit table of a Service without routes: every request to the Service itself.
    pub fn default_for(namespace: &str, name: &str) -> Self {
        let route = Route {
            source: RouteSource {
                kind: SourceKind::Default,
                namespace: namespace.into(),
                name: name.into(),
                rule: 0,
                rule_name: None,
            },
            matches: Vec::new(),
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
            rewrite: None,
            action: Action::Forward(vec![Backend::service(namespace, name)]),
            mirrors: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
            fault: None,
        };
        Self {
            namespace: namespace.into(),
            name: name.into(),
            routes: vec![route],
            consumers: BTreeMap::new(),
            traffic_policy: None,
            subset_policies: BTreeMap::new(),
            rate_limit: None,
        }
    }

    /// The policy for requests to `subset` (or the Service as a whole).
    pub fn policy(&self, subset: Option<&str>) -> Option<&Arc<TrafficPolicy>> {
        subset
            .and_then(|s| self.subset_policies.get(s))
            .or(self.traffic_policy.as_ref())
    }

    /// Whether this is [`RouteTable::default_for`]'s table (no route resource attaches).
    pub fn is_implicit(&self) -> bool {
        self.consumers.is_empty()
            && self.traffic_policy.is_none()
            && self.subset_policies.is_empty()
            && self.rate_limit.is_none()
            && self.routes.len() == 1
            && self.routes[0].source.kind == SourceKind::Default
    }

    /// The routes a client in `client_namespace` sees.
    pub fn routes_for(&self, client_namespace: Option<&str>) -> &[Route] {
        client_namespace
            .and_then(|ns| self.consumers.get(ns))
            .map_or(&self.routes, Vec::as_slice)
    }
}

/// The route a request took, in the request's and the response's extensions: which table (as
/// it was when the request arrived), which list and position, and how its path matched.
#[derive(Clone, Debug)]
pub struct Selected {
    pub table: Arc<RouteTable>,
    /// The consumer namespace whose routes were used, if any.
    pub consumer: Option<String>,
    pub index: usize,
    pub prefix: Option<matching::PrefixMatch>,
}

impl Selected {
    pub fn route(&self) -> &Route {
        let list = match &self.consumer {
            Some(ns) => self
                .table
                .consumers
                .get(ns)
                .map_or(&self.table.routes, |r| r),
            None => &self.table.routes,
        };
        &list[self.index]
    }

    /// Finds the route for a request in `table` (first match), for a client in `namespace`.
    pub fn find(table: &Arc<RouteTable>, req: &matching::RequestView<'_>) -> Option<Self> {
        let consumer = req
            .client
            .namespace
            .filter(|ns| table.consumers.contains_key(*ns));
        let routes = table.routes_for(consumer);
        let m = matching::find(routes, req)?;
        Some(Self {
            table: table.clone(),
            consumer: consumer.map(str::to_owned),
            index: m.index,
            prefix: m.prefix,
        })
    }
}

/// The API a route came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SourceKind {
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    VirtualService,
    /// The implicit route of a Service without routes.
    Default,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
            Self::VirtualService => "VirtualService",
            Self::Default => "default",
        }
    }
}

/// Where a route came from: the config dump and the access log name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteSource {
    pub kind: SourceKind,
    pub namespace: String,
    pub name: String,
    /// Index of the rule in the resource (`rules[i]`, `http[i]`).
    pub rule: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_name: Option<String>,
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SourceKind::Default => write!(f, "default/{}/{}", self.namespace, self.name),
            kind => write!(
                f,
                "{}/{}/{}#{}",
                kind.as_str(),
                self.namespace,
                self.name,
                self.rule
            ),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Route {
    pub source: RouteSource,
    /// Alternatives; empty matches every request.
    pub matches: Vec<matching::RouteMatch>,
    #[serde(skip_serializing_if = "HeaderModifier::is_empty")]
    pub request_headers: HeaderModifier,
    #[serde(skip_serializing_if = "HeaderModifier::is_empty")]
    pub response_headers: HeaderModifier,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<UrlRewrite>,
    pub action: Action,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    pub timeouts: Timeouts,
    /// Retries of failed attempts ([`crate::layer::retry`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Delays and aborts injected before the request goes upstream ([`crate::layer::fault`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultInjection>,
}

/// What a matched route does with the request.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// Forward to one of these (weighted).
    Forward(Vec<Backend>),
    /// Answer with a redirect.
    Redirect(RequestRedirect),
    /// Answer directly (e.g. a rule whose backends did not resolve: 500).
    Respond { status: u16, body: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// The whole request, retries included.
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub request: Option<Duration>,
    /// One attempt to a backend.
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub backend_request: Option<Duration>,
}

/// Serializing `Arc`s without serde's `rc` feature (which would rebuild every crate using serde).
mod shared {
    use std::{collections::BTreeMap, sync::Arc};

    use serde::{Serialize, Serializer};

    #[expect(
        clippy::ref_option,
        reason = "serde's `with` passes a reference to the field"
    )]
    pub fn option<T: Serialize, S: Serializer>(
        v: &Option<Arc<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.as_deref().serialize(s)
    }

    pub fn map<T: Serialize, S: Serializer>(
        v: &BTreeMap<String, Arc<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(v.iter().map(|(k, v)| (k, &**v)))
    }
}

pub(crate) mod ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

pub(crate) mod opt_ms {
    use std::time::Duration;

    #[expect(
        clippy::ref_option,
        reason = "serde's `with` passes a reference to the field"
    )]
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }
}

/// A Service (and optionally a subset and port of it) that requests are sent to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// Port on the Service; `None`: the port the request arrived on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub weight: u32,
    #[serde(skip_serializing_if = "HeaderModifier::is_empty")]
    pub request_headers: HeaderModifier,
    #[serde(skip_serializing_if = "HeaderModifier::is_empty")]
    pub response_headers: HeaderModifier,
}

impl Backend {
    pub fn service(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port: None,
            subset: None,
            weight: 1,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub backend: Backend,
    /// Share of requests mirrored, in millionths.
    pub per_million: u32,
}

/// Header changes: set (replace), add (append), remove; applied in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "headers")]
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "headers")]
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "names")]
    pub remove: Vec<http::HeaderName>,
}

fn headers<S: serde::Serializer>(
    h: &[(http::HeaderName, http::HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        h.iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes()))),
    )
}

fn names<S: serde::Serializer>(h: &[http::HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(http::HeaderName::as_str))
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// How a rewrite or redirect changes the path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathModifier {
    /// Replace the whole path.
    Full(String),
    /// Replace the prefix the route's path match matched (the whole path after a non-prefix match).
    Prefix(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UrlRewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRedirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub per_try_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub backoff: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultInjection {
    pub delay_per_million: u32,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_ms")]
    pub delay: Option<Duration>,
    pub abort_per_million: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_grpc_status: Option<String>,
}
