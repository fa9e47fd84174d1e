//! Upstream HTTP connections, pooled per key (the node's key names the client workload and the
//! endpoint, so one HTTP/1.1 connection or one HTTP/2 connection serves many requests to one
//! endpoint). How a connection is made (an HBONE stream, a TCP connection to a local pod) is the
//! [`Connect`] implementation's business.
//!
//! - HTTP/1.1: idle connections wait in a per-key stack; a request takes one (or dials), and the
//!   connection goes back when the response body has been read to its end. A connection whose
//!   response was not read to the end is closed, as its state is unknown. A pooled connection
//!   that turns out closed before the request was written is replaced, and the request sent on a
//!   new one (hyper hands it back unsent).
//! - HTTP/2: one connection per key, shared; it is replaced when it closes.
//! - Upgrades (WebSocket): a fresh HTTP/1.1 connection that is never pooled.

use std::{
    collections::HashMap,
    fmt::Debug,
    hash::Hash,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    body::{Body, BoxError},
    flags::ResponseFlag,
};

/// What is needed to send a request again: only for requests that may be (RFC 9110 9.2.2:
/// idempotent methods) and have no body to replay.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    limits: Option<ConnectionLimits>,
}

impl Replay {
    fn of(req: &Request<Body>) -> Option<Self> {
        use http::Method;
        let idempotent = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].contains(req.method());
        (idempotent && req.body().is_end_stream()).then(|| Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            limits: req.extensions().get::<ConnectionLimits>().copied(),
        })
    }

    fn request(self) -> Request<Body> {
        let mut req = Request::new(crate::body::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        if let Some(limits) = self.limits {
            req.extensions_mut().insert(limits);
        }
        req
    }
}

/// The connection closed after the request was written and before any response byte: what a
/// keep-alive connection closed by the server as the request crossed looks like.
fn closed_unanswered(e: &hyper::Error) -> bool {
    let reset = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe));
    e.is_incomplete_message() || e.is_canceled() || reset
}

/// Makes connections to an upstream named by a key.
pub trait Connect: Send + Sync + 'static {
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    fn connect(&self, key: &Self::Key) -> impl Future<Output = Result<Self::Io, BoxError>> + Send;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Idle HTTP/1.1 connections kept per key.
    pub max_idle_per_key: usize,
    /// An idle connection older than this is closed instead of reused.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_idle_per_key: 64,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Why a request got no response from upstream: the flag says which, Envoy's way.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting upstream: {0}")]
    Connect(#[source] BoxError),
    #[error("upstream HTTP handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream reset or closed before answering: {0}")]
    Reset(#[source] hyper::Error),
}

impl Error {
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::Connect(_) | Self::Handshake(_) => ResponseFlag::UpstreamConnectionFailure,
            Self::Reset(_) => ResponseFlag::UpstreamRemoteReset,
        }
    }
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
    /// Requests this connection has carried.
    uses: u32,
    idle_timeout: Duration,
}

/// Per-request settings of the HTTP/1.1 connection that carries it (a Service's
/// `connectionPool`), as a request extension: a connection that has carried `max_requests` is
/// closed instead of pooled, and an idle one is closed after `idle_timeout` (instead of the
/// pool's). HTTP/2 connections are shared by many requests and keep the pool's settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_requests: Option<u32>,
    pub idle_timeout: Option<Duration>,
}

type H2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

struct Inner<C: Connect> {
    connect: C,
    cfg: Config,
    idle: Mutex<HashMap<C::Key, Vec<Idle>>>,
    h2: Mutex<HashMap<C::Key, H2Slot>>,
}

pub struct Pool<C: Connect> {
    inner: Arc<Inner<C>>,
}

impl<C: Connect> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Whether a request asks to switch protocols (WebSocket and friends): it needs a connection
/// of its own.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(http::header::UPGRADE)
}

