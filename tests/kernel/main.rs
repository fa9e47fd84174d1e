//! Kernel programs under real traffic in the lab. Root only; run with `cargo xtask test`.
//!
//! Each test builds its own lab (namespaces, cgroups, bpffs directory) and loads the real
//! `mesh-ebpf` object through `mesh_node::datapath`, attached to node 1's cgroup and pinned
//! under the lab's bpffs directory; everything is removed on drop, also on panic.

mod bypass;
mod capture;
mod faults;
mod lb;
mod routing;
mod steer;
mod writer;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use mesh_node::datapath::{BackendSpec, Datapath, DatapathConfig, DatapathStats};
use mesh_tests::{Lab, LabSpec, PodProcess, Spawn, require_root};

pub const WHOAMI: &str = env!("CARGO_BIN_EXE_mesh-whoami");
pub const APP_PORT: u16 = 8080;

/// Node `n`'s network namespace, where its daemon would attach `sk_lookup`.
pub fn node_netns(lab: &Lab, n: u8) -> PathBuf {
    PathBuf::from(format!("/run/netns/{}", lab.node(n).netns))
}

/// A lab with whoami servers in some pods and the datapath loaded for node 1.
pub struct Fixture {
    pub lab: Lab,
    pub datapath: Option<Datapath>,
    pub servers: Vec<PodProcess>,
}

impl Fixture {
    /// `servers`: pods that run `mesh-whoami serve` on TCP and UDP [`APP_PORT`], logging accepts
    /// to `<bpffs-independent tmp>/<pod>.log`.
    pub fn new(pods_per_node: &[u8], servers: &[&str]) -> Self {
        require_root();
        let lab = Lab::build(LabSpec::for_test(pods_per_node)).expect("build lab");
        let mut fixture = Self { lab, datapath: None, servers: Vec::new() };
        for pod in servers {
            fixture.start_server(pod);
        }
        fixture
    }

    pub fn log_path(&self, pod: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mesh-{}-{pod}.log", self.lab.spec.run))
    }

    fn start_server(&mut self, pod: &str) {
        let info = self.lab.pod(pod).clone();
        let log = self.log_path(pod);
        let _ = std::fs::remove_file(&log);
        let port = APP_PORT.to_string();
        let args = ["serve", "--name", pod, "--tcp", port.as_str(), "--udp", port.as_str()];
        let mut spawn = Spawn::new(&info.netns, &info.cgroup, WHOAMI, &args);
        spawn.log = Some(&log);
        let mut p = self.lab.spawn(&spawn).expect("start server");
        p.wait_for_line("listening tcp", Duration::from_secs(5)).expect("server ready");
        self.servers.push(p);
    }

    /// Connections a server has accepted so far.
    pub fn accepted(&self, pod: &str) -> usize {
        std::fs::read_to_string(self.log_path(pod)).unwrap_or_default().lines().filter(|l| l.starts_with("accept ")).count()
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.lab.bpffs.join("n1")
    }

    /// Loads and attaches the datapath on node 1 (pinned, as the daemon does).
    pub fn load(&mut self) -> &mut Datapath {
        let mut dp = Datapath::load(DatapathConfig { cgroup: self.lab.node(1).cgroup.clone(), netns: node_netns(&self.lab, 1), pin_dir: Some(self.pin_dir()) })
            .expect("load datapath");
        dp.attach().expect("attach datapath");
        self.datapath = Some(dp);
        self.datapath.as_mut().expect("just set")
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.datapath.as_mut().expect("datapath loaded")
    }

    pub fn stats(&self) -> DatapathStats {
        self.datapath.as_ref().expect("datapath loaded").stats().expect("read counters")
    }

    pub fn backend(&self, pod: &str) -> BackendSpec {
        BackendSpec { addr: IpAddr::V4(self.lab.pod(pod).ip), port: APP_PORT, weight: 1, healthy: true }
    }

    pub fn backend6(&self, pod: &str) -> BackendSpec {
        BackendSpec { addr: IpAddr::V6(self.lab.pod(pod).ip6), port: APP_PORT, weight: 1, healthy: true }
    }

    /// Runs `mesh-whoami connect target args...` in `pod`; one output line per connection.
    pub fn dial(&self, pod: &str, target: SocketAddr, args: &[&str]) -> Vec<String> {
        let target = target.to_string();
        let mut full = vec!["connect", target.as_str()];
        full.extend_from_slice(args);
        let out = self.lab.run_in_pod(pod, WHOAMI, &full).expect("run client");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }

    pub fn dial_one(&self, pod: &str, target: SocketAddr) -> String {
        self.dial(pod, target, &[]).into_iter().next().unwrap_or_default()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.datapath = None;
        self.servers.clear();
        self.lab.teardown();
        for pod in self.lab.pods.clone() {
            let _ = std::fs::remove_file(self.log_path(&pod.name));
        }
    }
}

/// The server name in a `connected ... whoami name=X ...` line.
pub fn answered_by(line: &str) -> Option<&str> {
    line.split("name=").nth(1).and_then(|s| s.split_whitespace().next())
}

pub fn mesh_programs_loaded() -> usize {
    let out = Command::new("bpftool").args(["prog", "list"]).output().expect("run bpftool");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" name mesh_")).count()
}
