//! The node's control-plane client against the real mesh-control server, in process: file-mode
//! state in, the node's `State` out over mutual TLS with a node certificate bootstrapped from the
//! node token; live changes; NACK-free apply; certificates from the controller's CA over gRPC;
//! node certificate renewal under a live stream; a controller that goes silent (deadlines and
//! keepalive). Unprivileged (loopback, port 0).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_control::{
    auth::{Authenticator, NodeIds},
    ca::Ca,
    filemode,
    metrics::Metrics as ControlMetrics,
    server::{Server, Shared},
    snapshot::Publisher,
};
use mesh_node::{
    control::{Config, ConfigClient, Connection, Deadlines, GrpcCa, Metrics},
    identity::{CaClient, CertMetrics, CertStore, Identity},
    state::{Protocol, State},
};
use prometheus_client::registry::Registry;

const CLUSTER: &str = "
apiVersion: lab.mesh.dev/v1alpha1
kind: Node
metadata: {name: n1}
spec: {address: 198.18.0.1}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Node
metadata: {name: n2}
spec: {address: 198.18.0.2}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Namespace
metadata: {name: demo, labels: {mesh.dev/dataplane-mode: ambient}}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {node: n1, serviceAccount: client, addresses: [198.18.1.11]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: whoami-2, namespace: demo, labels: {app: whoami}}
spec: {node: n2, serviceAccount: whoami, addresses: [198.18.2.11]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: whoami, namespace: demo}
spec: {vips: [198.19.0.10], selector: {app: whoami}, ports: [{port: 80, targetPort: 8080}]}
";

const DENY: &str = "
apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: client}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/whoami]}}]}]
";

struct Controller {
    addr: SocketAddr,
    publisher: Publisher,
    dir: tempfile::TempDir,
    root_pem: String,
    metrics: Arc<ControlMetrics>,
}

async fn controller() -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).expect("write");
    std::fs::write(dir.path().join("n1.token"), "secret-n1\n").expect("write");
    let ca = Arc::new(Ca::generate("cluster.local").expect("root"));
    let root_pem = ca.root().cert.clone();
    let publisher = Publisher::new();
    let metrics = Arc::new(ControlMetrics::new(&mut Registry::default()));
    let (state, errors) = filemode::load(dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    publisher.publish(state, errors);
    let shared = Shared {
        publisher: publisher.clone(),
        ca,
        auth: Arc::new(Authenticator::Files { dir: dir.path().to_path_buf() }),
        metrics: metrics.clone(),
        nodes: Default::default(),
        default_ttl: Duration::from_secs(3600),
        node_ids: NodeIds::new("cluster.local", "mesh-system", "mesh-node"),
        node_ttl: Duration::from_secs(3600),
        // Generous: the renewal test bootstraps every second from 127.0.0.1.
        bootstrap_limit: Arc::new(mesh_l7::per_source::PerSource::new(mesh_l7::per_source::Rate { burst: 100, per_minute: 600 })),
        views: Default::default(),
    };
    let server = Server::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &["localhost".into()], shared).await.expect("bind");
    let addr = server.local_addr();
    tokio::spawn(server.run());
    Controller { addr, publisher, dir, root_pem, metrics }
}

fn config(c: &Controller, token: &str) -> Config {
    std::fs::write(c.dir.path().join("root.pem"), &c.root_pem).expect("write root");
    std::fs::write(c.dir.path().join("node.token"), token).expect("write token");
    Config {
        address: format!("https://{}", c.addr),
        server_name: "localhost".into(),
        root_cert: c.dir.path().join("root.pem"),
        token_file: c.dir.path().join("node.token"),
        node_name: "n1".into(),
        node_cert_ttl: Duration::ZERO,
        last_config: None,
        deadlines: Deadlines::default(),
    }
}

