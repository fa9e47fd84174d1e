//! HBONE server on 15008: mTLS presenting the destination workload's certificate, HTTP/2, and
//! each CONNECT stream becomes a TCP connection to the local pod once authorization allows it —
//! or, when the pod's port is HTTP, the requests inside the stream are parsed, authorized one by
//! one and forwarded ([`super::l7::inbound`]). The connection's task accepts streams and does
//! all of its HTTP/2 reads and writes; each stream runs in its own task.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};

use super::{
    Error, Inputs, accept,
    authorize::{authorize, connect_pod},
    hbone,
    l7::{self, TunnelIo, inbound::Caller},
    metrics::{ConnLabels, Peer, Reporter, SecurityPolicy},
    relay::{self, Opener, Record, Tunnel},
    socket,
};
use crate::{
    authz, drain,
    identity::Identity,
    state::{Protocol, State, Workload},
    tls,
};

pub struct Inbound {
    listener: TcpListener,
    addr: SocketAddr,
    inputs: Inputs,
    http: Arc<l7::Shared>,
}

/// Server configs per local identity, rebuilt when its certificate rotates (keyed by serial).
type ConfigCache = Mutex<HashMap<Identity, (u64, Arc<ServerConfig>)>>;

impl Inbound {
    pub async fn new(listen: impl Into<super::Listen>, inputs: Inputs, http: Arc<l7::Shared>) -> Result<Self, Error> {
        let (listener, addr) = listen.into().open().await?;
        // HBONE addressed to a local pod (ztunnel's way, and ours by default) is routed to this
        // listener by `crate::routing`; answering from the pod's address, which is not the
        // node's, takes IP_TRANSPARENT. It needs CAP_NET_ADMIN, like the routing itself:
        // without it only HBONE addressed to the node is answered.
        match socket::set_transparent(&listener) {
            Ok(()) => tracing::debug!(%addr, "HBONE listener is transparent: answers for local pods' addresses"),
            Err(e) => tracing::info!(%addr, error = %e, "HBONE listener not transparent: HBONE addressed to pods will not be answered"),
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
        let cache: Arc<ConfigCache> = Arc::default();
        let (inputs, http) = (self.inputs, self.http);
        let limits = accept::Limits { rate: inputs.cfg.hbone_handshake_rate, ..inputs.cfg.connection_limits };
        let refused = inputs.metrics.connections_refused.clone();
        accept::run(self.listener, "inbound", limits, refused, drain, move |tcp, peer, drain| {
            let (inputs, http, cache) = (inputs.clone(), http.clone(), cache.clone());
            async move {
                if let Err(e) = serve(inputs, http, cache, tcp, peer, drain).await {
                    tracing::debug!(error = %e, "HBONE connection ended with an error");
                }
            }
        })
        .await;
    }
}

/// The local identity whose certificate to present: named by SNI (our clients send it), or, for
/// clients that dial the pod address (ztunnel does), the workload the connection was addressed to.
fn server_identity(state: &State, node: &str, sni: Option<&str>, local: SocketAddr) -> Option<Identity> {
    let local_meshed = |w: &&Workload| *w.node == *node && w.protocol == Protocol::Hbone;
    if let Some(sni) = sni
        && let Some(w) = state.workloads.values().filter(local_meshed).find(|w| state.identity(w).sni() == sni)
    {
        return Some(state.identity(w));
    }
    state.workload(local.ip()).filter(local_meshed).map(|w| state.identity(w))
}

async fn server_config(inputs: &Inputs, cache: &ConfigCache, id: &Identity) -> Result<Arc<ServerConfig>, Error> {
    let cert = inputs.certs.fetch(id).await?;
    if let Some((serial, cfg)) = cache.lock().unwrap_or_else(PoisonError::into_inner).get(id)
        && *serial == cert.cert.serial
    {
        return Ok(cfg.clone());
    }
    let state = inputs.state.borrow().clone();
    let cfg = tls::server_config(cert.key.clone(), &inputs.certs.roots(), &state.trust_domain)?;
    cache.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), (cert.cert.serial, cfg.clone()));
    Ok(cfg)
}

