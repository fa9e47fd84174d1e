//! The lab's sample application and test clients (code in `mesh_tests::whoami`).
//!
//! Servers (each prints `listening <tcp|udp|http|grpc> <address>` on stdout once bound):
//! - `serve --name NAME [--node NODE] [--version V] [--tcp PORT] [--udp PORT] [--http PORT]
//!   [--grpc PORT] [--request-log FILE|-] [--http-status CODE] [--grpc-fail-code C]`:
//!   - TCP: one line `whoami name=NAME peer=IP:PORT local=IP:PORT` per connection, then an echo;
//!     stdout gets `accept peer=IP:PORT` per connection.
//!   - UDP: every datagram is answered with `whoami name=NAME peer=IP:PORT`.
//!   - HTTP: HTTP/1.1 and h2c on one port; JSON of what the server saw, plus `/status/<code>`,
//!     `/delay/<ms>`, `/bytes/<n>`, `POST /upload`, `/ws` (see `whoami/http.rs`).
//!   - gRPC: `whoami.v1.Whoami` (`tests/proto/whoami.proto`), with server reflection.
//!   - `--request-log`: one JSON line per HTTP/gRPC request received, appended to FILE (`-`:
//!     stdout, prefixed `request `).
//!   - `--http-status CODE`: ordinary HTTP answers carry CODE instead of 200; `--grpc-fail-code
//!     C`: every `Hello` fails with gRPC status C (a backend that is the bad one).
//! - `origdst --listen ADDR`: a stand-in for the node daemon's outbound listener: answers each
//!   connection with `orig=IP:PORT peer=IP:PORT` from getsockopt(SO_ORIGINAL_DST), or
//!   `orig=none (error)`.
//!
//! - `bind-listeners UNIX_PATH PORT...`: binds TCP listeners on 0.0.0.0:PORT here and sends
//!   them over the Unix socket UNIX_PATH, then exits (what a service manager does for socket
//!   activation; `Cluster::activate_sockets`).
//!
//! - `zipkin --listen ADDR`: a Zipkin-compatible collector keeping spans in memory
//!   (`POST /api/v2/spans`, `GET /api/v2/traces`, `GET /api/v2/trace/<id>`; `whoami/zipkin.rs`).
//!
//! Clients:
//! - `connect ADDR [--count N | --duration S] [--concurrency C] [--bind-port P] [--echo BYTES]
//!   [--timeout-ms MS]`: N connections, or as many as S seconds allow, C at a time (from source
//!   ports P, P+1, ... when given), one result line each: `connected peer=<getpeername>
//!   <server line>` or `error: connect ADDR: <ERRNO> (<message>)`; with --echo, sends BYTES
//!   pseudo-random bytes and checks the echo byte for byte. Exit 0 only if all succeeded.
//! - `udp ADDR [--count N]`: N datagrams from one unconnected socket, one line per reply:
//!   `reply from=<recvfrom address> <server line>`.
//! - `ws-client URL [--messages N] [--size B] [--timeout-ms MS]`: WebSocket echo check, prints
//!   `ws ok messages=N bytes=TOTAL pod=POD`; exit 0 only if every message came back intact.
//! - `grpc-call ADDR hello|count|sum|chat [--n N] [--name NAME] [--fail-code C] [--delay-ms MS]
//!   [--metadata K=V]... [--timeout-ms MS]`: one JSON line per reply, or `error: grpc code=...`.
//!
//! Measurements (one JSON line):
//! - `bench-connect ADDR --count N`: N × (connect, read the server line, close with RST);
//!   times the connect() call alone (percentiles in microseconds).
//! - `rr ADDR --count N [--size BYTES]`: one connection, N request/response round trips of
//!   BYTES through the echo server.
//! - `http-load --url URL --rate R --duration S [--connections C] [--h2] [--streams N]
//!   [--body-size N] [--header 'NAME: VALUE']... [--timeout-ms MS]`: fixed-rate load with
//!   latency from each request's due time (see `whoami/load.rs` for the report's fields).
use std::{env, net::SocketAddr, process::ExitCode, time::Duration};

use mesh_tests::whoami::{self, Faults, Identity, ServeOpts, grpc, http, l4, load, ws};

fn usage() -> ExitCode {
    eprintln!(
        "usage: mesh-whoami serve --name NAME [--node NODE] [--version V] [--tcp PORT] [--udp PORT] [--http PORT] [--grpc PORT] [--request-log FILE|-] [--http-status CODE] [--grpc-fail-code C]
       mesh-whoami origdst --listen ADDR
       mesh-whoami zipkin --listen ADDR
       mesh-whoami bind-listeners UNIX_PATH PORT...
       mesh-whoami connect ADDR [--count N | --duration S] [--concurrency C] [--bind-port P] [--echo BYTES] [--timeout-ms MS]
       mesh-whoami udp ADDR [--count N]
       mesh-whoami bench-connect ADDR --count N | rr ADDR --count N [--size BYTES]
       mesh-whoami http-load --url URL --rate R --duration S [--connections C] [--h2] [--streams N] [--body-size N] [--header 'NAME: VALUE']... [--timeout-ms MS]
       mesh-whoami ws-client URL [--messages N] [--size B] [--timeout-ms MS]
       mesh-whoami grpc-call ADDR hello|count|sum|chat [--n N] [--name NAME] [--fail-code C] [--delay-ms MS] [--metadata K=V]... [--timeout-ms MS]"
    );
    ExitCode::from(64)
}

/// `--name value` flags (the last one wins), repeatable flags and bare switches.
struct Args(Vec<String>);

