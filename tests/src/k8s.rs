//! A real Kubernetes cluster inside the lab's network namespaces: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on the underlay (`198.18.0.254`, namespace
//! `mesh-<run>-ul`), and per node a containerd, a kubelet and kube-proxy inside the lab node's
//! namespace (`mesh-<run>-n<i>`, address `198.18.0.<i>`). Kubernetes is built from Debian's source
//! package by `scripts/setup-k8s.sh`; facts behind each setting are in
//! `../shared/notes/k8s-and-tools.md` ("A real kubelet runs pods here").
//!
//! Addresses stay in the lab's range (see `lab`): pods `198.18.<i>.20-250` (bridge + host-local
//! CNI on the node's `br0`), ClusterIPs `198.19.0.0/16` (kube-proxy's iptables rules in each node
//! namespace; nodes route the range to their underlay link, which leads nowhere but the lab's
//! bridge). No namespace has a default route and pods have none either.
//!
//! Teardown (drop, also on panic): every process by PID, then whatever is left in the run's
//! cgroups (containerd shims, containers), mounts under the cluster directory, cgroup v1
//! directories, the lab's namespaces, cgroups and pins, the kubelet's logs under /var/log, and
//! the sysctls the kubelet rewrote. `cargo xtask clean` removes the leftovers of a crashed run.

pub(crate) mod host;
pub mod node;
pub mod pki;

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

pub use node::KubeNode;

use crate::{
    Lab, LabSpec, PodProcess, Spawn, clean,
    sys::{self, Error},
};

/// The API server's address on the underlay.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const API_PORT: u16 = 6443;
/// etcd serves within a second here; a minute allows for a disk busy with a cold build.
const ETCD_START: Duration = Duration::from_secs(60);
/// ClusterIP range; the `kubernetes` Service gets its first address.
pub const SERVICE_RANGE: &str = "198.19.0.0/16";
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

/// Directory of the built Kubernetes binaries: `MESH_K8S_BIN_DIR`, else the newest
/// `<cache>/k8s-<version>/bin` holding all of them.
pub fn bin_dir() -> Result<PathBuf, Error> {
    const NEEDED: [&str; 5] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"];
    if let Ok(d) = std::env::var("MESH_K8S_BIN_DIR") {
        return Ok(d.into());
    }
    let cache = std::env::var("MESH_K8S_CACHE").unwrap_or_else(|_| "/var/cache/mesh".into());
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| NEEDED.iter().all(|b| p.join(b).exists()))
        .collect();
    dirs.sort();
    dirs.pop().ok_or_else(|| Error::Io {
        path: PathBuf::from(&cache),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no k8s-*/bin with {NEEDED:?}: run `sudo scripts/setup-k8s.sh` (or `cargo xtask test`)")),
    })
}

/// Polls `f` every 200 ms until it returns `Some`, for up to `secs` seconds.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> Result<T, Error> {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if started.elapsed() > Duration::from_secs(secs) {
            return Err(Error::Timeout { what: what.into(), secs });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct KubeCluster {
    pub nodes: Vec<KubeNode>,
    /// `/var/lib/mesh-<run>-k8s`: PKI, etcd, logs, and each node's state.
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// How long from nothing to every node Ready.
    pub time_to_ready: Duration,
    control: Vec<PodProcess>,
    host: host::Snapshot,
    // Last: dropped after our own teardown has run.
    pub lab: Lab,
}

impl KubeCluster {
    /// Builds the lab namespaces, starts the control plane and `node_count` nodes with `images`
    /// (OCI archives) imported, and waits until every node is Ready.
    pub fn start(run: &str, node_count: u8, images: &[PathBuf], pause_image: &str) -> Result<Self, Error> {
        let started = Instant::now();
        let bin = bin_dir()?;
        let host = host::Snapshot::take();
        let dir = PathBuf::from(format!("/var/lib/{}{run}-k8s", clean::PREFIX));
        remove_dir(&dir);
        let lab = Lab::build(LabSpec { run: run.into(), pods_per_node: vec![0; usize::from(node_count)] })?;
        let mut c = Self { nodes: Vec::new(), kubeconfig: dir.join("admin.kubeconfig"), dir, time_to_ready: Duration::ZERO, control: Vec::new(), host, lab };
        c.network()?;
        let names: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
        pki::write(&c.dir.join("pki"), API_IP, KUBERNETES_SERVICE_IP, &names)?;
        let server = format!("https://{API_IP}:{API_PORT}");
        let ca = c.dir.join("pki/ca.crt");
        sys::write(&c.kubeconfig, &pki::kubeconfig(&server, &ca, pki::ADMIN_TOKEN))?;
        c.control_plane(&bin)?;
        let shared = node::Shared { bin: &bin, server: &server, ca: &ca, pause_image, run };
        for lab_node in c.lab.nodes.clone() {
            // The kubelet refuses a --cgroup-root missing from any v1 hierarchy.
            host::mkdir_v1(&Path::new(&format!("{}{run}", clean::PREFIX)).join(&lab_node.name))?;
            let node_dir = c.dir.join(&lab_node.name);
            let n = KubeNode::start(&mut c.lab, &lab_node, &shared, &node_dir, images)?;
            c.nodes.push(n);
        }
        let nodes: Vec<String> = names.iter().map(|n| format!("node/{n}")).collect();
        wait_for("every node registered", 60, || names.iter().all(|n| c.kubectl(&["get", "node", n]).status.success()).then_some(()))?;
        let mut args = vec!["wait", "--for=condition=Ready", "--timeout=90s"];
        args.extend(nodes.iter().map(String::as_str));
        c.kubectl_ok(&args)?;
        c.time_to_ready = started.elapsed();
        Ok(c)
    }