async fn serve(inputs: Inputs, http: Arc<l7::Shared>, cache: Arc<ConfigCache>, tcp: TcpStream, peer: SocketAddr, drain: drain::Watcher) -> Result<(), Error> {
    tcp.set_nodelay(true)?;
    let after = inputs.cfg.handshake_timeout;
    let (mut conn, ctx) = match tokio::time::timeout(after, handshake(&inputs, http, &cache, tcp, peer)).await {
        Ok(done) => done?,
        Err(_) => {
            inputs.metrics.handshake_timeout("inbound");
            return Err(Error::HandshakeTimeout { peer, after });
        }
    };
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (ctx, drain) = (ctx.clone(), drain.clone());
                    tokio::spawn(async move {
                        ctx.stream(req, respond, &drain).await;
                    });
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            () = drain.signaled(), if !draining => {
                // GOAWAY: open streams continue, no new ones; `accept` ends when they are done.
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

type H2Server = h2::server::Connection<tokio_rustls::server::TlsStream<tokio::io::BufReader<TcpStream>>, Bytes>;

/// TLS (the certificate chosen by SNI or the address dialed) and the HTTP/2 handshake.
async fn handshake(inputs: &Inputs, http: Arc<l7::Shared>, cache: &ConfigCache, tcp: TcpStream, peer: SocketAddr) -> Result<(H2Server, Arc<StreamCtx>), Error> {
    let local = socket::original_dst(&tcp)?;
    let tcp = tokio::io::BufReader::with_capacity(super::TLS_READ_BUF, tcp);
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let sni = start.client_hello().server_name().map(str::to_owned);
    let state = inputs.state.borrow().clone();
    let served = server_identity(&state, &inputs.cfg.node_name, sni.as_deref(), local)
        .ok_or(Error::NoServerIdentity { sni, addr: local })?;
    let cfg = server_config(inputs, cache, &served).await?;
    let tls = match start.into_stream(cfg).await {
        Ok(t) => {
            inputs.metrics.handshake("inbound", true);
            t
        }
        Err(e) => {
            inputs.metrics.handshake("inbound", false);
            return Err(Error::Io(e));
        }
    };
    let peer_id = tls::peer_identity(tls.get_ref().1.peer_certificates())?;
    let ctx = Arc::new(StreamCtx { inputs: inputs.clone(), http, served, peer_id, peer });
    let cfg = &inputs.cfg;
    let conn = h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_send_buffer_size(super::send_buffer(cfg))
        // hyper's server limits, which this server had before it drove h2 itself.
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(16 << 10)
        .max_local_error_reset_streams(Some(1024))
        .handshake::<_, Bytes>(tls)
        .await?;
    Ok((conn, ctx))
}

/// Concurrent streams a client may open on one connection (hyper's default before).
const MAX_STREAMS: u32 = 200;

struct StreamCtx {
    inputs: Inputs,
    http: Arc<l7::Shared>,
    served: Identity,
    peer_id: Identity,
    peer: SocketAddr,
}

fn respond_status(mut respond: SendResponse<Bytes>, code: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = code;
    // Fails only when the client already reset the stream: nothing left to tell it.
    let _ = respond.send_response(r, true);
}

/// A checked CONNECT: where it goes and who asks.
#[derive(Debug)]
pub struct Target {
    pub dst: SocketAddr,
    /// A meshed workload of this node, the one whose certificate the client verified.
    pub dst_w: Workload,
    /// The client workload, when one is known to own the client's authenticated identity.
    pub src_w: Option<Workload>,
    /// `src_w`'s address, else the connection's source.
    pub src_ip: IpAddr,
}

/// The HBONE connection a CONNECT stream arrives on, as its TLS handshake established it.
#[derive(Clone, Copy, Debug)]
pub struct HboneConn<'a> {
    /// This node.
    pub node: &'a str,
    /// The identity whose certificate this node presented.
    pub served: &'a Identity,
    /// The client's authenticated identity.
    pub peer_id: &'a Identity,
    /// The connection's source address.
    pub peer: SocketAddr,
}

/// Checks a CONNECT stream's request: a local meshed workload, the one whose certificate the
/// client verified; `Err` is the status to refuse it with. Pure, for the stream-open fuzz target.
pub fn check_connect(state: &State, conn: &HboneConn<'_>, req: &http::request::Parts) -> Result<Target, StatusCode> {
    if req.method != http::Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let dst = req.uri.authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()).ok_or(StatusCode::BAD_REQUEST)?;
    let dst_w = state.workload(dst.ip()).filter(|w| *w.node == *conn.node && w.protocol == Protocol::Hbone).ok_or(StatusCode::BAD_REQUEST)?;
    // The stream must target the workload whose certificate the client verified.
    if state.identity(dst_w) != *conn.served {
        return Err(StatusCode::MISDIRECTED_REQUEST);
    }
    // The client workload: the one `forwarded` names, trusted only when it owns the
    // authenticated identity; else the connection's source (ztunnel dials from the pod).
    let owns_identity = |w: &&Workload| state.identity(w) == *conn.peer_id;
    let src_w = hbone::forwarded_for(&req.headers)
        .and_then(|ip| state.workload(ip))
        .filter(owns_identity)
        .or_else(|| state.workload(conn.peer.ip()).filter(owns_identity));
    let src_ip = src_w.map_or(conn.peer.ip(), |w| w.ip);
    Ok(Target { dst, dst_w: dst_w.clone(), src_w: src_w.cloned(), src_ip })
}

