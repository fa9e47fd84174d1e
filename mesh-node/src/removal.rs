//! Is the daemon stopping for good? A DaemonSet pod gets SIGTERM both in a rolling update (a new
//! daemon follows at once and must find the pinned datapath and the routing rules, so nothing
//! fails open in between) and when the mesh is uninstalled (nothing follows, and the node must be
//! left as it was found). Only the API server knows which: after draining, the daemon asks it
//! about its own DaemonSet and namespace, with its pod-bound ServiceAccount token (the one it
//! already holds for the controller), and uninstalls (`mesh-node --uninstall`) when
//!
//! - the DaemonSet is gone or being deleted (Helm uninstall, `kubectl delete`), or
//! - the namespace is gone or terminating (`kubectl delete namespace`), or
//! - the API server now refuses the daemon (401/403) although it answered at start: the RBAC that
//!   let it ask was deleted with the mesh (`kubectl delete -f deploy/` deletes the ClusterRole
//!   before the DaemonSet's pods stop).
//!
//! Anything else (the API server unreachable, an unexpected answer) keeps the datapath: state
//! left behind is removed by hand with `mesh-node --uninstall`; removing it during an upgrade
//! would drop capture and STRICT until the next daemon starts.

use std::{path::PathBuf, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub namespace: String,
    pub daemonset: String,
    /// `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT` (set by the kubelet in every container).
    pub api: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("connecting to the API server {api}: {source}")]
    Connect { api: String, source: std::io::Error },
    #[error("HTTP to the API server: {0}")]
    Http(#[from] hyper::Error),
    #[error("GET {path}: timed out")]
    Timeout { path: String },
}

/// What the API server said about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Present { deleting: bool },
    Gone,
    Refused(u16),
    Other(String),
}

/// The decision, with the reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Removed(&'static str),
    Staying,
    Unknown(String),
}

/// The rule above, sans-IO. `answered_at_start`: the same questions succeeded when the daemon
/// started (so a refusal now means the permissions were deleted, not that they never existed).
pub fn decide(answered_at_start: bool, daemonset: &Seen, namespace: &Seen) -> Verdict {
    match (daemonset, namespace) {
        (Seen::Gone | Seen::Present { deleting: true }, _) => Verdict::Removed("the DaemonSet is deleted"),
        (_, Seen::Gone | Seen::Present { deleting: true }) => Verdict::Removed("the namespace is deleted"),
        (Seen::Refused(_), _) | (_, Seen::Refused(_)) if answered_at_start => Verdict::Removed("the API server now refuses this daemon: its RBAC was deleted with the mesh"),
        (Seen::Present { deleting: false }, Seen::Present { deleting: false }) => Verdict::Staying,
        (d, n) => Verdict::Unknown(format!("DaemonSet: {d:?}, namespace: {n:?}")),
    }
}

pub struct Checker {
    config: Config,
    tls: tokio_rustls::TlsConnector,
}

impl Checker {
    pub fn new(config: Config) -> Result<Self, Error> {
        let pem = std::fs::read(&config.ca_file).map_err(|source| Error::Read { path: config.ca_file.clone(), source })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(Error::NoCertificate { path: config.ca_file.clone() });
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { config, tls: tokio_rustls::TlsConnector::from(Arc::new(tls)) })
    }

    /// Asks about the DaemonSet and the namespace.
    pub async fn look(&self) -> (Seen, Seen) {
        let c = &self.config;
        let ds = self.seen(&format!("/apis/apps/v1/namespaces/{}/daemonsets/{}", c.namespace, c.daemonset)).await;
        let ns = self.seen(&format!("/api/v1/namespaces/{}", c.namespace)).await;
        (ds, ns)
    }

    async fn seen(&self, path: &str) -> Seen {
        match tokio::time::timeout(Duration::from_secs(5), self.get(path)).await {
            Err(_) => Seen::Other(Error::Timeout { path: path.into() }.to_string()),
            Ok(Err(e)) => Seen::Other(e.to_string()),
            Ok(Ok((404, _))) => Seen::Gone,
            Ok(Ok((code @ (401 | 403), _))) => Seen::Refused(code),
            Ok(Ok((200, body))) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => Seen::Present {
                    deleting: !v["metadata"]["deletionTimestamp"].is_null() || v["status"]["phase"] == "Terminating",
                },
                Err(e) => Seen::Other(format!("unreadable answer to GET {path}: {e}")),
            },
            Ok(Ok((code, _))) => Seen::Other(format!("GET {path}: HTTP {code}")),
        }
    }

    async fn get(&self, path: &str) -> Result<(u16, Bytes), Error> {
        let c = &self.config;
        let token = std::fs::read_to_string(&c.token_file).map_err(|source| Error::Read { path: c.token_file.clone(), source })?;
        let connect = |source| Error::Connect { api: c.api.clone(), source };
        let tcp = tokio::net::TcpStream::connect(&c.api).await.map_err(connect)?;
        let host = c.api.rsplit_once(':').map_or(c.api.as_str(), |(h, _)| h).trim_matches(['[', ']']);
        let name = ServerName::try_from(host.to_owned()).map_err(|e| connect(std::io::Error::other(e.to_string())))?;
        let tls = self.tls.connect(name, tcp).await.map_err(connect)?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, &c.api)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: Seen = Seen::Present { deleting: false };

    #[test]
    fn removal_needs_the_api_to_say_so() {
        assert_eq!(decide(true, &HERE, &HERE), Verdict::Staying, "a rolling update keeps the datapath");
        assert!(matches!(decide(true, &Seen::Gone, &HERE), Verdict::Removed(_)));
        assert!(matches!(decide(false, &Seen::Present { deleting: true }, &HERE), Verdict::Removed(_)));
        assert!(matches!(decide(true, &HERE, &Seen::Present { deleting: true }), Verdict::Removed(_)));
        assert!(matches!(decide(true, &Seen::Refused(403), &Seen::Refused(403)), Verdict::Removed(_)), "RBAC deleted with the mesh");
        assert!(matches!(decide(false, &Seen::Refused(403), &HERE), Verdict::Unknown(_)), "never allowed: no conclusion");
        assert!(matches!(decide(true, &Seen::Other("timeout".into()), &HERE), Verdict::Unknown(_)), "unreachable: keep");
    }
}
