//! Two daemons in one process on loopback addresses: node 1 (127.0.0.1) and node 2 (127.0.0.4),
//! pods as loopback addresses (a = 127.0.0.2 and c = 127.0.0.5 on node 1, b = 127.0.0.3 on node
//! 2), one test CA, config fed through a watch channel. The capture (`SO_ORIGINAL_DST`) needs root
//! and iptables, so tests hand accepted sockets to the outbound handler with the destination
//! the datapath would have recovered; everything after that is the real code path.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_node::{
    app::{self, Bound},
    authz::{PeerAuthentication, Policy},
    config::Source,
    identity::TestCa,
    proxy::HboneDial,
    state::{Endpoint, Protocol, Service, ServicePort, ServiceProtocol, Snapshot, State, StateTx, Workload},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

pub const TD: &str = "cluster.local";
pub const ROOT_NS: &str = "istio-system";
pub const N1: &str = "127.0.0.1";
pub const N2: &str = "127.0.0.4";
pub const A: &str = "127.0.0.2";
pub const B: &str = "127.0.0.3";
pub const C: &str = "127.0.0.5";

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

pub fn workload(name: &str, addr: &str, node: &str, node_ip: &str) -> Workload {
    Workload {
        name: format!("{name}-0").into(),
        namespace: "default".into(),
        service_account: name.into(),
        workload_name: Some(name.into()),
        ip: ip(addr),
        node: node.into(),
        node_ip: ip(node_ip),
        labels: BTreeMap::from([("app".into(), name.into())]).into(),
        protocol: Protocol::Hbone,
        locality: None,
    }
}

/// A Service `name` with one endpoint at `addr`, its port 80 served on `target_port`.
pub fn service(name: &str, addr: &str, target_port: u16) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![ip("198.19.0.99")],
        ports: vec![ServicePort { name: String::new(), port: 80, protocol: ServiceProtocol::Tcp, target_port, app_protocol: None }],
        endpoints: vec![Endpoint {
            address: ip(addr),
            ports: BTreeMap::new(),
            healthy: true,
            node: "n2".into(),
            node_address: None,
            meshed: true,
            identity: None,
            subsets: Vec::new(),
            locality: None,
        }],
    }
}

pub fn snapshot(policies: Vec<Policy>, pas: Vec<PeerAuthentication>) -> Snapshot {
    Snapshot {
        workloads: vec![workload("a", A, "n1", N1), workload("b", B, "n2", N2), workload("c", C, "n1", N1)],
        policies,
        peer_authentications: pas,
        ..Snapshot::default()
    }
}

pub fn state(snap: Snapshot) -> Arc<State> {
    Arc::new(State::build(TD, ROOT_NS, snap).expect("state"))
}

struct Vars(Vec<(&'static str, String)>);

impl Source for Vars {
    fn get(&self, key: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    }
}

pub struct Node {
    pub bound: Bound,
    pub state: StateTx,
}

pub struct Mesh {
    pub n1: Node,
    pub n2: Node,
    pub ca: Arc<TestCa>,
}

/// Knobs a test may change before the daemons start.
pub struct Opts {
    pub max_streams: usize,
    pub idle: Duration,
    pub cert_ttl: Duration,
    pub drain_deadline: Duration,
    pub dial: HboneDial,
    pub handshake_timeout: Duration,
    pub connection_limits: mesh_node::proxy::accept::Limits,
    pub tcp_idle: Option<Duration>,
    pub http_header_timeout: Option<Duration>,
    pub admin_token_file: Option<std::path::PathBuf>,
    pub hbone_rate: Option<mesh_l7::per_source::Rate>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            max_streams: 100,
            idle: Duration::from_mins(1),
            cert_ttl: Duration::from_hours(1),
            drain_deadline: Duration::from_secs(5),
            dial: HboneDial::Pod,
            handshake_timeout: Duration::from_secs(10),
            connection_limits: mesh_node::proxy::Config::default().connection_limits,
            tcp_idle: mesh_node::proxy::Config::default().tcp_idle_timeout,
            http_header_timeout: mesh_node::proxy::Config::default().http_header_timeout,
            admin_token_file: None,
            hbone_rate: mesh_node::proxy::Config::default().hbone_handshake_rate,
        }
    }
}

