//! The lab (`cargo xtask lab up`, or an e2e test's own run): network namespaces named
//! `mesh-<run>-n<i>` (nodes), `mesh-<run>-n<i>p<j>` (pods), `mesh-<run>-ul` (underlay, where
//! mesh-control's status port is), pinned maps under `/sys/fs/bpf/mesh-<run>/n<i>/`.
//!
//! An address inside a namespace is reached by a socket created there: a short-lived thread
//! `setns(CLONE_NEWNET)`s into `/run/netns/<name>` and connects; the connected socket stays in
//! that namespace when the thread hands it back.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use super::Port;
use crate::http::{self, Response};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the lab needs root (network namespaces, bpffs): run meshctl as root")]
    NotRoot,
    #[error(
        "no lab run {run:?} is running (no /run/netns/mesh-{run}-ul): start one with `cargo xtask lab up`"
    )]
    NotRunning { run: String },
    #[error("entering network namespace {netns}: {source}")]
    Setns {
        netns: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr} in network namespace {netns}: {source}")]
    Connect {
        netns: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading /run/netns: {0}")]
    ListNamespaces(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::Error),
}

/// mesh-control's status port, on the underlay (`--status-addr 127.0.0.1:15014` in its netns).
const CONTROL_STATUS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15_014);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const NETNS_DIR: &str = "/run/netns";

pub struct Lab {
    run: String,
}

impl Lab {
    /// The lab run `run` (`lab` for `cargo xtask lab up`); fails when not root or not running.
    pub fn open(run: &str) -> Result<Self, Error> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        let lab = Self {
            run: run.to_owned(),
        };
        if !PathBuf::from(NETNS_DIR).join(lab.underlay()).exists() {
            return Err(Error::NotRunning {
                run: run.to_owned(),
            });
        }
        Ok(lab)
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    fn underlay(&self) -> String {
        format!("mesh-{}-ul", self.run)
    }

    fn node_netns(&self, node: &str) -> String {
        format!("mesh-{}-{node}", self.run)
    }

    pub fn bpffs(&self, node: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/mesh-{}/{node}", self.run))
    }

    /// Nodes are the namespaces `mesh-<run>-n<i>` (pods add `p<j>`).
    pub fn nodes(&self) -> Result<Vec<String>, Error> {
        let names = std::fs::read_dir(NETNS_DIR)
            .map_err(Error::ListNamespaces)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok());
        Ok(node_names(&self.run, names))
    }

    pub fn control_get(&self, path: &str) -> Result<Response, Error> {
        let stream = connect_in(&self.underlay(), CONTROL_STATUS)?;
        Ok(http::get(stream, &CONTROL_STATUS.to_string(), path)?)
    }

    pub fn node_get(&self, node: &str, port: Port, path: &str) -> Result<Response, Error> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port.number()));
        let stream = connect_in(&self.node_netns(node), addr)?;
        Ok(http::get(stream, &addr.to_string(), path)?)
    }
}

/// The node names among namespace names: `mesh-<run>-n<digits>`, sorted by number.
fn node_names(run: &str, netns: impl Iterator<Item = String>) -> Vec<String> {
    let prefix = format!("mesh-{run}-");
    let mut nodes: Vec<(u32, String)> = netns
        .filter_map(|name| {
            let node = name.strip_prefix(&prefix)?;
            let number = node.strip_prefix('n')?.parse().ok()?;
            Some((number, node.to_owned()))
        })
        .collect();
    nodes.sort();
    nodes.into_iter().map(|(_, n)| n).collect()
}

/// A lab pod's address from its name: pod `j` of node `i` is `198.18.<i>.<10+j>` (README, "Lab
/// addressing").
pub fn pod_ip(name: &str) -> Option<IpAddr> {
    let (node, pod) = name.strip_prefix('n')?.split_once('p')?;
    let node: u8 = node.parse().ok()?;
    let pod: u8 = pod.parse().ok()?;
    (node > 0 && pod > 0).then_some(())?;
    Some(IpAddr::V4(Ipv4Addr::new(
        198,
        18,
        node,
        10u8.checked_add(pod)?,
    )))
}

/// Connects to `addr` from inside network namespace `netns` (see the module comment).
pub fn connect_in(netns: &str, addr: SocketAddr) -> Result<TcpStream, Error> {
    let netns = netns.to_owned();
    std::thread::scope(|s| {
        s.spawn(|| {
            let path = PathBuf::from(NETNS_DIR).join(&netns);
            let setns_err = |source| Error::Setns {
                netns: netns.clone(),
                source,
            };
            let file = File::open(&path).map_err(setns_err)?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| setns_err(e.into()))?;
            // This thread now lives in `netns` and ends right after: no need to switch back.
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| Error::Connect {
                netns: netns.clone(),
                addr,
                source,
            })
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_the_run_s_node_namespaces_in_numeric_order() {
        let names = [
            "mesh-lab-ul",
            "mesh-lab-n10",
            "mesh-lab-n2",
            "mesh-lab-n1p1",
            "mesh-lab-n1",
            "mesh-t1f-n1",
            "other",
        ];
        let nodes = node_names("lab", names.iter().map(|s| (*s).to_owned()));
        assert_eq!(nodes, ["n1", "n2", "n10"]);
    }

    #[test]
    fn pod_names_map_to_lab_addresses() {
        assert_eq!(pod_ip("n1p1"), Some("198.18.1.11".parse().expect("ip")));
        assert_eq!(pod_ip("n2p2"), Some("198.18.2.12".parse().expect("ip")));
        for not_a_pod in [
            "n1",
            "client",
            "n0p1",
            "n1p0",
            "np1",
            "n1p999",
            "demo/client",
        ] {
            assert_eq!(pod_ip(not_a_pod), None, "{not_a_pod}");
        }
    }
}
