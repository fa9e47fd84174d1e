//! The shipped Grafana dashboards (`deploy/dashboards/*.json`) against a real Prometheus
//! (Debian's `prometheus`) scraping the lab with the shipped jobs (`deploy/prometheus/scrape.yaml`,
//! discovery from a file instead of Kubernetes): Prometheus runs in the underlay namespace (where
//! mesh-control runs), scrapes both node daemons at their underlay addresses and the controller
//! on loopback every second, while the meshed client sends HTTP (200, 404, 500, uploads, a
//! second hop from whoami to helloworld) and TCP traffic and the unmeshed client sends plaintext
//! requests. Then every template variable's query must offer the values the test substitutes, and
//! every panel target's PromQL, with the variables filled in, must give a non-empty, plausible
//! answer (rates > 0, success rates in (0, 1], quantiles > 0 and finite) — except the targets in
//! [`EMPTY_BY_DESIGN`], each with the reason, which must stay empty.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_tests::{
    PodProcess, Spawn,
    cluster::{
        Cluster, GRPC_PORT, HTTP_SERVICE_PORT, METRICS_PORT, TCP_SERVICE_PORT, VIP, VIP_HELLOWORLD,
    },
};
use serde_json::Value;

use super::{cluster, eventually};

const DASHBOARDS: [(&str, &str); 3] = [
    ("mesh", include_str!("../../deploy/dashboards/mesh.json")),
    (
        "service",
        include_str!("../../deploy/dashboards/service.json"),
    ),
    (
        "workload",
        include_str!("../../deploy/dashboards/workload.json"),
    ),
];

/// Where Prometheus listens, inside the underlay namespace (never the host's loopback).
const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

/// What Grafana would put for `$__rate_interval`, `$__interval` and `$__range`: the traffic runs
/// longer than this before the first query, and Prometheus scrapes every second.
const RANGE: &str = "30s";

/// The dashboards' template variables, as a user picks them for the traffic below.
const VARIABLES: [(&str, &str); 3] = [
    ("namespace", "demo"),
    ("service", "whoami.demo.svc.cluster.local"),
    // n2p1: on the other node than the client, so reached over HBONE; it also makes the
    // second hop to helloworld (outbound traffic of its own).
    ("workload", "whoami-2"),
];

/// Targets that cannot be non-empty for this traffic: (dashboard, panel title, refId, why).
/// Each must be empty (a target that starts answering must leave this list).
const EMPTY_BY_DESIGN: &[(&str, &str, &str, &str)] = &[
    // None left. "Incoming Requests by Source and Response Code" / B (requests without mTLS)
    // was here until plaintext from unmeshed clients met the destination daemon (README,
    // "Plaintext from unmeshed clients"): the unmeshed pod's requests now answer it.
];

