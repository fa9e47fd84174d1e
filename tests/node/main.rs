//! The node daemon between two lab nodes: pod n1p1 (meshed, identity `a`) on node 1 talks to pod
//! n2p1 (meshed, `b`) on node 2 through both daemons. Root only; run with `cargo xtask test`.
//!
//! Until the datapath's capture lands, iptables stands in for it: on node 1, `REDIRECT` of the
//! meshed pods' TCP to the outbound port 15001 (the daemon reads `SO_ORIGINAL_DST` exactly as it
//! will from the cgroup/getsockopt program); on node 2, `REDIRECT` of plaintext arriving for the
//! meshed pod to 15006. The daemons run with `MESH_DATAPATH=off`.

#[allow(dead_code, reason = "shared with the benchmark, which uses more of it")]
mod mesh;

use std::time::Duration;

use mesh::{MeshLab, curl_in};

#[test]
fn pod_to_pod_across_nodes_is_encrypted_authorized_and_measured() {
    mesh_tests::require_root();
    let m = MeshLab::start();
    let target = format!("{}:8080", m.lab.pod("n2p1").ip);

    // Data intact through both daemons; the capture on the underlay sees only TLS.
    let capture = m.capture_underlay();
    let out = m.run_in_pod("n1p1", &["connect", &target, "--echo", "1000000", "--count", "3"]);
    assert!(out.lines().count() == 3 && out.lines().all(|l| l.contains("echo ok bytes=1000000")), "meshed echo failed: {out}");
    assert!(out.contains("name=n2p1"), "{out}");
    let dump = capture.finish();
    assert!(dump.contains(".15008"), "the pods' traffic crosses the underlay as HBONE on 15008:\n{}", head(&dump));
    assert!(!dump.contains("whoami name="), "plaintext of the app seen on the underlay:\n{}", head(&dump));
    assert!(!dump.contains(".8080"), "no plaintext connection to the app port on the underlay:\n{}", head(&dump));

    // A principal denied by policy is refused: the captured connection is accepted by node 1's
    // daemon (as with any transparent proxy), then closed before the server is reached, so the
    // client never reads the server's greeting.
    let out = m.run_in_pod("n1p2", &["connect", &target, "--timeout-ms", "3000"]);
    assert!(!out.contains("whoami name="), "the denied principal must be refused: {out}");

    // STRICT: the unmeshed pod's plaintext is refused at node 2.
    let out = m.run_in_pod("n1p3", &["connect", &target, "--timeout-ms", "3000"]);
    assert!(!out.contains("whoami name="), "STRICT must refuse plaintext from an unmeshed pod: {out}");

    // Metrics at the destination carry Istio's labels, and promtool accepts the exposition.
    std::thread::sleep(Duration::from_millis(300));
    let metrics = curl_in(&m.lab.node(2).netns, "http://127.0.0.1:15020/metrics");
    let want = [
        "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"a\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/a\"",
        "destination_workload=\"b\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/b\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let line = metrics.lines().find(|l| want.iter().all(|w| l.contains(w))).unwrap_or_else(|| panic!("no opened sample with Istio labels:\n{metrics}"));
    assert!(line.ends_with(" 3"), "three connections: {line}");
    assert!(metrics.contains("mesh_authz_denials_total{reason=\"deny_policy\"} 1"), "{metrics}");
    assert!(metrics.contains("mesh_authz_denials_total{reason=\"strict_mtls\"} 1"), "{metrics}");
    let check = mesh_tests::tools::promtool_check(&metrics);
    assert!(check.status.success(), "promtool check metrics: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
}

fn head(s: &str) -> String {
    s.lines().take(40).collect::<Vec<_>>().join("\n")
}
