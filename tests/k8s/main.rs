//! The mesh as users receive it, on a real two-node Kubernetes (`mesh_tests::k8s`: kubelet,
//! containerd and kube-proxy per node, in the lab's namespaces): `kubectl apply -f deploy/` with
//! the images `cargo xtask images` builds, a namespace labelled for the mesh, the sample app as
//! Deployments and a Service. Every assertion is on real traffic, real counters or the node's
//! real state. Root only; `cargo xtask test` builds the binaries and Kubernetes first.
//!
//! One cluster, phases in order (each prints what it measured):
//! 1. the DaemonSet and both controller replicas become Ready;
//! 2. pods are meshed: mutual TLS between nodes (identities in the metrics, only TLS on the node
//!    link), Service load balancing over pods on both nodes;
//!    `meshctl status` through the cluster's kubeconfig shows both nodes current, and `config`
//!    and `explain` read the daemons' loopback-only admin port through a port-forward;
//! 3. an AuthorizationPolicy applied with kubectl denies within a second and says `Accepted`;
//!    PeerAuthentication STRICT refuses the unmeshed client and a process of the node while the
//!    kubelet's readiness probes keep every pod Ready; the leading controller replica deleted,
//!    the other takes the Lease, and a new policy is enforced and gets its status;
//! 4. a pod added to a Deployment is meshed within seconds of becoming Ready;
//! 5. a rolling update of the DaemonSet under traffic (failed requests are reported, not hidden);
//! 6. `kubectl delete` of everything leaves each node as it was found.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{image, k8s::KubeCluster, require_root};
use support::{
    NodeState, VERSION, capture, contains, demo_app, deploy, dial, eventually, eventually_or, get, has_port, images, metric, metrics, node_state,
    pod_of, tally,
};

fn start() -> KubeCluster {
    require_root();
    let imgs = images();
    let run = format!("k{:x}", std::process::id());
    let c = KubeCluster::start(&run, 2, &imgs, &image::full_name(&format!("mesh-pause:{VERSION}"))).expect("the test cluster starts");
    println!("two nodes Ready in {:.1?}", c.time_to_ready);
    c
}

fn kubectl(c: &KubeCluster, args: &[&str]) -> String {
    c.kubectl_ok(args).unwrap_or_else(|e| panic!("{e}\n{}", diagnose(c)))
}

