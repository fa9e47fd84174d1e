//! The metrics endpoint (`/metrics`, Prometheus text format), the readiness probe
//! (`/healthz/ready`) and the liveness probe (`/healthz/live`: the daemon's runtime answers; it
//! does not depend on the controller, so a controller outage never restarts nodes), on their own
//! port as in Istio (15020).

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{drain, http_util, readiness::Ready};

/// Prometheus text format 0.0.4: what Prometheus, `promtool check metrics` and most scrapers read.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Ready,
    refused: crate::proxy::accept::Refused,
}

impl Server {
    /// `refused` counts connections beyond [`http_util::LIMITS`].
    pub async fn new(listen: impl Into<crate::proxy::Listen>, registry: Arc<Registry>, ready: Ready, refused: crate::proxy::accept::Refused) -> Result<Self, crate::proxy::Error> {
        let (listener, addr) = listen.into().open().await?;
        Ok(Self { listener, addr, registry, ready, refused })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A duplicate of the listening socket (for a successor, `crate::handoff`).
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
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
                            Ok(()) => http_util::reply(StatusCode::OK, PROMETHEUS_TEXT, to_prometheus_text(&text)),
                            Err(e) => http_util::reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
                        }
                    }
                    "/healthz/ready" => ready_reply(&ready),
                    "/healthz/live" => http_util::reply(StatusCode::OK, "text/plain", "live\n"),
                    _ => http_util::reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
                }
            }
        });
        http_util::serve(self.listener, "metrics", self.refused, handler, drain).await;
    }
}

/// `prometheus-client` writes `OpenMetrics`, where a counter family `x` has samples `x_total`; the
/// Prometheus text format wants HELP/TYPE named like the samples, and no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines().filter(|l| *l != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

pub fn ready_reply(ready: &Ready) -> http::Response<http_util::Body> {
    let pending = ready.pending();
    if pending.is_empty() {
        http_util::reply(StatusCode::OK, "text/plain", "ready\n")
    } else {
        http_util::reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {}\n", pending.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_renamed_for_the_prometheus_text_format() {
        let om = "# HELP c Things.\n# TYPE c counter\nc_total 1\n# HELP g Level.\n# TYPE g gauge\ng 2\n# EOF\n";
        let want = "# HELP c_total Things.\n# TYPE c_total counter\nc_total 1\n# HELP g Level.\n# TYPE g gauge\ng 2\n";
        assert_eq!(super::to_prometheus_text(om), want);
    }
}
