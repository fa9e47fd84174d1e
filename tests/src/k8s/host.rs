//! What a kubelet and containerd change outside their own directories, and how the test cluster
//! puts it back: the kernel sysctls the kubelet rewrites at start, mounts under the cluster's
//! directory (container root filesystems, sandbox `/dev/shm`, pinned pod network namespaces,
//! kubelet volumes), cgroup v1 directories (the kubelet creates its pod cgroups in every
//! hierarchy, not only in cgroup2, which the lab removes), and the container logs the kubelet
//! writes under the fixed `/var/log/pods` and `/var/log/containers` (and the shims' sockets).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use crate::{clean, sys};

/// Global sysctls the kubelet sets at start (`vm.overcommit_memory` 0→1, `kernel.panic` →10,
/// `kernel.panic_on_oops` →1): they are not per network namespace.
const KUBELET_SYSCTLS: [&str; 3] = ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"];
/// Fixed paths the kubelet and containerd's shims write to whatever their configuration: logs,
/// and the shims' sockets (`/run/containerd/s/<hash>`, left behind when a shim is killed).
const LOG_DIRS: [&str; 3] = ["/var/log/pods", "/var/log/containers", "/run/containerd"];

/// The host as found before the cluster started.
pub struct Snapshot {
    sysctls: Vec<(PathBuf, String)>,
    /// Each log directory: `None` if it did not exist, else its entries then.
    logs: Vec<(PathBuf, Option<BTreeSet<String>>)>,
}

fn entries(dir: &Path) -> Option<BTreeSet<String>> {
    fs::read_dir(dir).ok().map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
}

impl Snapshot {
    pub fn take() -> Self {
        let sysctls = KUBELET_SYSCTLS
            .iter()
            .filter_map(|k| {
                let p = Path::new("/proc/sys").join(k);
                fs::read_to_string(&p).ok().map(|v| (p, v.trim().to_owned()))
            })
            .collect();
        let logs = LOG_DIRS.iter().map(|d| (PathBuf::from(d), entries(Path::new(d)))).collect();
        Self { sysctls, logs }
    }

    /// Puts back the sysctls and removes the logs that appeared since (directories that did not
    /// exist are removed whole). Returns what it changed, for the caller's report.
    pub fn restore(&self) -> Vec<String> {
        let mut changed = Vec::new();
        for (path, value) in &self.sysctls {
            if fs::read_to_string(path).is_ok_and(|now| now.trim() != value) && fs::write(path, value).is_ok() {
                changed.push(format!("restored {} = {value}", path.display()));
            }
        }
        for (dir, before) in &self.logs {
            match before {
                None => {
                    if fs::remove_dir_all(dir).is_ok() {
                        changed.push(format!("removed {}", dir.display()));
                    }
                }
                Some(before) => {
                    for name in entries(dir).unwrap_or_default().difference(before) {
                        let p = dir.join(name);
                        let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
                    }
                }
            }
        }
        changed
    }
}

/// Unmounts everything mounted at or below `dir` (deepest first, lazily: a mount still busy
/// goes once its last user is gone; the processes are dead by then).
pub fn unmount_below(dir: &Path) -> usize {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return 0 };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(unescape))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    let mut n = 0;
    for p in points {
        if nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH).is_ok() {
            n += 1;
        }
    }
    n
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(char::from(b));
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Mount points of the cgroup v1 hierarchies (`cgroup` filesystems).
pub fn cgroup_v1_roots() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Creates `<hierarchy>/<relative>` in every cgroup v1 hierarchy (the kubelet refuses a
/// `--cgroup-root` missing from any of them).
pub fn mkdir_v1(relative: &Path) -> Result<(), sys::Error> {
    for root in cgroup_v1_roots() {
        sys::mkdir(&root.join(relative))?;
    }
    Ok(())
}

/// Removes `<hierarchy>/<name>` trees of every cgroup v1 hierarchy, for the names `matches`
/// accepts (processes must be gone: cgroup2's `cgroup.kill` ended them).
pub fn remove_v1(matches: impl Fn(&str) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    for root in cgroup_v1_roots() {
        for e in fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && matches(&name) && clean::remove_cgroup_tree(&e.path()).is_ok() {
                removed.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    removed
}
