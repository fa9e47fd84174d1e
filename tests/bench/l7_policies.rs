//! Benchmark: what traffic policies cost while they do not fire. The whole mesh in the lab
//! (`mesh_tests::cluster`: mesh-control in file mode, both daemons with the eBPF datapath,
//! release binaries), the meshed client n1p1 → Service `whoami-v2` (its one pod is on node 2),
//! alternating in one run between no policy and every policy configured at once:
//! a DestinationRule with least-request balancing, connection-pool limits far above the load
//! and outlier detection, and a VirtualService with a timeout, retries on 5xx and a fault
//! injection of 0 % (so each request passes every layer, and none fires), a LocalRateLimit far
//! above the load, a RequestAuthentication (the requests carry no token) and an ALLOW policy
//! matching every GET (an L7 rule evaluated per request). Root only, ignored by default:
//!
//! ```sh
//! cargo xtask bench --only l7-policies
//! ```
//!
//! A second benchmark in this file, `tracing_at_1_and_100_percent_vs_none`, rotates between no
//! tracing and a mesh-wide Telemetry sampling 1 % and 100 % of requests into a Zipkin collector
//! in the lab, pinned with the load generators, and a fourth arm without tracing whose requests
//! carry the B3 headers an unsampled trace adds, which tells the propagated headers' own cost
//! from the tracer's (results in `bench/results/tracing.md`):
//!
//! ```sh
//! cargo xtask bench --only tracing
//! ```
//!
//! A third, `plaintext_steering_vs_direct`, measures what bringing an unmeshed client's
//! plaintext to the destination daemon costs (`MESH_PLAINTEXT_REDIRECT`, on by default): the
//! unmeshed pod n1p3 → the pod n2p1's HTTP port (an address, not a Service: nothing at node 1
//! touches it). Steered, node 2's routing and `sk_lookup` hand each connection to its daemon,
//! which parses, authorizes and records each request and forwards it to the pod; direct, node
//! 2's plaintext rule for n2p1 is deleted (`ip rule del`, which the daemon does not notice) and
//! the requests reach the pod as with no mesh (results in `bench/results/plaintext.md`):
//!
//! ```sh
//! cargo xtask bench --only plaintext
//! ```
//!
//! Pinning as the node-l7 benchmark: both daemons on CPU 1 (their access log off: `MESH_LOG`
//! warn), the load generators on CPU 0; the sample app is not pinned.
//!
//! Per run: `mesh-whoami http-load` at a fixed 1,000 requests/s for 10 s (HTTP/1.1, 16
//! keep-alive connections; latency from each request's due time), then `wrk` (1 thread, 32
//! connections, 5 s) as fast as it goes. Runs go ABBA (none, policies, policies, none, ...) so
//! drift hits both equally; the report gives medians, spread and the policy/none ratio.
//! Any failed request fails the run. Results are in `bench/results/l7-policies.md`.

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use mesh_tests::{
    LabSpec,
    cluster::{Binaries, Cluster, HTTP_PORT, VIP_V2},
    whoami::load::Report,
};

const POLICIES: &str = "apiVersion: networking.mesh.dev/v1alpha1
kind: DestinationRule
metadata: {name: whoami-v2, namespace: demo}
spec:
  host: whoami-v2
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 10000, connectTimeout: 5s}
      http: {http1MaxPendingRequests: 10000, http2MaxRequests: 10000, maxRetries: 1000}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
---
apiVersion: networking.mesh.dev/v1alpha1
kind: VirtualService
metadata: {name: whoami-v2, namespace: demo}
spec:
  hosts: [whoami-v2]
  http:
  - timeout: 10s
    retries: {attempts: 3, retryOn: 5xx}
    fault:
      delay: {percentage: {value: 0}, fixedDelay: 1s}
      abort: {percentage: {value: 0}, httpStatus: 503}
    route: [{destination: {host: whoami-v2}}]
---
apiVersion: networking.mesh.dev/v1alpha1
kind: LocalRateLimit
metadata: {name: whoami-v2, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: whoami-v2}]
  tokenBucket: {maxTokens: 1000000, tokensPerFill: 1000000, fillInterval: 1s}
---
apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: whoami-v2-gets, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami, version: v1.1}}
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.mesh.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: whoami-v2-jwt, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami, version: v1.1}}
  jwtRules:
  - issuer: https://idp.mesh.test
    jwks: 'JWKS'
";

