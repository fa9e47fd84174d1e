//! The live service graph the status endpoint serves (`/graph`, `/graph.json`, `/graph.svg`,
//! `/graph.dot`): every `interval`, the metrics port of each connected node is scraped at the
//! address its config stream comes from, and the last two samples of each node are kept; the
//! graph is built from them on request by `mesh_graph`.
//!
//! A failed scrape is logged and counted (`mesh_control_graph_scrape_failures_total{node}`)
//! and the node keeps its last good samples, so its rates stay right over the longer window; a
//! node that disconnects leaves the graph.
//!
//! With a Prometheus configured, the graph comes from it instead: every `interval`, the
//! `increase()` of each metric the graph reads over [`PROMETHEUS_WINDOW`] (Prometheus scrapes
//! every 15 s or so: a shorter window would often hold no two points), from its HTTP API.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use mesh_graph::{Graph, Window, metrics::Sample};

use crate::{
    metrics::{Metrics, NodeLabels},
    server::NodeStatuses,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("HTTP from {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("{addr} answered {status}")]
    Status { addr: String, status: http::StatusCode },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("Prometheus URL {0:?}: only http://host:port[/prefix]")]
    PrometheusUrl(String),
    #[error("Prometheus' answer to {query}: {detail}")]
    Prometheus { query: String, detail: String },
}

/// The window of the graph when it comes from a Prometheus.
pub const PROMETHEUS_WINDOW: Duration = Duration::from_mins(1);

/// How the graph is fed.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The node daemons' metrics port (15020, as Istio's ztunnel).
    pub metrics_port: u16,
    /// Time between two scrapes of every node, and the page's refresh.
    pub interval: Duration,
}

/// Where a Prometheus' HTTP API is: `http://host:port[/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prometheus {
    /// `host:port`.
    pub authority: String,
    /// The path before `/api/v1/...` (empty, or `/prometheus` behind a proxy).
    pub prefix: String,
}

impl std::str::FromStr for Prometheus {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self, Error> {
        let bad = || Error::PrometheusUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, prefix) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if authority.is_empty() || !authority.contains(':') {
            return Err(bad());
        }
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
        Ok(Self { authority: authority.to_owned(), prefix })
    }
}

/// One node's last two good scrapes.
struct Samples {
    before: Option<(Instant, Vec<Sample>)>,
    after: (Instant, Vec<Sample>),
}

/// The samples of every node (or a Prometheus' increases); cheap to clone (shared).
#[derive(Clone)]
pub struct Store {
    nodes: Arc<Mutex<BTreeMap<String, Samples>>>,
    /// From a Prometheus: each series' increase over [`PROMETHEUS_WINDOW`].
    increases: Arc<Mutex<Option<Vec<Sample>>>>,
    pub config: Config,
}

impl Store {
    pub fn new(config: Config) -> Self {
        Self { nodes: Arc::default(), increases: Arc::default(), config }
    }

    /// Records a good scrape of `node`.
    pub fn record(&self, node: &str, at: Instant, mut samples: Vec<Sample>) {
        mesh_graph::metrics::tag_node(&mut samples, node);
        let mut nodes = self.nodes.lock().expect("not poisoned");
        let before = nodes.remove(node).map(|s| s.after);
        nodes.insert(node.to_owned(), Samples { before, after: (at, samples) });
    }

    /// Forgets the nodes not in `keep` (disconnected).
    fn retain(&self, keep: &[String]) {
        self.nodes.lock().expect("not poisoned").retain(|n, _| keep.contains(n));
    }

    /// The graph of each node's last window, or of the Prometheus' last answer.
    pub fn graph(&self) -> Graph {
        if let Some(increases) = self.increases.lock().expect("not poisoned").as_deref() {
            // Increases are deltas from nothing.
            return Graph::build(&[Window { before: &[], after: increases, seconds: PROMETHEUS_WINDOW.as_secs_f64() }]);
        }
        let nodes = self.nodes.lock().expect("not poisoned");
        let windows: Vec<Window<'_>> = nodes
            .values()
            .filter_map(|s| {
                let (then, before) = s.before.as_ref()?;
                let (now, after) = &s.after;
                Some(Window { before, after, seconds: now.duration_since(*then).as_secs_f64() })
            })
            .collect();
        Graph::build(&windows)
    }

    /// The refresh of the page, whole seconds.
    pub fn refresh_seconds(&self) -> u64 {
        self.config.interval.as_secs().max(1)
    }
}

