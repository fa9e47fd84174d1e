//! Benchmark: cross-node pod-to-pod TCP through two mesh-node daemons (HBONE, mTLS) against the
//! same pods with no mesh, interleaved in one run. Root only, ignored by default:
//!
//! ```sh
//! cargo build --release --locked -p mesh-node --bins
//! cargo test --release --locked -p mesh-tests --features privileged --test bench-node -- --ignored --nocapture
//! ```
//!
//! Pinning (2 cores): load generators (iperf3 client and server, the latency/connection client)
//! on CPU 0, both daemons on CPU 1. "direct" removes the capture rules, nothing else.
//! Results are in `bench/results/node-l4.md`. `MESH_BENCH_SYSCALLS=1` counts each daemon's
//! system calls and context switches (`perf stat`) per GB of the first meshed bulk run and per
//! round trip of the first meshed request/response run.
//!
//! With `MESH_BENCH_ZTUNNEL=<ztunnel binary>` a second lab runs a real ztunnel pair (see
//! `mesh_tests::ztunnel`: dedicated mode, ztunnel's fake CA, in the nodes' namespaces with the
//! iptables capture our daemons get, so both pairs have one topology), pinned as ours, its
//! rounds interleaved with ours, each pair against its own direct baseline; a side-by-side table
//! follows. `MESH_BENCH_ZTUNNEL_IN_POD=1` runs ztunnel in the pods instead (its harness's way).
//! Results in `bench/results/ztunnel.md`.

#[path = "../node/mesh.rs"]
#[allow(dead_code, reason = "shared with the node suite; the benchmark uses part of it")]
mod mesh;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use mesh::{MeshLab, Options, Proxy};

