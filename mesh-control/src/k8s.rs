//! Kubernetes mode: discovery with kube-rs reflectors (`discovery`), translation of built-in
//! objects (`translate`, sans-IO), policy and routing status writes (`status`, `route_status`),
//! node token review (`token`),
//! and the CA Secret (`ca_secret`).

pub mod ca_secret;
pub mod discovery;
pub mod route_status;
pub mod status;
pub mod token;
pub mod translate;
