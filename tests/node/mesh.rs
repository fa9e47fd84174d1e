//! A lab with two mesh-node daemons, a shared test CA, local config and iptables capture.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use mesh_node::identity::TestCa;
use mesh_tests::{
    Lab, LabSpec, PodProcess, Spawn,
    ztunnel::{self, Ztunnel},
};

pub const WHOAMI: &str = env!("CARGO_BIN_EXE_mesh-whoami");

/// Where the L7 benchmark's HTTP Service listens (`Options::http`): inside the lab's
/// 198.18.0.0/16, so n1p1's route sends it to node 1 where the capture takes it, but on no subnet:
/// without the capture it is unreachable.
pub const HTTP_VIP: &str = "198.18.200.10";
/// The Service's HTTP/1.1 port (`appProtocol: http`) and the backend's port behind it.
pub const HTTP1_PORT: (u16, u16) = (80, 8081);
/// The Service's HTTP/2 port (`appProtocol: kubernetes.io/h2c`) and the backend's port behind it.
pub const H2_PORT: (u16, u16) = (81, 8082);
/// A TCP port of the same Service (`appProtocol: tcp`: the L4 path, HTTP not parsed) in front of
/// a third HTTP backend port, so the same HTTP client can measure L4 against L7.
pub const TCP_PORT: (u16, u16) = (82, 8083);

/// `target/<profile>/mesh-node`, next to this test's `deps/` directory, or `MESH_BENCH_NODE_BIN`
/// (benchmarks compare another build of the daemon with the same harness).
fn mesh_node_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_BENCH_NODE_BIN").map(PathBuf::from) {
        assert!(p.exists(), "MESH_BENCH_NODE_BIN={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("test executable");
    let p = exe.parent().and_then(std::path::Path::parent).expect("target/<profile>").join("mesh-node");
    assert!(p.exists(), "{} missing: build it with `cargo build -p mesh-node` (cargo xtask test does)", p.display());
    p
}

pub struct MeshLab {
    pub lab: Lab,
    dir: PathBuf,
    /// Node 1's proxy, then node 2's.
    proxies: Vec<Running>,
    _servers: Vec<PodProcess>,
}

/// Which proxy a node of the lab runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Proxy {
    /// Our daemon in the node's namespace, iptables capture on the node (see the suite's doc).
    #[default]
    Mesh,
    /// A real ztunnel (`MESH_ZTUNNEL_BIN`) for the node's meshed pod (n1p1, n2p1), dedicated
    /// mode, in the pod or in the node (`Options::ztunnel_placement`): see `mesh_tests::ztunnel`.
    /// The node runs no daemon of ours.
    Ztunnel,
}