    /// Underlay address of the API server, routes from the underlay to the pods, and the
    /// ClusterIP range on each node's underlay link (kube-proxy rewrites it before it leaves).
    fn network(&mut self) -> Result<(), Error> {
        let ul = self.underlay_ns();
        sys::ip_in(&ul, &["addr", "add", &format!("{API_IP}/24"), "dev", "br0"])?;
        for node in &self.lab.nodes {
            sys::ip_in(&ul, &["route", "add", &format!("198.18.{}.0/24", node.index), "via", &node.underlay_ip.to_string()])?;
            sys::ip_in(&node.netns, &["route", "add", SERVICE_RANGE, "dev", "eth0"])?;
        }
        Ok(())
    }

    pub fn underlay_ns(&self) -> String {
        format!("{}{}-ul", clean::PREFIX, self.lab.spec.run)
    }

    fn control_plane(&mut self, bin: &Path) -> Result<(), Error> {
        let (d, ul) = (self.dir.clone(), self.underlay_ns());
        let cgroup = self.lab.cgroup.join("control");
        sys::mkdir(&cgroup)?;
        let p = |f: &str| d.join("pki").join(f).display().to_string();
        let etcd = [
            "--name=mesh".to_owned(),
            format!("--data-dir={}", d.join("etcd").display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=mesh=http://127.0.0.1:2380".into(),
        ];
        self.spawn_control(&ul, &cgroup, "etcd", "etcd", &etcd)?;
        // Wait for etcd on its own: an API server without it only says "connection refused"
        // until its own timeout, which hides why etcd is not there (it exited, or is slow).
        self.control.last_mut().expect("etcd was just spawned").wait_for_line("ready to serve client requests", ETCD_START).map_err(|e| self.with_log(e, "etcd"))?;
        let apiserver = [
            "--etcd-servers=http://127.0.0.1:2379".to_owned(),
            format!("--advertise-address={API_IP}"),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={API_PORT}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", p("server.crt")),
            format!("--tls-private-key-file={}", p("server.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            format!("--service-cluster-ip-range={SERVICE_RANGE}"),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--cert-dir={}", d.join("apiserver-certs").display()),
        ];
        self.spawn_control(&ul, &cgroup, "kube-apiserver", &bin.join("kube-apiserver").display().to_string(), &apiserver)?;
        wait_for("kube-apiserver /readyz", 90, || self.kubectl(&["get", "--raw", "/readyz"]).status.success().then_some(()))
            .map_err(|e| self.with_logs(e, &["etcd", "kube-apiserver"]))?;
        let kubeconfig = format!("--kubeconfig={}", self.kubeconfig.display());
        let cm = [
            kubeconfig.clone(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            "--port=0".into(),
        ];
        self.spawn_control(&ul, &cgroup, "kube-controller-manager", &bin.join("kube-controller-manager").display().to_string(), &cm)?;
        let scheduler = [kubeconfig, "--leader-elect=false".into(), "--port=0".into(), "--secure-port=0".into()];
        self.spawn_control(&ul, &cgroup, "kube-scheduler", &bin.join("kube-scheduler").display().to_string(), &scheduler)
    }

    fn spawn_control(&mut self, netns: &str, cgroup: &Path, name: &str, program: &str, args: &[String]) -> Result<(), Error> {
        let log = self.log(name);
        sys::mkdir(log.parent().expect("logs dir"))?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut spawn = Spawn::new(netns, cgroup, program, &args);
        spawn.log = Some(&log);
        let p = self.lab.spawn(&spawn)?;
        self.control.push(p);
        Ok(())
    }

    /// Log file of a control-plane component.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn with_log(&self, e: Error, name: &str) -> Error {
        self.with_logs(e, &[name])
    }

    /// `e` with the last lines of each named component's log (the API server's last lines alone
    /// say only that etcd is unreachable).
    fn with_logs(&self, e: Error, names: &[&str]) -> Error {
        let tails: Vec<String> = names
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!("--- last lines of {name}.log:\n{}", lines[lines.len().saturating_sub(15)..].join("\n"))
            })
            .collect();
        Error::Command { command: names.join(" + "), status: e.to_string(), stderr: tails.join("\n") }
    }

