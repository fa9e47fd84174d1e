//! meshctl, the mesh's command-line tool (as `istioctl` is Istio's). The library holds what is
//! tested without a mesh: reaching endpoints ([`target`], [`http`]), decoding what they answer
//! ([`status`], [`dump`], [`metrics`], [`explain`], [`bpf`]) and rendering it ([`output`],
//! [`config`]). `main.rs` wires the verbs.

pub mod bpf;
pub mod config;
pub mod dump;
pub mod explain;
pub mod http;
pub mod metrics;
pub mod output;
pub mod status;
pub mod target;
pub mod time;