enum Running {
    Mesh(PodProcess),
    Ztunnel(Ztunnel),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Self::Mesh(p) => p.pid(),
            Self::Ztunnel(z) => z.pid(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Daemons pinned to CPU 1 with access logs off (`MESH_LOG=warn`).
    pub bench: bool,
    /// An HTTP Service (`HTTP_VIP`, ports `HTTP1_PORT`, `H2_PORT` and `TCP_PORT`) whose one
    /// endpoint is n2p1, where `mesh-whoami serve --http` answers on each target port (pinned to
    /// CPU 0 with `bench`).
    pub http: bool,
    /// The proxy on node 1 (client side, n1p1) and node 2 (server side, n2p1).
    pub proxies: [Proxy; 2],
    /// Where a ztunnel runs: in its pod (interop) or in the node's namespace (benchmark).
    pub ztunnel_placement: ztunnel::Placement,
    /// This many more Services, each with 10 endpoints on node 2 (addresses in 100.64.0.0/10,
    /// never dialed): the config of a large cluster, for memory measurements.
    pub extra_services: u32,
    /// More environment for our daemons (a benchmark's non-default limit).
    pub daemon_env: &'static [(&'static str, &'static str)],
}

/// `count` Services `svc-<i>` (VIP 198.19.<i/256>.<i%256>, port 80 → 8080), 10 endpoints each.
fn synthetic_services(lab: &Lab, count: u32) -> Vec<String> {
    let node2 = lab.node(2).underlay_ip;
    (0..count)
        .map(|i| {
            let endpoints: Vec<String> = (0..10u32)
                .map(|j| {
                    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + i * 10 + j);
                    format!(r#"{{"address":"{ip}","ports":{{}},"healthy":true,"node":"n2","nodeAddress":"{node2}","meshed":true,"identity":"spiffe://cluster.local/ns/default/sa/b"}}"#)
                })
                .collect();
            format!(
                r#"{{"name":"svc-{i}","namespace":"default","vips":["198.19.{}.{}"],"ports":[{{"name":"tcp","port":80,"protocol":"TCP","targetPort":8080}}],"endpoints":[{}]}}"#,
                i / 256,
                i % 256,
                endpoints.join(",")
            )
        })
        .collect()
}

/// The capture stand-in for one meshed pod of node 1: its TCP goes to the outbound port.
fn capture_rule(lab: &Lab, pod: &str) -> Vec<String> {
    let ip = lab.pod(pod).ip.to_string();
    ["-i", "br0", "-s", &ip, "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"].map(str::to_owned).to_vec()
}

fn sh(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn iptables(netns: &str, rule: &[&str]) {
    mesh_tests::sys::nat_rule(netns, "PREROUTING", rule, true).expect("iptables");
}

pub fn curl_in(netns: &str, url: &str) -> String {
    String::from_utf8_lossy(&sh("ip", &["netns", "exec", netns, "curl", "-sS", "--max-time", "5", url]).stdout).into_owned()
}

/// The HTTP Service of `Options::http`: n2p1 on node 2 is its endpoint, reached over HBONE.
fn http_service(lab: &Lab) -> String {
    let port = |name: &str, (port, target): (u16, u16), app: &str| {
        format!(r#"{{"name":"{name}","port":{port},"protocol":"TCP","targetPort":{target},"appProtocol":"{app}"}}"#)
    };
    format!(
        r#"{{"name":"bench","namespace":"default","vips":["{HTTP_VIP}"],"ports":[{},{},{}],
"endpoints":[{{"address":"{}","ports":{{}},"healthy":true,"node":"n2","nodeAddress":"{}","meshed":true,"identity":"spiffe://cluster.local/ns/default/sa/b"}}]}}"#,
        port("http", HTTP1_PORT, "http"),
        port("http2", H2_PORT, "kubernetes.io/h2c"),
        port("tcp", TCP_PORT, "tcp"),
        lab.pod("n2p1").ip,
        lab.node(2).underlay_ip,
    )
}

fn config(lab: &Lab, opts: Options) -> String {
    let w = |pod: &str, sa: &str, node: u8, protocol: &str| {
        format!(
            r#"{{"name":"{pod}","namespace":"default","serviceAccount":"{sa}","workloadName":"{sa}","ip":"{}","node":"n{node}","nodeIp":"{}","labels":{{"app":"{sa}"}},"protocol":"{protocol}"}}"#,
            lab.pod(pod).ip,
            lab.node(node).underlay_ip
        )
    };
    format!(
        r#"{{"workloads":[{},{},{},{}],
"policies":[{{"name":"deny-d","namespace":"default","action":"DENY","rules":[{{"from":[{{"principals":["cluster.local/ns/default/sa/d"]}}]}}]}}],
"peerAuthentications":[{{"name":"strict","namespace":"default","mode":"STRICT"}}],
"services":[{}]}}"#,
        w("n1p1", "a", 1, "HBONE"),
        w("n1p2", "d", 1, "HBONE"),
        w("n1p3", "plain", 1, "TCP"),
        w("n2p1", "b", 2, "HBONE"),
        opts.http.then(|| http_service(lab)).into_iter().chain(synthetic_services(lab, opts.extra_services)).collect::<Vec<_>>().join(","),
    )
}

/// ztunnel's view of the lab: the meshed pods of `config`, as HBONE workloads.
fn ztunnel_xds(lab: &Lab, opts: Options) -> String {
    let w = |pod: &'static str, sa: &'static str, node: &'static str| ztunnel::Workload { pod, ip: lab.pod(pod).ip.into(), service_account: sa, node };
    ztunnel::local_xds(&[w("n1p1", "a", "n1"), w("n1p2", "d", "n1"), w("n2p1", "b", "n2")], opts.extra_services)
}

impl MeshLab {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        let mut spec = LabSpec::for_test(&[3, 1]);
        // One process may hold a lab of each pairing at once (the side-by-side benchmark).
        spec.run.push_str(match opts.proxies {
            [Proxy::Mesh, Proxy::Mesh] => "",
            [Proxy::Mesh, Proxy::Ztunnel] => "mz",
            [Proxy::Ztunnel, Proxy::Mesh] => "zm",
            [Proxy::Ztunnel, Proxy::Ztunnel] => "zz",
        });
        let mut lab = Lab::build(spec).expect("build lab");
        let dir = std::env::temp_dir().join(format!("mesh-{}-node", lab.spec.run));
        std::fs::create_dir_all(&dir).expect("state dir");
        let cfg = dir.join("config.json");
        std::fs::write(&cfg, config(&lab, opts)).expect("write config");
        let zt_bin = opts.proxies.contains(&Proxy::Ztunnel).then(|| {
            ztunnel::binary().expect("MESH_ZTUNNEL_BIN").expect("a lab with a ztunnel needs MESH_ZTUNNEL_BIN")
        });
        // With a ztunnel in the lab, our daemons sign under ztunnel's fake CA root, so both trust
        // one root; otherwise under a fresh test CA.
        let (ca_cert, ca_key) = match &zt_bin {
            Some(bin) => {
                let ca = ztunnel::fake_ca(bin).expect("ztunnel's fake CA");
                (ca.cert, ca.key)
            }
            None => {
                let ca = TestCa::generate(Duration::from_hours(1)).expect("ca");
                let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
                ca.write_pem(&cert, &key).expect("write CA");
                (cert, key)
            }
        };

