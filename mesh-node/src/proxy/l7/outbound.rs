//! The source side of HTTP: a meshed client's connection to an HTTP Service port is served here
//! with `mesh_l7`'s outbound stack (record → trace → router → timeout → filters → mirror → split), and
//! each request then goes to an endpoint of the chosen backend Service picked by
//! [`crate::balance`] — requests of one client connection may reach different endpoints. The
//! endpoint is reached through a pooled HTTP connection carried by an HBONE stream (meshed, on
//! another node), the destination stack directly (meshed, this node), or plain TCP (unmeshed).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{Request, Response};
use mesh_l7::{
    body::{Body, BoxError},
    client::{Connect, ConnectionLimits},
    forward,
    layer::{
        BoxHttp,
        fault::Fault,
        filters::Filters,
        mirror::Mirror,
        retry::Retry,
        router::{ClientInfo, Router},
        split::{Chosen, Split},
        timeout::Timeout,
        trace::Trace,
    },
    flags::ResponseFlag,
    metrics::{PeerLabels, SecurityPolicy},
    outlier::Outcome,
    policy::{HashKey, LoadBalancer},
    record::{Peers, Record, Recorder, Upstream as UpstreamAddr},
};
use tokio::net::TcpStream;
use tower::ServiceExt as _;

use super::{Shared, TunnelIo, inbound};
use crate::{
    balance::{self, cluster::hash_bytes},
    drain,
    identity::Identity,
    proxy::{
        HboneDial, Inputs, hbone,
        metrics::{Peer, Reporter, peer_labels, set_service},
        pool::{Key as HboneKey, Pool as HbonePool},
        socket,
    },
    state::{Protocol, Service, State, Workload},
    telemetry::policy::{Side, access_log_for},
};

/// How the source node reaches an endpoint for HTTP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    /// HTTP inside an HBONE stream, authenticated as the client's identity, to a peer proving
    /// `dst_identity`, dialed at `hbone` (the pod's or its node's `:15008`).
    Hbone { dst_identity: Identity, hbone: SocketAddr },
    /// Plain TCP (the endpoint is not meshed).
    Plain,
}

/// One upstream connection's identity: which client it carries requests of, and to where.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub client: IpAddr,
    pub client_identity: Identity,
    pub endpoint: SocketAddr,
    pub via: Via,
    /// The Service's `connectionPool.tcp.connectTimeout`, when it sets one.
    pub connect_timeout: Option<Duration>,
}

/// Makes upstream connections for the outbound HTTP pool.
pub struct Connector {
    inputs: Inputs,
    hbone: Arc<HbonePool>,
}

impl Connector {
    pub fn new(inputs: Inputs, hbone: Arc<HbonePool>) -> Self {
        Self { inputs, hbone }
    }
}

/// A plain TCP connection or an HBONE stream.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<TunnelIo>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(t) => std::pin::Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connect for Connector {
    /// Shared: built once per endpoint a client connection reaches, not per request.
    type Key = Arc<UpstreamKey>;
    type Io = UpstreamIo;

    async fn connect(&self, key: &Arc<UpstreamKey>) -> Result<UpstreamIo, BoxError> {
        let cfg = &self.inputs.cfg;
        match &key.via {
            Via::Plain => {
                let tcp = tokio::time::timeout(key.connect_timeout.unwrap_or(cfg.connect_timeout), socket::connect(None, key.endpoint, cfg.socket_mark))
                    .await
                    .map_err(|_| format!("timed out connecting to {}", key.endpoint))??;
                Ok(UpstreamIo::Tcp(tcp))
            }
            Via::Hbone { dst_identity, hbone } => {
                let state = self.inputs.state.borrow().clone();
                let src_w = state.workload(key.client).ok_or_else(|| format!("client {} is no longer a workload of this node", key.client))?.clone();
                let hkey = HboneKey { src: key.client_identity.clone(), dst: dst_identity.clone(), addr: *hbone };
                let req = || hbone::connect_request(key.endpoint, key.client, &src_w, &cfg.cluster_id, &hbone::traceparent());
                let opened = match key.connect_timeout {
                    Some(t) => tokio::time::timeout(t, self.hbone.open(&hkey, req)).await.map_err(|_| format!("timed out connecting to {} (connectTimeout)", key.endpoint))??,
                    None => self.hbone.open(&hkey, req).await?,
                };
                Ok(UpstreamIo::Tunnel(Box::new(TunnelIo::new(opened.send, opened.recv, Some(opened.slot)))))
            }
        }
    }
}

