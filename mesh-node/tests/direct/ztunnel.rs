//! Wire compatibility with Istio's ztunnel, checked against the rules ztunnel's code applies
//! (read in istio/ztunnel: `tls/workload.rs`, `proxy/inbound.rs`, `proxy/h2/client.rs`). No
//! ztunnel binary can be fetched on this machine (only package registries are reachable), so
//! each test plays the ztunnel side with independent code (rustls + hyper directly):
//!
//! - ztunnel as the *server*: it is reached at the destination pod's address on 15008, picks its
//!   certificate by the address the connection reached (a ztunnel client sends no SNI), requires
//!   a client certificate from the mesh root, speaks HTTP/2 (ALPN h2), and accepts a CONNECT only
//!   when the `:authority` IP is the address dialed;
//! - ztunnel as the *client*: it dials the pod's address without SNI, presents its workload's
//!   certificate, verifies the server's SPIFFE identity, and sends CONNECT with `baggage`,
//!   `traceparent` and `forwarded: for="<ip>:<port>"` (quoted, with the port, as a real ztunnel
//!   was measured to send), which the node reads as the client's address.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_node::{
    identity::{CaClient as _, Identity, TestCa},
    proxy::HboneDial,
    state::Workload,
    tls,
};
use rustls::{
    RootCertStore, ServerConfig,
    server::{Acceptor, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket},
};

use crate::support::*;

