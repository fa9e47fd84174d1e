//! The `mesh-control` binary in file mode, as the lab runs it: a config folder made of the
//! deploy/examples files, per-node token files, a real gRPC client per node that bootstraps a
//! node certificate with its token and subscribes over mutual TLS with the root the controller
//! wrote. A policy file swap (allow → deny) and a route change (90/10 → 50/50, then removal)
//! must reach the nodes within one second; a broken file is reported on the status endpoint and
//! changes nothing.

use std::{
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use mesh_control::client;
use mesh_proto::config::v1::{self as pb, config_distribution_client::ConfigDistributionClient};

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill(); // by PID
        let _ = self.0.wait();
    }
}

#[path = "support/ports.rs"]
mod ports;
use ports::free_port;

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples"))
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body.split_once("\r\n\r\n")?.1.to_owned())
}

async fn subscribe(server: &client::Server, node: &str, token: &str) -> (tonic::Streaming<pb::ConfigUpdate>, tokio::sync::mpsc::Sender<pb::NodeMessage>) {
    let channel = server.connect_as(node, token).await.expect("node certificate, then mutual TLS");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Subscribe(pb::Subscribe { node_name: node.into(), last_applied_version: 0 })) })
        .await
        .expect("send");
    let stream = ConfigDistributionClient::new(channel).stream_config(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("subscribed").into_inner();
    (stream, tx)
}

fn action_of(u: &pb::ConfigUpdate) -> Option<i32> {
    u.upserts.iter().find_map(|r| match &r.kind {
        Some(pb::resource::Kind::AuthorizationPolicy(p)) if p.name == "whoami-allow-client" => Some(p.action),
        _ => None,
    })
}

/// A running controller on a config folder (with node tokens for n1 and n2), and its ports.
struct Running {
    _ctl: Controller,
    grpc: u16,
    status: u16,
    state: std::path::PathBuf,
}

