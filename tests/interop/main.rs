//! Interop with a real ztunnel (istio/ztunnel): the four pairings of a client-side and a
//! server-side proxy, ours or ztunnel's, between pod n1p1 (node 1, identity `a`) and pod n2p1
//! (node 2, identity `b`), with ztunnel in its pods; and ztunnel ↔ ztunnel in the nodes'
//! namespaces, the side-by-side benchmark's topology (so the benchmark measures a path that is
//! known to work). Each: 1 MB echoed intact three times, HBONE on the underlay and no
//! plaintext, and each side's record naming both identities. Root only.
//!
//! Runs when `MESH_ZTUNNEL_BIN` names a ztunnel built from its repository (docs/ztunnel.md);
//! without it the suite says "not run" and passes nothing. It has its own `main` (no libtest
//! harness) for exactly that: libtest would count a test that returns early as passed.
//!
//! `cargo xtask test interop` runs it alone; `cargo xtask test` runs it with the other suites.

#[path = "../node/mesh.rs"]
#[allow(dead_code, reason = "shared with the node suite and the benchmark")]
mod mesh;

use std::{process::ExitCode, time::Duration};

use mesh::{MeshLab, Options, Proxy, curl_in};
use mesh_tests::ztunnel::{self, Placement};

const A: &str = "spiffe://cluster.local/ns/default/sa/a";
const B: &str = "spiffe://cluster.local/ns/default/sa/b";

fn main() -> ExitCode {
    // libtest's arguments (`--test-threads=1`, `--nocapture`, a name filter) may be passed:
    // a filter selects pairings by name, the rest is ignored.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let (pod, node) = (Placement::Pod, Placement::Node);
    // The four pairings with ztunnel in its pods (as ambient runs it: HBONE from the pod's
    // address), and ztunnel ↔ ztunnel in the nodes' namespaces: the benchmark's topology.
    let pairings = [
        (Proxy::Mesh, Proxy::Ztunnel, pod),
        (Proxy::Ztunnel, Proxy::Mesh, pod),
        (Proxy::Ztunnel, Proxy::Ztunnel, pod),
        (Proxy::Mesh, Proxy::Mesh, pod),
        (Proxy::Ztunnel, Proxy::Ztunnel, node),
    ];
    let selected: Vec<_> = pairings.iter().filter(|p| filters.is_empty() || filters.iter().any(|f| name(**p).contains(f.as_str()))).collect();
    if selected.is_empty() {
        println!("interop: no pairing matches {filters:?}");
        return ExitCode::SUCCESS;
    }
    let bin = match ztunnel::binary() {
        Ok(Some(bin)) => bin,
        Ok(None) => {
            println!("interop: NOT RUN: {} is not set (no ztunnel binary; see docs/ztunnel.md). 0 pairings run, 0 passed.", ztunnel::ENV_BIN);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("interop: {e}");
            return ExitCode::FAILURE;
        }
    };
    mesh_tests::require_root();
    println!("interop: ztunnel {} ({})", bin.display(), version(&bin));
    let mut failed = Vec::new();
    for &&pairing in &selected {
        let what = name(pairing);
        match std::panic::catch_unwind(|| check(pairing)) {
            Ok(()) => println!("interop: {what} ... ok"),
            Err(_) => {
                println!("interop: {what} ... FAILED");
                failed.push(what);
            }
        }
    }
    println!("interop: {} of {} pairings passed", selected.len() - failed.len(), selected.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("interop: failed: {failed:?}");
        ExitCode::FAILURE
    }
}

fn name((client, server, placement): Pairing) -> String {
    let side = |p| match p {
        Proxy::Mesh => "mesh",
        Proxy::Ztunnel => "ztunnel",
    };
    let on_nodes = if placement == Placement::Node && [client, server].contains(&Proxy::Ztunnel) { "_on_nodes" } else { "" };
    format!("interop::{}_to_{}{on_nodes}", side(client), side(server))
}

fn version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

/// The client side's proxy, the server side's, and where a ztunnel runs.
type Pairing = (Proxy, Proxy, Placement);

fn check((client, server, placement): Pairing) {
    let proxies = (client, server);
    let m = MeshLab::start_with(Options { proxies: [client, server], ztunnel_placement: placement, ..Options::default() });
    let target = format!("{}:8080", m.lab.pod("n2p1").ip);

    let capture = m.capture_underlay();
    let out = m.run_in_pod("n1p1", &["connect", &target, "--echo", "1000000", "--count", "3"]);
    let dump = capture.finish();
    let logs = || format!("node 1's proxy:\n{}\nnode 2's proxy:\n{}", tail(&m.proxy_log(1)), tail(&m.proxy_log(2)));
    assert!(out.lines().filter(|l| l.contains("echo ok bytes=1000000")).count() == 3, "1 MB echoed three times: {out}\n{}", logs());
    assert!(out.contains("name=n2p1"), "{out}");
    assert!(dump.contains(".15008"), "HBONE on 15008 crosses the underlay:\n{}", head(&dump));
    assert!(!dump.contains("whoami name="), "the app's plaintext crossed the underlay:\n{}", head(&dump));
    assert!(!dump.contains(".8080"), "a plaintext connection to the app port crossed the underlay:\n{}", head(&dump));

    // Each side's record of the connections names both identities.
    std::thread::sleep(Duration::from_millis(500));
    for (node, proxy, reporter) in [(1, proxies.0, "source"), (2, proxies.1, "destination")] {
        match proxy {
            Proxy::Mesh => {
                let metrics = curl_in(&m.lab.node(node).netns, "http://127.0.0.1:15020/metrics");
                let want = [
                    "istio_tcp_connections_opened_total{".to_owned(),
                    format!("reporter=\"{reporter}\""),
                    format!("source_principal=\"{A}\""),
                    format!("destination_principal=\"{B}\""),
                    "connection_security_policy=\"mutual_tls\"".to_owned(),
                    // The client workload resolved: from ztunnel's `forwarded: for="<ip>:<port>"`
                    // or, as ztunnel dials from the pod, from the connection's source (both agree
                    // here; the unit tests of `hbone::forwarded_for` cover ztunnel's form).
                    "source_workload=\"a\"".to_owned(),
                    "destination_workload=\"b\"".to_owned(),
                ];
                let line = metrics.lines().find(|l| want.iter().all(|w| l.contains(w.as_str())));
                let line = line.unwrap_or_else(|| panic!("node {node}: no {reporter} sample with both identities:\n{metrics}"));
                assert!(line.ends_with(" 3"), "node {node}: three connections: {line}");
            }
            Proxy::Ztunnel => {
                let log = m.proxy_log(node);
                let done: Vec<&str> = log.lines().filter(|l| l.contains("access") && l.contains("connection complete")).collect();
                assert!(
                    done.len() >= 3 && done.iter().all(|l| l.contains(A) && l.contains(B) && !l.contains("error=")),
                    "node {node}: ztunnel's access log should show three connections from {A} to {B}:\n{log}"
                );
            }
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn head(s: &str) -> String {
    s.lines().take(40).collect::<Vec<_>>().join("\n")
}