/// Where a client's requests go once a backend is chosen. One per client connection: it
/// remembers the labels and same-node stacks of the endpoints it reached.
/// Cheap to clone (one `Arc`): the stack's layers clone their inner service per request.
#[derive(Clone)]
struct Upstream(Arc<UpstreamInner>);

impl std::ops::Deref for Upstream {
    type Target = UpstreamInner;

    fn deref(&self) -> &UpstreamInner {
        &self.0
    }
}

struct UpstreamInner {
    inputs: Inputs,
    shared: Arc<Shared>,
    client: Arc<Workload>,
    client_identity: Identity,
    /// The Service port the client connected to (backends without a port use it).
    port: u16,
    ipv4: bool,
    /// Endpoint → the Services it was reached as part of (usually one), and what was learnt.
    seen: Arc<Mutex<HashMap<SocketAddr, Vec<Arc<Reached>>>>>,
}

/// What is remembered of an endpoint this connection reached as part of a Service.
#[derive(Clone)]
struct Reached {
    namespace: String,
    name: String,
    peers: Arc<PeerLabels>,
    path: Path,
}

#[derive(Clone)]
enum Path {
    /// This node: the destination stack.
    Local(BoxHttp),
    /// Another node (HBONE) or an unmeshed endpoint (plain TCP), through the upstream pool.
    Pool(Arc<UpstreamKey>),
}

impl Upstream {
    fn reached(&self, state: &State, service: &Service, endpoint: &crate::state::Endpoint, addr: SocketAddr, connect_timeout: Option<Duration>) -> Arc<Reached> {
        let same = |r: &&Arc<Reached>| r.namespace == service.namespace && r.name == service.name;
        if let Some(r) = self.seen.lock().unwrap_or_else(PoisonError::into_inner).get(&addr).and_then(|v| v.iter().find(same)) {
            return r.clone();
        }
        let cfg = &self.inputs.cfg;
        let dst_w = state.workload(addr.ip());
        let dst_id = endpoint.identity.as_deref().and_then(|i| i.parse::<Identity>().ok()).or_else(|| dst_w.map(|w| state.identity(w)));
        let mtls = if endpoint.meshed { SecurityPolicy::mutual_tls } else { SecurityPolicy::unknown };
        let mut peers = peer_labels(
            Reporter::source,
            Peer { workload: Some(&self.client), identity: Some(&self.client_identity) },
            Peer { workload: dst_w, identity: dst_id.as_ref() },
            mtls,
            &cfg.cluster_id,
        );
        set_service(&mut peers, Some(service), &cfg.cluster_domain);
        let local = dst_w.filter(|w| endpoint.meshed && *w.node == *cfg.node_name && w.protocol == Protocol::Hbone);
        let path = if let Some(w) = local {
            let caller = inbound::Caller { identity: Some(self.client_identity.clone()), workload: Some((*self.client).clone()), ip: self.client.ip };
            Path::Local(inbound::local_stack(&self.inputs, &self.shared, state, caller, w, addr, "same-node"))
        } else {
            let via = match dst_id {
                Some(dst_identity) if endpoint.meshed => {
                    let ip = match cfg.hbone_dial {
                        HboneDial::Pod => addr.ip(),
                        HboneDial::Node => dst_w.map(|w| w.node_ip).or(endpoint.node_address).unwrap_or(addr.ip()),
                    };
                    Via::Hbone { dst_identity, hbone: SocketAddr::new(ip, cfg.hbone_port) }
                }
                _ => Via::Plain,
            };
            Path::Pool(Arc::new(UpstreamKey { client: self.client.ip, client_identity: self.client_identity.clone(), endpoint: addr, via, connect_timeout }))
        };
        let r = Arc::new(Reached { namespace: service.namespace.clone(), name: service.name.clone(), peers: Arc::new(peers), path });
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() < 256 {
            seen.entry(addr).or_default().push(r.clone());
        }
        r
    }

