//! A real ztunnel (istio/ztunnel) in a lab pod, for the interop suite and the side-by-side
//! benchmark. This repository never builds, fetches or contains ztunnel: `MESH_ZTUNNEL_BIN` names
//! a binary built from ztunnel's own repository (docs/ztunnel.md says how).
//!
//! ztunnel runs as its own namespaced test harness runs it: dedicated mode (`PROXY_MODE=dedicated`,
//! one workload, `PROXY_WORKLOAD_INFO`), its certificates from its fake CA (`FAKE_CA=true`, built
//! with `--features testing`), its workloads from a local XDS file, the workload's outgoing TCP
//! sent to its outbound port by an iptables `REDIRECT`. Where it runs is a [`Placement`]: inside
//! the pod (the harness's way: capture in the pod's `nat OUTPUT`, skipping ztunnel's own marked
//! sockets; HBONE arrives at the pod's `ip:15008` where ztunnel listens), or in the node's
//! namespace with the capture our daemon gets there (the benchmark's way: one topology for both).
//!
//! Our daemons trust ztunnel's fake CA by loading its root certificate and key
//! (`src/tls/root-cert.pem`, `src/tls/ca-key.pem` of ztunnel's repository) as their
//! `MESH_CA_CERT`/`MESH_CA_KEY`, so both sides sign under one root.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{Lab, PodProcess, Spawn, sys::Error};

/// The ztunnel binary to run (built with `--features testing`, which `FAKE_CA` needs).
pub const ENV_BIN: &str = "MESH_ZTUNNEL_BIN";
/// The folder holding ztunnel's fake CA (`root-cert.pem`, `ca-key.pem`): by default `src/tls/`
/// of the repository the binary was built in (`<repo>/out/rust/release/ztunnel`: its `.cargo/config.toml` sets that target folder).
pub const ENV_CA_DIR: &str = "MESH_ZTUNNEL_CA_DIR";
/// ztunnel marks its own sockets with this (`PACKET_MARK`); the capture rule skips them.
const MARK: u32 = 1337;
const OUTBOUND_PORT: &str = "15001";
const HBONE_PORT: &str = "15008";
/// The routing table that delivers HBONE for the pod to ztunnel on the node (`Placement::Node`).
const HBONE_TABLE: &str = "100";
/// Marks the app's replies to ztunnel's transparent connections (`Placement::Node`); a bit
/// that ztunnel's own `PACKET_MARK` (0x539) does not set.
const REPLY_MARK: &str = "0x200/0x200";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The benchmark's name for the same binary (either variable serves both).
pub const ENV_BENCH_BIN: &str = "MESH_BENCH_ZTUNNEL";

/// The binary `MESH_ZTUNNEL_BIN` (or `MESH_BENCH_ZTUNNEL`) names: `None` when unset, an error
/// when it names nothing.
pub fn binary() -> Result<Option<PathBuf>, Error> {
    let named = [ENV_BIN, ENV_BENCH_BIN].iter().find_map(|v| std::env::var_os(v).filter(|v| !v.is_empty()));
    let Some(path) = named.map(PathBuf::from) else { return Ok(None) };
    if path.is_file() {
        Ok(Some(path))
    } else {
        Err(Error::Io { path, source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("{ENV_BIN} names no file")) })
    }
}

/// ztunnel's fake CA: the root certificate and its key, both PEM.
#[derive(Clone, Debug)]
pub struct FakeCa {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Finds ztunnel's fake CA: `MESH_ZTUNNEL_CA_DIR`, else `src/tls/` in a parent of the binary.
pub fn fake_ca(bin: &Path) -> Result<FakeCa, Error> {
    let in_dir = |dir: &Path| FakeCa { cert: dir.join("root-cert.pem"), key: dir.join("ca-key.pem") };
    let found = match std::env::var_os(ENV_CA_DIR) {
        Some(dir) => Some(in_dir(Path::new(&dir))),
        None => bin.ancestors().map(|a| in_dir(&a.join("src/tls"))).find(|ca| ca.cert.is_file()),
    };
    match found {
        Some(ca) if ca.cert.is_file() && ca.key.is_file() => Ok(ca),
        _ => Err(Error::Io {
            path: bin.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no ztunnel fake CA (root-cert.pem, ca-key.pem) in {ENV_CA_DIR} or in src/tls/ above the binary"),
            ),
        }),
    }
}

