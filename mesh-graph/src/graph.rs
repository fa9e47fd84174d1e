//! The service graph: workloads and Services as nodes, the traffic of one window as edges, built
//! from two scrapes of every node daemon's Istio metrics.
//!
//! Each request (and TCP connection) between two meshed workloads is counted twice, once by
//! each daemon (`reporter="source"` and `reporter="destination"`); the graph counts it once.
//! Kiali keeps the destination's series. Here the source's are kept for every flow (source
//! workload, destination workload, protocol) a source daemon reports, and the destination's
//! only for the others (unmeshed clients, which no source daemon sees), because of who knows
//! the Service: the source daemon routed the request or connection to it, while the destination
//! daemon names it from the request's host (HTTP: a request a client's split sent to
//! `whoami-v1` still says `whoami`) or, for TCP, guesses the first Service with an endpoint at
//! the pod port, wrong whenever Services share endpoints (in the lab, `helloworld` for every
//! connection to `whoami`). The source's
//! latency is the client's (network and both daemons included) and its errors include those
//! the source daemon answered itself (no healthy upstream), which is what the caller saw.
//!
//! The source daemon also counts each client connection it routes per request (HTTP, gRPC) as
//! a TCP connection to the Service with destination workload `unknown`; those are left out:
//! their requests are on the request edges.
//!
//! A flow through a Service is drawn as two edges: source workload → Service → destination
//! workload (Kiali's "versioned app" shape); without a Service, source → destination; with a
//! Service but no known destination workload, source → Service.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::metrics::{Sample, bucket_bound, deltas, histogram_quantile};

const REQUESTS: &str = "istio_requests_total";
const DURATION_BUCKET: &str = "istio_request_duration_milliseconds_bucket";
const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
const TCP_SENT: &str = "istio_tcp_sent_bytes_total";
const TCP_RECEIVED: &str = "istio_tcp_received_bytes_total";
/// The metrics the graph reads (what a Prometheus is asked for).
pub const METRICS: [&str; 5] = [
    REQUESTS,
    DURATION_BUCKET,
    TCP_OPENED,
    TCP_SENT,
    TCP_RECEIVED,
];
/// Istio's value of a label nothing is known of.
const UNKNOWN: &str = "unknown";

/// Two scrapes of one node daemon, `seconds` apart. Each node has its own window: a node whose
/// scrape failed once keeps its older sample, and its rates are still right.
#[derive(Clone, Copy, Debug)]
pub struct Window<'a> {
    pub before: &'a [Sample],
    pub after: &'a [Sample],
    pub seconds: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeKind {
    Workload,
    Service,
    /// A peer no daemon could name: an unmeshed client, or a destination outside the mesh.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// `workload:<ns>/<name>`, `service:<ns>/<name>` or `unknown`.
    pub id: String,
    pub kind: NodeKind,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub source: String,
    pub target: String,
    /// `http`, `grpc` or `tcp`.
    pub protocol: String,
    /// Requests per second (HTTP and gRPC).
    pub rps: f64,
    /// Share of failed requests, percent: 5xx, or a gRPC status other than OK.
    pub error_percent: f64,
    /// From the buckets of `istio_request_duration_milliseconds` filled in the window.
    pub p99_ms: Option<f64>,
    /// TCP: bytes per second, both directions.
    pub bytes_per_second: f64,
    /// TCP: connections opened per second.
    pub connections_per_second: f64,
    /// Every request or connection of the window was mutual TLS.
    pub mtls: bool,
}

/// The graph of one window. Nodes and edges are sorted by id, so a rendering is a function of
/// the traffic alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// The longest window any node contributed, seconds (0 before a second scrape).
    pub window_seconds: f64,
    /// Nodes whose metrics are in the graph.
    pub reporters: Vec<String>,
}

/// Who talked to whom over which protocol: the unit the reporter choice is made for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Flow {
    source: String,
    service: Option<String>,
    destination: String,
    protocol: String,
}

