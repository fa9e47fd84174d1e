//! In-process tests: the real server on 127.0.0.1 port 0 with TLS from a fresh mesh root, and
//! real tonic clients (`crate::client`): bootstrap with a node token, then mutual TLS.

use std::net::{Ipv4Addr, SocketAddrV4};

use mesh_proto::{ca::v1::certificates_client::CertificatesClient, config::v1::config_distribution_client::ConfigDistributionClient};
use prometheus_client::registry::Registry;
use tonic::{Code, metadata::MetadataValue, transport::Channel};

use super::*;
use crate::{
    client::{self, NodeCertificate},
    fixtures::lab_state,
    view::State,
};

const DB: &str = "
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: db, namespace: demo}
spec: {node: n2, serviceAccount: db, addresses: [198.18.2.20]}
";

/// An unmeshed pod on n2: no other node's view mentions it.
const UNMESHED_ON_N2: &str = "
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: legacy, namespace: demo, labels: {mesh.dev/dataplane-mode: none}}
spec: {node: n2, addresses: [198.18.2.21]}
";

struct Harness {
    shared: Shared,
    server: client::Server,
    _tokens: tempfile::TempDir,
}

async fn start(state: State) -> Harness {
    start_with(state, Ca::generate("cluster.local").expect("root")).await
}

/// Tests make more bootstrap calls from 127.0.0.1 than one node would.
const GENEROUS: mesh_l7::per_source::Rate = mesh_l7::per_source::Rate { burst: 1000, per_minute: 1000 };

async fn start_with(state: State, ca: Ca) -> Harness {
    start_limited(state, ca, GENEROUS).await
}

async fn start_limited(state: State, ca: Ca, bootstrap: mesh_l7::per_source::Rate) -> Harness {
    let tokens = tempfile::tempdir().expect("tempdir");
    std::fs::write(tokens.path().join("n1.token"), "token-n1").expect("write");
    std::fs::write(tokens.path().join("n2.token"), "token-n2").expect("write");
    let publisher = Publisher::new();
    publisher.publish(state, vec![]);
    let shared = Shared {
        publisher,
        ca: Arc::new(ca),
        auth: Arc::new(Authenticator::Files { dir: tokens.path().to_path_buf() }),
        metrics: Arc::new(Metrics::new(&mut Registry::default())),
        nodes: NodeStatuses::default(),
        default_ttl: Duration::from_hours(1),
        node_ids: NodeIds::new("cluster.local", "mesh-system", "mesh-node"),
        node_ttl: Duration::from_mins(10),
        bootstrap_limit: Arc::new(mesh_l7::per_source::PerSource::new(bootstrap)),
        views: Default::default(),
    };
    let server = Server::new(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into(), &["localhost".into()], shared.clone()).await.expect("bind");
    let addr = server.local_addr();
    tokio::spawn(server.run());
    let roots_pem = shared.ca.trust_bundle().concat();
    Harness { shared, server: client::Server { address: format!("https://{addr}"), name: "localhost".into(), roots_pem }, _tokens: tokens }
}

/// A mutual-TLS channel as `node`, bootstrapped with its token.
async fn channel(h: &Harness, node: &str) -> Channel {
    h.server.connect_as(node, &format!("token-{node}")).await.expect("node certificate and mTLS channel")
}

