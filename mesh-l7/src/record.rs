//! The outermost layer of both stacks: Istio's request metrics and one access-log line per
//! request, written when the response body has ended (or the client went away), so durations
//! and byte counts cover the whole exchange, streams included.
//!
//! Inner layers say what happened through response extensions: a [`ResponseFlag`], the
//! [`Peers`] the request reached, the [`Upstream`] endpoint, the route taken
//! ([`crate::route::Selected`]).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderMap, Request, Response};
use http_body::{Body as _, Frame, SizeHint};

use crate::{
    body::{self, Body, BodyError},
    flags::{self, DelayInjected, ResponseFlag},
    layer::retry::{Attempts, RetriesExhausted},
    metrics::{Handles, PeerLabels, RequestLabels, RequestMetrics},
    protocol,
    route::Selected,
};

/// The peers a response came from (set by the layer that chose the endpoint).
#[derive(Clone, Debug)]
pub struct Peers(pub Arc<PeerLabels>);

/// The endpoint that answered.
#[derive(Clone, Copy, Debug)]
pub struct Upstream(pub SocketAddr);

/// One connection's recorder: what is known before any request, and the metric handles its
/// requests resolved (label sets are hashed once per connection and outcome, not per request).
pub struct Recorder {
    metrics: Arc<RequestMetrics>,
    /// Labels when the response names no peers (no route, a redirect, a denial).
    base: Arc<PeerLabels>,
    /// `outbound`, `inbound`, `same-node`, `inbound-plaintext`: the access log's `kind`.
    kind: &'static str,
    src: SocketAddr,
    /// Whether requests get an access-log line (a Telemetry's `accessLogging` may turn it off).
    access_log: bool,
    /// Keyed by the peers' address: the entry holds the `Arc` so the address stays theirs.
    cache: Mutex<HashMap<CacheKey, (Arc<PeerLabels>, Handles)>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    peers: usize,
    protocol: &'static str,
    code: u16,
    grpc: Arc<str>,
    flags: &'static str,
}

impl Recorder {
    pub fn new(
        metrics: Arc<RequestMetrics>,
        base: Arc<PeerLabels>,
        kind: &'static str,
        src: SocketAddr,
    ) -> Arc<Self> {
        Self::with_access_log(metrics, base, kind, src, true)
    }

    /// A recorder whose requests get access-log lines only if `access_log`.
    pub fn with_access_log(
        metrics: Arc<RequestMetrics>,
        base: Arc<PeerLabels>,
        kind: &'static str,
        src: SocketAddr,
        access_log: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            base,
            kind,
            src,
            access_log,
            cache: Mutex::default(),
        })
    }

    fn handles(
        &self,
        peers: &Arc<PeerLabels>,
        protocol: &'static str,
        code: u16,
        grpc: &Arc<str>,
        flags: &'static str,
    ) -> Handles {
        let key = CacheKey {
            peers: Arc::as_ptr(peers) as usize,
            protocol,
            code,
            grpc: grpc.clone(),
            flags,
        };
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, h)) = cache.get(&key) {
            return h.clone();
        }
        let labels = RequestLabels {
            peers: PeerLabels::clone(peers),
            request_protocol: protocol,
            response_code: code,
            grpc_response_status: grpc.clone(),
            response_flags: flags,
        };
        let h = self.metrics.handles(&labels);
        if cache.len() < 1024 {
            cache.insert(key, (peers.clone(), h.clone()));
        }
        h
    }
}

/// The record layer over `S`.
#[derive(Clone)]
pub struct Record<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

impl<S> Record<S> {
    pub fn new(inner: S, recorder: Arc<Recorder>) -> Self {
        Self { inner, recorder }
    }
}

/// What the access log says about the request, captured before it goes on.
struct RequestInfo {
    /// What the access log prints, captured only while it is on (`MESH_LOG` may turn the
    /// `access` target off, and then a request costs no string copies).
    log: Option<LogInfo>,
    protocol: &'static str,
    received: Arc<AtomicU64>,
    start: Instant,
}

struct LogInfo {
    method: http::Method,
    authority: Option<String>,
    path: String,
    version: http::Version,
}

impl<S> tower::Service<Request<Body>> for Record<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (req, received) = counted(req);
        let log = (self.recorder.access_log
            && tracing::enabled!(target: "access", tracing::Level::INFO))
        .then(|| LogInfo {
            method: req.method().clone(),
            authority: crate::route::filter::authority(&req).map(str::to_owned),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            version: req.version(),
        });
        let info = RequestInfo {
            log,
            protocol: protocol::request_protocol(req.headers()),
            received,
            start: Instant::now(),
        };
        let recorder = self.recorder.clone();
        Box::pin(self.inner.call(req).map(move |Ok(resp)| {
            let (parts, inner) = resp.into_parts();
            let done = Done {
                recorder,
                info,
                status: parts.status.as_u16(),
                flags: Flags::of(&parts.extensions),
                attempts: parts.extensions.get::<Attempts>().copied(),
                peers: parts.extensions.get::<Peers>().map(|p| p.0.clone()),
                upstream: parts.extensions.get::<Upstream>().map(|u| u.0),
                route: parts.extensions.get::<Selected>().cloned(),
                grpc: grpc_status(&parts.headers),
            };
            Ok(Response::from_parts(parts, watch(inner, done)))
        }))
    }
}

