//! The node's tracing: for each connection the HTTP stacks serve, the [`Tracer`] its requests
//! get (or none), from the Telemetry that applies to the local workload ([`super::policy`]), and
//! one exporter per provider of the mesh config, started on first use and replaced when the
//! provider changes.
//!
//! The collector is found per batch: a provider's `service` is a Service of the mesh (its host
//! `name.namespace[.svc.<domain>]`, an endpoint picked from the node's state) or an IP address.
//! The daemon dials it directly, in plaintext: a collector under STRICT mTLS refuses it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use mesh_l7::{
    layer::trace::TracerSource,
    trace::{CustomTag, LocalInfo, Propagation, Span, SpanKind, SpanSink, TagValue, Tracer},
};
use prometheus_client::registry::Registry;

use super::{
    Exporter, ProviderConfig, Protocol as ExportProtocol, Resolve, TraceMetrics,
    policy::{self, Provider, Side, TagSource},
};
use crate::{
    proxy::metrics::canonical,
    state::{State, StateRx, Workload},
};

/// Provider name → (its config when started, its exporter).
type Exporters = HashMap<String, (Provider, Arc<dyn SpanSink>)>;

/// Tracers for the HTTP stacks, and the exporters they submit to.
pub struct Tracers {
    node_id: Arc<str>,
    cluster_domain: String,
    state: StateRx,
    metrics: TraceMetrics,
    exporters: Mutex<Exporters>,
}

impl Tracers {
    pub fn new(node_name: &str, cluster_domain: &str, state: StateRx, registry: &mut Registry) -> Arc<Self> {
        Arc::new(Self {
            node_id: Arc::from(format!("mesh-node~{node_name}")),
            cluster_domain: cluster_domain.to_owned(),
            state,
            metrics: TraceMetrics::register(registry),
            exporters: Mutex::default(),
        })
    }

    /// The tracer for requests of local workload `w` on `side` (its outbound requests as the
    /// client, or requests to it as the server), arriving from `downstream`; `port` is the
    /// Service port (client) or the pod's port (server). `None`: not traced, headers untouched.
    pub fn tracer(&self, state: &State, w: &Workload, side: Side, downstream: SocketAddr, port: u16) -> Option<Arc<Tracer>> {
        if state.telemetry.is_empty() && state.mesh_tracing.default_provider.is_none() {
            return None;
        }
        let resolved = policy::tracing_for(&state.telemetry, &state.mesh_tracing, &state.root_namespace, w, side)?;
        let sink = self.exporter(&resolved.provider);
        let custom_tags = resolved
            .custom_tags
            .into_iter()
            .filter_map(|(name, source)| {
                let value = match source {
                    TagSource::Literal(v) => TagValue::Literal(v),
                    // Envoy reads the proxy's environment; here, the node daemon's.
                    TagSource::Environment { name: var, default } => TagValue::Literal(std::env::var(&var).ok().or(default)?),
                    TagSource::Header { name: header, default } => TagValue::Header { name: http::HeaderName::from_bytes(header.as_bytes()).ok()?, default },
                };
                Some(CustomTag { name, value })
            })
            .collect();
        let (canonical_service, canonical_revision) = canonical(w);
        let service = Arc::from(format!("{canonical_service}.{}", w.namespace));
        Some(Arc::new(Tracer {
            // As Envoy: B3 for a Zipkin provider, W3C for OpenTelemetry.
            propagation: match resolved.provider.protocol {
                policy::Protocol::Zipkin { .. } => Propagation::B3,
                policy::Protocol::OpenTelemetry => Propagation::W3C,
            },
            kind: match side {
                Side::Client => SpanKind::Client,
                Side::Server => SpanKind::Server,
            },
            sampling_percent: resolved.sampling_percent,
            custom_tags,
            local: Arc::new(LocalInfo {
                node_id: self.node_id.clone(),
                mesh_id: Arc::from(state.trust_domain.as_str()),
                canonical_service,
                canonical_revision,
                namespace: w.namespace.clone(),
                service,

                ip: Some(w.ip),
            }),
            downstream,
            port,
            sink,
        }))
    }