    async fn send(self, req: Request<Body>) -> Response<Body> {
        let Some(chosen) = req.extensions().get::<Chosen>().cloned() else {
            return forward::no_healthy_upstream();
        };
        let backend = chosen.backend();
        let state = self.inputs.state.borrow().clone();
        let Some(service) = state.service(&backend.namespace, &backend.name) else {
            tracing::debug!(backend = %format!("{}/{}", backend.namespace, backend.name), "backend Service not known");
            return forward::no_healthy_upstream();
        };
        let port_number = backend.port.unwrap_or(self.port);
        let Some(port) = service.ports.iter().find(|p| p.port == port_number && p.protocol == crate::state::ServiceProtocol::Tcp) else {
            return forward::no_healthy_upstream();
        };
        let subset = backend.subset.as_deref();
        let clusters = &self.shared.clusters;
        let cluster = clusters.get(&backend.namespace, &backend.name, subset, state.traffic_policy(&backend.namespace, &backend.name, subset));
        let version = inbound::version(port.app_protocol());
        let admitted = match &cluster.breaker {
            None => None,
            Some(breaker) => match breaker.admit(version == mesh_l7::client::Version::Http1).await {
                Ok(admitted) => Some(admitted),
                Err(overflow) => {
                    tracing::debug!(service = %format!("{}/{}", backend.namespace, backend.name), %overflow, "request refused");
                    return ResponseFlag::UpstreamOverflow.response();
                }
            },
        };
        let (hash, set_cookie) = match cluster.load_balancer() {
            Some(LoadBalancer::ConsistentHash { key, .. }) => request_hash(key, &req, self.client.ip),
            _ => (None, None),
        };
        let ejected = clusters.ejected(&backend.namespace, &backend.name);
        let locality = state.workload(self.client.ip).and_then(|w| w.locality.as_deref());
        let Some(picked) = cluster.pick(balance::candidates(service, port, self.ipv4, subset), ejected.as_deref(), hash, locality) else {
            return forward::no_healthy_upstream();
        };
        let (addr, endpoint) = (picked.addr, picked.endpoint);
        let connect_timeout = cluster.policy().and_then(|p| p.connection_pool.connect_timeout);
        let reached = self.reached(&state, service, endpoint, addr, connect_timeout);
        let in_flight = cluster.begin(addr);
        let mut req = req;
        if let Some(pool) = cluster.policy().map(|p| &p.connection_pool).filter(|c| c.max_requests_per_connection.is_some() || c.idle_timeout.is_some()) {
            req.extensions_mut().insert(ConnectionLimits { max_requests: pool.max_requests_per_connection, idle_timeout: pool.idle_timeout });
        }
        let mut resp = match &reached.path {
            Path::Local(local) => local.clone().oneshot(req).await.unwrap_or_else(|never| match never {}),
            Path::Pool(key) => forward::send(&self.shared.upstreams, key, version, req).await,
        };
        let outcome = match resp.extensions().get::<ResponseFlag>() {
            Some(ResponseFlag::UpstreamConnectionFailure | ResponseFlag::UpstreamRemoteReset) => Outcome::Failure,
            _ => Outcome::Status(resp.status().as_u16()),
        };
        if outcome != Outcome::Failure {
            in_flight.answered();
        }
        if cluster.observe(addr, outcome) {
            tracing::info!(service = %format!("{}/{}", backend.namespace, backend.name), endpoint = %addr, "endpoint ejected by outlier detection");
            clusters.count_ejection(&backend.namespace, &backend.name);
            clusters.ejections_changed();
        }
        if let Some(cookie) = set_cookie {
            resp.headers_mut().append(http::header::SET_COOKIE, cookie);
        }
        resp.extensions_mut().insert(Peers(reached.peers.clone()));
        resp.extensions_mut().insert(UpstreamAddr(addr));
        // The request counts as outstanding (balancing) and holds its breaker slots until its
        // response body has been read.
        resp.map(|body| mesh_l7::body::holding(body, (in_flight, admitted)))
    }
}

