//! HTTP in the node daemon (L7): where a Service port is HTTP (`mesh_l7::AppProtocol`), the source
//! node serves the client's connection with the outbound stack (routes, filters, splits,
//! per-request endpoint picks, client-side metrics; [`outbound`]) and speaks HTTP to each
//! endpoint through pooled HBONE streams; the destination node parses the requests inside the
//! HBONE stream (or a plaintext connection) for per-request authorization and server-side
//! metrics before they reach the pod ([`inbound`]). Same-node requests take both.
//!
//! The request logic lives in `mesh_l7`; this module plugs in sockets, identities, HBONE, the
//! node's state and its endpoint picker.

pub mod inbound;
pub mod outbound;
mod tunnel;

use std::sync::Arc;

pub use tunnel::TunnelIo;

use super::{Inputs, pool::Pool as HbonePool};

/// What the HTTP paths share across connections.
pub struct Shared {
    pub server: mesh_l7::server::Config,
    /// Outbound: connections per (client, endpoint), over HBONE or plain TCP.
    pub upstreams: mesh_l7::client::Pool<outbound::Connector>,
    /// To local pods (inbound and same-node), per (source address, pod).
    pub pods: mesh_l7::client::Pool<inbound::PodConnector>,
}

impl Shared {
    pub fn new(inputs: &Inputs, hbone: Arc<HbonePool>) -> Arc<Self> {
        let client = mesh_l7::client::Config::default();
        Arc::new(Self {
            server: mesh_l7::server::Config::default(),
            upstreams: mesh_l7::client::Pool::new(outbound::Connector::new(inputs.clone(), hbone), client.clone()),
            pods: mesh_l7::client::Pool::new(inbound::PodConnector { connect_timeout: inputs.cfg.connect_timeout }, client),
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
