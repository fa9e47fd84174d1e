//! Who is calling: every gRPC call carries `authorization: Bearer <credential>` and
//! `mesh-node-name: <node>`; the authenticator proves the credential belongs to that node.
//!
//! - File mode: `<token-dir>/<node>.token` holds the node's credential (the lab writes it).
//! - Kubernetes mode: the node daemon's pod-bound ServiceAccount token, checked with a
//!   TokenReview; the bound pod must run on the claimed node (see `k8s::token`).

use std::path::PathBuf;

use tonic::metadata::MetadataMap;

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
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingCredential => "missing_credential",
            Self::MissingNodeName => "missing_node_name",
            Self::UnknownNode { .. } => "unknown_node",
            Self::BadCredential { .. } => "bad_credential",
            Self::Kubernetes(_) => "token_review",
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
}