/// The value of an unlabelled metric in `registry`'s text exposition.
fn metric(registry: &Registry, name: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

async fn wait_for(rx: &mut tokio::sync::watch::Receiver<Arc<State>>, what: &str, f: impl Fn(&State) -> bool) -> Arc<State> {
    wait_within(rx, what, Duration::from_secs(5), f).await
}

async fn wait_within(rx: &mut tokio::sync::watch::Receiver<Arc<State>>, what: &str, limit: Duration, f: impl Fn(&State) -> bool) -> Arc<State> {
    tokio::time::timeout(limit, async {
        loop {
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                return s;
            }
            rx.changed().await.expect("sender alive");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn node_receives_its_view_live_and_certificates_from_the_controller_ca() {
    let c = controller().await;
    let cfg = config(&c, "secret-n1");
    let metrics = Metrics::new(&mut Registry::default());
    let (connection, renewer) = Connection::new(&cfg, &metrics).expect("connection");
    tokio::spawn(renewer.run());
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(State::default()));
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let saved = c.dir.path().join("last-config.pb");
    let client = ConfigClient::new(connection.clone(), "n1", IpAddr::from([198, 18, 0, 1]), "cluster.local", "mesh-system", metrics).saving_to(Some(saved.clone()));
    tokio::spawn(client.run(tx, move || {
        let _ = synced_tx.send(());
    }));
    tokio::time::timeout(Duration::from_secs(5), synced_rx).await.expect("first sync").expect("signal");

    let state = wait_for(&mut rx, "the snapshot", |s| !s.services.is_empty()).await;
    // What a restarted daemon starts from: the applied config, converted the same way.
    let (version, restored) = mesh_node::control::last_config::load_snapshot(&saved, "n1", IpAddr::from([198, 18, 0, 1])).expect("readable and converts").expect("saved after the first update");
    assert!(version >= 1);
    assert_eq!(restored.services.len(), state.services.len(), "the saved config holds the Services");
    let client_w = state.workload(IpAddr::from([198, 18, 1, 11])).expect("own workload");
    assert_eq!((client_w.protocol, &*client_w.node), (Protocol::Hbone, "n1"));
    // A remote pod arrives only as a Service endpoint, and still tells where to tunnel.
    let remote = state.workload(IpAddr::from([198, 18, 2, 11])).expect("remote meshed endpoint");
    assert_eq!((remote.node_ip, &*remote.service_account), (IpAddr::from([198, 18, 0, 2]), "whoami"));
    let svc = &state.services[0];
    assert_eq!((svc.vips[0], svc.ports[0].port, svc.ports[0].target_port), (IpAddr::from([198, 19, 0, 10]), 80, 8080));

    // A policy file appears: the node gets it on the same stream.
    std::fs::write(c.dir.path().join("deny.yaml"), DENY).expect("write policy");
    let (state, errors) = filemode::load(c.dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    c.publisher.publish(state, errors);
    let state = wait_for(&mut rx, "the policy", |s| !s.policies.is_empty()).await;
    assert_eq!(state.policies[0].name, "deny-client");

    // Certificates: the controller's CA signs this node's workload identity.
    let ca: Arc<dyn CaClient> = Arc::new(GrpcCa::new(connection, Duration::from_secs(600)));
    let roots = mesh_node::identity::ca::pem_certs(&c.root_pem);
    let store = CertStore::new(ca, roots.clone(), CertMetrics::new(&mut Registry::default()));
    let identity = Identity::new("cluster.local", "demo", "client");
    let entry = store.fetch(&identity).await.expect("certificate from the controller");
    assert_eq!(entry.cert.roots, roots, "the chain ends at the mesh root");
    // Requested 10 min (the CA backdates not_before for clock skew, so measure from now).
    let left = entry.cert.not_after.duration_since(std::time::SystemTime::now()).expect("not expired");
    assert!((Duration::from_secs(540)..=Duration::from_secs(660)).contains(&left), "{left:?} left");
    let stranger = Identity::new("cluster.local", "demo", "whoami");
    assert!(store.fetch(&stranger).await.is_err(), "a workload of another node is refused");
}

#[tokio::test]
async fn a_wrong_credential_never_yields_state() {
    let c = controller().await;
    let cfg = config(&c, "not-the-token");
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (connection, renewer) = Connection::new(&cfg, &metrics).expect("connection");
    tokio::spawn(renewer.run());
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(State::default()));
    let client = ConfigClient::new(connection, "n1", IpAddr::from([198, 18, 0, 1]), "cluster.local", "mesh-system", metrics);
    let task = tokio::spawn(client.run(tx, || {}));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(rx.borrow().workloads.is_empty(), "an unauthenticated node must get nothing");
    assert_eq!(c.metrics.node_certificates_issued.get(), 0);
    assert!(metric(&registry, "mesh_control_node_cert_errors_total") >= 1, "the refusals are counted");
    task.abort();
}

#[tokio::test]
async fn node_certificate_renews_at_half_life_and_the_stream_moves_to_it() {
    let c = controller().await;
    // 2 s certificates: renewed every ~1 s; the controller ends a stream when the certificate
    // that opened it expires, so updates after a few seconds prove the stream followed.
    let cfg = Config { node_cert_ttl: Duration::from_secs(2), ..config(&c, "secret-n1") };
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (connection, renewer) = Connection::new(&cfg, &metrics).expect("connection");
    tokio::spawn(renewer.run());
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(State::default()));
    let client = ConfigClient::new(connection.clone(), "n1", IpAddr::from([198, 18, 0, 1]), "cluster.local", "mesh-system", metrics);
    tokio::spawn(client.run(tx, || {}));
    wait_for(&mut rx, "the snapshot", |s| !s.services.is_empty()).await;

    tokio::time::sleep(Duration::from_millis(4500)).await;
    let issued = c.metrics.node_certificates_issued.get();
    // Half of a 2 s lifetime (whole seconds in X.509): at least every second.
    assert!(issued >= 4, "renewed at half-life: {issued} node certificates in ~5 s");
    std::fs::write(c.dir.path().join("deny.yaml"), DENY).expect("write policy");
    let (state, errors) = filemode::load(c.dir.path(), "mesh-system");
    c.publisher.publish(state, errors);
    wait_for(&mut rx, "a policy published after the first certificates expired", |s| !s.policies.is_empty()).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    let expiry = metric(&registry, "mesh_control_node_cert_expiry_timestamp_seconds");
    assert!((now..=now + 3).contains(&expiry), "the current node certificate's expiry: {expiry} vs now {now}");

    // Workload certificates keep coming over the current channel.
    let store = CertStore::new(Arc::new(GrpcCa::new(connection, Duration::from_mins(10))), vec![], CertMetrics::new(&mut Registry::default()));
    store.fetch(&Identity::new("cluster.local", "demo", "client")).await.expect("certificate after renewals");
}

/// A node's view larger than gRPC's 4 MiB message limit (thousands of Services with ten
/// endpoints each) reaches the node whole: the controller sends it in parts, the node applies
/// them as one update.
#[tokio::test]
async fn a_view_larger_than_one_grpc_message_arrives_in_parts_and_applies_whole() {
    use std::fmt::Write as _;
    const SERVICES: usize = 6_000;
    let c = controller().await;
    // One file per 500 Services: file mode reads at most 1,024 documents from one file.
    let mut yaml = String::new();
    let mut file = 0;
    for i in 0..10 {
        let _ = write!(
            yaml,
            "---\napiVersion: lab.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: big-{i}, namespace: demo, labels: {{app: big}}}}\nspec: {{node: n2, serviceAccount: big, addresses: [198.18.3.{}]}}\n",
            i + 1
        );
    }
    for i in 0..SERVICES {
        let _ = write!(
            yaml,
            "---\napiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: big-{i}, namespace: demo}}\nspec: {{vips: [198.20.{}.{}], selector: {{app: big}}, ports: [{{port: 80, targetPort: 8080}}, {{port: 443, targetPort: 8443}}]}}\n",
            i / 250,
            i % 250 + 1
        );
        if i % 500 == 499 {
            std::fs::write(c.dir.path().join(format!("big-{file}.yaml")), std::mem::take(&mut yaml)).expect("write");
            file += 1;
        }
    }
    std::fs::write(c.dir.path().join("big-last.yaml"), yaml).expect("write");
    let (state, errors) = filemode::load(c.dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    let view = mesh_control::view::node_view(&state, "n1", "cluster.local");
    let bytes: usize = view.values().map(prost::Message::encoded_len).sum();
    assert!(bytes > 4 << 20, "the view must not fit one message for this test to mean anything: {bytes} bytes");
    c.publisher.publish(state, errors);

    let cfg = config(&c, "secret-n1");
    let metrics = Metrics::new(&mut Registry::default());
    let (connection, renewer) = Connection::new(&cfg, &metrics).expect("connection");
    tokio::spawn(renewer.run());
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(State::default()));
    let client = ConfigClient::new(connection, "n1", IpAddr::from([198, 18, 0, 1]), "cluster.local", "mesh-system", metrics);
    tokio::spawn(client.run(tx, || {}));
    let state = wait_for(&mut rx, "the large view", |s| s.services.len() == SERVICES + 1).await;
    let big = state.services.iter().find(|s| s.name == "big-5999").expect("the last Service");
    assert_eq!(big.ports.len(), 2);
    assert_eq!(c.metrics.nacks.get(), 0);
}

/// A TCP proxy to a controller that can go silent: [`Silent::freeze`] stops moving bytes on
/// every connection open at that moment, both ways, without closing them — what a node sees
/// when the controller's host dies or is cut off (no FIN, no RST). Later connections pass.
struct Silent {
    addr: SocketAddr,
    /// Connections accepted so far (numbered from 1).
    accepted: Arc<AtomicU64>,
    /// Connections numbered up to this are frozen.
    frozen: tokio::sync::watch::Sender<u64>,
}

impl Silent {
    async fn to(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let frozen = tokio::sync::watch::Sender::new(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let (count, freezes) = (accepted.clone(), frozen.clone());
        tokio::spawn(async move {
            loop {
                let (down, _) = listener.accept().await.expect("accept");
                let id = count.fetch_add(1, Ordering::SeqCst) + 1;
                let up = tokio::net::TcpStream::connect(upstream).await.expect("connect to the controller");
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(Self::pump(id, dr, uw, freezes.subscribe()));
                tokio::spawn(Self::pump(id, ur, dw, freezes.subscribe()));
            }
        });
        Self { addr, accepted, frozen }
    }

    /// Copies until the connection ends or is frozen; a frozen one is held open, silent.
    async fn pump(id: u64, mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, mut frozen: tokio::sync::watch::Receiver<u64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 << 10];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(n) if n > 0 => if w.write_all(&buf[..n]).await.is_err() { return },
                    _ => return,
                },
                now = async { frozen.wait_for(|&f| f >= id).await.is_ok() } => if now { break },
            }
        }
        // Both halves stay owned here: no FIN, no RST.
        std::future::pending::<()>().await;
        drop((r, w));
    }

    /// Every connection open now goes silent.
    fn freeze(&self) {
        self.frozen.send_replace(self.accepted.load(Ordering::SeqCst));
    }
}

