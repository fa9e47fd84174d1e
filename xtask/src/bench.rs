//! `cargo xtask bench`: benchmarks against the no-mesh baseline in the same run.
//!
//! Every capability with a cost is compared with what it replaces, interleaved and repeated on
//! the same lab, so ratios and medians survive a noisy 2-core machine. Results go to
//! `bench/results/<name>.md` and `.json`, with the machine description and the command.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{require_root, root_dir, setup_and_build, sh, step};

mod datapath;

pub fn run(only: Option<&str>) -> Result<()> {
    require_root("bench")?;
    setup_and_build()?;
    step("building release binaries for the benchmarks");
    sh(Command::new("cargo").args(["build", "--release", "--locked", "-p", "mesh-tests", "--bins"]))?;
    let leftovers = mesh_tests::clean::clean_all();
    if !leftovers.is_empty() {
        println!("    removed leftovers: {}", leftovers.join(", "));
    }
    let mut ran = false;
    if only.is_none_or(|o| o == "datapath") {
        datapath::run()?;
        ran = true;
    }
    if only.is_none_or(|o| o == "node") {
        // The node daemon's L4 benchmark (cross-node through two daemons vs direct, iperf3,
        // fixed-rate RTT, connections/s, daemon CPU/GB, AES-GCM): an ignored test of mesh-tests
        // that prints its tables; bench/results/node-l4.md records runs of it with their commits
        // (it writes no file itself).
        step("bench: node daemon L4 (cross-node mesh vs direct)");
        sh(Command::new("cargo").args(["build", "--release", "--locked", "-p", "mesh-node", "--bins"]))?;
        sh(Command::new("cargo").args([
            "test", "--release", "--locked", "-p", "mesh-tests", "--features", "privileged", "--test", "bench-node", "--", "--ignored",
            "--nocapture", "--test-threads=1",
        ]))?;
        ran = true;
    }
    if only.is_none_or(|o| o == "node-l7") {
        // HTTP through two daemons (mesh-l7 on both) vs direct: fixed-rate latency
        // (mesh-whoami http-load, HTTP/1.1 and h2c), maximum rate (wrk, h2load) and daemon CPU
        // per request. An ignored test of mesh-tests that prints its tables; runs are recorded
        // in bench/results/node-l7.md with their commits (it writes no file itself).
        step("bench: node daemon L7 (HTTP/1.1 and h2c through two daemons vs direct)");
        sh(Command::new("cargo").args(["build", "--release", "--locked", "-p", "mesh-node", "--bins"]))?;
        sh(Command::new("cargo").args([
            "test", "--release", "--locked", "-p", "mesh-tests", "--features", "privileged", "--test", "bench-node-l7", "--", "--ignored",
            "--nocapture", "--test-threads=1",
        ]))?;
        ran = true;
    }
    if only.is_none_or(|o| o == "l7-policies") {
        // Traffic policies configured but not firing vs none, through the whole mesh (file-mode
        // controller, both daemons, eBPF): fixed-rate latency and wrk's maximum rate. Runs are
        // recorded in bench/results/l7-policies.md (it writes no file itself).
        step("bench: L7 policies configured but idle vs none (whole mesh)");
        whole_mesh_bench("bench-l7-policies", "l7_policies")?;
        ran = true;
    }
    if only.is_none_or(|o| o == "tracing") {
        // Tracing at 1 % and 100 % sampling vs none, through the whole mesh, spans exported to
        // a Zipkin collector in the lab. Runs are recorded in bench/results/tracing.md.
        step("bench: tracing at 1 % and 100 % vs none (whole mesh)");
        whole_mesh_bench("bench-l7-policies", "tracing_at")?;
        ran = true;
    }
    if only.is_none_or(|o| o == "plaintext") {
        // An unmeshed client's plaintext to a meshed pod, steered to the destination daemon vs
        // straight to the pod. Runs are recorded in bench/results/plaintext.md.
        step("bench: plaintext from an unmeshed client, steered to the destination daemon vs direct");
        whole_mesh_bench("bench-l7-policies", "plaintext_steering")?;
        ran = true;
    }
    if only.is_none_or(|o| o == "memory") {
        // The node daemons' RSS fed by mesh-control with 10,000 Services and 100,000 meshed
        // workloads, and after one more update at that scale. Runs are recorded in
        // bench/results/ztunnel.md ("Memory at scale").
        step("bench: node daemon memory fed by mesh-control at 10,000 Services / 100,000 workloads (whole mesh)");
        whole_mesh_bench("bench-memory", "controller_fed")?;
        ran = true;
    }
    if only.is_none_or(|o| o == "soak") {
        // 10,000 connections held through both daemons (RSS, CPU, open files before, during,
        // after), then slowloris and TLS-flood attacks, with a legitimate client's latency
        // measured throughout. Runs are recorded in bench/results/soak.md.
        step("bench: soak (10,000 connections) and attacks (slowloris, TLS flood)");
        sh(Command::new("cargo").args(["build", "--release", "--locked", "-p", "mesh-node", "--bins"]))?;
        sh(Command::new("cargo").args([
            "test", "--release", "--locked", "-p", "mesh-tests", "--features", "privileged", "--test", "bench-soak", "--", "--ignored",
            "--nocapture", "--test-threads=1",
        ]))?;
        ran = true;
    }
    if !ran {
        bail!("unknown benchmark {only:?}: expected one of: datapath, node, node-l7, l7-policies, tracing, plaintext, memory, soak");
    }
    Ok(())
}

/// A benchmark on the whole mesh in the lab (release build): the tests of the test target
/// `target` (`tests/bench/l7_policies.rs`, `tests/bench/memory.rs`) whose names contain `filter`.
fn whole_mesh_bench(target: &str, filter: &str) -> Result<()> {
    sh(Command::new("cargo").args(["build", "--release", "--locked", "-p", "mesh-node", "-p", "mesh-control", "--bins"]))?;
    sh(Command::new("cargo").args([
        "test", "--release", "--locked", "-p", "mesh-tests", "--features", "privileged", "--test", target, "--", "--ignored",
        "--nocapture", "--test-threads=1", filter,
    ]))
}

pub fn whoami() -> String {
    root_dir().join("target/release/mesh-whoami").display().to_string()
}

/// Median of a non-empty slice.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) { f64::midpoint(v[mid - 1], v[mid]) } else { v[mid] }
}

/// "median (min–max)" of repeated measurements.
pub fn spread(values: &[f64], decimals: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.*} ({:.*}–{:.*})", decimals, median(values), decimals, min, decimals, max)
}

/// Parses the JSON line a measurement tool printed last.
pub fn last_json(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).with_context(|| format!("no JSON in output: {text}"))?;
    Ok(serde_json::from_str(line)?)
}

/// The machine, for the results header.
pub fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    format!("{cores} × {cpu}, Linux {kernel}")
}

pub fn write_results(name: &str, markdown: &str, json: &Value) -> Result<PathBuf> {
    let dir = root_dir().join("bench/results");
    fs::create_dir_all(&dir)?;
    let md = dir.join(format!("{name}.md"));
    fs::write(&md, markdown)?;
    fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(json)? + "\n")?;
    Ok(md)
}
