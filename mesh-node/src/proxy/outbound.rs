//! Outbound on 15001: connections of local meshed pods, redirected here by the datapath. The
//! original destination decides the path: another node's meshed pod → HBONE through the pool;
//! a meshed pod on this node → authorized here and connected directly (no TLS: the bytes never
//! leave the node); anything else → plain TCP passthrough.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::{
    Error, HboneDial, Inputs, hbone,
    inbound::{authorize, connect_pod},
    metrics::{ConnLabels, Peer, Reporter, SecurityPolicy},
    pool::{Checkout, Key, Pool},
    relay::{self, Opener, Record, Tunnel},
    socket,
};
use crate::{
    drain,
    state::{Protocol, State, Workload},
};

pub struct Outbound {
    listener: TcpListener,
    addr: SocketAddr,
    handler: Handler,
}

/// Proxies one accepted connection; cloneable so tests can feed it connections directly.
#[derive(Clone)]
pub struct Handler {
    inputs: Inputs,
    pool: Arc<Pool>,
    local: Option<SocketAddr>,
}

impl Outbound {
    pub async fn new(addr: SocketAddr, inputs: Inputs, pool: Arc<Pool>) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        Ok(Self { listener, addr, handler: Handler { inputs, pool, local: Some(addr) } })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    pub fn handler(&self) -> Handler {
        self.handler.clone()
    }

    pub async fn run(self, drain: drain::Watcher) {
        loop {
            let (tcp, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "outbound accept"); continue; }
                },
                () = drain.signaled() => break,
            };
            let handler = self.handler.clone();
            let drain = drain.clone();
            let span = tracing::debug_span!("outbound", %peer);
            tokio::spawn(
                async move {
                    let orig = match socket::original_dst(&tcp) {
                        Ok(o) => o,
                        Err(e) => return tracing::debug!(error = %e, "no original destination"),
                    };
                    if let Err(e) = handler.proxy(tcp, peer, orig).await {
                        tracing::info!(%peer, dst = %orig, error = %e, "outbound connection failed");
                    }
                    drop(drain);
                }
                .instrument(span),
            );
        }
        tracing::info!("outbound drained: no longer accepting");
    }
}

impl Handler {
    /// Proxies `client` (from `peer`) to `orig_dst`.
    pub async fn proxy(&self, client: TcpStream, peer: SocketAddr, orig_dst: SocketAddr) -> Result<(), Error> {
        let state = self.inputs.state.borrow().clone();
        // A captured connection to a Service VIP: pick the backend here (meshed clients are
        // captured before the kernel's socket LB would have).
        let orig_dst = state.resolve(orig_dst).unwrap_or(orig_dst);
        if Some(orig_dst) == self.local {
            return Err(Error::SelfCall(orig_dst));
        }
        client.set_nodelay(true)?;
        let node = &self.inputs.cfg.node_name;
        // Only this node's meshed pods are captured; anything else here would make us an open relay.
        let src_w = state
            .workload(peer.ip())
            .filter(|w| &w.node == node && w.protocol == Protocol::Hbone)
            .ok_or(Error::UnknownSource(peer.ip()))?;
        match state.workload(orig_dst.ip()).filter(|w| w.protocol == Protocol::Hbone) {
            Some(dst_w) if &dst_w.node == node => self.same_node(client, peer, orig_dst, &state, src_w, dst_w).await,
            Some(dst_w) => self.hbone(client, peer, orig_dst, &state, src_w, dst_w).await,
            None => self.passthrough(client, peer, orig_dst, &state, src_w).await,
        }
    }

    fn labels(&self, reporter: Reporter, state: &State, src: &Workload, dst: Option<&Workload>, dst_addr: SocketAddr, mtls: bool) -> ConnLabels {
        let (src_id, dst_id) = (state.identity(src), dst.map(|d| state.identity(d)));
        ConnLabels::new(
            reporter,
            Peer { workload: Some(src), identity: Some(&src_id) },
            Peer { workload: dst, identity: dst_id.as_ref() },
            if mtls { SecurityPolicy::mutual_tls } else { SecurityPolicy::unknown },
            &self.inputs.cfg.cluster_id,
        )
        .with_service(state.serving(dst_addr), &self.inputs.cfg.cluster_domain)
    }

