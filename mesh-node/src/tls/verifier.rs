//! Certificate verifiers: `WebPKI` chain validation to the mesh roots, then SPIFFE checks instead of
//! DNS names (a workload certificate names an identity, not a host).

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls13_signature},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{Error, identity_of};
use crate::identity::Identity;

fn other(e: impl std::fmt::Display) -> TlsError {
    TlsError::General(e.to_string())
}

/// Client side: the server must chain to a mesh root and present exactly the identity we expect
/// for the destination (the server name is ignored; it is only a certificate selector).
#[derive(Debug)]
pub struct ServerIdentity {
    roots: Arc<RootCertStore>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl ServerIdentity {
    pub fn new(roots: Arc<RootCertStore>, expected: Identity, provider: Arc<CryptoProvider>) -> Self {
        Self { roots, expected, provider }
    }
}

impl ServerCertVerifier for ServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = identity_of(end_entity).map_err(other)?;
        if got != self.expected {
            return Err(other(format!("server identity {got} is not the expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // Only TLS 1.3 is configured; a 1.2 handshake never gets here.
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server side: `WebPKI` client-certificate validation (mandatory client auth), then the client's
/// SPIFFE id must belong to our trust domain. Which principals may connect is authorization's job.
#[derive(Debug)]
pub struct ClientTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientTrustDomain {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: &str, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Self { inner, trust_domain: trust_domain.to_owned() })
    }
}

impl ClientCertVerifier for ClientTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_of(end_entity).map_err(other)?;
        if id.trust_domain != self.trust_domain {
            return Err(other(format!("client {id} is outside trust domain {}", self.trust_domain)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
