//! The proxies: outbound (captured connections of local pods → HBONE, same-node or
//! passthrough), inbound (HBONE on 15008 → local pod, after authorization), inbound plaintext
//! (non-HBONE traffic to local meshed pods, per `PeerAuthentication`), and the HBONE client pool.
//!
//! Each listener accepts with [`accept`] and classifies the connection; TCP ports are relayed
//! byte for byte ([`relay`]), HTTP ports go through the L7 stacks ([`l7`]). Authorization and
//! the connection to a local pod are shared by every path ([`authorize`]).

pub mod accept;
pub mod authorize;
pub mod hbone;
pub mod inbound;
pub mod inbound_plain;
pub mod l7;
pub mod metrics;
pub mod outbound;
pub mod pool;
mod relay;
pub mod socket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use metrics::Metrics;

use crate::{identity::CertStore, state::StateRx};

/// Ports as Istio ambient uses them, so operators find what they know.
pub const HBONE_PORT: u16 = 15008;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAIN_PORT: u16 = 15006;

/// Read buffer under TLS: rustls reads at most 4 KiB per call, so without it a 16 KiB record
/// costs four `recvfrom`s; with it one syscall fetches many records (measured in process:
/// 2.4 instead of 2.7-3.0 CPU-s per GB for the whole HBONE path).
pub const TLS_READ_BUF: usize = 64 << 10;

/// Where a server listens: a socket of its own, or one inherited from the daemon it replaces
/// (`crate::handoff`).
#[derive(Debug)]
pub enum Listen {
    Bind(SocketAddr),
    Inherited(std::net::TcpListener),
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Self::Bind(addr)
    }
}

impl Listen {
    /// The listening socket and its address (port 0 resolved).
    pub async fn open(self) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
        let listener = match self {
            Self::Bind(addr) => tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?,
            Self::Inherited(l) => {
                let addr = l.local_addr()?;
                l.set_nonblocking(true).map_err(|source| Error::Bind { addr, source })?;
                tokio::net::TcpListener::from_std(l).map_err(|source| Error::Bind { addr, source })?
            }
        };
        let addr = listener.local_addr()?;
        Ok((listener, addr))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    AdminToken(#[from] crate::admin::credential::Error),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::Error),
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("HBONE CONNECT refused with status {0}")]
    Status(http::StatusCode),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("timed out connecting to {0}")]
    ConnectTimeout(SocketAddr),
    #[error("TLS and HTTP/2 handshake with {peer} not done after {after:?} (MESH_HANDSHAKE_TIMEOUT_SECS)")]
    HandshakeTimeout { peer: SocketAddr, after: Duration },
    #[error("HBONE CONNECT to {peer} not answered after {after:?} (MESH_HANDSHAKE_TIMEOUT_SECS)")]
    ConnectUnanswered { peer: SocketAddr, after: Duration },
    #[error("source {0} is not a meshed workload of this node")]
    UnknownSource(std::net::IpAddr),
    #[error("connection to the proxy's own listener {0} (not redirected)")]
    SelfCall(SocketAddr),
    #[error("no local workload for the HBONE connection (SNI {sni:?}, address {addr})")]
    NoServerIdentity { sni: Option<String>, addr: SocketAddr },
    #[error("denied by authorization: {0}")]
    Denied(&'static str),
    #[error("plaintext refused by STRICT PeerAuthentication for {0}")]
    Strict(SocketAddr),
}

