//! Types and pure logic shared by the kernel programs (`mesh-ebpf`) and userspace (`mesh-node`).
//!
//! Everything here is `#![no_std]`, `repr(C)` with explicit padding (the verifier rejects reads of
//! uninitialised padding, and userspace must see the exact kernel layout), and free of `bool`.
//! Decision logic lives in plain functions so host unit tests reach it; the kernel entry points
//! only read the context, call these, and write back.
#![no_std]

pub mod addr;
pub mod conn;
pub mod decide;
pub mod drop;
pub mod endpoint;
pub mod lb;
pub mod names;
pub mod service;

pub use addr::Addr;
pub use conn::{AffinityKey, AffinityValue, PolicyKey, PolicyValue, RevNatKey, SockAddr, SockKey};
pub use drop::{DropReason, Stat};
pub use endpoint::{BridgePort, DEFAULT_DAEMON_MARK, EndpointInfo, NodeConfig, PodInfo, TrustedSender};
pub use service::{Backend, BackendId, ServiceFlags, ServiceKey, ServiceValue, SlotKey};