/// The consistent-hash value of a request (`None`: it has no such key, and is balanced at
/// random), and the cookie to set when the key is a cookie with a TTL the request lacked.
fn request_hash(key: &HashKey, req: &Request<Body>, client: IpAddr) -> (Option<u64>, Option<http::HeaderValue>) {
    match key {
        HashKey::Header(name) => (req.headers().get(name.as_str()).map(|v| hash_bytes(v.as_bytes())), None),
        HashKey::SourceIp => (
            Some(match client {
                IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            }),
            None,
        ),
        HashKey::QueryParameter(name) => {
            let value = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v)));
            (value.map(|v| hash_bytes(v.as_bytes())), None)
        }
        HashKey::Cookie { name, path, ttl } => {
            let found = req
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| c.trim().split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v.to_owned()));
            match (found, ttl) {
                (Some(v), _) => (Some(hash_bytes(v.as_bytes())), None),
                (None, None) => (None, None),
                // Envoy's way: make the cookie, hash on it, and hand it to the client.
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", fastrand::u64(..));
                    let cookie = format!("{name}=\"{value}\"; Max-Age={}; Path={}; HttpOnly", ttl.as_secs(), path.as_deref().unwrap_or("/"));
                    (Some(hash_bytes(format!("\"{value}\"").as_bytes())), http::HeaderValue::from_str(&cookie).ok())
                }
            }
        }
    }
}

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.send(req).await) })
    }
}

/// A client connection addressed to `service`'s HTTP port `port` (at `vip`).
pub struct Target<'a> {
    pub service: &'a Service,
    pub port: u16,
    pub vip: SocketAddr,
}

/// Serves one client connection with the outbound stack until it closes (or drain).
#[expect(clippy::too_many_arguments, reason = "the connection, its target and the daemon's handles: one call site")]
pub async fn serve<I>(inputs: Inputs, shared: Arc<Shared>, client: I, peer: SocketAddr, state: &State, target: &Target<'_>, src_w: &Workload, drain: drain::Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let client_identity = state.identity(src_w);
    let (namespace, name) = (target.service.namespace.clone(), target.service.name.clone());
    let lookup = {
        let rx = inputs.state.clone();
        move || rx.borrow().route_table(&namespace, &name)
    };
    let info = ClientInfo { namespace: Some(src_w.namespace.clone()), labels: Some(src_w.labels.clone()) };
    let mut base = peer_labels(
        Reporter::source,
        Peer { workload: Some(src_w), identity: Some(&client_identity) },
        Peer { workload: None, identity: None },
        SecurityPolicy::unknown,
        &inputs.cfg.cluster_id,
    );
    set_service(&mut base, Some(target.service), &inputs.cfg.cluster_domain);
    let access_log = access_log_for(&state.telemetry, &state.root_namespace, src_w);
    let recorder = Recorder::with_access_log(inputs.metrics.requests.clone(), Arc::new(base), "outbound", peer, access_log);
    let upstream = Upstream(Arc::new(UpstreamInner {
        inputs: inputs.clone(),
        shared: shared.clone(),
        client: Arc::new(src_w.clone()),
        client_identity,
        port: target.port,
        ipv4: target.vip.is_ipv4(),
        seen: Arc::default(),
    }));
    let routed = Router::new(Fault::new(Timeout::new(Filters::new(Mirror::new(Retry::new(Split::new(upstream), shared.retry_budgets.clone()))))), Arc::new(lookup), target.port, info);
    let tracer = shared.tracers.live(src_w, Side::Client, peer, target.port);
    let stack = Record::new(Trace::new(routed, tracer), recorder);
    if let Err(e) = mesh_l7::server::serve(client, stack, &shared.server, drain.signaled()).await {
        inputs.metrics.http_connection_ended("outbound", &e);
        tracing::debug!(%peer, error = %e, "outbound HTTP connection ended with an error");
    }
}
