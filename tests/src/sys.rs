//! Small wrappers over the tools and files the lab uses, with errors that name what failed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("cannot run `{program}`: {source} (is it installed? run scripts/setup.sh)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 filesystem is mounted (looked in /proc/mounts); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
}

/// Panics with a clear message unless running as root. Privileged tests call this first: they
/// must fail loudly, never skip and report a pass.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "this test needs root (network namespaces, cgroups, eBPF); run it through `cargo xtask test` as root (euid is {euid})"
    );
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<Output, Error> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn { program: program.into(), source })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `ip -n NETNS args...`
pub fn ip_in(netns: &str, args: &[&str]) -> Result<(), Error> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full).map(drop)
}

/// Makes the `nat` table's `chain` in `netns` hold `rule` (`present`) or not; idempotent.
pub fn nat_rule(netns: &str, chain: &str, rule: &[&str], present: bool) -> Result<(), Error> {
    let iptables = |op: &str| -> Result<bool, Error> {
        let mut args = vec!["netns", "exec", netns, "iptables", "-w", "-t", "nat", op, chain];
        args.extend_from_slice(rule);
        match run("ip", &args) {
            Ok(_) => Ok(true),
            Err(Error::Command { .. }) if op == "-C" => Ok(false),
            Err(e) => Err(e),
        }
    };
    match (present, iptables("-C")?) {
        (true, false) => iptables("-A").map(drop),
        (false, true) => iptables("-D").map(drop),
        _ => Ok(()),
    }
}

/// The mount point of the cgroup v2 hierarchy (not assumed to be /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|source| Error::Io { path: "/proc/mounts".into(), source })?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(Error::NoCgroup2)
}

/// The bpffs mount point used for pinned objects.
pub const BPFFS: &str = "/sys/fs/bpf";

/// True if a bpf filesystem is mounted at [`BPFFS`].
pub fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf ")))
        .unwrap_or(false)
}

pub fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| Error::Io { path: path.into(), source })
}

pub fn write(path: &Path, contents: &str) -> Result<(), Error> {
    fs::write(path, contents).map_err(|source| Error::Io { path: path.into(), source })
}
