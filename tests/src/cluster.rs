//! The whole mesh in the lab: mesh-control in file mode on the underlay, one mesh-node per node
//! with the real eBPF datapath (capture, socket LB, STRICT guard, bypass), the sample app in the
//! pods. Used by `cargo xtask lab up` and the end-to-end suite.
//!
//! Layout (2 nodes):
//! - `n1p1` client (meshed, sa `client`), `n1p2` whoami v1.0 (meshed), `n1p3` legacy (not meshed);
//! - `n2p1` whoami v1.0, `n2p2` whoami v1.1 (meshed);
//! - Service `demo/whoami`: VIP 198.19.0.10, port 80 → 8081 (HTTP/1.1 and h2c, port name
//!   `http`), 9090 (gRPC, `grpc`), 7000 → 8080 (TCP: whoami line + echo, `tcp-echo`);
//!   `demo/whoami-v1` (198.19.0.11) and `demo/whoami-v2` (198.19.0.12): port 80 of the v1.0 and
//!   v1.1 pods, for splits between Services; `demo/helloworld` (198.19.0.20, port 80, all
//!   versions), the Service of Istio's Firefox canary example;
//! - mesh-control at 198.18.0.254 (gRPC 15012) in the underlay namespace.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Error, Lab, LabSpec, PodProcess, Spawn, sys};

pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const CONTROL_GRPC_PORT: u16 = 15012;
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const VIP_V1: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
pub const VIP_V2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
pub const VIP_HELLOWORLD: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
/// The sample app's ports on the pods.
pub const APP_PORT: u16 = 8080;
pub const HTTP_PORT: u16 = 8081;
/// Service ports: HTTP on 80 (as users' Services have it), the TCP echo on 7000.
pub const HTTP_SERVICE_PORT: u16 = 80;
pub const TCP_SERVICE_PORT: u16 = 7000;
pub const GRPC_PORT: u16 = 9090;
pub const METRICS_PORT: u16 = 15020;

/// Where the binaries are (`target/<profile>/`).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub mesh_control: PathBuf,
    pub mesh_node: PathBuf,
    pub whoami: PathBuf,
    /// The CLI (`meshctl`), run against the cluster by the e2e suite.
    pub meshctl: PathBuf,
}

impl Binaries {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            mesh_control: dir.join("mesh-control"),
            mesh_node: dir.join("mesh-node"),
            whoami: dir.join("mesh-whoami"),
            meshctl: dir.join("meshctl"),
        }
    }
}

/// A pod of the cluster and what runs in it.
pub struct PodRole {
    pub pod: &'static str,
    pub name: &'static str,
    pub service_account: &'static str,
    pub app: &'static str,
    pub meshed: bool,
    pub serves: bool,
    /// The `version` label (and what the app reports), for canaries.
    pub version: &'static str,
}

pub const PODS: &[PodRole] = &[
    PodRole { pod: "n1p1", name: "client", service_account: "client", app: "client", meshed: true, serves: false, version: "" },
    PodRole { pod: "n1p2", name: "whoami-1", service_account: "whoami", app: "whoami", meshed: true, serves: true, version: "v1.0" },
    PodRole { pod: "n1p3", name: "legacy", service_account: "legacy", app: "legacy", meshed: false, serves: false, version: "" },
    PodRole { pod: "n2p1", name: "whoami-2", service_account: "whoami", app: "whoami", meshed: true, serves: true, version: "v1.0" },
    PodRole { pod: "n2p2", name: "whoami-3", service_account: "whoami", app: "whoami", meshed: true, serves: true, version: "v1.1" },
];

