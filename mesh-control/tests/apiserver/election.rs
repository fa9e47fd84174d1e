//! Two controller replicas against one real apiserver, as the Deployment runs them: exactly one
//! holds the Lease and writes status, both serve nodes; the leader killed (SIGKILL: no release)
//! → the other takes over within the lease duration and writes the status that went stale
//! meanwhile; the leader stopped (SIGTERM: releases) → the other takes over at its next read.

use std::time::Instant;

use super::*;

/// `mesh_control_<name>` from a replica's `/metrics`.
fn metric(ctl: &Controller, name: &str) -> Option<f64> {
    let text = http_get(ctl, "/metrics")?;
    text.lines().find_map(|l| l.strip_prefix(&format!("mesh_control_{name} "))?.trim().parse().ok())
}

fn holder(c: &Cluster) -> String {
    let out = c.kubectl(&["get", "lease", "mesh-control-leader", "-n", "mesh-system", "-o", "jsonpath={.spec.holderIdentity}"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn leads(ctl: &Controller) -> Option<bool> {
    status_json(ctl)?["leader"].as_bool()
}

/// A policy that the controller accepts (so its status is `True/Accepted` once written).
fn policy(name: &str) -> String {
    format!("apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: whoami}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"9{}\"]}}}}]}}]\n", name.len())
}

fn has_policy(name: &str) -> impl Fn(&BTreeMap<(i32, String), pb::Resource>) -> bool + '_ {
    move |v| v.contains_key(&(pb::ResourceKind::AuthorizationPolicy.into(), format!("demo/{name}")))
}

/// Node `node` subscribed to `ctl` with its node certificate (issued by that replica).
async fn subscribe(c: &Cluster, ctl: &Controller, root: &str, node: &str) -> NodeView {
    let server = client::Server { address: format!("https://127.0.0.1:{}", ctl.grpc), name: "localhost".into(), roots_pem: root.to_owned() };
    let cert = server.node_certificate(node, &node_token(c, node), 0).await.expect("node certificate from this replica");
    assert_eq!(cert.trust_bundle_pem, [root.to_owned()], "both replicas sign with the one root");
    let channel = server.connect(Some(&cert)).await.expect("mutual TLS");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Subscribe(pb::Subscribe { node_name: node.into(), last_applied_version: 0 })) }).await.expect("send");
    let updates = ConfigDistributionClient::new(channel).stream_config(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("subscribe").into_inner();
    NodeView { updates, acks: tx, view: BTreeMap::new() }
}

