//! End-to-end scenarios on the whole mesh (`mesh_tests::cluster`): mesh-control in file mode,
//! a mesh-node per node with the eBPF datapath, the sample app. Every assertion is on real
//! traffic or real counters. Root only; `cargo xtask test` builds the binaries first.

mod explain;
mod graph;
mod jwt;
mod l7;
mod meshctl;
mod prometheus;
mod resilience;
mod traces;
mod upgrade;

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    LabSpec,
    capture::Capture,
    require_root,
    cluster::{APP_PORT, Binaries, Cluster, HTTP_PORT, METRICS_PORT, TCP_SERVICE_PORT, VIP, VIP_V2},
};

fn bins() -> Binaries {
    // target/<profile>/ is the parent of this test's deps/ directory.
    let exe = std::env::current_exe().expect("test executable");
    Binaries::in_dir(exe.parent().and_then(std::path::Path::parent).expect("target dir"))
}

fn cluster() -> Cluster {
    require_root();
    let spec = LabSpec::for_test(&[3, 2]);
    let base = std::env::temp_dir().join(format!("mesh-{}-e2e", spec.run));
    Cluster::start(spec, bins(), &base).expect("start the mesh")
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, TCP_SERVICE_PORT))
}

fn who(line: &str) -> Option<&str> {
    line.split("name=").nth(1).and_then(|s| s.split_whitespace().next())
}

fn answered(lines: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut t = std::collections::BTreeMap::new();
    for l in lines {
        *t.entry(who(l).unwrap_or("FAILED").to_owned()).or_insert(0) += 1;
    }
    t
}

/// Polls `f` until it is true or `limit` passes; returns how long it took.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Runs the shell line `command` in `pod` over and over for about `secs` seconds, in the
/// background (stopped when the returned process is dropped); logged as `<name>.log`.
fn repeat_in_pod(c: &mut Cluster, pod: &str, name: &str, secs: u32, command: &str) -> mesh_tests::PodProcess {
    let script = format!("end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do {command}; done");
    c.spawn_in_pod_logged(pod, name, "sh", &["-c", &script]).expect("start the load").0
}