/// A certificate for `uri` from `ca` (as a node certificate or, with `workload`, a workload's).
fn cert_from(ca: &Ca, uri: &str, workload: bool, ttl: Duration) -> NodeCertificate {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
    let signed = if workload { ca.sign_workload(&csr, uri, ttl) } else { ca.sign_node(&csr, uri, ttl) }.expect("signed");
    NodeCertificate { cert_pem: signed.chain[0].clone(), key_pem: key.serialize_pem(), not_after_unix: 0, trust_bundle_pem: vec![] }
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
    let mut client = ConfigDistributionClient::new(channel(&h, "n1").await);
    let mut updates = client.stream_config(ReceiverStream::new(rx)).await.expect("stream").into_inner();

    let first = updates.message().await.expect("recv").expect("snapshot");
    assert!(first.full);
    assert_eq!(first.version, 1);
    assert!(first.removals.is_empty());
    assert_eq!(first.upserts.len(), 4, "two local workloads, n2's meshed one and one service: {:?}", first.upserts);
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

    // A change that does not touch n1's view (an unmeshed workload on n2) sends n1 nothing; the removal of
    // the policy then arrives with version 4.
    h.shared.publisher.publish(lab_state(&format!("{policy}---\n{UNMESHED_ON_N2}")), vec![]);
    h.shared.publisher.publish(lab_state(UNMESHED_ON_N2), vec![]);
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
async fn config_streams_need_a_node_certificate_of_this_mesh_naming_the_subscriber() {
    let h = start(lab_state("")).await;
    let once = |node: &str| tokio_stream::iter([subscribe(node)]);

    // No client certificate: TLS lets the call through (bootstrap must stay reachable), the RPC
    // refuses it, even with a valid node token in the metadata.
    let mut anonymous = ConfigDistributionClient::new(h.server.connect(None).await.expect("server-TLS channel"));
    let mut req = Request::new(once("n1"));
    req.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer token-n1"));
    req.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::from_static("n1"));
    let e = anonymous.stream_config(req).await.expect_err("no client certificate");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("no client certificate"), "{}", e.message());

    // A node certificate from another root fails the handshake.
    let foreign = cert_from(&Ca::generate("cluster.local").expect("other root"), &h.shared.node_ids.uri("n1"), false, Duration::from_mins(5));
    if let Ok(ch) = h.server.connect(Some(&foreign)).await {
        let e = ConfigDistributionClient::new(ch).stream_config(once("n1")).await.expect_err("foreign root");
        assert_ne!(e.code(), Code::Ok);
    }

    // A workload certificate of the mesh's own root is not a node certificate.
    let workload = cert_from(&h.shared.ca, "spiffe://cluster.local/ns/demo/sa/whoami", true, Duration::from_mins(5));
    let ch = h.server.connect(Some(&workload)).await.expect("the root verifies it");
    let e = ConfigDistributionClient::new(ch).stream_config(once("n1")).await.expect_err("workload cert");
    assert_eq!(e.code(), Code::Unauthenticated);

    // n1's certificate cannot subscribe to n2's view, whatever the metadata says.
    let mut n1 = ConfigDistributionClient::new(channel(&h, "n1").await);
    let mut req = Request::new(once("n2"));
    req.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer token-n2"));
    req.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::from_static("n2"));
    let e = n1.stream_config(req).await.expect_err("n1 claims n2");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(h.shared.metrics.connected_nodes.get(), 0);
}

#[tokio::test]
async fn node_certificates_need_the_nodes_credential_and_name_the_node() {
    let h = start(lab_state("")).await;
    let e = h.server.node_certificate("n1", "token-n2", 0).await.expect_err("n2's token for n1");
    assert!(matches!(&e, client::Error::Refused(s) if s.code() == Code::Unauthenticated), "{e}");
    let e = h.server.node_certificate("n3", "whatever", 0).await.expect_err("unknown node");
    assert!(matches!(&e, client::Error::Refused(s) if s.code() == Code::Unauthenticated), "{e}");
    let e = h.server.node_certificate("n1", "token-n1", 25 * 3600).await.expect_err("longer than the cap");
    assert!(matches!(&e, client::Error::Refused(s) if s.code() == Code::InvalidArgument), "{e}");

    let cert = h.server.node_certificate("n1", "token-n1", 0).await.expect("issued");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now + 590..=now + 610).contains(&cert.not_after_unix), "the controller's default node TTL: {}", cert.not_after_unix);
    assert_eq!(cert.trust_bundle_pem, [h.shared.ca.root().cert.clone()]);
    let der = pem::parse(&cert.cert_pem).expect("pem").into_contents();
    let verified = h.shared.node_ids.verify(Some(&[der.into()][..]), SystemTime::now()).expect("a node certificate");
    assert_eq!(verified.name, "n1");
    assert_eq!(h.shared.metrics.node_certificates_issued.get(), 1);
}