        // Capture stand-ins for our daemons (see the suite's doc).
        if opts.proxies[0] == Proxy::Mesh {
            let n1 = lab.node(1).netns.clone();
            for pod in ["n1p1", "n1p2"] {
                let rule = capture_rule(&lab, pod);
                iptables(&n1, &rule.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
        if opts.proxies[1] == Proxy::Mesh {
            let n2 = lab.node(2).netns.clone();
            let b = lab.pod("n2p1").ip.to_string();
            // HBONE addressed to the pod (15008) is not plaintext: the daemon's routing rule takes it.
            iptables(&n2, &["-i", "eth0", "-d", &b, "-p", "tcp", "!", "--dport", "15008", "-j", "REDIRECT", "--to-ports", "15006"]);
        }

        // MESH_BENCH_DAEMON_CPUS: taskset list for the proxies (default "1"; "0-1" unpins).
        let cpus = std::env::var("MESH_BENCH_DAEMON_CPUS").unwrap_or_else(|_| "1".into());
        let mut proxies = Vec::new();
        for i in 1..=2u8 {
            let node = lab.node(i).clone();
            let log = dir.join(format!("{}-{}.log", if opts.proxies[usize::from(i - 1)] == Proxy::Mesh { "mesh-node" } else { "ztunnel" }, node.name));
            if opts.proxies[usize::from(i - 1)] == Proxy::Ztunnel {
                let bin = zt_bin.as_deref().expect("checked above");
                let xds = dir.join("ztunnel-xds.yaml");
                std::fs::write(&xds, ztunnel_xds(&lab, opts)).expect("write ztunnel's XDS file");
                let (pod, sa) = if i == 1 { ("n1p1", "a") } else { ("n2p1", "b") };
                let o = ztunnel::Options {
                    bin,
                    pod,
                    service_account: sa,
                    placement: opts.ztunnel_placement,
                    xds: &xds,
                    log: &log,
                    cpus: opts.bench.then_some(cpus.as_str()),
                    log_level: if opts.bench { "warn" } else { "info" },
                };
                proxies.push(Running::Ztunnel(Ztunnel::start(&mut lab, &o).expect("start ztunnel")));
                continue;
            }
            let pods_cgroup = node.pods_cgroup.display().to_string();
            let mut env = vec![
                ("MESH_NODE_NAME", node.name.as_str()),
                ("MESH_CGROUP", pods_cgroup.as_str()),
                ("MESH_DATAPATH", "off"),
                ("MESH_LOCAL_CONFIG", cfg.to_str().expect("utf-8")),
                ("MESH_CA_CERT", ca_cert.to_str().expect("utf-8")),
                ("MESH_CA_KEY", ca_key.to_str().expect("utf-8")),
                ("MESH_LOG", if opts.bench { "warn" } else { "info" }),
            ];
            env.extend_from_slice(opts.daemon_env);
            let bin = mesh_node_bin();
            let bin = bin.to_str().expect("utf-8");
            let pinned = ["-c", cpus.as_str(), bin];
            let mut spawn = if opts.bench {
                Spawn::new(&node.netns, &node.system_cgroup, "taskset", &pinned)
            } else {
                Spawn::new(&node.netns, &node.system_cgroup, bin, &[])
            };
            spawn.env = &env[..];
            spawn.log = Some(&log);
            let mut p = lab.spawn(&spawn).expect("start mesh-node");
            p.wait_for_line("mesh-node ready", Duration::from_secs(10)).expect("mesh-node ready");
            wait_ready(&node.netns);
            proxies.push(Running::Mesh(p));
        }
        let mut servers = vec![lab.spawn_in_pod("n2p1", WHOAMI, &["serve", "--name", "n2p1", "--tcp", "8080"]).expect("server")];
        if opts.http {
            for (_, port) in [HTTP1_PORT, H2_PORT, TCP_PORT] {
                let port = port.to_string();
                let serve = [WHOAMI, "serve", "--name", "n2p1", "--http", port.as_str()];
                let server = if opts.bench { lab.spawn_in_pod("n2p1", "taskset", &[&["-c", "0"], &serve[..]].concat()) } else { lab.spawn_in_pod("n2p1", serve[0], &serve[1..]) };
                servers.push(server.expect("HTTP server"));
            }
        }
        for server in &mut servers {
            server.wait_for_line("listening", Duration::from_secs(5)).expect("server ready");
        }
        Self { lab, dir, proxies, _servers: servers }
    }

    /// The log of node `i`'s proxy.
    pub fn proxy_log(&self, i: u8) -> String {
        let node = &self.lab.node(i).name;
        let name = match self.proxies[usize::from(i - 1)] {
            Running::Mesh(_) => format!("mesh-node-{node}.log"),
            Running::Ztunnel(_) => format!("ztunnel-{node}.log"),
        };
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Turns the capture of n1p1's traffic on (through the mesh) or off (direct). With our daemon
    /// on node 1: its outbound redirect, and node 2's plaintext redirect for n2p1. With a ztunnel
    /// on node 1: the redirect in n1p1 (plaintext to n2p1 needs no redirect: it reaches the app,
    /// or our node 2 daemon's rule, as it would with no mesh).
    pub fn set_capture(&self, on: bool) {
        let mut rules = Vec::new();
        match &self.proxies[0] {
            Running::Mesh(_) => rules.push((1, capture_rule(&self.lab, "n1p1"))),
            Running::Ztunnel(z) => z.set_capture(on).expect("ztunnel's capture"),
        }
        if let Running::Mesh(_) = self.proxies[1] {
            let b = self.lab.pod("n2p1").ip.to_string();
            let plain = ["-i", "eth0", "-d", &b, "-p", "tcp", "!", "--dport", "15008", "-j", "REDIRECT", "--to-ports", "15006"];
            rules.push((2, plain.map(str::to_owned).to_vec()));
        }
        for (node, rule) in rules {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            mesh_tests::sys::nat_rule(&self.lab.node(node).netns, "PREROUTING", &rule, on).expect("capture rule");
        }
    }

    pub fn daemon_pids(&self) -> (u32, u32) {
        (self.proxies[0].pid(), self.proxies[1].pid())
    }

    /// User + system CPU seconds used so far by the node 1 and node 2 daemons.
    pub fn daemon_cpu_secs(&self) -> (f64, f64) {
        let cpu = |p: &Running| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid())).expect("daemon stat");
            // Fields after the ")" that ends the command name: utime and stime are 12th and 13th.
            let rest = stat.rsplit_once(')').expect("stat format").1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
            ticks / 100.0 // USER_HZ
        };
        (cpu(&self.proxies[0]), cpu(&self.proxies[1]))
    }