impl<C: Connect> Pool<C> {
    pub fn new(connect: C, cfg: Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                connect,
                cfg,
                idle: Mutex::default(),
                h2: Mutex::default(),
            }),
        }
    }

    /// Sends `req` to the upstream named by `key` over `version`. The request must already be in
    /// the form the version needs (see [`crate::forward`]).
    pub async fn send(
        &self,
        key: &C::Key,
        version: Version,
        req: Request<Body>,
    ) -> Result<Response<Body>, Error> {
        match version {
            Version::Http2 => self.send_h2(key, req).await,
            Version::Http1 if is_upgrade(&req) => self.send_upgrade(key, req).await,
            Version::Http1 => self.send_h1(key, req).await,
        }
    }

    async fn send_h1(&self, key: &C::Key, mut req: Request<Body>) -> Result<Response<Body>, Error> {
        let limits = req
            .extensions()
            .get::<ConnectionLimits>()
            .copied()
            .unwrap_or_default();
        // A pooled connection may have been closed by the peer since; hyper gives the request
        // back when it was not written, and it goes out on a fresh connection. When it was
        // written and the connection closed with no response at all, the server closed its
        // idle connection as the request crossed (RFC 9112 9.3.1; every draining server does
        // this): a request that can be sent again (idempotent, no body) goes once more on a
        // fresh connection, as curl, browsers and Go's client do.
        while let Some((mut sender, uses)) = self.take_idle(key) {
            if sender.ready().await.is_err() {
                continue;
            }
            let replay = Replay::of(&req);
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.recycle(key, sender, uses + 1, limits, resp)),
                Err(mut e) => match (e.take_message(), replay) {
                    (Some(unsent), _) => req = unsent,
                    (None, Some(replay)) if closed_unanswered(e.error()) => req = replay.request(),
                    (None, _) => return Err(Error::Reset(e.into_error())),
                },
            }
        }
        let io = self
            .inner
            .connect
            .connect(key)
            .await
            .map_err(Error::Connect)?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(Error::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        let resp = sender.send_request(req).await.map_err(Error::Reset)?;
        Ok(self.recycle(key, sender, 1, limits, resp))
    }

    async fn send_upgrade(
        &self,
        key: &C::Key,
        req: Request<Body>,
    ) -> Result<Response<Body>, Error> {
        let io = self
            .inner
            .connect
            .connect(key)
            .await
            .map_err(Error::Connect)?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(Error::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgraded connection ended");
            }
        });
        let resp = sender.send_request(req).await.map_err(Error::Reset)?;
        Ok(resp.map(crate::body::boxed))
    }

    async fn send_h2(&self, key: &C::Key, req: Request<Body>) -> Result<Response<Body>, Error> {
        let slot = self
            .inner
            .h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let mut sender = {
            let mut current = slot.lock().await;
            if let Some(s) = current.as_ref().filter(|s| !s.is_closed()) {
                s.clone()
            } else {
                {
                    let io = self
                        .inner
                        .connect
                        .connect(key)
                        .await
                        .map_err(Error::Connect)?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(Error::Handshake)?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    *current = Some(sender.clone());
                    sender
                }
            }
        };
        let resp = sender.send_request(req).await.map_err(Error::Reset)?;
        Ok(resp.map(crate::body::boxed))
    }

    fn take_idle(&self, key: &C::Key) -> Option<(http1::SendRequest<Body>, u32)> {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stack = idle.get_mut(key)?;
        while let Some(c) = stack.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < c.idle_timeout {
                return Some((c.sender, c.uses));
            }
        }
        idle.remove(key);
        None
    }

    /// The response, whose body returns the connection to the pool when read to its end.
    fn recycle(
        &self,
        key: &C::Key,
        sender: http1::SendRequest<Body>,
        uses: u32,
        limits: ConnectionLimits,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        if limits.max_requests.is_some_and(|max| uses >= max) {
            // Used up: closed when the response is done with it (dropping the sender).
            return resp.map(crate::body::boxed);
        }
        if resp.body().is_end_stream() {
            // No body (204, 304, Content-Length: 0): nothing will poll it to its end.
            self.put_idle(key.clone(), sender, uses, limits);
            return resp.map(crate::body::boxed);
        }
        let pool = self.clone();
        let key = key.clone();
        resp.map(|body| {
            crate::body::boxed(Recycle {
                body,
                on_end: Some(Box::new(move |sender| {
                    pool.put_idle(key, sender, uses, limits);
                })),
                sender: Some(sender),
            })
        })
    }

    fn put_idle(
        &self,
        key: C::Key,
        sender: http1::SendRequest<Body>,
        uses: u32,
        limits: ConnectionLimits,
    ) {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stack = idle.entry(key).or_default();
        if stack.len() < self.inner.cfg.max_idle_per_key {
            stack.push(Idle {
                sender,
                since: Instant::now(),
                uses,
                idle_timeout: limits.idle_timeout.unwrap_or(self.inner.cfg.idle_timeout),
            });
        }
    }

    /// Drops idle connections past the idle timeout or closed; run periodically.
    pub fn reap(&self) {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, stack| {
                stack.retain(|c| !c.sender.is_closed() && c.since.elapsed() < c.idle_timeout);
                !stack.is_empty()
            });
        self.inner
            .h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, slot| {
                slot.try_lock()
                    .map_or(true, |s| s.as_ref().is_some_and(|s| !s.is_closed()))
            });
    }

    /// Idle HTTP/1.1 connections and HTTP/2 connections held (tests, metrics).
    pub fn size(&self) -> (usize, usize) {
        let idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum();
        let h2 = self
            .inner
            .h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        (idle, h2)
    }
}

type OnEnd = Box<dyn FnOnce(http1::SendRequest<Body>) + Send>;

/// A response body that hands its connection back when it ends cleanly.
struct Recycle {
    body: Incoming,
    sender: Option<http1::SendRequest<Body>>,
    on_end: Option<OnEnd>,
}

impl http_body::Body for Recycle {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.sender = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Recycle {
    fn finish(&mut self) {
        if let (Some(sender), Some(on_end)) = (self.sender.take(), self.on_end.take()) {
            on_end(sender);
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
