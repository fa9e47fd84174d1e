//! `mesh-whoami zipkin --listen ADDR`: a small Zipkin-compatible collector for the lab and the
//! e2e suite (no Zipkin or Jaeger package is reachable here). It keeps the spans POSTed to
//! `/api/v2/spans` (Zipkin JSON v2) in memory, at most [`MAX_SPANS`], and serves them back with
//! Zipkin's query API: `GET /api/v2/traces` (every trace, an array of span arrays, newest
//! first) and `GET /api/v2/trace/<traceId>`. Spans are kept as received (any JSON object).

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

/// Oldest spans are dropped past this many.
pub const MAX_SPANS: usize = 100_000;
/// Largest POST body accepted.
const MAX_BODY: usize = 16 << 20;

#[derive(Default)]
struct Store {
    spans: VecDeque<serde_json::Value>,
}

/// Serves until killed.
///
/// # Panics
/// When no tokio runtime can be built.
pub fn run(listen: SocketAddr) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a tokio runtime starts");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mesh-whoami zipkin: binding {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("listening zipkin {}", listener.local_addr().unwrap_or(listen));
        let store = Arc::new(Mutex::new(Store::default()));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(Arc::clone(&store), req));
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

async fn handle(store: Arc<Mutex<Store>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let lock = |s: &Arc<Mutex<Store>>| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).spans.clone();
    Ok(match (req.method().clone(), path.as_str()) {
        (Method::POST, "/api/v2/spans") => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(reply(StatusCode::BAD_REQUEST, format!("{{\"error\":\"reading the body: {e}\"}}"))),
            };
            match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
                Ok(spans) => {
                    let mut s = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    println!("received spans={}", spans.len());
                    s.spans.extend(spans);
                    while s.spans.len() > MAX_SPANS {
                        s.spans.pop_front();
                    }
                    reply(StatusCode::ACCEPTED, "")
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, format!("{{\"error\":\"not a Zipkin v2 JSON span array: {e}\"}}")),
            }
        }
        (Method::GET, "/api/v2/traces") => {
            let mut traces: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
            let mut order = Vec::new();
            for span in lock(&store).into_iter().rev() {
                let id = span.get("traceId").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                if !traces.contains_key(&id) {
                    order.push(id.clone());
                }
                traces.entry(id).or_default().push(span);
            }
            let all: Vec<Vec<serde_json::Value>> = order.iter().filter_map(|id| traces.remove(id)).collect();
            reply(StatusCode::OK, serde_json::to_vec(&all).unwrap_or_default())
        }
        (Method::GET, p) if p.starts_with("/api/v2/trace/") => {
            let id = &p["/api/v2/trace/".len()..];
            let spans: Vec<serde_json::Value> = lock(&store).into_iter().filter(|s| s.get("traceId").and_then(|v| v.as_str()) == Some(id)).collect();
            if spans.is_empty() {
                reply(StatusCode::NOT_FOUND, format!("{{\"error\":\"no trace {id}\"}}"))
            } else {
                reply(StatusCode::OK, serde_json::to_vec(&spans).unwrap_or_default())
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "{\"error\":\"POST /api/v2/spans, GET /api/v2/traces, GET /api/v2/trace/<id>\"}"),
    })
}
