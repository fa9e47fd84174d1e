//! Tiny HTTP/1 server for the metrics and admin endpoints (plain text and JSON, no TLS).

use std::{convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::drain;

pub type Body = Full<Bytes>;

pub fn reply(code: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// A request reduced to what the handlers need. No handler takes a body (arguments are in the
/// query string), so none is read or buffered: a client cannot make these servers hold one.
pub struct Req {
    pub method: http::Method,
    pub path: String,
    pub query: String,
    pub authorization: Option<http::HeaderValue>,
}

/// A client must send its request headers within this (a slowloris holds a connection, and one
/// of the [`LIMITS`], only this long).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections the metrics and admin servers take at once: scrapers and operators, not traffic.
pub const LIMITS: crate::proxy::accept::Limits = crate::proxy::accept::Limits { max: 256, per_source: 32, rate: None };

/// Serves `handler` on `listener` (named `name` in logs and in `refused`) until drain, through
/// the proxy's one accept loop (its backoff keeps a full file table from spinning this loop;
/// connections beyond [`LIMITS`] are closed and counted in `refused`).
pub async fn serve<H, F>(listener: TcpListener, name: &'static str, refused: crate::proxy::accept::Refused, handler: Arc<H>, drain: drain::Watcher)
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    crate::proxy::accept::run(listener, name, LIMITS, refused, drain, move |tcp, _peer, watcher| {
        // A scraper's keep-alive connection must not hold the daemon's drain open.
        drop(watcher);
        let handler = handler.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let req = Req {
                        method: req.method().clone(),
                        path: req.uri().path().to_owned(),
                        query: req.uri().query().unwrap_or("").to_owned(),
                        authorization: req.headers().get(http::header::AUTHORIZATION).cloned(),
                    };
                    Ok::<_, Infallible>(handler(req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await;
}
