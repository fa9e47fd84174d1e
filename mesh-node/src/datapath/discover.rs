//! Which cgroups belong to which pod: the kernel sees a cgroup id at `connect()`, the control
//! plane speaks of pod addresses. For every cgroup under the node's cgroup that has processes,
//! the addresses of the network namespace of its first process name the pod. In Kubernetes every
//! container cgroup of a pod (the pause container's included) maps to the pod's IP; cgroups of
//! host-network processes map to node addresses, which are not workloads and are ignored.
//! In a cluster this needs the host's PID namespace (`hostPID`): `cgroup.procs` lists only the
//! PIDs the reader can see.

use std::{
    collections::BTreeMap,
    fs,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

/// Every cgroup (directory) under `root`, inclusive, that holds processes, with the non-loopback,
/// non-link-local addresses of that process's network namespace.
pub fn pod_cgroups(root: &Path) -> io::Result<BTreeMap<PathBuf, Vec<IpAddr>>> {
    Ok(pod_processes(root)?.into_iter().map(|(dir, p)| (dir, p.addresses)).collect())
}

/// A process of a cgroup and the addresses of its network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    pub addresses: Vec<IpAddr>,
}

/// As [`pod_cgroups`], with the process each cgroup's addresses came from (its PID names the
/// pod's network namespace, where its host-side interface leads).
pub fn pod_processes(root: &Path) -> io::Result<BTreeMap<PathBuf, Found>> {
    let mut out = BTreeMap::new();
    walk(root, &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Found>) -> io::Result<()> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    // A process may exit between listing and reading: try each until one answers.
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if let Some(addresses) = netns_addresses(pid) {
            out.insert(dir.to_path_buf(), Found { pid, addresses });
            break;
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// The kubelet processes of the machine and their cgroup directories under `cgroup2` (where the
/// cgroup2 filesystem is mounted): their probes may reach STRICT pods.
///
/// A kubelet is a process named `kubelet` (`/proc/<pid>/comm`: `/proc/<pid>/exe` would need
/// `CAP_SYS_PTRACE`, which the DaemonSet does not have) outside `pods` (the kubelet's pods
/// cgroup): a pod's process renaming itself is not trusted. A kubelet whose cgroup this process
/// cannot name (a private cgroup namespace shows it as `/..`) is left out.
pub fn kubelets(cgroup2: &Path, pods: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == "kubelet"))
        .filter_map(|pid| {
            let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            let dir = kubelet_cgroup(cgroup2, pods, &cgroup)?;
            Some((pid, dir))
        })
        .collect()
}

/// The cgroup directory of a kubelet from its `/proc/<pid>/cgroup`, unless it cannot be named
/// (`/..`: another cgroup namespace) or lies among the pods (then it is no kubelet).
fn kubelet_cgroup(cgroup2: &Path, pods: &Path, proc_cgroup: &str) -> Option<PathBuf> {
    let relative = crate::kubepods::own_cgroup(proc_cgroup)?;
    let dir = cgroup2.join(relative.trim_start_matches('/'));
    (!relative.starts_with("/..") && !dir.starts_with(pods)).then_some(dir)
}

/// Addresses of the network namespace `pid` lives in (`/proc/<pid>/net` shows that namespace).
fn netns_addresses(pid: u32) -> Option<Vec<IpAddr>> {
    let v4 = fs::read_to_string(format!("/proc/{pid}/net/fib_trie")).ok()?;
    let v6 = fs::read_to_string(format!("/proc/{pid}/net/if_inet6")).unwrap_or_default();
    let mut addrs: Vec<IpAddr> = local_v4(&v4).into_iter().map(IpAddr::V4).collect();
    addrs.extend(local_v6(&v6).into_iter().map(IpAddr::V6));
    addrs.sort();
    addrs.dedup();
    Some(addrs)
}

/// Local IPv4 addresses from `/proc/net/fib_trie`: an address line (`|-- a.b.c.d`) followed by
/// `/32 host LOCAL`.
pub fn local_v4(fib_trie: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(a) = t.parse::<Ipv4Addr>() {
            last = Some(a);
        } else if t.starts_with("/32 host LOCAL")
            && let Some(a) = last
            && !a.is_loopback()
            && !out.contains(&a)
        {
            out.push(a);
        }
    }
    out
}

/// Global IPv6 addresses from `/proc/net/if_inet6` (32 hex digits, then index, prefix, scope).
pub fn local_v6(if_inet6: &str) -> Vec<Ipv6Addr> {
    if_inet6
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let hex = f.next()?;
            let scope = f.nth(2)?;
            // Scope 00 is global; skip link-local (20) and host (10).
            if scope != "00" || hex.len() != 32 {
                return None;
            }
            u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubelet_is_trusted_only_outside_the_pods_and_where_it_can_be_named() {
        let (mount, pods) = (Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/kubepods.slice"));
        let named = |proc_cgroup: &str| kubelet_cgroup(mount, pods, proc_cgroup);
        assert_eq!(named("0::/system.slice/kubelet.service\n"), Some(PathBuf::from("/sys/fs/cgroup/system.slice/kubelet.service")));
        assert_eq!(named("12:pids:/x\n0::/system.slice/kubelet.service\n"), Some(PathBuf::from("/sys/fs/cgroup/system.slice/kubelet.service")), "hybrid hosts list v1 lines too");
        assert_eq!(named("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope\n"), None, "a pod's process named kubelet");
        assert_eq!(named("0::/../../system.slice/kubelet.service\n"), None, "another cgroup namespace");
        assert_eq!(named("4:memory:/system.slice\n"), None, "no cgroup2 line");
    }

    #[test]
    fn fib_trie_local_addresses() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     +-- 198.18.1.0/24 2 0 2\n        |-- 198.18.1.0\n           /24 link UNICAST\n        |-- 198.18.1.11\n           /32 host LOCAL\n        |-- 198.18.1.255\n           /32 link BROADCAST\nLocal:\n        |-- 198.18.1.11\n           /32 host LOCAL\n";
        assert_eq!(local_v4(trie), vec![Ipv4Addr::new(198, 18, 1, 11)]);
    }

    #[test]
    fn if_inet6_global_addresses_only() {
        let text = "fd6d6573680000010000000000000011 02 40 00 80     eth0\nfe80000000000000b4a1fffe4e5a7b10 02 40 20 80     eth0\n00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(local_v6(text), vec!["fd6d:6573:6800:1::11".parse::<Ipv6Addr>().unwrap()]);
    }
}
