//! rustls configuration for the mesh: TLS 1.3 only, AEAD suites with AES-128-GCM first, peers
//! verified against the mesh roots, and SPIFFE URI SANs as identities.
#![allow(
    clippy::result_large_err,
    reason = "rcgen and rustls errors are large; these paths run per certificate or handshake, not per byte"
)]

pub mod config;
pub mod verifier;

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, ring};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

pub use config::{client_config, server_config};

use crate::identity::Identity;

/// The ALPN both sides offer: HBONE is HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate does not parse: {0}")]
    Parse(String),
    #[error("peer certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("peer certificate: {0}")]
    Identity(#[from] crate::identity::Error),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// ring provider with the suite order we want: AES-128-GCM first (fastest with AES-NI; both ends
/// must prefer it for it to be chosen), then AES-256-GCM and ChaCha20-Poly1305. All TLS 1.3.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The SPIFFE identity in the first URI SAN of a leaf certificate.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Result<Identity, Error> {
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| Error::Parse(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| Error::Parse(e.to_string()))?.ok_or(Error::NoSpiffeId)?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(crate::identity::spiffe::SCHEME) => Some(*u),
            _ => None,
        })
        .ok_or(Error::NoSpiffeId)?;
    Ok(uri.parse()?)
}

/// The identity of the peer of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, Error> {
    identity_of(certs.and_then(<[_]>::first).ok_or(Error::NoPeerCertificate)?)
}
