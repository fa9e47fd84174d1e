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
//! Pinning as the node-l7 benchmark: both daemons on CPU 1 (their access log off: `MESH_LOG`
//! warn), the load generators on CPU 0; the sample app is not pinned.
//!
//! Per run: `mesh-whoami http-load` at a fixed 1,000 requests/s for 10 s (HTTP/1.1, 16
//! keep-alive connections; latency from each request's due time), then `wrk` (1 thread, 32
//! connections, 5 s) as fast as it goes. Runs go ABBA (none, policies, policies, none, ...) so
//! drift hits both equally; the report gives medians, spread and the policy/none ratio.
//! Any failed request fails the run. Results are in `bench/results/l7-policies.md`.

use std::{path::Path, time::Duration};

use mesh_tests::{
    LabSpec,
    cluster::{Binaries, Cluster, VIP_V2},
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

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Samples {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    rps: Vec<f64>,
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn l7_policies_configured_but_idle_vs_none() {
    mesh_tests::require_root();
    let wrk = mesh_tests::tools::wrk().expect("wrk").display().to_string();
    let rounds = env_num("MESH_BENCH_ROUNDS", 6);
    let fixed_secs = env_num("MESH_BENCH_FIXED_SECS", 10).to_string();
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
        let out = std::process::Command::new("taskset").args(["-a", "-p", "-c", "1", &pid]).output().expect("taskset");
        assert!(out.status.success(), "taskset: {}", String::from_utf8_lossy(&out.stderr));
    }
    let c = c;
    let url = format!("http://{VIP_V2}/");
    let whoami = c.bins.whoami.display().to_string();
    let fixed = |secs: &str| -> Report {
        let out = c.lab.run_in_pod("n1p1", "taskset", &["-c", "0", &whoami, "http-load", "--url", &url, "--rate", "1000", "--duration", secs, "--connections", "16"]).expect("http-load");
        let text = String::from_utf8_lossy(&out.stdout);
        let r: Report = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("http-load output ({e}): {text}"));
        assert_eq!((r.ok, r.errors), (r.scheduled, 0), "every request answered 2xx: {r:?}");
        r
    };
    let max_rps = || -> f64 {
        let out = c.lab.run_in_pod("n1p1", "taskset", &["-c", "0", &wrk, "-t1", "-c32", "-d5s", &url]).expect("wrk");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("Non-2xx") && !text.contains("Socket errors"), "wrk saw failures: {text}");
        text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("wrk output: {text}"))
    };
    let policies = POLICIES.replace("JWKS", &mesh_l7::jwt::testing::jwks(&[&mesh_l7::jwt::testing::SigningKey::generate("bench")]));
    let set = |on: bool| {
        if on {
            c.apply_routes("policies", &policies).expect("apply");
        } else {
            // Absent at the start; every later call removes what the previous one applied.
            let _ = c.delete_routes("policies");
        }
        // File mode reaches the nodes within a second; then a short warm-up on the new config.
        std::thread::sleep(Duration::from_millis(1500));
        fixed("1");
    };
    // Warm-up, and proof that the policy is in force: the fault filter's 0 % draws are counted
    // nowhere, but the route's VirtualService is (the access log names it).
    set(false);
    fixed("2");
    max_rps();

    let (mut none, mut with) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for on in order {
            set(on);
            let r = fixed(&fixed_secs);
            let rps = max_rps();
            let s = if on { &mut with } else { &mut none };
            s.p50_us.push(r.p50_us as f64);
            s.p99_us.push(r.p99_us as f64);
            s.rps.push(rps);
            println!("round {round} {:8}: fixed 1000/s p50 {} µs p99 {} µs | wrk {rps:.0} req/s", if on { "policies" } else { "none" }, r.p50_us, r.p99_us);
        }
    }
    let _ = c.delete_routes("policies");
    println!();
    println!("| (medians of {rounds} runs each, same lab, ABBA) | no policy | every policy, idle | ratio / difference |");
    println!("|---|---|---|---|");
    let row = |what: &str, a: &[f64], b: &[f64], unit: &str| {
        let (ma, mb) = (median(a), median(b));
        println!("| {what} | {ma:.0} {unit} ({}) | {mb:.0} {unit} ({}) | {:.3}× ({:+.0} {unit}) |", spread(a), spread(b), mb / ma, mb - ma);
    };
    row("fixed 1,000 req/s, p50", &none.p50_us, &with.p50_us, "µs");
    row("fixed 1,000 req/s, p99", &none.p99_us, &with.p99_us, "µs");
    row("wrk, 32 connections", &none.rps, &with.rps, "req/s");
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
