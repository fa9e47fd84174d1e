//! `http-load` against the app: it holds its rate, its percentiles are sane, and a stalled
//! server shows in them (coordinated omission). And the Debian load tools against the app.

use std::{thread, time::Duration};

use mesh_tests::{tools, whoami::load::Report};
use nix::{sys::signal, unistd::Pid};

use crate::{App, heavy, run, stdout, whoami};

fn http_load(args: &[&str]) -> Report {
    let out = whoami(&[&["http-load"], args].concat());
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn ordered(r: &Report) -> bool {
    0 < r.p50_us && r.p50_us <= r.p90_us && r.p90_us <= r.p99_us && r.p99_us <= r.p999_us && r.p999_us <= r.max_us
}

#[test]
fn http_load_holds_the_requested_rate_with_sane_percentiles() {
    let _heavy = heavy();
    let app = App::start();
    let r = http_load(&["--url", &app.url("/"), "--rate", "1000", "--duration", "2", "--connections", "4"]);
    assert_eq!((r.scheduled, r.sent, r.ok, r.errors), (2000, 2000, 2000, 0), "{r:?}");
    assert_eq!((r.status.get("200"), r.pods.get("app-1"), r.versions.get("v7")), (Some(&2000), Some(&2000), Some(&2000)), "{r:?}");
    assert!((r.achieved_rps - 1000.0).abs() < 50.0, "{r:?}");
    assert!(ordered(&r), "{r:?}");
    // Loopback, debug build, a busy 2-core machine: well under 20 ms unless something is wrong.
    assert!(r.p50_us < 20_000, "{r:?}");
    // Keep-alive on both sides: 2000 requests arrived over the 4 connections, no more.
    let peers: std::collections::BTreeSet<String> = app.requests().into_iter().map(|s| s.peer).collect();
    assert_eq!(peers.len(), 4, "{peers:?}");

    // HTTP/2 with a body: every request reaches the server with it.
    let r = http_load(&["--url", &app.url("/h2"), "--rate", "500", "--duration", "1", "--connections", "2", "--h2", "--body-size", "1000"]);
    assert_eq!((r.scheduled, r.ok, r.errors, r.protocol.as_str()), (500, 500, 0, "HTTP/2"), "{r:?}");
    assert!(ordered(&r), "{r:?}");
    let h2: Vec<_> = app.requests().into_iter().filter(|s| s.path == "/h2").collect();
    assert_eq!(h2.len(), 500);
    assert_eq!(h2.iter().map(|s| &s.peer).collect::<std::collections::BTreeSet<_>>().len(), 2, "16 streams on each of 2 connections");
    assert!(h2.iter().all(|s| (s.protocol.as_str(), s.method.as_str(), s.body_bytes) == ("HTTP/2", "POST", 1000)), "{:?}", h2[0]);
}

#[test]
fn http_load_counts_a_stall_against_every_request_due_during_it() {
    let _heavy = heavy();
    let app = App::start();
    let url = app.url("/");
    let load = thread::spawn(move || http_load(&["--url", &url, "--rate", "200", "--duration", "2", "--connections", "2"]));
    // Freeze the server for 500 ms in the middle of the run (the kernel still queues requests).
    let pid = Pid::from_raw(i32::try_from(app.pid()).expect("pid"));
    thread::sleep(Duration::from_millis(700));
    signal::kill(pid, signal::Signal::SIGSTOP).expect("SIGSTOP");
    thread::sleep(Duration::from_millis(500));
    signal::kill(pid, signal::Signal::SIGCONT).expect("SIGCONT");
    let r = load.join().expect("http-load");

    assert_eq!((r.scheduled, r.ok, r.errors), (400, 400, 0), "{r:?}");
    // About 100 of the 400 requests fell due during the stall, each late by 0..500 ms, so the
    // top decile is ~300 ms and p99 ~480 ms. Timing from the send instead would show about one
    // slow request per connection: a p99 of a few milliseconds.
    assert!(r.p90_us >= 150_000 && r.p99_us >= 350_000 && r.max_us >= 450_000, "the stall is hidden: {r:?}");
    assert!(r.p50_us < 50_000, "most requests were not stalled: {r:?}");
}

#[test]
fn h2load_and_wrk_drive_the_app() {
    let _heavy = heavy();
    let app = App::start();
    let h2load = tools::h2load().expect("h2load");
    // h2c with prior knowledge, 8 concurrent streams per connection; then HTTP/1.1.
    for (extra, protocol) in [(None, "h2c"), (Some("--h1"), "http/1.1")] {
        let args: Vec<&str> = extra.into_iter().chain(["-n", "400", "-c", "4", "-m", "8"]).collect();
        let out = stdout(&run(&h2load, &[&args[..], &[&app.url("/")]].concat()));
        assert!(out.contains(&format!("Application protocol: {protocol}")), "{out}");
        assert!(out.contains("400 succeeded, 0 failed, 0 errored"), "{out}");
    }
    let out = stdout(&run(&tools::wrk().expect("wrk"), &["-t1", "-c4", "-d1s", &app.url("/")]));
    assert!(out.contains("Requests/sec:") && !out.contains("Non-2xx") && !out.contains("Socket errors"), "{out}");
}