/// `req` with its body counted as it streams through, and the counter.
pub(crate) fn counted(req: Request<Body>) -> (Request<Body>, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let req = req.map(|b| {
        body::boxed(Count {
            inner: b,
            count: count.clone(),
        })
    });
    (req, count)
}

/// The response flags a response carries in its extensions, as inner layers left them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Flags {
    flag: Option<ResponseFlag>,
    delayed: bool,
    exhausted: bool,
}

impl Flags {
    pub(crate) fn of(ext: &http::Extensions) -> Self {
        Self {
            flag: ext.get::<ResponseFlag>().copied(),
            delayed: ext.get::<DelayInjected>().is_some(),
            exhausted: ext.get::<RetriesExhausted>().is_some(),
        }
    }

    /// The `response_flags` value; a response whose body did not complete and that carries no
    /// flag of its own is `DC` (the client went away).
    pub(crate) fn label(self, complete: bool) -> &'static str {
        let flag = match self.flag {
            Some(f) => Some(f),
            None if !complete => Some(ResponseFlag::DownstreamConnectionTermination),
            None => None,
        };
        flags::label(flag, self.delayed, self.exhausted)
    }
}

pub(crate) fn grpc_status(h: &HeaderMap) -> Option<Arc<str>> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(Arc::from)
}

/// Counts a request body's bytes as they stream through.
struct Count {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl http_body::Body for Count {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Everything needed to record the request once its response has ended.
struct Done {
    recorder: Arc<Recorder>,
    info: RequestInfo,
    status: u16,
    flags: Flags,
    attempts: Option<Attempts>,
    peers: Option<Arc<PeerLabels>>,
    upstream: Option<SocketAddr>,
    route: Option<Selected>,
    grpc: Option<Arc<str>>,
}

impl OnEnd for Done {
    fn grpc(&mut self, status: Arc<str>) {
        self.grpc = Some(status);
    }

    fn finish(self, sent: u64, complete: bool) {
        let r = &self.recorder;
        let flags = self.flags.label(complete);
        let peers = self.peers.as_ref().unwrap_or(&r.base);
        let grpc = match (&self.grpc, self.info.protocol) {
            (Some(g), _) => g.clone(),
            // A gRPC call that ended without a status (the stream broke): UNKNOWN, as Envoy reports.
            (None, "grpc") => Arc::from("2"),
            (None, _) => Arc::from(""),
        };
        let received = self.info.received.load(Ordering::Relaxed);
        let elapsed = self.info.start.elapsed();
        let h = r.handles(peers, self.info.protocol, self.status, &grpc, flags);
        h.requests.inc();
        h.duration.observe(elapsed.as_secs_f64() * 1000.0);
        #[expect(clippy::cast_precision_loss, reason = "histogram observations are f64")]
        {
            h.request_bytes.observe(received as f64);
            h.response_bytes.observe(sent as f64);
        }
        let Some(log) = &self.info.log else { return };
        tracing::info!(
            target: "access",
            kind = r.kind,
            src.addr = %r.src,
            src.workload = %peers.source_workload,
            src.namespace = %peers.source_workload_namespace,
            src.identity = %peers.source_principal,
            method = %log.method,
            authority = log.authority.as_deref().unwrap_or("-"),
            path = %log.path,
            protocol = ?log.version,
            status = self.status,
            grpc_status = %grpc,
            flags,
            duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            upstream = %self.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string()),
            dst.service = %peers.destination_service,
            dst.workload = %peers.destination_workload,
            dst.identity = %peers.destination_principal,
            route = %self.route.as_ref().map_or_else(|| "-".to_owned(), |s| s.route().source.to_string()),
            attempts = self.attempts.map_or(1, |a| a.count),
            not_retried = self.attempts.and_then(|a| a.not_retried).unwrap_or("-"),
            bytes_received = received,
            bytes_sent = sent,
            "request complete"
        );
    }
}

/// What a [`watch`]ed response body reports when it ends.
pub(crate) trait OnEnd: Send + Unpin + 'static {
    /// A gRPC status arrived in the trailers.
    fn grpc(&mut self, status: Arc<str>);
    /// The body ended after `sent` bytes: `complete`, or failed or dropped before its end.
    fn finish(self, sent: u64, complete: bool);
}

/// `inner`, counted; `done` is told once, when it ends or is dropped.
pub(crate) fn watch<D: OnEnd>(inner: Body, done: D) -> Body {
    body::boxed(Watched {
        inner,
        sent: 0,
        done: Some(done),
    })
}

/// The response body, counted; reports the request when it ends or is dropped.
struct Watched<D: OnEnd> {
    inner: Body,
    sent: u64,
    done: Option<D>,
}

impl<D: OnEnd> http_body::Body for Watched<D> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                }
                if let Some(t) = f.trailers_ref()
                    && let (Some(done), Some(g)) = (this.done.as_mut(), grpc_status(t))
                {
                    done.grpc(g);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<D: OnEnd> Watched<D> {
    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done.finish(self.sent, complete);
        }
    }
}

impl<D: OnEnd> Drop for Watched<D> {
    fn drop(&mut self) {
        // An empty body may never be polled: it ended as soon as it began.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
