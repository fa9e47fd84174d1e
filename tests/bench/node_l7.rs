//! Benchmark: HTTP through two mesh-node daemons against the same client and backend with no
//! mesh, interleaved in one run. Mesh: n1p1 → the `bench` Service's VIP (an HTTP port: node 1's
//! daemon serves the connection with `mesh-l7`, picks the endpoint per request and sends it
//! through pooled HBONE streams; node 2's daemon parses the requests again, authorizes and
//! records them, and forwards them to the pod). Direct: n1p1 → the pod's address, capture off.
//! Root only, ignored by default:
//!
//! ```sh
//! cargo xtask bench --only node-l7
//! # or, by hand:
//! cargo build --release --locked -p mesh-node --bins
//! cargo test --release --locked -p mesh-tests --features privileged --test bench-node-l7 -- --ignored --nocapture
//! ```
//!
//! Per round, mesh then direct:
//! - `mesh-whoami http-load` at a fixed 1,000 requests/s (latency from each request's due time,
//!   so stalls are not hidden), HTTP/1.1 (16 keep-alive connections) and h2c (1 connection,
//!   16 streams); the daemons' CPU during it, per 1,000 requests;
//! - `wrk` (HTTP/1.1 keep-alive, 1 thread, 32 connections) and `h2load` (h2c prior knowledge,
//!   1 thread, 4 connections × 8 streams) as fast as they go; the daemons' CPU during each,
//!   as requests per daemon CPU-second;
//! - mesh only, for reference: the same HTTP/1.1 fixed-rate and wrk runs through a TCP port of the
//!   same Service (`appProtocol: tcp`): the daemons' L4 path (HBONE relay, no HTTP parsing);
//! - mesh only: the fixed-rate runs again with both daemons moved (`taskset -a -p`) to CPU 0,
//!   next to the client and the backend, and back: no request then waits for another vCPU to
//!   wake from halt, which on this VM is most of the tail (see the results).
//!
//! The backend is `mesh-whoami serve --http` in n2p1 (one process per port: 8081 behind the
//! Service's HTTP/1.1 port 80, 8082 behind its h2c port 81, 8083 behind its TCP port 82); every
//! response is its one-line JSON of what it saw (~240 B body, ~100 B of headers). Pinning
//! (2 cores): load generators and the backend on CPU 0, both daemons on CPU 1
//! (`MESH_BENCH_DAEMON_CPUS` changes the latter).
//!
//! Any failed request (non-2xx, connection error, timeout, request not sent) fails the run with
//! the counts; a missing tool fails it before the lab starts.
//!
//! Environment: `MESH_BENCH_ROUNDS` (5), `MESH_BENCH_FIXED_SECS` (10), `MESH_BENCH_MAX_SECS` (5),
//! `MESH_BENCH_NODE_BIN` (another mesh-node build), `MESH_BENCH_PERF=<dir>`: `perf record` both
//! daemons during round 0's meshed fixed-rate HTTP/1.1, wrk and h2load runs into
//! `<dir>/{fixed-h1,wrk,h2load}.data` (`MESH_BENCH_PERF_ARGS`: the perf command, default
//! `record -F 1999 -g`; e.g. `stat -e raw_syscalls:sys_enter,context-switches --per-thread`;
//! that round's numbers carry perf's cost).
//! Results are in `bench/results/node-l7.md`.

#[path = "../node/mesh.rs"]
#[allow(dead_code, reason = "shared with the node suite; the benchmark uses part of it")]
mod mesh;

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
};

use mesh::{H2_PORT, HTTP_VIP, HTTP1_PORT, MeshLab, Options, TCP_PORT};
use serde_json::Value;

const RATE: u32 = 1000;
/// `http-load`: HTTP/1.1 connections; HTTP/2 connections × streams.
const FIXED_H1_CONNECTIONS: &str = "16";
const FIXED_H2: (&str, &str) = ("1", "16");
/// `wrk` connections; `h2load` connections × streams.
const WRK_CONNECTIONS: &str = "32";
const H2LOAD: (&str, &str) = ("4", "8");

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// The ways to reach the backend: HTTP/1.1, h2c, and (mesh only) HTTP/1.1 through the
/// Service's TCP port, the daemons' L4 path.
struct Urls {
    h1: String,
    h2: String,
    l4: Option<String>,
}

