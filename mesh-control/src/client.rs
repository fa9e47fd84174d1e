//! A minimal node-side client of this server: obtain a node certificate with the node's bearer
//! credential, then open the mutual-TLS channel with it. For tools and tests (`watch-node`, the
//! controller's suites); the node daemon has its own client, which also renews (mesh-node
//! `control`).

use mesh_proto::ca::v1::{CreateNodeCertificateRequest, certificates_client::CertificatesClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a valid https:// address")]
    Address(String),
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("node certificate refused: {0}")]
    Refused(#[from] tonic::Status),
    #[error("generating the node key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("node name or credential is not a valid header value")]
    Header,
}

/// Where the server is and how to verify it.
#[derive(Clone, Debug)]
pub struct Server {
    /// `https://host:port`.
    pub address: String,
    /// One of the server certificate's names (`--tls-san`).
    pub name: String,
    /// The mesh root(s), PEM.
    pub roots_pem: String,
}

/// A node certificate (leaf PEM) and its key.
#[derive(Clone, Debug)]
pub struct NodeCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after_unix: i64,
    /// The mesh's trust bundle as the server sent it.
    pub trust_bundle_pem: Vec<String>,
}

impl Server {
    /// A channel that presents `cert` (mutual TLS), or none (only `CreateNodeCertificate` will
    /// answer it).
    pub async fn connect(&self, cert: Option<&NodeCertificate>) -> Result<Channel, Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.roots_pem)).domain_name(self.name.clone());
        if let Some(c) = cert {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        let failed = |source| Error::Connect { address: self.address.clone(), source };
        Channel::from_shared(self.address.clone())
            .map_err(|_| Error::Address(self.address.clone()))?
            .tls_config(tls)
            .map_err(failed)?
            .connect()
            .await
            .map_err(failed)
    }

    /// Obtains a node certificate for `node` with its credential (`ttl_seconds` 0: the server's
    /// default). The key is generated here and never sent.
    pub async fn node_certificate(&self, node: &str, credential: &str, ttl_seconds: i64) -> Result<NodeCertificate, Error> {
        let key = rcgen::KeyPair::generate()?;
        let csr_pem = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
        let mut req = tonic::Request::new(CreateNodeCertificateRequest { csr_pem, ttl_seconds });
        mesh_proto::authenticate_node(&mut req, node, credential).map_err(|_| Error::Header)?;
        let resp = CertificatesClient::new(self.connect(None).await?).create_node_certificate(req).await?.into_inner();
        Ok(NodeCertificate {
            cert_pem: resp.cert_chain_pem.first().cloned().unwrap_or_default(),
            key_pem: key.serialize_pem(),
            not_after_unix: resp.not_after_unix,
            trust_bundle_pem: resp.trust_bundle_pem,
        })
    }

    /// Both steps: a mutual-TLS channel as `node`.
    pub async fn connect_as(&self, node: &str, credential: &str) -> Result<Channel, Error> {
        let cert = self.node_certificate(node, credential, 0).await?;
        self.connect(Some(&cert)).await
    }
}