pub struct Cluster {
    pub lab: Lab,
    pub bins: Binaries,
    /// `<base>/config`: what mesh-control reads (policies go to `<config>/policies/`).
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub logs: PathBuf,
    pub control: Option<PodProcess>,
    pub daemons: Vec<Option<PodProcess>>,
    /// Daemons started per node so far (names their logs).
    generations: Vec<u32>,
    /// `MESH_LOG` of the node daemons started from now on ("info": every connection and
    /// request in the access log; benchmarks use "warn").
    pub node_log: String,
    /// The sample app's process, by pod.
    pub apps: std::collections::BTreeMap<String, PodProcess>,
    /// Listening sockets this harness holds for a node's daemons, as systemd does for a
    /// socket-activated service ([`Cluster::activate_sockets`]), by node.
    activated: std::collections::BTreeMap<u8, Vec<(&'static str, std::os::fd::OwnedFd)>>,
}

/// `localities`: (node, region, zone) labels to give nodes (none: no node has a locality).
fn cluster_yaml(lab: &Lab, localities: &[(&str, &str, &str)]) -> String {
    let mut y = String::from("# Written by the lab (mesh_tests::cluster).\n");
    for node in &lab.nodes {
        let labels = localities.iter().find(|(n, _, _)| *n == node.name).map_or(String::new(), |(_, region, zone)| {
            format!(", labels: {{topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone}}}")
        });
        let _ = write!(y, "apiVersion: lab.mesh.dev/v1alpha1\nkind: Node\nmetadata: {{name: {}{labels}}}\nspec: {{address: {}}}\n---\n", node.name, node.underlay_ip);
    }
    y.push_str("apiVersion: lab.mesh.dev/v1alpha1\nkind: Namespace\nmetadata: {name: demo, labels: {mesh.dev/dataplane-mode: ambient}}\n---\n");
    for r in PODS {
        let pod = lab.pod(r.pod);
        let mode = if r.meshed { String::new() } else { ", mesh.dev/dataplane-mode: none".into() };
        let version = if r.version.is_empty() { String::new() } else { format!(", version: {}", r.version) };
        let _ = write!(
            y,
            "apiVersion: lab.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {}, namespace: demo, labels: {{app: {}{version}{mode}}}}}\nspec: {{node: n{}, serviceAccount: {}, addresses: [{}]}}\n---\n",
            r.name, r.app, pod.node, r.service_account, pod.ip
        );
    }
    let _ = write!(
        y,
        "apiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: whoami, namespace: demo}}\nspec:\n  vips: [{VIP}]\n  selector: {{app: whoami}}\n  ports:\n  - {{name: http, port: {HTTP_SERVICE_PORT}, targetPort: {HTTP_PORT}}}\n  - {{name: grpc, port: {GRPC_PORT}, targetPort: {GRPC_PORT}}}\n  - {{name: tcp-echo, port: {TCP_SERVICE_PORT}, targetPort: {APP_PORT}}}\n"
    );
    // One Service per version, for weighted splits between Services (Gateway API's way).
    let versions = [("whoami-v1", VIP_V1, ", version: v1.0"), ("whoami-v2", VIP_V2, ", version: v1.1"), ("helloworld", VIP_HELLOWORLD, "")];
    for (name, vip, version) in versions {
        let _ = write!(
            y,
            "---\napiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  vips: [{vip}]\n  selector: {{app: whoami{version}}}\n  ports:\n  - {{name: http, port: {HTTP_SERVICE_PORT}, targetPort: {HTTP_PORT}}}\n"
        );
    }
    y
}

/// Writes `contents` to `path` atomically (mesh-control may read at any moment).
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).map_err(|source| Error::Io { path: tmp.clone(), source })?;
    fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.into(), source })
}

impl Cluster {
    /// Builds the lab and starts everything; `base` holds config, state and logs.
    pub fn start(spec: LabSpec, bins: Binaries, base: &Path) -> Result<Self, Error> {
        for b in [&bins.mesh_control, &bins.mesh_node, &bins.whoami] {
            if !b.exists() {
                return Err(Error::Io { path: b.clone(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "binary not built (cargo build)") });
            }
        }
        let _ = fs::remove_dir_all(base);
        let (config_dir, state_dir, logs) = (base.join("config"), base.join("state"), base.join("logs"));
        for d in [config_dir.join("policies"), state_dir.join("node-tokens"), logs.clone()] {
            sys::mkdir(&d)?;
        }
        let lab = Lab::build(spec)?;
        let mut cluster = Self { lab, bins, config_dir, state_dir, logs, control: None, daemons: Vec::new(), generations: Vec::new(), apps: std::collections::BTreeMap::new(), node_log: "info".into(), activated: std::collections::BTreeMap::new() };
        cluster.boot()?;
        Ok(cluster)
    }