impl Flow {
    /// What both reporters agree on (they may name different Services).
    fn pair(&self) -> (String, String, String) {
        (
            self.source.clone(),
            self.destination.clone(),
            self.protocol.clone(),
        )
    }
}

#[derive(Default)]
struct Traffic {
    requests: f64,
    errors: f64,
    plaintext: f64,
    buckets: BTreeMap<u64, (f64, f64)>,
    opened: f64,
    bytes: f64,
}

impl Traffic {
    fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.plaintext += other.plaintext;
        self.opened += other.opened;
        self.bytes += other.bytes;
        for (k, (le, n)) in &other.buckets {
            self.buckets.entry(*k).or_insert((*le, 0.0)).1 += n;
        }
    }

    fn is_empty(&self) -> bool {
        self.requests <= 0.0 && self.opened <= 0.0 && self.bytes <= 0.0
    }
}

fn workload_id(s: &Sample, side: &str) -> String {
    let name = s.label(&format!("{side}_workload"));
    let ns = s.label(&format!("{side}_workload_namespace"));
    if name.is_empty() || name == UNKNOWN {
        UNKNOWN.to_owned()
    } else {
        format!("workload:{ns}/{name}")
    }
}

fn flow(s: &Sample) -> Flow {
    let service = s.label("destination_service_name");
    let service_ns = s.label("destination_service_namespace");
    let service = (!service.is_empty() && service != UNKNOWN)
        .then(|| format!("service:{service_ns}/{service}"));
    let protocol = match s.name.as_str() {
        REQUESTS | DURATION_BUCKET => match s.label("request_protocol") {
            "grpc" => "grpc",
            _ => "http",
        },
        _ => "tcp",
    };
    let mut destination = workload_id(s, "destination");
    // An unknown destination behind no Service would meet an unknown source in one node.
    if destination == UNKNOWN && service.is_none() {
        destination = "unknown-destination".into();
    }
    Flow {
        source: workload_id(s, "source"),
        service,
        destination,
        protocol: protocol.into(),
    }
}

fn failed(s: &Sample) -> bool {
    let grpc = s.label("grpc_response_status");
    s.label("response_code").starts_with('5') || (!grpc.is_empty() && grpc != "0")
}

