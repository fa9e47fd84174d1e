//! Distributed tracing through the whole mesh, configured by the repository's example
//! (`deploy/examples/telemetry/tracing.yaml`: the mesh config's Zipkin provider and a mesh-wide
//! Telemetry at 100 %), exported to a Zipkin-compatible collector (`mesh-whoami zipkin`) in the
//! unmeshed pod on node 1. Real curl requests: client (n1) → Service whoami → the whoami pod's
//! own call to Service helloworld, which forwards the trace headers as apps must. Every hop's
//! client span (source node) and server span (destination node) must form ONE trace with the
//! right parent links and Istio's tags; W3C and B3 contexts from the client are continued, and a
//! "not sampled" decision is honoured.

use std::time::Duration;

use mesh_tests::cluster::{HTTP_PORT, HTTP_SERVICE_PORT, METRICS_PORT, VIP, VIP_HELLOWORLD};
use serde_json::Value;

use super::{cluster, eventually};

const TRACING: &str = include_str!("../../deploy/examples/telemetry/tracing.yaml");
const COLLECTOR_POD: &str = "n1p3";
const COLLECTOR_PORT: u16 = 9411;

fn tag<'a>(span: &'a Value, name: &str) -> &'a str {
    span["tags"][name].as_str().unwrap_or("")
}

/// The spans of the trace whose spans carry `x-request-id: request_id`, ordered root first
/// along the parent links (each span the child of the one before).
fn chain(traces: &[Vec<Value>], request_id: &str) -> Option<Vec<Value>> {
    if std::env::var_os("MESH_DEBUG_TRACES").is_some() {
        let mine: Vec<&Value> = traces.iter().filter(|t| t.iter().any(|s| tag(s, "guid:x-request-id") == request_id)).flatten().collect();
        eprintln!("{request_id}: {mine:#?}");
    }
    let trace = traces.iter().find(|t| t.iter().any(|s| tag(s, "guid:x-request-id") == request_id))?;
    let mut ordered = vec![trace.iter().find(|s| !trace.iter().any(|p| p["id"] == s["parentId"]))?.clone()];
    while let Some(child) = trace.iter().find(|s| s["parentId"] == ordered.last().expect("non-empty")["id"]) {
        ordered.push(child.clone());
    }
    (ordered.len() == trace.len()).then_some(ordered)
}

