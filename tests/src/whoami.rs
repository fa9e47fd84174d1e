//! The lab's sample application `mesh-whoami` and its client tools (the binary in
//! `src/bin/mesh-whoami.rs` only parses arguments and calls into these modules).
//!
//! - [`l4`]: the plain TCP greeting + echo, UDP and the connect/round-trip clients the kernel,
//!   node and e2e suites were built on (std only, one thread per connection).
//! - [`http`]: HTTP/1.1 and h2c on one port, answering with what the server saw (JSON).
//! - [`ws`]: the WebSocket echo behind `/ws`, and `ws-client`.
//! - [`grpc`]: the `whoami.v1.Whoami` gRPC service (`tests/proto/whoami.proto`) and `grpc-call`.
//! - [`load`]: `http-load`, a fixed-rate, coordinated-omission-safe HTTP load generator.
//! - [`zipkin`]: a Zipkin-compatible span collector (JSON v2 in, Zipkin's query API out).
//!
//! Every L7 request a server receives can be written to a request log ([`RequestLog`]), which
//! is how tests see what reached a backend (mirrors, rewrites, header filters).

pub mod grpc;
pub mod http;
pub mod l4;
pub mod load;
pub mod ws;
pub mod zipkin;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Write as _,
    net::{SocketAddr, TcpListener, UdpSocket},
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
};

use serde::{Deserialize, Serialize};

/// Who this server is: the same three strings in every HTTP, WebSocket and gRPC answer.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub pod: String,
    pub node: String,
    pub version: String,
}

/// What a server saw of one request: the JSON body of `GET /` and one line of the request log.
/// Field order is the wire order; the first keys are the ones the older suites match on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub pod: String,
    pub node: String,
    pub version: String,
    /// The client's address as the server saw it (IPv4-mapped addresses printed as IPv4).
    pub peer: String,
    pub method: String,
    pub path: String,
    /// The raw query string without `?`; empty when there is none.
    pub query: String,
    /// `:authority` (HTTP/2) or the `Host` header (HTTP/1.1).
    pub host: String,
    /// `HTTP/1.1`, `HTTP/1.0`, `HTTP/2`, or `gRPC` in the request log of the gRPC server.
    pub protocol: String,
    /// Request headers, lowercased names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// Request body bytes read before answering.
    pub body_bytes: u64,
}

impl Seen {
    /// Collects repeated headers into one value each, as HTTP allows for all but Set-Cookie.
    pub fn header_map(headers: &::http::HeaderMap) -> BTreeMap<String, String> {
        let mut map = BTreeMap::<String, String>::new();
        for (name, value) in headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            map.entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        map
    }
}

/// One JSON line per request received (see [`Seen`]), written before the answer is sent, so a
/// test that got its response can read the line at once. To a file (appended, one `write` per
/// line so concurrent requests never interleave) or, for `-`, to stdout prefixed `request `.
pub enum RequestLog {
    Stdout,
    File(Mutex<File>),
}

impl RequestLog {
    pub fn open(spec: &str) -> std::io::Result<Self> {
        if spec == "-" {
            return Ok(Self::Stdout);
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(spec)?;
        Ok(Self::File(Mutex::new(file)))
    }

    pub fn write(&self, seen: &Seen) {
        // Strings and string-keyed maps only: serializing cannot fail.
        let Ok(json) = serde_json::to_string(seen) else { return };
        match self {
            Self::Stdout => println!("request {json}"),
            Self::File(file) => {
                let mut file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                // A failed log write must not fail the request: tests notice the missing line.
                let _ = file.write_all(format!("{json}\n").as_bytes());
            }
        }
    }
}

/// Failures a server is started with, so that one backend of several can be the bad one
/// (outlier detection, retries that must land on another backend).
#[derive(Clone, Debug)]
pub struct Faults {
    /// `--http-status`: the status of every JSON answer but those of `/status/<code>` and
    /// `/flaky/...`.
    pub http_status: ::http::StatusCode,
    /// `--grpc-fail-code`: `Hello` fails with this gRPC status code (0: it does not).
    pub grpc_code: u32,
}

impl Default for Faults {
    fn default() -> Self {
        Self { http_status: ::http::StatusCode::OK, grpc_code: 0 }
    }
}

/// What the L7 servers share.
pub struct App {
    pub id: Identity,
    pub faults: Faults,
    pub log: Option<RequestLog>,
    /// Requests seen per key, for the answers that fail only the first N times.
    attempts: Mutex<HashMap<String, u32>>,
}

impl App {
    pub fn new(id: Identity, faults: Faults, log: Option<RequestLog>) -> Arc<Self> {
        Arc::new(Self { id, faults, log, attempts: Mutex::default() })
    }