fn metric(c: &Cluster, node: u8, name: &str, label: &str) -> u64 {
    let text = c.curl_on_node(node, &format!("http://127.0.0.1:{METRICS_PORT}/metrics")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .map(|v| v as u64)
        .sum()
}

fn set_healthy(c: &Cluster, pod_name: &str, healthy: bool) {
    let path = c.config_dir.join("cluster.yaml");
    let yaml = std::fs::read_to_string(&path).expect("cluster.yaml");
    let ip = c.lab.pod(pod_name).ip.to_string();
    let from = format!("addresses: [{ip}]}}");
    let to = if healthy { from.clone() } else { format!("addresses: [{ip}], healthy: false}}") };
    let updated = yaml.replace(&format!("addresses: [{ip}], healthy: false}}"), &from).replace(&from, &to);
    mesh_tests::cluster::write_atomic(&path, &updated).expect("write cluster.yaml");
}

#[test]
fn services_balance_across_nodes_and_a_removed_backend_gets_no_new_connections() {
    let c = cluster();
    for client in ["n1p1", "n1p3"] {
        let t = answered(&c.dial(client, vip(), &["--count", "30"]).expect("dial"));
        assert_eq!(t.keys().collect::<Vec<_>>(), ["n1p2", "n2p1", "n2p2"], "{client}: {t:?}");
    }
    set_healthy(&c, "n2p2", false);
    let took = eventually("n2p2 out of rotation", Duration::from_secs(5), || {
        let t = answered(&c.dial("n1p3", vip(), &["--count", "20"]).expect("dial"));
        !t.contains_key("n2p2")
    });
    for client in ["n1p1", "n1p3"] {
        let t = answered(&c.dial(client, vip(), &["--count", "30"]).expect("dial"));
        assert!(!t.contains_key("n2p2") && !t.contains_key("FAILED"), "{client} after removal: {t:?}");
    }
    eprintln!("backend removal took effect in {took:?}");
}

/// Captures the underlay bridge while `traffic` runs; returns the raw pcap bytes.
fn capture_underlay(c: &Cluster, traffic: impl FnOnce()) -> Vec<u8> {
    let file = std::env::temp_dir().join(format!("mesh-{}-ul.pcap", c.lab.spec.run));
    Capture::around(&format!("mesh-{}-ul", c.lab.spec.run), "br0", &file, traffic).expect("capture the underlay")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the capture holds an IPv4 TCP segment to `ip:port` (an option-less IPv4 header's
/// destination address is followed by the TCP source port, then the destination port).
fn has_segment_to(pcap: &[u8], ip: std::net::Ipv4Addr, port: u16) -> bool {
    pcap.windows(8).any(|w| w[..4] == ip.octets() && w[6..] == port.to_be_bytes())
}

#[test]
fn traffic_between_nodes_is_mutual_tls_on_the_wire_with_the_expected_identities() {
    let c = cluster();
    let marker = "PLAINTEXT-MARKER-7f3a";
    let url = format!("http://{}:{HTTP_PORT}/{marker}", c.lab.pod("n2p1").ip);
    let curl = |pod: &str| {
        let out = c.lab.run_in_pod(pod, "curl", &["-s", "--max-time", "3", &url]).expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut meshed_reply = String::new();
    let meshed = capture_underlay(&c, || meshed_reply = curl("n1p1"));
    assert!(meshed_reply.contains(marker), "the request must arrive: {meshed_reply}");
    // MESH_INBOUND_TRANSPARENT (on in the lab): the server sees the client pod, not a node.
    let client = format!("\"peer\":\"{}:", c.lab.pod("n1p1").ip);
    assert!(meshed_reply.contains(&client), "the server saw {meshed_reply}");
    assert!(!contains(&meshed, marker.as_bytes()), "meshed traffic crossed the underlay in plaintext");
    // HBONE goes to the destination pod's address on 15008, as ztunnel sends it; node 2's
    // routing delivers it to its daemon.
    assert!(has_segment_to(&meshed, c.lab.pod("n2p1").ip, 15008), "no HBONE to n2p1:15008 on the underlay");
    // The same request from the unmeshed pod is plaintext: proves the capture sees payloads.
    let plain = capture_underlay(&c, || drop(curl("n1p3")));
    assert!(contains(&plain, marker.as_bytes()), "control: plaintext should be visible");

    let m = c.curl_on_node(2, &format!("http://127.0.0.1:{METRICS_PORT}/metrics")).expect("metrics");
    let opened = |policy: &str| {
        let policy = format!("connection_security_policy=\"{policy}\"");
        m.lines().find(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains("reporter=\"destination\"") && l.contains(&policy))
    };
    // The unmeshed pod's plaintext met node 2's daemon too (its plaintext listener), reported
    // without mTLS.
    assert!(opened("unknown").is_some(), "the plaintext connection is reported at the destination:\n{m}");
    let line = opened("mutual_tls").expect("destination-side mTLS connection metric");
    for expected in [
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_principal=\"spiffe://cluster.local/ns/demo/sa/whoami\"",
        "connection_security_policy=\"mutual_tls\"",
        // The request went to the pod's address, which serves two Services on that port
        // (whoami and helloworld); like ztunnel's inbound guess, the daemon names one of them,
        // the first by namespace and name, so both nodes agree.
        "destination_service=\"helloworld.demo.svc.cluster.local\"",
    ] {
        assert!(line.contains(expected), "{expected} missing in {line}");
    }
}

const DENY: &str = include_str!("../../deploy/examples/policies/deny-client-to-whoami.yaml");
const STRICT: &str = include_str!("../../deploy/examples/policies/strict-mtls.yaml");

#[test]
fn authorization_policy_applies_live_by_principal() {
    let c = cluster();
    assert_eq!(answered(&c.dial("n1p1", vip(), &["--count", "6"]).expect("dial")).get("FAILED"), None);
    c.apply_policy("deny", DENY).expect("apply");
    let took = eventually("the deny to take effect", Duration::from_secs(3), || {
        c.dial("n1p1", vip(), &["--timeout-ms", "1000"]).expect("dial").iter().all(|l| who(l).is_none())
    });
    let lines = c.dial("n1p1", vip(), &["--count", "10", "--timeout-ms", "1500"]).expect("dial");
    assert!(lines.iter().all(|l| who(l).is_none()), "client must be denied everywhere: {lines:?}");
    // Enforced at the destination nodes (n1 hosts whoami-1 too; n2 the others), counted there.
    let denials = metric(&c, 1, "mesh_authz_denials_total", "") + metric(&c, 2, "mesh_authz_denials_total", "");
    assert!(denials >= 10, "every refused connection is counted, got {denials}");
    c.delete_policy("deny").expect("delete");
    eventually("the deny to go away", Duration::from_secs(3), || c.dial("n1p1", vip(), &[]).expect("dial").iter().all(|l| who(l).is_some()));
    eprintln!("policy change took effect in {took:?}");
    assert!(took < Duration::from_secs(2), "a policy change must apply within ~1 s, took {took:?}");

    // Istio's "only requests with a valid JWT" rule on a TCP port: no connection can carry a
    // token, so it matches nothing and denies (Istio's semantics; it used to be pruned into
    // allow-all).
    c.apply_policy("jwt-only", JWT_ONLY).expect("apply");
    eventually("the JWT-only ALLOW policy to deny TCP connections", Duration::from_secs(3), || {
        c.dial("n1p1", vip(), &["--timeout-ms", "1000"]).expect("dial").iter().all(|l| who(l).is_none())
    });
    c.delete_policy("jwt-only").expect("delete");
    eventually("the JWT-only policy to go away", Duration::from_secs(3), || c.dial("n1p1", vip(), &[]).expect("dial").iter().all(|l| who(l).is_some()));
    // An Istio field this mesh does not implement: refused by name, and the policy fails closed.
    c.apply_policy("remote-ip", REMOTE_IP_ONLY).expect("apply");
    eventually("the refused ALLOW policy to deny (fail closed)", Duration::from_secs(3), || {
        c.dial("n1p1", vip(), &["--timeout-ms", "1000"]).expect("dial").iter().all(|l| who(l).is_none())
    });
    // The controller's status endpoint (loopback of the underlay namespace it runs in).
    let ul = format!("--net=/run/netns/{}{}-ul", mesh_tests::clean::PREFIX, c.lab.spec.run);
    let out = Command::new("nsenter").args([ul.as_str(), "curl", "-fsS", "--max-time", "3", "http://127.0.0.1:15014/status"]).output().expect("curl");
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    c.delete_policy("remote-ip").expect("delete");
    eventually("the refused policy to go away", Duration::from_secs(3), || c.dial("n1p1", vip(), &[]).expect("dial").iter().all(|l| who(l).is_some()));
    assert!(status.contains("remoteIpBlocks: not supported") && status.contains("fails closed"), "the status says what is refused and what is enforced: {status}");
}

const JWT_ONLY: &str = "apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: whoami-jwt-only, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami}}
  action: ALLOW
  rules:
  - from:
    - source: {requestPrincipals: [\"*\"]}
";

const REMOTE_IP_ONLY: &str = "apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: whoami-remote-ip, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami}}
  action: ALLOW
  rules:
  - from:
    - source: {remoteIpBlocks: [198.18.0.0/16]}
";

#[test]
fn strict_refuses_plaintext_from_an_unmeshed_pod_and_permissive_allows_it() {
    let mut c = cluster();
    let direct = SocketAddr::from((c.lab.pod("n2p1").ip, APP_PORT));
    assert_eq!(c.dial("n1p3", direct, &[]).expect("dial").first().and_then(|l| who(l)), Some("n2p1"), "PERMISSIVE: plaintext passes");
    c.apply_policy("strict", STRICT).expect("apply");
    eventually("STRICT in the kernel", Duration::from_secs(5), || {
        c.dial("n1p3", direct, &["--timeout-ms", "700"]).expect("dial").iter().all(|l| l.contains("ETIMEDOUT"))
    });
    // Kernel counters reach the metrics endpoint at the next sync (every couple of seconds).
    eventually("the drop to be counted on the destination node", Duration::from_secs(6), || {
        metric(&c, 2, "mesh_datapath_drops", "strict_plaintext") > 0
    });
    let meshed = answered(&c.dial("n1p1", SocketAddr::from((c.lab.pod("n2p1").ip, APP_PORT)), &["--count", "3"]).expect("dial"));
    assert_eq!(meshed.get("n2p1"), Some(&3), "meshed clients still get through (mTLS): {meshed:?}");
    // A process of the pod's own node is outside the mesh too: only the daemon's connections
    // (its socket mark) and the kubelet's (none here) get in.
    let node = c.lab.node(2).clone();
    let whoami = c.bins.whoami.display().to_string();
    let target = direct.to_string();
    let mut host = c.lab.spawn(&mesh_tests::Spawn::new(&node.netns, &node.system_cgroup, &whoami, &["connect", &target, "--timeout-ms", "700"])).expect("spawn");
    let line = host.wait_for_line("", Duration::from_secs(5));
    assert!(line.as_deref().is_ok_and(|l| l.contains("ETIMEDOUT")), "a plaintext connection from the node's own namespace: {line:?}");
}

#[test]
fn same_node_traffic_uses_the_bypass_and_stays_byte_exact() {
    let c = cluster();
    let before = metric(&c, 1, "mesh_datapath_events", "bypass_redirect");
    let target = SocketAddr::from((c.lab.pod("n1p2").ip, APP_PORT));
    let out = c.dial("n1p1", target, &["--echo", "8388608"]).expect("dial");
    assert!(out[0].ends_with("echo ok bytes=8388608"), "{out:?}");
    // Let the sync loop refresh the counters.
    let after = {
        std::thread::sleep(mesh_node::kernel_sync::RESCAN + Duration::from_millis(300));
        metric(&c, 1, "mesh_datapath_events", "bypass_redirect")
    };
    assert!(after > before, "same-node hops must be redirected socket to socket ({before} -> {after})");
}

#[test]
fn node_daemon_restart_keeps_kernel_served_connections_and_recovers_the_mesh() {
    let mut c = cluster();
    // A long-lived kernel-balanced connection (unmeshed client) runs round trips across the restart.
    let whoami = c.bins.whoami.display().to_string();
    let mut long_lived = c.lab.spawn_in_pod("n1p3", &whoami, &["rr", &vip().to_string(), "--count", "100000"]).expect("rr");
    // A request loop through the mesh (meshed client, via the daemon) during the restart.
    let started = Instant::now();
    c.stop_node(1);
    let mut failures = 0;
    let mut total = 0;
    let mut restarted = false;
    while started.elapsed() < Duration::from_secs(6) {
        if !restarted && started.elapsed() > Duration::from_millis(500) {
            c.start_node(1).expect("restart mesh-node");
            restarted = true;
        }
        let l = c.dial("n1p1", vip(), &["--timeout-ms", "500"]).expect("dial");
        total += 1;
        failures += usize::from(who(&l[0]).is_none());
    }
    let rr = long_lived.wait_for_line("\"kind\":\"rr\"", Duration::from_secs(60)).expect("long-lived connection survives");
    assert!(rr.contains("\"n\":100000"), "{rr}");
    let after = answered(&c.dial("n1p1", vip(), &["--count", "10"]).expect("dial"));
    assert!(!after.contains_key("FAILED"), "the mesh recovers after the restart: {after:?}");
    eprintln!("daemon restart: {failures} of {total} meshed requests failed while mesh-node was down; the kernel-served connection survived");
}

/// The restart row with socket activation (the harness holds the listeners as systemd would):
/// a request loop through the daemon of n1 while it is restarted (SIGTERM, 0.5 s without any
/// daemon, start), then while it crashes (SIGKILL, 0.5 s, start). Connections made while no
/// daemon runs wait in the held listeners' accept queues and are served by the next one.
#[test]
fn a_socket_activated_daemon_restarts_and_crashes_without_refusing_connections() {
    let mut c = cluster();
    c.stop_node(1);
    c.activate_sockets(1).expect("bind the node's listeners");
    c.start_node(1).expect("start a socket-activated mesh-node");
    assert!(std::fs::read_to_string(c.node_log(1)).unwrap_or_default().contains("socket activation"), "the daemon says it serves the passed listeners");
    let whoami = c.bins.whoami.display().to_string();
    let phase = |c: &mut Cluster, name: &str, stop: &dyn Fn(&mut Cluster)| -> (usize, usize, Duration) {
        // One connection and round trip after another, each allowed 5 s (a client's patience,
        // not the gap's length), for 6 s in all.
        let command = format!("{whoami} connect {} --timeout-ms 5000", vip());
        let mut load = repeat_in_pod(c, "n1p1", name, 6, &command);
        std::thread::sleep(Duration::from_secs(1));
        let stopped = Instant::now();
        stop(c);
        std::thread::sleep(Duration::from_millis(500));
        c.start_node(1).expect("start mesh-node again");
        let gap = stopped.elapsed();
        load.wait_exit(Duration::from_secs(30)).expect("the load ends");
        let text = std::fs::read_to_string(c.logs.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("connected") || l.starts_with("error")).collect();
        let failed: Vec<&&str> = lines.iter().filter(|l| who(l).is_none()).collect();
        eprintln!("{name}: {} of {} connections failed; no daemon for {gap:.1?}; the first failures: {:?}", failed.len(), lines.len(), &failed[..failed.len().min(5)]);
        (failed.len(), lines.len(), gap)
    };
    let (restart_failed, restart_total, _) = phase(&mut c, "restart", &|c| c.terminate_node(1).expect("SIGTERM"));
    let (crash_failed, crash_total, _) = phase(&mut c, "crash", &|c| c.stop_node(1));
    assert!(restart_total > 20 && crash_total > 20, "the loops ran: {restart_total}, {crash_total}");
    assert_eq!(restart_failed, 0, "a restart (SIGTERM, drain, start) refuses nothing with the listeners held");
    // SIGKILL takes the connections the daemon had accepted with it: at most the one in flight.
    assert!(crash_failed <= 1, "a crash loses at most the connection in flight: {crash_failed}");
}

const STRICT_V1: &str = "apiVersion: security.mesh.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: whoami-v1-strict, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami, version: v1.0}}
  mtls: {mode: STRICT}
";

/// Issue 14's "no gap on restart": both daemons killed (SIGKILL) and restarted while the
/// controller is down. Probes every ~10 ms (each a new plaintext connection) never get through
/// to a STRICT pod; after the restart the kernel still balances a Service VIP for an unmeshed
/// client, and each daemon runs the policies and Services it last applied (its config dump shows
/// them), from the file it saved; the kernel keeps its pinned state meanwhile.
#[test]
fn daemons_killed_and_restarted_without_the_controller_keep_enforcing_the_last_config() {
    let mut c = cluster();
    c.apply_policy("strict-v1", STRICT_V1).expect("apply");
    let strict_pod = SocketAddr::from((c.lab.pod("n2p1").ip, APP_PORT));
    eventually("STRICT on whoami v1.0 in the kernel", Duration::from_secs(5), || {
        c.dial("n1p3", strict_pod, &["--timeout-ms", "300"]).expect("dial").iter().all(|l| l.contains("ETIMEDOUT"))
    });
    let curl = mesh_tests::tools::curl().expect("curl").display().to_string();
    let get = |c: &Cluster, path: &str| {
        let out = c.lab.run_in_pod("n1p3", &curl, &["-sS", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{VIP_V2}{path}")]).expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get(&c, "/"), "200", "the unmeshed client reaches whoami-v2 through the kernel's VIP");
    c.stop_control();
    // The prober: a new plaintext connection to the STRICT pod every ~10 ms, each line logged.
    let whoami = c.bins.whoami.display().to_string();
    let script = format!("while true; do {whoami} connect {strict_pod} --timeout-ms 100; sleep 0.01; done");
    let (prober, probe_log) = c.spawn_in_pod_logged("n1p3", "strict-prober", "sh", &["-c", &script]).expect("start the prober");
    std::thread::sleep(Duration::from_millis(300));
    c.stop_node(1);
    c.stop_node(2);
    c.spawn_node(1).expect("restart n1 without the controller");
    c.spawn_node(2).expect("restart n2 without the controller");
    std::thread::sleep(Duration::from_secs(2));
    drop(prober);
    let log = std::fs::read_to_string(&probe_log).expect("probe log");
    let probes = log.lines().filter(|l| !l.trim().is_empty()).count();
    let leaks: Vec<&str> = log.lines().filter(|l| who(l).is_some()).collect();
    assert!(leaks.is_empty(), "plaintext got through to a STRICT pod across the restart: {leaks:?}");
    assert!(probes >= 10, "the prober ran throughout: {probes} probes");
    eventually("the kernel to balance the VIP after the restart, controller still down", Duration::from_secs(3), || get(&c, "/") == "200");
    // The daemons' own state (proxy-side policies and Services) came from the saved config.
    for n in 1..=2 {
        let dump = c.curl_on_node(n, "http://127.0.0.1:15000/config_dump").expect("config dump");
        assert!(dump.contains("whoami-v1-strict") && dump.contains("whoami-v2"), "n{n} runs its last config: {}", &dump[..dump.len().min(300)]);
    }
    for n in 1..=2 {
        let log = std::fs::read_to_string(c.node_log(n)).unwrap_or_default();
        assert!(log.contains("enforcing the last applied config"), "n{n} started from its saved config");
    }
    println!("restart without the controller: {probes} STRICT probes across the kill and restart, none got through; the VIP kept balancing");
}

#[test]
fn traffic_keeps_flowing_without_the_controller_and_changes_catch_up_on_restart() {
    let mut c = cluster();
    c.stop_control();
    // 40 connections: with three equal backends picked at random, 12 left one out 2.3 % of the
    // time (a CI run failed so); 40 leave one out with probability 3 × (2/3)^40 ≈ 3e-7.
    let t = answered(&c.dial("n1p1", vip(), &["--count", "40"]).expect("dial"));
    assert!(!t.contains_key("FAILED") && t.len() == 3, "last good config keeps serving: {t:?}");
    c.apply_policy("deny", DENY).expect("write policy while the controller is down");
    std::thread::sleep(Duration::from_millis(500));
    assert!(who(&c.dial("n1p1", vip(), &[]).expect("dial")[0]).is_some(), "nothing changes without the controller");
    c.start_control().expect("restart mesh-control");
    eventually("nodes to reconnect and apply the policy", Duration::from_secs(15), || {
        c.dial("n1p1", vip(), &["--timeout-ms", "1000"]).expect("dial").iter().all(|l| who(l).is_none())
    });
}
