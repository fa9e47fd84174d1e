//! The gRPC side of the sample app: `whoami.v1.Whoami` (`tests/proto/whoami.proto`) with one
//! method of each RPC kind, plus server reflection (v1 and v1alpha, so grpcurl needs no
//! `-proto`). And `grpc-call`, a tonic client for the same four methods.

use std::{process::ExitCode, sync::Arc, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Code, Request, Response, Status, Streaming,
    metadata::{MetadataKey, MetadataValue},
    transport::{Endpoint, Server, server::TcpConnectInfo},
};

use super::{App, Seen, unmap};

#[allow(warnings, clippy::all, clippy::pedantic, reason = "generated code")]
pub mod pb {
    tonic::include_proto!("whoami.v1");

    /// The compiled `whoami.proto`, served by reflection.
    pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/whoami_descriptor.bin"));
}

use pb::{
    ChatMessage, CountReply, CountRequest, HelloReply, HelloRequest, SumReply, SumRequest, whoami_client::WhoamiClient,
    whoami_server::WhoamiServer,
};

/// Longest `delay_ms` / `interval_ms` honoured.
const MAX_DELAY: Duration = Duration::from_mins(5);

/// What the HTTP/2 layer knew of a call, handed to the handlers in the request's extensions.
#[derive(Clone, Default)]
struct Call {
    path: String,
    authority: String,
}

struct Whoami {
    app: Arc<App>,
}

/// Serves until the runtime stops. Each call is written to the request log as it arrives
/// (method `POST`, the gRPC path, metadata as headers; `body_bytes` stays 0).
///
/// # Panics
/// If the descriptor set compiled in by `build.rs` is invalid (a build defect).
pub async fn serve(listener: TcpListener, app: Arc<App>) -> Result<(), tonic::transport::Error> {
    // Both versions: grpcurl before 1.8.8 asks only v1alpha, newer clients v1.
    let reflection = || tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(pb::DESCRIPTOR);
    let v1 = reflection().build_v1().expect("whoami.proto's descriptor set is valid");
    let v1alpha = reflection().build_v1alpha().expect("whoami.proto's descriptor set is valid");
    let seen_app = Arc::clone(&app);
    let note = tower::util::MapRequestLayer::new(move |mut req: http::Request<tonic::body::Body>| {
        let call = Call {
            path: req.uri().path().to_owned(),
            authority: req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default(),
        };
        if seen_app.log.is_some() {
            let peer = req.extensions().get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr);
            seen_app.record(&Seen {
                pod: seen_app.id.pod.clone(),
                node: seen_app.id.node.clone(),
                version: seen_app.id.version.clone(),
                peer: peer.map(|p| unmap(p).to_string()).unwrap_or_default(),
                method: req.method().to_string(),
                path: call.path.clone(),
                query: String::new(),
                host: call.authority.clone(),
                protocol: "HTTP/2".to_owned(),
                headers: Seen::header_map(req.headers()),
                body_bytes: 0,
            });
        }
        req.extensions_mut().insert(call);
        req
    });
    let incoming = TcpListenerStream::new(listener).inspect_ok(|s| {
        let _ = s.set_nodelay(true);
    });
    Server::builder()
        .layer(note)
        .add_service(WhoamiServer::new(Whoami { app }))
        .add_service(v1)
        .add_service(v1alpha)
        .serve_with_incoming(incoming)
        .await
}

#[tonic::async_trait]
impl pb::whoami_server::Whoami for Whoami {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let peer = req.remote_addr().map(|p| unmap(p).to_string()).unwrap_or_default();
        let call = req.extensions().get::<Call>().cloned().unwrap_or_default();
        let metadata = Seen::header_map(&req.metadata().clone().into_headers());
        let hello = req.into_inner();
        if hello.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(hello.delay_ms.into()).min(MAX_DELAY)).await;
        }
        let fail = match (hello.fail_code, hello.fail_times) {
            (0, _) => self.app.faults.grpc_code,
            (code, 0) => code,
            (code, times) => {
                let attempt = self.app.attempt(&format!("grpc Hello {}", hello.name));
                if attempt <= times { code } else { 0 }
            }
        };
        if fail != 0 {
            let code = Code::from(i32::try_from(fail).unwrap_or(i32::MAX));
            return Err(Status::new(code, format!("{} asked to fail with {code:?}", self.app.id.pod)));
        }
        let id = &self.app.id;
        Ok(Response::new(HelloReply {
            pod: id.pod.clone(),
            node: id.node.clone(),
            version: id.version.clone(),
            peer,
            metadata: metadata.into_iter().collect(),
            message: format!("hello {}", hello.name),
            method: call.path,
            authority: call.authority,
        }))
    }

    type CountStream = BoxStream<'static, Result<CountReply, Status>>;

    async fn count(&self, req: Request<CountRequest>) -> Result<Response<Self::CountStream>, Status> {
        let CountRequest { n, interval_ms } = req.into_inner();
        let interval = Duration::from_millis(interval_ms.into()).min(MAX_DELAY);
        let pod = self.app.id.pod.clone();
        let replies = futures::stream::unfold(1u32, move |i| {
            let pod = pod.clone();
            async move {
                if i > n {
                    return None;
                }
                if i > 1 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Some((Ok(CountReply { i, pod }), i + 1))
            }
        });
        Ok(Response::new(replies.boxed()))
    }

    async fn sum(&self, req: Request<Streaming<SumRequest>>) -> Result<Response<SumReply>, Status> {
        let mut values = req.into_inner();
        let (mut sum, mut count) = (0i64, 0u32);
        while let Some(SumRequest { value }) = values.message().await? {
            sum = sum.wrapping_add(value);
            count += 1;
        }
        Ok(Response::new(SumReply { sum, count, pod: self.app.id.pod.clone() }))
    }

    type ChatStream = BoxStream<'static, Result<ChatMessage, Status>>;

    async fn chat(&self, req: Request<Streaming<ChatMessage>>) -> Result<Response<Self::ChatStream>, Status> {
        let pod = self.app.id.pod.clone();
        let echoes = req.into_inner().map_ok(move |m| ChatMessage { text: m.text, pod: pod.clone() });
        Ok(Response::new(echoes.boxed()))
    }
}

