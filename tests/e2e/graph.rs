//! The live service graph (`mesh-control` `/graph`, `meshctl graph`) on real traffic, looked at
//! with a real browser: Debian's `chromium`, headless, run inside the controller's network
//! namespace (the test's own), pointed at the status port on that namespace's loopback. The
//! page's DOM must hold the workloads, the Service and the edges of the traffic the test makes,
//! with rates and the mTLS lock; a screenshot is kept in `target/test-artifacts/graph.png`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_tests::cluster::{Cluster, TCP_SERVICE_PORT, VIP};
use serde_json::Value;

use super::{cluster, eventually, repeat_in_pod};

const CHROMIUM: &str = "/usr/bin/chromium";
const GRAPH_URL: &str = "http://127.0.0.1:15014/graph";

/// The controller's namespace (the lab's underlay, where its status port listens on loopback).
fn control_netns(c: &Cluster) -> String {
    format!("{}{}-ul", mesh_tests::clean::PREFIX, c.lab.spec.run)
}

/// `cmd` inside the controller's namespace; its stdout. Panics with stderr when it fails.
fn in_control_netns(c: &Cluster, cmd: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &control_netns(c)])
        .args(cmd)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn graph_json(c: &Cluster) -> Value {
    let text = in_control_netns(
        c,
        &[
            "curl",
            "-fsS",
            "--max-time",
            "3",
            "http://127.0.0.1:15014/graph.json",
        ],
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/graph.json: {e}\n{text}"))
}

fn edge<'a>(g: &'a Value, from: &str, to: &str, protocol: &str) -> Option<&'a Value> {
    g["edges"].as_array()?.iter().find(|e| {
        e["source"] == from
            && e["target"].as_str().is_some_and(|t| t.starts_with(to))
            && e["protocol"] == protocol
    })
}

/// Where test artifacts go: `<target>/test-artifacts/` (this binary is `<target>/<profile>/deps/e2e-*`).
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create the artifact directory");
    dir
}

/// Headless chromium in the controller's namespace with a throwaway profile; `extra` says what
/// to produce (`--dump-dom`, `--screenshot=`). Root needs `--no-sandbox`.
fn chromium(c: &Cluster, profile: &Path, extra: &[&str]) -> String {
    let user_data = format!("--user-data-dir={}", profile.display());
    let mut cmd = vec![
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
        user_data.as_str(),
        // Long enough for the page's first redraw (1 s) from graph.svg.
        "--virtual-time-budget=4000",
        "--window-size=1220,440",
    ];
    cmd.extend_from_slice(extra);
    cmd.push(GRAPH_URL);
    in_control_netns(c, &cmd)
}

#[test]
fn service_graph_page_in_headless_chromium_shows_the_traffic_with_rates_and_mtls() {
    // Fails (not skips) without the browser: scripts/setup.sh installs it.
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's package `chromium` (scripts/setup.sh does)"
    );
    let mut c = cluster();
    // HTTP from the meshed client to Service whoami, and TCP to its echo port, for the whole
    // test: every edge the page must show is mTLS.
    let whoami = c.bins.whoami.display().to_string();
    let tcp = format!("{whoami} connect {VIP}:{TCP_SERVICE_PORT} --count 2 >/dev/null");
    let _http = repeat_in_pod(
        &mut c,
        "n1p1",
        "graph-http",
        40,
        &format!("curl -s -o /dev/null --max-time 2 http://{VIP}/; sleep 0.02"),
    );
    let _tcp_meshed = repeat_in_pod(
        &mut c,
        "n1p1",
        "graph-tcp",
        40,
        &format!("{tcp}; sleep 0.3"),
    );

    let g = wait_for_traffic(&c);
    eprintln!("graph: {g:#}");
    check_page(&c);
    screenshot(&c);
    check_meshctl(&c);
}

