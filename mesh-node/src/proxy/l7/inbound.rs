//! The destination side of HTTP: requests arriving for a local pod (inside an HBONE stream, on a
//! plaintext connection, or handed over by this node's own outbound for a same-node endpoint)
//! are recorded with `reporter=destination`, authorized one by one against the latest policies,
//! and forwarded to the pod over pooled connections.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::Request;
use mesh_l7::{
    AppProtocol,
    jwt::{self, RequestAuth},
    body::{Body, BoxError},
    client::{self, Connect},
    layer::{
        BoxHttp,
        authenticate::{Authenticate, AuthenticateLayer},
        authorize::{Authorize, AuthorizeLayer, Denied},
        rate_limit::{Buckets, Decision, Limiter, RateLimitLayer},
        trace::Trace,
    },
    policy::RateLimitKey,
    metrics::SecurityPolicy,
    record::{Record, Recorder},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    Shared,
    destination::{ByHost, Candidates},
};
use crate::{
    authn::{self, JwksCache},
    authz,
    drain,
    identity::Identity,
    proxy::{
        Inputs,
        authorize::{authorize, pod_source},
        metrics::{Peer, ReasonLabel, Reporter, peer_labels, set_service},
        socket,
    },
    state::{State, Workload},
    telemetry::policy::{Side, access_log_for},
};

/// Connections to local pods, from the client's address in transparent mode.
pub struct PodConnector {
    pub connect_timeout: Duration,
    /// `SO_MARK` of the connections (see `socket::connect`).
    pub mark: u32,
}

/// A connection to `dst`, made from `src` when given (transparent mode).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodKey {
    pub src: Option<IpAddr>,
    pub dst: SocketAddr,
}

impl Connect for PodConnector {
    type Key = PodKey;
    type Io = TcpStream;

    async fn connect(&self, key: &PodKey) -> Result<TcpStream, BoxError> {
        let connecting = socket::connect(key.src, key.dst, self.mark);
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(format!("timed out connecting to {}", key.dst).into()),
        }
    }
}

/// Who is calling, as the destination knows it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The authenticated identity; `None` for plaintext.
    pub identity: Option<Identity>,
    /// The client workload, when known.
    pub workload: Option<Workload>,
    pub ip: IpAddr,
}

/// The node's evaluator for one caller and one local workload, per request, on the latest
/// policies.
struct NodeAuthz {
    inputs: Inputs,
    caller: Caller,
    dst: Workload,
    dst_port: u16,
}

impl Authorize for NodeAuthz {
    fn check(&self, req: &Request<Body>) -> Result<(), Denied> {
        let state = self.inputs.state.borrow().clone();
        let http = authz::HttpRequest {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: mesh_l7::route::filter::authority(req),
            headers: req.headers(),
            auth: req.extensions().get::<RequestAuth>(),
        };
        let conn = authz::Conn {
            src_identity: self.caller.identity.as_ref(),
            src_ip: self.caller.ip,
            dst: &self.dst,
            dst_port: self.dst_port,
            http: Some(http),
        };
        authorize(&self.inputs, &state, &conn).map_err(|reason| Denied { reason })
    }
}

/// The node's side of end-user authentication: the JWT providers of the RequestAuthentications
/// selecting the local workload (from the latest config), with keys from the node's cache.
struct NodeAuthn {
    inputs: Inputs,
    jwks: Arc<JwksCache>,
    dst: Workload,
}

impl Authenticate for NodeAuthn {
    fn authenticate(&self, req: &mut Request<Body>) -> Result<Option<RequestAuth>, jwt::Error> {
        let state = self.inputs.state.borrow().clone();
        if state.request_authn.is_empty() {
            return Ok(None);
        }
        let providers = authn::providers_for(&state.request_authn, &state.root_namespace, &self.dst);
        if providers.is_empty() {
            return Ok(None);
        }
        let result = jwt::authenticate(&providers, &*self.jwks, req);
        if let Err(e) = &result {
            self.inputs.metrics.jwt_failures.get_or_create(&ReasonLabel { reason: e.as_label() }).inc();
            tracing::info!(reason = e.as_label(), dst = %self.dst.ip, path = req.uri().path(), "request refused: {e}");
        }
        result
    }
}

