//! `cargo xtask lab up|down`: the whole mesh in network namespaces, no Kubernetes.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use mesh_tests::{
    LabSpec,
    clean,
    cluster::{APP_PORT, Binaries, Cluster, HTTP_SERVICE_PORT, METRICS_PORT, TCP_SERVICE_PORT, VIP},
};

use crate::{require_root, root_dir, setup_and_build, sh, step};

/// Run id of the lab: every object it creates is named `mesh-lab...`.
const RUN: &str = "lab";

#[derive(Subcommand)]
pub enum Action {
    /// Build the lab, start mesh-control, one mesh-node per node and the sample app, drive
    /// traffic and print a report.
    Up,
    /// Remove everything the lab created.
    Down,
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up => up(),
        Action::Down => {
            require_root("lab down")?;
            down();
            Ok(())
        }
    }
}

fn down() {
    let removed = clean::clean_run(Some(RUN));
    if removed.is_empty() {
        println!("no lab was running");
    }
    for what in removed {
        println!("removed {what}");
    }
}

pub fn state_dir() -> PathBuf {
    PathBuf::from("/run/mesh-lab")
}

/// Builds the binaries the lab and the end-to-end suite run.
pub fn build_binaries() -> Result<()> {
    step("building mesh-control, mesh-node and the sample app");
    sh(Command::new("cargo").args(["build", "--locked", "-p", "mesh-control", "-p", "mesh-node", "-p", "mesh-tests", "--bins"]))
}

fn who(line: &str) -> String {
    line.split("name=").nth(1).and_then(|s| s.split_whitespace().next()).map_or_else(|| format!("FAILED ({})", line.trim()), str::to_owned)
}

fn tally(lines: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for l in lines {
        *t.entry(who(l)).or_insert(0) += 1;
    }
    t
}

fn up() -> Result<()> {
    require_root("lab up")?;
    let started = Instant::now();
    setup_and_build()?;
    build_binaries()?;

    step("removing a previous lab, if any");
    down();

    step("creating 2 nodes and 5 pods, starting mesh-control (file mode), 2 mesh-nodes, the sample app");
    let bins = Binaries::in_dir(&root_dir().join("target/debug"));
    let cluster = Cluster::start(LabSpec { run: RUN.into(), pods_per_node: vec![3, 2] }, bins, &state_dir())
        .context("starting the lab (see the logs in /run/mesh-lab/logs)")?;
    for pod in &cluster.lab.pods {
        let role = mesh_tests::cluster::PODS.iter().find(|r| r.pod == pod.name).expect("role");
        let meshed = if role.meshed { "meshed" } else { "NOT meshed" };
        println!("    {:<5} {:<9} sa={:<7} {:<15} node n{}  {meshed}", pod.name, role.name, role.service_account, pod.ip, pod.node);
    }

    let vip = SocketAddr::from((VIP, TCP_SERVICE_PORT));
    step(&format!("traffic: 12 connections from each client to Service demo/whoami {vip}"));
    let meshed = cluster.dial("n1p1", vip, &["--count", "12"])?;
    let legacy = cluster.dial("n1p3", vip, &["--count", "12"])?;
    let http = cluster.lab.run_in_pod("n1p1", "curl", &["-s", "--max-time", "3", &format!("http://{VIP}:{HTTP_SERVICE_PORT}/hello")])?;

    step("policy: applying deploy/examples/policies/deny-client-to-whoami.yaml (DENY principal client)");
    let deny = fs::read_to_string(root_dir().join("deploy/examples/policies/deny-client-to-whoami.yaml"))?;
    cluster.apply_policy("deny-client", &deny)?;
    std::thread::sleep(Duration::from_millis(800));
    let denied = cluster.dial("n1p1", vip, &["--count", "6", "--timeout-ms", "2000"])?;
    cluster.delete_policy("deny-client")?;
    std::thread::sleep(Duration::from_millis(800));
    let after = cluster.dial("n1p1", vip, &["--count", "3"])?;

    let metrics = cluster.curl_on_node(2, &format!("http://127.0.0.1:{METRICS_PORT}/metrics")).unwrap_or_default();
    let mtls: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains("reporter=\"destination\""))
        .collect();

    println!();
    println!("\x1b[1mmesh lab report\x1b[0m");
    println!("  client (meshed, n1p1) -> {vip}: captured by eBPF into mesh-node n1, HBONE (mTLS) to the backend's node:");
    for (b, n) in tally(&meshed) {
        println!("      answered by {b:<22} {n:>3}");
    }
    println!("  legacy (NOT meshed, n1p3) -> {vip}: balanced in the kernel at connect(), plaintext:");
    for (b, n) in tally(&legacy) {
        println!("      answered by {b:<22} {n:>3}");
    }
    println!("  HTTP through the mesh: {}", String::from_utf8_lossy(&http.stdout).trim());
    println!("  identities seen by node n2 (destination reporter; principals, connection_security_policy):");
    for l in mtls.iter().take(4) {
        let pick = |k: &str| l.split(&format!("{k}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap_or("?").to_owned();
        println!(
            "      {} -> {}  [{}]",
            pick("source_principal"),
            pick("destination_principal"),
            pick("connection_security_policy")
        );
    }
    let refused = denied.iter().filter(|l| !l.starts_with("connected") || who(l).starts_with("FAILED")).count();
    println!("  policy DENY client -> whoami: {refused} of {} attempts refused; after removing it: {} of {} answered", denied.len(), after.iter().filter(|l| !who(l).starts_with("FAILED")).count(), after.len());
    println!();
    println!("  metrics   nsenter --net=/run/netns/mesh-lab-n1 curl -s localhost:{METRICS_PORT}/metrics   (also n2)");
    println!("  admin     nsenter --net=/run/netns/mesh-lab-n1 curl -s localhost:15000/config_dump");
    println!("  control   nsenter --net=/run/netns/mesh-lab-ul curl -s localhost:15014/status");
    println!("  policies  drop Istio-shaped YAML into {}/config/policies/ (applied live)", state_dir().display());
    println!("  datapath  bpftool map dump pinned /sys/fs/bpf/mesh-lab/n1/MESH_SVC_V1");
    println!("  a pod     nsenter --net=/run/netns/mesh-lab-n1p1 {} connect {vip}", root_dir().join("target/debug/mesh-whoami").display());
    println!("  logs      {}/logs", state_dir().display());
    println!("  remove    cargo xtask lab down");
    println!("  up in {:.1?}", started.elapsed());
    let failed = tally(&meshed).keys().chain(tally(&legacy).keys()).filter(|k| k.starts_with("FAILED")).count();
    cluster.persist();
    if failed > 0 {
        bail!("some connections failed (see the report above and the logs)");
    }
    let _ = APP_PORT;
    Ok(())
}
