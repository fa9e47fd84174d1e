//! HTTP/1.1 (keep-alive, pipelining) and h2c with prior knowledge on one port: hyper-util's
//! auto server tells them apart by the HTTP/2 preface, as a mesh's h2c upstream would.
//!
//! | request | answer |
//! |---|---|
//! | `/ws` with `Upgrade: websocket` | WebSocket echo ([`super::ws`]) |
//! | `POST` or `PUT /upload` | `{"bytes":N,"sha256":"<hex>"}`, the body hashed as it streams in |
//! | `/status/<code>` (200..=599) | that status, with the JSON below |
//! | `/flaky/<n>/<code>` | `<code>` for the first `n` requests with this path and query, then the JSON below |
//! | `/random/<percent>/<code>` | `<code>` for about `percent` % of requests (drawn per request), else the JSON below |
//! | `/delay/<ms>` | the JSON below after `ms` milliseconds (at most 300 s) |
//! | `/bytes/<n>` | `n` bytes, `abc..z` repeated, streamed in chunks (no Content-Length) |
//! | `/call/<ip:port>/<path>` | calls `http://<ip:port>/<path>` (HTTP/1.1) forwarding the trace headers, as an app in a traced mesh must; answers `{"pod":..,"status":N,"called":<its body>}` |
//! | anything else | `200` (or `--http-status`) and [`Seen`] as JSON, one line |
//!
//! Every answer carries `x-whoami-pod` and `x-whoami-version` (for clients that count
//! backends without parsing bodies, like `http-load`). Request bodies are read (and counted)
//! before answering, never held whole.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

use super::{App, Seen, unmap, ws};

/// Response header naming the pod that answered.
pub const POD_HEADER: &str = "x-whoami-pod";
/// Response header carrying the server's `--version`.
pub const VERSION_HEADER: &str = "x-whoami-version";

pub type Body = BoxBody<Bytes, Infallible>;

/// Longest `/delay/<ms>` honoured: a typo must not park a test for hours.
const MAX_DELAY: Duration = Duration::from_mins(5);
/// `/bytes/<n>` chunk size: a multiple of 26, so every chunk continues the a..z pattern.
const CHUNK: usize = 26 * 2520;

/// Accepts connections until the runtime stops.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors and the like: back off instead of spinning on accept.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let peer = unmap(peer);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&app), peer, req));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // Pipelined requests: their answers leave in one write instead of one each.
            builder.http1().pipeline_flush(true);
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(app: Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut seen = seen(&app, peer, &req);
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        app.record(&seen);
        return Ok(ws::accept(&app, req));
    }
    let upload = path == "/upload" && matches!(*req.method(), Method::POST | Method::PUT);
    let mut sha256 = upload.then(|| ring::digest::Context::new(&ring::digest::SHA256));
    let read = read_body(req.into_body(), |chunk| {
        if let Some(hash) = &mut sha256 {
            hash.update(chunk);
        }
    })
    .await;
    seen.body_bytes = match read {
        Ok(n) => n,
        Err(e) => return Ok(text(StatusCode::BAD_REQUEST, &app, &format!("reading the request body: {e}"))),
    };
    app.record(&seen);
    if let Some(hash) = sha256 {
        let digest = hash.finish().as_ref().iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        });
        return Ok(json(StatusCode::OK, &app, &serde_json::json!({ "bytes": seen.body_bytes, "sha256": digest })));
    }
    let ok = app.faults.http_status;
    if let Some(code) = path.strip_prefix("/status/") {
        return Ok(match status(code) {
            Some(status) => json(status, &app, &seen),
            None => text(StatusCode::BAD_REQUEST, &app, &format!("/status/<code> needs a code in 200..=599, not {code:?}")),
        });
    }
    if let Some(spec) = path.strip_prefix("/flaky/") {
        let Some((times, code)) = spec.split_once('/').and_then(|(n, code)| Some((n.parse::<u32>().ok()?, status(code)?))) else {
            return Ok(text(StatusCode::BAD_REQUEST, &app, &format!("/flaky/<n>/<code> needs a count and a code in 200..=599, not {spec:?}")));
        };
        // Keyed by path and query, so each test (or request id) gets its own count.
        let attempt = app.attempt(&format!("{path}?{}", seen.query));
        return Ok(json(if attempt <= times { code } else { ok }, &app, &seen));
    }
    if let Some(spec) = path.strip_prefix("/random/") {
        let Some((percent, code)) = spec.split_once('/').and_then(|(p, code)| Some((p.parse::<u32>().ok().filter(|p| *p <= 100)?, status(code)?))) else {
            return Ok(text(StatusCode::BAD_REQUEST, &app, &format!("/random/<percent>/<code> needs 0..=100 and a code in 200..=599, not {spec:?}")));
        };
        return Ok(json(if fastrand::u32(0..100) < percent { code } else { ok }, &app, &seen));
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return Ok(text(StatusCode::BAD_REQUEST, &app, &format!("/delay/<ms> needs milliseconds, not {ms:?}")));
        };
        tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await;
        return Ok(json(ok, &app, &seen));
    }
    if let Some(spec) = path.strip_prefix("/call/") {
        return Ok(call(&app, spec, &seen).await);
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return Ok(match n.parse::<u64>() {
            Ok(n) => bytes(&app, n),
            Err(_) => text(StatusCode::BAD_REQUEST, &app, &format!("/bytes/<n> needs a byte count, not {n:?}")),
        });
    }
    Ok(json(ok, &app, &seen))
}

