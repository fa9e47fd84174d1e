//! mesh-control against a REAL kube-apiserver (see `cluster.rs`; routing in `routing.rs`). Built
//! only with the `apiserver-tests` feature; `cargo xtask test` runs `scripts/setup-k8s.sh` and
//! then this target:
//!   cargo test -p mesh-control --features apiserver-tests --test apiserver

mod cluster;
#[path = "../support/ports.rs"]
mod ports;
mod election;
mod routing;

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use cluster::Cluster;
use ports::free_port;
use mesh_control::client;
use mesh_proto::{
    ca::v1::{CreateCertificateRequest, certificates_client::CertificatesClient},
    config::v1::{self as pb, config_distribution_client::ConfigDistributionClient},
};
use tonic::{Code, Request, metadata::MetadataValue};

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

fn apply_deploy(c: &Cluster) {
    c.kubectl_ok(&["apply", "-f", &deploy().join("00-namespace.yaml").display().to_string()]);
    c.kubectl_ok(&["apply", "-f", &deploy().display().to_string()]);
    c.kubectl_ok(&["wait", "--for=condition=Established", "crd/authorizationpolicies.security.mesh.dev", "crd/peerauthentications.security.mesh.dev", "--timeout=30s"]);
}

#[test]
fn deploy_manifests_pass_server_dry_run_and_rbac_is_least_privilege() {
    let c = Cluster::start();
    c.kubectl_ok(&["apply", "-f", &deploy().join("00-namespace.yaml").display().to_string()]);
    let dry = c.kubectl_ok(&["apply", "--dry-run=server", "-f", &deploy().display().to_string()]);
    for obj in ["customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.security.mesh.dev", "clusterrole.rbac.authorization.k8s.io/mesh-control", "deployment.apps/mesh-control", "daemonset.apps/mesh-node", "role.rbac.authorization.k8s.io/mesh-control"] {
        assert!(dry.contains(obj), "{obj} missing from the dry run:\n{dry}");
    }
    apply_deploy(&c);

    let can = |sa: &str, args: &[&str]| {
        let who = format!("--as=system:serviceaccount:mesh-system:{sa}");
        let out = c.kubectl(&[&["auth", "can-i"], args, &[who.as_str()]].concat());
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for allowed in [
        &["watch", "pods", "-A"][..],
        &["list", "endpointslices.discovery.k8s.io", "-A"],
        &["list", "authorizationpolicies.security.mesh.dev", "-A"],
        &["patch", "authorizationpolicies.security.mesh.dev", "--subresource=status", "-n", "demo"],
        &["patch", "peerauthentications.security.mesh.dev", "--subresource=status", "-n", "demo"],
        &["create", "tokenreviews.authentication.k8s.io"],
        &["get", "secret/mesh-ca", "-n", "mesh-system"],
        &["patch", "configmap/mesh-root-cert", "-n", "mesh-system"],
        &["create", "leases.coordination.k8s.io", "-n", "mesh-system"],
        &["get", "lease/mesh-control-leader", "-n", "mesh-system"],
        &["update", "lease/mesh-control-leader", "-n", "mesh-system"],
    ] {
        assert!(can("mesh-control", allowed), "mesh-control should be allowed to {allowed:?}");
    }
    for denied in [
        &["create", "pods", "-n", "demo"][..],
        &["update", "authorizationpolicies.security.mesh.dev", "-n", "demo"],
        &["patch", "authorizationpolicies.security.mesh.dev", "-n", "demo"],
        &["get", "secret/other", "-n", "mesh-system"],
        &["list", "secrets", "-n", "mesh-system"],
        &["get", "secrets", "-n", "kube-system"],
        &["delete", "services", "-n", "demo"],
        &["update", "lease/kube-controller-manager", "-n", "mesh-system"],
        &["get", "lease/other", "-n", "mesh-system"],
        &["delete", "lease/mesh-control-leader", "-n", "mesh-system"],
        &["list", "leases.coordination.k8s.io", "-n", "mesh-system"],
        &["update", "lease/mesh-control-leader", "-n", "kube-system"],
    ] {
        assert!(!can("mesh-control", denied), "mesh-control must not be allowed to {denied:?}");
    }
    for denied in [&["list", "pods", "-A"][..], &["get", "configmaps", "-n", "mesh-system"], &["create", "tokenreviews.authentication.k8s.io"]] {
        assert!(!can("mesh-node", denied), "mesh-node must not be allowed to {denied:?}");
    }

    // Schema validation rejects type errors at apply time (semantic errors are the controller's).
    let bad = "apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: mesh-system}\nspec: {rules: \"not-a-list\"}\n";
    let out = c.try_apply(bad);
    assert!(!out.status.success(), "a type error must be rejected by the schema");
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.rules"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The controller binary, running as its own `ServiceAccount` (so the RBAC of deploy/ is what it
/// gets), killed by PID on drop.
struct Controller {
    child: Child,
    grpc: u16,
    status: u16,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}


fn start_controller(c: &Cluster) -> Controller {
    start_replica(c, "mesh-control-0")
}

/// A controller replica named `name` in the leader Lease (as the Deployment names its pods).
fn start_replica(c: &Cluster, name: &str) -> Controller {
    let token = c.kubectl_ok(&["create", "token", "mesh-control", "-n", "mesh-system", "--duration=1h"]);
    let kubeconfig = c.kubeconfig_for(name, token.trim());
    let (grpc, status) = (free_port(), free_port());
    let log = std::fs::OpenOptions::new().create(true).append(true).open(c.dir.path().join(format!("{name}.log"))).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["--kubernetes", &format!("--grpc-addr=127.0.0.1:{grpc}"), &format!("--status-addr=127.0.0.1:{status}"), "--tls-san=localhost"])
        .env("KUBECONFIG", kubeconfig)
        .env("MESH_CONTROL_POD_NAME", name)
        .env("MESH_LOG", "info,mesh_control=debug")
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("mesh-control starts");
    Controller { child, grpc, status }
}

/// GET `path` on a controller's status port: the body, if it answered 200.
fn http_get(ctl: &Controller, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ctl.status)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, body) = body.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