pub async fn node(name: &str, node_ip: &str, hbone_port: u16, ca: &Arc<TestCa>, snap: Snapshot, o: &Opts) -> Node {
    let any = |port: u16| format!("{node_ip}:{port}");
    let vars = Vars(vec![
        ("MESH_OUTBOUND_ADDR", any(0)),
        // Node 2's HBONE listener takes every loopback address, so node 1 can dial pod b's
        // address (127.0.0.3) as ztunnel would; on a real node, policy routing does that.
        ("MESH_INBOUND_ADDR", if name == "n2" { "0.0.0.0:0".into() } else { any(0) }),
        ("MESH_INBOUND_PLAINTEXT_ADDR", any(0)),
        ("MESH_METRICS_ADDR", any(0)),
        ("MESH_ADMIN_ADDR", any(0)),
    ]);
    let mut cfg = app::Config::from_source(&vars, name).expect("config");
    cfg.proxy.hbone_port = hbone_port;
    cfg.proxy.max_streams_per_conn = o.max_streams;
    cfg.proxy.pool_idle_timeout = o.idle;
    cfg.drain_deadline = o.drain_deadline;
    cfg.proxy.hbone_dial = o.dial;
    cfg.proxy.handshake_timeout = o.handshake_timeout;
    cfg.proxy.connection_limits = o.connection_limits;
    cfg.proxy.tcp_idle_timeout = o.tcp_idle;
    cfg.proxy.http_header_timeout = o.http_header_timeout;
    cfg.admin_token_file.clone_from(&o.admin_token_file);
    cfg.proxy.hbone_handshake_rate = o.hbone_rate;
    cfg.trust_domain = TD.into();
    let (tx, rx) = watch::channel(state(snap));
    let bound = app::build(&cfg, ca.clone(), vec![ca.root()], rx, None).await.expect("daemon starts");
    Node { bound, state: tx }
}

impl Mesh {
    pub async fn start(snap: Snapshot, o: Opts) -> Self {
        let ca = Arc::new(TestCa::generate(o.cert_ttl).expect("ca"));
        // Node 2 first: node 1 dials node 2's HBONE port.
        let n2 = node("n2", N2, 0, &ca, snap.clone(), &o).await;
        let n1 = node("n1", N1, n2.bound.inbound.port(), &ca, snap, &o).await;
        Self { n1, n2, ca }
    }

    /// Pushes a new config to both daemons.
    pub fn update(&self, snap: &Snapshot) {
        self.n1.state.send_replace(state(snap.clone()));
        self.n2.state.send_replace(state(snap.clone()));
    }
}

/// A pod's TCP server: echoes what it reads; counts accepted connections.
pub struct EchoPod {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

pub async fn echo_pod(addr: &str) -> EchoPod {
    let listener = TcpListener::bind((ip(addr), 0)).await.expect("bind pod");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let local = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    EchoPod { addr: local, accepted }
}

/// A connection from pod `src` to `dst`, "captured" into `node`'s outbound: returns the pod's
/// end of the socket, whose other end the outbound handler is proxying.
pub async fn dial_via(node: &Node, src: &str, dst: SocketAddr) -> TcpStream {
    let capture = TcpListener::bind((ip(src), 0)).await.expect("capture listener");
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(ip(src), 0)).expect("bind client to the pod address");
    let (client, accepted) = tokio::join!(sock.connect(capture.local_addr().expect("addr")), capture.accept());
    let (server_side, peer) = accepted.expect("accept");
    let handler = node.bound.outbound_handler.clone();
    tokio::spawn(async move {
        let _ = handler.proxy(server_side, peer, dst).await;
    });
    client.expect("connect")
}

/// Writes `data`, half-closes, reads everything back. A refused connection may end in a reset
/// rather than EOF; either way the caller sees what arrived before it.
pub async fn echo_round_trip(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let (back, ()) = tokio::join!(
        async {
            let mut back = Vec::new();
            let _ = r.read_to_end(&mut back).await;
            back
        },
        async {
            if w.write_all(data).await.is_ok() {
                let _ = w.shutdown().await;
            }
        }
    );
    back
}

/// Waits (up to 5 s) for the daemon to end `s` without sending anything, and checks that it did
/// so at `timeout` after `started`: not before, nor much later.
pub async fn ends_at_timeout(s: &mut TcpStream, started: std::time::Instant, timeout: Duration) {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("the connection ends");
    assert!(matches!(read, Ok(0) | Err(_)), "nothing is sent before the end: {read:?}");
    let waited = started.elapsed();
    assert!(waited >= timeout - Duration::from_millis(100) && waited < timeout * 4, "ended after {waited:?}");
}

/// A TCP connection to `target` from the loopback address `src`.
pub async fn connect_from(src: &str, target: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(ip(src), 0)).expect("bind");
    sock.connect(target).await.expect("connect")
}

/// Whether the daemon closes `s` within a second: a connection refused at accept gets EOF or a
/// reset at once; an admitted one waits for its TLS handshake (10 s).
pub async fn closed_within_a_second(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 8];
    matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

/// Writes a little and expects to read it back on a connection kept open.
pub async fn ping(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.expect("echo in time").expect("read");
    assert_eq!(buf, msg);
}

/// A GET over plain HTTP/1.1 to a daemon's metrics or admin port.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_request_with(addr, method, path, &[]).await
}

pub async fn http_request_with(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// The value of the first sample line containing every needle.
pub fn sample(metrics: &str, needles: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls until `f` is true (metrics are recorded when a connection closes, asynchronously).
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}
