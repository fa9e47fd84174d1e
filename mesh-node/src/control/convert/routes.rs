//! `RouteTable` resources → [`mesh_l7::route::RouteTable`]: regexes compiled and header names
//! checked once here, so a request never meets an invalid route. The controller validated
//! everything already; an error here means a controller bug or version skew, and the whole
//! update is refused (NACK) rather than half applied.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue};
use mesh_l7::policy::{ConnectionPool, HashKey, LoadBalancer, OutlierDetection, RateLimit, RateLimitKey, TrafficPolicy};
use mesh_l7::route::{
    Action, Backend, FaultInjection, HeaderModifier, Mirror, PathModifier, RequestRedirect, RetryPolicy, Route, RouteSource, RouteTable,
    SourceKind, Timeouts, UrlRewrite,
    matching::{HeaderMatch, QueryMatch, RouteMatch, StringMatch},
};
use mesh_proto::config::v1 as pb;

use super::{Error, invalid};

pub fn route_table(t: &pb::RouteTable) -> Result<RouteTable, Error> {
    let what = format!("RouteTable {}/{}", t.namespace, t.name);
    let routes = |rs: &[pb::HttpRoute]| rs.iter().map(|r| route(r, &what)).collect::<Result<Vec<_>, Error>>();
    let mut consumers = BTreeMap::new();
    for c in &t.consumers {
        consumers.insert(c.namespace.clone(), routes(&c.routes)?);
    }
    let policy = t.traffic_policy.as_ref().map(|p| traffic_policy(p, &what)).transpose()?.map(Arc::new);
    let mut subset_policies = BTreeMap::new();
    for (subset, p) in &t.subset_policies {
        subset_policies.insert(subset.clone(), Arc::new(traffic_policy(p, &format!("{what}: subset {subset}"))?));
    }
    let rate_limit = t.local_rate_limit.as_ref().map(|l| rate_limit(l, &what)).transpose()?.map(Arc::new);
    Ok(RouteTable { namespace: t.namespace.clone(), name: t.name.clone(), routes: routes(&t.routes)?, consumers, traffic_policy: policy, subset_policies, rate_limit })
}

fn rate_limit(l: &pb::LocalRateLimit, what: &str) -> Result<RateLimit, Error> {
    if l.max_tokens == 0 || l.tokens_per_fill == 0 || l.fill_interval_ms == 0 || l.max_keys == 0 {
        return Err(invalid(format!("{what}: local rate limit with a zero bucket, fill, interval or key count")));
    }
    let key = match &l.key {
        None => RateLimitKey::None,
        Some(pb::local_rate_limit::Key::SourcePrincipal(_)) => RateLimitKey::SourcePrincipal,
        Some(pb::local_rate_limit::Key::RequestHeader(h)) => RateLimitKey::RequestHeader(header_name(h, what)?.as_str().to_owned()),
    };
    Ok(RateLimit { max_tokens: l.max_tokens, tokens_per_fill: l.tokens_per_fill, fill_interval: Duration::from_millis(l.fill_interval_ms), key, max_keys: l.max_keys })
}

