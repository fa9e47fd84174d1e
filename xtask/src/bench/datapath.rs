//! Datapath benchmarks (issue: kernel datapath):
//! 1. connect() to a Service VIP with 10, 1k and 10k Services installed: eBPF socket LB vs the
//!    same Services as kube-proxy-style iptables NAT rules, vs dialing the backend directly.
//! 2. Same-node TCP: throughput (iperf3) and 64-byte request/response latency, plain TCP vs the
//!    sockmap bypass.
//!
//! Topology: the lab (2 nodes, 1 pod each for 1; 1 node, 2 pods for 2). The client is pinned to
//! CPU 1 and the server to CPU 0 (`taskset`); the kernel work runs where the packets go.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_node::datapath::{BackendSpec, Datapath, DatapathConfig, EndpointSpec, NodeSpec, ServiceSpec};
use mesh_tests::{Lab, LabSpec, Spawn};
use serde_json::{Value, json};

use super::{last_json, machine, median, spread, whoami, write_results};
use crate::step;

const SERVICE_COUNTS: [u32; 3] = [10, 1_000, 10_000];
const CONNECTS: &str = "2000";
const REPEATS: usize = 3;
const APP_PORT: u16 = 8080;

pub fn run() -> Result<()> {
    let started = Instant::now();
    let connect = connect_latency()?;
    let same_node = same_node()?;
    let mut md = String::new();
    writeln!(md, "# Datapath benchmarks\n")?;
    writeln!(md, "Machine: {}. Command: `cargo xtask bench --only datapath` (as root). Took {:.0?}.\n", machine(), started.elapsed())?;
    md.push_str(&connect.0);
    md.push_str(&same_node.0);
    let json = json!({ "machine": machine(), "connect": connect.1, "same_node": same_node.1 });
    let path = write_results("datapath", &md, &json)?;
    println!("\n{md}\nwritten to {}", path.display());
    Ok(())
}