/// Tunables, from config (see `config.rs` for the variables).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub node_name: String,
    pub cluster_id: String,
    pub hbone_port: u16,
    /// HTTP/2 windows: one stream must fill a fast link, so both are far above HTTP/2's 64 KiB.
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams per pooled HBONE connection before another connection is opened.
    pub max_streams_per_conn: usize,
    /// Pooled connections with no stream for this long are closed.
    pub pool_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS and HTTP/2 handshakes of an HBONE connection, both directions, and the answer to an
    /// outbound CONNECT must come within this: a peer that stalls holds a task and a descriptor
    /// (and the client waiting on it) until then.
    pub handshake_timeout: Duration,
    /// A relayed TCP connection (not HTTP) that moves no byte either way for this long is
    /// closed, both ends; `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
    /// An HTTP/1.1 request's headers (HTTP ports) must be complete within this of their first
    /// byte, or the connection is closed (`mesh_l7::server::header_timeout`); `None`: never.
    pub http_header_timeout: Option<Duration>,
    /// Connections each proxy listener serves at once, in all and from one source address.
    pub connection_limits: accept::Limits,
    /// New HBONE connections (TLS handshakes) one source address may open: `None`, no bound.
    pub hbone_handshake_rate: Option<mesh_l7::per_source::Rate>,
    /// Connect to local pods from the client pod's IP (`IP_TRANSPARENT`); the daemon installs
    /// the policy routing that brings the pods' replies back to it (`crate::routing`).
    pub transparent: bool,
    /// Which address outbound HBONE connections dial.
    pub hbone_dial: HboneDial,
    /// The cluster's DNS domain, for Istio's `destination_service` label (`<svc>.<ns>.svc.<domain>`).
    pub cluster_domain: String,
    /// How often JWK sets from `jwksUri`s are fetched again (Istio's default: 20 minutes).
    pub jwks_refresh: Duration,
    /// `SO_MARK` bits on every connection the proxy makes: how the STRICT guard tells the
    /// daemon's connections to pods from other processes of the node.
    pub socket_mark: u32,
}

/// `per_second` new HBONE connections per source, with a burst of five seconds' worth: a node
/// whose pool opens connections to many new pods at once gets them, one source flooding the
/// listener with handshakes (each a key exchange and a signature) gets no more than this.
pub fn handshake_rate(per_second: u32) -> mesh_l7::per_source::Rate {
    mesh_l7::per_source::Rate { burst: per_second.saturating_mul(5), per_minute: per_second.saturating_mul(60) }
}

/// Where outbound HBONE connections are dialed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HboneDial {
    /// The destination pod's address on 15008, without SNI: what Istio's ztunnel dials and
    /// what its inbound requires (the CONNECT target must be the address dialed). One pooled
    /// connection per (source identity, destination identity, destination pod). The receiving
    /// node brings it to its daemon with policy routing (`crate::routing`).
    Pod,
    /// The destination node's address on 15008, with the destination identity as SNI: one
    /// pooled connection per (source identity, destination identity, node), fewer handshakes,
    /// but only this project's daemons accept it.
    Node,
}

impl std::str::FromStr for HboneDial {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pod" => Ok(Self::Pod),
            "node" => Ok(Self::Node),
            _ => Err("expected pod or node".into()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            cluster_id: "Kubernetes".into(),
            hbone_port: HBONE_PORT,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 256 << 10,
            max_streams_per_conn: 100,
            pool_idle_timeout: Duration::from_mins(1),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            tcp_idle_timeout: Some(Duration::from_hours(1)),
            http_header_timeout: mesh_l7::server::Config::default().request_header_timeout,
            connection_limits: accept::Limits { max: 50_000, per_source: 10_000, rate: None },
            hbone_handshake_rate: Some(handshake_rate(200)),
            transparent: false,
            hbone_dial: HboneDial::Pod,
            cluster_domain: "cluster.local".into(),
            jwks_refresh: Duration::from_mins(20),
            socket_mark: mesh_common::DEFAULT_DAEMON_MARK,
        }
    }
}

/// Data h2 may buffer per stream before `poll_capacity` makes the relay wait: a few frames, so
/// the connection task always has a full frame to write while the relay reads the next chunk.
pub(crate) fn send_buffer(cfg: &Config) -> usize {
    cfg.max_frame_size as usize * 4
}

/// What every proxy shares.
#[derive(Clone)]
pub struct Inputs {
    pub cfg: Arc<Config>,
    pub state: StateRx,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
}