impl Urls {
    fn mesh() -> Self {
        let url = |port: (u16, u16)| format!("http://{HTTP_VIP}:{}/", port.0);
        Self { h1: url(HTTP1_PORT), h2: url(H2_PORT), l4: Some(url(TCP_PORT)) }
    }

    fn direct(m: &MeshLab) -> Self {
        let pod = m.lab.pod("n2p1").ip;
        Self { h1: format!("http://{pod}:{}/", HTTP1_PORT.1), h2: format!("http://{pod}:{}/", H2_PORT.1), l4: None }
    }
}

/// One fixed-rate run.
struct Fixed {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    requests: f64,
}

/// One as-fast-as-possible run.
struct Max {
    requests: f64,
    rps: f64,
}

/// Daemon CPU seconds (node 1, node 2) used during a run.
#[derive(Clone, Copy)]
struct Cpu(f64, f64);

/// Fixed-rate runs of one kind: latency percentiles and daemon CPU per 1,000 requests.
#[derive(Default)]
struct FixedSamples {
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    /// Daemon CPU milliseconds per 1,000 requests: (node 1, node 2).
    cpu_per_k: Vec<(f64, f64)>,
}

impl FixedSamples {
    fn push(&mut self, f: &Fixed, cpu: Cpu) -> String {
        let k = per_k(cpu, f.requests);
        self.p50.push(f.p50_us);
        self.p99.push(f.p99_us);
        self.p999.push(f.p999_us);
        self.cpu_per_k.push(k);
        format!("p50 {:.0} p99 {:.0} p99.9 {:.0} µs, CPU-ms/1k {:.0}+{:.0}", f.p50_us, f.p99_us, f.p999_us, k.0, k.1)
    }

    fn cpu_both(&self) -> Vec<f64> {
        self.cpu_per_k.iter().map(|c| c.0 + c.1).collect()
    }
}

/// As-fast-as-possible runs of one kind.
#[derive(Default)]
struct MaxSamples {
    rps: Vec<f64>,
    /// Requests per daemon CPU-second: (node 1, node 2, both together).
    per_cpu: Vec<(f64, f64, f64)>,
    /// Daemon core use (CPU-s per second, both daemons): 1.0 = CPU 1 full.
    cores: Vec<f64>,
}

impl MaxSamples {
    fn push(&mut self, m: &Max, cpu: Cpu, secs: u64) -> String {
        #[expect(clippy::cast_precision_loss, reason = "seconds")]
        let cores = (cpu.0 + cpu.1) / secs as f64;
        self.rps.push(m.rps);
        self.per_cpu.push(per_cpu(cpu, m.requests));
        self.cores.push(cores);
        format!("{:.0} req/s ({cores:.2} daemon cores)", m.rps)
    }
}

