//! Zipkin's JSON v2 span format (`POST /api/v2/spans`), as Envoy's Zipkin tracer writes it.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, UNIX_EPOCH},
};

use serde::{Serialize, Serializer, ser::SerializeMap as _};

use super::span::{Span, SpanId, SpanKind, TagText, TraceId};

/// A span in JSON is about 1 KiB with Istio's tags: room for a batch, reserved at once.
const SPAN_JSON_BYTES: usize = 1200;

/// `spans` as one Zipkin v2 JSON array.
pub fn encode(spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(spans.len() * SPAN_JSON_BYTES + 2);
    let spans: Vec<Zipkin<'_>> = spans.iter().map(Zipkin::from).collect();
    match serde_json::to_writer(&mut out, &spans) {
        Ok(()) => out,
        Err(_) => b"[]".to_vec(),
    }
}

/// Written with its `Display` straight into the JSON (ids, addresses): no `String` per field.
fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes the field by reference"
)]
fn display_opt<T: std::fmt::Display, S: Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Zipkin<'a> {
    #[serde(serialize_with = "display")]
    trace_id: TraceId,
    #[serde(serialize_with = "display")]
    id: SpanId,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "display_opt"
    )]
    parent_id: Option<SpanId>,
    name: &'a str,
    kind: &'static str,
    /// Microseconds since the epoch.
    timestamp: u64,
    /// Microseconds, at least 1 (Zipkin refuses 0).
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: Tags<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "display_opt"
    )]
    ipv4: Option<Ipv4Addr>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "display_opt"
    )]
    ipv6: Option<Ipv6Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

impl Endpoint<'_> {
    fn ip(ip: Option<IpAddr>) -> Self {
        let (ipv4, ipv6) = match ip {
            Some(IpAddr::V4(a)) => (Some(a), None),
            Some(IpAddr::V6(a)) => (None, Some(a)),
            None => (None, None),
        };
        Endpoint {
            service_name: None,
            ipv4,
            ipv6,
            port: None,
        }
    }

    fn addr(addr: SocketAddr) -> Self {
        Endpoint {
            port: Some(addr.port()),
            ..Self::ip(Some(addr.ip()))
        }
    }
}

/// The tags as a JSON object.
struct Tags<'a>(&'a [(Cow<'static, str>, TagText)]);

impl Serialize for Tags<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v.as_str())?;
        }
        map.end()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl<'a> From<&'a Span> for Zipkin<'a> {
    fn from(s: &'a Span) -> Self {
        Zipkin {
            trace_id: s.trace_id,
            id: s.span_id,
            parent_id: s.parent_id,
            name: &s.name,
            kind: match s.kind {
                SpanKind::Client => "CLIENT",
                SpanKind::Server => "SERVER",
            },
            timestamp: s.start.duration_since(UNIX_EPOCH).map_or(0, micros),
            duration: micros(s.duration).max(1),
            local_endpoint: Endpoint {
                service_name: Some(&s.local_service),
                ..Endpoint::ip(s.local_ip)
            },
            remote_endpoint: s.remote.map(Endpoint::addr),
            tags: Tags(&s.tags),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use serde_json::{Value, json};

    use super::*;
    use crate::trace::span::{SpanId, TraceId};

    fn span() -> Span {
        Span {
            trace_id: TraceId::new(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            span_id: SpanId(0xabc),
            parent_id: Some(SpanId(0x00f0_67aa_0ba9_02b7)),
            name: "reviews.demo.svc.cluster.local:9080/*".into(),
            kind: SpanKind::Client,
            start: SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            duration: Duration::from_micros(2_500),
            local_service: "productpage.demo".into(),
            local_ip: Some("10.0.0.7".parse().expect("ip")),
            remote: Some("10.0.1.9:9080".parse().expect("addr")),
            tags: vec![
                ("http.method".into(), "GET".into()),
                ("http.status_code".into(), "200".into()),
            ],
            error: false,
        }
    }

    #[test]
    fn spans_encode_as_zipkin_v2_json() {
        let root = Span {
            trace_id: TraceId::b3_64(0xa3ce_929d_0e0e_4736),
            parent_id: None,
            kind: SpanKind::Server,
            duration: Duration::ZERO,
            local_ip: Some("fd00::7".parse().expect("ip")),
            remote: None,
            tags: vec![],
            ..span()
        };
        let got: Value = serde_json::from_slice(&encode(&[span(), root])).expect("json");
        let want = json!([
            {
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "0000000000000abc",
                "parentId": "00f067aa0ba902b7",
                "name": "reviews.demo.svc.cluster.local:9080/*",
                "kind": "CLIENT",
                "timestamp": 1_700_000_000_123_456_u64,
                "duration": 2500,
                "localEndpoint": {"serviceName": "productpage.demo", "ipv4": "10.0.0.7"},
                "remoteEndpoint": {"ipv4": "10.0.1.9", "port": 9080},
                "tags": {"http.method": "GET", "http.status_code": "200"}
            },
            {
                "traceId": "a3ce929d0e0e4736",
                "id": "0000000000000abc",
                "name": "reviews.demo.svc.cluster.local:9080/*",
                "kind": "SERVER",
                "timestamp": 1_700_000_000_123_456_u64,
                "duration": 1,
                "localEndpoint": {"serviceName": "productpage.demo", "ipv6": "fd00::7"},
                "tags": {}
            }
        ]);
        assert_eq!(got, want);
        assert_eq!(encode(&[]), b"[]");
    }
}
