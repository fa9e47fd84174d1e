//! Issue 14's hitless upgrade: both node daemons are replaced, one after the other and five
//! times each, while real clients keep the mesh busy: HTTP/1.1 keep-alive and HTTP/2 load at a
//! fixed rate, a long-lived TCP stream whose echo is checked byte for byte, and new TCP
//! connections, several in flight from each of three pods. Each new daemon takes the listening
//! sockets over from the running one (`MESH_HANDOFF_SOCKET`), which drains and exits. Not one
//! request or connection may fail, and the rate of new connections stays near what the same
//! clients reach in the same run with no upgrade.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_tests::{
    PodProcess,
    cluster::{Cluster, TCP_SERVICE_PORT, VIP},
    whoami::load::Report,
};

use super::cluster;

/// Upgrades per node.
const ROUNDS: usize = 5;

/// New connections in flight per client pod: one at a time, the rate would be bounded by one
/// round trip through two proxies rather than by what the daemons can take.
const CONNECT_CONCURRENCY: &str = "4";

/// The rate of new connections while daemons are replaced, as a share of the rate the same
/// clients reach in the same run with no upgrade. Ten daemon start-ups in 15 s take CPU from the
/// clients on a 2-vCPU machine (0.77 measured here); a take-over that stopped accepting for a
/// second each time would bring it near 0.5. An absolute floor would measure the machine: with
/// one connection at a time the debug-built lab reached 132-290/s with the same code.
const MIN_RATE_RATIO: f64 = 0.5;

/// The rate issue 14 names; printed next to what was reached.
const ISSUE_RATE: f64 = 500.0;

/// Issue 14's mixed load, running in the pods: HTTP/1.1 keep-alive and HTTP/2 at a fixed rate, a
/// long-lived TCP stream whose echo is checked, and new connections from three pods.
struct Load {
    h1: (PodProcess, PathBuf),
    h2: (PodProcess, PathBuf),
    rr: (PodProcess, PathBuf),
    connects: Vec<(PodProcess, PathBuf)>,
    started: Instant,
}

/// What the clients saw.
struct Seen {
    h1: Report,
    h2: Report,
    /// Long-lived streams that completed, each with its bytes intact.
    streams: usize,
    /// New connections made, all of them successful.
    connections: usize,
    /// New connections per second over the whole run.
    connect_rate: f64,
}

impl Load {
    fn start(c: &mut Cluster, phase: &str, secs: u32) -> Self {
        let whoami = c.bins.whoami.display().to_string();
        let url = format!("http://{VIP}/");
        let secs = secs.to_string();
        let h1 = c.spawn_in_pod_logged("n1p1", &format!("{phase}-h1"), &whoami, &["http-load", "--url", &url, "--rate", "200", "--duration", &secs, "--connections", "4"]).expect("h1 load");
        let h2 = c.spawn_in_pod_logged("n1p1", &format!("{phase}-h2"), &whoami, &["http-load", "--url", &url, "--rate", "200", "--duration", &secs, "--connections", "2", "--h2", "--streams", "8"]).expect("h2 load");
        let tcp = format!("{VIP}:{TCP_SERVICE_PORT}");
        // Long-lived streams, each shorter than the drain deadline (10 s) that bounds how long a
        // replaced daemon keeps serving the connections it had.
        let script = format!("end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do {whoami} rr {tcp} --count 3000 --size 1024 || exit 1; done");
        let rr = c.spawn_in_pod_logged("n1p1", &format!("{phase}-rr"), "sh", &["-c", &script]).expect("rr");
        let connect = ["connect", &tcp, "--duration", &secs, "--concurrency", CONNECT_CONCURRENCY, "--echo", "64", "--timeout-ms", "2000"];
        let connects = ["n1p1", "n2p1", "n1p2"].iter().map(|pod| c.spawn_in_pod_logged(pod, &format!("{phase}-connect-{pod}"), &whoami, &connect).expect("connect")).collect();
        Self { h1, h2, rr, connects, started: Instant::now() }
    }