/// The headers an application forwards so a mesh can join its calls into one trace (Istio's list).
const TRACE_HEADERS: [&str; 10] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
    "baggage",
];

/// `/call/<ip:port>/<path>`: one downstream GET with the trace headers forwarded.
async fn call(app: &App, spec: &str, seen: &Seen) -> Response<Body> {
    let (target, rest) = spec.split_once('/').unwrap_or((spec, ""));
    let Ok(addr) = target.parse::<SocketAddr>() else {
        return text(StatusCode::BAD_REQUEST, app, &format!("/call/<ip:port>/<path> needs an address, not {target:?}"));
    };
    let mut req = Request::get(format!("/{rest}")).header(header::HOST, target);
    for name in TRACE_HEADERS {
        if let Some(v) = seen.headers.get(name) {
            req = req.header(name, v.as_str());
        }
    }
    let req = req.body(http_body_util::Empty::<Bytes>::new()).expect("a valid request");
    let answer = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok((status, body))) => {
            let called = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned().into());
            json(StatusCode::OK, app, &serde_json::json!({ "pod": app.id.pod, "status": status, "called": called }))
        }
        Ok(Err(e)) => text(StatusCode::BAD_GATEWAY, app, &format!("calling {addr}: {e}")),
        Err(_) => text(StatusCode::GATEWAY_TIMEOUT, app, &format!("calling {addr}: no answer in 10 s")),
    }
}

/// A final status (200..=599) from its decimal form.
pub fn status(code: &str) -> Option<StatusCode> {
    code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)).and_then(|c| StatusCode::from_u16(c).ok())
}

fn seen(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> Seen {
    let uri = req.uri();
    // HTTP/2 carries the authority in the URI; HTTP/1.1 in Host (unless absolute-form).
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()))
        .unwrap_or_default();
    Seen {
        pod: app.id.pod.clone(),
        node: app.id.node.clone(),
        version: app.id.version.clone(),
        peer: peer.to_string(),
        method: req.method().to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        host,
        protocol: protocol(req.version()).to_owned(),
        headers: Seen::header_map(req.headers()),
        body_bytes: 0,
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Reads the body frame by frame, handing each chunk to `each`: memory stays at one frame.
async fn read_body(mut body: Incoming, mut each: impl FnMut(&[u8])) -> Result<u64, hyper::Error> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            each(&data);
        }
    }
    Ok(total)
}

/// `n` bytes in `CHUNK`-sized slices of one shared buffer: nothing is built up front.
fn bytes(app: &App, n: u64) -> Response<Body> {
    let pattern: Bytes = (0..CHUNK).map(|i| b"abcdefghijklmnopqrstuvwxyz"[i % 26]).collect::<Vec<u8>>().into();
    let chunks = futures::stream::unfold(n, move |left| {
        let pattern = pattern.clone();
        async move {
            if left == 0 {
                return None;
            }
            let len = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
            Some((Ok::<_, Infallible>(Frame::data(pattern.slice(..len))), left - len as u64))
        }
    });
    respond(StatusCode::OK, app, "application/octet-stream", StreamBody::new(chunks).boxed())
}

/// `value` as one line of JSON.
fn json(status: StatusCode, app: &App, value: &impl serde::Serialize) -> Response<Body> {
    let mut body = serde_json::to_string(value).expect("JSON values serialize");
    body.push('\n');
    respond(status, app, "application/json", Full::new(Bytes::from(body)).boxed())
}

pub fn text(status: StatusCode, app: &App, message: &str) -> Response<Body> {
    respond(status, app, "text/plain", Full::new(Bytes::from(format!("{message}\n"))).boxed())
}

pub fn respond(status: StatusCode, app: &App, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in [(POD_HEADER, &app.id.pod), (VERSION_HEADER, &app.id.version)] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    response
}
