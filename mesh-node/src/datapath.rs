//! The kernel datapath: loading, attaching, pinning, and feeding the `mesh-ebpf` programs.
//!
//! Only this module imports aya. Everything above it speaks domain types
//! ([`ServiceSpec`], [`BackendSpec`]); the kernel layouts come from `mesh-common`.

mod error;
mod loader;
mod services;

pub use error::Error;
pub use loader::{Datapath, DatapathConfig};
pub use services::{BackendSpec, Protocol, ServiceSpec};

/// The kernel object, embedded at build time (empty when `cargo xtask build-ebpf` was not run).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));