    fn finish(self) -> Seen {
        let report = |(mut p, log): (PodProcess, PathBuf)| -> Report {
            p.wait_exit(Duration::from_mins(1)).expect("load ends");
            let text = std::fs::read_to_string(&log).expect("log");
            let report: Report = serde_json::from_str(text.lines().rfind(|l| l.starts_with('{')).unwrap_or_default()).unwrap_or_else(|e| panic!("http-load report ({e}): {text}"));
            let failures: Vec<&str> = text.lines().filter(|l| l.starts_with("http-load: request failed")).collect();
            assert_eq!((report.ok, report.errors), (report.scheduled, 0), "no {} request failed: {report:?}; the client saw: {failures:#?}", report.protocol);
            report
        };
        let mut connected = Vec::new();
        for (mut p, log) in self.connects {
            p.wait_exit(Duration::from_mins(1)).expect("connects end");
            connected.extend(lines(&log));
        }
        let connecting = self.started.elapsed();
        let (h1, h2) = (report(self.h1), report(self.h2));
        let (mut rr, rr_log) = self.rr;
        let rr_status = rr.wait_exit(Duration::from_mins(1)).expect("rr ends");
        let rr_lines = lines(&rr_log);
        assert!(rr_status.success() && !rr_lines.iter().any(|l| l.starts_with("error")), "every long-lived stream kept its bytes: {rr_lines:?}");
        let streams = rr_lines.iter().filter(|l| l.contains("\"kind\":\"rr\"")).count();
        assert!(streams >= 1, "streams ran: {rr_lines:?}");
        let failed: Vec<&String> = connected.iter().filter(|l| !l.starts_with("connected ")).collect();
        assert!(failed.is_empty(), "no new connection failed: {failed:?}");
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let connect_rate = connected.len() as f64 / connecting.as_secs_f64();
        Seen { h1, h2, streams, connections: connected.len(), connect_rate }
    }
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log).expect("log").lines().map(str::to_owned).collect()
}

#[test]
fn daemons_upgraded_under_load_lose_no_request_and_no_connection() {
    let mut c = cluster();
    // Why an upstream request failed, should one fail (the access log only has its flag).
    c.node_log = "info,mesh_l7::forward=debug".into();
    // The same load with no upgrade: what the clients reach on this machine, in this run.
    let before = Load::start(&mut c, "baseline", 6).finish();

    let secs = 22;
    let load = Load::start(&mut c, "upgrade", secs);
    let started = load.started;

    // An upgrade every 1.5 s, the nodes in turn: a replaced daemon may still be draining its
    // long-lived streams when its successor is replaced in turn.
    let mut took = Vec::new();
    let mut draining: Vec<(Instant, PodProcess)> = Vec::new();
    let mut drained = Vec::new();
    // Each replaced daemon drains (its HTTP connections move within DRAIN_GRACE, its streams end)
    // and exits by itself, cleanly, within the drain deadline: polled between upgrades.
    let mut reap = |draining: &mut Vec<(Instant, PodProcess)>| {
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
    let during = load.finish();

    assert!(upgrades_took < Duration::from_secs(u64::from(secs)), "the upgrades ran while the load did: {upgrades_took:?}");
    assert!(during.streams >= 2, "streams ran throughout: {} completed", during.streams);
    assert!(
        during.connect_rate >= MIN_RATE_RATIO * before.connect_rate,
        "new connections kept their rate across the upgrades: {:.0}/s, {:.0}/s with no upgrade (at least {MIN_RATE_RATIO} of it)",
        during.connect_rate,
        before.connect_rate
    );
    let (h1, h2) = (&during.h1, &during.h2);
    println!(
        "hitless upgrade: {} upgrades under load; HTTP/1.1 {} of {} ok (p99 {} µs, {} with no upgrade; {} resent on a new connection), HTTP/2 {} of {} ok (p99 {} µs, {} with no upgrade); {} new connections at {:.0}/s ({:.0}/s with no upgrade; issue 14 names {ISSUE_RATE:.0}/s{}), none failed; {} long-lived streams intact; take-over {:?}, replaced daemons exited after draining for {:?}",
        took.len(),
        h1.ok,
        h1.scheduled,
        h1.p99_us,
        before.h1.p99_us,
        h1.retried_unsent,
        h2.ok,
        h2.scheduled,
        h2.p99_us,
        before.h2.p99_us,
        during.connections,
        during.connect_rate,
        before.connect_rate,
        if during.connect_rate >= ISSUE_RATE { ": reached" } else { ": NOT reached on this machine" },
        during.streams,
        took,
        drained,
    );
}
