//! Plaintext to local meshed pods (from unmeshed clients, other hosts), handed to 15006 by the
//! datapath (`crate::routing` and the kernel's `sk_lookup`; the accepted socket's local address
//! is the pod's address and port):
//! refused under STRICT `PeerAuthentication`; under PERMISSIVE, authorized without an identity
//! (so principal and namespace rules cannot match) and forwarded — per connection on TCP ports,
//! per request on HTTP ports.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use super::{
    Error, Inputs, accept,
    authorize::{authorize, connect_pod},
    l7::{self, inbound::Caller},
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
    http: Arc<l7::Shared>,
}

impl InboundPlain {
    pub async fn new(listen: impl Into<super::Listen>, inputs: Inputs, http: Arc<l7::Shared>) -> Result<Self, Error> {
        let (listener, addr) = listen.into().open().await?;
        // Plaintext for a local pod is handed to this listener by the kernel (`sk_lookup`, see
        // `crate::routing`) with the pod's address as the local one; answering from an address
        // that is not the node's takes IP_TRANSPARENT (CAP_NET_ADMIN, like the routing).
        match socket::set_transparent(&listener) {
            Ok(()) => tracing::debug!(%addr, "plaintext listener is transparent: answers for local pods' addresses"),
            Err(e) => tracing::info!(%addr, error = %e, "plaintext listener not transparent: plaintext steered from pods' addresses will not be answered"),
        }
        Ok(Self { listener, addr, inputs, http })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A duplicate of the listening socket (for a successor, `crate::handoff`).
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    pub async fn run(self, drain: drain::Watcher) {
        let (inputs, http) = (self.inputs, self.http);
        let (limits, refused) = (inputs.cfg.connection_limits, inputs.metrics.connections_refused.clone());
        accept::run(self.listener, "inbound-plaintext", limits, refused, drain, move |tcp, peer, drain| {
            let (inputs, http) = (inputs.clone(), http.clone());
            async move {
                let dst = match socket::original_dst(&tcp) {
                    Ok(d) => d,
                    Err(e) => return tracing::debug!(error = %e, "no original destination"),
                };
                if let Err(e) = handle(&inputs, &http, tcp, peer, dst, &drain).await {
                    tracing::info!(%peer, %dst, error = %e, "plaintext inbound refused or failed");
                }
            }
        })
        .await;
    }
}

/// Handles one plaintext connection from `peer` addressed to `dst`.
pub async fn handle(inputs: &Inputs, http: &Arc<l7::Shared>, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr, drain: &drain::Watcher) -> Result<(), Error> {
    let state = inputs.state.borrow().clone();
    let node = &inputs.cfg.node_name;
    let dst_w = state
        .workload(dst.ip())
        .filter(|w| *w.node == **node && w.protocol == Protocol::Hbone)
        .ok_or(Error::NoServerIdentity { sni: None, addr: dst })?;
    if authz::mode_for(&state.peer_authentications, &state.root_namespace, dst_w) == Mode::Strict {
        inputs.metrics.deny("strict_mtls");
        relay::log_refused("inbound-plaintext", peer, dst, None, "STRICT PeerAuthentication");
        return Err(Error::Strict(dst));
    }
    if state.app_protocol_at(dst).is_http() {
        let caller = Caller { identity: None, workload: state.workload(peer.ip()).cloned(), ip: peer.ip() };
        let stack = l7::inbound::local_stack(inputs, http, &state, caller, dst_w, dst, "inbound-plaintext");
        let record = Record::open("inbound-plaintext", plain_labels(inputs, &state, peer, dst_w, dst), peer, dst, &inputs.metrics);
        let counts = l7::Counts::default();
        l7::inbound::serve(l7::Counted { io: client, counts: counts.clone() }, stack, &http.server, drain, &inputs.metrics, "inbound-plaintext").await;
        let (received, sent) = counts.get();
        record.close(received, sent, None);
        return Ok(());
    }
    let conn = authz::Conn { src_identity: None, src_ip: peer.ip(), dst: dst_w, dst_port: dst.port(), http: None };
    if let Err(reason) = authorize(inputs, &state, &conn) {
        relay::log_refused("inbound-plaintext", peer, dst, None, reason);
        return Err(Error::Denied(reason));
    }
    let mut pod = connect_pod(inputs, &state, peer.ip(), dst).await?;
    let record = Record::open("inbound-plaintext", plain_labels(inputs, &state, peer, dst_w, dst), peer, dst, &inputs.metrics);
    relay::relay(&mut client, &mut pod, inputs.cfg.tcp_idle_timeout, record).await;
    Ok(())
}

fn plain_labels(inputs: &Inputs, state: &crate::state::State, peer: SocketAddr, dst_w: &crate::state::Workload, dst: SocketAddr) -> ConnLabels {
    let dst_id = state.identity(dst_w);
    ConnLabels::new(
        Reporter::destination,
        Peer { workload: state.workload(peer.ip()), identity: None },
        Peer { workload: Some(dst_w), identity: Some(&dst_id) },
        SecurityPolicy::unknown,
        &inputs.cfg.cluster_id,
    )
    .with_service(state.serving(dst), &inputs.cfg.cluster_domain)
}