impl StreamCtx {
    async fn stream(&self, req: Request<RecvStream>, mut respond: SendResponse<Bytes>, drain: &drain::Watcher) {
        let (parts, recv) = req.into_parts();
        let state = self.inputs.state.borrow().clone();
        let conn = HboneConn { node: &self.inputs.cfg.node_name, served: &self.served, peer_id: &self.peer_id, peer: self.peer };
        let target = match check_connect(&state, &conn, &parts) {
            Ok(t) => t,
            Err(code) => return respond_status(respond, code),
        };
        if state.app_protocol_at(target.dst).is_http() {
            // Authorized per request, inside the stream.
            let send = match respond.send_response(Response::new(()), false) {
                Ok(send) => send,
                Err(e) => return tracing::debug!(error = %e, "client reset the stream before 200"),
            };
            let caller = Caller { identity: Some(self.peer_id.clone()), workload: target.src_w.clone(), ip: target.src_ip };
            let stack = l7::inbound::local_stack(&self.inputs, &self.http, &state, caller, &target.dst_w, target.dst, "inbound");
            let record = Record::open("inbound", self.conn_labels(&state, &target), SocketAddr::new(target.src_ip, 0), target.dst, &self.inputs.metrics);
            let counts = l7::Counts::default();
            l7::inbound::serve(l7::Counted { io: TunnelIo::new(send, recv, None), counts: counts.clone() }, stack, &self.http.tunnel_server, drain, &self.inputs.metrics, "inbound").await;
            let (received, sent) = counts.get();
            return record.close(received, sent, None);
        }
        let (mut pod, record) = match self.open(&state, target).await {
            Ok(opened) => opened,
            Err(code) => return respond_status(respond, code),
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => return tracing::debug!(error = %e, "client reset the stream before 200"),
        };
        relay::relay_tunnel(&mut pod, Tunnel { send, recv }, Opener::Tunnel, self.inputs.cfg.tcp_idle_timeout, record).await;
    }

    /// Authorizes the connection and connects to the pod; `Err` is the status to refuse it with.
    async fn open(&self, state: &State, t: Target) -> Result<(TcpStream, Record), StatusCode> {
        let src = SocketAddr::new(t.src_ip, 0);
        let conn = authz::Conn { src_identity: Some(&self.peer_id), src_ip: t.src_ip, dst: &t.dst_w, dst_port: t.dst.port(), http: None };
        if let Err(reason) = authorize(&self.inputs, state, &conn) {
            relay::log_refused("inbound", src, t.dst, Some(&self.peer_id.to_string()), reason);
            return Err(StatusCode::UNAUTHORIZED);
        }
        let pod = match connect_pod(&self.inputs, state, t.src_ip, t.dst).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(dst = %t.dst, error = %e, "local pod refused the connection");
                return Err(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        Ok((pod, Record::open("inbound", self.conn_labels(state, &t), src, t.dst, &self.inputs.metrics)))
    }

    fn conn_labels(&self, state: &State, t: &Target) -> ConnLabels {
        ConnLabels::new(
            Reporter::destination,
            Peer { workload: t.src_w.as_ref(), identity: Some(&self.peer_id) },
            Peer { workload: Some(&t.dst_w), identity: Some(&self.served) },
            SecurityPolicy::mutual_tls,
            &self.inputs.cfg.cluster_id,
        )
        .with_service(state.serving(t.dst), &self.inputs.cfg.cluster_domain)
    }
}
