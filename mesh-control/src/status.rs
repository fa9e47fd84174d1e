//! The status endpoint (plain HTTP/1.1, meant for localhost or the pod network):
//! - `GET /status`: JSON with the config version, whether this replica leads, every policy's and routing object's verdict
//!   (conditions, per parent for Gateway API routes), file errors and nodes,
//! - `GET /metrics`: Prometheus text,
//! - `GET /ready`: 200 once a first config is published (readiness probe), else 503,
//! - `GET /healthz`: 200 (liveness probe),
//! - `GET /graph` (a page that redraws itself), `/graph.svg`, `/graph.dot`, `/graph.json`: the
//!   live service graph (`graph`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{election::Leadership, graph, metrics::Metrics, server::NodeStatuses, snapshot::Publisher};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

#[derive(Clone)]
pub struct Sources {
    pub publisher: Publisher,
    pub nodes: NodeStatuses,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub leadership: Leadership,
    /// How this replica is elected, for `/status` (e.g. "Lease mesh-system/mesh-control-leader
    /// as mesh-control-7d9f-abcde", or "none (file mode)").
    pub election: String,
    /// The nodes' last metrics samples, for the service graph.
    pub graph: graph::Store,
}

pub struct StatusServer {
    listener: TcpListener,
    sources: Sources,
}

impl StatusServer {
    pub async fn new(addr: SocketAddr, sources: Sources) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        Ok(Self { listener, sources })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub async fn run(self) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else { continue };
            let sources = self.sources.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let sources = sources.clone();
                    async move { Ok::<_, Infallible>(handle(&req, &sources)) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    }
}

fn handle(req: &Request<Incoming>, s: &Sources) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match req.uri().path() {
        "/status" => reply(StatusCode::OK, "application/json", status_json(s)),
        "/metrics" => {
            let snap = s.publisher.current();
            s.metrics.config_version.set(i64::try_from(snap.version).unwrap_or(i64::MAX));
            s.metrics.set_verdicts(&snap.state.policies.verdicts);
            s.metrics.set_route_verdicts(&snap.state.routes.verdicts);
            s.metrics.file_errors.set(i64::try_from(snap.file_errors.len()).unwrap_or(i64::MAX));
            s.metrics.leader.set(i64::from(s.leadership.is_leader()));
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::encode(&s.registry))
        }
        "/ready" if s.publisher.current().version > 0 => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no config published yet\n".into()),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        // Relative, so the page also works behind a path prefix (the apiserver's proxy).
        "/graph" => reply(StatusCode::OK, "text/html; charset=utf-8", mesh_graph::render::html(&s.graph.graph(), "graph.svg", s.graph.refresh_seconds())),
        "/graph.svg" => reply(StatusCode::OK, "image/svg+xml", mesh_graph::render::svg(&s.graph.graph())),
        "/graph.dot" => reply(StatusCode::OK, "text/vnd.graphviz", mesh_graph::render::dot(&s.graph.graph())),
        "/graph.json" => reply(StatusCode::OK, "application/json", mesh_graph::render::json(&s.graph.graph())),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /status, /metrics, /ready, /graph\n".into()),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

/// The `/status` document.
pub fn status_json(s: &Sources) -> String {
    let snap = s.publisher.current();
    let policies: Vec<_> = snap
        .state
        .policies
        .verdicts
        .iter()
        .map(|v| {
            serde_json::json!({
                "kind": v.kind.as_str(),
                "namespace": v.key.namespace,
                "name": v.key.name,
                "accepted": v.result.is_ok(),
                "reason": v.result.as_ref().err().map_or("Accepted", crate::validate::Error::reason),
                "message": v.message(),
            })
        })
        .collect();
    let routes: Vec<_> = snap.state.routes.verdicts.iter().map(route_json).collect();
    let nodes = s.nodes.lock().expect("not poisoned").clone();
    let doc = serde_json::json!({
        "version": snap.version,
        "buildVersion": env!("CARGO_PKG_VERSION"),
        "leader": s.leadership.is_leader(),
        "election": s.election,
        "workloads": snap.state.inventory.workloads.len(),
        "services": snap.state.inventory.services.len(),
        "routeTables": snap.state.routes.tables.len(),
        "policies": policies,
        "routes": routes,
        "fileErrors": snap.file_errors,
        "nodes": nodes,
    });
    serde_json::to_string_pretty(&doc).expect("JSON values serialize") + "\n"
}

/// One routing object's verdict: its conditions as its status has them (per parent for
/// Gateway API routes), so file mode shows what `kubectl get -o yaml` would.
fn route_json(v: &crate::routing::Verdict) -> serde_json::Value {
    let conditions = |cs: &[crate::routing::Condition]| -> Vec<serde_json::Value> {
        cs.iter()
            .map(|c| serde_json::json!({"type": c.type_, "status": if c.status { "True" } else { "False" }, "reason": c.reason, "message": c.message}))
            .collect()
    };
    let mut doc = serde_json::json!({
        "kind": v.kind.as_str(),
        "namespace": v.key.namespace,
        "name": v.key.name,
        "accepted": v.rejection().is_none(),
    });
    match &v.status {
        crate::routing::VerdictStatus::Parents(ps) => {
            doc["parents"] = ps.iter().map(|p| serde_json::json!({"parentRef": p.reference, "conditions": conditions(&p.conditions)})).collect();
        }
        crate::routing::VerdictStatus::Conditions(cs) => doc["conditions"] = conditions(cs).into(),
    }
    doc
}
