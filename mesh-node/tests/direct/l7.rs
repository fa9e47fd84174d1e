//! HTTP through two daemons in process: a client pod on node 1 speaks HTTP/1.1 or HTTP/2 to a
//! Service whose port is HTTP; node 1 routes each request and picks an endpoint (pod b on node
//! 2 through HBONE, or pod c on node 1 directly); node 2 parses the requests inside the HBONE
//! stream, authorizes them and reports them. Pods are real HTTP servers (hyper).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_l7::{
    body::{self, Body},
    route::{
        Action, Backend, HeaderModifier, PathModifier, Route, RouteSource, RouteTable, SourceKind, Timeouts, UrlRewrite,
        matching::{HeaderMatch, RouteMatch, StringMatch},
    },
};
use mesh_node::{
    authz::{Action as AuthzAction, Destination, Policy, Rule},
    state::{Endpoint, Service, ServicePort, ServiceProtocol, Snapshot},
};

use crate::support::*;

/// What a pod's HTTP server saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub host: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

pub struct HttpPod {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// An HTTP/1.1 + h2c server on `addr` answering `<name> <path>`; `/grpc` answers like a gRPC
/// server (trailers with `grpc-status: 0`); `/slow` waits 2 s.
pub async fn http_pod(addr: &str, name: &'static str) -> HttpPod {
    let listener = tokio::net::TcpListener::bind((ip(addr), 0)).await.expect("bind pod");
    let local = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            let svc = tower::service_fn(move |mut req: Request<Body>| {
                let log = log.clone();
                async move {
                    if req.headers().contains_key(http::header::UPGRADE) {
                        // An echo server once the protocol is switched (what a WebSocket server
                        // does after its handshake).
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp = Response::new(body::empty());
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
                        resp.headers_mut().insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
                        return Ok::<_, Infallible>(resp);
                    }
                    let host = mesh_l7::route::filter::authority(&req).unwrap_or("").to_owned();
                    log.lock().expect("lock").push(Seen { path: req.uri().path().to_owned(), host, version: req.version(), headers: req.headers().clone() });
                    let path = req.uri().path().to_owned();
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    if path == "/grpc" {
                        let frames = futures::stream::iter([
                            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                            Ok(http_body::Frame::trailers({
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", HeaderValue::from_static("0"));
                                t
                            })),
                        ]);
                        let mut resp = Response::new(body::boxed(StreamBody::new(frames)));
                        resp.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
                        return Ok::<_, Infallible>(resp);
                    }
                    // Drain the request body (uploads) before answering.
                    let n = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
                    Ok(Response::new(body::full(format!("{name} {path} {n}"))))
                }
            });
            tokio::spawn(async move {
                let _ = mesh_l7::server::serve(s, svc, &mesh_l7::server::Config::default(), std::future::pending()).await;
            });
        }
    });
    HttpPod { addr: local, seen }
}

const VIP: &str = "198.19.0.80";

fn endpoint(pod: &HttpPod, node: &str, subsets: &[&str]) -> Endpoint {
    Endpoint {
        address: pod.addr.ip(),
        ports: BTreeMap::from([(80, pod.addr.port())]),
        healthy: true,
        node: node.into(),
        node_address: None,
        meshed: true,
        identity: Some(format!("spiffe://{TD}/ns/default/sa/{}", if node == "n2" { "b" } else { "c" }).into()),
        subsets: subsets.iter().map(|s| (*s).to_owned()).collect(),
        locality: None,
    }
}

fn web_service(name: &str, vip: &str, port_name: &str, endpoints: Vec<Endpoint>) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![ip(vip)],
        ports: vec![ServicePort { name: port_name.into(), port: 80, protocol: ServiceProtocol::Tcp, target_port: 8080, app_protocol: None }],
        endpoints,
    }
}

fn route(name: &str, matches: Vec<RouteMatch>, action: Action) -> Route {
    Route {
        source: RouteSource { kind: SourceKind::HttpRoute, namespace: "default".into(), name: name.into(), rule: 0, rule_name: None },
        matches,
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
        rewrite: None,
        action,
        mirrors: Vec::new(),
        timeouts: Timeouts::default(),
        retry: None,
        fault: None,
    }
}

fn to(service: &str) -> Action {
    Action::Forward(vec![Backend::service("default", service)])
}

