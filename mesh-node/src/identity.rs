//! Workload identities: SPIFFE ids, the CA client, and the store of this node's certificates
//! (issued on demand, rotated at half-life).
#![allow(
    clippy::result_large_err,
    reason = "rcgen and rustls errors are large; these paths run per certificate or handshake, not per byte"
)]

pub mod ca;
pub mod spiffe;
pub mod store;

pub use ca::{CaClient, TestCa, WorkloadCert};
pub use spiffe::Identity;
pub use store::{CertStore, Metrics as CertMetrics};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid SPIFFE id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("CA refused to sign for {identity}: {reason}")]
    Refused { identity: Identity, reason: String },
    #[error("reading {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path} has no PEM {what}")]
    Pem { path: std::path::PathBuf, what: &'static str },
    #[error("no certificate for {0} on this node")]
    NoCertificate(Identity),
    #[error("building TLS key for {identity}: {source}")]
    Key { identity: Identity, source: rustls::Error },
}