impl Graph {
    /// The graph of the traffic between each window's two scrapes, as rates per second.
    pub fn build(windows: &[Window<'_>]) -> Self {
        let c = collect(windows);
        let mut edges: BTreeMap<(String, String, String), Traffic> = BTreeMap::new();
        let (seen, reported_by_source) = (c.seen, c.reported_by_source);
        let (reporters, window_seconds) = (c.reporters, c.window_seconds);
        for ((f, by_destination), t) in &seen {
            if *by_destination && reported_by_source.contains(&f.pair()) {
                continue;
            }
            let hops = match &f.service {
                Some(svc) if f.destination == UNKNOWN => vec![(&f.source, svc)],
                Some(svc) => vec![(&f.source, svc), (svc, &f.destination)],
                None => vec![(&f.source, &f.destination)],
            };
            for (from, to) in hops {
                edges
                    .entry((from.clone(), to.clone(), f.protocol.clone()))
                    .or_default()
                    .add(t);
            }
        }
        let mut nodes = BTreeMap::new();
        let edges: Vec<Edge> = edges
            .into_iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|((source, target, protocol), t)| {
                for id in [&source, &target] {
                    nodes.entry(id.clone()).or_insert_with(|| node(id));
                }
                let buckets: Vec<(f64, f64)> = t.buckets.into_values().collect();
                let total = t.requests + t.opened;
                Edge {
                    source,
                    target,
                    protocol,
                    rps: t.requests,
                    error_percent: if t.requests > 0.0 {
                        100.0 * t.errors / t.requests
                    } else {
                        0.0
                    },
                    p99_ms: histogram_quantile(0.99, &buckets),
                    bytes_per_second: t.bytes,
                    connections_per_second: t.opened,
                    mtls: total > 0.0 && t.plaintext <= 0.0,
                }
            })
            .collect();
        Self {
            nodes: nodes.into_values().collect(),
            edges,
            window_seconds,
            reporters: reporters.into_iter().collect(),
        }
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

/// What the windows hold, before the reporter choice.
struct Collected {
    /// (flow, reported by the destination) → traffic as rates.
    seen: BTreeMap<(Flow, bool), Traffic>,
    /// (source, destination, protocol) of the flows some source daemon reports (even idle).
    reported_by_source: BTreeSet<(String, String, String)>,
    reporters: BTreeSet<String>,
    window_seconds: f64,
}

fn collect(windows: &[Window<'_>]) -> Collected {
    // (flow, reporter is destination) → traffic as rates.
    let mut seen: BTreeMap<(Flow, bool), Traffic> = BTreeMap::new();
    let mut reported_by_source = BTreeSet::new();
    let mut reporters = BTreeSet::new();
    let mut window_seconds: f64 = 0.0;
    for w in windows {
        if w.seconds <= 0.0 {
            continue;
        }
        window_seconds = window_seconds.max(w.seconds);
        for s in w.after {
            if let Some(n) = s.labels.get("node") {
                reporters.insert(n.clone());
            }
        }
        for (s, delta) in deltas(w.before, w.after) {
            let name = s.name.as_str();
            if !METRICS.contains(&name) {
                continue;
            }
            let f = flow(s);
            let by_destination = s.label("reporter") == "destination";
            if !by_destination {
                if f.protocol == "tcp" && f.destination == UNKNOWN && f.service.is_some() {
                    continue; // a connection routed per request (module doc)
                }
                reported_by_source.insert(f.pair());
            }
            if delta <= 0.0 {
                continue;
            }
            let rate = delta / w.seconds;
            let t = seen.entry((f, by_destination)).or_default();
            let plain = s.label("connection_security_policy") != "mutual_tls";
            match name {
                REQUESTS => {
                    t.requests += rate;
                    if failed(s) {
                        t.errors += rate;
                    }
                    if plain {
                        t.plaintext += rate;
                    }
                }
                // Counts, not rates: only their shape matters for a quantile.
                DURATION_BUCKET => {
                    let le = bucket_bound(s);
                    t.buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += delta;
                }
                TCP_OPENED => {
                    t.opened += rate;
                    if plain {
                        t.plaintext += rate;
                    }
                }
                _ => t.bytes += rate,
            }
        }
    }
    Collected {
        seen,
        reported_by_source,
        reporters,
        window_seconds,
    }
}

fn node(id: &str) -> Node {
    let (kind, rest) = if let Some(rest) = id.strip_prefix("workload:") {
        (NodeKind::Workload, rest)
    } else if let Some(rest) = id.strip_prefix("service:") {
        (NodeKind::Service, rest)
    } else {
        (NodeKind::Unknown, id)
    };
    let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
    Node {
        id: id.to_owned(),
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::{parse, tag_node};

    /// Labels of a flow `client → whoami (Service) → whoami-1`, meshed on both ends.
    fn peers(reporter: &str, src: &str, dst: &str, security: &str) -> String {
        format!(
            "reporter=\"{reporter}\",source_workload=\"{src}\",source_workload_namespace=\"demo\",destination_workload=\"{dst}\",destination_workload_namespace=\"demo\",destination_service_name=\"whoami\",destination_service_namespace=\"demo\",connection_security_policy=\"{security}\""
        )
    }

    fn requests(reporter: &str, src: &str, dst: &str, code: u16, n: u32) -> String {
        format!(
            "istio_requests_total{{{},request_protocol=\"http\",response_code=\"{code}\",grpc_response_status=\"\"}} {n}\n",
            peers(reporter, src, dst, "mutual_tls")
        )
    }

    /// Two scrapes of two nodes: n1 runs the client (source reporter) and whoami-1, n2
    /// whoami-2; the unmeshed `legacy` pod reaches whoami-2 in plaintext over TCP.
    pub(crate) fn sample_windows() -> Vec<(Vec<Sample>, Vec<Sample>, f64)> {
        let scrape = |text: String, node: &str| {
            let mut s = parse(&text);
            tag_node(&mut s, node);
            s
        };
        let n1_before = requests("source", "client", "whoami-1", 200, 100)
            + &requests("source", "client", "whoami-2", 200, 50)
            + &requests("destination", "client", "whoami-1", 200, 100);
        let n1_after = requests("source", "client", "whoami-1", 200, 120)
            + &requests("source", "client", "whoami-2", 200, 80)
            + &requests("source", "client", "whoami-2", 503, 2)
            + &requests("destination", "client", "whoami-1", 200, 120)
            + &format!(
                "istio_request_duration_milliseconds_bucket{{{},request_protocol=\"http\",le=\"1\"}} 10\n\
                 istio_request_duration_milliseconds_bucket{{{0},request_protocol=\"http\",le=\"5\"}} 20\n\
                 istio_request_duration_milliseconds_bucket{{{0},request_protocol=\"http\",le=\"+Inf\"}} 20\n",
                peers("source", "client", "whoami-1", "mutual_tls")
            );
        let tcp = peers("destination", "unknown", "whoami-2", "unknown").replace(
            "source_workload_namespace=\"demo\"",
            "source_workload_namespace=\"unknown\"",
        );
        let n2_before = requests("destination", "client", "whoami-2", 200, 50);
        let n2_after = requests("destination", "client", "whoami-2", 200, 80)
            + &requests("destination", "client", "whoami-2", 503, 2)
            + &format!(
                "istio_tcp_connections_opened_total{{{tcp},request_protocol=\"tcp\"}} 4\n\
                 istio_tcp_sent_bytes_total{{{tcp},request_protocol=\"tcp\"}} 3000\n\
                 istio_tcp_received_bytes_total{{{tcp},request_protocol=\"tcp\"}} 1000\n"
            );
        vec![
            (scrape(n1_before, "n1"), scrape(n1_after, "n1"), 2.0),
            (scrape(n2_before, "n2"), scrape(n2_after, "n2"), 2.0),
        ]
    }

    pub(crate) fn sample_graph() -> Graph {
        let w = sample_windows();
        let windows: Vec<Window<'_>> = w
            .iter()
            .map(|(before, after, seconds)| Window {
                before,
                after,
                seconds: *seconds,
            })
            .collect();
        Graph::build(&windows)
    }

    fn edge<'a>(g: &'a Graph, from: &str, to: &str, protocol: &str) -> &'a Edge {
        g.edges
            .iter()
            .find(|e| e.source == from && e.target == to && e.protocol == protocol)
            .unwrap_or_else(|| panic!("edge {from} → {to} ({protocol}) in {:#?}", g.edges))
    }

    #[test]
    fn flows_through_a_service_become_two_edges_counted_once() {
        let g = sample_graph();
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "service:demo/whoami",
                "unknown",
                "workload:demo/client",
                "workload:demo/whoami-1",
                "workload:demo/whoami-2"
            ]
        );
        assert_eq!(g.reporters, ["n1", "n2"]);
        assert!((g.window_seconds - 2.0).abs() < 1e-9);
        // client → whoami: (20 + 32) requests in 2 s, from the client's series (the
        // destinations' count of the same 52 is not added).
        let to_service = edge(&g, "workload:demo/client", "service:demo/whoami", "http");
        assert!((to_service.rps - 26.0).abs() < 1e-9, "{to_service:?}");
        assert!((to_service.error_percent - 100.0 * 2.0 / 52.0).abs() < 1e-9);
        assert!(to_service.mtls);
        let w1 = edge(&g, "service:demo/whoami", "workload:demo/whoami-1", "http");
        assert!((w1.rps - 10.0).abs() < 1e-9);
        assert!(w1.error_percent.abs() < 1e-9);
        // 10 of 20 in (0,1], 10 in (1,5]: p99 = 1 + 4 × 0.98.
        assert!((w1.p99_ms.expect("p99") - 4.92).abs() < 1e-9, "{w1:?}");
        let w2 = edge(&g, "service:demo/whoami", "workload:demo/whoami-2", "http");
        assert!((w2.rps - 16.0).abs() < 1e-9);
        assert_eq!(w2.p99_ms, None);
    }

