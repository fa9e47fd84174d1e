//! A DestinationRule's `trafficPolicy` (Istio's shape) → [`TrafficPolicy`]. Istio's defaults are
//! filled in here, so nodes get complete settings; fields that are accepted but have no effect
//! are returned as notes (they reach the object's status), fields the mesh does not implement
//! are refused naming them.

use std::time::Duration;

use super::{Error, header_name, in_range, istio_duration};
use crate::{
    crd::networking as api,
    routing::model::{ConnectionPool, HashKey, LoadBalancer, OutlierDetection, TrafficPolicy},
};

/// Maglev table size when `maglev.tableSize` is not given (Envoy's default).
pub const DEFAULT_MAGLEV_TABLE: u32 = 65_537;

pub fn traffic_policy(
    p: &api::TrafficPolicy,
    field: &str,
    notes: &mut Vec<String>,
) -> Result<TrafficPolicy, Error> {
    if let Some(tls) = &p.tls {
        match tls.mode.as_deref() {
            Some("ISTIO_MUTUAL") => notes.push(format!(
                "{field}.tls: ISTIO_MUTUAL is what the mesh does between meshed workloads; nothing to apply"
            )),
            other => {
                return Err(Error::Unsupported {
                    field: format!("{field}.tls.mode"),
                    what: format!(
                        "{other:?}: the mesh originates no TLS of its own to a destination (only ISTIO_MUTUAL is accepted)"
                    ),
                });
            }
        }
    }
    Ok(TrafficPolicy {
        locality_lb_disabled: p
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.locality_lb_setting.as_ref())
            .and_then(|l| l.enabled)
            == Some(false),
        load_balancer: p
            .load_balancer
            .as_ref()
            .map(|lb| load_balancer(lb, &format!("{field}.loadBalancer"), notes))
            .transpose()?
            .flatten(),
        connection_pool: p
            .connection_pool
            .as_ref()
            .map(|c| connection_pool(c, &format!("{field}.connectionPool"), notes))
            .transpose()?,
        outlier_detection: p
            .outlier_detection
            .as_ref()
            .map(|o| outlier_detection(o, &format!("{field}.outlierDetection")))
            .transpose()?,
    })
}

/// `None` for `UNSPECIFIED` (the mesh's default).
fn load_balancer(
    lb: &api::LoadBalancerSettings,
    field: &str,
    notes: &mut Vec<String>,
) -> Result<Option<LoadBalancer>, Error> {
    if lb.warmup_duration_secs.is_some() {
        notes.push(format!(
            "{field}.warmupDurationSecs: accepted, not applied (new endpoints get their full share at once)"
        ));
    }
    let simple = match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") => None,
        Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        Some("LEAST_REQUEST" | "LEAST_CONN") => Some(LoadBalancer::LeastRequest),
        Some("RANDOM") => Some(LoadBalancer::Random),
        Some("PASSTHROUGH") => {
            return Err(Error::Unsupported {
                field: format!("{field}.simple"),
                what: "PASSTHROUGH: a Service's requests always go to one of its endpoints".into(),
            });
        }
        Some(other) => {
            return Err(Error::UnknownValue {
                field: format!("{field}.simple"),
                value: other.to_owned(),
                expected: "ROUND_ROBIN, LEAST_REQUEST, RANDOM or UNSPECIFIED",
            });
        }
    };
    match (&lb.consistent_hash, simple) {
        (None, simple) => Ok(simple),
        (Some(_), Some(_)) => Err(Error::Conflict {
            field: field.to_owned(),
            what: "set either simple or consistentHash, not both".into(),
        }),
        (Some(h), None) => consistent_hash(h, &format!("{field}.consistentHash"), notes).map(Some),
    }
}

fn consistent_hash(
    h: &api::ConsistentHash,
    field: &str,
    notes: &mut Vec<String>,
) -> Result<LoadBalancer, Error> {
    let mut keys = Vec::new();
    if let Some(name) = &h.http_header_name {
        keys.push(HashKey::Header(header_name(
            &format!("{field}.httpHeaderName"),
            name,
        )?));
    }
    if let Some(c) = &h.http_cookie {
        let f = format!("{field}.httpCookie");
        if c.name.is_empty()
            || !c
                .name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        {
            return Err(Error::UnknownValue {
                field: format!("{f}.name"),
                value: c.name.clone(),
                expected: "a cookie name (a token)",
            });
        }
        let ttl = c
            .ttl
            .as_deref()
            .map(|t| istio_duration(&format!("{f}.ttl"), t))
            .transpose()?
            .flatten();
        keys.push(HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl,
        });
    }
    if h.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = &h.http_query_parameter_name {
        if q.is_empty() {
            return Err(Error::Missing {
                field: format!("{field}.httpQueryParameterName"),
                what: "a parameter name",
            });
        }
        keys.push(HashKey::QueryParameter(q.clone()));
    }
    let key = match keys.len() {
        1 => keys.remove(0),
        0 => {
            return Err(Error::Missing {
                field: field.to_owned(),
                what: "one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
            });
        }
        _ => {
            return Err(Error::Conflict {
                field: field.to_owned(),
                what: "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into(),
            });
        }
    };
    if h.ring_hash.is_some() || h.minimum_ring_size.is_some() {
        notes.push(format!(
            "{field}.ringHash: the mesh hashes with Maglev, which moves as few keys as a ring when endpoints change"
        ));
    }
    let table_size = match h.maglev.as_ref().and_then(|m| m.table_size) {
        None => DEFAULT_MAGLEV_TABLE,
        Some(n) => {
            let n = in_range(&format!("{field}.maglev.tableSize"), n, 1, 5_000_011)?;
            next_prime(u32::try_from(n).expect("in range"))
        }
    };
    Ok(LoadBalancer::ConsistentHash { key, table_size })
}

