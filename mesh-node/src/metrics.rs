//! The metrics endpoint (`/metrics`, Prometheus text format) and the readiness probe
//! (`/healthz/ready`), on their own port as in Istio (15020).

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{drain, http_util, readiness::Ready};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Server {
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Ready,
}

impl Server {
    pub async fn new(addr: SocketAddr, registry: Arc<Registry>, ready: Ready) -> Result<Self, crate::proxy::Error> {
        let listener = http_util::bind(addr).await.map_err(|source| crate::proxy::Error::Bind { addr, source })?;
        Ok(Self { listener, registry, ready })
    }

    pub fn address(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    pub async fn run(self, drain: drain::Watcher) {
        let (registry, ready) = (self.registry, self.ready);
        let handler = Arc::new(move |req: http_util::Req| {
            let (registry, ready) = (registry.clone(), ready.clone());
            async move {
                match req.path.as_str() {
                    "/metrics" => {
                        let mut text = String::new();
                        match prometheus_client::encoding::text::encode(&mut text, &registry) {
                            Ok(()) => http_util::reply(StatusCode::OK, OPENMETRICS, text),
                            Err(e) => http_util::reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
                        }
                    }
                    "/healthz/ready" => ready_reply(&ready),
                    _ => http_util::reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
                }
            }
        });
        http_util::serve(self.listener, handler, drain).await;
    }
}

pub fn ready_reply(ready: &Ready) -> http::Response<http_util::Body> {
    let pending = ready.pending();
    if pending.is_empty() {
        http_util::reply(StatusCode::OK, "text/plain", "ready\n")
    } else {
        http_util::reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {}\n", pending.join(", ")))
    }
}