fn traffic_policy(p: &pb::TrafficPolicy, what: &str) -> Result<TrafficPolicy, Error> {
    let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    let limit = |v: u32| (v > 0).then_some(v);
    let load_balancer = match &p.load_balancer {
        None => None,
        Some(lb) => match pb::LbAlgorithm::try_from(lb.algorithm) {
            Ok(pb::LbAlgorithm::Unspecified) => None,
            Ok(pb::LbAlgorithm::RoundRobin) => Some(LoadBalancer::RoundRobin),
            Ok(pb::LbAlgorithm::LeastRequest) => Some(LoadBalancer::LeastRequest),
            Ok(pb::LbAlgorithm::Random) => Some(LoadBalancer::Random),
            Ok(pb::LbAlgorithm::ConsistentHash) => {
                use pb::load_balancer::HashKey as Key;
                let key = match &lb.hash_key {
                    Some(Key::Header(h)) => HashKey::Header(header_name(h, what)?.as_str().to_owned()),
                    Some(Key::Cookie(c)) => HashKey::Cookie { name: c.name.clone(), path: (!c.path.is_empty()).then(|| c.path.clone()), ttl: ms(c.ttl_ms) },
                    Some(Key::SourceIp(_)) => HashKey::SourceIp,
                    Some(Key::QueryParameter(q)) => HashKey::QueryParameter(q.clone()),
                    None => return Err(invalid(format!("{what}: consistent hash without a key"))),
                };
                if lb.table_size == 0 {
                    return Err(invalid(format!("{what}: consistent hash with a table of 0 entries")));
                }
                Some(LoadBalancer::ConsistentHash { key, table_size: lb.table_size })
            }
            Err(_) => return Err(invalid(format!("{what}: unknown load-balancing algorithm {}", lb.algorithm))),
        },
    };
    let connection_pool = p.connection_pool.as_ref().map_or_else(ConnectionPool::default, |c| ConnectionPool {
        max_connections: limit(c.max_connections),
        connect_timeout: ms(c.connect_timeout_ms),
        idle_timeout: ms(c.idle_timeout_ms),
        http1_max_pending_requests: limit(c.http1_max_pending_requests),
        http2_max_requests: limit(c.http2_max_requests),
        max_requests_per_connection: limit(c.max_requests_per_connection),
        max_retries: limit(c.max_retries),
    });
    let outlier_detection = match &p.outlier_detection {
        None => None,
        Some(o) if o.interval_ms == 0 || o.base_ejection_time_ms == 0 || o.max_ejection_percent > 100 || o.min_health_percent > 100 => {
            return Err(invalid(format!("{what}: outlier detection with a zero interval or ejection time, or a share above 100 %")));
        }
        Some(o) => Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway,
            interval: Duration::from_millis(o.interval_ms),
            base_ejection_time: Duration::from_millis(o.base_ejection_time_ms),
            max_ejection_percent: o.max_ejection_percent,
            min_health_percent: o.min_health_percent,
        }),
    };
    let locality_failover = outlier_detection.is_some() && !p.locality_lb_disabled;
    Ok(TrafficPolicy { load_balancer, connection_pool, outlier_detection, locality_failover })
}