fn terminate(ctl: &Controller) {
    let status = Command::new("kill").args(["-TERM", &ctl.child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_writes_status_and_the_other_takes_over_when_it_dies() {
    let c = Cluster::start();
    apply_deploy(&c);
    c.apply(WORKLOADS);
    for (ns, pod, ip) in [("demo", "whoami-1", "10.0.1.5"), ("demo", "whoami-2", "10.0.2.5"), ("mesh-system", "mesh-node-n1", "10.0.1.1"), ("mesh-system", "mesh-node-n2", "10.0.2.1")] {
        pod_ready(&c, ns, pod, ip);
    }
    // Both start at once on an empty cluster: no Lease, no CA Secret yet.
    let mut replicas = [start_replica(&c, "mesh-control-a"), start_replica(&c, "mesh-control-b")];
    let root = Cluster::eventually("ConfigMap mesh-root-cert", 30, || {
        let out = c.kubectl(&["get", "configmap", "mesh-root-cert", "-n", "mesh-system", "-o", "jsonpath={.data.root\\.crt}"]);
        let pem = String::from_utf8_lossy(&out.stdout).into_owned();
        pem.contains("BEGIN CERTIFICATE").then_some(pem)
    });
    for r in &replicas {
        Cluster::eventually("both replicas ready", 30, || status_json(r).filter(|s| s["version"].as_u64() > Some(0)));
    }
    let secrets = c.kubectl_ok(&["get", "secrets", "-n", "mesh-system", "-o", "jsonpath={.items[*].metadata.name}"]);
    assert_eq!(secrets.split_whitespace().filter(|n| *n == "mesh-ca").count(), 1);

    // Exactly one leads: the Lease's holder, by /status and by the metric.
    let first = holder(&c);
    let (l, f) = match first.as_str() {
        "mesh-control-a" => (0, 1),
        "mesh-control-b" => (1, 0),
        other => panic!("Lease holder {other:?}"),
    };
    assert_eq!((leads(&replicas[l]), leads(&replicas[f])), (Some(true), Some(false)));
    assert_eq!((metric(&replicas[l], "leader"), metric(&replicas[f], "leader")), (Some(1.0), Some(0.0)));
    let election = status_json(&replicas[f]).expect("status")["election"].as_str().map(str::to_owned);
    assert!(election.as_deref().is_some_and(|e| e.contains("mesh-system/mesh-control-leader")), "{election:?}");

    // Both serve nodes: n1 through the leader, n2 through the follower (certificates, streams).
    let mut n1 = subscribe(&c, &replicas[l], &root, "n1").await;
    let mut n2 = subscribe(&c, &replicas[f], &root, "n2").await;
    c.apply(&policy("before"));
    n1.until("policy `before` at n1 (leader)", has_policy("before")).await;
    n2.until("policy `before` at n2 (follower)", has_policy("before")).await;
    Cluster::eventually("status of `before`", 20, || (condition(&c, "before") == "True/Accepted").then_some(()));
    assert!(metric(&replicas[l], "status_writes_total") >= Some(1.0));
    assert_eq!(metric(&replicas[f], "status_writes_total"), Some(0.0), "the follower writes no status");

    // The leader dies without releasing. A policy applied meanwhile gets no status until the
    // survivor leads; the survivor's stream to n2 keeps working throughout.
    replicas[l].child.kill().expect("SIGKILL");
    let killed = Instant::now();
    c.apply(&policy("during"));
    n2.until("policy `during` at n2 while nobody leads", has_policy("during")).await;
    let took = Cluster::eventually("the survivor leads", 30, || (leads(&replicas[f]) == Some(true)).then(|| killed.elapsed()));
    eprintln!("takeover after SIGKILL of the leader: {took:.1?}");
    // Lease 15 s counted from the survivor's last read of the dead leader's renewal (read every
    // 2 s): at most 15 + 2 s after the kill, plus our 0.2 s polling.
    assert!(took <= Duration::from_millis(17_500), "took {took:?}");
    assert_eq!(holder(&c), if f == 0 { "mesh-control-a" } else { "mesh-control-b" });
    Cluster::eventually("status of `during` by the new leader", 10, || (condition(&c, "during") == "True/Accepted").then_some(()));
    assert!(metric(&replicas[f], "status_writes_total") >= Some(1.0));
    c.apply(&policy("after"));
    n2.until("policy `after` at n2", has_policy("after")).await;

    // The dead one comes back (a restarted pod): a follower; then the leader is stopped the way
    // Kubernetes stops pods (SIGTERM), releases the Lease, and the other leads at its next read.
    replicas[l] = start_replica(&c, if l == 0 { "mesh-control-a" } else { "mesh-control-b" });
    Cluster::eventually("the restarted replica ready", 30, || status_json(&replicas[l]).filter(|s| s["version"].as_u64() > Some(0)));
    assert_eq!(leads(&replicas[l]), Some(false), "the survivor keeps the lead");
    let mut n1 = subscribe(&c, &replicas[l], &root, "n1").await;
    n1.until("the restarted replica serves n1", has_policy("after")).await;
    terminate(&replicas[f]);
    let stopped = Instant::now();
    let took = Cluster::eventually("the restarted replica leads", 10, || (leads(&replicas[l]) == Some(true)).then(|| stopped.elapsed()));
    eprintln!("takeover after SIGTERM of the leader (Lease released): {took:.1?}");
    assert!(took <= Duration::from_secs(4), "a released Lease is taken at the next read (2 s): took {took:?}");
    c.apply(&policy("last"));
    Cluster::eventually("status of `last`", 10, || (condition(&c, "last") == "True/Accepted").then_some(()));
    n1.until("policy `last` at n1", has_policy("last")).await;
}