fn status_json(ctl: &Controller) -> Option<serde_json::Value> {
    serde_json::from_str(&http_get(ctl, "/status")?).ok()
}

const WORKLOADS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {mesh.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: whoami, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: whoami-1, namespace: demo, labels: {app: whoami}}
spec: {nodeName: n1, serviceAccountName: whoami, automountServiceAccountToken: false, containers: [{name: c, image: whoami}]}
---
apiVersion: v1
kind: Pod
metadata: {name: whoami-2, namespace: demo, labels: {app: whoami}}
spec: {nodeName: n2, serviceAccountName: whoami, automountServiceAccountToken: false, containers: [{name: c, image: whoami}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: demo, labels: {app: db}}
spec: {nodeName: n2, serviceAccountName: db, automountServiceAccountToken: false, containers: [{name: c, image: db}]}
---
apiVersion: v1
kind: Service
metadata: {name: whoami, namespace: demo}
spec:
  selector: {app: whoami}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-node-n1, namespace: mesh-system}
spec: {nodeName: n1, serviceAccountName: mesh-node, automountServiceAccountToken: false, containers: [{name: c, image: mesh-node}]}
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-node-n2, namespace: mesh-system}
spec: {nodeName: n2, serviceAccountName: mesh-node, automountServiceAccountToken: false, containers: [{name: c, image: mesh-node}]}
";

/// What a kubelet would do: report the pod running and ready with an IP.
fn pod_ready(c: &Cluster, ns: &str, pod: &str, ip: &str) {
    let patch = format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#);
    c.kubectl_ok(&["patch", "pod", pod, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch]);
}

fn node_token(c: &Cluster, node: &str) -> String {
    node_token_for(c, node, mesh_control::k8s::token::AUDIENCE)
}

/// A pod-bound token of the node ServiceAccount, as the DaemonSet projects it, for `audience`.
fn node_token_for(c: &Cluster, node: &str, audience: &str) -> String {
    c.kubectl_ok(&["create", "token", "mesh-node", "-n", "mesh-system", "--bound-object-kind=Pod", &format!("--bound-object-name=mesh-node-{node}"), "--duration=1h", &format!("--audience={audience}")]).trim().to_owned()
}

fn authed<T>(msg: T, node: &str, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"));
    r.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::try_from(node).expect("ascii"));
    r
}

/// The node side of the config stream: applies updates to a local view and ACKs each.
struct NodeView {
    updates: tonic::Streaming<pb::ConfigUpdate>,
    acks: tokio::sync::mpsc::Sender<pb::NodeMessage>,
    view: BTreeMap<(i32, String), pb::Resource>,
}