/// One source address gets its burst of bootstrap calls, right or wrong, then is refused with
/// RESOURCE_EXHAUSTED before its token is checked (a check costs a TokenReview), and counted.
#[tokio::test]
async fn bootstrap_calls_are_rate_limited_per_source_before_the_token_is_checked() {
    let h = start_limited(lab_state(""), Ca::generate("cluster.local").expect("root"), mesh_l7::per_source::Rate { burst: 3, per_minute: 1 }).await;
    for _ in 0..2 {
        let e = h.server.node_certificate("n1", "guess", 0).await.expect_err("wrong token");
        assert!(matches!(&e, client::Error::Refused(s) if s.code() == Code::Unauthenticated), "{e}");
    }
    h.server.node_certificate("n1", "token-n1", 0).await.expect("the burst's last call, with the right token");
    let e = h.server.node_certificate("n1", "token-n1", 0).await.expect_err("burst spent");
    assert!(matches!(&e, client::Error::Refused(s) if s.code() == Code::ResourceExhausted && s.message().contains("127.0.0.1")), "{e}");
    let refused = |reason: &'static str| h.shared.metrics.certificate_refusals.get_or_create(&ReasonLabels { reason }).get();
    assert_eq!(refused("rate_limited"), 1);
    assert_eq!(h.shared.metrics.node_certificates_issued.get(), 1);
}

#[tokio::test]
async fn ca_signs_only_identities_running_on_the_node_of_the_client_certificate() {
    let h = start(lab_state(DB)).await;
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
    let req = |id: &str| ca_pb::CreateCertificateRequest { csr_pem: csr.clone(), identity: id.into(), ttl_seconds: 600 };
    let (mut n1, mut n2) = (CertificatesClient::new(channel(&h, "n1").await), CertificatesClient::new(channel(&h, "n2").await));

    let ok = n1.create_certificate(req("spiffe://cluster.local/ns/demo/sa/whoami")).await.expect("issued").into_inner();
    assert_eq!(ok.cert_chain_pem.len(), 2);
    assert_eq!(ok.cert_chain_pem[1], h.shared.ca.root().cert);
    assert_eq!(ok.trust_bundle_pem, [h.shared.ca.root().cert.clone()]);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now + 590..=now + 610).contains(&ok.not_after_unix), "ttl honoured: {} vs {now}", ok.not_after_unix);

    // An hour asked for (the CA allows up to a week): capped at the node certificate's end.
    let long = ca_pb::CreateCertificateRequest { ttl_seconds: 3600, ..req("spiffe://cluster.local/ns/demo/sa/whoami") };
    let capped = n1.create_certificate(long).await.expect("issued").into_inner();
    assert!((now + 590..=now + 610).contains(&capped.not_after_unix), "never beyond the 10-minute node certificate: {} vs {now}", capped.not_after_unix);

    // db runs only on n2: n1's certificate cannot get it; n2's can.
    let e = n1.create_certificate(req("spiffe://cluster.local/ns/demo/sa/db")).await.expect_err("not on n1");
    assert_eq!(e.code(), Code::PermissionDenied);
    n2.create_certificate(req("spiffe://cluster.local/ns/demo/sa/db")).await.expect("n2 runs db");
    // The unmeshed client pod's identity is never issued.
    let e = n1.create_certificate(req("spiffe://cluster.local/ns/demo/sa/default")).await.expect_err("unmeshed");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = n1.create_certificate(req("spiffe://evil.org/ns/demo/sa/whoami")).await.expect_err("foreign domain");
    assert_eq!(e.code(), Code::InvalidArgument);
    // A bearer token is no longer enough for workload certificates.
    let mut anonymous = CertificatesClient::new(h.server.connect(None).await.expect("server-TLS channel"));
    let mut r = Request::new(req("spiffe://cluster.local/ns/demo/sa/whoami"));
    r.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer token-n1"));
    r.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::from_static("n1"));
    let e = anonymous.create_certificate(r).await.expect_err("no client certificate");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(h.shared.metrics.certificates_issued.get(), 3);
    assert_eq!(h.shared.metrics.certificate_refusals.get_or_create(&ReasonLabels { reason: "not_on_node" }).get(), 2);
}

