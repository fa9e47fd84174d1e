//! One Kubernetes node of the test cluster: containerd (its own root, state, socket and runc
//! root), the bridge + host-local CNI on the lab node's pod bridge, a kubelet and kube-proxy, all
//! inside the lab node's network namespace, so hostNetwork pods (mesh-node) get that namespace
//! as their "host network" and each node has its own addresses, rules and routes.
//!
//! Each node also has a mount namespace of its own (pinned at `<dir>/mntns`), shared by its
//! containerd and kubelet: mounts there are `rshared`, as under systemd (this machine's are
//! private, and containerd refuses the DaemonSet's `HostToContainer` bpffs mount otherwise:
//! "path /sys/fs/bpf is mounted on /sys/fs/bpf but it is not a shared or slave mount"); and the
//! paths every kubelet and shim use whatever their configuration (`/var/log/pods`,
//! `/var/log/containers`, `/run/containerd/s`) are a tmpfs per node, so one node's kubelet never
//! garbage-collects the other's container logs as orphans. bpffs and cgroupfs are the host's
//! (the same superblocks), so pins and cgroups are what the host sees.

use std::path::{Path, PathBuf};

use crate::{
    Lab, PodProcess, Spawn,
    lab::Node,
    sys::{self, Error},
};

/// What every node shares.
pub struct Shared<'a> {
    pub bin: &'a Path,
    /// `https://<apiserver>:<port>`.
    pub server: &'a str,
    pub ca: &'a Path,
    /// The pods' sandbox image (containerd's `sandbox_image`).
    pub pause_image: &'a str,
    pub run: &'a str,
}

pub struct KubeNode {
    pub name: String,
    /// `<cluster dir>/<node>`: containerd, kubelet and CNI state.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub processes: Vec<PodProcess>,
    pub mount_ns: PathBuf,
}

/// Creates the node's mount namespace, pinned at `file` (see the module's comment).
fn mount_namespace(file: &Path) -> Result<(), Error> {
    sys::write(file, "")?;
    // /run/containerd must exist to be mounted on; the host snapshot removes it if it was not.
    sys::mkdir(Path::new("/run/containerd"))?;
    let script = "mount --make-rshared / && mount -t tmpfs -o mode=755 mesh-logs /var/log && mkdir -p /var/log/pods /var/log/containers \
                  && mount -t tmpfs -o mode=700 mesh-containerd /run/containerd";
    sys::run("unshare", &[&format!("--mount={}", file.display()), "--propagation", "private", "sh", "-c", script]).map(drop)
}

/// containerd's configuration. `restrict_oom_score_adj` is not optional here: the VM's bounding
/// set lacks CAP_SYS_RESOURCE, and runc fails every sandbox that would lower oom_score_adj.
/// Pinned pod network namespaces go under the state directory (not the shared /var/run/netns),
/// runc's state under our own root: two containerds never see each other's objects.
fn containerd_toml(dir: &Path, socket: &Path, pause_image: &str) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
plugin_dir = "{d}/containerd/plugins"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{socket}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/conf"
"#,
        socket = socket.display()
    )
}

/// Bridge + host-local on the lab node's `br0` (`198.18.<n>.1/24`, which routes to the other
/// nodes' pod ranges). Pods get `198.18.<n>.20-250` and one route, `198.18.0.0/15` (pods,
/// nodes, the API server and the ClusterIP range `198.19.0.0/16`), and no default route.
fn cni_conflist(node: &Node, dir: &Path, network: &str) -> String {
    let n = node.index;
    format!(
        r#"{{"cniVersion": "0.4.0", "name": "{network}", "plugins": [{{
  "type": "bridge", "bridge": "br0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {{"type": "host-local", "dataDir": "{ipam}",
    "ranges": [[{{"subnet": "198.18.{n}.0/24", "rangeStart": "198.18.{n}.20", "rangeEnd": "198.18.{n}.250", "gateway": "198.18.{n}.1"}}]],
    "routes": [{{"dst": "198.18.0.0/15"}}]}}
}}]}}
"#,
        ipam = dir.join("cni/ipam").display()
    )
}

