//! Which mesh meshctl talks to, and how it reaches the endpoints every verb reads.
//!
//! - **The lab** (`cargo xtask lab up`): everything lives in network namespaces named
//!   `mesh-<run>-...`; endpoints are reached by opening sockets inside them ([`lab`]).
//! - **A cluster** through kubeconfig: the same endpoints through the apiserver's pod proxy
//!   ([`cluster`]).
//!
//! Without `--lab` or `--kubeconfig`, the lab is used when `/run/mesh-lab` exists.

pub mod cluster;
pub mod lab;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::http::Response;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lab(#[from] lab::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("no node {node:?} in this mesh (nodes: {known})")]
    UnknownNode { node: String, known: String },
    #[error(
        "the kernel maps of a cluster node are only readable on the node itself: run meshctl there \
         (or `kubectl exec` into its mesh-node pod, which mounts bpffs) with `--bpffs /sys/fs/bpf/mesh/{node}`"
    )]
    BpffsNeedsNode { node: String },
}

/// A node daemon's two HTTP ports (as Istio's ztunnel has them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// `127.0.0.1:15000`: `/config_dump`, `/ready`, `/debug/explain`.
    Admin,
    /// `:15020`: `/metrics`, `/healthz/ready`.
    Metrics,
}

impl Port {
    pub const fn number(self) -> u16 {
        match self {
            Self::Admin => 15_000,
            Self::Metrics => 15_020,
        }
    }
}

/// What the command line asked for.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub lab: bool,
    pub lab_run: String,
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: String,
}

/// Where the lab leaves its state while it runs (`cargo xtask lab up`).
pub const LAB_STATE_DIR: &str = "/run/mesh-lab";

/// The lab or a cluster, per [`Choice`]: `--lab` or `--kubeconfig`/`--context` force one;
/// otherwise the lab if `lab_state_dir` exists, else kubeconfig.
pub fn choose_lab(choice: &Choice, lab_state_dir: &Path) -> bool {
    if choice.lab {
        return true;
    }
    if choice.kubeconfig.is_some() || choice.context.is_some() {
        return false;
    }
    lab_state_dir.exists()
}

pub enum Target {
    Lab(lab::Lab),
    Cluster(cluster::Cluster),
}

impl Target {
    pub fn connect(choice: &Choice) -> Result<Self, Error> {
        if choose_lab(choice, Path::new(LAB_STATE_DIR)) {
            Ok(Self::Lab(lab::Lab::open(&choice.lab_run)?))
        } else {
            Ok(Self::Cluster(cluster::Cluster::connect(choice)?))
        }
    }

    /// One line saying which mesh this is, for progress messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Lab(l) => format!("the lab (run {:?})", l.run()),
            Self::Cluster(c) => format!("the cluster ({})", c.describe()),
        }
    }

    /// The names of the nodes that run a node daemon, sorted.
    pub fn nodes(&self) -> Result<Vec<String>, Error> {
        match self {
            Self::Lab(l) => Ok(l.nodes()?),
            Self::Cluster(c) => Ok(c.nodes()?),
        }
    }

    /// Fails with the list of known nodes when `node` is not one of them.
    pub fn check_node(&self, node: &str) -> Result<(), Error> {
        let nodes = self.nodes()?;
        if nodes.iter().any(|n| n == node) {
            Ok(())
        } else {
            Err(Error::UnknownNode {
                node: node.to_owned(),
                known: nodes.join(", "),
            })
        }
    }

    /// `GET path` on mesh-control's status port (15014).
    pub fn control_get(&self, path: &str) -> Result<Response, Error> {
        match self {
            Self::Lab(l) => Ok(l.control_get(path)?),
            Self::Cluster(c) => Ok(c.control_get(path)?),
        }
    }

    /// `GET path` on every mesh-control replica, the leader's answer first.
    pub fn control_get_all(&self, path: &str) -> Result<Vec<Response>, Error> {
        match self {
            Self::Lab(l) => Ok(vec![l.control_get(path)?]),
            Self::Cluster(c) => Ok(c.control_get_all(path)?),
        }
    }

    /// `GET path` on a node daemon's admin or metrics port.
    pub fn node_get(&self, node: &str, port: Port, path: &str) -> Result<Response, Error> {
        match self {
            Self::Lab(l) => Ok(l.node_get(node, port, path)?),
            Self::Cluster(c) => Ok(c.node_get(node, port, path)?),
        }
    }

    /// The bpffs directory holding `node`'s pinned maps: `--bpffs` when given, the lab's pin
    /// directory in the lab; on a cluster, only `--bpffs` (maps are per node).
    pub fn bpffs(&self, node: &str, explicit: Option<&Path>) -> Result<PathBuf, Error> {
        if let Some(dir) = explicit {
            return Ok(dir.to_path_buf());
        }
        match self {
            Self::Lab(l) => Ok(l.bpffs(node)),
            Self::Cluster(_) => Err(Error::BpffsNeedsNode {
                node: node.to_owned(),
            }),
        }
    }

    /// A pod's address from its lab name (`n1p1`); `None` on a cluster or for another name.
    pub fn lab_pod_ip(&self, name: &str) -> Option<IpAddr> {
        match self {
            Self::Lab(_) => lab::pod_ip(name),
            Self::Cluster(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_when_forced_or_when_its_state_exists_unless_kubeconfig_is_asked_for() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let absent = Path::new("/nonexistent/mesh-lab");
        let forced = Choice {
            lab: true,
            ..Choice::default()
        };
        assert!(choose_lab(&forced, absent));
        assert!(choose_lab(&Choice::default(), here));
        assert!(!choose_lab(&Choice::default(), absent));
        let kube = Choice {
            kubeconfig: Some("/k".into()),
            ..Choice::default()
        };
        assert!(!choose_lab(&kube, here));
        let context = Choice {
            context: Some("prod".into()),
            ..Choice::default()
        };
        assert!(!choose_lab(&context, here));
    }
}