    async fn hbone(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr, state: &State, src_w: &Workload, dst_w: &Workload) -> Result<(), Error> {
        let cfg = &self.inputs.cfg;
        let hbone_ip = match cfg.hbone_dial {
            HboneDial::Pod => dst.ip(),
            HboneDial::Node => dst_w.node_ip,
        };
        let key = Key { src: state.identity(src_w), dst: state.identity(dst_w), addr: SocketAddr::new(hbone_ip, cfg.hbone_port) };
        let req = || hbone::connect_request(dst, peer.ip(), src_w, &cfg.cluster_id, &hbone::traceparent());
        // A pooled connection the peer is draining (GOAWAY) refuses new streams: retire it and
        // retry once on a fresh one.
        let (stream, response, send) = match self.open_stream(&key, req()).await {
            Err(Error::H2(e)) if e.is_go_away() || e.is_io() => self.open_stream(&key, req()).await?,
            r => r?,
        };
        let resp = response.await?;
        if resp.status() != http::StatusCode::OK {
            relay::log_refused("outbound", peer, dst, Some(&key.src.to_string()), resp.status().as_str());
            return Err(Error::Status(resp.status()));
        }
        let record = Record::open("outbound", self.labels(Reporter::source, state, src_w, Some(dst_w), dst, true), peer, dst, &self.inputs.metrics);
        let tunnel = Tunnel { send, recv: resp.into_body() };
        relay::relay_tunnel(&mut client, tunnel, Opener::Tcp, record).await;
        drop(stream);
        Ok(())
    }

    /// Sends the CONNECT on a pooled connection; the response is awaited by the caller.
    async fn open_stream(&self, key: &Key, req: http::Request<()>) -> Result<(Checkout, h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>), Error> {
        let stream = self.pool.checkout(key).await?;
        let sent = match stream.sender.clone().ready().await {
            Ok(mut sender) => sender.send_request(req, false),
            Err(e) => Err(e),
        };
        match sent {
            Ok((response, send)) => Ok((stream, response, send)),
            Err(e) => {
                stream.retire();
                Err(e.into())
            }
        }
    }

    async fn same_node(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr, state: &State, src_w: &Workload, dst_w: &Workload) -> Result<(), Error> {
        let src_id = state.identity(src_w);
        if let Err(reason) = authorize(&self.inputs, state, Some(&src_id), peer.ip(), dst_w, dst.port()) {
            relay::log_refused("same-node", peer, dst, Some(&src_id.to_string()), reason);
            return Err(Error::Denied(reason));
        }
        let mut pod = connect_pod(&self.inputs, state, peer.ip(), dst).await?;
        // Identities are known on both ends (this daemon holds both); the hop is node-local.
        let record = Record::open("same-node", self.labels(Reporter::destination, state, src_w, Some(dst_w), dst, true), peer, dst, &self.inputs.metrics);
        relay::relay(&mut client, &mut pod, record).await;
        Ok(())
    }

    async fn passthrough(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr, state: &State, src_w: &Workload) -> Result<(), Error> {
        let mut upstream = tokio::time::timeout(self.inputs.cfg.connect_timeout, socket::connect(None, dst))
            .await
            .map_err(|_| Error::ConnectTimeout(dst))?
            .map_err(|source| Error::Connect { addr: dst, source })?;
        let dst_w = state.workload(dst.ip());
        let record = Record::open("passthrough", self.labels(Reporter::source, state, src_w, dst_w, dst, false), peer, dst, &self.inputs.metrics);
        relay::relay(&mut client, &mut upstream, record).await;
        Ok(())
    }
}