    fn boot(&mut self) -> Result<(), Error> {
        let ul = format!("{}{}-ul", crate::clean::PREFIX, self.lab.spec.run);
        sys::ip_in(&ul, &["addr", "add", &format!("{CONTROL_IP}/24"), "dev", "br0"])?;
        write_atomic(&self.config_dir.join("cluster.yaml"), &cluster_yaml(&self.lab, &[]))?;
        for node in &self.lab.nodes {
            let token = format!("{}-{}-{}", self.lab.spec.run, node.name, std::process::id());
            sys::write(&self.state_dir.join("node-tokens").join(format!("{}.token", node.name)), &token)?;
        }
        self.start_control()?;
        for r in PODS.iter().filter(|r| r.serves) {
            self.start_app(r.pod)?;
        }
        for i in 1..=u8::try_from(self.lab.nodes.len()).expect("few nodes") {
            self.daemons.push(None);
            self.generations.push(0);
            self.start_node(i)?;
        }
        Ok(())
    }

    /// (Re)starts the sample app in `pod` (one of [`PODS`] that serves).
    pub fn start_app(&mut self, pod_name: &str) -> Result<(), Error> {
        let r = PODS.iter().find(|r| r.pod == pod_name && r.serves).expect("a serving pod");
        let pod = self.lab.pod(r.pod).clone();
        let node = format!("n{}", pod.node);
        let (tcp, http, grpc) = (APP_PORT.to_string(), HTTP_PORT.to_string(), GRPC_PORT.to_string());
        let requests = self.request_log(r.pod).display().to_string();
        let args = [
            "serve", "--name", r.pod, "--node", node.as_str(), "--version", r.version, "--tcp", tcp.as_str(), "--http", http.as_str(),
            "--grpc", grpc.as_str(), "--request-log", requests.as_str(),
        ];
        let log = self.logs.join(format!("{}.log", r.pod));
        let whoami = self.bins.whoami.display().to_string();
        let mut spawn = Spawn::new(&pod.netns, &pod.cgroup, &whoami, &args);
        spawn.log = Some(&log);
        let mut p = self.lab.spawn(&spawn)?;
        p.wait_for_line("listening http", Duration::from_secs(5))?;
        self.apps.insert(pod_name.to_owned(), p);
        Ok(())
    }

    fn cgroup(&self, name: &str) -> Result<PathBuf, Error> {
        let dir = self.lab.cgroup.join(name);
        sys::mkdir(&dir)?;
        Ok(dir)
    }

    /// (Re)starts mesh-control.
    pub fn start_control(&mut self) -> Result<(), Error> {
        let ul = format!("{}{}-ul", crate::clean::PREFIX, self.lab.spec.run);
        let cgroup = self.cgroup("control")?;
        let grpc = SocketAddr::from((CONTROL_IP, CONTROL_GRPC_PORT)).to_string();
        let (config, state) = (self.config_dir.display().to_string(), self.state_dir.display().to_string());
        let args = [
            "--config-dir", config.as_str(), "--state-dir", state.as_str(), "--grpc-addr", grpc.as_str(),
            "--status-addr", "127.0.0.1:15014", "--tls-san", "198.18.0.254", "--poll-ms", "100",
        ];
        let log = self.logs.join("mesh-control.log");
        let bin = self.bins.mesh_control.display().to_string();
        let mut spawn = Spawn::new(&ul, &cgroup, &bin, &args);
        spawn.log = Some(&log);
        let mut p = self.lab.spawn(&spawn)?;
        p.wait_for_line("mesh-control started", Duration::from_secs(15))?;
        self.control = Some(p);
        Ok(())
    }

