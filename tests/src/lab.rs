//! Building and tearing down a lab topology; running processes inside pods.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{
    clean::{self, PREFIX},
    sys::{self, Error, ip_in},
};

/// The lab's IPv6 /48 (ULA). Service VIPs use `fd6d:6573:68ff::/64`, outside it: unroutable.
pub const V6_PREFIX: &str = "fd6d:6573:6800";

/// Shape of a lab: how many pods each node has.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Short run id, part of every name (`mesh-<run>-...`); letters and digits only.
    pub run: String,
    /// `pods_per_node[i]` pods on node `i + 1`.
    pub pods_per_node: Vec<u8>,
}

impl LabSpec {
    /// A spec with a run id unique to this process.
    pub fn for_test(pods_per_node: &[u8]) -> Self {
        Self { run: format!("t{:x}", std::process::id()), pods_per_node: pods_per_node.to_vec() }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    /// 1-based index.
    pub index: u8,
    pub name: String,
    pub netns: String,
    /// Address on the underlay (`198.18.0.<index>`).
    pub underlay_ip: Ipv4Addr,
    /// IPv6 address on the underlay (`fd6d:6573:6800::<index>`).
    pub underlay_ip6: Ipv6Addr,
    /// The node's address on its pod bridge (`198.18.<index>.1`): pods reach the node here.
    pub pod_gateway: Ipv4Addr,
    /// The cgroup of the whole node (pods and daemons): where the socket programs attach.
    pub cgroup: PathBuf,
    /// cgroup that holds this node's pods: the attach point of the socket programs.
    pub pods_cgroup: PathBuf,
    /// cgroup for the node's own daemons (outside the pods' cgroup, so never captured).
    pub system_cgroup: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: u8,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// `fd6d:6573:6800:<node>::<10+pod>`.
    pub ip6: Ipv6Addr,
    pub cgroup: PathBuf,
    /// The pod's interface in the node's namespace (peer of the pod's eth0).
    pub host_if: String,
}

/// A built lab. Dropping it removes everything it created.
pub struct Lab {
    pub spec: LabSpec,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// `<cgroup2>/mesh-<run>`.
    pub cgroup: PathBuf,
    /// `/sys/fs/bpf/mesh-<run>`: where daemons of this lab pin their objects.
    pub bpffs: PathBuf,
    underlay_ns: String,
    processes: Vec<u32>,
}

/// A process running in a pod or node; killed (by PID) when dropped unless detached.
pub struct PodProcess {
    pub child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    log: Option<PathBuf>,
}

/// What to start, where. Built with [`Spawn::new`] and its setters.
pub struct Spawn<'a> {
    pub netns: &'a str,
    pub cgroup: &'a Path,
    pub program: &'a str,
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// Append stdout and stderr to this file instead of a pipe (for processes that must outlive
    /// the harness, like the daemons of `cargo xtask lab up`).
    pub log: Option<&'a Path>,
    /// Also join this mount namespace (a bind-mounted nsfs file), e.g. a test node's own.
    pub mount_ns: Option<&'a Path>,
    /// Listening sockets passed as a service manager does (systemd's socket activation:
    /// descriptors from 3, `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), by listener name.
    pub listen_fds: &'a [(&'a str, std::os::fd::BorrowedFd<'a>)],
}