#[derive(Default)]
struct Samples {
    h1: FixedSamples,
    h2: FixedSamples,
    wrk: MaxSamples,
    h2load: MaxSamples,
    /// Mesh only: HTTP/1.1 through the Service's TCP port (L4 in both daemons).
    l4: FixedSamples,
    l4_wrk: MaxSamples,
    /// Mesh only: the fixed-rate runs again with the daemons moved to CPU 0, next to the client
    /// and the backend: no request has to wake another (idle, halted) vCPU.
    one_cpu_h1: FixedSamples,
    one_cpu_h2: FixedSamples,
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn node_l7_mesh_vs_direct() {
    mesh_tests::require_root();
    // Before the lab: a missing tool is a failure, not a skipped measurement.
    let wrk = mesh_tests::tools::wrk().expect("wrk").display().to_string();
    let h2load = mesh_tests::tools::h2load().expect("h2load").display().to_string();
    let rounds = usize::try_from(env_num("MESH_BENCH_ROUNDS", 5)).expect("rounds");
    let fixed_secs = env_num("MESH_BENCH_FIXED_SECS", 10);
    let max_secs = env_num("MESH_BENCH_MAX_SECS", 5);
    let perf_dir = std::env::var_os("MESH_BENCH_PERF").map(PathBuf::from);
    let daemon_cpus = std::env::var("MESH_BENCH_DAEMON_CPUS").unwrap_or_else(|_| "1".into());
    println!("load average before: {}", loadavg());

    let m = MeshLab::start_with(Options { bench: true, http: true, ..Options::default() });
    let tools = Tools { wrk, h2load, fixed_secs, max_secs };
    let (mesh_urls, direct_urls) = (Urls::mesh(), Urls::direct(&m));

    // Warm-up (pools, page cache, allocator), and proof that "mesh" goes through both daemons:
    // the VIP is unreachable without the capture, and node 2 must have parsed the requests.
    let before = (requests_total(&m, 1, "source"), requests_total(&m, 2, "destination"));
    let mut warm = 0.0;
    for meshed in [true, false] {
        m.set_capture(meshed);
        let urls = if meshed { &mesh_urls } else { &direct_urls };
        let short = Tools { fixed_secs: 2, max_secs: 2, ..tools.clone() };
        for h2 in [false, true] {
            let f = short.http_load(&m, if h2 { &urls.h2 } else { &urls.h1 }, h2);
            warm += if meshed { f.requests } else { 0.0 };
        }
        short.wrk(&m, &urls.h1);
        short.h2load(&m, &urls.h2);
        if let Some(url) = &urls.l4 {
            short.wrk(&m, url);
        }
    }
    let after = (requests_total(&m, 1, "source"), requests_total(&m, 2, "destination"));
    println!("warm-up: {warm} fixed-rate requests through the mesh; istio_requests_total node-1 source +{}, node-2 destination +{}", after.0 - before.0, after.1 - before.1);
    assert!(after.0 - before.0 >= warm && after.1 - before.1 >= warm, "the meshed requests were not all recorded by both daemons: {before:?} → {after:?}, expected +{warm}");

    let (mut mesh_s, mut direct_s) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        for meshed in [true, false] {
            m.set_capture(meshed);
            let (urls, s) = if meshed { (&mesh_urls, &mut mesh_s) } else { (&direct_urls, &mut direct_s) };
            let perf = |name: &str, secs: u64| perf_dir.as_ref().filter(|_| meshed && round == 0).map(|d| perf_record(&m, &d.join(format!("{name}.data")), secs));
            let profiling = perf("fixed-h1", tools.fixed_secs);
            let (f, cpu) = measured(&m, || tools.http_load(&m, &urls.h1, false));
            finish_perf(profiling);
            let mut line = format!("h1 {}", s.h1.push(&f, cpu));
            let (f, cpu) = measured(&m, || tools.http_load(&m, &urls.h2, true));
            let _ = write!(line, " | h2 {}", s.h2.push(&f, cpu));
            let profiling = perf("wrk", tools.max_secs);
            let (r, cpu) = measured(&m, || tools.wrk(&m, &urls.h1));
            finish_perf(profiling);
            let _ = write!(line, " | wrk {}", s.wrk.push(&r, cpu, tools.max_secs));
            let profiling = perf("h2load", tools.max_secs);
            let (r, cpu) = measured(&m, || tools.h2load(&m, &urls.h2));
            finish_perf(profiling);
            let _ = write!(line, " | h2load {}", s.h2load.push(&r, cpu, tools.max_secs));
            if let Some(url) = &urls.l4 {
                let (f, cpu) = measured(&m, || tools.http_load(&m, url, false));
                let _ = write!(line, " | L4 port: h1 {}", s.l4.push(&f, cpu));
                let (r, cpu) = measured(&m, || tools.wrk(&m, url));
                let _ = write!(line, ", wrk {}", s.l4_wrk.push(&r, cpu, tools.max_secs));
            }
            if meshed {
                pin_daemons(&m, "0");
                let (f, cpu) = measured(&m, || tools.http_load(&m, &urls.h1, false));
                let _ = write!(line, " | daemons on CPU 0: h1 {}", s.one_cpu_h1.push(&f, cpu));
                let (f, cpu) = measured(&m, || tools.http_load(&m, &urls.h2, true));
                let _ = write!(line, ", h2 {}", s.one_cpu_h2.push(&f, cpu));
                pin_daemons(&m, &daemon_cpus);
            }
            println!("round {round} {:6}: {line}", if meshed { "mesh" } else { "direct" });
        }
    }
    m.set_capture(true);
    println!("load average after: {}", loadavg());
    report(rounds, &mesh_s, &direct_s);
}