/// A Prometheus scraping the lab; killed (by PID, as a [`PodProcess`]) and its storage removed
/// when dropped, also when the test panics.
struct Prometheus {
    process: Option<PodProcess>,
    dir: PathBuf,
    netns: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shipped scrape jobs (Kubernetes service discovery by pod labels and port names).
const SCRAPE: &str = include_str!("../../deploy/prometheus/scrape.yaml");

/// What Kubernetes discovery (`role: pod`) would find in a cluster shaped like the lab, one
/// target group per pod port (or per pod, for the DaemonSet's pods, which declare no port) with
/// the meta labels the jobs' relabelling reads: the daemons, and ports the jobs must drop (the
/// controller's gRPC, an app's port).
fn discovered(c: &Cluster) -> Value {
    let pod = |address: String, app: &str, port: &str, name: String, node: &str| {
        serde_json::json!({"targets": [address], "labels": {
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
            "__meta_kubernetes_pod_container_port_name": port,
            "__meta_kubernetes_namespace": "mesh-system",
            "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_node_name": node,
        }})
    };
    let mut groups = Vec::new();
    for n in &c.lab.nodes {
        groups.push(serde_json::json!({"targets": [n.underlay_ip.to_string()], "labels": {
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "mesh-node",
            "__meta_kubernetes_pod_ip": n.underlay_ip.to_string(),
            "__meta_kubernetes_pod_annotation_prometheus_io_port": METRICS_PORT.to_string(),
            "__meta_kubernetes_namespace": "mesh-system",
            "__meta_kubernetes_pod_name": format!("mesh-node-{}", n.name),
            "__meta_kubernetes_pod_node_name": n.name,
        }}));
    }
    // mesh-control's status server listens on 127.0.0.1:15014 in Prometheus' namespace.
    groups.push(pod(
        "127.0.0.1:15014".into(),
        "mesh-control",
        "http-status",
        "mesh-control-0".into(),
        "n1",
    ));
    groups.push(pod(
        "127.0.0.1:15012".into(),
        "mesh-control",
        "grpc",
        "mesh-control-0".into(),
        "n1",
    ));
    groups.push(pod(
        format!("{}:8081", c.lab.pod("n2p1").ip),
        "whoami",
        "http",
        "whoami-2".into(),
        "n2",
    ));
    Value::Array(groups)
}

impl Prometheus {
    /// Starts Prometheus in the underlay namespace with `deploy/prometheus/scrape.yaml` as
    /// shipped but for its discovery: Debian's Prometheus is built without Kubernetes discovery,
    /// so the same meta labels come from a file ([`discovered`]) and the jobs' relabelling runs
    /// unchanged. Scrapes every second.
    fn start(c: &mut Cluster) -> Self {
        let netns = format!("{}{}-ul", mesh_tests::clean::PREFIX, c.lab.spec.run);
        let dir = std::env::temp_dir().join(format!("mesh-{}-prometheus", c.lab.spec.run));
        let _ = std::fs::remove_dir_all(&dir);
        mesh_tests::sys::mkdir(&dir.join("data")).expect("storage dir");
        let pods = dir.join("pods.json");
        mesh_tests::sys::write(&pods, &discovered(c).to_string())
            .expect("write the discovered pods");
        let kubernetes = "kubernetes_sd_configs:\n      - role: pod\n";
        assert_eq!(
            SCRAPE.matches(kubernetes).count(),
            2,
            "both jobs discover pods: {SCRAPE}"
        );
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n{}",
            SCRAPE.replace(
                kubernetes,
                &format!("file_sd_configs:\n      - files: ['{}']\n", pods.display())
            )
        );
        let config_file = dir.join("prometheus.yml");
        mesh_tests::sys::write(&config_file, &config).expect("write the scrape config");
        let cgroup = c.lab.cgroup.join("prometheus");
        mesh_tests::sys::mkdir(&cgroup).expect("cgroup");
        let args = [
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={PROMETHEUS_ADDR}"),
            "--storage.tsdb.retention.time=1h".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = c.logs.join("prometheus.log");
        let mut spawn = Spawn::new(&netns, &cgroup, "/usr/bin/prometheus", &args);
        spawn.log = Some(&log);
        let mut this = Self {
            process: None,
            dir,
            netns: netns.clone(),
        };
        let mut p = c
            .lab
            .spawn(&spawn)
            .expect("start prometheus (Debian's package, scripts/setup.sh)");
        p.wait_for_line(
            "Server is ready to receive web requests",
            Duration::from_secs(30),
        )
        .expect("prometheus ready");
        this.process = Some(p);
        this
    }

    /// `GET /api/v1/query` from inside the namespace: the result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        let out = mesh_tests::sys::run(
            "nsenter",
            &[
                &format!("--net=/run/netns/{}", self.netns),
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-G",
                "--data-urlencode",
                &format!("query={expr}"),
                &format!("http://{PROMETHEUS_ADDR}/api/v1/query"),
            ],
        )
        .expect("query prometheus");
        let answer: Value = serde_json::from_slice(&out.stdout).expect("prometheus answers JSON");
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        assert_eq!(answer["data"]["resultType"], "vector", "{expr}: {answer}");
        answer["data"]["result"].as_array().expect("result").clone()
    }
}

/// Background traffic for `secs` seconds, every kind the panels show, a few times a second so
/// every counter grows between any two scrapes: from the meshed client (n1p1) 200s, 404s, 500s,
/// 2 kB uploads, whoami's own call to helloworld, gRPC calls, and TCP connections to the echo
/// port that send 512 bytes each way; from the unmeshed pod (n1p3) plaintext requests.
///
/// Port 8081 (HTTP) is the target of whoami, whoami-v1/-v2 and helloworld alike: the
/// destination node names the Service the request's host names (README: "Dashboards and
/// Prometheus"); gRPC's 9090 and the echo's 8080 belong to whoami alone.
fn traffic(c: &mut Cluster, secs: u32) -> [PodProcess; 2] {
    let whoami = c.bins.whoami.display().to_string();
    let curl = "curl -s -o /dev/null --max-time 2";
    let meshed = format!(
        "body=$(printf '%02000d' 0); end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do \
         {curl} http://{VIP}/; {curl} http://{VIP}/status/404; {curl} http://{VIP}/status/500; \
         {curl} --data-binary \"$body\" http://{VIP}/upload; \
         {curl} http://{VIP}/call/{VIP_HELLOWORLD}:{HTTP_SERVICE_PORT}/hello; \
         {whoami} grpc-call {VIP}:{GRPC_PORT} hello >/dev/null; \
         {whoami} connect {VIP}:{TCP_SERVICE_PORT} --count 2 --echo 512 >/dev/null; sleep 0.05; done"
    );
    let plain = format!(
        "end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do {curl} http://{VIP}/; sleep 0.1; done"
    );
    let (a, _) = c
        .spawn_in_pod_logged("n1p1", "prometheus-load", "sh", &["-c", &meshed])
        .expect("start the meshed load");
    let (b, _) = c
        .spawn_in_pod_logged("n1p3", "prometheus-load-plain", "sh", &["-c", &plain])
        .expect("start the plaintext load");
    [a, b]
}