const TRACING: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: mesh-config, namespace: mesh-system}
data:
  mesh: |
    extensionProviders:
    - name: zipkin
      zipkin: {service: COLLECTOR, port: 9411}
---
apiVersion: telemetry.mesh.dev/v1alpha1
kind: Telemetry
metadata: {name: mesh-default, namespace: mesh-system}
spec:
  tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: PERCENT}]
";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One arm of a benchmark: its name, the config applied for it (none: the baseline), and the
/// headers the load generators send with every request.
type Arm<'a> = (&'a str, Option<String>, Vec<String>);

#[derive(Default)]
struct Samples {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    rps: Vec<f64>,
    /// Both daemons' CPU time per request during the wrk run.
    cpu_us: Vec<f64>,
}

/// A process's CPU time (user + system) in clock ticks, from /proc.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit(") ").next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// The lab, pinned as the node-l7 benchmark, and its two load generators.
struct Bench {
    c: Cluster,
    /// The pod the load generators run in, and what they ask.
    client: &'static str,
    url: String,
    whoami: String,
    wrk: String,
    /// Request headers both load generators send (`NAME: VALUE`), per arm.
    headers: std::cell::RefCell<Vec<String>>,
    /// Run with each arm's name before its config is applied (what a config cannot switch).
    on_arm: Box<dyn Fn(&str)>,
}

impl Bench {
    fn start() -> Self {
        mesh_tests::require_root();
        let wrk = mesh_tests::tools::wrk().expect("wrk").display().to_string();
        let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
        let spec = LabSpec::for_test(&[3, 2]);
        let base = std::env::temp_dir().join(format!("mesh-{}-bench", spec.run));
        let mut c = Cluster::start(spec, Binaries::in_dir(&release), &base).expect("start the mesh");
        // As the node-l7 benchmark: no per-request access log, daemons on CPU 1, clients on CPU 0.
        c.node_log = "warn".into();
        for i in 1..=2 {
            c.stop_node(i);
            c.start_node(i).expect("restart the daemon");
            let pid = c.daemons[usize::from(i - 1)].as_ref().expect("daemon").child.id().to_string();
            let out = Command::new("taskset").args(["-a", "-p", "-c", "1", &pid]).output().expect("taskset");
            assert!(out.status.success(), "taskset: {}", String::from_utf8_lossy(&out.stderr));
        }
        let whoami = c.bins.whoami.display().to_string();
        Self { c, client: "n1p1", url: format!("http://{VIP_V2}/"), whoami, wrk, headers: std::cell::RefCell::default(), on_arm: Box::new(|_| {}) }
    }