/// Maglev needs a prime table size (Envoy refuses others; we round up).
fn next_prime(n: u32) -> u32 {
    let is_prime = |n: u32| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
    (n..)
        .find(|&n| is_prime(n))
        .expect("a prime exists above any u32 we accept")
}

fn connection_pool(
    c: &api::ConnectionPoolSettings,
    field: &str,
    notes: &mut Vec<String>,
) -> Result<ConnectionPool, Error> {
    // Istio: negative is invalid; 0 means "not set" (the default, no limit).
    let limit = |f: &str, v: Option<i64>| -> Result<Option<u32>, Error> {
        v.map(|v| in_range(&format!("{field}.{f}"), v, 0, i64::from(i32::MAX)))
            .transpose()
            .map(|v| {
                v.filter(|v| *v > 0)
                    .map(|v| u32::try_from(v).expect("in range"))
            })
    };
    let duration = |f: &str, v: Option<&str>| -> Result<Option<Duration>, Error> {
        v.map(|v| istio_duration(&format!("{field}.{f}"), v))
            .transpose()
            .map(Option::flatten)
    };
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = &c.tcp {
        pool.max_connections = limit("tcp.maxConnections", tcp.max_connections)?;
        pool.connect_timeout = duration("tcp.connectTimeout", tcp.connect_timeout.as_deref())?;
        pool.idle_timeout = duration("tcp.idleTimeout", tcp.idle_timeout.as_deref())?;
        if tcp.tcp_keepalive.is_some() {
            notes.push(format!(
                "{field}.tcp.tcpKeepalive: accepted, not applied (the node's own keepalive is used)"
            ));
        }
        if tcp.max_connection_duration.is_some() {
            notes.push(format!(
                "{field}.tcp.maxConnectionDuration: accepted, not applied"
            ));
        }
    }
    if let Some(h) = &c.http {
        pool.http1_max_pending_requests =
            limit("http.http1MaxPendingRequests", h.http1_max_pending_requests)?;
        pool.http2_max_requests = limit("http.http2MaxRequests", h.http2_max_requests)?;
        pool.max_requests_per_connection = limit(
            "http.maxRequestsPerConnection",
            h.max_requests_per_connection,
        )?;
        pool.max_retries = limit("http.maxRetries", h.max_retries)?;
        // The HTTP idle timeout is the one of the upstream connections that carry requests.
        if let Some(t) = duration("http.idleTimeout", h.idle_timeout.as_deref())? {
            pool.idle_timeout = Some(t);
        }
        for (set, name) in [
            (h.h2_upgrade_policy.is_some(), "h2UpgradePolicy"),
            (h.use_client_protocol.is_some(), "useClientProtocol"),
            (h.max_concurrent_streams.is_some(), "maxConcurrentStreams"),
        ] {
            if set {
                notes.push(format!(
                    "{field}.http.{name}: accepted, not applied (the Service port's protocol decides HTTP/1.1 or HTTP/2 upstream)"
                ));
            }
        }
    }
    Ok(pool)
}

