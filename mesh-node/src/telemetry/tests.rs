//! The exporters against in-process collectors on loopback: a tonic `TraceService` server (the
//! generated one from opentelemetry-proto) and a hyper Zipkin receiver.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_l7::trace::{Span, SpanId, SpanKind, SpanSink as _, TraceId, zipkin};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{span, status},
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::mpsc};

use super::*;

fn span(kind: SpanKind, service: &str, parent: Option<u64>) -> Span {
    Span {
        trace_id: TraceId::new(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
        span_id: SpanId::random(),
        parent_id: parent.map(SpanId),
        name: "reviews.demo.svc.cluster.local:9080/*".into(),
        kind,
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        duration: Duration::from_millis(3),
        local_service: service.into(),
        local_ip: Some("10.0.0.7".parse().expect("ip")),
        remote: Some("10.0.1.9:9080".parse().expect("addr")),
        tags: vec![
            ("http.method".into(), "GET".into()),
            ("http.status_code".into(), "503".into()),
            ("error".into(), "true".into()),
        ],
        error: kind == SpanKind::Client,
    }
}

fn fixed(addr: SocketAddr) -> Resolve {
    Arc::new(move || Some(addr))
}

fn config(protocol: Protocol) -> ProviderConfig {
    ProviderConfig {
        flush_interval: Duration::from_millis(20),
        ..ProviderConfig::new("test", protocol)
    }
}

fn zipkin_config() -> ProviderConfig {
    config(Protocol::Zipkin {
        path: "/api/v2/spans".into(),
    })
}

/// Waits (at most 5 s) until `done`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A port on loopback where nothing listens.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn otlp_collector() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, rx)
}

struct Received {
    method: http::Method,
    path: String,
    content_type: Option<String>,
    body: Bytes,
}

/// A Zipkin receiver answering 202; `connections` counts the TCP connections it accepted.
async fn zipkin_collector() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Received>,
    Arc<AtomicUsize>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::Relaxed);
            let tx = tx.clone();
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.expect("body").to_bytes();
                    let _ = tx.send(Received {
                        method: parts.method,
                        path: parts.uri.path().to_owned(),
                        content_type: parts
                            .headers
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned),
                        body,
                    });
                    let mut resp = http::Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = http::StatusCode::ACCEPTED;
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, rx, connections)
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time")
        .expect("a message")
}

fn count(m: &TraceMetrics) -> Handles {
    m.handles("test")
}

#[tokio::test]
async fn otlp_collector_receives_the_spans() {
    let (addr, mut rx) = otlp_collector().await;
    let metrics = TraceMetrics::default();
    let exporter = Exporter::spawn(config(Protocol::Otlp), fixed(addr), &metrics);
    let client = span(SpanKind::Client, "productpage.demo", None);
    let server = span(SpanKind::Server, "reviews.demo", Some(client.span_id.0));
    exporter.submit(client.clone());
    exporter.submit(server.clone());

    let req = recv(&mut rx).await;
    assert_eq!(
        req.resource_spans.len(),
        2,
        "one resource per local service"
    );
    for (rs, want) in req.resource_spans.iter().zip([&client, &server]) {
        let attrs = &rs.resource.as_ref().expect("resource").attributes;
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].key, "service.name");
        let name = attrs[0].value.as_ref().and_then(|v| v.value.clone());
        assert_eq!(name, Some(Value::StringValue(want.local_service.to_string())));
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 1);
        let got = &spans[0];
        assert_eq!(got.trace_id, hex::<16>("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(got.span_id, want.span_id.0.to_be_bytes());
        assert_eq!(got.name, want.name);
        assert_eq!(got.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(got.end_time_unix_nano, 1_700_000_000_003_000_000);
        let attrs: Vec<(&str, Option<Value>)> = got
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    kv.value.as_ref().and_then(|v| v.value.clone()),
                )
            })
            .collect();
        assert_eq!(
            attrs,
            [
                ("http.method", Some(Value::StringValue("GET".into()))),
                ("http.status_code", Some(Value::StringValue("503".into()))),
                ("error", Some(Value::StringValue("true".into()))),
            ]
        );
    }
    let (c, s) = (
        &req.resource_spans[0].scope_spans[0].spans[0],
        &req.resource_spans[1].scope_spans[0].spans[0],
    );
    assert_eq!(c.kind, i32::from(span::SpanKind::Client));
    assert_eq!(s.kind, i32::from(span::SpanKind::Server));
    assert!(c.parent_span_id.is_empty(), "a root span");
    assert_eq!(s.parent_span_id, c.span_id);
    assert_eq!(
        c.status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Error.into())
    );
    assert_eq!(
        s.status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Unset.into())
    );

    let m = count(&metrics);
    eventually("the export counted", || m.ok.get() == 1).await;
    assert_eq!(m.exported.get(), 2);
    assert_eq!((m.error.get(), m.export_failed.get()), (0, 0));
}