/// Asks `prometheus` every `interval`, forever; failures count as node `prometheus`'s.
pub async fn run_prometheus(store: Store, prometheus: Prometheus, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(store.config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = store.config.interval.min(Duration::from_secs(10));
    loop {
        tick.tick().await;
        match query_increases(&prometheus, timeout).await {
            Ok(mut samples) => {
                mesh_graph::metrics::tag_node(&mut samples, "prometheus");
                *store.increases.lock().expect("not poisoned") = Some(samples);
            }
            Err(e) => {
                tracing::warn!("service graph: asking Prometheus: {e}");
                metrics.graph_scrape_failures.get_or_create(&NodeLabels { node: "prometheus".into() }).inc();
            }
        }
    }
}

/// `increase(<metric>[window])` of each metric the graph reads, as samples named after it
/// (PromQL functions drop the name).
async fn query_increases(p: &Prometheus, timeout: Duration) -> Result<Vec<Sample>, Error> {
    let mut all = Vec::new();
    for name in mesh_graph::graph::METRICS {
        let query = format!("increase({name}[{}s])", PROMETHEUS_WINDOW.as_secs());
        let path = format!("{}/api/v1/query?query={}", p.prefix, url_encode(&query));
        let body = within(&p.authority, timeout, get(&p.authority, &path)).await?;
        all.extend(parse_vector(name, &query, &body)?);
    }
    Ok(all)
}

/// Percent-encoding of a query parameter value (everything but RFC 3986's unreserved).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// An instant vector from `/api/v1/query` as samples called `name`.
fn parse_vector(name: &str, query: &str, body: &str) -> Result<Vec<Sample>, Error> {
    let bad = |detail: String| Error::Prometheus { query: query.to_owned(), detail };
    let doc: serde_json::Value = serde_json::from_str(body).map_err(|e| bad(e.to_string()))?;
    if doc["status"] != "success" {
        return Err(bad(format!("{} {}", doc["errorType"], doc["error"])));
    }
    let result = doc["data"]["result"].as_array().ok_or_else(|| bad("no data.result".into()))?;
    Ok(result
        .iter()
        .filter_map(|r| {
            let labels = r["metric"].as_object()?.iter().filter(|(k, _)| *k != "__name__").map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect();
            let value = r["value"][1].as_str()?.parse().ok()?;
            Some(Sample { name: name.to_owned(), labels, value })
        })
        .collect())
}

/// Scrapes every connected node every `interval`, forever.
pub async fn run(store: Store, nodes: NodeStatuses, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(store.config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: Vec<(String, Option<SocketAddr>)> = nodes
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(name, s)| (name.clone(), s.address.map(|ip| SocketAddr::new(ip, store.config.metrics_port))))
            .collect();
        store.retain(&targets.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        // One slow node must not delay the others: all at once, each bounded by the interval.
        let timeout = store.config.interval.min(Duration::from_secs(10));
        let scrapes = targets.into_iter().map(|(node, addr)| {
            let (store, metrics) = (store.clone(), Arc::clone(&metrics));
            async move {
                let Some(addr) = addr else {
                    tracing::warn!(node, "service graph: the node's address is not known (its stream has no peer address)");
                    metrics.graph_scrape_failures.get_or_create(&NodeLabels { node }).inc();
                    return;
                };
                match scrape(addr, timeout).await {
                    Ok(text) => store.record(&node, Instant::now(), mesh_graph::metrics::parse(&text)),
                    Err(e) => {
                        tracing::warn!(node, "service graph: scraping the node's metrics: {e}");
                        metrics.graph_scrape_failures.get_or_create(&NodeLabels { node }).inc();
                    }
                }
            }
        });
        futures::future::join_all(scrapes).await;
    }
}

/// `GET /metrics` on `addr`, the body.
pub async fn scrape(addr: SocketAddr, timeout: Duration) -> Result<String, Error> {
    let addr = addr.to_string();
    within(&addr, timeout, get(&addr, "/metrics")).await
}

async fn within(addr: &str, timeout: Duration, f: impl Future<Output = Result<String, Error>>) -> Result<String, Error> {
    tokio::time::timeout(timeout, f).await.map_err(|_| Error::Timeout { addr: addr.to_owned(), timeout })?
}

/// `GET path` on `addr` (`host:port`), the body of a 2xx answer.
async fn get(addr: &str, path: &str) -> Result<String, Error> {
    let http = |source| Error::Http { addr: addr.to_owned(), source };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| Error::Connect { addr: addr.to_owned(), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr)
        .body(Empty::<Bytes>::new())
        .map_err(|_| Error::PrometheusUrl(format!("{addr}{path}")))?;
    let answer = sender.send_request(req).await.map_err(http)?;
    if !answer.status().is_success() {
        return Err(Error::Status { addr: addr.to_owned(), status: answer.status() });
    }
    let body = answer.into_body().collect().await.map_err(http)?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::server::NodeStatus;

    const CONFIG: Config = Config { metrics_port: 0, interval: Duration::from_millis(100) };

    fn requests(n: u32) -> String {
        format!(
            "istio_requests_total{{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"demo\",destination_workload=\"whoami-1\",destination_workload_namespace=\"demo\",destination_service_name=\"whoami\",destination_service_namespace=\"demo\",connection_security_policy=\"mutual_tls\",request_protocol=\"http\",response_code=\"200\"}} {n}\n"
        )
    }

    #[test]
    fn the_graph_needs_two_scrapes_of_a_node_and_takes_its_own_window() {
        let store = Store::new(CONFIG);
        let t0 = Instant::now();
        store.record("n1", t0, mesh_graph::metrics::parse(&requests(10)));
        assert!(store.graph().edges.is_empty());
        store.record("n1", t0 + Duration::from_secs(2), mesh_graph::metrics::parse(&requests(30)));
        let g = store.graph();
        assert_eq!(g.edges.len(), 2, "{g:?}");
        assert!((g.edges[0].rps - 10.0).abs() < 1e-9, "{g:?}");
        assert_eq!(g.reporters, ["n1"]);
        store.retain(&[]);
        assert!(store.graph().nodes.is_empty());
    }

    /// A node answering one canned metrics text per connection.
    async fn fake_node(texts: Vec<String>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for text in texts {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}", text.len());
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    /// Waits (5 s at most) until `task` has given `store` a graph with edges; stops the task.
    async fn first_graph(store: &Store, task: tokio::task::JoinHandle<()>) -> Graph {
        let started = Instant::now();
        while store.graph().edges.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "no graph after 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        store.graph()
    }

    #[test]
    fn prometheus_urls() {
        let p: Prometheus = "http://prometheus.monitoring:9090".parse().expect("url");
        assert_eq!(p, Prometheus { authority: "prometheus.monitoring:9090".into(), prefix: String::new() });
        let p: Prometheus = "http://10.0.0.1:9090/prom/".parse().expect("url");
        assert_eq!(p.prefix, "/prom");
        for bad in ["https://p:9090", "http://p", "p:9090", "http://"] {
            assert!(bad.parse::<Prometheus>().is_err(), "{bad}");
        }
        assert_eq!(url_encode("increase(a[60s])"), "increase%28a%5B60s%5D%29");
    }

    #[tokio::test]
    async fn the_graph_can_come_from_a_prometheus() {
        // One answer per metric the graph reads; only the requests have a series.
        let answer = |series: &str| format!(r#"{{"status":"success","data":{{"resultType":"vector","result":[{series}]}}}}"#);
        let requests = answer(
            r#"{"metric":{"reporter":"destination","source_workload":"client","source_workload_namespace":"demo","destination_workload":"whoami-1","destination_workload_namespace":"demo","destination_service_name":"whoami","destination_service_namespace":"demo","connection_security_policy":"mutual_tls","request_protocol":"http","response_code":"200","instance":"10.0.0.1:15020"},"value":[1700000000.1,"120"]}"#,
        );
        let mut texts = vec![requests];
        texts.extend(std::iter::repeat_n(answer(""), mesh_graph::graph::METRICS.len() - 1));
        let addr = fake_node(texts).await;
        let store = Store::new(CONFIG);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let prometheus: Prometheus = format!("http://{addr}").parse().expect("url");
        let g = first_graph(&store, tokio::spawn(run_prometheus(store.clone(), prometheus, Arc::clone(&metrics)))).await;
        assert_eq!(g.reporters, ["prometheus"]);
        // 120 requests over the 60 s window.
        assert!(g.edges.iter().all(|e| (e.rps - 2.0).abs() < 1e-9 && e.mtls), "{g:?}");
    }

    #[tokio::test]
    async fn connected_nodes_are_scraped_at_their_stream_address_and_failures_counted() {
        let addr = fake_node(vec![requests(1), requests(5), requests(9)]).await;
        let store = Store::new(Config { metrics_port: addr.port(), ..CONFIG });
        let nodes: NodeStatuses = Arc::default();
        {
            let mut n = nodes.lock().expect("not poisoned");
            n.insert("n1".into(), NodeStatus { connected: true, address: Some(addr.ip()), ..NodeStatus::default() });
            // Connected, but nothing listens on its metrics port (127.0.0.2, the same port).
            n.insert("n2".into(), NodeStatus { connected: true, address: Some(Ipv4Addr::new(127, 0, 0, 2).into()), ..NodeStatus::default() });
            n.insert("gone".into(), NodeStatus { connected: false, address: Some(addr.ip()), ..NodeStatus::default() });
        }
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let g = first_graph(&store, tokio::spawn(run(store.clone(), nodes, Arc::clone(&metrics)))).await;
        assert_eq!(g.reporters, ["n1"], "{g:?}");
        assert!(g.edges.iter().all(|e| e.rps > 0.0 && e.mtls), "{g:?}");
        let text = crate::metrics::encode(&registry);
        assert!(text.contains("mesh_control_graph_scrape_failures_total{node=\"n2\"}"), "{text}");
        assert!(!text.contains("node=\"gone\""), "{text}");
    }
}
