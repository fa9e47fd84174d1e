//! A throwaway Kubernetes control plane on loopback: etcd (Debian's etcd-server), and
//! kube-apiserver + kube-controller-manager built from Debian's source package by
//! `scripts/setup-k8s.sh` (cached in /var/cache/mesh/k8s-<version>/bin). Each `Cluster` gets its
//! own temp dir, PKI (openssl), free ports, and admin token; dropping it kills its processes (by
//! PID) and removes the dir, also when the test panics. No kubelet or scheduler: tests create
//! Nodes and Pods themselves and patch pod status; the controller-manager then maintains
//! `EndpointSlices` and `ServiceAccounts` as in a real cluster.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::ports::free_port;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub server: String,
    children: Vec<(&'static str, Child)>,
}

fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("MESH_K8S_BIN_DIR") {
        return d.into();
    }
    let cache = std::env::var("MESH_K8S_CACHE").unwrap_or_else(|_| "/var/cache/mesh".into());
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("kube-apiserver").exists() && p.join("kube-controller-manager").exists())
        .collect();
    dirs.sort();
    dirs.pop().unwrap_or_else(|| panic!("no kube-apiserver under {cache}/k8s-*/bin: run `sudo scripts/setup-k8s.sh` (or `cargo xtask test`) first"))
}


fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::piped()));
}

impl Cluster {
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("mesh-k8s-").tempdir().expect("tempdir");
        let d = &dir.path().to_path_buf();
        let pki = d.join("pki");
        std::fs::create_dir(&pki).expect("mkdir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(&pki, &[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mesh-test-ca"]].concat());
        openssl(&pki, &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver"]].concat());
        std::fs::write(pki.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("write");
        openssl(&pki, &["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext"]);
        openssl(&pki, &["genrsa", "-out", "sa.key", "2048"]);
        openssl(&pki, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(pki.join("tokens.csv"), "mesh-test-admin-token,admin,admin,\"system:masters\"\n").expect("write");

        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki.join("ca.crt"), "mesh-test-admin-token")).expect("write");
        let mut c = Self { dir, kubeconfig, server, children: Vec::new() };
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        c.spawn("etcd", Command::new("etcd").args([
            "--name=t",
            &format!("--data-dir={}", d.join("etcd").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=t={peer_url}"),
        ]));
        let p = |f: &str| pki.join(f).display().to_string();
        c.spawn("kube-apiserver", Command::new(bin.join("kube-apiserver")).args([
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", p("server.crt")),
            format!("--tls-private-key-file={}", p("server.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!("--cert-dir={}", d.join("certs").display()),
        ]));
        c.wait_ready();
        c.spawn("kube-controller-manager", Command::new(bin.join("kube-controller-manager")).args([
            format!("--kubeconfig={}", c.kubeconfig.display()),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            "--port=0".into(),
        ]));
        c
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log file");
        let child = cmd
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e} (run scripts/setup-k8s.sh)"));
        self.children.push((name, child));
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_mins(1) {
            if self.kubectl(&["get", "--raw", "/readyz"]).status.success() {
                return;
            }
            let exited = self.children.iter_mut().find_map(|(name, child)| Some((*name, child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}); the end of its log:\n{}", self.log_tail(name));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("kube-apiserver not ready after 60 s; the end of its log:\n{}", self.log_tail("kube-apiserver"));
    }

    /// The last lines of a child's log, for a panic: the temporary directory holding the log
    /// is removed when the test fails.
    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_else(|e| format!("(log unreadable: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl").args(args).env("KUBECONFIG", &self.kubeconfig).output().expect("kubectl runs")
    }

    /// Runs kubectl and returns its stdout; panics with stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of a YAML text; panics when it fails.
    pub fn apply(&self, yaml: &str) -> String {
        let out = self.try_apply(yaml);
        assert!(out.status.success(), "kubectl apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of a YAML text, whatever the outcome.
    pub fn try_apply(&self, yaml: &str) -> Output {
        use std::io::Write as _;
        let mut child = Command::new("kubectl")
            .args(["apply", "-f", "-"])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write");
        child.wait_with_output().expect("kubectl")
    }

    /// A kubeconfig that authenticates with `token` (e.g. a `ServiceAccount` token).
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_yaml(&self.server, &self.dir.path().join("pki/ca.crt"), token)).expect("write");
        path
    }

    /// Polls `f` until it returns `Some`, for up to `secs` seconds.
    pub fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(started.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}}}]\nusers: [{{name: u, user: {{token: \"{token}\"}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: u}}}}]\ncurrent-context: t\n",
        ca.display()
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Reverse start order; by PID, never by name.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // Keep the logs of a failed run.
            let kept = self.dir.path().with_extension("failed");
            let _ = std::fs::rename(self.dir.path(), &kept);
            eprintln!("cluster logs kept in {}", kept.display());
        }
    }
}