fn route(r: &pb::HttpRoute, what: &str) -> Result<Route, Error> {
    let s = r.source.clone().unwrap_or_default();
    let kind = match s.kind.as_str() {
        "HTTPRoute" => SourceKind::HttpRoute,
        "GRPCRoute" => SourceKind::GrpcRoute,
        "VirtualService" => SourceKind::VirtualService,
        // The controller's implicit route (e.g. for clients without consumer routes).
        "default" => SourceKind::Default,
        other => return Err(invalid(format!("{what}: unknown route source kind {other:?}"))),
    };
    let source = RouteSource { kind, namespace: s.namespace, name: s.name, rule: s.rule, rule_name: (!s.rule_name.is_empty()).then_some(s.rule_name) };
    let what = &format!("{what}: route {source}");
    let action = if let Some(d) = &r.direct_response {
        Action::Respond { status: status(d.status, what)?, body: d.body.clone() }
    } else if let Some(rd) = &r.redirect {
        Action::Redirect(RequestRedirect {
            scheme: non_empty(&rd.scheme),
            hostname: non_empty(&rd.hostname),
            path: rd.path.as_ref().map(|p| path_modifier(p, what)).transpose()?,
            port: if rd.port == 0 { None } else { Some(port(rd.port, what)?) },
            status: if rd.status_code == 0 { 302 } else { status(rd.status_code, what)? },
        })
    } else {
        Action::Forward(r.backends.iter().map(|b| backend(b, what)).collect::<Result<_, _>>()?)
    };
    Ok(Route {
        source,
        matches: r.matches.iter().map(|m| route_match(m, what)).collect::<Result<_, _>>()?,
        request_headers: modifier(r.request_headers.as_ref(), what)?,
        response_headers: modifier(r.response_headers.as_ref(), what)?,
        rewrite: r
            .rewrite
            .as_ref()
            .map(|rw| -> Result<_, Error> {
                Ok(UrlRewrite { hostname: non_empty(&rw.hostname), path: rw.path.as_ref().map(|p| path_modifier(p, what)).transpose()? })
            })
            .transpose()?,
        action,
        mirrors: r
            .mirrors
            .iter()
            .map(|m| {
                let b = m.backend.as_ref().ok_or_else(|| invalid(format!("{what}: mirror without a backend")))?;
                Ok(Mirror { backend: backend(b, what)?, per_million: m.per_million.min(1_000_000) })
            })
            .collect::<Result<_, Error>>()?,
        timeouts: Timeouts { request: ms(r.request_timeout_ms), backend_request: ms(r.backend_request_timeout_ms) },
        retry: r.retry.as_ref().map(|p| RetryPolicy {
            attempts: p.attempts,
            per_try_timeout: ms(p.per_try_timeout_ms),
            retry_on: p.retry_on.clone(),
            codes: p.codes.iter().filter_map(|c| u16::try_from(*c).ok()).collect(),
            backoff: ms(p.backoff_ms),
        }),
        fault: r.fault.as_ref().map(|f| FaultInjection {
            delay_per_million: f.delay_per_million,
            delay: ms(f.delay_ms),
            abort_per_million: f.abort_per_million,
            abort_http_status: u16::try_from(f.abort_http_status).ok().filter(|s| *s != 0),
            abort_grpc_status: non_empty(&f.abort_grpc_status),
        }),
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn ms(v: u64) -> Option<Duration> {
    (v != 0).then(|| Duration::from_millis(v))
}

fn port(p: u32, what: &str) -> Result<u16, Error> {
    u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| invalid(format!("{what}: port {p} out of range")))
}

fn status(s: u32, what: &str) -> Result<u16, Error> {
    u16::try_from(s).ok().filter(|s| (100..600).contains(s)).ok_or_else(|| invalid(format!("{what}: status {s} is not an HTTP status")))
}

fn string_match(m: &pb::StringMatch, what: &str) -> Result<StringMatch, Error> {
    Ok(match pb::MatchKind::try_from(m.kind) {
        Ok(pb::MatchKind::Exact) => StringMatch::Exact(m.value.clone()),
        Ok(pb::MatchKind::Prefix) => StringMatch::Prefix(m.value.clone()),
        Ok(pb::MatchKind::PathPrefix) => StringMatch::path_prefix(&m.value),
        Ok(pb::MatchKind::Regex) => StringMatch::regex(&m.value).map_err(|e| invalid(format!("{what}: regex {:?}: {e}", m.value)))?,
        Ok(pb::MatchKind::Present) => StringMatch::Present,
        _ => return Err(invalid(format!("{what}: unknown match kind {}", m.kind))),
    })
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, Error> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| invalid(format!("{what}: {name:?} is not a header name")))
}

fn route_match(m: &pb::RouteMatch, what: &str) -> Result<RouteMatch, Error> {
    Ok(RouteMatch {
        path: m.path.as_ref().map(|p| string_match(p, what)).transpose()?,
        method: m.method.as_ref().map(|p| string_match(p, what)).transpose()?,
        headers: m
            .headers
            .iter()
            .map(|h| {
                let value = h.value.as_ref().map_or(Ok(StringMatch::Present), |v| string_match(v, what))?;
                Ok(HeaderMatch { name: header_name(&h.name, what)?, value, invert: h.invert })
            })
            .collect::<Result<_, Error>>()?,
        query_params: m
            .query_params
            .iter()
            .map(|q| {
                let value = q.value.as_ref().map_or(Ok(StringMatch::Present), |v| string_match(v, what))?;
                Ok(QueryMatch { name: q.name.clone(), value })
            })
            .collect::<Result<_, Error>>()?,
        port: if m.port == 0 { None } else { Some(port(m.port, what)?) },
        source_labels: m.source_labels.clone().into_iter().collect(),
        source_namespace: non_empty(&m.source_namespace),
    })
}

fn modifier(m: Option<&pb::HeaderModifier>, what: &str) -> Result<HeaderModifier, Error> {
    let Some(m) = m else { return Ok(HeaderModifier::default()) };
    let pairs = |hs: &[pb::Header]| {
        hs.iter()
            .map(|h| {
                let v = HeaderValue::from_str(&h.value).map_err(|_| invalid(format!("{what}: header {} value {:?} is not valid", h.name, h.value)))?;
                Ok((header_name(&h.name, what)?, v))
            })
            .collect::<Result<Vec<_>, Error>>()
    };
    Ok(HeaderModifier {
        set: pairs(&m.set)?,
        add: pairs(&m.add)?,
        remove: m.remove.iter().map(|n| header_name(n, what)).collect::<Result<_, _>>()?,
    })
}

fn path_modifier(p: &pb::PathModifier, what: &str) -> Result<PathModifier, Error> {
    match pb::PathModifierKind::try_from(p.kind) {
        Ok(pb::PathModifierKind::Full) => Ok(PathModifier::Full(p.value.clone())),
        Ok(pb::PathModifierKind::Prefix) => Ok(PathModifier::Prefix(p.value.clone())),
        _ => Err(invalid(format!("{what}: unknown path modifier kind {}", p.kind))),
    }
}

fn backend(b: &pb::Backend, what: &str) -> Result<Backend, Error> {
    Ok(Backend {
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        port: if b.port == 0 { None } else { Some(port(b.port, what)?) },
        subset: non_empty(&b.subset),
        weight: b.weight,
        request_headers: modifier(b.request_headers.as_ref(), what)?,
        response_headers: modifier(b.response_headers.as_ref(), what)?,
    })
}
