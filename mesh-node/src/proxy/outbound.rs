//! Outbound on 15001: connections of local meshed pods, redirected here by the datapath. The
//! original destination decides the path ([`Handler::proxy`]):
//! - a Service VIP:port whose port is HTTP → the HTTP stack ([`super::l7::outbound`]): routes
//!   and a per-request endpoint pick;
//! - a Service VIP:port otherwise → one endpoint for the connection ([`crate::balance`]), then:
//! - another node's meshed pod → an HBONE stream through the pool;
//! - a meshed pod on this node → authorized here and connected directly (no TLS: the bytes never
//!   leave the node);
//! - anything else → plain TCP passthrough.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use super::{
    Error, HboneDial, Inputs, Listen, accept,
    authorize::{authorize, connect_pod},
    hbone,
    l7::{self, outbound::Target},
    metrics::{ConnLabels, Peer, Reporter, SecurityPolicy},
    pool::{Key, Pool},
    relay::{self, Opener, Record, Tunnel},
    socket,
};
use crate::{
    authz, balance, drain,
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
    http: Arc<l7::Shared>,
    local: Option<SocketAddr>,
}

impl Outbound {
    pub async fn new(listen: impl Into<Listen>, inputs: Inputs, pool: Arc<Pool>, http: Arc<l7::Shared>) -> Result<Self, Error> {
        let (listener, addr) = listen.into().open().await?;
        Ok(Self { listener, addr, handler: Handler { inputs, pool, http, local: Some(addr) } })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A duplicate of the listening socket (for a successor, `crate::handoff`).
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    pub fn handler(&self) -> Handler {
        self.handler.clone()
    }

    pub async fn run(self, drain: drain::Watcher) {
        let handler = self.handler;
        let (limits, refused) = (handler.inputs.cfg.connection_limits, handler.inputs.metrics.connections_refused.clone());
        accept::run(self.listener, "outbound", limits, refused, drain, move |tcp, peer, drain| {
            let handler = handler.clone();
            async move {
                let orig = match socket::original_dst(&tcp) {
                    Ok(o) => o,
                    Err(e) => return tracing::debug!(error = %e, "no original destination"),
                };
                if let Err(e) = handler.proxy_draining(tcp, peer, orig, drain).await {
                    tracing::info!(%peer, dst = %orig, error = %e, "outbound connection failed");
                }
            }
        })
        .await;
    }
}

impl Handler {
    /// Proxies `client` (from `peer`) to `orig_dst`.
    pub async fn proxy(&self, client: TcpStream, peer: SocketAddr, orig_dst: SocketAddr) -> Result<(), Error> {
        // Tests call this directly; a drain watcher nobody triggers keeps HTTP connections open.
        let (_trigger, watcher) = drain::new();
        self.proxy_draining(client, peer, orig_dst, watcher).await
    }