/// One workload of ztunnel's local XDS file.
pub struct Workload<'a> {
    pub pod: &'a str,
    pub ip: IpAddr,
    pub service_account: &'a str,
    /// The node's name (ztunnel's `node`).
    pub node: &'a str,
}

/// ztunnel's local XDS file (`LOCAL_XDS_PATH`, its `LocalConfig` YAML): the workloads, all in
/// namespace `default`, all HBONE-capable; no policies. `extra_services` Services `svc-<i>` as
/// the node lab's synthetic ones (VIP 198.19.<i/256>.<i%256>, port 80 → 8080), each with 10
/// endpoint workloads on node `n2` at 100.64.0.0 + 10 i + j (never dialed).
pub fn local_xds(workloads: &[Workload<'_>], extra_services: u32) -> String {
    let mut yaml = String::from("workloads:\n");
    for w in workloads {
        yaml.push_str(&format!(
            "- uid: Kubernetes//Pod/default/{pod}\n  name: {pod}\n  namespace: default\n  serviceAccount: {sa}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            pod = w.pod,
            sa = w.service_account,
            ip = w.ip,
            node = w.node
        ));
    }
    for i in 0..extra_services {
        for j in 0..10u32 {
            let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + i * 10 + j);
            yaml.push_str(&format!(
                "- {{uid: Kubernetes//Pod/default/svc-{i}-{j}, name: svc-{i}-{j}, namespace: default, serviceAccount: b, trustDomain: cluster.local, workloadIps: [\"{ip}\"], protocol: HBONE, node: n2, network: \"\", services: {{\"default/svc-{i}.default.svc.cluster.local\": {{80: 8080}}}}}}\n"
            ));
        }
    }
    yaml.push_str("policies: []\nservices:");
    if extra_services == 0 {
        yaml.push_str(" []");
    }
    yaml.push('\n');
    for i in 0..extra_services {
        yaml.push_str(&format!(
            "- {{name: svc-{i}, namespace: default, hostname: svc-{i}.default.svc.cluster.local, vips: [\"/198.19.{}.{}\"], ports: {{80: 8080}}}}\n",
            i / 256,
            i % 256
        ));
    }
    yaml
}

/// Where ztunnel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// Inside the pod's network namespace, as ztunnel's harness (and ambient's in-pod mode)
    /// runs it: it dials HBONE from the pod's address; capture is the pod's `nat OUTPUT`.
    #[default]
    Pod,
    /// In the node's namespace, where our daemon runs, with the capture our daemon gets in the
    /// node suite: a `nat PREROUTING` redirect of the pod's outgoing TCP to 15001, and HBONE
    /// addressed to the pod routed to the node. The same topology for both, for the benchmark.
    Node,
}

/// How to start one ztunnel.
pub struct Options<'a> {
    pub bin: &'a Path,
    /// The workload ztunnel proxies for (dedicated mode: exactly one).
    pub pod: &'a str,
    pub service_account: &'a str,
    pub placement: Placement,
    pub xds: &'a Path,
    pub log: &'a Path,
    /// `taskset` CPU list, or unpinned.
    pub cpus: Option<&'a str>,
    /// `RUST_LOG` (`info` prints ztunnel's access log; the benchmark uses `warn`, as ours).
    pub log_level: &'a str,
}

