//! In-process tests: the real server on 127.0.0.1 port 0 with TLS from a fresh mesh root, and a
//! real tonic client that verifies the server against that root.

use std::net::{Ipv4Addr, SocketAddrV4};

use mesh_proto::{ca::v1::certificates_client::CertificatesClient, config::v1::config_distribution_client::ConfigDistributionClient};
use prometheus_client::registry::Registry;
use tonic::{
    Code,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig},
};

use super::*;
use crate::{fixtures::lab_state, view::State};

const DB: &str = "
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: db, namespace: demo}
spec: {node: n2, serviceAccount: db, addresses: [198.18.2.20]}
";

struct Harness {
    addr: SocketAddr,
    shared: Shared,
    _tokens: tempfile::TempDir,
}

async fn start(state: State) -> Harness {
    let tokens = tempfile::tempdir().expect("tempdir");
    std::fs::write(tokens.path().join("n1.token"), "token-n1").expect("write");
    std::fs::write(tokens.path().join("n2.token"), "token-n2").expect("write");
    let publisher = Publisher::new();
    publisher.publish(state, vec![]);
    let shared = Shared {
        publisher,
        ca: Arc::new(Ca::generate("cluster.local").expect("root")),
        auth: Arc::new(Authenticator::Files { dir: tokens.path().to_path_buf() }),
        metrics: Arc::new(Metrics::new(&mut Registry::default())),
        nodes: NodeStatuses::default(),
        default_ttl: Duration::from_hours(1),
    };
    let server = Server::new(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into(), &["localhost".into()], shared.clone()).await.expect("bind");
    let addr = server.local_addr();
    tokio::spawn(server.run());
    Harness { addr, shared, _tokens: tokens }
}

async fn channel(h: &Harness) -> Channel {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&h.shared.ca.root().cert)).domain_name("localhost");
    Channel::from_shared(format!("https://{}", h.addr)).expect("uri").tls_config(tls).expect("tls").connect().await.expect("connect")
}

fn with_auth<T>(msg: T, node: &str, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"));
    req.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::try_from(node).expect("ascii"));
    req
}

fn subscribe(node: &str) -> pb::NodeMessage {
    pb::NodeMessage { kind: Some(pb::node_message::Kind::Subscribe(pb::Subscribe { node_name: node.into(), last_applied_version: 0 })) }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn node_gets_snapshot_then_versioned_increments_and_acks_are_recorded() {
    let h = start(lab_state("")).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(subscribe("n1")).await.expect("send");
    let mut client = ConfigDistributionClient::new(channel(&h).await);
    let mut updates = client.stream_config(with_auth(ReceiverStream::new(rx), "n1", "token-n1")).await.expect("stream").into_inner();

    let first = updates.message().await.expect("recv").expect("snapshot");
    assert!(first.full);
    assert_eq!(first.version, 1);
    assert!(first.removals.is_empty());
    assert_eq!(first.upserts.len(), 3, "two local workloads and one service: {:?}", first.upserts);
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: 1 })) }).await.expect("ack");
    eventually("ack recorded", || h.shared.nodes.lock().expect("lock").get("n1").is_some_and(|s| s.acked_version == 1)).await;
    assert_eq!(h.shared.metrics.connected_nodes.get(), 1);

    // A new policy for whoami reaches the node as one upsert with the next version.
    let policy = "apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY, selector: {matchLabels: {app: whoami}}}\n";
    assert_eq!(h.shared.publisher.publish(lab_state(policy), vec![]), Some(2));
    let second = updates.message().await.expect("recv").expect("increment");
    assert!(!second.full);
    assert_eq!(second.version, 2);
    assert_eq!(second.upserts.len(), 1);
    assert!(matches!(&second.upserts[0].kind, Some(pb::resource::Kind::AuthorizationPolicy(p)) if p.name == "deny"));
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Nack(pb::Nack { version: 2, error: "cannot apply".into() })) }).await.expect("nack");
    eventually("nack recorded", || h.shared.metrics.nacks.get() == 1).await;
    let status = h.shared.nodes.lock().expect("lock")["n1"].clone();
    assert_eq!((status.sent_version, status.acked_version), (2, 1));
    assert_eq!(status.last_nack.expect("nack").error, "cannot apply");

    // A change that does not touch n1's view (a workload on n2) sends n1 nothing; the removal of
    // the policy then arrives with version 4.
    h.shared.publisher.publish(lab_state(&format!("{policy}---\n{DB}")), vec![]);
    h.shared.publisher.publish(lab_state(DB), vec![]);
    let third = updates.message().await.expect("recv").expect("removal");
    assert_eq!(third.version, 4);
    assert_eq!(third.removals, [pb::ResourceKey { kind: pb::ResourceKind::AuthorizationPolicy.into(), key: "demo/deny".into() }]);
    assert!(third.upserts.is_empty());

    drop(tx);
    drop(updates);
    eventually("disconnect recorded", || h.shared.metrics.connected_nodes.get() == 0).await;
    assert!(!h.shared.nodes.lock().expect("lock")["n1"].connected);
}

#[tokio::test]
async fn streams_with_bad_credentials_or_a_foreign_node_name_are_refused() {
    let h = start(lab_state("")).await;
    let mut client = ConfigDistributionClient::new(channel(&h).await);
    let once = |node: &str| tokio_stream::iter([subscribe(node)]);
    let e = client.stream_config(with_auth(once("n1"), "n1", "token-n2")).await.expect_err("wrong token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = client.stream_config(Request::new(once("n1"))).await.expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = client.stream_config(with_auth(once("n2"), "n1", "token-n1")).await.expect_err("claims n2");
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn ca_signs_only_identities_running_on_the_calling_node() {
    let h = start(lab_state(DB)).await;
    let mut client = CertificatesClient::new(channel(&h).await);
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
    let req = |id: &str| ca_pb::CreateCertificateRequest { csr_pem: csr.clone(), identity: id.into(), ttl_seconds: 600 };

    let ok = client.create_certificate(with_auth(req("spiffe://cluster.local/ns/demo/sa/whoami"), "n1", "token-n1")).await.expect("issued").into_inner();
    assert_eq!(ok.cert_chain_pem.len(), 2);
    assert_eq!(ok.cert_chain_pem[1], h.shared.ca.root().cert);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now + 590..=now + 610).contains(&ok.not_after_unix), "ttl honoured: {} vs {now}", ok.not_after_unix);

    // db runs only on n2: n1 may not have it; n2 may.
    let e = client.create_certificate(with_auth(req("spiffe://cluster.local/ns/demo/sa/db"), "n1", "token-n1")).await.expect_err("not on n1");
    assert_eq!(e.code(), Code::PermissionDenied);
    client.create_certificate(with_auth(req("spiffe://cluster.local/ns/demo/sa/db"), "n2", "token-n2")).await.expect("n2 runs db");
    // The unmeshed client pod's identity is never issued.
    let e = client.create_certificate(with_auth(req("spiffe://cluster.local/ns/demo/sa/default"), "n1", "token-n1")).await.expect_err("unmeshed");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = client.create_certificate(with_auth(req("spiffe://cluster.local/ns/demo/sa/whoami"), "n1", "token-n2")).await.expect_err("bad token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = client.create_certificate(with_auth(req("spiffe://evil.org/ns/demo/sa/whoami"), "n1", "token-n1")).await.expect_err("foreign domain");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(h.shared.metrics.certificates_issued.get(), 2);
}