    #[test]
    fn tcp_edges_carry_bytes_and_connections_and_plaintext_has_no_lock() {
        let g = sample_graph();
        let tcp = edge(&g, "unknown", "service:demo/whoami", "tcp");
        assert!((tcp.connections_per_second - 2.0).abs() < 1e-9);
        assert!((tcp.bytes_per_second - 2000.0).abs() < 1e-9);
        assert!(tcp.rps.abs() < 1e-9);
        assert!(!tcp.mtls);
        assert_eq!(g.node("unknown").expect("unknown").kind, NodeKind::Unknown);
    }

    #[test]
    fn the_source_reporter_counts_when_no_destination_daemon_saw_the_flow() {
        // A meshed client calling an unmeshed pod outside any Service.
        let text = |n: u32| {
            format!(
                "istio_requests_total{{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"demo\",destination_workload=\"legacy\",destination_workload_namespace=\"demo\",destination_service_name=\"unknown\",connection_security_policy=\"unknown\",request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"14\"}} {n}\n"
            )
        };
        let (before, after) = (parse(&text(1)), parse(&text(5)));
        let g = Graph::build(&[Window {
            before: &before,
            after: &after,
            seconds: 4.0,
        }]);
        let e = edge(&g, "workload:demo/client", "workload:demo/legacy", "grpc");
        assert!((e.rps - 1.0).abs() < 1e-9);
        // gRPC UNAVAILABLE in an HTTP 200 is a failure.
        assert!((e.error_percent - 100.0).abs() < 1e-9);
        assert!(!e.mtls);
    }

