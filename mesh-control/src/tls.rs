//! TLS of the gRPC server: TLS 1.3 with a serving certificate from the mesh root, and client
//! certificates verified against the mesh's trust bundle.
//!
//! A client certificate is *optional at the handshake* (`allow_unauthenticated`) for one
//! reason: a node that has none yet must reach `CreateNodeCertificate` to get one. Every other
//! RPC refuses a call without a verified node certificate (see `auth::NodeIds::verify`). A
//! certificate that is presented but does not verify (another root, expired, wrong usage) fails
//! the handshake.
//!
//! We run the handshakes ourselves rather than through tonic's `ServerTlsConfig` so that a
//! refused handshake is logged with the peer's address and the reason (tonic drops it silently),
//! and so the trust bundle can hold several roots while one is rotated.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use futures::Stream;
use rustls::{
    RootCertStore, ServerConfig,
    server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

/// A handshake that takes longer is abandoned (a client that connects and sends nothing must not
/// hold a task forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate PEM: {0}")]
    Pem(rustls_pki_types::pem::Error),
    #[error("trust bundle holds no usable root")]
    NoRoots,
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("server config: {0}")]
    Config(#[from] rustls::Error),
}

#[derive(Clone)]
pub struct Acceptor {
    inner: TlsAcceptor,
}

impl Acceptor {
    /// `chain_pem`: the serving certificate first; `trust_bundle`: every root whose node
    /// certificates are accepted.
    pub fn new(chain_pem: &[String], key_pem: &str, trust_bundle: &[String]) -> Result<Self, Error> {
        let certs = |pem: &str| CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(Error::Pem);
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(certs(pem)?);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(Error::Pem)?;
        let mut roots = RootCertStore::empty();
        for pem in trust_bundle {
            roots.add_parsable_certificates(certs(pem)?);
        }
        if roots.is_empty() {
            return Err(Error::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).allow_unauthenticated().build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { inner: TlsAcceptor::from(Arc::new(config)) })
    }

    /// The established TLS connections on `listener`, for `serve_with_incoming`. Each handshake
    /// runs in its own task, so a slow client holds up no other.
    pub fn incoming(self, listener: TcpListener) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accepting a control-plane connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break; // the server stopped
                }
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (self.inner.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(tls) = handshake(&acceptor, tcp, peer).await {
                        let _ = tx.send(Ok(tls)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::warn!(%peer, "control-plane TLS handshake refused: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, "control-plane TLS handshake timed out");
            None
        }
    }
}
