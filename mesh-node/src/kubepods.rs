//! Where the kubelet puts this node's pods, when `MESH_CGROUP` is not set: the `kubepods`
//! cgroup (cgroupfs driver) or `kubepods.slice` (systemd driver) that the daemon's own container
//! is in. The DaemonSet then needs no per-node setting, and nodes whose kubelet runs with a
//! `--cgroup-root` of their own work as they are.
//!
//! This reads `/proc/self/cgroup`, whose cgroup2 line (`0::<path>`) is relative to the cgroup2
//! mount as the daemon sees it (the DaemonSet mounts the host's `/sys/fs/cgroup`). Inside a
//! private cgroup namespace (containerd's default on cgroup2-only hosts) that path is `/`; then
//! the daemon cannot see where it is, and says to set `MESH_CGROUP`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mounts): mount the host's /sys/fs/cgroup (the DaemonSet does) or set MESH_CGROUP")]
    NoCgroup2,
    #[error("this process's cgroup {own:?} has no kubepods ancestor (not started by a kubelet, or a private cgroup namespace): set MESH_CGROUP to the kubelet's pods cgroup, e.g. /sys/fs/cgroup/kubepods.slice")]
    NotUnderKubepods { own: String },
}

/// The kubelet's pods cgroup containing this process, as a path below the cgroup2 mount.
pub fn discover() -> Result<PathBuf, Error> {
    let read = |p: &str| std::fs::read_to_string(p).map_err(|source| Error::Read { path: p.into(), source });
    let mount = cgroup2_mount(&read("/proc/self/mounts")?).ok_or(Error::NoCgroup2)?;
    let own = own_cgroup(&read("/proc/self/cgroup")?).unwrap_or_default();
    let relative = kubepods_ancestor(&own).ok_or_else(|| Error::NotUnderKubepods { own: own.clone() })?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// The first cgroup2 mount point in a mounts table.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup2 path of `/proc/self/cgroup` (the `0::` line).
pub fn own_cgroup(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// `/a/kubepods/burstable/pod<uid>/<id>` → `/a/kubepods` (also `kubepods.slice`).
pub fn kubepods_ancestor(own: &str) -> Option<String> {
    let mut out = PathBuf::from("/");
    for part in Path::new(own).components().skip(1) {
        out.push(part);
        let name = part.as_os_str().to_string_lossy();
        if name == "kubepods" || name == "kubepods.slice" {
            return Some(out.display().to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kubepods_ancestor_with_either_driver_and_any_cgroup_root() {
        assert_eq!(kubepods_ancestor("/mesh-k1/n1/kubepods/besteffort/podab/c0ffee").as_deref(), Some("/mesh-k1/n1/kubepods"));
        assert_eq!(kubepods_ancestor("/kubepods.slice/kubepods-burstable.slice/x.scope").as_deref(), Some("/kubepods.slice"));
        assert_eq!(kubepods_ancestor("/"), None);
        assert_eq!(kubepods_ancestor("/user.slice/session-1.scope"), None);
    }

    #[test]
    fn reads_the_cgroup2_line_and_mount() {
        assert_eq!(own_cgroup("12:cpu:/x\n0::/kubepods/pod1/c\n").as_deref(), Some("/kubepods/pod1/c"));
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }
}
