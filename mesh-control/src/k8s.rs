//! Kubernetes mode: discovery with kube-rs reflectors (`discovery`), translation of built-in
//! objects (`translate`, sans-IO), policy and routing status writes (`status`, `route_status`),
//! node token review (`token`), the CA Secret (`ca_secret`), and the leader Lease (`lease`; the
//! decisions are `election`'s).

pub mod ca_secret;
pub mod discovery;
pub mod lease;
pub mod route_status;
pub mod status;
pub mod token;
pub mod translate;