/// A node whose controller connection goes silent (the controller's host gone without a FIN)
/// notices within its keepalive bound, reconnects, and gets the changes made meanwhile. Without
/// PINGs an idle config stream would wait on the dead connection forever.
#[tokio::test]
async fn a_silent_controller_connection_is_left_at_the_keepalive_bound_and_the_stream_reconnects() {
    let c = controller().await;
    let proxy = Silent::to(c.addr).await;
    let deadlines = Deadlines { call: Duration::from_secs(15), keepalive_interval: Duration::from_secs(1), keepalive_timeout: Duration::from_secs(1) };
    let cfg = Config { address: format!("https://{}", proxy.addr), deadlines, ..config(&c, "secret-n1") };
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (connection, renewer) = Connection::new(&cfg, &metrics).expect("connection");
    tokio::spawn(renewer.run());
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(State::default()));
    let client = ConfigClient::new(connection, "n1", IpAddr::from([198, 18, 0, 1]), "cluster.local", "mesh-system", metrics);
    tokio::spawn(client.run(tx, || {}));
    wait_for(&mut rx, "the snapshot", |s| !s.services.is_empty()).await;

    proxy.freeze();
    let frozen = std::time::Instant::now();
    std::fs::write(c.dir.path().join("deny.yaml"), DENY).expect("write policy");
    let (state, errors) = filemode::load(c.dir.path(), "mesh-system");
    c.publisher.publish(state, errors);
    // One PING interval, its timeout, the reconnect's backoff (200 ms, jittered), a new stream.
    wait_within(&mut rx, "the policy over a new connection", Duration::from_secs(8), |s| !s.policies.is_empty()).await;
    let took = frozen.elapsed();
    assert!(metric(&registry, "mesh_control_stream_breaks_total") >= 1, "the break is counted");
    assert!(proxy.accepted.load(Ordering::SeqCst) >= 2, "a new connection carried the update");
    println!("silent connection left and the update received {took:?} after the freeze");
}

