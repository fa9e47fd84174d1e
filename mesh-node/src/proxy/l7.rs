//! HTTP in the node daemon (L7): where a Service port is HTTP (`mesh_l7::AppProtocol`), the source
//! node serves the client's connection with the outbound stack (routes, filters, splits,
//! per-request endpoint picks, client-side metrics; [`outbound`]) and speaks HTTP to each
//! endpoint through pooled HBONE streams; the destination node parses the requests inside the
//! HBONE stream (or a plaintext connection) for per-request authorization and server-side
//! metrics before they reach the pod ([`inbound`]). Same-node requests take both.
//!
//! The request logic lives in `mesh_l7`; this module plugs in sockets, identities, HBONE, the
//! node's state and its endpoint picker.

mod destination;
pub mod inbound;
pub mod outbound;
mod tunnel;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
pub use tunnel::TunnelIo;

use super::{Inputs, pool::Pool as HbonePool};
use crate::balance::cluster::Clusters;

/// What the HTTP paths share across connections.
pub struct Shared {
    /// For connections from pods (outbound, plaintext inbound).
    pub server: mesh_l7::server::Config,
    /// For HTTP inside HBONE streams from other nodes' daemons: their pools close idle
    /// connections themselves, a server-side idle close would race their next request.
    pub tunnel_server: mesh_l7::server::Config,
    /// Outbound: connections per (client, endpoint), over HBONE or plain TCP.
    pub upstreams: mesh_l7::client::Pool<outbound::Connector>,
    /// To local pods (inbound and same-node), per (source address, pod).
    pub pods: mesh_l7::client::Pool<inbound::PodConnector>,
    /// Retry budgets per Service, shared by every client connection of this daemon.
    pub retry_budgets: Arc<mesh_l7::layer::retry::Budgets>,
    /// Per Service (or subset): balancing state, circuit breaker, outlier detection.
    pub clusters: Arc<Clusters>,
    /// Local rate limits' token buckets, per limited pod (and key).
    pub rate_limits: Arc<mesh_l7::layer::rate_limit::Buckets>,
    /// JWK sets fetched for RequestAuthentications.
    pub jwks: Arc<crate::authn::JwksCache>,
    /// Tracers per connection and the span exporters (Telemetry).
    pub tracers: Arc<crate::telemetry::tracers::Tracers>,
}

impl Shared {
    pub fn new(inputs: &Inputs, hbone: Arc<HbonePool>, clusters: Arc<Clusters>, jwks: Arc<crate::authn::JwksCache>, tracers: Arc<crate::telemetry::tracers::Tracers>) -> Arc<Self> {
        let client = mesh_l7::client::Config::default();
        Arc::new(Self {
            server: mesh_l7::server::Config { request_header_timeout: inputs.cfg.http_header_timeout, ..mesh_l7::server::Config::default() },
            tunnel_server: mesh_l7::server::Config { header_read_timeout: None, request_header_timeout: inputs.cfg.http_header_timeout, ..mesh_l7::server::Config::default() },
            upstreams: mesh_l7::client::Pool::new(outbound::Connector::new(inputs.clone(), hbone), client.clone()),
            pods: mesh_l7::client::Pool::new(inbound::PodConnector { connect_timeout: inputs.cfg.connect_timeout, mark: inputs.cfg.socket_mark }, client),
            retry_budgets: Arc::default(),
            clusters,
            rate_limits: Arc::default(),
            jwks,
            tracers,
        })
    }

    /// Closes idle upstream connections past their idle timeout, until `stop`.
    pub async fn run_reaper(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.upstreams.reap();
                    self.pods.reap();
                }
                () = &mut stop => return,
            }
        }
    }
}

/// Bytes read from and written to a connection served as HTTP, for the TCP metrics every
/// connection gets (as ztunnel reports them under a waypoint's request metrics).
#[derive(Clone, Default)]
pub struct Counts {
    pub read: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

impl Counts {
    pub fn get(&self) -> (u64, u64) {
        (self.read.load(Ordering::Relaxed), self.written.load(Ordering::Relaxed))
    }
}

/// `io`, counting its bytes into `counts`.
pub struct Counted<T> {
    pub io: T,
    pub counts: Counts,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.counts.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counts.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counts.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
