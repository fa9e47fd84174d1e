//! The node's side of the control plane (`mesh-proto`): the node certificate (`node_cert`), the
//! config stream that keeps this node's [`State`](crate::state::State) current, and the CA that
//! signs its workloads' certificates. Protobuf types stop here: `convert` turns them into the
//! daemon's domain types.
//!
//! The node first obtains a node certificate with its credential (`authorization: Bearer ...`,
//! `mesh-node-name`) over TLS verified against the mesh root; the config stream and workload
//! CSRs then run over mutual TLS with that certificate, as `mesh.ca.v1` documents. The
//! certificate is renewed at half-life; each renewal publishes a new channel, and the stream
//! moves to it (one reconnect).

mod ca;
pub mod convert;
pub mod last_config;
mod node_cert;
mod store;
mod stream;

use std::{path::PathBuf, time::Duration};

use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use ca::GrpcCa;
pub use node_cert::Renewer;
pub use stream::{ConfigClient, Metrics};

/// How long a workload certificate request waits for the first node certificate before it fails
/// (and the certificate store retries with backoff).
const FIRST_CERT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control plane address {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("control plane call: {0}")]
    Status(#[from] tonic::Status),
    #[error("invalid config from the control plane: {0}")]
    Invalid(String),
    #[error("node credential or name is not a valid header value")]
    Credential,
    #[error("node key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("no node certificate yet (the control plane has not issued one)")]
    NoNodeCertificate,
}

/// Where the control plane is and how this node proves who it is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// `https://host:port` of mesh-control's gRPC server.
    pub address: String,
    /// Name the server's certificate is checked against.
    pub server_name: String,
    /// The mesh root(s) (PEM) that issued the server's certificate. Read again at every node
    /// certificate renewal, so a root rotation reaches a running node.
    pub root_cert: PathBuf,
    /// File holding this node's credential (file mode: `<node>.token`; Kubernetes: the
    /// projected `ServiceAccount` token, which the kubelet rotates: read at every renewal).
    #[serde(skip)]
    pub token_file: PathBuf,
    pub node_name: String,
    /// Requested node certificate lifetime (zero: the controller's default).
    pub node_cert_ttl: Duration,
    /// Where the last applied config is kept (`last_config`), to enforce it at once after a
    /// restart, before (or without) the control plane.
    pub last_config: Option<PathBuf>,
}

impl Config {
    fn read(path: &PathBuf) -> Result<String, Error> {
        std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })
    }

    /// A lazily connecting channel to the controller, verified against the roots in
    /// `root_cert`, presenting `identity` (mutual TLS) if given.
    fn endpoint(&self, identity: Option<tonic::transport::Identity>) -> Result<Channel, Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(Self::read(&self.root_cert)?)).domain_name(self.server_name.clone());
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        let address_error = |source| Error::Address { address: self.address.clone(), source };
        Ok(Endpoint::from_shared(self.address.clone())
            .map_err(address_error)?
            .tls_config(tls)
            .map_err(address_error)?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect_lazy())
    }
}

/// The current mutual-TLS channel to the controller (`None` until the first node certificate),
/// replaced by the [`Renewer`] after every renewal.
#[derive(Clone)]
pub struct Connection {
    channel: watch::Receiver<Option<Channel>>,
}

impl Connection {
    /// The connection and the task that keeps its node certificate current (spawn
    /// [`Renewer::run`]). Fails at once on an unreadable root or token file or a bad address.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<(Self, Renewer), Error> {
        config.endpoint(None)?;
        Config::read(&config.token_file)?;
        let (tx, rx) = watch::channel(None);
        Ok((Self { channel: rx }, Renewer::new(config.clone(), tx, metrics.clone())))
    }

    /// The current channel, waiting up to `wait` for the first one.
    async fn current(&self, wait: Duration) -> Result<Channel, Error> {
        let mut rx = self.channel.clone();
        let ready = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(ch)) => (*ch).clone().ok_or(Error::NoNodeCertificate),
            _ => Err(Error::NoNodeCertificate),
        }
    }
}
