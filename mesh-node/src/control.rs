//! The node's side of the control plane (`mesh-proto`): the config stream that keeps this
//! node's [`State`](crate::state::State) current, and the CA that signs its workloads'
//! certificates. Protobuf types stop here: `convert` turns them into the daemon's domain types.
//!
//! Both calls run over one TLS channel verified against the mesh root and carry the node's
//! credential (`authorization: Bearer ...`, `mesh-node-name`), as `mesh.ca.v1` documents.

mod ca;
pub mod convert;
mod stream;

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

pub use ca::GrpcCa;
pub use stream::{ConfigClient, Metrics};

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
    #[error("node credential is not a valid header value")]
    Credential,
}

/// Where the control plane is and how this node proves who it is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// `https://host:port` of mesh-control's gRPC server.
    pub address: String,
    /// Name the server's certificate is checked against.
    pub server_name: String,
    /// The mesh root (PEM) that issued the server's certificate.
    pub root_cert: PathBuf,
    /// File holding this node's credential (file mode: `<node>.token`; Kubernetes: the
    /// projected ServiceAccount token).
    #[serde(skip)]
    pub token_file: PathBuf,
    pub node_name: String,
}

/// A connected-lazily channel plus the credential every call carries.
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    token: String,
    node: String,
}

impl Connection {
    /// Prepares the channel (connects on first use, reconnects by itself).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let read = |path: &PathBuf| std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source });
        let root = read(&config.root_cert)?;
        let token = read(&config.token_file)?.trim().to_owned();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name(config.server_name.clone());
        let address_error = |source| Error::Address { address: config.address.clone(), source };
        let channel = Endpoint::from_shared(config.address.clone())
            .map_err(address_error)?
            .tls_config(tls)
            .map_err(address_error)?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self { channel, token, node: config.node_name.clone() })
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut req = tonic::Request::new(message);
        let bearer = MetadataValue::try_from(format!("Bearer {}", self.token)).map_err(|_| Error::Credential)?;
        let node = MetadataValue::try_from(self.node.as_str()).map_err(|_| Error::Credential)?;
        req.metadata_mut().insert("authorization", bearer);
        req.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, node);
        Ok(req)
    }
}
