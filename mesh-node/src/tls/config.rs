//! Server and client configs built from one workload certificate.

use std::sync::Arc;

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::CertificateDer;

use super::{ALPN_H2, Error, provider, verifier};
use crate::identity::Identity;

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    Ok(Arc::new(store))
}

/// Always presents the one certificate this config was built for.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The HBONE server config of one local workload: presents its certificate, requires a client
/// certificate from the mesh's trust domain.
pub fn server_config(
    key: Arc<CertifiedKey>,
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier = verifier::ClientTrustDomain::new(root_store(roots)?, trust_domain, provider.clone())?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(Fixed(key)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // One connection carries many streams for a long time; tickets buy nothing.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The HBONE client config of one (source workload, expected destination identity) pair.
pub fn client_config(
    key: Arc<CertifiedKey>,
    roots: &[CertificateDer<'static>],
    expected: Identity,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = verifier::ServerIdentity::new(root_store(roots)?, expected, provider.clone());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Fixed(key)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}