/// The graph once two scrapes (5 s apart) had the traffic between them; checked for it.
fn wait_for_traffic(c: &Cluster) -> Value {
    // Two scrapes (5 s apart) with the traffic in between.
    let mut g = Value::Null;
    let took = eventually(
        "the graph to show client → whoami (HTTP) and TCP",
        Duration::from_secs(30),
        || {
            g = graph_json(c);
            let http = edge(&g, "workload:demo/client", "service:demo/whoami", "http");
            // Through the Service when the daemon names it, else straight to a whoami workload.
            let tcp = edge(&g, "workload:demo/client", "", "tcp");
            http.is_some_and(|e| e["rps"].as_f64() > Some(0.0))
                && tcp.is_some_and(|e| e["connectionsPerSecond"].as_f64() > Some(0.0))
        },
    );
    eprintln!("the graph had the traffic after {took:?}");
    let to_service = edge(&g, "workload:demo/client", "service:demo/whoami", "http").expect("edge");
    assert_eq!(to_service["mtls"], true, "{to_service}");
    let tcp = edge(&g, "workload:demo/client", "", "tcp").expect("TCP edge");
    assert_eq!(tcp["mtls"], true, "{tcp}");
    // The client called only whoami (helloworld shares its endpoints, and the destination
    // daemons name it for TCP: the graph takes the Service from the client's side).
    assert!(
        g["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["id"] != "service:demo/helloworld"),
        "{g:#}"
    );
    assert!(
        to_service["errorPercent"].as_f64() < Some(1.0),
        "{to_service}"
    );
    assert!(
        to_service["p99Ms"].as_f64().is_some_and(|p| p > 0.0),
        "{to_service}"
    );
    let backends: Vec<&Value> = g["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .filter(|e| {
            e["source"] == "service:demo/whoami"
                && e["protocol"] == "http"
                && e["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("workload:demo/whoami-"))
        })
        .collect();
    assert!(
        !backends.is_empty() && backends.iter().all(|e| e["mtls"] == true),
        "{g:#}"
    );
    g
}

/// The page, as a browser builds it: nodes, the client's edge with its rate and lock, redrawn.
fn check_page(c: &Cluster) {
    // The page, as a browser builds it.
    let profile = std::env::temp_dir().join(format!("mesh-{}-chromium", c.lab.spec.run));
    let dom = chromium(c, &profile, &["--dump-dom"]);
    let _ = std::fs::remove_dir_all(&profile);
    for needle in [
        "data-id=\"workload:demo/client\"",
        "data-id=\"service:demo/whoami\"",
        "data-id=\"workload:demo/whoami-",
        "data-source=\"workload:demo/client\" data-target=\"service:demo/whoami\" data-protocol=\"http\"",
        "class=\"lock\"",
    ] {
        assert!(dom.contains(needle), "{needle} not in the page:\n{dom}");
    }
    let client_edge = dom
        .split("<g class=\"edge\"")
        .find(|e| e.contains("data-source=\"workload:demo/client\" data-target=\"service:demo/whoami\" data-protocol=\"http\""))
        .expect("the client's HTTP edge");
    let rps: f64 = client_edge
        .split("data-rps=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("data-rps");
    assert!(rps > 0.0, "{client_edge}");
    assert!(
        client_edge.contains("data-mtls=\"true\"") && client_edge.contains("class=\"lock\""),
        "{client_edge}"
    );
    // The script redrew the graph from graph.svg at least once.
    assert!(
        !dom.contains("data-refreshes=\"0\"") && dom.contains("updated "),
        "the page did not refresh itself:\n{dom}"
    );
}

/// A picture of the page, kept as a test artifact (and the README's).
fn screenshot(c: &Cluster) {
    let profile = std::env::temp_dir().join(format!("mesh-{}-chromium-shot", c.lab.spec.run));
    let png = artifacts().join("graph.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    chromium(c, &profile, &[&shot]);
    let _ = std::fs::remove_dir_all(&profile);
    let size = std::fs::metadata(&png).map_or(0, |m| m.len());
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        png.display()
    );
    eprintln!("screenshot of the service graph: {}", png.display());
}

/// meshctl graph gives the same picture from the same endpoint.
fn check_meshctl(c: &Cluster) {
    let dot = meshctl(c, &["graph", "--format", "dot"]);
    assert!(
        dot.contains("\"workload:demo/client\" -> \"service:demo/whoami\""),
        "{dot}"
    );
    let svg = artifacts().join("graph.svg");
    meshctl(
        c,
        &[
            "graph",
            "--format",
            "svg",
            "--file",
            &svg.display().to_string(),
        ],
    );
    let svg_text = std::fs::read_to_string(&svg).expect("meshctl wrote the SVG");
    assert!(
        svg_text.starts_with("<svg") && svg_text.contains("data-id=\"service:demo/whoami\""),
        "{svg_text}"
    );
    let table = meshctl(c, &["graph"]);
    assert!(
        table.lines().any(|l| l.starts_with("demo/client")
            && l.contains("demo/whoami")
            && l.ends_with("yes")),
        "{table}"
    );
    eprintln!("meshctl graph:\n{table}");
}

fn meshctl(c: &Cluster, args: &[&str]) -> String {
    super::meshctl::meshctl(c, args)
}
