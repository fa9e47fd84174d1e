//! Who is calling. Two proofs, for two kinds of calls (see `mesh/ca/v1/ca.proto`):
//!
//! - **Bearer credential** (`Authenticator`), only to obtain a node certificate: the call carries
//!   `authorization: Bearer <credential>` and `mesh-node-name: <node>`, and the credential must
//!   belong to that node. File mode: `<token-dir>/<node>.token` holds it (the lab writes it).
//!   Kubernetes mode: the node daemon's pod-bound ServiceAccount token, checked with a
//!   TokenReview; the bound pod must run on the claimed node (see `k8s::token`).
//! - **Node certificate** (`NodeIds::verify`), for everything else: the TLS layer has verified
//!   the client certificate against the mesh roots; its URI SAN names the node. Metadata is not
//!   consulted, so a node cannot claim another one's name.

use std::{path::PathBuf, time::SystemTime};

use rustls_pki_types::CertificateDer;
use tonic::metadata::MetadataMap;
use x509_parser::extensions::GeneralName;

use crate::k8s;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no `authorization: Bearer <credential>` metadata")]
    MissingCredential,
    #[error("no valid `{}` metadata", mesh_proto::NODE_NAME_HEADER)]
    MissingNodeName,
    #[error("no credential is registered for node {node:?}")]
    UnknownNode { node: String },
    #[error("wrong credential for node {node:?}")]
    BadCredential { node: String },
    #[error("token rejected: {0}")]
    Kubernetes(#[from] k8s::token::Error),
    #[error("no client certificate: call CreateNodeCertificate first and connect with the node certificate")]
    NoClientCertificate,
    #[error("client certificate is not a node certificate of this mesh ({0})")]
    NotNodeCertificate(String),
    #[error("node certificate of {node:?} has expired")]
    Expired { node: String },
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingCredential => "missing_credential",
            Self::MissingNodeName => "missing_node_name",
            Self::UnknownNode { .. } => "unknown_node",
            Self::BadCredential { .. } => "bad_credential",
            Self::Kubernetes(_) => "token_review",
            Self::NoClientCertificate => "no_client_certificate",
            Self::NotNodeCertificate(_) => "not_node_certificate",
            Self::Expired { .. } => "expired_node_certificate",
        }
    }
}

pub enum Authenticator {
    /// File mode: one token file per node.
    Files { dir: PathBuf },
    Kubernetes(k8s::token::Reviewer),
}

impl Authenticator {
    /// The authenticated node name.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Error> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::MissingCredential)?;
        let node = metadata
            .get(mesh_proto::NODE_NAME_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|n| valid_node_name(n))
            .ok_or(Error::MissingNodeName)?
            .to_owned();
        match self {
            Self::Files { dir } => {
                let expected = std::fs::read_to_string(dir.join(format!("{node}.token")))
                    .map_err(|_| Error::UnknownNode { node: node.clone() })?;
                if constant_time_eq(expected.trim().as_bytes(), token.as_bytes()) {
                    Ok(node)
                } else {
                    Err(Error::BadCredential { node })
                }
            }
            Self::Kubernetes(reviewer) => {
                reviewer.check(token, &node).await?;
                Ok(node)
            }
        }
    }
}

/// The SPIFFE ids of node certificates:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>/node/<node>`, where namespace and
/// service account are the node DaemonSet's (`mesh-system`, `mesh-node`). The `/node/<name>`
/// suffix keeps them apart from workload ids, which the node daemons reject as peers.
#[derive(Clone, Debug)]
pub struct NodeIds {
    prefix: String,
}

/// A node proven by its certificate.
#[derive(Clone, Debug)]
pub struct VerifiedNode {
    pub name: String,
    pub not_after: SystemTime,
}