/// Rounds of every measurement (`MESH_BENCH_ROUNDS` changes it, e.g. 1 while profiling).
fn rounds() -> usize {
    std::env::var("MESH_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(5)
}
const IPERF_SECS: &str = "5";
const RR_RATE: u32 = 1000;
const RR_SECS: u64 = 3;
const CPS_SECS: u64 = 3;

#[derive(Default)]
struct Samples {
    gbps: Vec<f64>,
    cpu_per_gb: Vec<(f64, f64)>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    pp_p50_us: Vec<f64>,
    cps: Vec<f64>,
    conn_p50_us: Vec<f64>,
}

/// One proxy pair under test, in its own lab, with its own direct baseline.
struct Arm {
    name: &'static str,
    lab: MeshLab,
    mesh: Samples,
    direct: Samples,
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn node_l4_mesh_vs_direct() {
    mesh_tests::require_root();
    let bench = Options { bench: true, ..Options::default() };
    let mut arms = vec![Arm { name: "mesh-node", lab: MeshLab::start_with(bench), mesh: Samples::default(), direct: Samples::default() }];
    // MESH_BENCH_ZTUNNEL (or MESH_ZTUNNEL_BIN): a real ztunnel pair beside ours, interleaved.
    match mesh_tests::ztunnel::binary().expect("the ztunnel binary") {
        Some(bin) => {
            let in_pod = std::env::var_os("MESH_BENCH_ZTUNNEL_IN_POD").is_some_and(|v| v == "1");
            let placement = if in_pod { mesh_tests::ztunnel::Placement::Pod } else { mesh_tests::ztunnel::Placement::Node };
            println!("ztunnel arm: {} (dedicated mode, placed {placement:?}; pinned as ours)", bin.display());
            let lab = MeshLab::start_with(Options { proxies: [Proxy::Ztunnel; 2], ztunnel_placement: placement, ..bench });
            arms.push(Arm { name: "ztunnel", lab, mesh: Samples::default(), direct: Samples::default() });
        }
        None => println!("no ztunnel arm: set MESH_BENCH_ZTUNNEL to a ztunnel binary to measure one beside ours"),
    }
    let mut iperf_servers = Vec::new();
    for arm in &mut arms {
        iperf_servers.push(arm.lab.lab.spawn_in_pod("n2p1", "taskset", &["-c", "0", "iperf3", "-s", "-p", "5201"]).expect("iperf3 -s"));
        arm.lab.set_capture(false);
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss: Vec<(u64, u64)> = arms.iter().map(|a| a.lab.daemon_rss_kib()).collect();
    for round in 0..rounds() {
        for arm in &mut arms {
            for meshed in [true, false] {
                let s = if meshed { &mut arm.mesh } else { &mut arm.direct };
                measure(&arm.lab, meshed, round, s, arm.name);
            }
            arm.lab.set_capture(false);
        }
    }
    let aes = openssl_aes128gcm_gbps();
    for (arm, idle) in arms.iter().zip(&idle_rss) {
        println!("\n## {}", arm.name);
        report(&arm.mesh, &arm.direct, aes);
        let after = arm.lab.daemon_rss_kib();
        println!(
            "RSS (MiB), client-side / server-side proxy: idle at start {:.1} / {:.1}; after the rounds {:.1} / {:.1}",
            idle.0 as f64 / 1024.0,
            idle.1 as f64 / 1024.0,
            after.0 as f64 / 1024.0,
            after.1 as f64 / 1024.0
        );
    }
    if let [ours, zt] = &arms[..] {
        side_by_side(ours, zt);
    }
}

/// The node daemons' memory: idle with the node suite's small config, idle with 10,000 more
/// Services of 10 endpoints each (100,000 endpoints), and with 1,000 open connections through
/// both daemons on top of that; with `MESH_BENCH_ZTUNNEL`, a ztunnel pair given the same
/// (its local XDS file). Target (issue 16): ≤ 12 MiB idle, ≤ 40 MiB at that scale.
#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn node_memory_at_scale() {
    const SERVICES: u32 = 10_000;
    const CONNECTIONS: usize = 1_000;
    mesh_tests::require_root();
    // The test process holds the client ends of the connections.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    let mib = |kib: (u64, u64)| format!("{:.1} / {:.1}", kib.0 as f64 / 1024.0, kib.1 as f64 / 1024.0);
    let mut arms = vec![("mesh-node", Options { bench: true, ..Options::default() })];
    if mesh_tests::ztunnel::binary().expect("the ztunnel binary").is_some() {
        arms.push(("ztunnel", Options { bench: true, proxies: [Proxy::Ztunnel; 2], ztunnel_placement: mesh_tests::ztunnel::Placement::Node, ..Options::default() }));
    }
    let mut rows = Vec::new();
    for (name, opts) in arms {
        let small = MeshLab::start_with(opts);
        std::thread::sleep(Duration::from_secs(1));
        let idle = mib(small.daemon_rss_kib());
        drop(small);
        let started = Instant::now();
        let m = MeshLab::start_with(Options { extra_services: SERVICES, ..opts });
        let ready = started.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let scaled = mib(m.daemon_rss_kib());
        let server = SocketAddr::new(m.lab.pod("n2p1").ip.into(), 8080);
        let held = m.in_pod_pinned("n1p1", move || {
            (0..CONNECTIONS)
                .map(|_| {
                    let s = TcpStream::connect(server).expect("connect");
                    read_greeting(&s);
                    s
                })
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_secs(1));
        let connected = mib(m.daemon_rss_kib());
        drop(held);
        rows.push(format!("| {name} | {idle} | {scaled} (ready {ready:.1?} after start) | {connected} |"));
    }
    println!("\n| RSS, MiB (node 1 / node 2) | idle, the node suite's config | idle, {SERVICES} more Services × 10 endpoints | and {CONNECTIONS} open connections through both |\n|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}

/// One meshed or direct round of every measurement on one lab.
fn measure(m: &MeshLab, meshed: bool, round: usize, s: &mut Samples, name: &str) {
    m.set_capture(meshed);
    let server = m.lab.pod("n2p1").ip;
    let cpu0 = m.daemon_cpu_secs();
    // MESH_BENCH_PERF=<file>: profile both proxies (`perf record`) during the first meshed bulk
    // run, into `<file>.<arm>`.
    let perf = std::env::var("MESH_BENCH_PERF").ok().filter(|_| meshed && round == 0).map(|out| {
        let pids = m.daemon_pids();
        // `<file>` ending in `.trace`: `perf trace -s`, system calls by kind and thread.
        let (tool, extra): (&[&str], &[&str]) = if out.ends_with(".trace") { (&["trace", "-s"], &[]) } else { (&["record"], &["-F", "2000", "-g"]) };
        Command::new("perf")
            .args(tool)
            .args(extra)
            .args(["-o", &format!("{out}.{name}"), "-p", &format!("{},{}", pids.0, pids.1), "--", "sleep", "3"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf")
    });
    // MESH_BENCH_SYSCALLS=1: count each proxy's system calls and context switches over the
    // first meshed bulk run (needs perf; `apt-get install linux-perf`).
    let count_syscalls = std::env::var_os("MESH_BENCH_SYSCALLS").is_some_and(|v| v == "1") && meshed && round == 0;
    let counting = count_syscalls.then(|| start_perf_stat(m));
    let (gbps, bytes) = iperf3(m, &server.to_string());
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    if let Some(counters) = counting {
        // Thousands per GB: divide by (bytes / 1e9) GB, then by 1e3.
        print_perf_stat(name, counters, bytes / 1e9 * 1e3, "k", "per GB (bulk, round 0)");
    }
    let cpu1 = m.daemon_cpu_secs();
    s.gbps.push(gbps);
    if meshed {
        let gb = bytes / 1e9;
        s.cpu_per_gb.push(((cpu1.0 - cpu0.0) / gb, (cpu1.1 - cpu0.1) / gb));
    }
    // With MESH_BENCH_SYSCALLS=1, the same counts over the first meshed request/response run,
    // per round trip: what each daemon does per message, where latency regressions show first.
    let counting = count_syscalls.then(|| start_perf_stat(m));
    let (p50, p99, trips) = m.in_pod_pinned("n1p1", move || request_response(SocketAddr::new(server.into(), 8080), Some(RR_RATE)));
    if let Some(counters) = counting {
        print_perf_stat(name, counters, trips, "", &format!("per round trip (64 B at {RR_RATE}/s, round 0)"));
    }
    let (pp50, _, _) = m.in_pod_pinned("n1p1", move || request_response(SocketAddr::new(server.into(), 8080), None));
    s.pp_p50_us.push(pp50);
    s.p50_us.push(p50);
    s.p99_us.push(p99);
    let (cps, conn_p50) = m.in_pod_pinned("n1p1", move || connections(SocketAddr::new(server.into(), 8080)));
    s.cps.push(cps);
    s.conn_p50_us.push(conn_p50);
    println!(
        "round {round} {name:9} {:6}: {gbps:6.2} Gbit/s  rr p50 {p50:6.1} us p99 {p99:6.1} us  ping-pong p50 {pp50:6.1} us  {cps:6.0} conn/s (p50 {conn_p50:6.1} us)",
        if meshed { "mesh" } else { "direct" }
    );
}

/// Ours against ztunnel, each as a ratio to its own direct baseline of the same rounds.
fn side_by_side(ours: &Arm, zt: &Arm) {
    let ratio = |m: &Samples, d: &Samples, f: fn(&Samples) -> &Vec<f64>| median(f(m)) / median(f(d));
    let added = |m: &Samples, d: &Samples, f: fn(&Samples) -> &Vec<f64>| median(f(m)) - median(f(d));
    println!("\n## side by side (each against its own direct baseline in the same rounds)\n");
    println!("| metric | ztunnel ↔ ztunnel | mesh-node ↔ mesh-node | ours vs ztunnel |\n|---|---|---|---|");
    let (zg, og) = (ratio(&zt.mesh, &zt.direct, |s| &s.gbps), ratio(&ours.mesh, &ours.direct, |s| &s.gbps));
    println!("| bulk, one stream (× direct) | {zg:.2}× | {og:.2}× | {:.2}× |", og / zg);
    for (what, f) in [
        ("64 B round trip p50 at 1000/s, added µs", (|s: &Samples| &s.p50_us) as fn(&Samples) -> &Vec<f64>),
        ("64 B round trip p99 at 1000/s, added µs", |s: &Samples| &s.p99_us),
        ("64 B ping-pong p50, added µs", |s: &Samples| &s.pp_p50_us),
        ("connection setup p50, added µs", |s: &Samples| &s.conn_p50_us),
    ] {
        let (z, o) = (added(&zt.mesh, &zt.direct, f), added(&ours.mesh, &ours.direct, f));
        println!("| {what} | +{z:.0} | +{o:.0} | {:.2}× |", o / z);
    }
    let (zc, oc) = (ratio(&zt.mesh, &zt.direct, |s| &s.cps), ratio(&ours.mesh, &ours.direct, |s| &s.cps));
    println!("| connections/s (× direct) | {zc:.2}× | {oc:.2}× | {:.2}× |", oc / zc);
    let cpu = |a: &Arm, side: fn(&(f64, f64)) -> f64| median(&a.mesh.cpu_per_gb.iter().map(side).collect::<Vec<_>>());
    for (what, side) in [("CPU-s per GB, client-side proxy", (|c: &(f64, f64)| c.0) as fn(&(f64, f64)) -> f64), ("CPU-s per GB, server-side proxy", |c| c.1)] {
        let (z, o) = (cpu(zt, side), cpu(ours, side));
        println!("| {what} | {z:.2} | {o:.2} | {:.2}× |", o / z);
    }
    println!("\n(ours vs ztunnel: above 1 is better for throughput and connections/s, below 1 is better for the rest)");
}

/// Starts counting each daemon's system calls and context switches (`perf stat`).
fn start_perf_stat(m: &MeshLab) -> [std::process::Child; 2] {
    let pids = m.daemon_pids();
    [pids.0, pids.1].map(|pid| {
        Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches", "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("perf stat")
    })
}

/// Stops both daemons' `perf stat` and prints their counts divided by `per` (`unit` names the
/// scale the division leaves, e.g. "k" for per-GB counts in thousands).
fn print_perf_stat(name: &str, counters: [std::process::Child; 2], per: f64, unit: &str, what: &str) {
    for (side, p) in ["client-side", "server-side"].iter().zip(counters) {
        let (syscalls, switches) = stop_perf_stat(p);
        println!("{name} {side} proxy: {:.1}{unit} system calls and {:.1}{unit} context switches {what}", syscalls / per, switches / per);
    }
}

/// Stops a `perf stat -x ,` run (SIGINT: it prints its counts) and returns (system calls,
/// context switches).
fn stop_perf_stat(p: std::process::Child) -> (f64, f64) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(p.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("stop perf stat");
    let out = p.wait_with_output().expect("perf stat");
    let text = String::from_utf8_lossy(&out.stderr);
    // CSV lines: value,unit,event,...
    let count = |event: &str| {
        text.lines()
            .find(|l| l.split(',').nth(2) == Some(event))
            .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("perf stat gave no {event}: {text}"))
    };
    (count("raw_syscalls:sys_enter"), count("context-switches"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.1}–{max:.1}")
}

fn report(mesh: &Samples, direct: &Samples, aes_gbps: f64) {
    let row = |what: &str, m: &[f64], d: &[f64], ratio: String| {
        println!("| {what} | {:.1} ({}) | {:.1} ({}) | {ratio} |", median(m), spread(m), median(d), spread(d));
    };
    println!("\n| metric (median, min–max of {}) | mesh | direct | mesh vs direct |\n|---|---|---|---|", rounds());
    row("bulk throughput, Gbit/s (iperf3, 1 stream)", &mesh.gbps, &direct.gbps, format!("{:.2}×", median(&mesh.gbps) / median(&direct.gbps)));
    row("64 B request/response p50, µs", &mesh.p50_us, &direct.p50_us, format!("+{:.0} µs", median(&mesh.p50_us) - median(&direct.p50_us)));
    row("64 B request/response p99, µs", &mesh.p99_us, &direct.p99_us, format!("+{:.0} µs", median(&mesh.p99_us) - median(&direct.p99_us)));
    row("64 B ping-pong back to back p50, µs", &mesh.pp_p50_us, &direct.pp_p50_us, format!("+{:.0} µs", median(&mesh.pp_p50_us) - median(&direct.pp_p50_us)));
    row("new connections/s (connect + 1 round trip + close)", &mesh.cps, &direct.cps, format!("{:.2}×", median(&mesh.cps) / median(&direct.cps)));
    row("connection setup p50, µs", &mesh.conn_p50_us, &direct.conn_p50_us, format!("+{:.0} µs", median(&mesh.conn_p50_us) - median(&direct.conn_p50_us)));
    let n1: Vec<f64> = mesh.cpu_per_gb.iter().map(|c| c.0).collect();
    let n2: Vec<f64> = mesh.cpu_per_gb.iter().map(|c| c.1).collect();
    println!("\nCPU-seconds per GB (bulk): node-1 daemon {:.2} ({}), node-2 daemon {:.2} ({})", median(&n1), spread(&n1), median(&n2), spread(&n2));
    println!(
        "openssl speed -evp aes-128-gcm (16 KiB, one core): {aes_gbps:.1} Gbit/s; mesh throughput = {:.2} of it",
        median(&mesh.gbps) / aes_gbps
    );
}

/// Runs iperf3 from n1p1 (CPU 0); returns (Gbit/s received, bytes).
fn iperf3(m: &MeshLab, server: &str) -> (f64, f64) {
    let out = m.lab.run_in_pod("n1p1", "taskset", &["-c", "0", "iperf3", "-c", server, "-p", "5201", "-t", IPERF_SECS, "-J"]).expect("iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("iperf3 json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let sum = &v["end"]["sum_received"];
    let field = |k: &str| sum[k].as_f64().unwrap_or_else(|| panic!("iperf3 gave no {k}: {}", v["error"]));
    (field("bits_per_second") / 1e9, field("bytes"))
}

fn read_greeting(s: &TcpStream) {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("greeting");
    assert!(line.starts_with("whoami"), "unexpected greeting {line:?}");
}

/// 64-byte ping-pong on one connection, at `rate` per second or back to back; (p50, p99) round
/// trip in µs and the number of round trips.
#[expect(clippy::cast_precision_loss, reason = "a count of round trips in seconds fits an f64")]
fn request_response(addr: SocketAddr, rate: Option<u32>) -> (f64, f64, f64) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    read_greeting(&s);
    let interval = rate.map(|r| Duration::from_secs(1) / r);
    let (msg, mut buf) = ([7u8; 64], [0u8; 64]);
    let mut rtts = Vec::new();
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < Duration::from_secs(RR_SECS) {
        let t = Instant::now();
        s.write_all(&msg).expect("write");
        s.read_exact(&mut buf).expect("read");
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
        if let Some(interval) = interval {
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    (rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100], rtts.len() as f64)
}

#[expect(clippy::cast_precision_loss, reason = "a count of connections in seconds fits an f64")]
/// Sequential connections, each: connect, read the server's greeting (one round trip), close.
/// Returns (connections/s, p50 µs per connection).
fn connections(addr: SocketAddr) -> (f64, f64) {
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(CPS_SECS) {
        let t = Instant::now();
        let s = TcpStream::connect(addr).expect("connect");
        read_greeting(&s);
        drop(s);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rate = times.len() as f64 / start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    (rate, times[times.len() / 2])
}

/// One core's AES-128-GCM speed at 16 KiB blocks, in Gbit/s.
fn openssl_aes128gcm_gbps() -> f64 {
    let out = Command::new("taskset")
        .args(["-c", "1", "openssl", "speed", "-seconds", "3", "-bytes", "16384", "-evp", "aes-128-gcm"])
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    // Last line: "AES-128-GCM  <kB/s>k" (1000s of bytes per second).
    let kbps: f64 = text
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().last()?.strip_suffix('k')?.parse().ok())
        .unwrap_or_else(|| panic!("openssl speed output: {text}"));
    kbps * 1000.0 * 8.0 / 1e9
}
