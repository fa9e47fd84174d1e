//! Issue 14's hitless upgrade: both node daemons are replaced, one after the other and five
//! times each, while real clients keep the mesh busy: HTTP/1.1 keep-alive and HTTP/2 load at a
//! fixed rate, a long-lived TCP stream whose echo is checked byte for byte, and new TCP
//! connections back to back. Each new daemon takes the listening sockets over from the running
//! one (`MESH_HANDOFF_SOCKET`), which drains and exits. Not one request or connection may fail.

use std::time::{Duration, Instant};

use mesh_tests::{
    cluster::{TCP_SERVICE_PORT, VIP},
    whoami::load::Report,
};

use super::{cluster, l7::load};

/// Upgrades per node.
const ROUNDS: usize = 5;

#[test]
fn daemons_upgraded_under_load_lose_no_request_and_no_connection() {
    let mut c = cluster();
    // Why an upstream request failed, should one fail (the access log only has its flag).
    c.node_log = "info,mesh_l7::forward=debug".into();
    let whoami = c.bins.whoami.display().to_string();
    let url = format!("http://{VIP}/");
    let before = load(&c, &["--url", &url, "--rate", "200", "--duration", "2", "--connections", "4"]);
    assert_eq!(before.ok, before.scheduled, "the mesh serves before the upgrades: {before:?}");

    let secs = "22";
    let (h1, h1_log) = c.spawn_in_pod_logged("n1p1", "upgrade-h1", &whoami, &["http-load", "--url", &url, "--rate", "200", "--duration", secs, "--connections", "4"]).expect("h1 load");
    let (h2, h2_log) = c.spawn_in_pod_logged("n1p1", "upgrade-h2", &whoami, &["http-load", "--url", &url, "--rate", "200", "--duration", secs, "--connections", "2", "--h2", "--streams", "8"]).expect("h2 load");
    let tcp = format!("{VIP}:{TCP_SERVICE_PORT}");
    // Long-lived streams, each shorter than the drain deadline (10 s) that bounds how long a
    // replaced daemon keeps serving the connections it had.
    let script = format!("end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do {whoami} rr {tcp} --count 3000 --size 1024 || exit 1; done");
    let (rr, rr_log) = c.spawn_in_pod_logged("n1p1", "upgrade-rr", "sh", &["-c", &script]).expect("rr");
    // New connections back to back, each with a checked echo, from three pods at once.
    let connects = format!("end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do {whoami} connect {tcp} --count 200 --echo 64 --timeout-ms 2000; done");
    let (conn_a, conn_a_log) = c.spawn_in_pod_logged("n1p1", "upgrade-connect-a", "sh", &["-c", &connects]).expect("connect");
    let (conn_b, conn_b_log) = c.spawn_in_pod_logged("n2p1", "upgrade-connect-b", "sh", &["-c", &connects]).expect("connect");
    let (conn_c, conn_c_log) = c.spawn_in_pod_logged("n1p2", "upgrade-connect-c", "sh", &["-c", &connects]).expect("connect");
    let started = Instant::now();

    // An upgrade every 1.5 s, the nodes in turn: a replaced daemon may still be draining its
    // long-lived streams when its successor is replaced in turn.
    let mut took = Vec::new();
    let mut draining: Vec<(Instant, mesh_tests::PodProcess)> = Vec::new();
    let mut drained = Vec::new();
    // Each replaced daemon drains (its HTTP connections move within DRAIN_GRACE, its streams end)
    // and exits by itself, cleanly, within the drain deadline: polled between upgrades.
    let mut reap = |draining: &mut Vec<(Instant, mesh_tests::PodProcess)>| {
        draining.retain_mut(|(at, old)| match old.wait_exit(Duration::ZERO) {
            Ok(status) => {
                assert!(status.success(), "a replaced daemon exits cleanly: {status}");
                drained.push(at.elapsed());
                false
            }
            Err(_) => {
                assert!(at.elapsed() < Duration::from_secs(12), "a replaced daemon exits within its drain deadline (10 s)");
                true
            }
        });
    };
    for n in 0..2 * ROUNDS {
        let next = started + Duration::from_millis(2000 + 1500 * n as u64);
        while Instant::now() < next {
            reap(&mut draining);
            std::thread::sleep(Duration::from_millis(50));
        }
        let (took_over, old) = c.upgrade_node(if n % 2 == 0 { 1 } else { 2 }).expect("upgrade");
        took.push(took_over);
        draining.push((Instant::now(), old));
    }
    let upgrades_took = started.elapsed();
    while !draining.is_empty() {
        reap(&mut draining);
        std::thread::sleep(Duration::from_millis(50));
    }
    drained.sort();
    let report = |mut p: mesh_tests::PodProcess, log: &std::path::Path| -> Report {
        p.wait_exit(Duration::from_mins(1)).expect("load ends");
        let text = std::fs::read_to_string(log).expect("log");
        serde_json::from_str(text.lines().rfind(|l| l.starts_with('{')).unwrap_or_default()).unwrap_or_else(|e| panic!("http-load report ({e}): {text}"))
    };
    for mut p in [conn_a, conn_b, conn_c] {
        p.wait_exit(Duration::from_mins(1)).expect("connects end");
    }
    let connecting = started.elapsed();
    let (h1, h2) = (report(h1, &h1_log), report(h2, &h2_log));
    let mut rr = rr;
    let rr_status = rr.wait_exit(Duration::from_mins(1)).expect("rr ends");
    let lines = |log: &std::path::Path| std::fs::read_to_string(log).expect("log").lines().map(str::to_owned).collect::<Vec<_>>();
    let rr_lines = lines(&rr_log);
    let connected: Vec<String> = [&conn_a_log, &conn_b_log, &conn_c_log].into_iter().flat_map(|l| lines(l)).collect();
    let failed_connects: Vec<&String> = connected.iter().filter(|l| !l.starts_with("connected ")).collect();

    assert!(upgrades_took < Duration::from_secs(22), "the upgrades ran while the load did: {upgrades_took:?}");
    for (r, log) in [(&h1, &h1_log), (&h2, &h2_log)] {
        let failures: Vec<String> = lines(log).into_iter().filter(|l| l.starts_with("http-load: request failed")).collect();
        assert_eq!((r.ok, r.errors), (r.scheduled, 0), "no {} request failed across {} upgrades: {r:?}; the client saw: {failures:#?}", r.protocol, 2 * ROUNDS);
    }
    assert!(rr_status.success() && !rr_lines.iter().any(|l| l.starts_with("error")), "every long-lived stream kept its bytes: {rr_lines:?}");
    assert!(rr_lines.iter().filter(|l| l.contains("\"kind\":\"rr\"")).count() >= 2, "streams ran throughout: {rr_lines:?}");
    assert!(failed_connects.is_empty(), "no new connection failed: {failed_connects:?}");
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let rate = connected.len() as f64 / connecting.as_secs_f64();
    assert!(rate >= 500.0, "new connections at 500/s or more throughout: {rate:.0}/s");
    println!(
        "hitless upgrade: {} upgrades under load; HTTP/1.1 {} of {} ok (p99 {} µs, {} before; {} resent on a new connection), HTTP/2 {} of {} ok (p99 {} µs); {} new connections ({rate:.0}/s), none failed; {} long-lived streams intact; take-over {:?}, replaced daemons exited after draining for {:?}",
        took.len(),
        h1.ok,
        h1.scheduled,
        h1.p99_us,
        before.p99_us,
        h1.retried_unsent,
        h2.ok,
        h2.scheduled,
        h2.p99_us,
        connected.len(),
        rr_lines.iter().filter(|l| l.contains("\"kind\":\"rr\"")).count(),
        took,
        drained,
    );
}