/// What a failed step prints: every pod, and the last lines of the mesh's own pods.
fn diagnose(c: &KubeCluster) -> String {
    let mut out = String::new();
    for args in [
        &["get", "pods", "-A", "-o", "wide"][..],
        &["logs", "-n", "mesh-system", "-l", "app.kubernetes.io/name=mesh-node", "--tail=60", "--prefix", "--timestamps"],
        &["logs", "-n", "mesh-system", "-l", "app.kubernetes.io/name=mesh-control", "--tail=15", "--prefix", "--timestamps"],
        &["get", "events", "-A", "--field-selector=type=Warning"],
        // A namespace stuck in Terminating says why in its conditions.
        &["get", "namespaces", "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,CONDITIONS:.status.conditions[*].message"],
    ] {
        let o = c.kubectl(args);
        out += &format!("$ kubectl {}\n{}{}\n", args.join(" "), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
    out
}

/// Why a namespace is stuck in Terminating: its status, every object left in it, and what the
/// controller-manager's namespace controller logged about it.
fn namespace_diagnosis(c: &KubeCluster, ns: &str) -> String {
    let mut out = diagnose(c);
    let o = c.kubectl(&["get", "namespace", ns, "-o", "yaml"]);
    out += &format!("$ kubectl get namespace {ns} -o yaml\n{}\n", String::from_utf8_lossy(&o.stdout));
    let kinds = c.kubectl(&["api-resources", "--namespaced=true", "--verbs=list", "-o", "name"]);
    for kind in String::from_utf8_lossy(&kinds.stdout).lines() {
        let o = c.kubectl(&["get", kind, "-n", ns, "-o", "name", "--ignore-not-found"]);
        let left = String::from_utf8_lossy(&o.stdout);
        if !left.trim().is_empty() || !o.status.success() {
            out += &format!("left in {ns}: {kind}: {} {}\n", left.trim().replace('\n', " "), String::from_utf8_lossy(&o.stderr).trim());
        }
    }
    let log = std::fs::read_to_string(c.log("kube-controller-manager")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("namespace")).collect();
    out += &format!("kube-controller-manager, last lines about namespaces:\n{}\n", lines[lines.len().saturating_sub(30)..].join("\n"));
    out
}

/// `meshctl bpf n<i> maps` (with `extra` arguments, e.g. `-o json`) on the host, where the
/// DaemonSet pins the node's maps: its output, or why it failed.
fn meshctl_bpf(c: &KubeCluster, i: u8, extra: &[&str]) -> String {
    let meshctl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/meshctl");
    let node = c.lab.node(i);
    std::process::Command::new(&meshctl)
        .arg("-q")
        .args(extra)
        .args(["bpf", &node.name, "maps", "--bpffs", &format!("/sys/fs/bpf/mesh/{}", node.name)])
        .output()
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .unwrap_or_else(|e| format!("meshctl: {e}"))
}

/// Why node `i` let plaintext into a STRICT pod: the config version it runs against the
/// controller's, its kernel maps (endpoint flags, drop counters), its kubelet trust and stream
/// metrics, this test's own cgroup (a trusted one would be admitted), and the usual diagnosis.
fn strict_diagnosis(c: &KubeCluster, i: u8) -> String {
    let bpf = meshctl_bpf(c, i, &[]);
    let wanted = ["mesh_control_", "mesh_datapath_", "mesh_kernel_", "mesh_sync_errors", "drops"];
    let m = metrics(c, i);
    let lines: Vec<&str> = m.lines().filter(|l| !l.starts_with('#') && wanted.iter().any(|w| l.contains(w))).collect();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    format!("node n{i}'s metrics:\n{}\nmeshctl bpf:\n{bpf}\nthis test's cgroup: {own}\n{}", lines.join("\n"), diagnose(c))
}

/// Phase 3b: STRICT for namespace demo. The whoami pods' readiness probes (the kubelet's TCP
/// connections every second, three failures make a pod NotReady) must keep passing while the
/// unmeshed client and a plain process in a node's namespace are refused.
fn strict_admits_the_mesh_and_the_kubelets_probes_only(c: &KubeCluster, client: &str, legacy: &str, vip: &str) {
    const STRICT: &str = "apiVersion: security.mesh.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
";
    c.apply(STRICT).expect("PeerAuthentication applies");
    let took = eventually("STRICT to refuse the unmeshed client", Duration::from_secs(10), || tally(&dial(c, legacy, vip, 2, 1000)).keys().eq(["FAILED"]));
    let meshed = tally(&dial(c, client, vip, 6, 3000));
    assert!(!meshed.contains_key("FAILED"), "meshed connections pass under STRICT: {meshed:?}\n{}", diagnose(c));
    // Both nodes hold the policy (each applies it when its own config stream delivers it; the
    // stream of one may just have moved to another controller replica).
    let (propagated, _) = both_nodes_current(c);
    // A process in node 1's network namespace that is neither the daemon nor the kubelet.
    let pod_ip = get(c, &["pods", "-n", "demo", "-l", "app=whoami", "--field-selector=spec.nodeName=n1"], "{.items[0].status.podIP}");
    let whoami = support::target_dir().join("mesh-whoami");
    let from_node = || {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", c.lab.node(1).netns))
            .arg(&whoami)
            .args(["connect", &format!("{pod_ip}:8080"), "--timeout-ms", "1500"])
            .output()
            .expect("run mesh-whoami");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The replica serving node 1 may see the PeerAuthentication a moment after it says node 1 is
    // current: retried for a few seconds.
    let mut host = from_node();
    let started = Instant::now();
    while !host.contains("ETIMEDOUT") && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        host = from_node();
    }
    assert!(host.contains("ETIMEDOUT"), "a node process's plaintext to a STRICT pod is refused: {host}\n{}", strict_diagnosis(c, 1));
    // What let the probes in: the kubelet's cgroup in the trusted-sender map, as meshctl shows it.
    let maps = meshctl_bpf(c, 1, &["-o", "json"]);
    let trusted = serde_json::from_str::<serde_json::Value>(&maps).map(|m| m["trusted"].clone()).unwrap_or_else(|e| panic!("meshctl bpf -o json: {e}: {maps}"));
    assert!(
        trusted.as_array().is_some_and(|t| t.iter().any(|e| e["process"] == "kubelet")),
        "meshctl bpf shows the kubelet as a trusted sender: {trusted}"
    );
    // Probes every second, NotReady after three failures: 6 s of Ready pods is 6 passed probes each.
    std::thread::sleep(Duration::from_secs(6));
    let ready = get(c, &["pods", "-n", "demo", "-l", "app=whoami"], "{.items[*].status.conditions[?(@.type==\"Ready\")].status}");
    assert!(!ready.is_empty() && ready.split_whitespace().all(|s| s == "True"), "the kubelet's probes pass under STRICT: Ready={ready}\n{}", diagnose(c));
    println!("STRICT: unmeshed client refused {took:.1?} after kubectl apply, both nodes current {propagated:.1?} later, meshed {meshed:?}, a node process refused, whoami pods Ready throughout 6 s of probes ({ready})");
    kubectl(c, &["delete", "peerauthentication", "strict", "-n", "demo"]);
    // Seen once (2026-12-02): node n1's two whoami pods kept refusing the unmeshed client (on n1)
    // for the whole 10 s after both nodes applied the deletion, while n2's pod admitted it; its
    // access log showed no plaintext connection, so the kernel dropped them. What each node's
    // kernel and daemon held then is printed if it recurs.
    let last = std::cell::RefCell::new(Vec::new());
    eventually_or(
        "STRICT to go",
        Duration::from_secs(10),
        || {
            *last.borrow_mut() = dial(c, legacy, vip, 2, 2000);
            !tally(&last.borrow()).contains_key("FAILED")
        },
        || format!("the unmeshed client's last tries: {:?}\n{}\n{}", last.borrow(), strict_diagnosis(c, 1), strict_diagnosis(c, 2)),
    );
}

/// `meshctl -o json <args>` through the test cluster's kubeconfig, in the underlay namespace
/// where the API server listens (as kubectl runs): never from the host's namespace, whose routes
/// lead off the machine. Its JSON; a failure panics with meshctl's error.
fn meshctl_json(c: &KubeCluster, args: &[&str]) -> serde_json::Value {
    let meshctl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/meshctl");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.underlay_ns()))
        .arg(&meshctl)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("run meshctl (built by cargo xtask test)");
    assert!(out.status.success(), "meshctl {} on the cluster: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("meshctl {} -o json: {e}: {}", args.join(" "), String::from_utf8_lossy(&out.stdout)))
}

/// `meshctl config` and `explain` through kubeconfig: they read the daemons' admin port, which
/// listens on each node's 127.0.0.1 only, through a port-forward (the kubelet dials it inside
/// the node's namespace). `explain` asks the client's node, then the destination's.
fn meshctl_config_and_explain_on_the_cluster(c: &KubeCluster, client: &str) {
    let started = Instant::now();
    let config = meshctl_json(c, &["config", "n1", "services"]);
    let services = config["services"].as_array().cloned().unwrap_or_default();
    assert!(services.iter().any(|s| s["namespace"] == "demo" && s["name"] == "whoami"), "n1's config has Service demo/whoami: {config:#}");
    let took_config = started.elapsed();
    let explained = meshctl_json(c, &["explain", &format!("demo/{client}"), "whoami.demo:80"]);
    assert_eq!(explained["source"]["verdict"], "allowed", "{explained:#}");
    assert_eq!(explained["destination"]["verdict"], "allowed", "{explained:#}");
    println!(
        "meshctl config and explain through kubeconfig (port-forward to the admin port): config {took_config:.1?}, explain from {} via {} ({:.1?})",
        explained["source"]["node"],
        explained["destination"]["node"],
        started.elapsed() - took_config
    );
}

/// `meshctl status` through the test cluster's kubeconfig (from the underlay namespace, as
/// kubectl): both nodes Ready, each having acked the current config version of the controller
/// replica serving it (acks may trail a change by a moment).
fn meshctl_status_on_the_cluster(c: &KubeCluster) {
    let (took, last) = both_nodes_current(c);
    println!("meshctl status through kubeconfig: both nodes Ready and current at version {} ({took:.1?})", last["control"]["version"]);
}

/// Polls `meshctl status` (up to 30 s) until both nodes are Ready and current; the time it took
/// and the last status.
fn both_nodes_current(c: &KubeCluster) -> (Duration, serde_json::Value) {
    let status = || meshctl_json(c, &["status"]);
    let started = Instant::now();
    let current = |v: &serde_json::Value| {
        let version = v["control"]["version"].as_u64().unwrap_or(0);
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        // `current`: acked the current version of the replica serving the node (each replica
        // numbers its own versions; meshctl merges their views).
        version > 0 && nodes.len() == 2 && nodes.iter().all(|n| n["ready"] == true && n["current"] == true)
    };
    let mut last = status();
    while !current(&last) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(300));
        last = status();
    }
    let took = started.elapsed();
    assert!(current(&last), "meshctl status after {took:.1?}: {last:#}\n{}", diagnose(c));
    let names: Vec<&str> = last["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, ["n1", "n2"], "{last:#}");
    (took, last)
}

#[test]
fn the_mesh_installed_with_kubectl_meshes_real_pods_on_two_nodes_and_uninstalls_cleanly() {
    let c = start();
    let before: Vec<NodeState> = (1..=2).map(|i| node_state(&c, i)).collect();

    // 1. Install as the README says.
    let started = Instant::now();
    let deploy = deploy();
    kubectl(&c, &["apply", "-f", &deploy.join("00-namespace.yaml").display().to_string()]);
    kubectl(&c, &["apply", "-f", &deploy.display().to_string()]);
    kubectl(&c, &["-n", "mesh-system", "rollout", "status", "deployment/mesh-control", "--timeout=120s"]);
    kubectl(&c, &["-n", "mesh-system", "rollout", "status", "daemonset/mesh-node", "--timeout=120s"]);
    let ready = get(&c, &["daemonset/mesh-node", "-n", "mesh-system"], "{.status.numberReady}");
    assert_eq!(ready, "2", "mesh-node Ready on both nodes");
    let replicas = get(&c, &["deployment/mesh-control", "-n", "mesh-system"], "{.status.readyReplicas}");
    assert_eq!(replicas, "2", "both controller replicas Ready");
    println!("deploy/: controller (2 replicas) and DaemonSet (2 nodes) Ready {:.1?} after kubectl apply", started.elapsed());

    // 2. The sample app, meshed by its namespace's label.
    let started = Instant::now();
    c.apply(&demo_app()).expect("the sample app applies");
    for d in ["whoami", "client", "legacy"] {
        kubectl(&c, &["-n", "demo", "rollout", "status", &format!("deployment/{d}"), "--timeout=120s"]);
    }
    println!("sample app Ready in {:.1?}", started.elapsed());
    let (client, legacy) = (pod_of(&c, "client"), pod_of(&c, "legacy"));
    let vip = format!("{}:80", get(&c, &["service/whoami", "-n", "demo"], "{.spec.clusterIP}"));
    let nodes_of: Vec<String> = get(&c, &["pods", "-n", "demo", "-l", "app=whoami"], "{.items[*].spec.nodeName}").split_whitespace().map(str::to_owned).collect();
    assert!(nodes_of.contains(&"n1".into()) && nodes_of.contains(&"n2".into()), "whoami on both nodes: {nodes_of:?}");
    // The workloads reach the nodes' daemons within a few seconds of being Ready.
    eventually("the client's first connections", Duration::from_secs(20), || tally(&dial(&c, &client, &vip, 3, 2000)).get("FAILED").is_none());

    let mut lines = Vec::new();
    let pcap = capture(&c, 1, || lines = dial(&c, &client, &vip, 30, 3000));
    let answered = tally(&lines);
    println!("meshed client -> {vip}: {answered:?}");
    assert!(!answered.contains_key("FAILED"), "{lines:?}\n{}", diagnose(&c));
    let backends = get(&c, &["pods", "-n", "demo", "-l", "app=whoami"], "{.items[*].metadata.name}");
    assert_eq!(answered.len(), 3, "every backend answered (both nodes): {answered:?} of {backends}");
    assert!(has_port(&pcap, 15008), "cross-node traffic is HBONE on 15008");
    assert!(!contains(&pcap, b"whoami name="), "no plaintext application bytes on the node link");
    let m2 = metrics(&c, 2);
    let mtls = metric(&m2, "istio_tcp_connections_opened_total", &[
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_principal=\"spiffe://cluster.local/ns/demo/sa/whoami\"",
        "connection_security_policy=\"mutual_tls\"",
    ]);
    assert!(mtls > 0.0, "node n2 reports mutual-TLS connections client -> whoami with both identities:\n{m2}");
    let plain = tally(&dial(&c, &legacy, &vip, 12, 3000));
    assert!(!plain.contains_key("FAILED"), "the unmeshed client is balanced too: {plain:?}");
    println!("unmeshed client -> {vip}: {plain:?}; identities seen on n2: {mtls} mTLS connections client -> whoami");

    // meshctl as a user runs it against a cluster: kubeconfig, the apiserver's pod proxy.
    meshctl_status_on_the_cluster(&c);
    meshctl_config_and_explain_on_the_cluster(&c, &client);

    // 3. A policy applied with kubectl.
    let deny = std::fs::read_to_string(deploy.join("examples/policies/deny-client-to-whoami.yaml")).expect("example policy");
    let applied = Instant::now();
    c.apply(&deny).expect("policy applies");
    let took = eventually("the DENY to take effect", Duration::from_secs(5), || dial(&c, &client, &vip, 1, 2000).iter().all(|l| !l.starts_with("connected") || support::who(l).is_none()));
    let name = get(&c, &["authorizationpolicies", "-n", "demo"], "{.items[0].metadata.name}");
    let accepted = eventually("status Accepted=True", Duration::from_secs(10), || {
        get(&c, &["authorizationpolicy", &name, "-n", "demo"], "{.status.conditions[?(@.type==\"Accepted\")].status}") == "True"
    });
    println!("AuthorizationPolicy {name}: denying {took:.1?} after kubectl apply (includes one kubectl exec), Accepted after {:.1?}", took + accepted);
    assert!(applied.elapsed() < Duration::from_secs(10));
    assert!(took < Duration::from_secs(1) + Duration::from_millis(1500), "denies within a second (plus the exec's own time): {took:?}");
    kubectl(&c, &["delete", "authorizationpolicy", &name, "-n", "demo"]);
    eventually("the DENY to go", Duration::from_secs(5), || tally(&dial(&c, &client, &vip, 3, 2000)).get("FAILED").is_none());

    // 3b. The leading controller replica goes away (a rolling update, a drained node): the other
    // one takes the Lease, and policies keep reaching the nodes and getting their status.
    let holder = || get(&c, &["lease", "mesh-control-leader", "-n", "mesh-system"], "{.spec.holderIdentity}");
    let leader = holder();
    let replicas = get(&c, &["pods", "-n", "mesh-system", "-l", "app.kubernetes.io/name=mesh-control"], "{.items[*].metadata.name}");
    assert!(replicas.split_whitespace().any(|p| p == leader), "the Lease is held by a replica: {leader:?} of {replicas}");
    kubectl(&c, &["delete", "pod", &leader, "-n", "mesh-system", "--wait=false"]);
    // The Deployment starts a replacement at once, which may win the released Lease as well
    // as the remaining replica: either is a new leader.
    let deleted = Instant::now();
    let mut seen = Vec::new();
    let current = || get(&c, &["pods", "-n", "mesh-system", "-l", "app.kubernetes.io/name=mesh-control", "--field-selector=status.phase=Running"], "{.items[*].metadata.name}");
    while deleted.elapsed() < Duration::from_secs(30) {
        let h = holder();
        if seen.last() != Some(&h) {
            seen.push(h.clone());
        }
        if !h.is_empty() && h != leader && current().split_whitespace().any(|p| p == h) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took_over = deleted.elapsed();
    let new_leader = seen.last().cloned().unwrap_or_default();
    assert!(
        !new_leader.is_empty() && new_leader != leader,
        "the Lease went {seen:?} in {took_over:.1?} (replicas before: {replicas}); mesh-system pods:\n{}",
        kubectl(&c, &["get", "pods", "-n", "mesh-system", "-o", "wide"])
    );
    c.apply(&deny).expect("policy applies");
    let denying = eventually("the DENY through the remaining replica", Duration::from_secs(10), || dial(&c, &client, &vip, 1, 2000).iter().all(|l| !l.starts_with("connected") || support::who(l).is_none()));
    let status = eventually("status Accepted=True from the new leader", Duration::from_secs(10), || {
        get(&c, &["authorizationpolicy", &name, "-n", "demo"], "{.status.conditions[?(@.type==\"Accepted\")].status}") == "True"
    });
    kubectl(&c, &["delete", "authorizationpolicy", &name, "-n", "demo"]);
    eventually("the DENY to go", Duration::from_secs(5), || tally(&dial(&c, &client, &vip, 3, 2000)).get("FAILED").is_none());
    kubectl(&c, &["-n", "mesh-system", "rollout", "status", "deployment/mesh-control", "--timeout=120s"]);
    let kind = if replicas.split_whitespace().any(|p| p == new_leader) { "the other replica" } else { "the replacement pod" };
    println!("leader {leader} deleted: {kind} {new_leader} held the Lease after {took_over:.1?} (holders seen: {seen:?}); a new DENY enforced {denying:.1?} and Accepted {status:.1?} later");
    strict_admits_the_mesh_and_the_kubelets_probes_only(&c, &client, &legacy, &vip);

    // 4. A pod added to a Deployment: meshed (known to its node's datapath) how long after Ready?
    let pods_before = |i| metric(&metrics(&c, i), "mesh_datapath_pods", &[]);
    let (p1, p2) = (pods_before(1), pods_before(2));
    kubectl(&c, &["scale", "deployment/whoami", "-n", "demo", "--replicas=4"]);
    let mut ready_at = None;
    let mut meshed_at = None;
    let scaled = Instant::now();
    eventually("the fourth whoami pod Ready and meshed", Duration::from_secs(60), || {
        if ready_at.is_none() && get(&c, &["deployment/whoami", "-n", "demo"], "{.status.readyReplicas}") == "4" {
            ready_at = Some(scaled.elapsed());
        }
        if meshed_at.is_none() && pods_before(1) + pods_before(2) > p1 + p2 {
            meshed_at = Some(scaled.elapsed());
        }
        ready_at.is_some() && meshed_at.is_some()
    });
    let (ready_at, meshed_at) = (ready_at.expect("ready"), meshed_at.expect("meshed"));
    println!("scaled whoami to 4: Ready after {ready_at:.1?}, in its node's datapath after {meshed_at:.1?}");
    assert!(meshed_at < ready_at + Duration::from_secs(5), "meshed within seconds of Ready: Ready after {ready_at:?}, meshed after {meshed_at:?}\n{}", diagnose(&c));
    let after = tally(&dial(&c, &client, &vip, 40, 3000));
    assert_eq!(after.len(), 4, "the new pod gets connections through the mesh: {after:?}");

    // 5. Rolling update of the DaemonSet under traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let (mut ok, mut failed) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                for l in dial(&c, &client, &vip, 20, 1000) {
                    if support::who(&l).is_some() { ok += 1 } else { failed += 1 }
                }
            }
            (ok, failed)
        });
        std::thread::sleep(Duration::from_secs(2));
        let rolled = Instant::now();
        kubectl(&c, &["-n", "mesh-system", "rollout", "restart", "daemonset/mesh-node"]);
        kubectl(&c, &["-n", "mesh-system", "rollout", "status", "daemonset/mesh-node", "--timeout=180s"]);
        println!("DaemonSet rolling update took {:.1?}", rolled.elapsed());
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        load.join().expect("load thread")
    });
    println!("during the DaemonSet rolling update: {failed} of {} meshed connections failed", ok + failed);
    // When each old daemon pod was told to stop and each new one started: the gaps the
    // failures above come from.
    let timeline = c.kubectl(&["get", "events", "-n", "mesh-system", "--sort-by=.lastTimestamp", "-o", "custom-columns=TIME:.lastTimestamp,REASON:.reason,OBJECT:.involvedObject.name"]);
    let timeline = String::from_utf8_lossy(&timeline.stdout);
    println!("mesh-node pods' events:\n{}", timeline.lines().filter(|l| l.contains("mesh-node") && ["Killing", "Started", "Created", "SuccessfulDelete", "SuccessfulCreate"].iter().any(|r| l.contains(r))).collect::<Vec<_>>().join("\n"));
    assert!(ok > 0, "traffic flowed during the update");
    let back = tally(&dial(&c, &client, &vip, 20, 3000));
    assert!(!back.contains_key("FAILED"), "after the update every connection succeeds: {back:?}\n{}", diagnose(&c));

    // 6. Uninstall: kubectl delete of everything; each node is left as it was found.
    let started = Instant::now();
    let out = c.kubectl(&["delete", "namespace", "demo", "--wait=true", "--timeout=120s"]);
    assert!(out.status.success(), "kubectl delete namespace demo: {}\n{}", String::from_utf8_lossy(&out.stderr), namespace_diagnosis(&c, "demo"));
    println!("namespace demo deleted in {:.1?}", started.elapsed());
    let out = c.kubectl(&["delete", "-f", &deploy.display().to_string(), "--wait=true", "--timeout=120s"]);
    println!("kubectl delete -f deploy/: {}", String::from_utf8_lossy(&out.stdout).trim().replace('\n', "; "));
    eventually("mesh-node pods gone", Duration::from_secs(90), || get(&c, &["pods", "-A", "-l", "app.kubernetes.io/name=mesh-node"], "{.items[*].metadata.name}").is_empty());
    for i in 1..=2u8 {
        let found = &before[usize::from(i - 1)];
        let deadline = Instant::now() + Duration::from_secs(10);
        while node_state(&c, i) != *found && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(node_state(&c, i), *found, "node n{i} is not left as it was found");
    }
    println!("uninstalled in {:.1?}: no mesh rule, route table, cgroup program or pin left on either node", started.elapsed());
}