    /// Resident memory (KiB) of the node 1 and node 2 proxies.
    pub fn daemon_rss_kib(&self) -> (u64, u64) {
        let rss = |p: &Running| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).expect("proxy status");
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
            line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
        };
        (rss(&self.proxies[0]), rss(&self.proxies[1]))
    }

    /// Runs `f` on a thread inside `pod`'s network namespace, pinned to CPU 0.
    pub fn in_pod_pinned<T: Send + 'static>(&self, pod: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        spawn_pinned_in(&self.lab.pod(pod).netns, f).join().expect("pod thread")
    }

    pub fn run_in_pod(&self, pod: &str, args: &[&str]) -> String {
        let out = self.lab.run_in_pod(pod, WHOAMI, args).expect("run client");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// tcpdump on the underlay bridge (TCP only), printing payloads as text once finished.
    pub fn capture_underlay(&self) -> Capture {
        let ul = format!("mesh-{}-ul", self.lab.spec.run);
        Capture(mesh_tests::capture::Capture::start(&ul, "br0", &self.dir.join("underlay.pcap"), &["tcp"]).expect("capture the underlay"))
    }
}

/// Runs `f` on a new thread inside network namespace `netns`, pinned to CPU 0.
pub fn spawn_pinned_in<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(0).expect("cpu 0");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("pin");
        f()
    })
}

fn wait_ready(netns: &str) {
    for _ in 0..100 {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:15020/healthz/ready"])
            .output()
            .expect("curl");
        if out.stdout == b"200" {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("mesh-node in {netns} never became ready");
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Capture(mesh_tests::capture::Capture);

impl Capture {
    /// Stops tcpdump and returns the packets with their payload as ASCII.
    pub fn finish(self) -> String {
        let pcap = self.0.finish().expect("the capture");
        let mut decode = Command::new("tcpdump")
            .args(["-nn", "-A", "-r", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump -r");
        let mut stdin = decode.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &pcap));
        let out = decode.wait_with_output().expect("tcpdump -r");
        writer.join().expect("writer").expect("write the pcap to tcpdump");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
