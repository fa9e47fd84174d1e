//! Serving one downstream connection: HTTP/1.1 (keep-alive, pipelining, upgrades) or HTTP/2
//! (prior knowledge), told apart by the HTTP/2 preface, requests handed to a stack. On drain the
//! connection is shut down gracefully: HTTP/1.1 responses say `connection: close` from then
//! on, so a busy client moves to a new connection between two requests of its own; after
//! [`DRAIN_GRACE`], idle HTTP/1.1 connections are closed and HTTP/2 ones get GOAWAY.
//! HTTP/1.1 request headers have their own deadline from their first byte ([`header_timeout`]),
//! apart from the idle timeout between requests.

pub mod header_timeout;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{HeaderValue, Request, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{body, layer::HttpService};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// A client must send a request's headers within this after connecting or after the
    /// previous response (HTTP/1.1): hyper's timer also runs while a kept-alive connection is
    /// idle, so it is the idle timeout too. `None` leaves idle closes to the client (the mesh's
    /// own pools do their closing themselves).
    pub header_read_timeout: Option<Duration>,
    /// An HTTP/1.1 request's headers must be complete within this of their first byte
    /// ([`header_timeout`]): a client that trickles them (a slowloris) is closed. `None`: only
    /// `header_read_timeout` bounds them.
    pub request_header_timeout: Option<Duration>,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
}

impl Default for Config {
    fn default() -> Self {
        // An hour, as Envoy's idle timeout for downstream connections: a pod's HTTP client keeps
        // idle connections far longer than hyper's 30 s default would allow it to.
        Self {
            header_read_timeout: Some(Duration::from_hours(1)),
            // Go's servers are usually given a few seconds; Envoy has no default. A client sends
            // its headers at once: 10 s is far beyond any real one, as for TLS handshakes.
            request_header_timeout: Some(Duration::from_secs(10)),
            max_concurrent_streams: 1000,
            stream_window: 1 << 20,
            connection_window: 4 << 20,
        }
    }
}

/// How long a draining connection keeps serving before it is shut down. Closing an idle
/// HTTP/1.1 connection races with a request the client may be sending on it (which then fails);
/// in this time a client that sends requests learns from a response to open a new connection
/// instead.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

fn builder(cfg: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true)
        // Pipelined requests: answer them with one write where they arrive together.
        .pipeline_flush(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window);
    b
}

/// The connection as served (with or without the header deadline).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serves `io` until the client is done or `drain` resolves (then gracefully).
pub async fn serve<I, S>(
    io: I,
    svc: S,
    cfg: &Config,
    drain: impl Future<Output = ()>,
) -> Result<(), body::BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let draining = Arc::new(AtomicBool::new(false));
    let closing = draining.clone();
    // The header deadline and what it learns from the service; nothing without one.
    let deadline = cfg
        .request_header_timeout
        .map(|limit| (limit, Arc::new(header_timeout::Requests::default())));
    let timed = deadline.as_ref().map(|(_, requests)| requests.clone());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let http1 = req.version() < Version::HTTP_2;
        // In flight until its response body is written: the header deadline waits for it.
        let in_flight = timed.as_ref().map(header_timeout::Requests::begin);
        let connect = req.method() == http::Method::CONNECT;
        let answer = tower::ServiceExt::oneshot(svc.clone(), req.map(body::boxed));
        let (closing, timed) = (closing.clone(), timed.clone());
        async move {
            let Ok(mut resp) = answer.await;
            let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && resp.status().is_success());
            if upgraded && let Some(requests) = &timed {
                requests.pass_through();
            }
            if http1 && closing.load(Ordering::Relaxed) && !upgraded {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let resp = match in_flight {
                Some(guard) => resp.map(|b| body::holding(b, guard)),
                None => resp,
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let b = builder(cfg);
    let io: Box<dyn Io> = match deadline {
        Some((limit, requests)) => {
            Box::new(header_timeout::HeaderDeadline::new(io, limit, requests))
        }
        None => Box::new(io),
    };
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = drain => {
            draining.store(true, Ordering::Relaxed);
            tokio::select! {
                r = conn.as_mut() => return r,
                () = tokio::time::sleep(DRAIN_GRACE) => {}
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