/// A ztunnel running in the lab; stopped (by PID) when dropped.
pub struct Ztunnel {
    process: PodProcess,
    netns: String,
    /// The capture of the pod's outgoing TCP: chain and rule.
    outbound: (&'static str, Vec<String>),
}

impl Ztunnel {
    /// Starts ztunnel for `pod`, waits until it is ready and turns the pod's capture on.
    pub fn start(lab: &mut Lab, o: &Options<'_>) -> Result<Self, Error> {
        let pod = lab.pod(o.pod).clone();
        let node = lab.node(pod.node).clone();
        let (netns, cgroup) = match o.placement {
            Placement::Pod => (pod.netns.clone(), pod.cgroup.clone()),
            Placement::Node => (node.netns.clone(), node.system_cgroup.clone()),
        };
        let workload = format!("default/{}/{}", o.pod, o.service_account);
        let mark = MARK.to_string();
        let env = [
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", workload.as_str()),
            ("FAKE_CA", "true"),
            ("XDS_ADDRESS", ""),
            ("LOCAL_XDS_PATH", o.xds.to_str().expect("utf-8 path")),
            ("NODE_NAME", node.name.as_str()),
            ("PACKET_MARK", mark.as_str()),
            // In the pod (as ztunnel's harness sets it for dedicated mode): no original source,
            // the app answers ztunnel's own address. On the node: transparent listeners, which
            // the routed HBONE needs (see `start`), and which also make ztunnel's inbound
            // connect to the app from the client's address.
            ("ENABLE_ORIG_SRC", if o.placement == Placement::Node { "true" } else { "false" }),
            // One worker thread, as our daemons in the benchmark (and ztunnel's default of 2
            // would use both of this machine's cores).
            ("ZTUNNEL_WORKER_THREADS", "1"),
            ("RUST_LOG", o.log_level),
        ];
        let bin = o.bin.to_str().expect("utf-8 path");
        let pinned: Vec<&str> = o.cpus.map_or_else(Vec::new, |c| vec!["-c", c, bin]);
        let mut spawn = match o.cpus {
            Some(_) => Spawn::new(&netns, &cgroup, "taskset", &pinned),
            None => Spawn::new(&netns, &cgroup, bin, &[]),
        };
        spawn.env = &env;
        spawn.log = Some(o.log);
        let process = lab.spawn(&spawn)?;
        let ip = pod.ip.to_string();
        let rule = |r: &[&str]| r.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mark = format!("{MARK:#x}/0xfff");
        let outbound = match o.placement {
            Placement::Pod => ("OUTPUT", rule(&["-p", "tcp", "!", "-o", "lo", "-m", "mark", "!", "--mark", &mark, "-j", "REDIRECT", "--to-ports", OUTBOUND_PORT])),
            Placement::Node => ("PREROUTING", rule(&["-i", "br0", "-s", &ip, "-p", "tcp", "-j", "REDIRECT", "--to-ports", OUTBOUND_PORT])),
        };
        let z = Self { process, netns, outbound };
        if o.placement == Placement::Node {
            // HBONE addressed to the pod is delivered to the node itself (a local route for any
            // address, in a table of its own), where ztunnel's transparent listener on 15008
            // takes it with the pod's address as its local address, which ztunnel checks against
            // the CONNECT target (a REDIRECT would rewrite it to the node's: "ip mismatch"). Our
            // daemon's routing rule does the same. The app's replies to the client's address
            // ztunnel connected from go back to ztunnel's transparent socket: the usual TPROXY
            // recipe (`-m socket --transparent` marks them, the mark selects the local table).
            crate::sys::ip_in(&z.netns, &["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", HBONE_TABLE])?;
            crate::sys::ip_in(&z.netns, &["rule", "add", "to", &ip, "ipproto", "tcp", "dport", HBONE_PORT, "lookup", HBONE_TABLE])?;
            crate::sys::ip_in(&z.netns, &["rule", "add", "fwmark", REPLY_MARK, "lookup", HBONE_TABLE])?;
            let replies = rule(&["-i", "br0", "-s", &ip, "-p", "tcp", "-m", "socket", "--transparent", "-j", "MARK", "--set-xmark", REPLY_MARK]);
            crate::sys::run("ip", &[&["netns", "exec", &z.netns, "iptables", "-w", "-t", "mangle", "-A", "PREROUTING"][..], &replies.iter().map(String::as_str).collect::<Vec<_>>()].concat())?;
        }
        z.wait_ready(o.log)?;
        z.set_capture(true)?;
        Ok(z)
    }

    fn wait_ready(&self, log: &Path) -> Result<(), Error> {
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            let out = crate::sys::run("ip", &["netns", "exec", &self.netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:15021/healthz/ready"]);
            if out.is_ok_and(|o| o.stdout == b"200") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        Err(Error::Command {
            command: format!("ztunnel in {} (pid {})", self.netns, self.process.pid()),
            status: format!("not ready after {READY_TIMEOUT:?}"),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        })
    }

    /// Turns the capture of the pod's outgoing TCP on (through ztunnel) or off (direct).
    pub fn set_capture(&self, on: bool) -> Result<(), Error> {
        let rule: Vec<&str> = self.outbound.1.iter().map(String::as_str).collect();
        crate::sys::nat_rule(&self.netns, self.outbound.0, &rule, on)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