    /// kubectl against the cluster, from the underlay namespace (where the API server listens).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().unwrap_or_else(|e| panic!("running kubectl: {e}"))
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.underlay_ns()))
            .arg("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            // kubectl 1.3x against a 1.20 server warns about the skew on every call.
            .env("KUBECTL_SKEW_WARNING", "false");
        cmd
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, Error> {
        let out = self.kubectl(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Command { command: format!("kubectl {}", args.join(" ")), status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).into() })
        }
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String, Error> {
        let mut child = self
            .kubectl_cmd(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn { program: "kubectl".into(), source })?;
        child.stdin.take().expect("piped").write_all(yaml.as_bytes()).map_err(|source| Error::Io { path: "kubectl stdin".into(), source })?;
        let out = child.wait_with_output().map_err(|source| Error::Io { path: "kubectl".into(), source })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Command { command: "kubectl apply -f -".into(), status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).into() })
        }
    }

    /// Removes everything; what had to be put back on the host is returned (for reports).
    pub fn teardown(&mut self) -> Vec<String> {
        // Processes first (by PID: control plane, kubelets, containerds), then whatever is left
        // in the run's cgroups (shims, containers) through the lab's teardown.
        self.control.clear();
        for n in &mut self.nodes {
            n.processes.clear();
        }
        self.lab.teardown();
        let mut done = Vec::new();
        let unmounted = host::unmount_below(&self.dir);
        if unmounted > 0 {
            done.push(format!("unmounted {unmounted} mounts below {}", self.dir.display()));
        }
        let run = format!("{}{}", clean::PREFIX, self.lab.spec.run);
        done.extend(host::remove_v1(|name| name == run));
        remove_dir(&self.dir);
        // What the deploy pins (MESH_BPF_PIN_DIR=/sys/fs/bpf/mesh/<node>) if its uninstall did
        // not run (a failed test): the suite asserts the uninstall itself.
        for n in &self.lab.nodes {
            let pins = Path::new(sys::BPFFS).join("mesh").join(&n.name);
            if std::fs::remove_dir_all(&pins).is_ok() {
                done.push(format!("removed {}", pins.display()));
            }
        }
        let _ = std::fs::remove_dir(Path::new(sys::BPFFS).join("mesh"));
        done.extend(self.host.restore());
        done
    }
}

fn remove_dir(dir: &Path) {
    host::unmount_below(dir);
    let _ = std::fs::remove_dir_all(dir);
}

impl KubeCluster {
    /// The mesh's own pods' logs (with timestamps) into `dir`, their last lines to stderr: the
    /// kubelet's container logs go with the cluster, and a failed run's output is all CI keeps.
    fn keep_mesh_logs(&self, dir: &Path) {
        let _ = sys::mkdir(dir);
        let listed = self.kubectl(&["get", "pods", "-n", "mesh-system", "-o", "jsonpath={.items[*].metadata.name}"]);
        for pod in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
            let out = self.kubectl(&["logs", "-n", "mesh-system", pod, "--all-containers", "--timestamps"]);
            let log = String::from_utf8_lossy(&out.stdout).into_owned();
            let _ = std::fs::write(dir.join(format!("{pod}.log")), &log);
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- last lines of mesh-system/{pod} ---\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs of a failed run next to where they were.
            let kept = self.dir.with_extension("failed-logs");
            let _ = std::fs::remove_dir_all(&kept);
            let _ = sys::mkdir(&kept);
            let _ = Command::new("cp").arg("-r").arg(self.dir.join("logs")).arg(&kept).status();
            for n in &self.nodes {
                let _ = Command::new("cp").arg("-r").arg(n.dir.join("logs")).arg(kept.join(&n.name)).status();
            }
            self.keep_mesh_logs(&kept.join("pods"));
            eprintln!("cluster logs kept in {}", kept.display());
        }
        self.teardown();
    }
}