impl NodeView {
    async fn next(&mut self) {
        let u = tokio::time::timeout(Duration::from_secs(20), self.updates.message()).await.expect("an update in time").expect("stream ok").expect("stream open");
        if u.full {
            self.view.clear();
        }
        for r in u.upserts {
            let k = mesh_control::view::key_of(r.kind.as_ref().expect("kind"));
            self.view.insert((k.kind, k.key), r);
        }
        for k in u.removals {
            self.view.remove(&(k.kind, k.key));
        }
        self.acks.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: u.version })) }).await.expect("ack");
    }

    async fn until(&mut self, what: &str, f: impl Fn(&BTreeMap<(i32, String), pb::Resource>) -> bool) {
        for _ in 0..50 {
            if f(&self.view) {
                return;
            }
            self.next().await;
        }
        panic!("view never satisfied: {what}; view: {:#?}", self.view.keys());
    }
}

fn service<'a>(v: &'a BTreeMap<(i32, String), pb::Resource>, key: &str) -> Option<&'a pb::Service> {
    match &v.get(&(pb::ResourceKind::Service.into(), key.into()))?.kind {
        Some(pb::resource::Kind::Service(s)) => Some(s),
        _ => None,
    }
}

fn condition(c: &Cluster, name: &str) -> String {
    c.kubectl_ok(&["get", "authorizationpolicy", name, "-n", "demo", "-o", "jsonpath={.status.conditions[0].status}/{.status.conditions[0].reason}"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_serves_per_node_views_policy_status_and_certificates_from_a_real_apiserver() {
    let c = Cluster::start();
    apply_deploy(&c);
    c.apply(WORKLOADS);
    for (ns, pod, ip) in [("demo", "whoami-1", "10.0.1.5"), ("demo", "whoami-2", "10.0.2.5"), ("demo", "db", "10.0.2.6"), ("mesh-system", "mesh-node-n1", "10.0.1.1"), ("mesh-system", "mesh-node-n2", "10.0.2.1")] {
        pod_ready(&c, ns, pod, ip);
    }
    let ctl = start_controller(&c);
    let root = Cluster::eventually("ConfigMap mesh-root-cert", 30, || {
        let out = c.kubectl(&["get", "configmap", "mesh-root-cert", "-n", "mesh-system", "-o", "jsonpath={.data.root\\.crt}"]);
        let pem = String::from_utf8_lossy(&out.stdout).into_owned();
        pem.contains("BEGIN CERTIFICATE").then_some(pem)
    });
    Cluster::eventually("controller ready", 30, || status_json(&ctl).filter(|s| s["version"].as_u64() > Some(0)));

    let server = client::Server { address: format!("https://127.0.0.1:{}", ctl.grpc), name: "localhost".into(), roots_pem: root.clone() };
    let (t1, t2) = (node_token(&c, "n1"), node_token(&c, "n2"));
    // Node certificates need the pod-bound token of a mesh-node pod on that node (TokenReview
    // + the pod's spec.nodeName): another node's token, or another ServiceAccount's, is refused.
    let unauthenticated = |r: Result<client::NodeCertificate, client::Error>| matches!(r, Err(client::Error::Refused(s)) if s.code() == Code::Unauthenticated);
    assert!(unauthenticated(server.node_certificate("n1", &t2, 0).await), "n2's token claiming n1");
    let other = c.kubectl_ok(&["create", "token", "mesh-control", "-n", "mesh-system"]);
    assert!(unauthenticated(server.node_certificate("n1", other.trim(), 0).await), "not the node ServiceAccount");
    let for_apiserver = node_token_for(&c, "n1", "https://kubernetes.default.svc");
    assert!(unauthenticated(server.node_certificate("n1", &for_apiserver, 0).await), "n1's token, but for the API server's audience");
    let n1_cert = server.node_certificate("n1", &t1, 0).await.expect("n1's token on n1");
    assert_eq!(n1_cert.trust_bundle_pem, std::slice::from_ref(&root));
    let n1_channel = server.connect(Some(&n1_cert)).await.expect("mutual TLS as n1");
    let n2_channel = server.connect_as("n2", &t2).await.expect("mutual TLS as n2");

    // Node n1 subscribes with its node certificate and sees its pod and the Service whose
    // endpoints come from the EndpointSlice the controller-manager made.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Subscribe(pb::Subscribe { node_name: "n1".into(), last_applied_version: 0 })) }).await.expect("send");
    let updates = ConfigDistributionClient::new(n1_channel.clone())
        .stream_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("n1 subscribes")
        .into_inner();
    let mut n1 = NodeView { updates, acks: tx, view: BTreeMap::new() };
    n1.until("whoami endpoints from the EndpointSlice", |v| service(v, "demo/whoami").is_some_and(|s| s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.healthy))).await;
    let svc = service(&n1.view, "demo/whoami").expect("service").clone();
    assert_eq!(svc.vips.len(), 1, "a ClusterIP");
    let remote = svc.endpoints.iter().find(|e| e.address == "10.0.2.5").expect("endpoint of whoami-2");
    assert_eq!((remote.node.as_str(), remote.meshed, remote.identity.as_str()), ("n2", true, "spiffe://cluster.local/ns/demo/sa/whoami"));
    assert_eq!(remote.ports.get(&80), Some(&8080));
    // n1 gets its own pods and the other nodes' meshed pods (source attribution), nothing else.
    let workloads: Vec<(String, String, bool)> = n1
        .view
        .values()
        .filter_map(|r| match &r.kind { Some(pb::resource::Kind::Workload(w)) => Some((format!("{}/{}", w.namespace, w.name), w.node.clone(), w.meshed)), _ => None })
        .collect();
    assert!(workloads.contains(&("demo/whoami-1".into(), "n1".into(), true)), "{workloads:?}");
    assert!(workloads.contains(&("demo/whoami-2".into(), "n2".into(), true)), "{workloads:?}");
    assert!(workloads.iter().all(|(_, node, meshed)| node == "n1" || *meshed), "{workloads:?}");

    // A valid policy and invalid ones: the valid one reaches n1; the invalid ones get
    // Accepted=False and are distributed as what they fail closed to.
    c.apply(&std::fs::read_to_string(deploy().join("examples/invalid/bad-policies.yaml")).expect("read"));
    c.apply("apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: whoami-deny, namespace: demo}\nspec:\n  selector: {matchLabels: {app: whoami}}\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]\n");
    n1.until("the valid policy", |v| v.contains_key(&(pb::ResourceKind::AuthorizationPolicy.into(), "demo/whoami-deny".into()))).await;
    n1.until("the invalid policies, closed", |v| v.keys().filter(|(_, k)| k.starts_with("demo/bad-")).count() == 3).await;
    let policy = |name: &str| match n1.view.get(&(pb::ResourceKind::AuthorizationPolicy.into(), format!("demo/{name}"))).and_then(|r| r.kind.clone()) {
        Some(pb::resource::Kind::AuthorizationPolicy(p)) => (p.action, p.rules.len()),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(policy("bad-principal"), (pb::Action::Allow.into(), 0), "ALLOW matching nothing");
    assert_eq!(policy("bad-action"), (pb::Action::Deny.into(), 1), "DENY of everything");
    Cluster::eventually("status conditions", 20, || (condition(&c, "whoami-deny") == "True/Accepted").then_some(()));
    assert_eq!(condition(&c, "bad-port"), "False/PortOutOfRange");
    assert_eq!(condition(&c, "bad-principal"), "False/InvalidPrincipal");
    assert_eq!(condition(&c, "bad-action"), "False/UnknownAction");

    // Fixing a bad policy flips its condition and distributes it.
    c.apply("apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad-action, namespace: demo}\nspec: {action: AUDIT}\n");
    Cluster::eventually("fixed policy accepted", 20, || (condition(&c, "bad-action") == "True/Accepted").then_some(()));
    n1.until("the fixed policy", |v| v.contains_key(&(pb::ResourceKind::AuthorizationPolicy.into(), "demo/bad-action".into()))).await;

    // CA: identities of pods on the node of the client certificate only.
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
    let req = |id: &str| CreateCertificateRequest { csr_pem: csr.clone(), identity: id.into(), ttl_seconds: 0 };
    let mut ca = CertificatesClient::new(n1_channel.clone());
    let issued = ca.create_certificate(req("spiffe://cluster.local/ns/demo/sa/whoami")).await.expect("whoami runs on n1").into_inner();
    assert_eq!(issued.cert_chain_pem[1], root);
    let e = ca.create_certificate(req("spiffe://cluster.local/ns/demo/sa/db")).await.expect_err("db runs on n2 only");
    assert_eq!(e.code(), Code::PermissionDenied);
    CertificatesClient::new(n2_channel).create_certificate(req("spiffe://cluster.local/ns/demo/sa/db")).await.expect("n2 runs db");
    // A token alone, without a node certificate, gets no workload certificate.
    let mut anonymous = CertificatesClient::new(server.connect(None).await.expect("server-TLS channel"));
    let e = anonymous.create_certificate(authed(req("spiffe://cluster.local/ns/demo/sa/whoami"), "n1", &t1)).await.expect_err("bearer only");
    assert_eq!(e.code(), Code::Unauthenticated);

    let status = status_json(&ctl).expect("status");
    assert_eq!(status["nodes"]["n1"]["connected"], true, "{status:#}");
    assert!(status["nodes"]["n1"]["ackedVersion"].as_u64() >= Some(1), "{status:#}");
}
