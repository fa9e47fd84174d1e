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
//!
//! Every call has a deadline and the connection is probed with HTTP/2 PINGs ([`Deadlines`]): a
//! controller whose host crashed or was cut off sends no FIN, and without them a node would wait
//! on it for the kernel's retransmission timeout (~15 min with data in flight) or, on an idle
//! config stream, forever — keeping an old config while the other replica has a newer one.

mod ca;
pub mod convert;
pub mod last_config;
mod node_cert;
mod store;
mod stream;

use std::{future::Future, path::PathBuf, time::Duration};

use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use ca::GrpcCa;
pub use node_cert::Renewer;
pub use stream::{ConfigClient, Metrics};

/// A TCP connect to the controller (see `Config::endpoint`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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
    pub deadlines: Deadlines,
}

/// How long the node waits on the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Deadlines {
    /// One call: a node certificate, a workload certificate, opening the config stream
    /// (`MESH_CONTROL_CALL_TIMEOUT_SECS`). An abandoned call is retried with backoff.
    pub call: Duration,
    /// An HTTP/2 PING this often on the connection, idle or not
    /// (`MESH_CONTROL_KEEPALIVE_SECS`)...
    pub keepalive_interval: Duration,
    /// ...and the connection is given up when one is not answered within this
    /// (`MESH_CONTROL_KEEPALIVE_TIMEOUT_SECS`): the stream reconnects, to another replica
    /// behind the Service if this one is gone.
    pub keepalive_timeout: Duration,
}

impl Default for Deadlines {
    /// A lost controller is noticed within 15 s; a certificate request waits 15 s at most.
    fn default() -> Self {
        Self { call: Duration::from_secs(15), keepalive_interval: Duration::from_secs(10), keepalive_timeout: Duration::from_secs(5) }
    }
}

/// `call` bounded by `limit`; an abandoned call is counted in `timeouts` and answered with
/// `DEADLINE_EXCEEDED` naming the setting.
async fn within<T>(limit: Duration, timeouts: &prometheus_client::metrics::counter::Counter, call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        timeouts.inc();
        Err(tonic::Status::deadline_exceeded(format!("no answer from the control plane within {limit:?} (MESH_CONTROL_CALL_TIMEOUT_SECS)")))
    })
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
            // TCP only (TLS is not included). Short: a controller replica that just went away
            // may still be behind the Service for some seconds (kube-proxy's rules trail the
            // EndpointSlice), and a SYN to its address is never answered; each attempt picks a
            // replica again. With 3 s, a node took 9 s to reach the other replica in the k8s
            // suite.
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(self.deadlines.keepalive_interval)
            .keep_alive_timeout(self.deadlines.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy())
    }
}

/// The current mutual-TLS channel to the controller (`None` until the first node certificate),
/// replaced by the [`Renewer`] after every renewal.
#[derive(Clone)]
pub struct Connection {
    channel: watch::Receiver<Option<Channel>>,
    deadlines: Deadlines,
    metrics: Metrics,
}

impl Connection {
    /// The connection and the task that keeps its node certificate current (spawn
    /// [`Renewer::run`]). Fails at once on an unreadable root or token file or a bad address.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<(Self, Renewer), Error> {
        config.endpoint(None)?;
        Config::read(&config.token_file)?;
        let (tx, rx) = watch::channel(None);
        Ok((Self { channel: rx, deadlines: config.deadlines, metrics: metrics.clone() }, Renewer::new(config.clone(), tx, metrics.clone())))
    }

    /// `call` under the call deadline ([`Deadlines::call`]).
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
        within(self.deadlines.call, &self.metrics.call_timeouts, call).await
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