impl NodeIds {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self { prefix: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}/node/") }
    }

    /// The id of `node`.
    pub fn uri(&self, node: &str) -> String {
        format!("{}{node}", self.prefix)
    }

    /// The node named by a certificate chain the TLS layer verified (`None`: the client sent
    /// none). Refuses a leaf that is not exactly one of our node ids, or that expired while its
    /// connection stayed open.
    pub fn verify(&self, peer: Option<&[CertificateDer<'static>]>, now: SystemTime) -> Result<VerifiedNode, Error> {
        let leaf = peer.and_then(<[_]>::first).ok_or(Error::NoClientCertificate)?;
        let not_node = |why: &str| Error::NotNodeCertificate(why.to_owned());
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| not_node("unparsable"))?;
        let sans = cert.subject_alternative_name().map_err(|_| not_node("bad SAN extension"))?.ok_or_else(|| not_node("no SAN"))?;
        let [GeneralName::URI(uri)] = sans.value.general_names.as_slice() else {
            return Err(not_node("not exactly one URI SAN"));
        };
        let name = uri.strip_prefix(self.prefix.as_str()).filter(|n| valid_node_name(n)).ok_or_else(|| Error::NotNodeCertificate((*uri).to_owned()))?;
        let not_after = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
        if now > not_after {
            return Err(Error::Expired { node: name.to_owned() });
        }
        Ok(VerifiedNode { name: name.to_owned(), not_after })
    }
}

/// A node name is a DNS subdomain: it also keeps token-file paths inside the token folder.
fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with(['.', '-'])
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn meta(token: Option<&str>, node: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", MetadataValue::try_from(format!("Bearer {t}")).expect("ascii"));
        }
        if let Some(n) = node {
            m.insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::try_from(n).expect("ascii"));
        }
        m
    }

    #[tokio::test]
    async fn file_tokens_authenticate_only_their_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("n1.token"), "secret-1\n").expect("write");
        std::fs::write(dir.path().join("n2.token"), "secret-2").expect("write");
        let auth = Authenticator::Files { dir: dir.path().to_path_buf() };
        assert_eq!(auth.authenticate(&meta(Some("secret-1"), Some("n1"))).await.expect("n1 ok"), "n1");
        assert_eq!(auth.authenticate(&meta(Some("secret-2"), Some("n2"))).await.expect("n2 ok"), "n2");
        let err = auth.authenticate(&meta(Some("secret-1"), Some("n2"))).await.expect_err("n1's token for n2");
        assert!(matches!(err, Error::BadCredential { .. }), "{err}");
        let err = auth.authenticate(&meta(Some("x"), Some("n3"))).await.expect_err("unknown node");
        assert!(matches!(err, Error::UnknownNode { .. }), "{err}");
        let err = auth.authenticate(&meta(None, Some("n1"))).await.expect_err("no token");
        assert!(matches!(err, Error::MissingCredential), "{err}");
        let err = auth.authenticate(&meta(Some("secret-1"), Some("../n1"))).await.expect_err("path escape");
        assert!(matches!(err, Error::MissingNodeName), "{err}");
    }

    #[test]
    fn node_certificates_name_exactly_one_node() {
        let ca = crate::ca::Ca::generate("cluster.local").expect("root");
        let ids = NodeIds::new("cluster.local", "mesh-system", "mesh-node");
        assert_eq!(ids.uri("n1"), "spiffe://cluster.local/ns/mesh-system/sa/mesh-node/node/n1");
        let csr = rcgen::CertificateParams::default().serialize_request(&rcgen::KeyPair::generate().expect("key")).expect("csr").pem().expect("pem");
        let der = |text: &str| vec![CertificateDer::from(pem::parse(text).expect("pem").into_contents())];
        let now = SystemTime::now();

        let n1 = ca.sign_node(&csr, &ids.uri("n1"), std::time::Duration::from_mins(1)).expect("signed");
        assert_eq!(ids.verify(Some(der(&n1.chain[0]).as_slice()), now).expect("node cert").name, "n1");
        let e = ids.verify(Some(der(&n1.chain[0]).as_slice()), now + std::time::Duration::from_mins(2)).expect_err("expired");
        assert!(matches!(e, Error::Expired { .. }), "{e}");
        assert!(matches!(ids.verify(None, now), Err(Error::NoClientCertificate)));
        // A workload certificate of the same root, another trust domain's node id and a name
        // with a path in it are not node certificates.
        for uri in ["spiffe://cluster.local/ns/mesh-system/sa/mesh-node", "spiffe://evil.org/ns/mesh-system/sa/mesh-node/node/n1", "spiffe://cluster.local/ns/mesh-system/sa/mesh-node/node/n1/x"] {
            let cert = ca.sign_node(&csr, uri, std::time::Duration::from_mins(1)).expect("signed");
            let e = ids.verify(Some(der(&cert.chain[0]).as_slice()), now).expect_err(uri);
            assert!(matches!(e, Error::NotNodeCertificate(_)), "{uri}: {e}");
        }
    }
}