/// Moves both daemons (every thread) to `cpus`.
fn pin_daemons(m: &MeshLab, cpus: &str) {
    let pids = m.daemon_pids();
    for pid in [pids.0, pids.1] {
        let out = Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]).output().expect("taskset");
        assert!(out.status.success(), "taskset -a -p -c {cpus} {pid}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Runs `f` and returns its result with the daemons' CPU seconds during it.
fn measured<T>(m: &MeshLab, f: impl FnOnce() -> T) -> (T, Cpu) {
    let before = m.daemon_cpu_secs();
    let out = f();
    let after = m.daemon_cpu_secs();
    (out, Cpu(after.0 - before.0, after.1 - before.1))
}

/// CPU milliseconds per 1,000 requests, per daemon.
fn per_k(cpu: Cpu, requests: f64) -> (f64, f64) {
    let k = requests / 1000.0;
    (cpu.0 * 1000.0 / k, cpu.1 * 1000.0 / k)
}

/// Requests per CPU-second: node 1, node 2, both daemons together.
fn per_cpu(cpu: Cpu, requests: f64) -> (f64, f64, f64) {
    (requests / cpu.0, requests / cpu.1, requests / (cpu.0 + cpu.1))
}

#[derive(Clone)]
struct Tools {
    wrk: String,
    h2load: String,
    fixed_secs: u64,
    max_secs: u64,
}

/// Runs `program args` in n1p1 pinned to CPU 0; fails the run when it fails.
fn run_client(m: &MeshLab, program: &str, args: &[&str]) -> Output {
    let pinned = [&["-c", "0", program], args].concat();
    let out = m.lab.run_in_pod("n1p1", "taskset", &pinned).unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Tools {
    /// `mesh-whoami http-load` at `RATE`; every scheduled request must be answered with a 2xx.
    fn http_load(&self, m: &MeshLab, url: &str, h2: bool) -> Fixed {
        let (rate, secs) = (RATE.to_string(), self.fixed_secs.to_string());
        let mut args = vec!["http-load", "--url", url, "--rate", &rate, "--duration", &secs, "--timeout-ms", "5000"];
        if h2 {
            args.extend(["--h2", "--connections", FIXED_H2.0, "--streams", FIXED_H2.1]);
        } else {
            args.extend(["--connections", FIXED_H1_CONNECTIONS]);
        }
        let out = run_client(m, mesh::WHOAMI, &args);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("http-load printed no report: {text}"));
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("http-load report without {k}: {v}"));
        assert!(
            n("errors") == 0 && n("ok") == n("scheduled"),
            "http-load {url}: {} scheduled, {} 2xx, {} errors; status {}, errors {}",
            v["scheduled"],
            v["ok"],
            v["errors"],
            v["status"],
            v["error_kinds"]
        );
        #[expect(clippy::cast_precision_loss, reason = "microseconds and request counts")]
        let f = |k: &str| n(k) as f64;
        Fixed { p50_us: f("p50_us"), p99_us: f("p99_us"), p999_us: f("p999_us"), requests: f("ok") }
    }

    /// `wrk`, HTTP/1.1 keep-alive; every response must be 2xx, no socket errors.
    fn wrk(&self, m: &MeshLab, url: &str) -> Max {
        let secs = format!("{}s", self.max_secs);
        let out = run_client(m, &self.wrk, &["-t1", "-c", WRK_CONNECTIONS, "-d", &secs, url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let r = parse_wrk(&text).unwrap_or_else(|e| panic!("wrk {url}: {e}:\n{text}"));
        assert!(r.errors == 0, "wrk {url}: {} failed requests (non-2xx or socket errors):\n{text}", r.errors);
        r.max
    }

    /// `h2load`, h2c prior knowledge; every request must succeed with a 2xx.
    fn h2load(&self, m: &MeshLab, url: &str) -> Max {
        let secs = self.max_secs.to_string();
        let out = run_client(m, &self.h2load, &["-t1", "-c", H2LOAD.0, "-m", H2LOAD.1, "-D", &secs, url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let r = parse_h2load(&text).unwrap_or_else(|e| panic!("h2load {url}: {e}:\n{text}"));
        assert!(r.errors == 0, "h2load {url}: {} failed requests (not 2xx, failed, errored or timed out):\n{text}", r.errors);
        r.max
    }
}

struct Parsed {
    max: Max,
    /// Requests that failed in any way the tool reports.
    errors: u64,
}

/// The numbers after each `name` in `line` (`"connect 0, read 1"` → `[0, 1]`).
fn counts(line: &str) -> Vec<u64> {
    line.split(|c: char| c == ',' || c.is_whitespace()).filter_map(|w| w.parse().ok()).collect()
}

/// wrk's summary: `N requests in S s, ...`, `Socket errors: connect a, read b, write c, timeout
/// d` and `Non-2xx or 3xx responses: n` (the last two only when not zero), `Requests/sec: R`.
fn parse_wrk(text: &str) -> Result<Parsed, String> {
    let line = text.lines().find(|l| l.contains(" requests in ")).ok_or("no `requests in` line")?;
    let requests: f64 = line.split_whitespace().next().and_then(|n| n.parse().ok()).ok_or("unreadable request count")?;
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|r| r.trim().parse().ok())
        .ok_or("no Requests/sec")?;
    let socket: u64 = text.lines().find_map(|l| l.trim().strip_prefix("Socket errors:")).map_or(0, |l| counts(l).iter().sum());
    let non_2xx: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(Ok(0), |n| n.trim().parse().map_err(|_| "unreadable Non-2xx count"))?;
    Ok(Parsed { max: Max { requests, rps }, errors: socket + non_2xx })
}

/// h2load's summary: `finished in S, R req/s, ...`, `requests: T total, T started, D done, S
/// succeeded, F failed, E errored, O timeout` and `status codes: A 2xx, B 3xx, C 4xx, D 5xx`.
fn parse_h2load(text: &str) -> Result<Parsed, String> {
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|r| r.trim().strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .ok_or("no `finished in` line")?;
    let req = counts(text.lines().find_map(|l| l.strip_prefix("requests:")).ok_or("no `requests:` line")?);
    let codes = counts(text.lines().find_map(|l| l.strip_prefix("status codes:")).ok_or("no `status codes:` line")?);
    let ([_total, _started, done, succeeded, failed, errored, timeout], [ok, ..]) = (req.as_slice(), codes.as_slice()) else {
        return Err(format!("unexpected counts {req:?} / {codes:?}"));
    };
    #[expect(clippy::cast_precision_loss, reason = "request counts")]
    let requests = *ok as f64;
    let errors = failed + errored + timeout + done.saturating_sub(*ok).max(done.saturating_sub(*succeeded));
    Ok(Parsed { max: Max { requests, rps }, errors })
}

/// Sum of `istio_requests_total` samples of `reporter` on node `node`.
fn requests_total(m: &MeshLab, node: u8, reporter: &str) -> f64 {
    let metrics = mesh::curl_in(&m.lab.node(node).netns, "http://127.0.0.1:15020/metrics");
    let label = format!("reporter=\"{reporter}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `perf <MESH_BENCH_PERF_ARGS>` on both daemons for `secs` - 1 seconds (inside the run that
/// follows), pinned to CPU 0 with the load generators.
fn perf_record(m: &MeshLab, out: &std::path::Path, secs: u64) -> Child {
    let pids = m.daemon_pids();
    let args = std::env::var("MESH_BENCH_PERF_ARGS").unwrap_or_else(|_| "record -F 1999 -g".into());
    let out = out.to_str().expect("utf-8 path");
    let (pids, sleep) = (format!("{},{}", pids.0, pids.1), secs.saturating_sub(1).max(1).to_string());
    Command::new("taskset")
        .args(["-c", "0", "perf"])
        .args(args.split_whitespace())
        .args(["-o", out, "-p", &pids, "--", "sleep", &sleep])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf (Debian linux-perf)")
}

fn finish_perf(perf: Option<Child>) {
    if let Some(mut p) = perf {
        let status = p.wait().expect("perf");
        assert!(status.success(), "perf failed ({status})");
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

fn cell(v: &[f64]) -> String {
    format!("{:.0} ({})", median(v), spread(v))
}

fn report(rounds: usize, mesh: &Samples, direct: &Samples) {
    let added = |what: &str, m: &[f64], d: &[f64]| {
        println!("| {what} | {} | {} | {:+.0} µs |", cell(m), cell(d), median(m) - median(d));
    };
    let latency = |title: &str, h1: &FixedSamples, h2: &FixedSamples| {
        println!("\n| {title} (median, min–max of {rounds}) | mesh | direct | added |\n|---|---|---|---|");
        added("HTTP/1.1 p50, µs", &h1.p50, &direct.h1.p50);
        added("HTTP/1.1 p99, µs", &h1.p99, &direct.h1.p99);
        added("HTTP/1.1 p99.9, µs", &h1.p999, &direct.h1.p999);
        added("h2c p50, µs", &h2.p50, &direct.h2.p50);
        added("h2c p99, µs", &h2.p99, &direct.h2.p99);
        added("h2c p99.9, µs", &h2.p999, &direct.h2.p999);
    };
    latency(&format!("at {RATE} req/s, daemons on CPU 1"), &mesh.h1, &mesh.h2);
    latency(&format!("at {RATE} req/s, daemons moved to CPU 0 (with client and backend)"), &mesh.one_cpu_h1, &mesh.one_cpu_h2);

    let ratio = |what: &str, m: &[f64], d: &[f64]| {
        println!("| {what} | {} | {} | {:.2}× |", cell(m), cell(d), median(m) / median(d));
    };
    println!("\n| maximum rate (median, min–max of {rounds}) | mesh | direct | mesh vs direct |\n|---|---|---|---|");
    ratio(&format!("wrk HTTP/1.1, {WRK_CONNECTIONS} connections, req/s"), &mesh.wrk.rps, &direct.wrk.rps);
    ratio(&format!("h2load h2c, {}×{} streams, req/s", H2LOAD.0, H2LOAD.1), &mesh.h2load.rps, &direct.h2load.rps);

    let col = |v: &[(f64, f64)], i: usize| v.iter().map(|c| if i == 0 { c.0 } else { c.1 }).collect::<Vec<_>>();
    let col3 = |v: &[(f64, f64, f64)], i: usize| v.iter().map(|c| [c.0, c.1, c.2][i]).collect::<Vec<_>>();
    println!("\n| mesh daemons (median, min–max of {rounds}) | node-1 daemon | node-2 daemon | both |\n|---|---|---|---|");
    for (what, f) in [
        ("HTTP/1.1 at 1000 req/s: CPU-ms per 1,000 requests", &mesh.h1),
        ("h2c at 1000 req/s: CPU-ms per 1,000 requests", &mesh.h2),
        ("HTTP/1.1 at 1000 req/s, daemons on CPU 0: CPU-ms per 1,000 requests", &mesh.one_cpu_h1),
        ("h2c at 1000 req/s, daemons on CPU 0: CPU-ms per 1,000 requests", &mesh.one_cpu_h2),
    ] {
        println!("| {what} | {} | {} | {} |", cell(&col(&f.cpu_per_k, 0)), cell(&col(&f.cpu_per_k, 1)), cell(&f.cpu_both()));
    }
    for (what, x) in [("wrk: requests per daemon CPU-second", &mesh.wrk), ("h2load: requests per daemon CPU-second", &mesh.h2load)] {
        println!("| {what} | {} | {} | {} |", cell(&col3(&x.per_cpu, 0)), cell(&col3(&x.per_cpu, 1)), cell(&col3(&x.per_cpu, 2)));
    }
    println!("\n| mesh, HTTP/1.1 through the Service's TCP port (L4) vs its HTTP port (L7) | L4 | L7 | L7 − L4 |\n|---|---|---|---|");
    let vs = |what: &str, l4: &[f64], l7: &[f64]| println!("| {what} | {} | {} | {:+.0} |", cell(l4), cell(l7), median(l7) - median(l4));
    vs("p50 at 1000 req/s, µs", &mesh.l4.p50, &mesh.h1.p50);
    vs("p99 at 1000 req/s, µs", &mesh.l4.p99, &mesh.h1.p99);
    vs("p99.9 at 1000 req/s, µs", &mesh.l4.p999, &mesh.h1.p999);
    vs("both daemons, CPU-ms per 1,000 requests at 1000 req/s", &mesh.l4.cpu_both(), &mesh.h1.cpu_both());
    vs("wrk req/s", &mesh.l4_wrk.rps, &mesh.wrk.rps);
    vs("wrk requests per CPU-second of both daemons", &col3(&mesh.l4_wrk.per_cpu, 2), &col3(&mesh.wrk.per_cpu, 2));
    let cores = |v: &[f64]| format!("{:.2} ({:.2}–{:.2})", median(v), v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    println!(
        "\nDaemon cores in use during the max runs (both daemons, CPU-s per s): wrk {}, h2load {}, wrk on the L4 port {}.",
        cores(&mesh.wrk.cores),
        cores(&mesh.h2load.cores),
        cores(&mesh.l4_wrk.cores)
    );
    println!(
        "Direct runs, daemons idle (sanity): CPU-ms per 1,000 requests h1 {:.1}, h2 {:.1}; daemon cores during wrk {:.2}.",
        median(&direct.h1.cpu_both()),
        median(&direct.h2.cpu_both()),
        median(&direct.wrk.cores)
    );
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn wrk_summary_with_and_without_errors() {
        let clean = "Running 5s test @ http://198.18.2.2:8081/\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.10ms  200.00us   5.00ms   90.00%\n    Req/Sec    29.10k     1.00k   30.00k    70.00%\n  145000 requests in 5.00s, 80.00MB read\nRequests/sec:  28999.50\nTransfer/sec:     16.00MB\n";
        let r = parse_wrk(clean).expect("parses");
        assert!((r.max.requests - 145_000.0).abs() < 0.5 && (r.max.rps - 28_999.5).abs() < 0.01 && r.errors == 0);
        let bad = "  1000 requests in 5.00s, 1.00MB read\n  Socket errors: connect 2, read 3, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\nRequests/sec:    200.00\n";
        assert_eq!(parse_wrk(bad).expect("parses").errors, 13);
        assert!(parse_wrk("unable to connect to 198.18.2.2:8081 Connection refused").is_err());
    }

    #[test]
    fn h2load_summary_counts_every_kind_of_failure() {
        let clean = "finished in 5.00s, 40000.00 req/s, 20.00MB/s\nrequests: 200000 total, 200032 started, 200000 done, 200000 succeeded, 0 failed, 0 errored, 0 timeout\nstatus codes: 200000 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let r = parse_h2load(clean).expect("parses");
        assert!((r.max.requests - 200_000.0).abs() < 0.5 && (r.max.rps - 40_000.0).abs() < 0.01 && r.errors == 0);
        let bad = "finished in 5.00s, 100.00 req/s, 1.00MB/s\nrequests: 500 total, 500 started, 500 done, 490 succeeded, 10 failed, 0 errored, 0 timeout\nstatus codes: 480 2xx, 0 3xx, 0 4xx, 10 5xx\n";
        assert_eq!(parse_h2load(bad).expect("parses").errors, 10 + 20, "failed, plus done without a 2xx");
        assert!(parse_h2load("finished in 5.00s, 0.00 req/s, 0B/s\n").is_err());
    }
}