    /// `mesh-whoami http-load` at 1,000 req/s for `secs`; every request must succeed.
    fn fixed(&self, secs: &str) -> Report {
        let out = self
            .c
            .lab
            .run_in_pod(self.client, "taskset", &strs(&self.with_headers("--header", &["-c", "0", &self.whoami, "http-load", "--url", &self.url, "--rate", "1000", "--duration", secs, "--connections", "16"])))
            .expect("http-load");
        let text = String::from_utf8_lossy(&out.stdout);
        let r: Report = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("http-load output ({e}): {text}"));
        assert_eq!((r.ok, r.errors), (r.scheduled, 0), "every request answered 2xx: {r:?}");
        r
    }

    /// wrk's maximum rate (1 thread, 32 connections, 5 s) and both daemons' CPU time per
    /// request meanwhile (µs); any failure fails the run.
    fn max_rps(&self) -> (f64, f64) {
        let pids: Vec<u32> = self.c.daemons.iter().flatten().map(|d| d.child.id()).collect();
        let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        let out = self.c.lab.run_in_pod(self.client, "taskset", &strs(&self.with_headers("-H", &["-c", "0", &self.wrk, "-t1", "-c32", "-d5s", &self.url]))).expect("wrk");
        let ticks = pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() - before;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("Non-2xx") && !text.contains("Socket errors"), "wrk saw failures: {text}");
        let rps: f64 = text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("wrk output: {text}"));
        let requests: f64 = text.lines().find_map(|l| l.trim().split_once(" requests in ")).and_then(|(n, _)| n.trim().parse().ok()).unwrap_or(rps * 5.0);
        // Clock ticks are 1/100 s on Linux (USER_HZ).
        #[expect(clippy::cast_precision_loss, reason = "tick counts are small")]
        let cpu_us = ticks as f64 * 10_000.0 / requests.max(1.0);
        (rps, cpu_us)
    }

    /// `args`, then the arm's headers, each after `flag`.
    fn with_headers(&self, flag: &str, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        for h in self.headers.borrow().iter() {
            all.extend([flag.to_owned(), h.clone()]);
        }
        all
    }

    /// Applies `yaml` as the config file "bench" (none: removes it), lets it reach the nodes,
    /// and warms up on it.
    fn set(&self, yaml: Option<&str>) {
        match yaml {
            Some(y) => self.c.apply_routes("bench", y).expect("apply"),
            // Absent at the start; every later call removes what the previous one applied.
            None => {
                let _ = self.c.delete_routes("bench");
            }
        }
        // File mode reaches the nodes within a second; then a short warm-up on the new config.
        std::thread::sleep(Duration::from_millis(1500));
        self.fixed("1");
    }

    /// Rounds over `arms` (name, config, request headers), the order reversed every other round
    /// so drift hits every arm alike; one [`Samples`] per arm, in order.
    fn rounds(&self, arms: &[Arm<'_>]) -> Vec<Samples> {
        let rounds = env_num("MESH_BENCH_ROUNDS", 6);
        let fixed_secs = env_num("MESH_BENCH_FIXED_SECS", 10).to_string();
        self.set(None);
        self.fixed("2");
        let _ = self.max_rps();
        let mut samples: Vec<Samples> = arms.iter().map(|_| Samples::default()).collect();
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..arms.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (name, yaml, headers) = &arms[i];
                self.headers.replace(headers.clone());
                (self.on_arm)(name);
                self.set(yaml.as_deref());
                let r = self.fixed(&fixed_secs);
                let (rps, cpu_us) = self.max_rps();
                samples[i].p50_us.push(r.p50_us as f64);
                samples[i].p99_us.push(r.p99_us as f64);
                samples[i].rps.push(rps);
                samples[i].cpu_us.push(cpu_us);
                println!("round {round} {name:12}: fixed 1000/s p50 {} µs p99 {} µs | wrk {rps:.0} req/s, daemons {cpu_us:.1} µs CPU/request", r.p50_us, r.p99_us);
            }
        }
        self.headers.replace(Vec::new());
        self.set(None);
        samples
    }
}