    async fn proxy_draining(&self, client: TcpStream, peer: SocketAddr, orig_dst: SocketAddr, drain: drain::Watcher) -> Result<(), Error> {
        let state = self.inputs.state.borrow().clone();
        client.set_nodelay(true)?;
        let node = &self.inputs.cfg.node_name;
        // Only this node's meshed pods are captured; anything else here would make us an open relay.
        let src_w = state
            .workload(peer.ip())
            .filter(|w| *w.node == **node && w.protocol == Protocol::Hbone)
            .ok_or(Error::UnknownSource(peer.ip()))?;
        // A captured connection to a Service VIP: meshed clients are captured before the
        // kernel's socket LB would have balanced them, so it happens here.
        let dst = match state.vip(orig_dst) {
            Some((service, port)) if port.app_protocol().is_http() => {
                let target = Target { service, port: port.port, vip: orig_dst };
                // The connection itself is reported too (TCP metrics), its destination being the
                // Service: its requests may each reach another endpoint.
                let mut labels = self.labels(Reporter::source, &state, src_w, None, orig_dst, false);
                labels = labels.with_service(Some((service, port)), &self.inputs.cfg.cluster_domain);
                let record = Record::open("outbound", labels, peer, orig_dst, &self.inputs.metrics);
                let counts = l7::Counts::default();
                let client = l7::Counted { io: client, counts: counts.clone() };
                l7::outbound::serve(self.inputs.clone(), self.http.clone(), client, peer, &state, &target, src_w, drain).await;
                let (received, sent) = counts.get();
                record.close(received, sent, None);
                return Ok(());
            }
            Some((service, port)) => {
                let failover = state.traffic_policy(&service.namespace, &service.name, None).is_some_and(|p| p.locality_failover);
                let locality = src_w.locality.as_deref().filter(|_| failover);
                match balance::pick_one(service, port, orig_dst.is_ipv4(), None, self.http.clusters.ejected(&service.namespace, &service.name).as_deref(), locality) {
                Some(c) => c.addr,
                None => orig_dst,
                }
            }
            None => orig_dst,
        };
        // The listener itself (its bound address is often 0.0.0.0): a loop, not a destination.
        let is_self = |l: SocketAddr| dst == l || (dst.port() == l.port() && (dst.ip().is_loopback() || dst.ip().is_unspecified()));
        if self.local.is_some_and(is_self) {
            return Err(Error::SelfCall(dst));
        }
        match state.workload(dst.ip()).filter(|w| w.protocol == Protocol::Hbone) {
            Some(dst_w) if *dst_w.node == **node => self.same_node(client, peer, dst, &state, src_w, dst_w).await,
            Some(dst_w) => self.hbone(client, peer, dst, &state, src_w, dst_w).await,
            None => self.passthrough(client, peer, dst, &state, src_w).await,
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
        let opened = match self.pool.open(&key, req).await {
            Err(Error::Status(status)) => {
                relay::log_refused("outbound", peer, dst, Some(&key.src.to_string()), status.as_str());
                return Err(Error::Status(status));
            }
            r => r?,
        };
        let record = Record::open("outbound", self.labels(Reporter::source, state, src_w, Some(dst_w), dst, true), peer, dst, &self.inputs.metrics);
        let tunnel = Tunnel { send: opened.send, recv: opened.recv };
        relay::relay_tunnel(&mut client, tunnel, Opener::Tcp, cfg.tcp_idle_timeout, record).await;
        drop(opened.slot);
        Ok(())
    }

    async fn same_node(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr, state: &State, src_w: &Workload, dst_w: &Workload) -> Result<(), Error> {
        let src_id = state.identity(src_w);
        let conn = authz::Conn { src_identity: Some(&src_id), src_ip: peer.ip(), dst: dst_w, dst_port: dst.port(), http: None };
        if let Err(reason) = authorize(&self.inputs, state, &conn) {
            relay::log_refused("same-node", peer, dst, Some(&src_id.to_string()), reason);
            return Err(Error::Denied(reason));
        }
        let mut pod = connect_pod(&self.inputs, state, peer.ip(), dst).await?;
        // Identities are known on both ends (this daemon holds both); the hop is node-local.
        let record = Record::open("same-node", self.labels(Reporter::destination, state, src_w, Some(dst_w), dst, true), peer, dst, &self.inputs.metrics);
        relay::relay(&mut client, &mut pod, self.inputs.cfg.tcp_idle_timeout, record).await;
        Ok(())
    }

    async fn passthrough(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr, state: &State, src_w: &Workload) -> Result<(), Error> {
        let mut upstream = tokio::time::timeout(self.inputs.cfg.connect_timeout, socket::connect(None, dst, self.inputs.cfg.socket_mark))
            .await
            .map_err(|_| Error::ConnectTimeout(dst))?
            .map_err(|source| Error::Connect { addr: dst, source })?;
        let dst_w = state.workload(dst.ip());
        let record = Record::open("passthrough", self.labels(Reporter::source, state, src_w, dst_w, dst, false), peer, dst, &self.inputs.metrics);
        relay::relay(&mut client, &mut upstream, self.inputs.cfg.tcp_idle_timeout, record).await;
        Ok(())
    }
}