async fn start(tmp: &Path, config: &Path) -> Running {
    let state = tmp.join("state");
    std::fs::create_dir_all(state.join("node-tokens")).expect("mkdir");
    for n in ["n1", "n2"] {
        std::fs::write(state.join("node-tokens").join(format!("{n}.token")), format!("secret-{n}\n")).expect("token");
    }
    let (grpc, status) = (free_port(), free_port());
    let log = std::fs::File::create(tmp.join("control.log")).expect("log");
    let ctl = Controller(
        Command::new(env!("CARGO_BIN_EXE_mesh-control"))
            .arg("--config-dir")
            .arg(config)
            .arg("--state-dir")
            .arg(&state)
            .args([&format!("--grpc-addr=127.0.0.1:{grpc}"), &format!("--status-addr=127.0.0.1:{status}"), "--poll-ms=100"])
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("mesh-control starts"),
    );
    let started = Instant::now();
    while http_get(status, "/ready").is_none_or(|b| !b.starts_with("ready")) {
        assert!(started.elapsed() < Duration::from_secs(10), "not ready; log: {}", std::fs::read_to_string(tmp.join("control.log")).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Running { _ctl: ctl, grpc, status, state }
}

impl Running {
    fn server(&self) -> client::Server {
        let root = std::fs::read_to_string(self.state.join("ca/root.crt")).expect("the controller wrote its root");
        client::Server { address: format!("https://127.0.0.1:{}", self.grpc), name: "localhost".into(), roots_pem: root }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_change_reaches_both_nodes_within_a_second() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config");
    std::fs::create_dir_all(config.join("policies")).expect("mkdir");
    std::fs::copy(examples().join("file-mode/cluster.yaml"), config.join("cluster.yaml")).expect("copy");
    let policy = config.join("policies/whoami.yaml");
    std::fs::copy(examples().join("policies/allow-client-to-whoami.yaml"), &policy).expect("copy");
    let running = start(tmp.path(), &config).await;
    let (status, server) = (running.status, running.server());
    let mut nodes = Vec::new();
    for n in ["n1", "n2"] {
        let (mut updates, tx) = subscribe(&server, n, &format!("secret-{n}")).await;
        let first = updates.message().await.expect("recv").expect("snapshot");
        assert!(first.full);
        assert_eq!(action_of(&first), Some(pb::Action::Allow.into()), "{n} starts with the ALLOW policy");
        tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: first.version })) }).await.expect("ack");
        nodes.push((updates, tx));
    }

    // The lab flips allow → deny by replacing the file.
    let flipped = Instant::now();
    std::fs::copy(examples().join("policies/deny-client-to-whoami.yaml"), &policy).expect("swap");
    for (updates, _) in &mut nodes {
        let u = tokio::time::timeout(Duration::from_secs(1), updates.message()).await.expect("update within 1 s").expect("recv").expect("open");
        assert!(!u.full);
        assert_eq!(action_of(&u), Some(pb::Action::Deny.into()));
    }
    let latency = flipped.elapsed();
    eprintln!("allow → deny reached both nodes in {latency:?}");

    // A broken file is reported and leaves the running config alone.
    std::fs::write(config.join("policies/broken.yaml"), "kind: [unclosed").expect("write");
    let started = Instant::now();
    let body = loop {
        let body = http_get(status, "/status").expect("status");
        if body.contains("broken.yaml") {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "file error never reported: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["fileErrors"].as_array().map(Vec::len), Some(1), "{doc:#}");
    assert_eq!(doc["nodes"]["n1"]["connected"], true);
    let metrics = http_get(status, "/metrics").expect("metrics");
    assert!(metrics.contains("mesh_control_connected_nodes 2"), "{metrics}");
    assert!(metrics.contains("mesh_control_config_file_errors 1"), "{metrics}");
    // Nothing node-visible changed, so nodes get no update.
    for (updates, _) in &mut nodes {
        assert!(tokio::time::timeout(Duration::from_millis(300), updates.message()).await.is_err(), "no update for an unreadable file");
    }
}

fn whoami_table(u: &pb::ConfigUpdate) -> Option<pb::RouteTable> {
    u.upserts.iter().find_map(|r| match &r.kind {
        Some(pb::resource::Kind::RouteTable(t)) if t.namespace == "demo" && t.name == "whoami" => Some(t.clone()),
        _ => None,
    })
}

fn weights(t: &pb::RouteTable) -> Vec<(String, u32)> {
    t.routes.iter().flat_map(|r| &r.backends).map(|b| (b.name.clone(), b.weight)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_reaches_a_node_within_a_second() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    for f in ["file-mode/cluster.yaml", "file-mode/routing-lab.yaml"] {
        std::fs::copy(examples().join(f), config.join(f.replace('/', "-"))).expect("copy");
    }
    let split = std::fs::read_to_string(examples().join("routing/weighted-split.yaml")).expect("example");
    let route = config.join("split.yaml");
    std::fs::write(&route, &split).expect("write");
    let running = start(tmp.path(), &config).await;
    let (mut updates, tx) = subscribe(&running.server(), "n1", "secret-n1").await;
    let first = updates.message().await.expect("recv").expect("snapshot");
    let table = whoami_table(&first).expect("the snapshot has whoami's route table");
    assert_eq!(weights(&table), [("whoami-v1".into(), 90), ("whoami-v2".into(), 10)]);
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: first.version })) }).await.expect("ack");

    // 90/10 → 50/50, written the way an editor or kubectl-like tool would: a new file, renamed.
    let changed = Instant::now();
    let tmp_file = config.join(".split.yaml.tmp");
    std::fs::write(&tmp_file, split.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50")).expect("write");
    std::fs::rename(&tmp_file, &route).expect("rename");
    let u = tokio::time::timeout(Duration::from_secs(1), updates.message()).await.expect("update within 1 s").expect("recv").expect("open");
    assert!(!u.full, "incremental");
    assert_eq!(weights(&whoami_table(&u).expect("the table changed")), [("whoami-v1".into(), 50), ("whoami-v2".into(), 50)]);
    assert_eq!(u.upserts.len(), 1, "only the route table changed: {:?}", u.upserts);
    eprintln!("90/10 → 50/50 reached the node in {:?}", changed.elapsed());
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: u.version })) }).await.expect("ack");

    // The route's status is on the status endpoint.
    let doc: serde_json::Value = serde_json::from_str(&http_get(running.status, "/status").expect("status")).expect("JSON");
    let r = doc["routes"].as_array().expect("routes").iter().find(|r| r["name"] == "whoami-split").expect("the route's verdict").clone();
    assert_eq!((r["kind"].as_str(), r["accepted"].as_bool()), (Some("HTTPRoute"), Some(true)), "{r:#}");
    assert_eq!(r["parents"][0]["conditions"][0]["reason"], "Accepted", "{r:#}");
    assert_eq!(r["parents"][0]["parentRef"]["name"], "whoami", "{r:#}");

    // Deleting the route removes the table: the Service is back to its default route.
    std::fs::remove_file(&route).expect("rm");
    let u = tokio::time::timeout(Duration::from_secs(1), updates.message()).await.expect("update within 1 s").expect("recv").expect("open");
    assert_eq!(u.removals, [pb::ResourceKey { kind: pb::ResourceKind::RouteTable.into(), key: "demo/whoami".into() }]);
}

#[test]
fn invalid_configuration_exits_64_naming_the_problem() {
    let bin = env!("CARGO_BIN_EXE_mesh-control");
    let none = Command::new(bin).output().expect("runs");
    assert_eq!(none.status.code(), Some(64), "neither --config-dir nor --kubernetes");
    assert!(String::from_utf8_lossy(&none.stderr).contains("--config-dir"), "{}", String::from_utf8_lossy(&none.stderr));
    let ttl = Command::new(bin).args(["--config-dir", "/nonexistent", "--cert-ttl-seconds", "1"]).output().expect("runs");
    assert_eq!(ttl.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&ttl.stderr).contains("--cert-ttl-seconds"), "{}", String::from_utf8_lossy(&ttl.stderr));
    let both = Command::new(bin).args(["--config-dir", "/x", "--kubernetes"]).output().expect("runs");
    assert_eq!(both.status.code(), Some(64), "the two modes exclude each other");
}