/// A workload certificate from the test CA: (chain, key) for rustls.
async fn workload_cert(ca: &TestCa, id: &Identity) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr");
    let signed = ca.sign(id, csr.der().clone()).await.expect("signed");
    (signed.chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

fn identity(w: &Workload) -> Identity {
    Identity::new(TD, &w.namespace, &w.service_account)
}

/// What the fake ztunnel inbound saw of one connection.
#[derive(Debug, Default, Clone)]
struct Seen {
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
    client_identity: Option<Identity>,
    local: Option<SocketAddr>,
    authority: Option<String>,
    status: Option<StatusCode>,
}

/// A ztunnel-shaped HBONE server for workload `served` at `listener`'s address.
fn fake_ztunnel_inbound(listener: TcpListener, ca: Arc<TestCa>, served: Identity) -> Arc<Mutex<Vec<Seen>>> {
    fake_inbound(listener, ca, served, true)
}

/// [`fake_ztunnel_inbound`], or (`answer` false) one that takes the CONNECT and never answers.
fn fake_inbound(listener: TcpListener, ca: Arc<TestCa>, served: Identity, answer: bool) -> Arc<Mutex<Vec<Seen>>> {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let (chain, key) = workload_cert(&ca, &served).await;
        let mut roots = RootCertStore::empty();
        roots.add(ca.root()).expect("root");
        let provider = tls::provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().expect("verifier");
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("cert");
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        while let Ok((tcp, _)) = listener.accept().await {
            let (cfg, log) = (cfg.clone(), log.clone());
            tokio::spawn(async move {
                let mut s = Seen { local: tcp.local_addr().ok(), ..Seen::default() };
                let start = tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), tcp).await.expect("client hello");
                s.sni = start.client_hello().server_name().map(str::to_owned);
                s.alpn = start.client_hello().alpn().map(|a| a.map(<[u8]>::to_vec).collect()).unwrap_or_default();
                let tls = start.into_stream(cfg).await.expect("handshake");
                s.client_identity = tls.get_ref().1.peer_certificates().and_then(|c| tls::identity_of(&c[0]).ok());
                let conn_seen = Arc::new(Mutex::new(s));
                let svc_seen = conn_seen.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (seen, log) = (svc_seen.clone(), log.clone());
                    async move {
                        let mut s = seen.lock().expect("lock").clone();
                        s.authority = req.uri().authority().map(ToString::to_string);
                        // ztunnel's validate_destination: the CONNECT target must be the
                        // address this connection reached.
                        let target_ip = s.authority.as_deref().and_then(|a| a.parse::<SocketAddr>().ok()).map(|a| a.ip());
                        let ok = req.method() == Method::CONNECT && target_ip.is_some() && target_ip == s.local.map(|l| l.ip());
                        let code = if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST };
                        s.status = Some(code);
                        log.lock().expect("lock").push(s);
                        if !answer {
                            std::future::pending::<()>().await;
                        }
                        if ok {
                            tokio::spawn(async move {
                                if let Ok(up) = hyper::upgrade::on(req).await {
                                    let mut io = TokioIo::new(up);
                                    let mut buf = vec![0u8; 64 << 10];
                                    while let Ok(n) = io.read(&mut buf).await {
                                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                    let _ = io.shutdown().await;
                                }
                            });
                        }
                        let mut r = Response::new(Empty::<Bytes>::new());
                        *r.status_mut() = code;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_outbound_meets_a_ztunnel_inbound_at_the_pod_address_without_sni() {
    let ca = Arc::new(TestCa::generate(Duration::from_hours(1)).expect("ca"));
    let snap = snapshot(vec![], vec![]);
    let b = snap.workloads.iter().find(|w| w.ip == ip(B)).expect("b").clone();
    // "ztunnel" on node 2 listens at pod b's address, as its in-pod listener does.
    let listener = TcpListener::bind((ip(B), 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = fake_ztunnel_inbound(listener, ca.clone(), identity(&b));
    let n1 = node("n1", N1, port, &ca, snap.clone(), &Opts::default()).await;

    let app = SocketAddr::new(ip(B), 8080);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let back = echo_round_trip(dial_via(&n1, A, app).await, &data).await;
    assert!(back == data, "bytes through our outbound and the ztunnel-shaped inbound");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.sni, None, "no SNI: ztunnel picks the certificate by the address dialed");
    assert_eq!(s.alpn, vec![b"h2".to_vec()]);
    assert_eq!(s.local, Some(SocketAddr::new(ip(B), port)), "dialed the destination pod's address");
    assert_eq!(s.authority.as_deref(), Some("127.0.0.3:8080"));
    assert_eq!(s.status, Some(StatusCode::OK));
    assert_eq!(s.client_identity.as_ref().map(ToString::to_string).as_deref(), Some("spiffe://cluster.local/ns/default/sa/a"));
}

/// A peer that completes TLS and HTTP/2 and then never answers the CONNECT: the client's
/// connection ends at the timeout (counted) instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_the_peer_never_answers_ends_at_the_timeout() {
    let ca = Arc::new(TestCa::generate(Duration::from_hours(1)).expect("ca"));
    let snap = snapshot(vec![], vec![]);
    let b = snap.workloads.iter().find(|w| w.ip == ip(B)).expect("b").clone();
    let listener = TcpListener::bind((ip(B), 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = fake_inbound(listener, ca.clone(), identity(&b), false);
    let timeout = Duration::from_secs(1);
    let n1 = node("n1", N1, port, &ca, snap, &Opts { handshake_timeout: timeout, ..Opts::default() }).await;
    let started = std::time::Instant::now();
    let mut client = dial_via(&n1, A, SocketAddr::new(ip(B), 8080)).await;
    ends_at_timeout(&mut client, started, timeout).await;
    assert_eq!(seen.lock().expect("lock").len(), 1, "the CONNECT reached the peer");
    let (_, m) = http_get(n1.bound.metrics, "/metrics").await;
    assert_eq!(sample(&m, &["mesh_handshake_timeouts_total{", "direction=\"outbound\""]), Some(1.0), "{m}");
}

/// Two pods of one identity on node 2 (b at 127.0.0.3, b-1 at 127.0.0.7): open one stream to
/// each from a and count node 1's pooled connections.
async fn connections_for_two_replicas(n1: &Node) -> usize {
    let (b0, b1) = (echo_pod(B).await, echo_pod("127.0.0.7").await);
    let mut s0 = dial_via(n1, A, b0.addr).await;
    let mut s1 = dial_via(n1, A, b1.addr).await;
    ping(&mut s0, b"replica 0").await;
    ping(&mut s1, b"replica 1").await;
    n1.bound.pool.connections()
}

fn with_second_replica() -> mesh_node::state::Snapshot {
    let mut snap = snapshot(vec![], vec![]);
    let mut b1 = workload("b", "127.0.0.7", "n2", N2);
    b1.name = "b-1".into();
    snap.workloads.push(b1);
    snap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_dial_pools_per_pod_and_node_dial_per_node_with_sni() {
    let mesh = Mesh::start(with_second_replica(), Opts::default()).await;
    assert_eq!(connections_for_two_replicas(&mesh.n1).await, 2, "pod mode: one connection per destination pod, as ztunnel");

    let ca = Arc::new(TestCa::generate(Duration::from_hours(1)).expect("ca"));
    // Node 2 listens on its own address only: node-mode connections are answered by SNI.
    let n2 = node("n2", N2, 0, &ca, with_second_replica(), &Opts::default()).await;
    let opts = Opts { dial: HboneDial::Node, ..Opts::default() };
    let n1 = node("n1", N1, n2.bound.inbound.port(), &ca, with_second_replica(), &opts).await;
    assert_eq!(connections_for_two_replicas(&n1).await, 1, "node mode: both replicas share one connection");
}

/// A ztunnel-shaped HBONE client: dials `hbone` from `src` without SNI as workload `client`,
/// expects the server to be `expected`, and sends one CONNECT to `target`.
async fn ztunnel_connect(
    ca: &TestCa,
    src: IpAddr,
    hbone: SocketAddr,
    client: &Identity,
    expected: &Identity,
    targets: &[SocketAddr],
) -> Vec<(StatusCode, Option<Vec<u8>>)> {
    let (chain, key) = workload_cert(ca, client).await;
    let key = tls::provider().key_provider.load_private_key(key).expect("key");
    let cfg = tls::client_config(Arc::new(CertifiedKey::new(chain, key)), &[ca.root()], expected.clone()).expect("client config");
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(src, 0)).expect("bind the source pod's address");
    let tcp = sock.connect(hbone).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(ServerName::IpAddress(hbone.ip().into()), tcp).await.expect("handshake");
    let served = tls.get_ref().1.peer_certificates().map(|c| tls::identity_of(&c[0]).expect("spiffe"));
    assert_eq!(served.as_ref(), Some(expected), "the server presented the dialed pod's identity");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for target in targets {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .version(http::Version::HTTP_2)
            .header("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=a,service.name=a")
            .header("traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01")
            .header("forwarded", format!("for=\"{src}:40123\""))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let code = resp.status();
        let echoed = if code == StatusCode::OK {
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgrade"));
            io.write_all(b"hello from ztunnel").await.expect("write");
            let mut buf = vec![0u8; 18];
            io.read_exact(&mut buf).await.expect("echo");
            Some(buf)
        } else {
            None
        };
        out.push((code, echoed));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_client_dialing_the_pod_address_is_served_with_that_pods_identity() {
    let mut snap = snapshot(vec![], vec![]);
    // A second pod on node 2 with another identity: a stream for it must not ride on a
    // connection that authenticated pod b.
    snap.workloads.push(workload("d", "127.0.0.6", "n2", N2));
    let mesh = Mesh::start(snap.clone(), Opts::default()).await;
    let (pod_b, pod_d) = (echo_pod(B).await, echo_pod("127.0.0.6").await);
    let who = |name: &str| identity(snap.workloads.iter().find(|w| *w.service_account == *name).expect("workload"));
    let hbone = SocketAddr::new(ip(B), mesh.n2.bound.inbound.port());
    let ca = mesh.ca.clone();
    let results = ztunnel_connect(&ca, ip(A), hbone, &who("a"), &who("b"), &[pod_b.addr, pod_d.addr]).await;
    assert_eq!(results[0], (StatusCode::OK, Some(b"hello from ztunnel".to_vec())));
    assert_eq!(results[1].0, StatusCode::MISDIRECTED_REQUEST, "pod d's stream on pod b's connection");
    assert_eq!(pod_d.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    let (_, m) = http_get(mesh.n2.bound.metrics, "/metrics").await;
    let labels = ["istio_tcp_connections_opened_total{", "reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/default/sa/a\"", "destination_workload=\"b\""];
    assert_eq!(sample(&m, &labels), Some(1.0), "{m}");
}