/// The node's side of local rate limiting: the limit on the pod (from the latest config) and
/// the bucket key of each request.
struct NodeLimiter {
    inputs: Inputs,
    buckets: Arc<Buckets>,
    /// The caller's SPIFFE identity; `None` for plaintext (which then shares one bucket).
    caller: Option<String>,
    pod: IpAddr,
}

impl Limiter for NodeLimiter {
    fn check(&self, req: &Request<Body>) -> Option<Decision> {
        let state = self.inputs.state.borrow().clone();
        let (scope, limit) = state.rate_limit_at(self.pod)?;
        let key = match &limit.key {
            RateLimitKey::None => None,
            RateLimitKey::SourcePrincipal => Some(self.caller.as_deref().unwrap_or("")),
            RateLimitKey::RequestHeader(h) => Some(req.headers().get(h.as_str()).and_then(|v| v.to_str().ok()).unwrap_or("")),
        };
        Some(self.buckets.take(scope, limit, key, std::time::Instant::now()))
    }
}

/// Forwards to one local pod through the shared pod pool.
#[derive(Clone)]
struct ToPod {
    shared: Arc<Shared>,
    key: PodKey,
    version: client::Version,
}

impl tower::Service<Request<Body>> for ToPod {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(mesh_l7::forward::send(&this.shared.pods, &this.key, this.version, req).await) })
    }
}

/// The version the pod speaks on `port`.
pub fn version(protocol: AppProtocol) -> client::Version {
    if protocol.upstream_h2() { client::Version::Http2 } else { client::Version::Http1 }
}

/// The destination stack for requests from `caller` to the local workload `dst_w` at `dst`:
/// record (destination reporter) → trace (server span) → the Service the host names
/// ([`super::destination`]) → authenticate (JWT) → authorize → rate limit → the pod.
pub fn local_stack(inputs: &Inputs, shared: &Arc<Shared>, state: &State, caller: Caller, dst_w: &Workload, dst: SocketAddr, kind: &'static str) -> BoxHttp {
    let mtls = if caller.identity.is_some() { SecurityPolicy::mutual_tls } else { SecurityPolicy::unknown };
    let dst_id = state.identity(dst_w);
    let mut base = peer_labels(
        Reporter::destination,
        Peer { workload: caller.workload.as_ref(), identity: caller.identity.as_ref() },
        Peer { workload: Some(dst_w), identity: Some(&dst_id) },
        mtls,
        &inputs.cfg.cluster_id,
    );
    set_service(&mut base, state.serving(dst).map(|(s, _)| s), &inputs.cfg.cluster_domain);
    let by_host = Candidates::new(state, dst, &dst_w.namespace, &base, &inputs.cfg.cluster_domain);
    let access_log = access_log_for(&state.telemetry, &state.root_namespace, dst_w);
    let recorder = Recorder::with_access_log(inputs.metrics.requests.clone(), Arc::new(base), kind, SocketAddr::new(caller.ip, 0), access_log);
    let to_pod = ToPod {
        shared: shared.clone(),
        key: PodKey { src: pod_source(inputs, state, caller.ip), dst },
        version: version(state.app_protocol_at(dst)),
    };
    let limiter = NodeLimiter { inputs: inputs.clone(), buckets: shared.rate_limits.clone(), caller: caller.identity.as_ref().map(Identity::to_string), pod: dst.ip() };
    let authn = NodeAuthn { inputs: inputs.clone(), jwks: shared.jwks.clone(), dst: dst_w.clone() };
    let tracer = shared.tracers.live(dst_w, Side::Server, SocketAddr::new(caller.ip, 0), dst.port());
    let authz = NodeAuthz { inputs: inputs.clone(), caller, dst: dst_w.clone(), dst_port: dst.port() };
    let authorized = AuthorizeLayer::new(RateLimitLayer::new(to_pod, Arc::new(limiter)), Arc::new(authz));
    BoxHttp::new(Record::new(Trace::new(ByHost::new(AuthenticateLayer::new(authorized, Arc::new(authn)), by_host), tracer), recorder))
}

/// Serves the requests of one connection (an HBONE stream or plaintext) to a local pod;
/// `direction` names it in metrics.
pub async fn serve<I>(io: I, stack: BoxHttp, cfg: &mesh_l7::server::Config, drain: &drain::Watcher, metrics: &crate::proxy::metrics::Metrics, direction: &'static str)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Err(e) = mesh_l7::server::serve(io, stack, cfg, drain.signaled()).await {
        metrics.http_connection_ended(direction, &e);
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}
