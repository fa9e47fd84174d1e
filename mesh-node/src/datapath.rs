//! The kernel datapath: loading, attaching, pinning, and feeding the `mesh-ebpf` programs.
//!
//! Only this module imports aya. Everything above it speaks domain types ([`ServiceSpec`],
//! [`PodSpec`], [`DenyRule`], ...); the kernel layouts come from `mesh-common`.

pub mod discover;
mod endpoints;
mod error;
mod loader;
mod pins;
mod ports;
mod services;
mod steering;
mod sys;
pub mod tables;

pub use endpoints::{DatapathStats, DenyRule, EndpointSpec, NodeSpec, PodSpec};
pub use error::Error;
pub use loader::{Datapath, DatapathConfig};
pub use pins::MapLayout;
pub use services::{BackendSpec, LoadBalancing, Protocol, ServiceSpec};
pub use steering::Steering;

/// The kernel object, embedded at build time (empty when `cargo xtask build-ebpf` was not run).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// The kernel object this binary loads (empty when it was built without one).
pub fn embedded_object() -> &'static [u8] {
    OBJECT
}