impl Args {
    fn flag(&self, name: &str) -> Option<String> {
        self.all(name).pop()
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0.windows(2).filter(|w| w[0] == name).map(|w| w[1].clone()).collect()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// A number flag: `default` when absent, `Err(usage)` when present but not a number.
    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, ExitCode> {
        match self.flag(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                eprintln!("mesh-whoami: {name} {v:?} is not a valid number");
                usage()
            }),
        }
    }

    fn positional(&self, i: usize) -> Option<&str> {
        self.0.get(i).map(String::as_str)
    }
}

fn main() -> ExitCode {
    let args = Args(env::args().skip(1).collect());
    match run(&args) {
        Ok(code) | Err(code) => code,
    }
}

fn run(args: &Args) -> Result<ExitCode, ExitCode> {
    let addr = || args.positional(1).and_then(|a| a.parse::<SocketAddr>().ok()).ok_or_else(usage);
    let timeout = || args.num("--timeout-ms", 10_000).map(Duration::from_millis);
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    Ok(match args.positional(0) {
        Some("serve") => {
            let port = |f: &str| args.flag(f).map(|p| p.parse::<u16>().map_err(|_| usage())).transpose();
            let opts = ServeOpts {
                id: Identity {
                    pod: args.flag("--name").ok_or_else(usage)?,
                    node: args.flag("--node").unwrap_or_default(),
                    version: args.flag("--version").unwrap_or_default(),
                },
                faults: Faults {
                    http_status: match args.flag("--http-status") {
                        None => Faults::default().http_status,
                        Some(code) => http::status(&code).ok_or_else(usage)?,
                    },
                    grpc_code: args.num("--grpc-fail-code", 0)?,
                },
                tcp: port("--tcp")?,
                udp: port("--udp")?,
                http: port("--http")?,
                grpc: port("--grpc")?,
                request_log: args.flag("--request-log"),
            };
            if [opts.tcp, opts.udp, opts.http, opts.grpc].iter().all(Option::is_none) {
                return Err(usage());
            }
            whoami::serve(&opts)
        }
        Some("zipkin") => whoami::zipkin::run(args.flag("--listen").and_then(|a| a.parse().ok()).ok_or_else(usage)?),
        Some("bind-listeners") => {
            let rest: Vec<String> = env::args().skip(2).collect();
            let (Some(path), ports) = (rest.first(), &rest[1.min(rest.len())..]) else { return Err(usage()) };
            let ports: Option<Vec<u16>> = ports.iter().map(|p| p.parse().ok()).collect();
            match ports {
                Some(p) if !p.is_empty() => l4::bind_listeners(std::path::Path::new(path), &p),
                _ => return Err(usage()),
            }
        }
        Some("origdst") => l4::origdst(args.flag("--listen").and_then(|a| a.parse().ok()).ok_or_else(usage)?),
        Some("connect") => {
            let opts = l4::ConnectOpts {
                count: args.num("--count", 1)?,
                duration: match args.flag("--duration") {
                    None => None,
                    Some(_) => Some(Duration::try_from_secs_f64(args.num("--duration", 0.0)?).map_err(|_| usage())?),
                },
                concurrency: args.num("--concurrency", 1)?,
                bind_port: args.num("--bind-port", 0)?,
                echo: args.num("--echo", 0)?,
                timeout: Duration::from_millis(args.num("--timeout-ms", 5000)?),
            };
            l4::connect_all(addr()?, &opts)
        }
        Some("bench-connect") => l4::bench_connect(addr()?, args.num("--count", 1000)?),
        Some("rr") => l4::request_response(addr()?, args.num("--count", 10_000)?, args.num("--size", 64)?),
        Some("udp") => l4::udp(addr()?, args.num("--count", 1)?),
        Some("http-load") => {
            let mut headers = Vec::new();
            for h in args.all("--header") {
                let parsed = h.split_once(':').and_then(|(n, v)| Some((n.trim().parse().ok()?, v.trim().parse().ok()?)));
                headers.push(parsed.ok_or_else(|| {
                    eprintln!("mesh-whoami: --header {h:?} is not 'NAME: VALUE'");
                    usage()
                })?);
            }
            let opts = load::Options {
                url: args.flag("--url").ok_or_else(usage)?,
                rate: args.num("--rate", 0.0)?,
                duration: Duration::try_from_secs_f64(args.num("--duration", 0.0)?).map_err(|_| usage())?,
                connections: args.num("--connections", 1)?,
                h2: args.has("--h2"),
                streams: args.num("--streams", 16)?,
                body_size: args.num("--body-size", 0)?,
                headers,
                timeout: timeout()?,
            };
            match runtime().block_on(load::run(&opts)) {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).expect("the report serializes"));
                    ExitCode::SUCCESS
                }
                Err(e) => l4::fail(&e),
            }
        }
        Some("ws-client") => {
            let url = args.positional(1).ok_or_else(usage)?;
            let (messages, size, timeout) = (args.num("--messages", 10)?, args.num("--size", 1024)?, timeout()?);
            runtime().block_on(ws::client(url, messages, size, timeout))
        }
        Some("grpc-call") => {
            let (Some(target), Some(method)) = (args.positional(1), args.positional(2)) else { return Err(usage()) };
            let mut metadata = Vec::new();
            for m in args.all("--metadata") {
                let (k, v) = m.split_once('=').ok_or_else(usage)?;
                metadata.push((k.to_owned(), v.to_owned()));
            }
            let opts = grpc::CallOpts {
                n: args.num("--n", 3)?,
                name: args.flag("--name").unwrap_or_else(|| "mesh".to_owned()),
                fail_code: args.num("--fail-code", 0)?,
                delay_ms: args.num("--delay-ms", 0)?,
                metadata,
                timeout: timeout()?,
            };
            runtime().block_on(grpc::call(target, method, &opts))
        }
        _ => usage(),
    })
}
