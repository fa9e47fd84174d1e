//! `cargo xtask lab up|down`: the local mesh in network namespaces, no Kubernetes.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use mesh_tests::{Lab, LabSpec, Spawn, clean};

use crate::{require_root, root_dir, setup_and_build, sh, step};

/// Run id of the lab: every object it creates is named `mesh-lab...`.
const RUN: &str = "lab";
const VIP: &str = "198.19.0.10";
const SERVICE_PORT: u16 = 80;
const APP_PORT: u16 = 8080;

#[derive(Subcommand)]
pub enum Action {
    /// Build the lab, start the daemons and the sample app, drive traffic, print a report.
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

fn state_dir() -> PathBuf {
    PathBuf::from("/run/mesh-lab")
}

fn up() -> Result<()> {
    require_root("lab up")?;
    let started = Instant::now();
    setup_and_build()?;
    step("building mesh-node and the sample app");
    sh(Command::new("cargo").args(["build", "--locked", "-p", "mesh-node", "-p", "mesh-tests", "--bins"]))?;
    let bin = |name: &str| root_dir().join("target/debug").join(name).display().to_string();
    let (mesh_node, whoami) = (bin("mesh-node"), bin("mesh-whoami"));

    step("removing a previous lab, if any");
    down();
    let state = state_dir();
    let _ = fs::remove_dir_all(&state);
    fs::create_dir_all(&state).context("creating /run/mesh-lab")?;

    step("creating 2 nodes with 2 pods each (network namespaces + cgroups)");
    let mut lab = Lab::build(LabSpec { run: RUN.into(), pods_per_node: vec![2, 2] })?;
    for node in &lab.nodes {
        println!("    node {} underlay {} netns {}", node.name, node.underlay_ip, node.netns);
    }
    for pod in &lab.pods {
        println!("    pod  {} ip {} netns {}", pod.name, pod.ip, pod.netns);
    }

    step("starting the sample app (mesh-whoami) in every pod but the client n1p1");
    let backends: Vec<String> = lab.pods.iter().filter(|p| p.name != "n1p1").map(|p| p.name.clone()).collect();
    for name in &backends {
        let pod = lab.pod(name).clone();
        let log = state.join(format!("{name}.log"));
        let port = APP_PORT.to_string();
        let args = ["serve", "--name", name.as_str(), "--tcp", port.as_str()];
        let mut spawn = Spawn::new(&pod.netns, &pod.cgroup, &whoami, &args);
        spawn.log = Some(&log);
        let mut p = lab.spawn(&spawn)?;
        p.wait_for_line("listening", Duration::from_secs(5))?;
        p.detach();
    }

    step(&format!("starting mesh-node on each node (Service {VIP}:{SERVICE_PORT} -> pods :{APP_PORT})"));
    let services = serde_services(&lab, &backends);
    let services_file = state.join("services.json");
    fs::write(&services_file, services)?;
    for node in lab.nodes.clone() {
        let log = state.join(format!("mesh-node-{}.log", node.name));
        let pin_dir = lab.bpffs.join(&node.name);
        let (cgroup, pin, file) = (
            node.pods_cgroup.display().to_string(),
            pin_dir.display().to_string(),
            services_file.display().to_string(),
        );
        let env = [
            ("MESH_NODE_NAME", node.name.as_str()),
            ("MESH_CGROUP", cgroup.as_str()),
            ("MESH_BPF_PIN_DIR", pin.as_str()),
            ("MESH_SERVICES_FILE", file.as_str()),
        ];
        let mut spawn = Spawn::new(&node.netns, &node.system_cgroup, &mesh_node, &[]);
        spawn.env = &env;
        spawn.log = Some(&log);
        let mut p = lab.spawn(&spawn)?;
        p.wait_for_line("mesh-node ready", Duration::from_secs(10))
            .with_context(|| format!("mesh-node on {} did not start; see {}", node.name, log.display()))?;
        println!("    {}: mesh-node pid {} (log {})", node.name, p.pid(), log.display());
        p.detach();
    }

    step(&format!("driving traffic: 20 connections from n1p1 to {VIP}:{SERVICE_PORT}"));
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..20 {
        let out = lab.run_in_pod("n1p1", &whoami, &["connect", &format!("{VIP}:{SERVICE_PORT}")])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let who = text
            .split("name=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map_or_else(|| format!("FAILED: {}", text.trim()), str::to_owned);
        *answered.entry(who).or_default() += 1;
    }
    let failed: u32 = answered.iter().filter(|(k, _)| k.starts_with("FAILED")).map(|(_, v)| v).sum();

    println!();
    println!("\x1b[1mmesh lab report\x1b[0m");
    println!("  client n1p1 ({}) -> Service {VIP}:{SERVICE_PORT} (socket-level LB in the kernel, cgroup/connect4)", lab.pod("n1p1").ip);
    for (who, n) in &answered {
        println!("    answered by {who:<8} {n:>3} connections");
    }
    println!("  inspect: bpftool prog list | grep mesh_ ; bpftool map dump pinned {}/n1/MESH_SVC_V1", lab.bpffs.display());
    println!("  enter a pod: nsenter --net=/run/netns/mesh-lab-n1p1 {whoami} connect {VIP}:{SERVICE_PORT}");
    println!("  logs: {}", state.display());
    println!("  remove: cargo xtask lab down");
    println!("  up in {:.1?}", started.elapsed());
    lab.persist();
    if failed > 0 {
        bail!("{failed} of 20 connections failed");
    }
    Ok(())
}

fn serde_services(lab: &Lab, backends: &[String]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|name| format!(r#"{{"addr":"{}","port":{APP_PORT},"weight":1,"healthy":true}}"#, lab.pod(name).ip))
        .collect();
    format!(r#"[{{"vip":"{VIP}","port":{SERVICE_PORT},"protocol":"tcp","backends":[{}]}}]"#, backends.join(","))
}
