//! Plaintext to local meshed pods (from unmeshed clients), redirected to 15006 by the datapath:
//! refused under STRICT `PeerAuthentication`; under PERMISSIVE, authorized without an identity
//! (so principal and namespace rules cannot match) and forwarded.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use super::{
    Error, Inputs,
    inbound::{authorize, connect_pod},
    metrics::{ConnLabels, Peer, Reporter, SecurityPolicy},
    relay::{self, Record},
    socket,
};
use crate::{
    authz::{self, Mode},
    drain,
    state::Protocol,
};

pub struct InboundPlain {
    listener: TcpListener,
    addr: SocketAddr,
    inputs: Inputs,
}

impl InboundPlain {
    pub async fn new(addr: SocketAddr, inputs: Inputs) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        Ok(Self { listener, addr, inputs })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    pub async fn run(self, drain: drain::Watcher) {
        loop {
            let (tcp, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "plaintext inbound accept"); continue; }
                },
                () = drain.signaled() => break,
            };
            let (inputs, drain) = (self.inputs.clone(), drain.clone());
            tokio::spawn(async move {
                let dst = match socket::original_dst(&tcp) {
                    Ok(d) => d,
                    Err(e) => return tracing::debug!(error = %e, "no original destination"),
                };
                if let Err(e) = handle(&inputs, tcp, peer, dst).await {
                    tracing::info!(%peer, %dst, error = %e, "plaintext inbound refused or failed");
                }
                drop(drain);
            });
        }
    }
}

/// Handles one plaintext connection from `peer` addressed to `dst`.
pub async fn handle(inputs: &Inputs, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr) -> Result<(), Error> {
    let state = inputs.state.borrow().clone();
    let node = &inputs.cfg.node_name;
    let dst_w = state
        .workload(dst.ip())
        .filter(|w| &w.node == node && w.protocol == Protocol::Hbone)
        .ok_or(Error::NoServerIdentity { sni: None, addr: dst })?;
    if authz::mode_for(&state.peer_authentications, &state.root_namespace, dst_w) == Mode::Strict {
        inputs.metrics.deny("strict_mtls");
        relay::log_refused("inbound-plaintext", peer, dst, None, "STRICT PeerAuthentication");
        return Err(Error::Strict(dst));
    }
    if let Err(reason) = authorize(inputs, &state, None, peer.ip(), dst_w, dst.port()) {
        relay::log_refused("inbound-plaintext", peer, dst, None, reason);
        return Err(Error::Denied(reason));
    }
    let mut pod = connect_pod(inputs, &state, peer.ip(), dst).await?;
    let dst_id = state.identity(dst_w);
    let labels = ConnLabels::new(
        Reporter::destination,
        Peer { workload: state.workload(peer.ip()), identity: None },
        Peer { workload: Some(dst_w), identity: Some(&dst_id) },
        SecurityPolicy::unknown,
        &inputs.cfg.cluster_id,
    )
    .with_service(state.serving(dst), &inputs.cfg.cluster_domain);
    let record = Record::open("inbound-plaintext", labels, peer, dst, &inputs.metrics);
    relay::relay(&mut client, &mut pod, record).await;
    Ok(())
}
