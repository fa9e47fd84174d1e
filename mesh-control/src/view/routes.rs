//! Route tables → `mesh.config.v1.RouteTable`: a field-by-field translation of
//! [`crate::routing::model`], which already has the proto's meaning.

use std::time::Duration;

use mesh_proto::config::v1 as pb;

use crate::routing::model::{
    Action, Backend, ConnectionPool, HashKey, HeaderModifier, LoadBalancer, Match,
    OutlierDetection, PathModifier, RateLimitKey, Route, RouteTable, StringMatch, TrafficPolicy,
};

pub fn route_table(t: &RouteTable) -> pb::RouteTable {
    pb::RouteTable {
        namespace: t.service.namespace.clone(),
        name: t.service.name.clone(),
        routes: t.routes.iter().map(route).collect(),
        consumers: t
            .consumers
            .iter()
            .map(|(ns, rs)| pb::ConsumerRoutes {
                namespace: ns.clone(),
                routes: rs.iter().map(route).collect(),
            })
            .collect(),
        traffic_policy: t.traffic_policy.as_ref().map(traffic_policy),
        subset_policies: t
            .subset_policies
            .iter()
            .map(|(name, p)| (name.clone(), traffic_policy(p)))
            .collect(),
        local_rate_limit: t.rate_limit.as_ref().map(|l| pb::LocalRateLimit {
            max_tokens: l.max_tokens,
            tokens_per_fill: l.tokens_per_fill,
            fill_interval_ms: ms(Some(l.fill_interval)),
            key: match &l.key {
                RateLimitKey::None => None,
                RateLimitKey::SourcePrincipal => Some(pb::local_rate_limit::Key::SourcePrincipal(true)),
                RateLimitKey::RequestHeader(h) => Some(pb::local_rate_limit::Key::RequestHeader(h.clone())),
            },
            max_keys: l.max_keys,
        }),
    }
}

fn traffic_policy(p: &TrafficPolicy) -> pb::TrafficPolicy {
    pb::TrafficPolicy {
        load_balancer: p.load_balancer.as_ref().map(load_balancer),
        connection_pool: p.connection_pool.as_ref().map(connection_pool),
        outlier_detection: p.outlier_detection.as_ref().map(outlier_detection),
        locality_lb_disabled: p.locality_lb_disabled,
    }
}

fn load_balancer(lb: &LoadBalancer) -> pb::LoadBalancer {
    use pb::load_balancer::HashKey as Key;
    let (algorithm, hash_key, table_size) = match lb {
        LoadBalancer::RoundRobin => (pb::LbAlgorithm::RoundRobin, None, 0),
        LoadBalancer::LeastRequest => (pb::LbAlgorithm::LeastRequest, None, 0),
        LoadBalancer::Random => (pb::LbAlgorithm::Random, None, 0),
        LoadBalancer::ConsistentHash { key, table_size } => {
            let key = match key {
                HashKey::Header(h) => Key::Header(h.clone()),
                HashKey::Cookie { name, path, ttl } => Key::Cookie(pb::HashCookie {
                    name: name.clone(),
                    path: path.clone().unwrap_or_default(),
                    ttl_ms: ms(*ttl),
                }),
                HashKey::SourceIp => Key::SourceIp(true),
                HashKey::QueryParameter(q) => Key::QueryParameter(q.clone()),
            };
            (pb::LbAlgorithm::ConsistentHash, Some(key), *table_size)
        }
    };
    pb::LoadBalancer {
        algorithm: algorithm.into(),
        hash_key,
        table_size,
    }
}

fn connection_pool(c: &ConnectionPool) -> pb::ConnectionPool {
    pb::ConnectionPool {
        max_connections: c.max_connections.unwrap_or(0),
        connect_timeout_ms: ms(c.connect_timeout),
        idle_timeout_ms: ms(c.idle_timeout),
        http1_max_pending_requests: c.http1_max_pending_requests.unwrap_or(0),
        http2_max_requests: c.http2_max_requests.unwrap_or(0),
        max_requests_per_connection: c.max_requests_per_connection.unwrap_or(0),
        max_retries: c.max_retries.unwrap_or(0),
    }
}

fn outlier_detection(o: &OutlierDetection) -> pb::OutlierDetection {
    pb::OutlierDetection {
        consecutive_5xx: o.consecutive_5xx,
        consecutive_gateway: o.consecutive_gateway,
        interval_ms: ms(Some(o.interval)),
        base_ejection_time_ms: ms(Some(o.base_ejection_time)),
        max_ejection_percent: o.max_ejection_percent,
        min_health_percent: o.min_health_percent,
    }
}

fn ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

