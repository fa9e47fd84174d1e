//! Removal of everything the lab creates, by name prefix. Used by teardown and by
//! `cargo xtask clean` after a crashed run. Only objects carrying our prefix are touched.

use std::{fs, path::Path, thread, time::Duration};

use crate::sys::{self, BPFFS, Error};

/// Prefix of every namespace, cgroup and bpffs directory the lab creates.
pub const PREFIX: &str = "mesh-";

/// Names of network namespaces that belong to run `run` (all runs if `None`).
pub fn netns_names(run: Option<&str>) -> Vec<String> {
    let Ok(out) = sys::run("ip", &["netns", "list"]) else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| match run {
            Some(run) => n.starts_with(&format!("{PREFIX}{run}-")),
            None => n.starts_with(PREFIX),
        })
        .map(str::to_owned)
        .collect()
}

/// Kills every process in a cgroup subtree and removes the subtree.
pub fn remove_cgroup_tree(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux ≥ 5.14) SIGKILLs the whole subtree atomically.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if rmdir_tree(dir).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    rmdir_tree(dir)
}

fn rmdir_tree(dir: &Path) -> Result<(), Error> {
    let io = |source| Error::Io { path: dir.into(), source };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_dir() {
            rmdir_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir).map_err(io)
}

/// Removes one run's namespaces, cgroups and pinned objects (all runs if `None`).
pub fn clean_run(run: Option<&str>) -> Vec<String> {
    let mut removed = Vec::new();
    let matches = |name: &str| match run {
        Some(run) => name == format!("{PREFIX}{run}"),
        None => name.starts_with(PREFIX),
    };
    if let Ok(root) = sys::cgroup2_root() {
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if matches(&name) && remove_cgroup_tree(&e.path()).is_ok() {
                    removed.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    for ns in netns_names(run) {
        if sys::run("ip", &["netns", "del", &ns]).is_ok() {
            removed.push(format!("netns {ns}"));
        }
    }
    // The k8s suite's clusters: mounts and state under /var/lib/mesh-<run>-k8s, and the cgroup v1
    // directories the kubelet made (cgroup2's are above).
    for e in fs::read_dir("/var/lib").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(run_dir) = name.strip_suffix("-k8s")
            && matches(run_dir)
        {
            crate::k8s::host::unmount_below(&e.path());
            if fs::remove_dir_all(e.path()).is_ok() {
                removed.push(format!("cluster dir {}", e.path().display()));
            }
        }
    }
    removed.extend(crate::k8s::host::remove_v1(matches));
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if matches(&name) && fs::remove_dir_all(e.path()).is_ok() {
                removed.push(format!("bpffs {}", e.path().display()));
            }
        }
    }
    removed
}

/// Removes every leftover of every run.
pub fn clean_all() -> Vec<String> {
    clean_run(None)
}