    pub fn stop_control(&mut self) {
        self.control = None; // killed by drop
    }

    /// (Re)starts the mesh-node of node `i` (1-based) and waits until it is ready.
    pub fn start_node(&mut self, i: u8) -> Result<(), Error> {
        self.spawn_node(i)?;
        self.wait_ready(i)
    }

    /// (Re)starts the mesh-node of node `i` and waits until it serves (listeners bound), not
    /// until it is ready: without the controller it never is.
    pub fn spawn_node(&mut self, i: u8) -> Result<(), Error> {
        let p = self.spawn_daemon(i)?;
        self.daemons[usize::from(i - 1)] = Some(p);
        Ok(())
    }

    /// Upgrades the mesh-node of node `i` in place: a new daemon takes the listeners over from
    /// the running one (`MESH_HANDOFF_SOCKET`), which drains and exits by itself. Returns how
    /// long the new one took to take over, and the old one, still draining (see
    /// [`PodProcess::wait_exit`]).
    ///
    /// # Panics
    /// When node `i` has no running daemon.
    pub fn upgrade_node(&mut self, i: u8) -> Result<(Duration, PodProcess), Error> {
        let old = self.daemons[usize::from(i - 1)].take().expect("a running daemon to upgrade");
        let started = std::time::Instant::now();
        let new = self.spawn_daemon(i)?; // returns once the new one has taken over
        self.daemons[usize::from(i - 1)] = Some(new);
        Ok((started.elapsed(), old))
    }

    /// The log of node `i`'s current (latest started) daemon.
    pub fn node_log(&self, i: u8) -> PathBuf {
        let name = &self.lab.node(i).name;
        match self.generations[usize::from(i - 1)] {
            0 | 1 => self.logs.join(format!("mesh-node-{name}.log")),
            n => self.logs.join(format!("mesh-node-{name}.{n}.log")),
        }
    }

    fn spawn_daemon(&mut self, i: u8) -> Result<PodProcess, Error> {
        let node = self.lab.node(i).clone();
        let interfaces: Vec<String> = self.lab.pods.iter().filter(|p| p.node == i).map(|p| p.host_if.clone()).collect();
        let vars: Vec<(&str, String)> = vec![
            ("MESH_NODE_NAME", node.name.clone()),
            ("MESH_CGROUP", node.cgroup.display().to_string()),
            ("MESH_BPF_PIN_DIR", self.lab.bpffs.join(&node.name).display().to_string()),
            ("MESH_CONTROL_ADDR", format!("https://{CONTROL_IP}:{CONTROL_GRPC_PORT}")),
            ("MESH_CONTROL_SERVER_NAME", CONTROL_IP.to_string()),
            ("MESH_CONTROL_ROOT_CERT", self.state_dir.join("ca/root.crt").display().to_string()),
            ("MESH_CONTROL_TOKEN_FILE", self.state_dir.join("node-tokens").join(format!("{}.token", node.name)).display().to_string()),
            ("MESH_LAST_CONFIG_FILE", self.state_dir.join(format!("{}-last-config.pb", node.name)).display().to_string()),
            ("MESH_ADMIN_TOKEN_FILE", self.state_dir.join(format!("{}-admin-token", node.name)).display().to_string()),
            ("MESH_NODE_ADDRESS", node.underlay_ip.to_string()),
            ("MESH_CAPTURE_ADDR", format!("{}:15001", node.pod_gateway)),
            ("MESH_POD_INTERFACES", interfaces.join(",")),
            // Pods see their clients' real addresses (policy routing brings replies back).
            ("MESH_INBOUND_TRANSPARENT", "true".into()),
            // A daemon started while another runs takes over its listeners (upgrade_node).
            ("MESH_HANDOFF_SOCKET", self.state_dir.join(format!("{}-handoff.sock", node.name)).display().to_string()),
            ("MESH_LOG", self.node_log.clone()),
        ];
        let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // Each daemon its own log: during an upgrade two run at once.
        self.generations[usize::from(i - 1)] += 1;
        let log = self.node_log(i);
        let bin = self.bins.mesh_node.display().to_string();
        let mut spawn = Spawn::new(&node.netns, &node.system_cgroup, &bin, &[]);
        spawn.env = &env;
        spawn.log = Some(&log);
        let passed: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = self.activated.get(&i).into_iter().flatten().map(|(name, fd)| (*name, std::os::fd::AsFd::as_fd(fd))).collect();
        spawn.listen_fds = &passed;
        let mut p = self.lab.spawn(&spawn)?;
        p.wait_for_line("mesh-node ready", Duration::from_secs(40))?;
        Ok(p)
    }