/// Runs `program args` in a pod pinned to `cpu`, returning stdout; fails on a non-zero exit.
fn in_pod(lab: &Lab, pod: &str, cpu: &str, program: &str, args: &[&str]) -> Result<Vec<u8>> {
    let mut full = vec!["-c", cpu, program];
    full.extend_from_slice(args);
    let out = lab.run_in_pod(pod, "taskset", &full)?;
    if !out.status.success() {
        bail!("{program} {args:?} in {pod} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn vip(i: u32) -> Ipv4Addr {
    let [_, _, hi, lo] = i.to_be_bytes();
    Ipv4Addr::new(198, 19, hi, lo)
}

/// kube-proxy's iptables layout: KUBE-SERVICES → one KUBE-SVC chain per Service → KUBE-SEP DNAT.
fn iptables_rules(count: u32, backend: SocketAddr) -> String {
    let mut r = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..count {
        let _ = writeln!(r, ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]");
    }
    r.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for i in 0..count {
        let _ = writeln!(r, "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"ns/svc-{i} cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i}", vip(i));
        let _ = writeln!(r, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}");
        let _ = writeln!(r, "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {backend}");
    }
    r.push_str("COMMIT\n");
    r
}

fn iptables(netns: &str, rules: Option<&str>) -> Result<()> {
    let ns = format!("--net=/run/netns/{netns}");
    match rules {
        Some(rules) => {
            let mut child = Command::new("nsenter").args([ns.as_str(), "iptables-restore"]).stdin(Stdio::piped()).spawn()?;
            std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
            let status = child.wait()?;
            if !status.success() {
                bail!("iptables-restore failed ({status})");
            }
        }
        None => {
            for args in [["-t", "nat", "-F"], ["-t", "nat", "-X"]] {
                let status = Command::new("nsenter").arg(&ns).arg("iptables").args(args).status()?;
                if !status.success() {
                    bail!("iptables {args:?} failed");
                }
            }
        }
    }
    Ok(())
}

fn p50(stdout: &[u8]) -> Result<f64> {
    last_json(stdout)?["p50_us"].as_f64().context("p50_us")
}

fn connect_latency() -> Result<(String, Value)> {
    step("bench: connect() to a Service VIP — eBPF socket LB vs iptables (kube-proxy style) vs direct");
    let mut lab = Lab::build(LabSpec { run: "bench".into(), pods_per_node: vec![1, 1] })?;
    let server = lab.pod("n2p1").clone();
    let port = APP_PORT.to_string();
    let whoami = whoami();
    let args = ["-c", "0", whoami.as_str(), "serve", "--name", "n2p1", "--tcp", port.as_str()];
    let mut srv = lab.spawn(&Spawn::new(&server.netns, &server.cgroup, "taskset", &args))?;
    srv.wait_for_line("listening", Duration::from_secs(5))?;
    let backend = SocketAddr::from((server.ip, APP_PORT));
    let node1 = lab.node(1).clone();
    // For the iptables baseline the pod must route VIPs to its node (as pods do in a cluster);
    // the node has no route for them, so an unmatched VIP still ends unreachable inside the lab.
    mesh_tests::sys::ip_in(&lab.pod("n1p1").netns, &["route", "add", "198.19.0.0/16", "via", &node1.pod_gateway.to_string()])?;

    let mut rows = Vec::new();
    let mut md = String::from("## connect() latency to a Service (p50 of 2000 connects, µs; median (min–max) of 3 runs)\n\n");
    md.push_str("| Services | direct to backend | eBPF socket LB | iptables NAT | added by eBPF | added by iptables | iptables / eBPF |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for &count in &SERVICE_COUNTS {
        // The target sits in the middle of the rule list: iptables scans linearly, so this is
        // its average case.
        let target = SocketAddr::from((vip(count / 2), 80)).to_string();
        let mut dp = Datapath::load(DatapathConfig { cgroup: node1.cgroup.clone(), netns: format!("/run/netns/{}", node1.netns).into(), pin_dir: None })?;
        let installing = Instant::now();
        for i in 0..count {
            let b = BackendSpec { addr: IpAddr::V4(server.ip), port: APP_PORT, weight: 1, healthy: true };
            dp.upsert_service(&ServiceSpec::tcp(IpAddr::V4(vip(i)), 80, vec![b]))?;
        }
        let install_ms = installing.elapsed().as_secs_f64() * 1e3;
        let rules = iptables_rules(count, backend);
        let (mut direct, mut ebpf, mut ipt) = (Vec::new(), Vec::new(), Vec::new());
        let mut ipt_install_ms = Vec::new();
        for _ in 0..REPEATS {
            direct.push(p50(&in_pod(&lab, "n1p1", "1", &whoami, &["bench-connect", &backend.to_string(), "--count", CONNECTS])?)?);
            dp.attach()?;
            ebpf.push(p50(&in_pod(&lab, "n1p1", "1", &whoami, &["bench-connect", &target, "--count", CONNECTS])?)?);
            dp.detach();
            let t = Instant::now();
            iptables(&node1.netns, Some(&rules))?;
            ipt_install_ms.push(t.elapsed().as_secs_f64() * 1e3);
            ipt.push(p50(&in_pod(&lab, "n1p1", "1", &whoami, &["bench-connect", &target, "--count", CONNECTS])?)?);
            iptables(&node1.netns, None)?;
        }
        drop(dp);
        let (d, e, i) = (median(&direct), median(&ebpf), median(&ipt));
        writeln!(md, "| {count} | {} | {} | {} | {:+.1} | {:+.1} | {:.2}× |", spread(&direct, 1), spread(&ebpf, 1), spread(&ipt, 1), e - d, i - d, i / e)?;
        println!("    {count:>6} services: direct {d:.1} µs, eBPF {e:.1} µs, iptables {i:.1} µs");
        rows.push(json!({
            "services": count, "direct_p50_us": direct, "ebpf_p50_us": ebpf, "iptables_p50_us": ipt,
            "ebpf_install_ms": install_ms, "iptables_restore_ms": ipt_install_ms,
        }));
    }
    let ebpf_flat = rows.last().and_then(|r| r["ebpf_p50_us"].as_array()).map(|a| median(&a.iter().filter_map(Value::as_f64).collect::<Vec<_>>()));
    let ebpf_small = rows.first().and_then(|r| r["ebpf_p50_us"].as_array()).map(|a| median(&a.iter().filter_map(Value::as_f64).collect::<Vec<_>>()));
    if let (Some(big), Some(small)) = (ebpf_flat, ebpf_small) {
        writeln!(md, "\neBPF at 10k Services / at 10 Services: **{:.2}×** (flat = 1.0). \"Added\" is the p50 minus the direct dial's p50 in the same run; differences of a few µs are within this machine's run-to-run spread (see the min–max ranges). ", big / small)?;
    }
    md.push_str("iptables rules are kube-proxy's shape (KUBE-SERVICES → KUBE-SVC → KUBE-SEP DNAT), loaded with `iptables-restore` (the nft backend of Debian 12's iptables) in the client's node; the client pod routes the VIP range to its node for that run only. The eBPF run rewrites the VIP in `connect()` and installs each Service as 3 map entries.\n\n");
    lab.teardown();
    Ok((md, json!(rows)))
}

fn same_node() -> Result<(String, Value)> {
    step("bench: same-node TCP — plain vs sockmap bypass (iperf3 throughput, 64 B request/response)");
    let mut lab = Lab::build(LabSpec { run: "bench".into(), pods_per_node: vec![2] })?;
    let server = lab.pod("n1p2").clone();
    let port = APP_PORT.to_string();
    let whoami = whoami();
    let args = ["-c", "0", whoami.as_str(), "serve", "--name", "n1p2", "--tcp", port.as_str()];
    let mut srv = lab.spawn(&Spawn::new(&server.netns, &server.cgroup, "taskset", &args))?;
    srv.wait_for_line("listening", Duration::from_secs(5))?;
    let mut iperf = lab.spawn(&Spawn::new(&server.netns, &server.cgroup, "taskset", &["-c", "0", "iperf3", "-s", "-p", "5201", "--forceflush"]))?;
    iperf.wait_for_line("Server listening", Duration::from_secs(5))?;
    let node = lab.node(1).clone();
    let mut dp = Datapath::load(DatapathConfig { cgroup: node.cgroup.clone(), netns: format!("/run/netns/{}", node.netns).into(), pin_dir: None })?;
    dp.attach()?;
    let local = |ip: Ipv4Addr| EndpointSpec { addr: IpAddr::V4(ip), identity: 0, meshed: false, strict: false, local: true };
    dp.sync_endpoints(&[local(lab.pod("n1p1").ip), local(server.ip)])?;
    let target = SocketAddr::from((server.ip, APP_PORT)).to_string();
    let server_ip = server.ip.to_string();

    let (mut gbps, mut rr50, mut rr99) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..5 {
        for (mode, bypass) in [(0, false), (1, true)] {
            dp.set_node(&NodeSpec { capture: None, hbone_port: 15008, bypass, daemon_mark: mesh_common::DEFAULT_DAEMON_MARK })?;
            let out = in_pod(&lab, "n1p1", "1", "iperf3", &["-c", &server_ip, "-p", "5201", "-t", "3", "-J"])?;
            let v: Value = serde_json::from_slice(&out)?;
            let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 bits_per_second")?;
            gbps[mode].push(bps / 1e9);
            let rr = last_json(&in_pod(&lab, "n1p1", "1", &whoami, &["rr", &target, "--count", "20000", "--size", "64"])?)?;
            rr50[mode].push(rr["p50_us"].as_f64().context("p50")?);
            rr99[mode].push(rr["p99_us"].as_f64().context("p99")?);
        }
    }
    let stats = dp.stats()?;
    let mut md = String::from("## Same-node TCP: plain vs sockmap bypass (median (min–max) of 5 interleaved runs)\n\n");
    md.push_str("| | plain TCP | bypass | bypass / plain |\n|---|---:|---:|---:|\n");
    writeln!(md, "| iperf3 throughput, Gbit/s (3 s, 1 stream) | {} | {} | {:.2}× |", spread(&gbps[0], 1), spread(&gbps[1], 1), median(&gbps[1]) / median(&gbps[0]))?;
    writeln!(md, "| 64 B request/response p50, µs | {} | {} | {:.2}× |", spread(&rr50[0], 1), spread(&rr50[1], 1), median(&rr50[1]) / median(&rr50[0]))?;
    writeln!(md, "| 64 B request/response p99, µs | {} | {} | {:.2}× |", spread(&rr99[0], 1), spread(&rr99[1], 1), median(&rr99[1]) / median(&rr99[0]))?;
    writeln!(md, "\nClient pinned to CPU 1, server to CPU 0. Bypass: sockops puts both established sockets in `MESH_SOCK_V1`, sk_msg redirects each send to the peer's receive queue ({} sockets added, {} messages redirected during the run).\n", stats.event(mesh_common::Stat::BypassSocket), stats.event(mesh_common::Stat::BypassRedirect))?;
    drop(dp);
    lab.teardown();
    Ok((md, json!({ "gbps": { "plain": gbps[0], "bypass": gbps[1] }, "rr_p50_us": { "plain": rr50[0], "bypass": rr50[1] }, "rr_p99_us": { "plain": rr99[0], "bypass": rr99[1] } })))
}