fn route(r: &Route) -> pb::HttpRoute {
    let (backends, redirect, direct_response) = match &r.action {
        Action::Forward(bs) => (bs.iter().map(backend).collect(), None, None),
        Action::Redirect(rd) => (
            Vec::new(),
            Some(pb::RequestRedirect {
                scheme: rd.scheme.clone().unwrap_or_default(),
                hostname: rd.hostname.clone().unwrap_or_default(),
                path: rd.path.as_ref().map(path_modifier),
                port: rd.port.map_or(0, u32::from),
                status_code: rd.status.into(),
            }),
            None,
        ),
        Action::Respond { status, body } => (
            Vec::new(),
            None,
            Some(pb::DirectResponse {
                status: (*status).into(),
                body: body.clone(),
            }),
        ),
    };
    pb::HttpRoute {
        source: Some(pb::RouteSource {
            kind: r.source.kind.as_str().into(),
            namespace: r.source.key.namespace.clone(),
            name: r.source.key.name.clone(),
            rule: r.source.rule,
            rule_name: r.source.rule_name.clone().unwrap_or_default(),
        }),
        matches: r.matches.iter().map(route_match).collect(),
        request_headers: modifier(&r.request_headers),
        response_headers: modifier(&r.response_headers),
        rewrite: r.rewrite.as_ref().map(|rw| pb::UrlRewrite {
            hostname: rw.hostname.clone().unwrap_or_default(),
            path: rw.path.as_ref().map(path_modifier),
        }),
        redirect,
        backends,
        mirrors: r
            .mirrors
            .iter()
            .map(|m| pb::Mirror {
                backend: Some(backend(&m.backend)),
                per_million: m.per_million,
            })
            .collect(),
        request_timeout_ms: ms(r.timeouts.request),
        backend_request_timeout_ms: ms(r.timeouts.backend_request),
        retry: r.retry.as_ref().map(|p| pb::RetryPolicy {
            attempts: p.attempts,
            per_try_timeout_ms: ms(p.per_try_timeout),
            retry_on: p.retry_on.clone(),
            codes: p.codes.iter().map(|c| u32::from(*c)).collect(),
            backoff_ms: ms(p.backoff),
        }),
        fault: r.fault.as_ref().map(|f| pb::FaultInjection {
            delay_per_million: f.delay.map_or(0, |(share, _)| share),
            delay_ms: ms(f.delay.map(|(_, d)| d)),
            abort_per_million: f.abort.as_ref().map_or(0, |a| a.per_million),
            abort_http_status: f
                .abort
                .as_ref()
                .and_then(|a| a.http_status)
                .map_or(0, u32::from),
            abort_grpc_status: f
                .abort
                .as_ref()
                .and_then(|a| a.grpc_status.clone())
                .unwrap_or_default(),
        }),
        direct_response,
    }
}

fn string_match(m: &StringMatch) -> pb::StringMatch {
    let (kind, value) = match m {
        StringMatch::Exact(v) => (pb::MatchKind::Exact, v.clone()),
        StringMatch::Prefix(v) => (pb::MatchKind::Prefix, v.clone()),
        StringMatch::PathPrefix(v) => (pb::MatchKind::PathPrefix, v.clone()),
        StringMatch::Regex(v) => (pb::MatchKind::Regex, v.clone()),
        StringMatch::Present => (pb::MatchKind::Present, String::new()),
    };
    pb::StringMatch {
        kind: kind.into(),
        value,
    }
}

fn route_match(m: &Match) -> pb::RouteMatch {
    pb::RouteMatch {
        path: m.path.as_ref().map(string_match),
        method: m.method.as_ref().map(string_match),
        headers: m
            .headers
            .iter()
            .map(|h| pb::HeaderMatch {
                name: h.name.clone(),
                value: Some(string_match(&h.value)),
                invert: h.invert,
            })
            .collect(),
        query_params: m
            .query_params
            .iter()
            .map(|q| pb::QueryMatch {
                name: q.name.clone(),
                value: Some(string_match(&q.value)),
            })
            .collect(),
        port: m.port.map_or(0, u32::from),
        source_labels: m.source_labels.clone().into_iter().collect(),
        source_namespace: m.source_namespace.clone().unwrap_or_default(),
    }
}

fn modifier(m: &HeaderModifier) -> Option<pb::HeaderModifier> {
    let pairs = |l: &[(String, String)]| {
        l.iter()
            .map(|(name, value)| pb::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    };
    (!m.is_empty()).then(|| pb::HeaderModifier {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.clone(),
    })
}

fn path_modifier(p: &PathModifier) -> pb::PathModifier {
    let (kind, value) = match p {
        PathModifier::Full(v) => (pb::PathModifierKind::Full, v.clone()),
        PathModifier::Prefix(v) => (pb::PathModifierKind::Prefix, v.clone()),
    };
    pb::PathModifier {
        kind: kind.into(),
        value,
    }
}

fn backend(b: &Backend) -> pb::Backend {
    pb::Backend {
        namespace: b.service.namespace.clone(),
        name: b.service.name.clone(),
        port: b.port.map_or(0, u32::from),
        subset: b.subset.clone().unwrap_or_default(),
        weight: b.weight,
        request_headers: modifier(&b.request_headers),
        response_headers: modifier(&b.response_headers),
    }
}