    /// From now on node `i`'s daemons are socket-activated: the three proxy listeners
    /// (outbound 15001, inbound 15008, plaintext 15006) are bound once in the node's namespace
    /// and passed to every daemon started there, this harness keeping them open between daemons
    /// as systemd does. Call it while no daemon runs on the node.
    ///
    /// A helper binds them in the node's system cgroup, where the daemons run: an accepted
    /// socket belongs to its listener's cgroup, and the kernel answers `SO_ORIGINAL_DST` only
    /// for sockets of the datapath's cgroup (a listener bound by this test process, outside it,
    /// made every captured connection look addressed to the daemon itself).
    pub fn activate_sockets(&mut self, i: u8) -> Result<(), Error> {
        let node = self.lab.node(i).clone();
        let path = self.state_dir.join(format!("{}-listeners.sock", node.name));
        let _ = fs::remove_file(&path);
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| Error::Io { path: what.clone().into(), source }
        };
        let server = std::os::unix::net::UnixListener::bind(&path).map_err(io("bind the listeners' Unix socket"))?;
        let whoami = self.bins.whoami.display().to_string();
        let path_arg = path.display().to_string();
        let mut helper = self.lab.spawn(&Spawn::new(&node.netns, &node.system_cgroup, &whoami, &["bind-listeners", &path_arg, "15001", "15008", "15006"]))?;
        server.set_nonblocking(true).map_err(io("listeners' Unix socket"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match server.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(Error::Io { path: path.clone(), source: e }),
            }
        };
        stream.set_nonblocking(false).map_err(io("listeners' Unix socket"))?;
        let received = mesh_node::handoff::receive_line(std::os::fd::AsFd::as_fd(&stream));
        let fds = match received {
            Ok((line, fds)) if line == "listeners" => fds,
            Ok((line, _)) => return Err(Error::Io { path: path.clone(), source: std::io::Error::other(format!("expected \"listeners\", got {line:?}")) }),
            Err(e) => return Err(Error::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) }),
        };
        helper.wait_exit(Duration::from_secs(5))?;
        let _ = fs::remove_file(&path);
        let [outbound, inbound, plaintext]: [std::os::fd::OwnedFd; 3] =
            fds.try_into().map_err(|got: Vec<_>| Error::Io { path: path.clone(), source: std::io::Error::other(format!("{} listeners received, 3 expected", got.len())) })?;
        use mesh_node::app::listener;
        self.activated.insert(i, vec![(listener::OUTBOUND, outbound), (listener::INBOUND, inbound), (listener::INBOUND_PLAINTEXT, plaintext)]);
        Ok(())
    }

    /// Stops node `i`'s daemon with SIGTERM (it drains, then exits) and waits for it.
    pub fn terminate_node(&mut self, i: u8) -> Result<(), Error> {
        if let Some(mut p) = self.daemons[usize::from(i - 1)].take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(p.pid()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            p.wait_exit(Duration::from_secs(30))?;
        }
        Ok(())
    }

    pub fn stop_node(&mut self, i: u8) {
        self.daemons[usize::from(i - 1)] = None;
    }

    /// Waits for the node's `/healthz/ready` (config synced, certificates issued, datapath attached).
    pub fn wait_ready(&self, i: u8) -> Result<(), Error> {
        let ns = self.lab.node(i).netns.clone();
        for _ in 0..100 {
            let out = std::process::Command::new("nsenter")
                .args([format!("--net=/run/netns/{ns}"), "curl".into(), "-fsS".into(), "--max-time".into(), "1".into()])
                .arg(format!("http://127.0.0.1:{METRICS_PORT}/healthz/ready"))
                .output();
            if out.is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::Timeout { what: format!("mesh-node on n{i} to become ready"), secs: 10 })
    }

    /// `curl` inside a node's namespace (metrics, admin).
    pub fn curl_on_node(&self, i: u8, url: &str) -> Result<String, Error> {
        let ns = format!("--net=/run/netns/{}", self.lab.node(i).netns);
        let out = sys::run("nsenter", &[&ns, "curl", "-fsS", "--max-time", "3", url])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the whoami client in a pod; one line per connection.
    pub fn dial(&self, pod: &str, target: SocketAddr, args: &[&str]) -> Result<Vec<String>, Error> {
        let t = target.to_string();
        let mut full = vec!["connect", t.as_str()];
        full.extend_from_slice(args);
        let out = self.lab.run_in_pod(pod, &self.bins.whoami.display().to_string(), &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    }

    /// Resident memory of node `i`'s daemon (0-based), KiB.
    pub fn daemon_rss_kib(&self, i: usize) -> u64 {
        let Some(Some(p)) = self.daemons.get(i) else { return 0 };
        let status = fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    }

    /// Runs `program` in `pod` in the background, its output into `<logs>/<name>.log`.
    pub fn spawn_in_pod_logged(&mut self, pod: &str, name: &str, program: &str, args: &[&str]) -> Result<(PodProcess, PathBuf), Error> {
        let pod = self.lab.pod(pod).clone();
        let log = self.logs.join(format!("{name}.log"));
        let mut spawn = Spawn::new(&pod.netns, &pod.cgroup, program, args);
        spawn.log = Some(&log);
        Ok((self.lab.spawn(&spawn)?, log))
    }

    /// Where a serving pod logs every HTTP and gRPC request it receives (one JSON line each).
    pub fn request_log(&self, pod: &str) -> PathBuf {
        self.logs.join(format!("{pod}-requests.log"))
    }

    /// Writes routing YAML (HTTPRoute, VirtualService, ...) mesh-control picks up within its poll
    /// interval.
    pub fn apply_routes(&self, name: &str, yaml: &str) -> Result<(), Error> {
        let dir = self.config_dir.join("routes");
        sys::mkdir(&dir)?;
        write_atomic(&dir.join(format!("{name}.yaml")), yaml)
    }

    pub fn delete_routes(&self, name: &str) -> Result<(), Error> {
        let p = self.config_dir.join("routes").join(format!("{name}.yaml"));
        fs::remove_file(&p).map_err(|source| Error::Io { path: p, source })
    }

    /// Writes a policy file mesh-control picks up within its poll interval.
    /// Labels nodes with `topology.kubernetes.io/region` and `zone`, as a cluster's nodes are:
    /// (node, region, zone).
    pub fn set_localities(&self, localities: &[(&str, &str, &str)]) -> Result<(), Error> {
        write_atomic(&self.config_dir.join("cluster.yaml"), &cluster_yaml(&self.lab, localities))
    }

    pub fn apply_policy(&self, name: &str, yaml: &str) -> Result<(), Error> {
        write_atomic(&self.config_dir.join("policies").join(format!("{name}.yaml")), yaml)
    }

    pub fn delete_policy(&self, name: &str) -> Result<(), Error> {
        let p = self.config_dir.join("policies").join(format!("{name}.yaml"));
        fs::remove_file(&p).map_err(|source| Error::Io { path: p, source })
    }

    /// Keeps everything running after this handle is gone (`lab up`).
    pub fn persist(mut self) {
        if let Some(control) = self.control.take() {
            control.detach();
        }
        for d in self.daemons.drain(..).flatten() {
            d.detach();
        }
        for a in std::mem::take(&mut self.apps).into_values() {
            a.detach();
        }
        let lab = std::mem::replace(&mut self.lab, Lab::placeholder());
        lab.persist();
    }
}