impl<'a> Spawn<'a> {
    pub fn new(netns: &'a str, cgroup: &'a Path, program: &'a str, args: &'a [&'a str]) -> Self {
        Self { netns, cgroup, program, args, env: &[], log: None, mount_ns: None, listen_fds: &[] }
    }
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Leaves the process running after this handle is gone (it stays in its lab cgroup, so
    /// teardown and `cargo xtask clean` still remove it).
    pub fn detach(self) {
        std::mem::forget(self);
    }

    /// Waits up to `timeout` for the process to exit (a client run in the background).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout { what: format!("pid {} to exit", self.child.id()), secs: timeout.as_secs() });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a line of output that contains `needle` (e.g. a readiness line).
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, Error> {
        if let Some(log) = self.log.clone() {
            return self.wait_in_log(&log, needle, timeout);
        }
        let mut stdout = self.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let needle_owned = needle.to_owned();
        thread::spawn(move || {
            let mut line = String::new();
            loop {
                line.clear();
                match stdout.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(_) if line.contains(&needle_owned) => {
                        let _ = tx.send(Some(line.trim_end().to_owned()));
                        // Keep draining so the process never blocks on a full pipe.
                        let mut sink = String::new();
                        while stdout.read_line(&mut sink).is_ok_and(|n| n > 0) {
                            sink.clear();
                        }
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
        match rx.recv_timeout(timeout) {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(self.ended_before(needle)),
            Err(_) => Err(Error::Timeout { what: format!("{needle:?} from pid {}", self.child.id()), secs: timeout.as_secs() }),
        }
    }

    fn wait_in_log(&mut self, log: &Path, needle: &str, timeout: Duration) -> Result<String, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                let mut err = self.ended_before(needle);
                if let Error::Command { stderr, .. } = &mut err {
                    *stderr = format!("{stderr}; log {}:\n{text}", log.display());
                }
                return Err(err);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout { what: format!("{needle:?} in {}", log.display()), secs: timeout.as_secs() });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn ended_before(&self, needle: &str) -> Error {
        Error::Command {
            command: format!("process {}", self.child.id()),
            status: "exited".into(),
            stderr: format!("ended before printing {needle:?}"),
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lab {
    /// Builds the topology. On any error, what was already created is removed.
    pub fn build(spec: LabSpec) -> Result<Self, Error> {
        assert!(
            spec.run.chars().all(|c| c.is_ascii_alphanumeric()) && !spec.run.is_empty(),
            "run id must be alphanumeric"
        );
        assert!(spec.pods_per_node.len() < 200, "at most 199 nodes");
        let root = sys::cgroup2_root()?;
        let run = &spec.run;
        // A crashed earlier run with the same id leaves names we would collide with.
        clean::clean_run(Some(run));
        let mut lab = Self {
            cgroup: root.join(format!("{PREFIX}{run}")),
            bpffs: PathBuf::from(sys::BPFFS).join(format!("{PREFIX}{run}")),
            underlay_ns: format!("{PREFIX}{run}-ul"),
            nodes: Vec::new(),
            pods: Vec::new(),
            processes: Vec::new(),
            spec: spec.clone(),
        };
        lab.create()?; // on error, `lab` is dropped here and tears down what exists
        Ok(lab)
    }

    fn create(&mut self) -> Result<(), Error> {
        let run = self.spec.run.clone();
        sys::mkdir(&self.cgroup)?;
        let ul = self.underlay_ns.clone();
        sys::run("ip", &["netns", "add", &ul])?;
        ip_in(&ul, &["link", "set", "lo", "up"])?;
        ip_in(&ul, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&ul, &["link", "set", "br0", "up"])?;

        let node_count = u8::try_from(self.spec.pods_per_node.len()).expect("checked");
        for index in 1..=node_count {
            let node = Node {
                index,
                name: format!("n{index}"),
                netns: format!("{PREFIX}{run}-n{index}"),
                underlay_ip: Ipv4Addr::new(198, 18, 0, index),
                underlay_ip6: Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, 0, 0, 0, 0, u16::from(index)),
                pod_gateway: Ipv4Addr::new(198, 18, index, 1),
                cgroup: self.cgroup.join(format!("n{index}")),
                pods_cgroup: self.cgroup.join(format!("n{index}")).join("pods"),
                system_cgroup: self.cgroup.join(format!("n{index}")).join("system"),
            };
            sys::mkdir(&node.pods_cgroup)?;
            sys::mkdir(&node.system_cgroup)?;
            let ns = node.netns.as_str();
            sys::run("ip", &["netns", "add", ns])?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
            sysctl(ns, "net.ipv4.ip_forward", "1")?;
            sysctl(ns, "net.ipv6.conf.all.forwarding", "1")?;
            // Underlay link: node eth0 <-> ul bridge port n<index>.
            let port = format!("n{index}");
            sys::run("ip", &["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &ul])?;
            ip_in(&ul, &["link", "set", &port, "master", "br0", "up"])?;
            ip_in(ns, &["addr", "add", &format!("{}/24", node.underlay_ip), "dev", "eth0"])?;
            ip_in(ns, &["-6", "addr", "add", &format!("{}/64", node.underlay_ip6), "dev", "eth0", "nodad"])?;
            ip_in(ns, &["link", "set", "eth0", "up"])?;
            // Pod bridge.
            ip_in(ns, &["link", "add", "br0", "type", "bridge"])?;
            ip_in(ns, &["addr", "add", &format!("198.18.{index}.1/24"), "dev", "br0"])?;
            ip_in(ns, &["-6", "addr", "add", &format!("{V6_PREFIX}:{index}::1/64"), "dev", "br0", "nodad"])?;
            ip_in(ns, &["link", "set", "br0", "up"])?;
            for peer in 1..=node_count {
                if peer != index {
                    ip_in(ns, &["route", "add", &format!("198.18.{peer}.0/24"), "via", &format!("198.18.0.{peer}")])?;
                    ip_in(ns, &["-6", "route", "add", &format!("{V6_PREFIX}:{peer}::/64"), "via", &format!("{V6_PREFIX}::{peer}")])?;
                }
            }
            for p in 1..=self.spec.pods_per_node[usize::from(index - 1)] {
                let pod = Pod {
                    name: format!("n{index}p{p}"),
                    node: index,
                    netns: format!("{PREFIX}{run}-n{index}p{p}"),
                    ip: Ipv4Addr::new(198, 18, index, 10 + p),
                    ip6: Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, u16::from(index), 0, 0, 0, u16::from(10 + p)),
                    cgroup: node.pods_cgroup.join(format!("p{p}")),
                    host_if: format!("p{p}"),
                };
                sys::mkdir(&pod.cgroup)?;
                let pns = pod.netns.as_str();
                sys::run("ip", &["netns", "add", pns])?;
                ip_in(pns, &["link", "set", "lo", "up"])?;
                let vport = format!("p{p}");
                sys::run("ip", &["link", "add", "eth0", "netns", pns, "type", "veth", "peer", "name", &vport, "netns", ns])?;
                ip_in(ns, &["link", "set", &vport, "master", "br0", "up"])?;
                ip_in(pns, &["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
                ip_in(pns, &["-6", "addr", "add", &format!("{}/64", pod.ip6), "dev", "eth0", "nodad"])?;
                ip_in(pns, &["link", "set", "eth0", "up"])?;
                // Only the pod range is routable: no default route, no route to VIPs.
                ip_in(pns, &["route", "add", "198.18.0.0/16", "via", &format!("198.18.{index}.1")])?;
                ip_in(pns, &["-6", "route", "add", &format!("{V6_PREFIX}::/48"), "via", &format!("{V6_PREFIX}:{index}::1")])?;
                self.pause(&pod)?;
                self.pods.push(pod);
            }
            self.nodes.push(node);
        }
        Ok(())
    }

    /// Every pod gets a long-sleeping process in its namespace and cgroup, like Kubernetes'
    /// pause container: the pod's cgroup is never empty, so the node daemon can find it.
    fn pause(&mut self, pod: &Pod) -> Result<(), Error> {
        let child = in_netns_and_cgroup(&pod.netns, &pod.cgroup, "sleep", &["infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn { program: "sleep".into(), source })?;
        self.processes.push(child.id());
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[usize::from(index - 1)]
    }

    /// Starts a process inside a network namespace and cgroup, tracked by PID. The process
    /// joins the cgroup before it execs, so every socket it opens is subject to the cgroup's
    /// programs.
    pub fn spawn(&mut self, spec: &Spawn<'_>) -> Result<PodProcess, Error> {
        let mut cmd = in_netns_and_cgroup(spec.netns, spec.cgroup, spec.program, spec.args);
        if let Some(ns) = spec.mount_ns {
            // nsenter opens every namespace before entering any: the order of options is free.
            let mut with_mount = Command::new("nsenter");
            with_mount.arg(format!("--mount={}", ns.display())).args(cmd.get_args());
            cmd = with_mount;
        }
        cmd.envs(spec.env.iter().copied());
        if !spec.listen_fds.is_empty() {
            pass_listeners(&mut cmd, spec.listen_fds);
        }
        let log = match spec.log {
            Some(path) => {
                let open = || std::fs::OpenOptions::new().create(true).append(true).open(path);
                let io = |source| Error::Io { path: path.into(), source };
                cmd.stdout(open().map_err(io)?).stderr(open().map_err(io)?);
                Some(path.to_path_buf())
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
                None
            }
        };
        let mut child = cmd.spawn().map_err(|source| Error::Spawn { program: spec.program.into(), source })?;
        self.processes.push(child.id());
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(PodProcess { child, stdout, log })
    }

    pub fn spawn_in_pod(&mut self, pod: &str, program: &str, args: &[&str]) -> Result<PodProcess, Error> {
        let pod = self.pod(pod).clone();
        self.spawn(&Spawn::new(&pod.netns, &pod.cgroup, program, args))
    }

    /// Runs `f` with the calling thread inside network namespace `netns` (e.g. to attach a tc
    /// program to a node's interface), then returns the thread to the namespace it was in.
    pub fn in_netns<R>(&self, netns: &str, f: impl FnOnce() -> R) -> Result<R, Error> {
        use nix::sched::{CloneFlags, setns};
        let open = |path: &str| std::fs::File::open(path).map_err(|source| Error::Io { path: path.into(), source });
        let home = open("/proc/thread-self/ns/net")?;
        let path = format!("/run/netns/{netns}");
        let target = open(&path)?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io { path: path.clone().into(), source: e.into() })?;
        let result = f();
        setns(&home, CloneFlags::CLONE_NEWNET).expect("returning the thread to its own network namespace");
        Ok(result)
    }

    /// Packets a pod's eth0 has sent and received so far.
    pub fn pod_packets(&self, pod: &str) -> Result<(u64, u64), Error> {
        let ns = self.pod(pod).netns.clone();
        let out = sys::run("ip", &["-n", &ns, "-s", "-j", "link", "show", "eth0"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |dir: &str| -> u64 {
            // "rx":{"bytes":..,"packets":N,...}
            text.split(&format!("\"{dir}\":{{")).nth(1)
                .and_then(|s| s.split("\"packets\":").nth(1))
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("tx"), field("rx")))
    }

    /// An empty lab that owns nothing (teardown is a no-op): a stand-in after `persist`.
    pub fn placeholder() -> Self {
        Self {
            spec: LabSpec { run: "none".into(), pods_per_node: Vec::new() },
            nodes: Vec::new(),
            pods: Vec::new(),
            cgroup: PathBuf::new(),
            bpffs: PathBuf::new(),
            underlay_ns: String::new(),
            processes: Vec::new(),
        }
    }

    /// Keeps everything running after this handle is gone (`cargo xtask lab up`); remove it
    /// later with [`crate::clean::clean_run`].
    pub fn persist(mut self) {
        self.processes.clear();
        std::mem::forget(self);
    }

    /// Runs `program args...` in a pod to completion and returns its output (whatever the exit).
    pub fn run_in_pod(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output, Error> {
        let pod = self.pod(pod);
        in_netns_and_cgroup(&pod.netns, &pod.cgroup, program, args)
            .output()
            .map_err(|source| Error::Spawn { program: program.into(), source })
    }

    /// Removes everything: processes (by PID, then whatever is left in our cgroups), pinned
    /// objects, namespaces, cgroups. Idempotent.
    pub fn teardown(&mut self) {
        for pid in self.processes.drain(..) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = clean::remove_cgroup_tree(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        for ns in clean::netns_names(Some(&self.spec.run)) {
            let _ = sys::run("ip", &["netns", "del", &ns]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), Error> {
    // /proc/sys is per network namespace for net.*; `ip netns exec` is fine for this.
    sys::run("ip", &["netns", "exec", netns, "sysctl", "-qw", &format!("{key}={value}")]).map(drop)
}

/// Hands `sockets` to the child as descriptors 3, 4, ... with systemd's variables. The wrapper
/// shell of [`in_netns_and_cgroup`] keeps them open and sets `LISTEN_PID` to its own PID, which
/// its `exec` makes the program's.
fn pass_listeners(cmd: &mut Command, sockets: &[(&str, std::os::fd::BorrowedFd<'_>)]) {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
    cmd.env("LISTEN_FDS", sockets.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
    let raw: Vec<i32> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    #[expect(unsafe_code, reason = "dup2 between fork and exec, as a service manager does")]
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first: a source may sit where another one goes.
            let mut high = Vec::with_capacity(raw.len());
            for &fd in &raw {
                let moved = libc::fcntl(fd, libc::F_DUPFD, 100);
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(moved);
            }
            for (i, &fd) in high.iter().enumerate() {
                if libc::dup2(fd, 3 + i32::try_from(i).expect("few sockets")) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
}

/// `nsenter --net` keeps the host's /sys mounts (unlike `ip netns exec`, which remounts /sys and
/// hides bpffs and cgroup2); the shell joins the cgroup and then execs, so the PID we track is
/// the program's own. It first closes every descriptor above stderr: a process that outlives the
/// harness (the lab's daemons) must not keep one of its parents' open, such as a `flock` on the
/// shared cargo lock (bash, because dash cannot name descriptors above 9).
pub fn in_netns_and_cgroup(netns: &str, cgroup: &Path, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .args([
            "--",
            "bash",
            "-c",
            r#"echo $$ > "$0/cgroup.procs" || exit 1; keep=$((2 + ${LISTEN_FDS:-0})); [ -n "$LISTEN_FDS" ] && export LISTEN_PID=$$; for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt $keep ] && eval "exec $n>&-"; done; exec "$@""#,
        ])
        .arg(cgroup)
        .arg(program)
        .args(args);
    cmd
}