    #[test]
    fn the_service_is_the_one_the_client_dialed_and_routed_connections_are_left_out() {
        // The destination guessed the first Service with an endpoint at its address
        // (helloworld); the client dialed whoami. And the client's connection, routed per request, is
        // counted by the source as TCP to whoami with no destination workload.
        let both = |n: u32| {
            requests("source", "client", "whoami-1", 200, n)
                + &requests("destination", "client", "whoami-1", 200, n)
                    .replace("\"whoami\"", "\"helloworld\"")
                + &format!(
                    "istio_tcp_connections_opened_total{{{},request_protocol=\"tcp\"}} {n}\n",
                    peers("source", "client", "unknown", "unknown")
                )
        };
        let (before, after) = (parse(&both(10)), parse(&both(20)));
        let g = Graph::build(&[Window {
            before: &before,
            after: &after,
            seconds: 1.0,
        }]);
        assert_eq!(g.edges.len(), 2, "{:#?}", g.edges);
        let e = edge(&g, "workload:demo/client", "service:demo/whoami", "http");
        assert!((e.rps - 10.0).abs() < 1e-9);
        assert!(g.node("service:demo/helloworld").is_none());
    }

    #[test]
    fn no_second_scrape_no_traffic_no_edges() {
        let after = parse(&requests("destination", "client", "whoami-1", 200, 7));
        let g = Graph::build(&[Window {
            before: &after,
            after: &after,
            seconds: 5.0,
        }]);
        assert!(g.edges.is_empty() && g.nodes.is_empty(), "{g:?}");
        assert_eq!(Graph::build(&[]), Graph::default());
    }
}