    /// The exporter of `provider`, started now if it is new or changed.
    fn exporter(&self, provider: &Provider) -> Arc<dyn SpanSink> {
        let mut exporters = self.exporters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((p, sink)) = exporters.get(&provider.name)
            && p == provider
        {
            return sink.clone();
        }
        let protocol = match &provider.protocol {
            policy::Protocol::Zipkin { path } => ExportProtocol::Zipkin { path: path.clone() },
            policy::Protocol::OpenTelemetry => ExportProtocol::Otlp,
        };
        let resolve: Resolve = {
            let (state, service, port, domain) = (self.state.clone(), provider.service.clone(), provider.port, self.cluster_domain.clone());
            Arc::new(move || collector(&state.borrow(), &service, port, &domain))
        };
        tracing::info!(provider = %provider.name, service = %provider.service, port = provider.port, "starting the trace exporter");
        let exporter = Exporter::spawn(ProviderConfig::new(provider.name.clone(), protocol), resolve, &self.metrics);
        let sink: Arc<dyn SpanSink> = match usize::try_from(provider.max_tag_length).unwrap_or(usize::MAX) {
            0 => exporter,
            max => Arc::new(Truncating { inner: exporter, max }),
        };
        // The replaced exporter (if any) flushes and stops once the last tracer holding it goes.
        exporters.insert(provider.name.clone(), (provider.clone(), sink.clone()));
        sink
    }
}

/// The tracer of one connection's stack, following the config: a connection can outlive a
/// Telemetry change by far (pooled HBONE connections between nodes live on), so the tracer is
/// resolved again whenever the node's state is a new one, and otherwise reused.
pub struct Live {
    tracers: Arc<Tracers>,
    workload: Workload,
    side: Side,
    downstream: SocketAddr,
    port: u16,
    /// The state the tracer was resolved from, and the tracer.
    cache: Mutex<Option<(Arc<State>, Option<Arc<Tracer>>)>>,
}

impl Tracers {
    /// The [`Live`] tracer source for a connection (see [`Tracers::tracer`] for the arguments).
    pub fn live(self: &Arc<Self>, w: &Workload, side: Side, downstream: SocketAddr, port: u16) -> Arc<Live> {
        Arc::new(Live { tracers: self.clone(), workload: w.clone(), side, downstream, port, cache: Mutex::default() })
    }
}

impl TracerSource for Live {
    fn tracer(&self) -> Option<Arc<Tracer>> {
        let state = self.tracers.state.borrow().clone();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, tracer)) = cache.as_ref()
            && Arc::ptr_eq(seen, &state)
        {
            return tracer.clone();
        }
        let tracer = self.tracers.tracer(&state, &self.workload, self.side, self.downstream, self.port);
        *cache = Some((state, tracer.clone()));
        tracer
    }
}

/// Where a provider's collector is now: an IP address as given, or an endpoint of the Service
/// named by its host (a healthy one first), on the endpoint's port for the Service port.
fn collector(state: &State, service: &str, port: u16, cluster_domain: &str) -> Option<SocketAddr> {
    if let Ok(ip) = service.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    let host = service.strip_suffix(&format!(".svc.{cluster_domain}")).or_else(|| service.strip_suffix(".svc")).unwrap_or(service);
    let (name, namespace) = host.split_once('.')?;
    let svc = state.service(namespace, name)?;
    let sp = svc.ports.iter().find(|p| p.port == port)?;
    let mut endpoints: Vec<_> = svc.endpoints.iter().collect();
    endpoints.sort_by_key(|e| !e.healthy);
    let e = endpoints.first()?;
    Some(SocketAddr::new(e.address, svc.endpoint_port(sp, e)))
}

/// Cuts tag values to the provider's `maxTagLength` (Istio's setting).
struct Truncating {
    inner: Arc<Exporter>,
    max: usize,
}

impl SpanSink for Truncating {
    fn submit(&self, mut span: Span) {
        for (_, v) in &mut span.tags {
            v.truncate(self.max);
        }
        self.inner.submit(span);
    }
}