/// The table: each arm against the first (the baseline), medians and spread.
fn report(arms: &[&str], samples: &[Samples]) {
    let rounds = samples[0].rps.len();
    println!();
    let header: Vec<String> = arms[1..].iter().map(|a| format!("{a} | ratio / difference")).collect();
    println!("| (medians of {rounds} runs each, same lab, rotated) | {} | {} |", arms[0], header.join(" | "));
    println!("|---|---|{}", "---|---|".repeat(arms.len() - 1));
    let row = |what: &str, pick: fn(&Samples) -> &[f64], unit: &str| {
        let base = pick(&samples[0]);
        let mb = median(base);
        let mut line = format!("| {what} | {mb:.1} {unit} ({}) |", spread(base));
        for s in &samples[1..] {
            let m = median(pick(s));
            let _ = write!(line, " {m:.1} {unit} ({}) | {:.3}× ({:+.1} {unit}) |", spread(pick(s)), m / mb, m - mb);
        }
        println!("{line}");
    };
    row("fixed 1,000 req/s, p50", |s| &s.p50_us, "µs");
    row("fixed 1,000 req/s, p99", |s| &s.p99_us, "µs");
    row("wrk, 32 connections", |s| &s.rps, "req/s");
    row("both daemons' CPU per request (wrk)", |s| &s.cpu_us, "µs");
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn l7_policies_configured_but_idle_vs_none() {
    let bench = Bench::start();
    let policies = POLICIES.replace("JWKS", &mesh_l7::jwt::testing::jwks(&[&mesh_l7::jwt::testing::SigningKey::generate("bench")]));
    let arms: [Arm<'_>; 2] = [("no policy", None, vec![]), ("every policy, idle", Some(policies), vec![])];
    let samples = bench.rounds(&arms);
    report(&arms.map(|a| a.0), &samples);
}

/// Tracing as Istio users run it (a mesh-wide Telemetry, a Zipkin provider) at 1 % and 100 %
/// sampling vs none, with the collector (`mesh-whoami zipkin`) in the unmeshed pod on node 1.
#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn tracing_at_1_and_100_percent_vs_none() {
    let mut bench = Bench::start();
    let whoami = bench.whoami.clone();
    let (collector, _) = bench.c.spawn_in_pod_logged("n1p3", "zipkin", &whoami, &["zipkin", "--listen", "0.0.0.0:9411"]).expect("start the collector");
    // With the load generators, off the daemons' CPU: its JSON parsing is not the mesh's cost.
    let out = Command::new("taskset").args(["-a", "-p", "-c", "0", &collector.child.id().to_string()]).output().expect("taskset");
    assert!(out.status.success(), "taskset: {}", String::from_utf8_lossy(&out.stderr));
    let ip = bench.c.lab.pod("n1p3").ip.to_string();
    let tracing = |percent: &str| TRACING.replace("COLLECTOR", &ip).replace("PERCENT", percent);
    // The fourth arm separates the cost of the propagated headers themselves (parsed and written
    // again by both daemons, echoed by the app into its response body), which any mesh that
    // propagates B3 pays, from the cost of our tracing code: no tracing, but every request
    // arrives with the five headers a Zipkin tracer adds to an unsampled request.
    let propagated: Vec<String> = [
        "x-b3-traceid: 4bf92f3577b34da6a3ce929d0e0e4736",
        "x-b3-spanid: 00f067aa0ba902b7",
        "x-b3-parentspanid: 5c7d3b1a9e2f4d6c",
        "x-b3-sampled: 0",
        "x-request-id: 8f14e45f-ceea-467f-a0e6-8d9c3f1b2a4e",
    ]
    .map(str::to_owned)
    .to_vec();
    let arms: [Arm<'_>; 4] = [
        ("no tracing", None, vec![]),
        ("tracing 1 %", Some(tracing("1")), vec![]),
        ("tracing 100 %", Some(tracing("100")), vec![]),
        ("no tracing, B3 headers sent", None, propagated),
    ];
    let samples = bench.rounds(&arms);
    report(&arms.map(|a| a.0), &samples);
    for node in [1, 2] {
        let metrics = bench.c.curl_on_node(node, "http://127.0.0.1:15020/metrics").unwrap_or_default();
        println!("node {node}: {}", metrics.lines().filter(|l| l.starts_with("mesh_trace_spans")).collect::<Vec<_>>().join("; "));
    }
    drop(collector);
}

/// Requests node 2's daemon reported for plaintext clients (`connection_security_policy`
/// `unknown`), all response codes.
fn plaintext_requests(c: &Cluster) -> f64 {
    let metrics = c.curl_on_node(2, "http://127.0.0.1:15020/metrics").unwrap_or_default();
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"") && l.contains("connection_security_policy=\"unknown\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn plaintext_steering_vs_direct() {
    let mut bench = Bench::start();
    let pod = bench.c.lab.pod("n2p1").ip.to_string();
    bench.client = "n1p3";
    bench.url = format!("http://{pod}:{HTTP_PORT}/");
    let netns = bench.c.lab.node(2).netns.clone();
    // Node 2's plaintext rule for the pod, as `mesh_node::routing` installs it.
    let shown = Command::new("ip").args(["-n", &netns, "rule", "show"]).output().expect("ip rule");
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("to {pod} ipproto tcp lookup 15008")), "node 2 steers n2p1's plaintext:\n{shown}");
    let rule = move |op: &str| Command::new("ip").args(["-n", &netns, "rule", op, "priority", "15011", "to", &pod, "ipproto", "tcp", "lookup", "15008"]).output().expect("ip rule");
    let steered = std::rc::Rc::new(std::cell::Cell::new(true));
    let state = steered.clone();
    bench.on_arm = Box::new(move |arm| {
        let want = arm == "steered";
        if state.get() != want {
            let out = rule(if want { "add" } else { "del" });
            assert!(out.status.success(), "ip rule: {}", String::from_utf8_lossy(&out.stderr));
            state.set(want);
        }
    });
    let before = plaintext_requests(&bench.c);
    let arms: [Arm<'_>; 2] = [("direct", None, vec![]), ("steered", None, vec![])];
    let samples = bench.rounds(&arms);
    report(&arms.map(|a| a.0), &samples);
    // The steered arm's requests, and only they, went through node 2's daemon: at least every
    // fixed-rate request of its rounds.
    let reported = plaintext_requests(&bench.c) - before;
    let fixed = env_num("MESH_BENCH_ROUNDS", 6) * env_num("MESH_BENCH_FIXED_SECS", 10) * 1000;
    println!("node 2 reported {reported:.0} plaintext requests (the steered arm's fixed-rate runs alone sent {fixed})");
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let fixed = fixed as f64;
    assert!(reported >= fixed, "the steered arm went through the daemon: {reported} < {fixed}");
    drop(steered);
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) }
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}