fn outlier_detection(o: &api::OutlierDetection, field: &str) -> Result<OutlierDetection, Error> {
    let count = |f: &str, v: Option<i64>, default: u32| -> Result<u32, Error> {
        v.map_or(Ok(default), |v| {
            in_range(&format!("{field}.{f}"), v, 0, i64::from(i32::MAX))
                .map(|v| u32::try_from(v).expect("in range"))
        })
    };
    let percent = |f: &str, v: Option<i64>, default: u32| -> Result<u32, Error> {
        v.map_or(Ok(default), |v| {
            in_range(&format!("{field}.{f}"), v, 0, 100)
                .map(|v| u32::try_from(v).expect("in range"))
        })
    };
    let duration = |f: &str, v: Option<&str>, default: Duration| -> Result<Duration, Error> {
        match v {
            None => Ok(default),
            Some(v) => {
                istio_duration(&format!("{field}.{f}"), v)?.ok_or_else(|| Error::OutOfRange {
                    field: format!("{field}.{f}"),
                    value: 0,
                    min: 1,
                    max: i64::MAX,
                })
            }
        }
    };
    if o.consecutive_5xx_errors.is_some() && o.consecutive_errors.is_some() {
        return Err(Error::Conflict {
            field: format!("{field}.consecutiveErrors"),
            what: "deprecated name of consecutive5xxErrors, which is also set".into(),
        });
    }
    // Istio's defaults: 5 consecutive 5xx, gateway errors off, 10 s, 30 s, 10 %, 0 %.
    Ok(OutlierDetection {
        consecutive_5xx: count(
            "consecutive5xxErrors",
            o.consecutive_5xx_errors.or(o.consecutive_errors),
            5,
        )?,
        consecutive_gateway: count("consecutiveGatewayErrors", o.consecutive_gateway_errors, 0)?,
        interval: duration("interval", o.interval.as_deref(), Duration::from_secs(10))?,
        base_ejection_time: duration(
            "baseEjectionTime",
            o.base_ejection_time.as_deref(),
            Duration::from_secs(30),
        )?,
        max_ejection_percent: percent("maxEjectionPercent", o.max_ejection_percent, 10)?,
        min_health_percent: percent("minHealthPercent", o.min_health_percent, 0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<(TrafficPolicy, Vec<String>), Error> {
        let p: api::TrafficPolicy = serde_saphyr::from_str(yaml).expect("yaml");
        let mut notes = Vec::new();
        traffic_policy(&p, "spec.trafficPolicy", &mut notes).map(|t| (t, notes))
    }

    #[test]
    fn istio_circuit_breaker_example_gets_limits_and_defaults() {
        let (p, notes) = parse(
            "
connectionPool:
  tcp: {maxConnections: 1}
  http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
outlierDetection:
  consecutive5xxErrors: 1
  interval: 1s
  baseEjectionTime: 3m
  maxEjectionPercent: 100
tls: {mode: ISTIO_MUTUAL}
",
        )
        .expect("valid");
        let pool = p.connection_pool.expect("pool");
        assert_eq!(
            (
                pool.max_connections,
                pool.http1_max_pending_requests,
                pool.max_requests_per_connection
            ),
            (Some(1), Some(1), Some(1))
        );
        assert_eq!(pool.http2_max_requests, None, "unset: no limit");
        let o = p.outlier_detection.expect("outlier");
        assert_eq!(
            o,
            OutlierDetection {
                consecutive_5xx: 1,
                consecutive_gateway: 0,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(180),
                max_ejection_percent: 100,
                min_health_percent: 0,
            }
        );
        assert_eq!(p.load_balancer, None);
        assert!(notes.iter().any(|n| n.contains("tls")), "{notes:?}");
    }

    #[test]
    fn load_balancers_and_hash_keys() {
        assert_eq!(
            parse("loadBalancer: {simple: ROUND_ROBIN}")
                .expect("valid")
                .0
                .load_balancer,
            Some(LoadBalancer::RoundRobin)
        );
        assert_eq!(
            parse("loadBalancer: {simple: LEAST_REQUEST}")
                .expect("valid")
                .0
                .load_balancer,
            Some(LoadBalancer::LeastRequest)
        );
        let (p, _) = parse(
            "loadBalancer: {consistentHash: {httpHeaderName: X-User, maglev: {tableSize: 1000}}}",
        )
        .expect("valid");
        assert_eq!(
            p.load_balancer,
            Some(LoadBalancer::ConsistentHash {
                key: HashKey::Header("x-user".into()),
                table_size: 1009
            })
        );
        let (p, _) = parse("loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 0s}}}")
            .expect("valid");
        assert_eq!(
            p.load_balancer,
            Some(LoadBalancer::ConsistentHash {
                key: HashKey::Cookie {
                    name: "user".into(),
                    path: None,
                    ttl: None
                },
                table_size: DEFAULT_MAGLEV_TABLE
            })
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let e = |yaml: &str| parse(yaml).expect_err("invalid").to_string();
        assert!(
            e("loadBalancer: {simple: WEIGHTED}")
                .starts_with("spec.trafficPolicy.loadBalancer.simple"),
            "{}",
            e("loadBalancer: {simple: WEIGHTED}")
        );
        assert!(
            e("loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}")
                .contains("not both")
        );
        assert!(
            e("loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}")
                .contains("exactly one")
        );
        assert!(e("loadBalancer: {consistentHash: {}}").contains("one of httpHeaderName"));
        assert!(
            e("connectionPool: {tcp: {maxConnections: -1}}")
                .starts_with("spec.trafficPolicy.connectionPool.tcp.maxConnections")
        );
        assert!(
            e("outlierDetection: {maxEjectionPercent: 101}")
                .starts_with("spec.trafficPolicy.outlierDetection.maxEjectionPercent")
        );
        assert!(
            e("outlierDetection: {interval: 0s}")
                .starts_with("spec.trafficPolicy.outlierDetection.interval")
        );
        assert!(e("tls: {mode: SIMPLE}").starts_with("spec.trafficPolicy.tls.mode"));
    }

    #[test]
    fn locality_failover_is_on_unless_disabled() {
        let (p, _) = parse("outlierDetection: {consecutive5xxErrors: 1}\n").expect("valid");
        assert!(!p.locality_lb_disabled, "Istio's default");
        let (p, _) = parse("loadBalancer: {localityLbSetting: {enabled: false}}\n").expect("valid");
        assert!(p.locality_lb_disabled);
    }
}
