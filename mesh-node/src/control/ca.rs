//! [`CaClient`] over `mesh.ca.v1.Certificates`: the node sends a CSR (its private key never
//! leaves the node) over mutual TLS with its node certificate and gets the chain for exactly the
//! identity it asked for, plus the roots the mesh trusts (more than one during a root rotation).

use std::time::{Duration, SystemTime};

use mesh_proto::ca::v1::{CreateCertificateRequest, certificates_client::CertificatesClient};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use super::{Connection, FIRST_CERT_WAIT};
use crate::identity::{
    self, CaClient, Identity, WorkloadCert,
    ca::{SignFuture, pem_certs},
};

pub struct GrpcCa {
    connection: Connection,
    /// Requested lifetime (0: the controller's default).
    ttl: Duration,
}

impl GrpcCa {
    pub fn new(connection: Connection, ttl: Duration) -> Self {
        Self { connection, ttl }
    }

    async fn sign_remote(&self, identity: &Identity, csr: CertificateSigningRequestDer<'static>) -> Result<WorkloadCert, identity::Error> {
        let refused = |reason: String| identity::Error::Refused { identity: identity.clone(), reason };
        let csr_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr.as_ref().to_vec()));
        let message = CreateCertificateRequest {
            csr_pem,
            identity: identity.to_string(),
            ttl_seconds: i64::try_from(self.ttl.as_secs()).unwrap_or(0),
        };
        let channel = self.connection.current(FIRST_CERT_WAIT).await.map_err(|e| refused(e.to_string()))?;
        let mut client = CertificatesClient::new(channel);
        let response = self
            .connection
            .bounded(client.create_certificate(message))
            .await
            .map_err(|s| refused(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        let mut chain: Vec<CertificateDer<'static>> = response.cert_chain_pem.iter().flat_map(|p| pem_certs(p)).collect();
        if chain.is_empty() {
            return Err(refused("empty certificate chain".into()));
        }
        // The last certificate is the mesh root: trust anchor, not part of the presented chain.
        let root = if chain.len() > 1 { chain.pop() } else { None };
        // Peers are verified against the whole trust bundle; a controller that sends none
        // trusts only the issuing root.
        let bundle: Vec<CertificateDer<'static>> = response.trust_bundle_pem.iter().flat_map(|p| pem_certs(p)).collect();
        let roots = if bundle.is_empty() { root.into_iter().collect() } else { bundle };
        let (not_before, serial) = leaf_facts(&chain[0]).ok_or_else(|| refused("unparsable leaf certificate".into()))?;
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(response.not_after_unix).unwrap_or(0));
        Ok(WorkloadCert { chain, roots, not_before, not_after, serial })
    }
}

fn leaf_facts(der: &CertificateDer<'_>) -> Option<(SystemTime, u64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let nb = u64::try_from(cert.validity().not_before.timestamp()).ok()?;
    let serial = cert.tbs_certificate.serial.iter_u64_digits().next().unwrap_or(0);
    Some((SystemTime::UNIX_EPOCH + Duration::from_secs(nb), serial))
}

impl CaClient for GrpcCa {
    fn sign<'a>(&'a self, identity: &'a Identity, csr: CertificateSigningRequestDer<'static>) -> SignFuture<'a> {
        Box::pin(self.sign_remote(identity, csr))
    }
}
