//! The HBONE wire format as Istio ambient uses it: an HTTP/2 CONNECT request whose `:authority`
//! is the destination `ip:port`, over mTLS (ALPN h2) to port 15008, answered `200` before any
//! byte flows. Request headers: `forwarded: for=<client ip>` (RFC 7239), W3C `traceparent`, and
//! `baggage` with the source workload's metadata (OpenTelemetry keys).

use std::{
    hash::{BuildHasher as _, RandomState},
    net::{IpAddr, SocketAddr},
};

use http::{HeaderMap, HeaderValue, Method, Request, Version, header::FORWARDED};

use crate::state::Workload;

pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// A fresh W3C trace context (`00-<trace id>-<span id>-01`), so both daemons' logs of one
/// connection can be joined.
pub fn traceparent() -> String {
    let r = || RandomState::new().hash_one(std::time::Instant::now());
    format!("00-{:016x}{:016x}-{:016x}-01", r(), r(), r())
}

pub fn baggage(src: &Workload, cluster: &str) -> String {
    let mut b = format!(
        "k8s.cluster.name={cluster},k8s.namespace.name={},k8s.pod.name={},service.name={}",
        src.namespace,
        src.name,
        src.labels.get("app").map_or(src.workload_name(), String::as_str)
    );
    if let Some(v) = src.labels.get("version") {
        b.push_str(",service.version=");
        b.push_str(v);
    }
    b
}

/// The CONNECT request for one tunnelled TCP connection. With only an authority in the URI, h2
/// sends `:method CONNECT` and `:authority` and no `:scheme`/`:path`, as RFC 9113 §8.5 requires.
///
/// # Panics
/// Never: an `ip:port` is always a valid authority and the header values are ASCII.
pub fn connect_request(dst: SocketAddr, src_ip: IpAddr, src: &Workload, cluster: &str, trace: &str) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.version_mut() = Version::HTTP_2;
    *req.uri_mut() = http::Uri::builder().authority(dst.to_string()).build().expect("ip:port is an authority");
    let h = req.headers_mut();
    let forwarded = match src_ip {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    h.insert(FORWARDED, HeaderValue::from_str(&forwarded).expect("ascii"));
    if let Ok(v) = HeaderValue::from_str(&baggage(src, cluster)) {
        h.insert(BAGGAGE, v);
    }
    h.insert(TRACEPARENT, HeaderValue::from_str(trace).expect("ascii"));
    req
}

/// The client address from `forwarded: for=...` (first element), if any. RFC 7239 nodes: an
/// address, optionally with a port (`for="198.18.1.2:4711"`, which ztunnel sends, or
/// `for="[fd00::1]:4711"`).
pub fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let v = headers.get(FORWARDED)?.to_str().ok()?;
    let first = v.split(',').next()?;
    let for_ = first.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for").then_some(v)
    })?;
    let v = for_.trim_matches('"');
    if let Some(v6) = v.strip_prefix('[') {
        return v6.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    v.parse().ok().or_else(|| v.parse::<std::net::SocketAddrV4>().ok().map(|a| IpAddr::V4(*a.ip())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips_v4_and_v6() {
        for ip in ["198.18.1.11", "fd00::1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let w: Workload = serde_json::from_str(
                r#"{"name":"a","namespace":"ns","serviceAccount":"sa","ip":"198.18.1.11","node":"n1","nodeIp":"198.18.0.1","protocol":"HBONE"}"#,
            )
            .expect("workload");
            let req = connect_request("198.18.2.11:80".parse().expect("addr"), ip, &w, "c1", &traceparent());
            assert_eq!(req.uri().to_string(), "198.18.2.11:80");
            assert_eq!(forwarded_for(req.headers()), Some(ip));
            assert!(req.headers()[BAGGAGE].to_str().expect("ascii").contains("k8s.namespace.name=ns"));
        }
        let mut h = HeaderMap::new();
        h.insert(FORWARDED, HeaderValue::from_static("proto=https;For=\"198.18.1.2:4711\", for=1.2.3.4"));
        assert_eq!(forwarded_for(&h), Some("198.18.1.2".parse().expect("ip")), "ztunnel's quoted ip:port");
        h.insert(FORWARDED, HeaderValue::from_static("for=\"[fd00::1]:4711\""));
        assert_eq!(forwarded_for(&h), Some("fd00::1".parse().expect("ip")));
        h.insert(FORWARDED, HeaderValue::from_static("for=unknown"));
        assert_eq!(forwarded_for(&h), None, "an obfuscated node is no address");
        h.insert(FORWARDED, HeaderValue::from_static("for=198.18.1.2;proto=https, for=1.2.3.4"));
        assert_eq!(forwarded_for(&h), Some("198.18.1.2".parse().expect("ip")));
    }
}