/// What a panel target shows, by its PromQL, and so what a plausible answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `histogram_quantile(...)`: latency in ms or a size in bytes, > 0 and finite.
    Quantile,
    /// non-5xx / all: in (0, 1].
    SuccessRate,
    /// A rate of a counter (requests, bytes, connections per second): ≥ 0, their sum > 0.
    Rate,
}

impl Shape {
    fn of(expr: &str) -> Self {
        if expr.starts_with("histogram_quantile(") {
            Self::Quantile
        } else if expr.contains("response_code!~\"5..\"") && expr.contains(" / ") {
            Self::SuccessRate
        } else {
            Self::Rate
        }
    }

    /// The Grafana units a panel of this shape may carry (a wrong unit is a dashboard bug).
    fn units(self) -> &'static [&'static str] {
        match self {
            Self::Quantile => &["ms", "decbytes"],
            Self::SuccessRate => &["percentunit"],
            Self::Rate => &["reqps", "Bps", "cps"],
        }
    }
}

/// One target of one panel, variables substituted.
struct Target {
    dashboard: &'static str,
    panel: String,
    ref_id: String,
    unit: String,
    expr: String,
}

/// `expr` with Grafana's interval variables and the dashboards' template variables filled in.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_owned();
    for v in ["$__rate_interval", "$__interval", "$__range"] {
        e = e.replace(v, RANGE);
    }
    for (name, value) in VARIABLES {
        e = e
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !e.contains('$'),
        "a variable the test does not know in {expr}"
    );
    e
}

/// Every panel target of every dashboard (rows' nested panels included).
fn targets() -> Vec<Target> {
    let mut out = Vec::new();
    for (dashboard, json) in DASHBOARDS {
        let board: Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{dashboard}.json: {e}"));
        let mut panels: Vec<&Value> = Vec::new();
        for p in board["panels"].as_array().expect("panels") {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels.into_iter().filter(|p| p["type"] != "row") {
            let title = p["title"].as_str().expect("title").to_owned();
            for t in p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{title}: no targets"))
            {
                let ref_id = t["refId"].as_str().expect("refId").to_owned();
                // A table's columns carry their unit in an override named after the refId.
                let column = format!("Value #{ref_id}");
                let override_unit = p["fieldConfig"]["overrides"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|o| o["matcher"]["options"] == column.as_str())
                    .and_then(|o| {
                        o["properties"]
                            .as_array()?
                            .iter()
                            .find(|prop| prop["id"] == "unit")?["value"]
                            .as_str()
                    });
                let unit = override_unit
                    .or(p["fieldConfig"]["defaults"]["unit"].as_str())
                    .unwrap_or_else(|| panic!("{title}: no unit"))
                    .to_owned();
                let expr = substitute(
                    t["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{title} {ref_id}: no expr")),
                );
                out.push(Target {
                    dashboard,
                    panel: title.clone(),
                    ref_id,
                    unit,
                    expr,
                });
            }
        }
    }
    out
}