#[test]
fn requests_through_two_hops_form_one_trace_with_client_and_server_spans() {
    let mut c = cluster();
    let whoami = c.bins.whoami.display().to_string();
    let listen = format!("0.0.0.0:{COLLECTOR_PORT}");
    let (_collector, _) = c.spawn_in_pod_logged(COLLECTOR_POD, "zipkin", &whoami, &["zipkin", "--listen", &listen]).expect("start the collector");
    let collector_ip = c.lab.pod(COLLECTOR_POD).ip.to_string();
    c.apply_policy("tracing", &TRACING.replace("zipkin.mesh-system.svc.cluster.local", &collector_ip)).expect("apply the tracing example");

    let traces = || -> Vec<Vec<Value>> {
        let url = format!("http://127.0.0.1:{COLLECTOR_PORT}/api/v2/traces");
        let out = c.lab.run_in_pod(COLLECTOR_POD, "curl", &["-sS", "--max-time", "3", &url]).expect("curl the collector");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    // GET through whoami, which calls helloworld: (status, body).
    let call = |request_id: &str, headers: &[&str]| -> (String, String) {
        let url = format!("http://{VIP}:{HTTP_SERVICE_PORT}/call/{VIP_HELLOWORLD}:{HTTP_SERVICE_PORT}/hello");
        let id = format!("x-request-id: {request_id}");
        let mut args = vec!["-sS", "--max-time", "5", "-o", "/dev/stderr", "-w", "%{http_code}", "-H", id.as_str(), "-H", "x-user: alice", url.as_str()];
        for h in headers {
            args.extend(["-H", h]);
        }
        let out = c.lab.run_in_pod("n1p1", "curl", &args).expect("curl");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // The Telemetry reaches both nodes, and spans reach the collector (flushed every second).
    let mut n = 0;
    let mut spans = Vec::new();
    let took = eventually("a four-span trace at the collector", Duration::from_secs(20), || {
        n += 1;
        let id = format!("e2e-first-{n}");
        let (status, body) = call(&id, &[]);
        assert_eq!(status, "200", "{body}");
        std::thread::sleep(Duration::from_millis(1500));
        spans = chain(&traces(), &id).unwrap_or_default();
        spans.len() == 4
    });
    println!("first complete trace after {took:?} ({n} requests)");
    let kinds: Vec<&str> = spans.iter().map(|s| s["kind"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["CLIENT", "SERVER", "CLIENT", "SERVER"], "{spans:#?}");
    let trace_id = spans[0]["traceId"].as_str().expect("trace id").to_owned();
    assert!(spans.iter().all(|s| s["traceId"] == trace_id.as_str()), "one trace: {spans:#?}");
    assert!(spans[0].get("parentId").is_none(), "curl sent no context: the source node starts the trace");
    let (client, server, client2, server2) = (&spans[0], &spans[1], &spans[2], &spans[3]);
    assert_eq!(tag(client, "upstream_cluster"), format!("outbound|{HTTP_SERVICE_PORT}||whoami.demo.svc.cluster.local"));
    assert_eq!(tag(client, "istio.canonical_service"), "client");
    assert!(tag(client, "node_id").contains("n1"), "{client:#}");
    assert_eq!(tag(server, "upstream_cluster"), format!("inbound|{HTTP_PORT}||"));
    assert_eq!(tag(server, "istio.canonical_service"), "whoami");
    assert_eq!(tag(client2, "upstream_cluster"), format!("outbound|{HTTP_SERVICE_PORT}||helloworld.demo.svc.cluster.local"));
    assert_eq!(tag(client2, "istio.canonical_service"), "whoami");
    assert_eq!(tag(server2, "istio.canonical_service"), "whoami");
    for s in &spans {
        assert_eq!(tag(s, "http.method"), "GET", "{s:#}");
        assert_eq!(tag(s, "http.status_code"), "200", "{s:#}");
        assert_eq!(tag(s, "istio.namespace"), "demo", "{s:#}");
        assert_eq!(tag(s, "cluster"), "lab", "custom literal tag: {s:#}");
        assert_eq!(tag(s, "response_flags"), "-", "{s:#}");
        assert!(s["duration"].as_u64().is_some_and(|d| d > 0), "{s:#}");
    }
    assert_eq!(tag(client, "user"), "alice", "custom header tag");
    assert!(tag(client, "http.url").ends_with(&format!("/call/{VIP_HELLOWORLD}:{HTTP_SERVICE_PORT}/hello")), "{client:#}");
    // The outer hop's spans enclose the inner hop's.
    let end = |s: &Value| s["timestamp"].as_u64().unwrap_or(0) + s["duration"].as_u64().unwrap_or(0);
    assert!(client["timestamp"].as_u64() <= server["timestamp"].as_u64() && end(client) >= end(server), "{spans:#?}");

    // A W3C context from the client is continued: same trace id, the client's span as parent.
    let (tid, sid) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (status, body) = call("e2e-w3c", &[&format!("traceparent: 00-{tid}-{sid}-01")]);
    assert_eq!(status, "200", "{body}");
    let seen: Value = serde_json::from_str(&body).expect("whoami's JSON");
    let downstream = seen["called"]["headers"]["traceparent"].as_str().unwrap_or("");
    assert!(downstream.starts_with(&format!("00-{tid}-")) && downstream.ends_with("-01"), "helloworld saw {downstream:?}");
    let mut w3c = Vec::new();
    eventually("the continued W3C trace", Duration::from_secs(10), || {
        w3c = chain(&traces(), "e2e-w3c").unwrap_or_default();
        w3c.len() == 4
    });
    assert_eq!(w3c[0]["traceId"], tid);
    assert_eq!(w3c[0]["parentId"], sid);

    // B3 multi headers (64-bit trace id) are continued too.
    let (b3_trace, b3_span) = ("a3ce929d0e0e4736", "0020000000000001");
    let (status, body) = call("e2e-b3", &[&format!("x-b3-traceid: {b3_trace}"), &format!("x-b3-spanid: {b3_span}"), "x-b3-sampled: 1"]);
    assert_eq!(status, "200", "{body}");
    let mut b3 = Vec::new();
    eventually("the continued B3 trace", Duration::from_secs(10), || {
        b3 = chain(&traces(), "e2e-b3").unwrap_or_default();
        b3.len() == 4
    });
    assert!(b3[0]["traceId"].as_str().unwrap_or("").ends_with(b3_trace), "{b3:#?}");
    assert_eq!(b3[0]["parentId"], b3_span);

    // "Not sampled" is honoured at every hop: no span, and the decision travels on.
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let (status, body) = call("e2e-unsampled", &[&format!("traceparent: 00-{unsampled}-{sid}-00")]);
    assert_eq!(status, "200", "{body}");
    let seen: Value = serde_json::from_str(&body).expect("whoami's JSON");
    let downstream = seen["called"]["headers"]["traceparent"].as_str().unwrap_or("");
    assert!(downstream.starts_with(&format!("00-{unsampled}-")) && downstream.ends_with("-00"), "helloworld saw {downstream:?}");
    std::thread::sleep(Duration::from_millis(2500));
    let all = traces();
    assert!(!all.iter().flatten().any(|s| s["traceId"] == unsampled), "an unsampled request was reported");

    exporters_counted(&c);

    // Removing the Telemetry stops tracing at once, also on the pooled connections between the
    // nodes that carried the traced requests (their stacks follow the config, not the moment they
    // were opened).
    c.delete_policy("tracing").expect("delete");
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..4 {
        let (status, body) = call(&format!("e2e-off-{i}"), &[]);
        assert_eq!(status, "200", "{body}");
    }
    std::thread::sleep(Duration::from_millis(2500));
    let all = traces();
    let late: Vec<&Value> = all.iter().flatten().filter(|s| tag(s, "guid:x-request-id").starts_with("e2e-off-")).collect();
    assert!(late.is_empty(), "spans after the Telemetry was removed: {late:#?}");
}

/// Both exporters counted what they sent, and dropped nothing.
fn exporters_counted(c: &mesh_tests::cluster::Cluster) {
    for node in [1, 2] {
        let metrics = c.curl_on_node(node, &format!("http://127.0.0.1:{METRICS_PORT}/metrics")).unwrap_or_default();
        let exported: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("mesh_trace_spans_exported_total{") && l.contains("provider=\"zipkin\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(exported > 0, "node {node} exported no span: {}", metrics.lines().filter(|l| l.contains("mesh_trace")).collect::<Vec<_>>().join("\n"));
        assert!(!metrics.lines().any(|l| l.starts_with("mesh_trace_spans_dropped_total{") && !l.ends_with(" 0")), "node {node} dropped spans");
    }
}