fn hex<const N: usize>(s: &str) -> Vec<u8> {
    let v: Vec<u8> = (0..N)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    assert_eq!(v.len(), N);
    v
}

#[tokio::test]
async fn zipkin_collector_receives_json_on_one_kept_connection() {
    let (addr, mut rx, connections) = zipkin_collector().await;
    let metrics = TraceMetrics::default();
    let exporter = Exporter::spawn(zipkin_config(), fixed(addr), &metrics);
    let spans = [
        span(SpanKind::Client, "productpage.demo", None),
        span(SpanKind::Server, "reviews.demo", Some(7)),
    ];
    for s in &spans {
        exporter.submit(s.clone());
    }
    let got = recv(&mut rx).await;
    assert_eq!(got.method, http::Method::POST);
    assert_eq!(got.path, "/api/v2/spans");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
    let want: serde_json::Value = serde_json::from_slice(&zipkin::encode(&spans)).expect("json");
    assert_eq!(json, want);
    assert_eq!(json[1]["parentId"], "0000000000000007");

    exporter.submit(span(SpanKind::Client, "productpage.demo", None));
    let second = recv(&mut rx).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&second.body)
            .expect("json")
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        connections.load(Ordering::Relaxed),
        1,
        "the connection is kept between batches"
    );
    let m = count(&metrics);
    eventually("both batches counted", || m.ok.get() == 2).await;
    assert_eq!(m.exported.get(), 3);
}

#[tokio::test]
async fn dropping_the_exporter_flushes_what_is_queued() {
    let (addr, mut rx, _) = zipkin_collector().await;
    let cfg = ProviderConfig {
        flush_interval: Duration::from_hours(1),
        ..zipkin_config()
    };
    let exporter = Exporter::spawn(cfg, fixed(addr), &TraceMetrics::default());
    for _ in 0..3 {
        exporter.submit(span(SpanKind::Client, "productpage.demo", None));
    }
    drop(exporter);
    let got = recv(&mut rx).await;
    let json: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(3), "not an hour later");
}

#[tokio::test]
async fn an_unreachable_collector_never_blocks_submit() {
    let metrics = TraceMetrics::default();
    let exporter = Exporter::spawn(config(Protocol::Otlp), fixed(closed_port().await), &metrics);
    let one = span(SpanKind::Client, "productpage.demo", None);
    let spans: Vec<Span> = (0..10_000).map(|_| one.clone()).collect();
    let start = std::time::Instant::now();
    for s in spans {
        exporter.submit(s);
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(50),
        "10k submits took {took:?}"
    );
    // The test runtime has one thread: the export task has not run yet, so the queue holds
    // exactly its capacity and the rest was refused.
    let m = count(&metrics);
    assert_eq!(m.queue_full.get(), 10_000 - 2048);
    eventually("the queued spans dropped as failed", || {
        m.export_failed.get() == 2048
    })
    .await;
    assert_eq!(m.exported.get(), 0);
    assert!(
        m.error.get() >= 4,
        "batches of at most 512: {}",
        m.error.get()
    );
    assert_eq!(m.ok.get(), 0);

    // The same with Zipkin.
    let metrics = TraceMetrics::default();
    let exporter = Exporter::spawn(zipkin_config(), fixed(closed_port().await), &metrics);
    for _ in 0..10 {
        exporter.submit(one.clone());
    }
    let m = count(&metrics);
    eventually("zipkin spans dropped as failed", || {
        m.export_failed.get() == 10
    })
    .await;
    assert_eq!(m.error.get(), 1);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let cfg = ProviderConfig {
        max_queue: 4,
        ..zipkin_config()
    };
    let (addr, mut rx, _) = zipkin_collector().await;
    let exporter = Exporter::spawn(cfg, fixed(addr), &metrics);
    for _ in 0..10 {
        exporter.submit(span(SpanKind::Client, "productpage.demo", None));
    }
    let got = recv(&mut rx).await;
    let json: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(4));
    let m = count(&metrics);
    eventually("the batch counted", || m.ok.get() == 1).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    for line in [
        r#"mesh_trace_spans_dropped_total{provider="test",reason="queue_full"} 6"#,
        r#"mesh_trace_spans_exported_total{provider="test"} 4"#,
        r#"mesh_trace_export_batches_total{provider="test",result="ok"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn no_collector_endpoint_drops_and_counts() {
    let metrics = TraceMetrics::default();
    let exporter = Exporter::spawn(zipkin_config(), Arc::new(|| None), &metrics);
    for _ in 0..5 {
        exporter.submit(span(SpanKind::Server, "reviews.demo", None));
    }
    let m = count(&metrics);
    eventually("no_endpoint counted", || m.no_endpoint.get() == 5).await;
    assert_eq!(
        (m.ok.get(), m.error.get(), m.exported.get()),
        (0, 0, 0),
        "no request was made"
    );
}
