//! Telemetry of the node's HTTP traffic: which Telemetry applies to a workload ([`policy`]), the
//! tracer each connection's stack gets ([`tracers`]), and trace export.
//!
//! Trace export: the spans the L7 stacks finish ([`mesh_l7::trace::SpanSink`]) are queued,
//! batched and sent to a collector, as Istio's `extensionProviders` `zipkin` ([`zipkin`]: JSON
//! over HTTP) and `opentelemetry` ([`otlp`]: OTLP over gRPC, plaintext HTTP/2).
//!
//! The request path never waits: [`Exporter::submit`](mesh_l7::trace::SpanSink::submit) puts the
//! span in a bounded queue or drops it (`queue_full`). One background task per provider empties
//! the queue in batches, one request per batch with a timeout; a batch that fails is dropped and
//! counted (`export_failed`), never retried, so a collector outage costs neither memory nor
//! latency. The collector's address is resolved again for every batch (`no_endpoint` when there
//! is none).

pub mod otlp;
pub mod policy;
pub mod tracers;
pub mod zipkin;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_l7::trace::{Span, SpanSink};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{sync::mpsc, time::Instant};

/// How spans go to the collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Zipkin v2 JSON, `POST http://{collector}{path}` (Zipkin's is `/api/v2/spans`).
    Zipkin { path: String },
    /// OTLP: `opentelemetry.proto.collector.trace.v1.TraceService/Export` over plaintext h2c.
    Otlp,
}

/// One tracing provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderConfig {
    /// The provider's name (Istio's `extensionProviders[].name`): the metrics' `provider` label.
    pub name: String,
    pub protocol: Protocol,
    /// Spans per request to the collector.
    pub max_batch: usize,
    /// Spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// How long a batch waits for more spans after its first.
    pub flush_interval: Duration,
    /// One export request's limit, connecting included.
    pub timeout: Duration,
}

impl ProviderConfig {
    /// `protocol` with the defaults: batches of 512, a queue of 2048, a flush every second, 5 s
    /// per request.
    pub fn new(name: impl Into<String>, protocol: Protocol) -> Self {
        Self {
            name: name.into(),
            protocol,
            max_batch: 512,
            max_queue: 2048,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The collector's address now (the node resolves the provider's service per batch).
pub type Resolve = Arc<dyn Fn() -> Option<SocketAddr> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the request (path {path:?}): {source}")]
    Request { path: String, source: http::Error },
    #[error("the collector answered {0}")]
    Status(http::StatusCode),
    #[error("gRPC channel: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    provider: Arc<str>,
    /// `queue_full`, `export_failed`, `no_endpoint`.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    provider: Arc<str>,
    /// `ok`, `error`.
    result: &'static str,
}

/// The exporters' metrics, shared by every provider (labelled by provider).
#[derive(Clone, Default)]
pub struct TraceMetrics {
    exported: Family<ProviderLabel, Counter>,
    dropped: Family<DroppedLabels, Counter>,
    batches: Family<BatchLabels, Counter>,
}

impl TraceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mesh_trace_spans_exported",
            "Spans the collector accepted, by provider",
            m.exported.clone(),
        );
        registry.register(
            "mesh_trace_spans_dropped",
            "Spans never exported, by provider and reason (queue_full, export_failed, no_endpoint)",
            m.dropped.clone(),
        );
        registry.register(
            "mesh_trace_export_batches",
            "Export requests to the collector, by provider and result",
            m.batches.clone(),
        );
        m
    }

    /// One provider's counters, resolved once.
    fn handles(&self, provider: &str) -> Handles {
        let provider: Arc<str> = provider.into();
        let dropped = |reason| {
            self.dropped
                .get_or_create(&DroppedLabels {
                    provider: provider.clone(),
                    reason,
                })
                .clone()
        };
        let batches = |result| {
            self.batches
                .get_or_create(&BatchLabels {
                    provider: provider.clone(),
                    result,
                })
                .clone()
        };
        Handles {
            exported: self
                .exported
                .get_or_create(&ProviderLabel {
                    provider: provider.clone(),
                })
                .clone(),
            queue_full: dropped("queue_full"),
            export_failed: dropped("export_failed"),
            no_endpoint: dropped("no_endpoint"),
            ok: batches("ok"),
            error: batches("error"),
        }
    }
}

#[derive(Clone)]
struct Handles {
    exported: Counter,
    queue_full: Counter,
    export_failed: Counter,
    no_endpoint: Counter,
    ok: Counter,
    error: Counter,
}

/// One provider's queue; its background task exports what it holds.
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    queue_full: Counter,
}

impl SpanSink for Exporter {
    fn submit(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            // Full, or the task is gone (its runtime shut down): either way the span is lost.
            self.queue_full.inc();
        }
    }
}