#[tokio::test]
async fn a_stream_ends_when_its_node_certificate_expires() {
    let h = start(lab_state("")).await;
    let cert = h.server.node_certificate("n1", "token-n1", 2).await.expect("issued");
    let (tx, rx) = mpsc::channel(8);
    tx.send(subscribe("n1")).await.expect("send");
    let ch = h.server.connect(Some(&cert)).await.expect("mTLS");
    let mut updates = ConfigDistributionClient::new(ch).stream_config(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    assert!(updates.message().await.expect("recv").expect("snapshot").full);
    let ended = tokio::time::timeout(Duration::from_secs(5), updates.message()).await.expect("ended in time");
    let e = ended.expect_err("an error status, not a clean end");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());
    // The expired certificate no longer passes the handshake.
    if let Ok(ch) = h.server.connect(Some(&cert)).await {
        ConfigDistributionClient::new(ch).stream_config(tokio_stream::iter([subscribe("n1")])).await.expect_err("expired certificate");
    }
}

#[tokio::test]
async fn during_a_root_rotation_both_roots_are_trusted_and_a_third_is_not() {
    let next = Ca::generate("cluster.local").expect("new root");
    let ca = Ca::generate("cluster.local").expect("root").with_extra_roots(&next.root().cert).expect("extra root");
    let h = start_with(lab_state(""), ca).await;
    let uri = h.shared.node_ids.uri("n1");
    // A node certificate from the new root (as a controller already switched to it issues).
    let ch = h.server.connect(Some(&cert_from(&next, &uri, false, Duration::from_mins(5)))).await.expect("mTLS");
    let mut updates = ConfigDistributionClient::new(ch).stream_config(tokio_stream::iter([subscribe("n1")])).await.expect("new root accepted").into_inner();
    assert!(updates.message().await.expect("recv").expect("snapshot").full);
    // And from the old one.
    let ch = h.server.connect(Some(&cert_from(&h.shared.ca, &uri, false, Duration::from_mins(5)))).await.expect("mTLS");
    ConfigDistributionClient::new(ch).stream_config(tokio_stream::iter([subscribe("n1")])).await.expect("signing root accepted");
    // Nodes learn both roots with every certificate.
    let cert = h.server.node_certificate("n1", "token-n1", 0).await.expect("issued");
    assert_eq!(cert.trust_bundle_pem, [h.shared.ca.root().cert.clone(), next.root().cert.clone()]);
    let third = cert_from(&Ca::generate("cluster.local").expect("third root"), &uri, false, Duration::from_mins(5));
    if let Ok(ch) = h.server.connect(Some(&third)).await {
        ConfigDistributionClient::new(ch).stream_config(tokio_stream::iter([subscribe("n1")])).await.expect_err("untrusted root");
    }
}

#[tokio::test]
async fn a_version_that_leaves_a_nodes_view_unchanged_counts_as_held_once_it_acked_the_last() {
    let h = start(lab_state("")).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(subscribe("n1")).await.expect("send");
    let mut client = ConfigDistributionClient::new(channel(&h, "n1").await);
    let mut updates = client.stream_config(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    assert_eq!(updates.message().await.expect("recv").expect("snapshot").version, 1);
    // Version 2 does not touch n1's view (an unmeshed workload on n2): nothing is sent, and
    // before n1 acks version 1 it is not counted as holding 2.
    assert_eq!(h.shared.publisher.publish(lab_state(UNMESHED_ON_N2), vec![]), Some(2));
    eventually("version 2 seen", || h.shared.nodes.lock().expect("lock").get("n1").is_some_and(|s| s.view_version == 2)).await;
    assert_eq!(h.shared.nodes.lock().expect("lock")["n1"].acked_version, 0);
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: 1 })) }).await.expect("ack");
    eventually("n1 holds version 2", || h.shared.nodes.lock().expect("lock").get("n1").is_some_and(|s| s.acked_version == 2)).await;
    assert_eq!(h.shared.nodes.lock().expect("lock")["n1"].sent_version, 1, "and nothing more was sent");
}