/// Pods b (node 2) and c (node 1) behind Service `web` (HTTP), b alone behind `web-b`.
async fn topology(port_name: &str) -> (Snapshot, HttpPod, HttpPod) {
    let (b, c) = (http_pod(B, "b").await, http_pod(C, "c").await);
    let mut snap = snapshot(vec![], vec![]);
    snap.services = vec![
        web_service("web", VIP, port_name, vec![endpoint(&b, "n2", &["v2"]), endpoint(&c, "n1", &["v1"])]),
        web_service("web-b", "198.19.0.81", port_name, vec![endpoint(&b, "n2", &[])]),
    ];
    (snap, b, c)
}

/// An HTTP/1.1 connection from pod a, captured into node 1's outbound, to the VIP.
async fn h1_client(mesh: &Mesh) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = dial_via(&mesh.n1, A, SocketAddr::new(ip(VIP), 80)).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.expect("HTTP/1.1 handshake");
    tokio::spawn(conn.with_upgrades());
    sender
}

async fn h2_client(mesh: &Mesh) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = dial_via(&mesh.n1, A, SocketAddr::new(ip(VIP), 80)).await;
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await.expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://web.default:80{path}")).header("host", "web.default").body(Full::default()).expect("request")
}

async fn text(resp: Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let b = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_requests_are_balanced_per_request_and_reported_by_both_nodes() {
    let (snap, b, c) = topology("http").await;
    let mesh = Mesh::start(snap, Opts::default()).await;
    let mut client = h1_client(&mesh).await;
    let mut answers = BTreeMap::<String, u32>::new();
    for i in 0..40 {
        client.ready().await.expect("ready");
        let (status, body) = text(client.send_request(get(&format!("/r{i}"))).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK);
        *answers.entry(body.split(' ').next().expect("pod").to_owned()).or_default() += 1;
    }
    assert_eq!(answers.len(), 2, "one client connection, both endpoints answered: {answers:?}");
    assert!(b.seen.lock().expect("lock").iter().all(|s| s.host == "web.default"), "the Host header reached the pod unchanged");
    assert!(c.seen.lock().expect("lock").iter().all(|s| s.version == http::Version::HTTP_11));
    let remote = f64::from(answers["b"]);
    eventually("requests reported by both reporters", async || {
        let (_, m1) = http_get(mesh.n1.bound.metrics, "/metrics").await;
        let (_, m2) = http_get(mesh.n2.bound.metrics, "/metrics").await;
        let src = sample(&m1, &["istio_requests_total{", "reporter=\"source\"", "destination_workload=\"b\"", "response_code=\"200\"", "request_protocol=\"http\""]);
        let dst = sample(&m2, &["istio_requests_total{", "reporter=\"destination\"", "source_workload=\"a\"", "destination_workload=\"b\"", "response_code=\"200\""]);
        src == Some(remote) && dst == Some(remote)
    })
    .await;
    let (_, m1) = http_get(mesh.n1.bound.metrics, "/metrics").await;
    assert!(sample(&m1, &["istio_request_duration_milliseconds_bucket{", "le=\"0.5\"", "reporter=\"source\""]).is_some(), "Istio's duration buckets");
    assert!(sample(&m1, &["istio_requests_total{", "reporter=\"destination\"", "destination_workload=\"c\"", "connection_security_policy=\"mutual_tls\""]).is_some(), "same-node requests reported by the destination side too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_go_out_as_h2_to_an_http2_port_and_grpc_status_is_reported() {
    let (snap, b, _c) = topology("grpc").await;
    let mesh = Mesh::start(snap, Opts::default()).await;
    let client = h2_client(&mesh).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move { text(client.send_request(get(&format!("/s{i}"))).await.expect("response")).await }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").0, StatusCode::OK);
    }
    assert!(b.seen.lock().expect("lock").iter().all(|s| s.version == http::Version::HTTP_2), "gRPC ports get HTTP/2 upstream");
    let mut grpc = get("/grpc");
    grpc.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    let resp = client.clone().send_request(grpc).await.expect("response");
    let trailers = resp.into_body().collect().await.expect("body").trailers().cloned();
    assert_eq!(trailers.and_then(|t| t.get("grpc-status").cloned()), Some(HeaderValue::from_static("0")), "trailers cross both daemons");
    eventually("gRPC request reported with its status", async || {
        let (_, m) = http_get(mesh.n1.bound.metrics, "/metrics").await;
        sample(&m, &["istio_requests_total{", "request_protocol=\"grpc\"", "grpc_response_status=\"0\""]).is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_rewrite_split_and_answer_404_when_nothing_matches() {
    let (mut snap, b, c) = topology("http-web").await;
    let canary = RouteMatch {
        headers: vec![HeaderMatch { name: http::HeaderName::from_static("user-agent"), value: StringMatch::regex(".*Firefox.*").expect("regex"), invert: false }],
        ..RouteMatch::default()
    };
    let mut rewrite = route("rewrite", vec![RouteMatch { path: Some(StringMatch::path_prefix("/old")), ..RouteMatch::default() }], to("web-b"));
    rewrite.rewrite = Some(UrlRewrite { hostname: None, path: Some(PathModifier::Prefix("/new".into())) });
    let subset = Action::Forward(vec![Backend { subset: Some("v1".into()), ..Backend::service("default", "web") }]);
    let mut firefox = route("firefox", vec![canary], to("web-b"));
    firefox.request_headers = HeaderModifier {
        set: vec![(http::HeaderName::from_static("x-canary"), HeaderValue::from_static("firefox"))],
        remove: vec![http::HeaderName::from_static("x-remove-me")],
        ..HeaderModifier::default()
    };
    snap.routes = vec![RouteTable {
        routes: vec![
            firefox,
            rewrite,
            route("api", vec![RouteMatch { path: Some(StringMatch::path_prefix("/api")), ..RouteMatch::default() }], subset),
        ],
        ..RouteTable::default_for("default", "web")
    }];
    let mesh = Mesh::start(snap.clone(), Opts::default()).await;
    let mut client = h1_client(&mesh).await;
    let mut send = async |req: Request<Full<Bytes>>| {
        client.ready().await.expect("ready");
        text(client.send_request(req).await.expect("response")).await
    };
    let mut ff = get("/");
    ff.headers_mut().insert("user-agent", HeaderValue::from_static("Mozilla/5.0 (X11) Gecko/20100101 Firefox/120.0"));
    ff.headers_mut().insert("x-remove-me", HeaderValue::from_static("1"));
    for _ in 0..5 {
        let mut req = get("/");
        req.headers_mut().clone_from(ff.headers());
        assert_eq!(send(req).await.1.split(' ').next(), Some("b"), "Firefox → web-b, every time");
    }
    for _ in 0..5 {
        assert_eq!(send(get("/api/x")).await.1.split(' ').next(), Some("c"), "subset v1 is pod c only");
    }
    assert_eq!(send(get("/old/page")).await.1, "b /new/page 0", "prefix rewritten before the pod saw it");
    let (status, _) = send(get("/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no route matches: 404");
    eventually("404 reported with NR", async || {
        let (_, m) = http_get(mesh.n1.bound.metrics, "/metrics").await;
        sample(&m, &["istio_requests_total{", "response_code=\"404\"", "response_flags=\"NR\""]) == Some(1.0)
    })
    .await;
    assert!(b.seen.lock().expect("lock").iter().any(|s| s.path == "/new/page"));
    let canaries: Vec<Seen> = b.seen.lock().expect("lock").iter().filter(|s| s.path == "/").cloned().collect();
    assert_eq!(canaries.len(), 5);
    assert!(canaries.iter().all(|s| s.headers.get("x-canary").is_some_and(|v| v == "firefox") && !s.headers.contains_key("x-remove-me")), "request header modifier applied");
    assert!(c.seen.lock().expect("lock").iter().all(|s| s.path.starts_with("/api")));

    let (_, dump) = http_get(mesh.n1.bound.admin, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config dump is JSON");
    let sources: Vec<String> = dump["config"]["routes"][0]["routes"].as_array().expect("routes").iter().map(|r| format!("{}/{}", r["source"]["kind"].as_str().unwrap_or("?"), r["source"]["name"].as_str().unwrap_or("?"))).collect();
    assert_eq!(sources, ["HTTPRoute/firefox", "HTTPRoute/rewrite", "HTTPRoute/api"], "the config dump shows each route with the resource it came from");

    // A route change applies to the next request on the same kept-alive connection.
    snap.routes = vec![RouteTable { routes: vec![route("all-to-b", vec![], to("web-b"))], ..RouteTable::default_for("default", "web") }];
    mesh.update(&snap);
    for _ in 0..5 {
        assert_eq!(send(get("/api/x")).await.1.split(' ').next(), Some("b"), "the new table decides");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policy_denies_by_path_with_istios_403_remote_and_same_node() {
    let (mut snap, b, c) = topology("http").await;
    snap.policies = vec![Policy {
        name: "deny-admin".into(),
        namespace: "default".into(),
        selector: None,
        action: AuthzAction::Deny,
        dry_run: false,
        rules: vec![Rule { to: vec![Destination { paths: vec!["/admin*".into()], ..Destination::default() }], ..Rule::default() }],
    }];
    let mesh = Mesh::start(snap, Opts::default()).await;
    let mut client = h1_client(&mesh).await;
    let mut denied = 0;
    for _ in 0..20 {
        client.ready().await.expect("ready");
        let (status, body) = text(client.send_request(get("/admin/users")).await.expect("response")).await;
        assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "RBAC: access denied"));
        denied += 1;
        client.ready().await.expect("ready");
        assert_eq!(text(client.send_request(get("/public")).await.expect("response")).await.0, StatusCode::OK, "other paths pass");
    }
    assert_eq!(denied, 20);
    let reached = |p: &HttpPod| p.seen.lock().expect("lock").iter().filter(|s| s.path.starts_with("/admin")).count();
    assert_eq!(reached(&b) + reached(&c), 0, "no denied request reached a pod");
    assert!(!b.seen.lock().expect("lock").is_empty() && !c.seen.lock().expect("lock").is_empty(), "both the remote and the same-node path were taken");
    eventually("denials counted on both nodes", async || {
        let (_, m1) = http_get(mesh.n1.bound.metrics, "/metrics").await;
        let (_, m2) = http_get(mesh.n2.bound.metrics, "/metrics").await;
        let n1 = sample(&m1, &["mesh_authz_denials_total{", "reason=\"deny_policy\""]).unwrap_or(0.0);
        let n2 = sample(&m2, &["mesh_authz_denials_total{", "reason=\"deny_policy\""]).unwrap_or(0.0);
        (n1 + n2 - 20.0).abs() < f64::EPSILON && sample(&m2, &["istio_requests_total{", "reporter=\"destination\"", "response_code=\"403\""]) == Some(n2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_stream_through_and_a_slow_backend_times_out_with_504() {
    let (mut snap, _b, _c) = topology("http").await;
    let mut slow = route("slow", vec![RouteMatch { path: Some(StringMatch::Exact("/slow".into())), ..RouteMatch::default() }], to("web-b"));
    slow.timeouts.request = Some(Duration::from_millis(300));
    snap.routes = vec![RouteTable { routes: vec![slow, route("rest", vec![], to("web-b"))], ..RouteTable::default_for("default", "web") }];
    let mesh = Mesh::start(snap, Opts::default()).await;
    let s = dial_via(&mesh.n1, A, SocketAddr::new(ip(VIP), 80)).await;
    let (mut client, conn) = hyper::client::conn::http1::handshake::<_, StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>>>(TokioIo::new(s)).await.expect("handshake");
    tokio::spawn(conn);
    // 64 MiB in 1 MiB chunks, streamed: the pod counts what arrived.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..64).map(|_| Ok(http_body::Frame::data(Bytes::from(vec![7u8; 1 << 20])))).collect();
    let req = Request::post("/upload").header("host", "web.default").body(StreamBody::new(futures::stream::iter(chunks))).expect("request");
    let (status, body) = text(client.send_request(req).await.expect("response")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "b /upload 67108864"));
    client.ready().await.expect("ready");
    let req = Request::get("/slow").header("host", "web.default").body(StreamBody::new(futures::stream::iter(Vec::new()))).expect("request");
    let started = std::time::Instant::now();
    let (status, body) = text(client.send_request(req).await.expect("response")).await;
    let took = started.elapsed();
    assert_eq!((status, body.as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"));
    assert!(took >= Duration::from_millis(300) && took <= Duration::from_millis(330), "504 at the configured 300 ms ± 10 %: {took:?}");
    eventually("504 reported with UT", async || {
        let (_, m) = http_get(mesh.n1.bound.metrics, "/metrics").await;
        sample(&m, &["istio_requests_total{", "response_code=\"504\"", "response_flags=\"UT\""]) == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_both_daemons() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (snap, _b, _c) = topology("http").await;
    let mesh = Mesh::start(snap, Opts::default()).await;
    for _ in 0..4 {
        // Several, so both the remote and the same-node endpoint are likely taken.
        let mut client = h1_client(&mesh).await;
        let req = Request::get("/ws")
            .header("host", "web.default")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Full::default())
            .expect("request");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let upgraded = hyper::upgrade::on(resp).await.expect("upgraded");
        let mut io = TokioIo::new(upgraded);
        let big = vec![42u8; 100_000];
        for msg in [&b"hello"[..], &big[..]] {
            io.write_all(msg).await.expect("write");
            let mut back = vec![0; msg.len()];
            tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back)).await.expect("in time").expect("read");
            assert_eq!(back, msg, "bytes echoed through the upgraded connection");
        }
    }
}

/// Not a pass/fail check: prints the in-process cost of a small HTTP/1.1 request (run with
/// `--release --ignored --nocapture`): everything (client, both daemons, pod) shares this one
/// thread, so "mesh − direct" CPU is the daemons' cost per request.
#[tokio::test(flavor = "current_thread")]
#[ignore = "measurement, run explicitly"]
async fn l7_request_cost() {
    let (snap, b, _c) = topology("http").await;
    let mesh = Mesh::start(snap, Opts::default()).await;
    let cpu = || {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
        let f: Vec<f64> = stat.rsplit_once(')').expect("stat").1.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
        (f[11] + f[12]) / 100.0
    };
    const N: u32 = 20_000;
    for (name, via_mesh, vip) in [("direct", false, ""), ("mesh, remote endpoint", true, "198.19.0.81"), ("direct", false, ""), ("mesh, remote endpoint", true, "198.19.0.81")] {
        let s = if via_mesh { dial_via(&mesh.n1, A, SocketAddr::new(ip(vip), 80)).await } else { tokio::net::TcpStream::connect(b.addr).await.expect("connect") };
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.expect("handshake");
        tokio::spawn(conn);
        let (c0, t0) = (cpu(), std::time::Instant::now());
        for _ in 0..N {
            client.ready().await.expect("ready");
            let resp = client.send_request(get("/")).await.expect("response");
            let _ = resp.into_body().collect().await.expect("body");
        }
        let (secs, cpus) = (t0.elapsed().as_secs_f64(), cpu() - c0);
        println!("{name:24} {:7.1} µs/request, {:5.0} requests/s, {:6.1} CPU-µs/request", secs * 1e6 / f64::from(N), f64::from(N) / secs, cpus * 1e6 / f64::from(N));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_clients_reach_http1_backends() {
    let (snap, b, c) = topology("http").await;
    let mesh = Mesh::start(snap, Opts::default()).await;
    let client = h2_client(&mesh).await;
    for i in 0..20 {
        let (status, body) = text(client.clone().send_request(get(&format!("/h{i}"))).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let seen: Vec<Seen> = b.seen.lock().expect("lock").iter().chain(c.seen.lock().expect("lock").iter()).cloned().collect();
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_11 && s.host == "web.default"), "HTTP/1.1 upstream with the authority as Host: {seen:?}");
}

/// A client that trickles a request's headers (a slowloris: a header line every 200 ms) is
/// closed at the header timeout from their first byte, and counted; a kept-alive connection idle
/// for three times that long still serves its next request (idle is not slow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_headers_are_cut_at_their_timeout_while_idle_keepalive_connections_live() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (snap, _b, _c) = topology("http").await;
    let limit = Duration::from_secs(1);
    let mesh = Mesh::start(snap, Opts { http_header_timeout: Some(limit), ..Opts::default() }).await;
    let mut client = h1_client(&mesh).await;
    client.ready().await.expect("ready");
    assert_eq!(text(client.send_request(get("/first")).await.expect("response")).await.0, StatusCode::OK);
    tokio::time::sleep(limit * 3).await;
    client.ready().await.expect("still open after idling");
    assert_eq!(text(client.send_request(get("/after-idle")).await.expect("response")).await.0, StatusCode::OK);

    let slow = dial_via(&mesh.n1, A, SocketAddr::new(ip(VIP), 80)).await;
    let (mut r, mut w) = slow.into_split();
    let started = std::time::Instant::now();
    let trickle = tokio::spawn(async move {
        w.write_all(b"GET / HTTP/1.1\r\nhost: web.default\r\n").await.expect("first bytes");
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if w.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                return i;
            }
        }
        unreachable!()
    });
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await.expect("the daemon ends the connection");
    let took = started.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer: {read:?}");
    assert!((limit - Duration::from_millis(100)..limit * 3).contains(&took), "at the header timeout: {took:?}");
    trickle.abort();
    eventually("the cut counted", async || {
        let (_, m1) = http_get(mesh.n1.bound.metrics, "/metrics").await;
        sample(&m1, &["mesh_http_header_timeouts_total{", "direction=\"outbound\""]) == Some(1.0)
    })
    .await;
}
