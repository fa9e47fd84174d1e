//! The network-namespace lab: nodes and pods as network namespaces with their own cgroups,
//! wired like a small cluster, with no route out of the machine.
//!
//! Addressing (one documented test range, RFC 2544's benchmarking block 198.18.0.0/15):
//! - underlay between nodes: `198.18.0.<node>/24` on each node's `eth0`, joined by a bridge in
//!   the namespace `mesh-<run>-ul`;
//! - pods of node `n`: `198.18.<n>.<10+pod>/24` behind the node's bridge `br0` (`198.18.<n>.1`);
//! - Service VIPs: `198.19.0.0/16`, for which no namespace has a route: a VIP the datapath fails
//!   to rewrite ends in "network unreachable" inside the namespace, never on a real network.
//! - IPv6 (ULA `fd6d:6573:6800::/48`): underlay `::<node>`, pods `:<node>::<10+pod>`, node
//!   bridge `:<node>::1`; VIPs `fd6d:6573:68ff::/64`, outside the /48 and so unroutable too.
//!
//! No namespace has a default route. Everything created carries the prefix `mesh-` and the run
//! id, and is removed on drop (also while a test panics) and by [`clean::clean_all`].

pub mod capture;
pub mod clean;
pub mod cluster;
pub mod image;
pub mod k8s;
pub mod lab;
pub mod sys;
pub mod tools;
pub mod whoami;
pub mod ztunnel;

pub use lab::{Lab, LabSpec, Node, Pod, PodProcess, Spawn};
pub use sys::{Error, require_root};