impl KubeNode {
    /// Starts containerd, imports `images` (OCI archives), then kube-proxy and the kubelet.
    pub fn start(lab: &mut Lab, node: &Node, shared: &Shared<'_>, dir: &Path, images: &[PathBuf]) -> Result<Self, Error> {
        let name = node.name.clone();
        let socket = dir.join("containerd.sock");
        for d in ["cni/conf", "cni/ipam", "containerd", "kubelet", "logs"] {
            sys::mkdir(&dir.join(d))?;
        }
        let network = format!("{}{}-{name}", crate::clean::PREFIX, shared.run);
        sys::write(&dir.join("containerd.toml"), &containerd_toml(dir, &socket, shared.pause_image))?;
        sys::write(&dir.join("cni/conf/10-mesh.conflist"), &cni_conflist(node, dir, &network))?;
        // No DNS in the test cluster: pods get a resolver that answers nothing (their loopback).
        sys::write(&dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let kubeconfig = dir.join("kubelet.kubeconfig");
        sys::write(&kubeconfig, &super::pki::kubeconfig(shared.server, shared.ca, &super::pki::kubelet_token(&name)))?;
        let proxy_kubeconfig = dir.join("kube-proxy.kubeconfig");
        sys::write(&proxy_kubeconfig, &super::pki::kubeconfig(shared.server, shared.ca, super::pki::PROXY_TOKEN))?;

        let mount_ns = dir.join("mntns");
        mount_namespace(&mount_ns)?;
        let mut me = Self { name: name.clone(), dir: dir.to_path_buf(), socket: socket.clone(), processes: Vec::new(), mount_ns };
        let config = dir.join("containerd.toml").display().to_string();
        me.spawn(lab, node, "containerd", "containerd", &["--config", &config])?;
        super::wait_for("containerd's socket", 30, || socket.exists().then_some(()))?;
        for image in images {
            me.ctr(&["images", "import", &image.display().to_string()])?;
        }

        let ip = node.underlay_ip.to_string();
        let proxy = shared.bin.join("kube-proxy").display().to_string();
        let proxy_args = [
            format!("--kubeconfig={}", proxy_kubeconfig.display()),
            format!("--hostname-override={name}"),
            format!("--bind-address={ip}"),
            "--proxy-mode=iptables".into(),
            "--cluster-cidr=198.18.0.0/16".into(),
            // Leave the host's conntrack settings alone: they are not per namespace.
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            "--oom-score-adj=0".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
        ];
        let proxy_args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
        me.spawn(lab, node, "kube-proxy", &proxy, &proxy_args)?;

        let kubelet = shared.bin.join("kubelet").display().to_string();
        let cgroup_root = format!("/{}{}/{name}", crate::clean::PREFIX, shared.run);
        let kubelet_args = [
            format!("--kubeconfig={}", kubeconfig.display()),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint=unix://{}", socket.display()),
            "--runtime-request-timeout=2m".into(),
            "--cgroup-driver=cgroupfs".into(),
            format!("--cgroup-root={cgroup_root}"),
            format!("--root-dir={}", dir.join("kubelet").display()),
            format!("--cert-dir={}", dir.join("kubelet/pki").display()),
            format!("--volume-plugin-dir={}", dir.join("kubelet/volume-plugins").display()),
            format!("--resolv-conf={}", dir.join("resolv.conf").display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={ip}"),
            format!("--address={ip}"),
            "--healthz-bind-address=127.0.0.1".into(),
            "--read-only-port=0".into(),
            "--fail-swap-on=false".into(),
            "--make-iptables-util-chains=false".into(),
            // Images exist only as imported: never garbage-collect them, never evict for disk.
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%".into(),
            "--node-status-update-frequency=2s".into(),
            format!("--pod-infra-container-image={}", shared.pause_image),
            "--cluster-domain=cluster.local".into(),
            "--v=1".into(),
        ];
        let kubelet_args: Vec<&str> = kubelet_args.iter().map(String::as_str).collect();
        me.spawn(lab, node, "kubelet", &kubelet, &kubelet_args)?;
        Ok(me)
    }

    fn spawn(&mut self, lab: &mut Lab, node: &Node, name: &str, program: &str, args: &[&str]) -> Result<(), Error> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let mut spawn = Spawn::new(&node.netns, &node.system_cgroup, program, args);
        spawn.log = Some(&log);
        spawn.mount_ns = Some(&self.mount_ns);
        self.processes.push(lab.spawn(&spawn)?);
        Ok(())
    }

    /// `ctr` against this node's containerd, namespace `k8s.io` (the CRI's), in the node's
    /// mount namespace (where containerd's mounts are).
    pub fn ctr(&self, args: &[&str]) -> Result<String, Error> {
        let (ns, address) = (format!("--mount={}", self.mount_ns.display()), self.socket.display().to_string());
        let mut full = vec![ns.as_str(), "ctr", "--address", address.as_str(), "--namespace", "k8s.io"];
        full.extend_from_slice(args);
        sys::run("nsenter", &full).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }
}
