//! Tiny HTTP/1 server for the metrics and admin endpoints (plain text and JSON, no TLS).

use std::{convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain;

pub type Body = Full<Bytes>;

pub fn reply(code: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// A request reduced to what the handlers need (bodies are small).
pub struct Req {
    pub method: http::Method,
    pub path: String,
    pub query: String,
    pub body: Bytes,
}

/// Connections the metrics and admin servers take at once: scrapers and operators, not traffic.
pub const LIMITS: crate::proxy::accept::Limits = crate::proxy::accept::Limits { max: 256, per_source: 32 };

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
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
                    let req = Req {
                        method: parts.method,
                        path: parts.uri.path().to_owned(),
                        query: parts.uri.query().unwrap_or("").to_owned(),
                        body,
                    };
                    Ok::<_, Infallible>(handler(req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        }
    })
    .await;
}