impl Exporter {
    /// Starts the provider's export task on the current Tokio runtime. The task ends, after
    /// exporting what is queued, when the returned exporter (every clone of the `Arc`) is dropped.
    pub fn spawn(cfg: ProviderConfig, resolve: Resolve, metrics: &TraceMetrics) -> Arc<Exporter> {
        let handles = metrics.handles(&cfg.name);
        let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
        let exporter = Arc::new(Exporter {
            tx,
            queue_full: handles.queue_full.clone(),
        });
        tokio::spawn(run(rx, cfg, resolve, handles));
        exporter
    }
}

/// The collector client of one protocol, keeping its connection between batches.
enum Client {
    Zipkin(zipkin::Client),
    Otlp(otlp::Client),
}

/// A batch encoded for its protocol.
enum Payload {
    Zipkin(bytes::Bytes),
    Otlp(otlp::Request),
}

impl Client {
    /// Encodes `batch` on a blocking-pool thread: a full batch is a few hundred kilobytes of
    /// JSON or protobuf, which on the daemon's request thread would stall every connection it
    /// serves for as long. The batch comes back (emptied by the caller) to keep its capacity.
    async fn encode(&self, batch: Vec<Span>) -> (Payload, Vec<Span>) {
        let zipkin = matches!(self, Self::Zipkin(_));
        let encode = move || {
            let payload = if zipkin {
                Payload::Zipkin(mesh_l7::trace::zipkin::encode(&batch).into())
            } else {
                Payload::Otlp(otlp::request(&batch))
            };
            (payload, batch)
        };
        match tokio::task::spawn_blocking(encode).await {
            Ok(done) => done,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn export(&mut self, addr: SocketAddr, payload: Payload) -> Result<(), Error> {
        match (self, payload) {
            (Self::Zipkin(c), Payload::Zipkin(body)) => c.export(addr, body).await,
            (Self::Otlp(c), Payload::Otlp(request)) => c.export(addr, request).await,
            _ => unreachable!("Client::encode makes the payload of its own protocol"),
        }
    }

    /// Forgets the connection after a failure: the next batch starts afresh.
    fn reset(&mut self) {
        match self {
            Self::Zipkin(c) => c.reset(),
            Self::Otlp(c) => c.reset(),
        }
    }
}

async fn run(mut rx: mpsc::Receiver<Span>, cfg: ProviderConfig, resolve: Resolve, m: Handles) {
    let max = cfg.max_batch.max(1);
    let mut client = match &cfg.protocol {
        Protocol::Zipkin { path } => Client::Zipkin(zipkin::Client::new(path.clone())),
        Protocol::Otlp => Client::Otlp(otlp::Client::new(cfg.timeout)),
    };
    let mut batch = Vec::with_capacity(max);
    loop {
        // The first span of a batch; none: every sender is gone and the queue is empty.
        if rx.recv_many(&mut batch, max).await == 0 {
            return;
        }
        let deadline = Instant::now() + cfg.flush_interval;
        let mut open = true;
        // Then naps, taking what came meanwhile: waiting in `recv` would wake this task for
        // nearly every span, at up to one wake-up per request when every request is sampled.
        while open && batch.len() < max && Instant::now() < deadline {
            tokio::time::sleep_until(deadline.min(Instant::now() + NAP)).await;
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        batch = export(&mut client, &cfg, &resolve, &m, batch).await;
        batch.clear();
        if !open {
            return;
        }
    }
}

/// How long the export task lets spans gather between looks at its queue: at the queue's
/// default 2,048 spans, 200,000 spans/s before one is dropped.
const NAP: Duration = Duration::from_millis(10);

/// Sends `batch`; gives it back for reuse.
async fn export(
    client: &mut Client,
    cfg: &ProviderConfig,
    resolve: &Resolve,
    m: &Handles,
    batch: Vec<Span>,
) -> Vec<Span> {
    let n = batch.len() as u64;
    let Some(addr) = resolve() else {
        tracing::debug!(
            provider = cfg.name,
            spans = n,
            "no collector endpoint, spans dropped"
        );
        m.no_endpoint.inc_by(n);
        return batch;
    };
    let (payload, batch) = client.encode(batch).await;
    let result = tokio::time::timeout(cfg.timeout, client.export(addr, payload))
        .await
        .unwrap_or(Err(Error::Timeout(cfg.timeout)));
    match result {
        Ok(()) => {
            m.exported.inc_by(n);
            m.ok.inc();
        }
        Err(error) => {
            tracing::debug!(provider = cfg.name, %addr, spans = n, %error, "span export failed, spans dropped");
            client.reset();
            m.export_failed.inc_by(n);
            m.error.inc();
        }
    }
    batch
}

#[cfg(test)]
mod tests;