/// A call the controller never answers fails at the call deadline, counted, instead of holding
/// the certificate request until the connection is found dead.
#[tokio::test]
async fn a_certificate_request_the_controller_never_answers_fails_at_the_call_deadline() {
    let c = controller().await;
    let proxy = Silent::to(c.addr).await;
    // A keepalive far beyond the test: only the call deadline can end the call.
    let deadlines = Deadlines { call: Duration::from_secs(1), keepalive_interval: Duration::from_mins(10), keepalive_timeout: Duration::from_mins(10) };
    let cfg = Config { address: format!("https://{}", proxy.addr), deadlines, ..config(&c, "secret-n1") };
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (connection, renewer) = Connection::new(&cfg, &metrics).expect("connection");
    tokio::spawn(renewer.run());
    let ca = GrpcCa::new(connection, Duration::from_mins(10));
    let client = Identity::new("cluster.local", "demo", "client");
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr").der().clone();
    ca.sign(&client, csr.clone()).await.expect("answered while the connection lives");

    proxy.freeze();
    let asked = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), ca.sign(&client, csr)).await.expect("the call ends by itself").expect_err("no answer");
    let took = asked.elapsed();
    assert!(err.to_string().contains("MESH_CONTROL_CALL_TIMEOUT_SECS"), "the error names the setting: {err}");
    assert!((Duration::from_secs(1)..Duration::from_secs(3)).contains(&took), "at the deadline: {took:?}");
    assert_eq!(metric(&registry, "mesh_control_call_timeouts_total"), 1);
}