/// The values of each template variable's `label_values(<selector>, <label>)` query.
fn variable_options(prom: &Prometheus) -> Vec<(&'static str, String, Vec<String>)> {
    let mut out = Vec::new();
    for (dashboard, json) in DASHBOARDS {
        let board: Value = serde_json::from_str(json).expect("dashboard JSON");
        for v in board["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .filter(|v| v["type"] == "query")
        {
            let name = v["name"].as_str().expect("name").to_owned();
            let query = v["query"].as_str().expect("a label_values(...) query");
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{query}"));
            let (selector, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            // Grafana asks for the label's values among the selector's series: the same set.
            let expr = format!("group by ({}) ({})", label.trim(), substitute(selector));
            let values = prom
                .query(&expr)
                .iter()
                .filter_map(|s| s["metric"][label.trim()].as_str().map(str::to_owned))
                .collect();
            out.push((dashboard, name, values));
        }
    }
    out
}

/// Why `result` is not a plausible answer for `shape`, if it is not.
fn implausible(shape: Shape, result: &[Value]) -> Option<String> {
    let values: Vec<f64> = result
        .iter()
        .map(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect();
    if values.is_empty() {
        return Some("empty".into());
    }
    let bad: Vec<f64> = match shape {
        Shape::Quantile => values
            .iter()
            .copied()
            .filter(|v| !(v.is_finite() && *v > 0.0))
            .collect(),
        Shape::SuccessRate => values
            .iter()
            .copied()
            .filter(|v| !(*v > 0.0 && *v <= 1.0))
            .collect(),
        Shape::Rate => values
            .iter()
            .copied()
            .filter(|v| !(v.is_finite() && *v >= 0.0))
            .collect(),
    };
    if !bad.is_empty() {
        return Some(format!("values {bad:?} out of range"));
    }
    (shape == Shape::Rate && values.iter().sum::<f64>() <= 0.0).then(|| "every rate is 0".into())
}

#[test]
fn every_dashboard_panel_answers_for_real_traffic_in_a_real_prometheus() {
    let mut c = cluster();
    let prom = Prometheus::start(&mut c);
    let started = Instant::now();
    let _load = traffic(&mut c, 120);
    scrapes_the_metrics_ports_only(&prom);
    // Then traffic for longer than the queries' range.
    eventually(
        "500s counted at both reporters",
        Duration::from_secs(30),
        || {
            prom.query("sum by (reporter) (istio_requests_total{response_code=\"500\"})")
                .len()
                == 2
        },
    );
    std::thread::sleep(Duration::from_secs(20));
    println!(
        "{} s of traffic before the first panel query",
        started.elapsed().as_secs()
    );

    // What each reporter counted, by Service (context for any failure below).
    for expr in [
        "sum by (reporter, destination_service, request_protocol, connection_security_policy) (rate(istio_requests_total[30s]))",
        "sum by (reporter, destination_service) (rate(istio_tcp_connections_opened_total[30s]))",
    ] {
        for s in prom.query(expr) {
            println!("{} {}", s["metric"], s["value"][1]);
        }
    }

    // The variables offer what the test substitutes.
    for (dashboard, name, values) in variable_options(&prom) {
        let want = VARIABLES
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{dashboard}: variable ${name} unknown to the test"))
            .1;
        assert!(
            values.iter().any(|v| v == want),
            "{dashboard}: ${name} offers {values:?}, not {want:?}"
        );
    }
    every_target_answers(&prom);
}

/// Both daemons and the controller are scraped, and nothing else: the jobs' relabelling kept
/// the daemons' pods (at their annotated port) and the controller's metrics port (its gRPC port
/// and the app's port are dropped), and named each node.
fn scrapes_the_metrics_ports_only(prom: &Prometheus) {
    let mut up = Vec::new();
    eventually(
        "prometheus to scrape both nodes and the controller",
        Duration::from_secs(20),
        || {
            up = prom.query("up == 1");
            up.len() == 3
        },
    );
    let jobs: BTreeMap<String, usize> = up.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s["metric"]["job"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
        m
    });
    assert_eq!(
        jobs,
        BTreeMap::from([("mesh-control".to_owned(), 1), ("mesh-node".to_owned(), 2)]),
        "{up:?}"
    );
    assert_eq!(
        prom.query("up").len(),
        3,
        "only the metrics ports are targets"
    );
    let mut nodes: Vec<&str> = up
        .iter()
        .filter(|s| s["metric"]["job"] == "mesh-node")
        .filter_map(|s| s["metric"]["node"].as_str())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["n1", "n2"], "{up:?}");
}

/// Every panel target, variables substituted, answers plausibly for its shape; the ones in
/// [`EMPTY_BY_DESIGN`] are empty.
fn every_target_answers(prom: &Prometheus) {
    let all = targets();
    let mut failures = Vec::new();
    let mut answered = 0;
    for t in &all {
        let shape = Shape::of(&t.expr);
        let what = format!("{} / {} {}", t.dashboard, t.panel, t.ref_id);
        assert!(
            shape.units().contains(&t.unit.as_str()),
            "{what}: unit {} for a {shape:?}",
            t.unit
        );
        let result = prom.query(&t.expr);
        let excused = EMPTY_BY_DESIGN
            .iter()
            .find(|(d, p, r, _)| *d == t.dashboard && *p == t.panel && *r == t.ref_id);
        if let Some((.., why)) = excused {
            assert!(
                result.is_empty(),
                "{what} is listed as empty ({why}) but answers {result:?}: take it off the list"
            );
            println!("empty by design: {what}: {why}");
        } else if let Some(why) = implausible(shape, &result) {
            failures.push(format!("{what}: {why}\n    {}\n    {result:?}", t.expr));
        } else {
            answered += 1;
            println!(
                "{what}: {} series, first {}",
                result.len(),
                result[0]["value"][1].as_str().unwrap_or("")
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} targets failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
    assert_eq!(answered + EMPTY_BY_DESIGN.len(), all.len());
    println!(
        "{answered} of {} targets answered plausibly, {} empty by design",
        all.len(),
        EMPTY_BY_DESIGN.len()
    );
}