    /// Counts one more request for `key` and returns how many there have been (1 for the first).
    fn attempt(&self, key: &str) -> u32 {
        let mut attempts = self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = attempts.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }

    fn record(&self, seen: &Seen) {
        if let Some(log) = &self.log {
            log.write(seen);
        }
    }
}

/// Dual-stack listeners see IPv4 clients as IPv4-mapped IPv6; tests expect plain IPv4.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Pseudo-random but reproducible payload bytes (a mismatch can name its offset).
pub fn payload(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect()
}

/// What `serve` runs; each server prints `listening <kind> <address>` once bound.
pub struct ServeOpts {
    pub id: Identity,
    pub faults: Faults,
    pub tcp: Option<u16>,
    pub udp: Option<u16>,
    pub http: Option<u16>,
    pub grpc: Option<u16>,
    /// `--request-log FILE` (or `-` for stdout).
    pub request_log: Option<String>,
}

/// Binds every requested port (all dual-stack on `[::]`), then serves until killed.
///
/// # Panics
/// If no tokio runtime can be started (out of threads or memory).
pub fn serve(opts: &ServeOpts) -> ExitCode {
    match serve_all(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => l4::fail(&message),
    }
}

fn serve_all(opts: &ServeOpts) -> Result<(), String> {
    exit_on_termination()?;
    let log = opts.request_log.as_deref().map(|path| RequestLog::open(path).map_err(|e| format!("open --request-log {path:?}: {e}")));
    let app = App::new(opts.id.clone(), opts.faults.clone(), log.transpose()?);
    // The L7 servers share one runtime; the L4 ones keep their thread per connection.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    let bind = |kind: &str, port: u16| -> Result<TcpListener, String> {
        let listener = TcpListener::bind(("::", port)).map_err(|e| format!("bind {kind} [::]:{port}: {e}"))?;
        println!("listening {kind} {}", listener.local_addr().map_err(|e| e.to_string())?);
        Ok(listener)
    };
    let for_tokio = |listener: TcpListener| -> Result<tokio::net::TcpListener, String> {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())
    };
    if let Some(port) = opts.http {
        let listener = for_tokio(bind("http", port)?)?;
        runtime.spawn(http::serve(listener, Arc::clone(&app)));
    }
    if let Some(port) = opts.grpc {
        let listener = for_tokio(bind("grpc", port)?)?;
        let app = Arc::clone(&app);
        runtime.spawn(async move {
            if let Err(e) = grpc::serve(listener, app).await {
                println!("error: grpc server: {e}");
            }
        });
    }
    let mut threads = Vec::new();
    if let Some(port) = opts.udp {
        let socket = UdpSocket::bind(("::", port)).map_err(|e| format!("bind udp [::]:{port}: {e}"))?;
        println!("listening udp {}", socket.local_addr().map_err(|e| e.to_string())?);
        let name = opts.id.pod.clone();
        threads.push(thread::spawn(move || l4::serve_udp(&socket, &name)));
    }
    if let Some(port) = opts.tcp {
        let listener = bind("tcp", port)?;
        let name = opts.id.pod.clone();
        threads.push(thread::spawn(move || l4::serve_tcp(&listener, &name)));
    }
    for t in threads {
        let _ = t.join();
    }
    if opts.http.is_some() || opts.grpc.is_some() {
        runtime.block_on(std::future::pending::<()>());
    }
    Ok(())
}

/// In a container the server is PID 1, which gets no default action for SIGTERM: without this the
/// kubelet waits the whole grace period and then kills it, and a namespace deletion waits with it.
/// The signals are blocked before any other thread starts (threads inherit the mask), and one
/// thread waits for them and exits.
fn exit_on_termination() -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(|e| format!("blocking SIGTERM: {e}"))?;
    thread::spawn(move || {
        let signal = set.wait();
        println!("exiting on {signal:?}");
        std::process::exit(0);
    });
    Ok(())
}