/// Options of `grpc-call`.
pub struct CallOpts {
    /// Replies to ask `count` for; values sent by `sum`; messages sent by `chat`.
    pub n: u32,
    pub name: String,
    pub fail_code: u32,
    pub delay_ms: u32,
    /// Request metadata, `(name, value)`.
    pub metadata: Vec<(String, String)>,
    pub timeout: Duration,
}

/// `grpc-call ADDR hello|count|sum|chat`: one JSON line per reply, or `error: grpc code=N
/// (Name) message=...` and exit 2.
pub async fn call(addr: &str, method: &str, opts: &CallOpts) -> ExitCode {
    match tokio::time::timeout(opts.timeout, run_call(addr, method, opts)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => super::l4::fail(&e),
        Err(_) => super::l4::fail(&format!("grpc-call {addr} {method}: no result within {:?}", opts.timeout)),
    }
}

fn status_line(status: &Status) -> String {
    format!("grpc code={} ({:?}) message={}", i32::from(status.code()), status.code(), status.message())
}

fn request<T>(message: T, opts: &CallOpts) -> Result<Request<T>, String> {
    let mut req = Request::new(message);
    for (name, value) in &opts.metadata {
        let key = MetadataKey::from_bytes(name.as_bytes()).map_err(|e| format!("metadata name {name:?}: {e}"))?;
        let value: MetadataValue<_> = value.parse().map_err(|e| format!("metadata value {value:?}: {e}"))?;
        req.metadata_mut().insert(key, value);
    }
    Ok(req)
}

async fn run_call(addr: &str, method: &str, opts: &CallOpts) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| format!("address {addr}: {e}"))?;
    let channel = endpoint.connect().await.map_err(|e| format!("connect {addr}: {e}"))?;
    let mut client = WhoamiClient::new(channel);
    let err = |s: Status| status_line(&s);
    match method {
        "hello" => {
            let hello = HelloRequest { name: opts.name.clone(), fail_code: opts.fail_code, delay_ms: opts.delay_ms, fail_times: 0 };
            let r = client.hello(request(hello, opts)?).await.map_err(err)?.into_inner();
            let line = json!({"pod": r.pod, "node": r.node, "version": r.version, "peer": r.peer, "method": r.method,
                "authority": r.authority, "message": r.message, "metadata": r.metadata});
            println!("{line}");
        }
        "count" => {
            let mut replies = client.count(request(CountRequest { n: opts.n, interval_ms: 0 }, opts)?).await.map_err(err)?.into_inner();
            while let Some(r) = replies.message().await.map_err(err)? {
                println!("{}", json!({"i": r.i, "pod": r.pod}));
            }
        }
        "sum" => {
            let values = futures::stream::iter((1..=opts.n).map(|v| SumRequest { value: v.into() }));
            let r = client.sum(request(values, opts)?).await.map_err(err)?.into_inner();
            println!("{}", json!({"sum": r.sum, "count": r.count, "pod": r.pod}));
        }
        "chat" => {
            let sent: Vec<String> = (1..=opts.n).map(|i| format!("message {i}")).collect();
            let outgoing = futures::stream::iter(sent.clone().into_iter().map(|text| ChatMessage { text, pod: String::new() }));
            let mut echoes = client.chat(request(outgoing, opts)?).await.map_err(err)?.into_inner();
            let mut received = 0;
            while let Some(m) = echoes.message().await.map_err(err)? {
                if sent.get(received) != Some(&m.text) {
                    return Err(format!("chat echo {received} was {:?}", m.text));
                }
                received += 1;
                println!("{}", json!({"text": m.text, "pod": m.pod}));
            }
            if received != sent.len() {
                return Err(format!("chat: {received} echoes of {} messages", sent.len()));
            }
        }
        other => return Err(format!("grpc-call: unknown method {other:?} (hello|count|sum|chat)")),
    }
    Ok(())
}
