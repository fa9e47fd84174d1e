//! `cargo xtask lab up|down`: the whole mesh in network namespaces, no Kubernetes.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use mesh_tests::{
    LabSpec,
    clean,
    cluster::{APP_PORT, Binaries, Cluster, HTTP_SERVICE_PORT, METRICS_PORT, TCP_SERVICE_PORT, VIP, VIP_HELLOWORLD},
};

use crate::{require_root, root_dir, setup_and_build, sh, step};

/// Run id of the lab: every object it creates is named `mesh-lab...`.
const RUN: &str = "lab";

#[derive(Subcommand)]
pub enum Action {
    /// Build the lab, start mesh-control, one mesh-node per node and the sample app, drive
    /// traffic and print a report.
    Up,
    /// Remove everything the lab created.
    Down,
    /// Run a command inside a lab pod (its network namespace and cgroup, so the mesh captures
    /// its connections as it does the pod's own), e.g. `cargo xtask lab exec n1p1 -- curl -s
    /// 198.19.0.10/`.
    Exec {
        /// The pod: n<node>p<pod>, as the lab report lists them (n1p1 is the meshed client).
        pod: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up => up(),
        Action::Down => {
            require_root("lab down")?;
            down();
            Ok(())
        }
        Action::Exec { pod, command } => exec(&pod, &command),
    }
}

/// Runs `command` in lab pod `pod` (network namespace and cgroup), with its exit status.
fn exec(pod: &str, command: &[String]) -> Result<()> {
    require_root("lab exec")?;
    let (node, index) = pod
        .strip_prefix('n')
        .and_then(|r| r.split_once('p'))
        .and_then(|(n, p)| Some((n.parse::<u8>().ok()?, p.parse::<u8>().ok()?)))
        .with_context(|| format!("{pod:?} is not a lab pod name (n<node>p<pod>, e.g. n1p1)"))?;
    let netns = format!("mesh-{RUN}-{pod}");
    let cgroup = mesh_tests::sys::cgroup2_root()?.join(format!("mesh-{RUN}/n{node}/pods/p{index}"));
    if !std::path::Path::new("/run/netns").join(&netns).exists() || !cgroup.exists() {
        bail!("no pod {pod} in a running lab (/run/netns/{netns} or {} missing): start it with `cargo xtask lab up`", cgroup.display());
    }
    let (program, args) = command.split_first().context("no command given")?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = mesh_tests::lab::in_netns_and_cgroup(&netns, &cgroup, program, &args).status().context("running nsenter")?;
    if !status.success() {
        bail!("{program} exited with {status}");
    }
    Ok(())
}

fn down() {
    let removed = clean::clean_run(Some(RUN));
    if removed.is_empty() {
        println!("no lab was running");
    }
    for what in removed {
        println!("removed {what}");
    }
}

pub fn state_dir() -> PathBuf {
    PathBuf::from("/run/mesh-lab")
}

/// Which cargo profile [`build_binaries`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// The test suites' (they share the unit tests' build).
    Debug,
    /// The lab's: what a user measures there is what the mesh does.
    Release,
}

impl Profile {
    /// The directory under the target dir holding this profile's binaries.
    pub const fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// Builds the binaries the lab and the end-to-end suite run.
pub fn build_binaries(profile: Profile) -> Result<()> {
    step(&format!("building mesh-control, mesh-node, meshctl and the sample app ({} profile)", profile.dir()));
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--locked", "-p", "mesh-control", "-p", "mesh-node", "-p", "meshctl", "-p", "mesh-tests", "--bins"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    sh(&mut cmd)
}

fn who(line: &str) -> String {
    line.split("name=").nth(1).and_then(|s| s.split_whitespace().next()).map_or_else(|| format!("FAILED ({})", line.trim()), str::to_owned)
}

fn tally(lines: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for l in lines {
        *t.entry(who(l)).or_insert(0) += 1;
    }
    t
}

fn up() -> Result<()> {
    require_root("lab up")?;
    let started = Instant::now();
    setup_and_build()?;
    build_binaries(Profile::Release)?;

    step("removing a previous lab, if any");
    down();

    step("creating 2 nodes and 5 pods, starting mesh-control (file mode), 2 mesh-nodes, the sample app");
    let bins = Binaries::in_dir(&crate::target_dir().join(Profile::Release.dir()));
    let mut cluster = Cluster::start(LabSpec { run: RUN.into(), pods_per_node: vec![3, 2] }, bins, &state_dir())
        .context("starting the lab (see the logs in /run/mesh-lab/logs)")?;
    for pod in &cluster.lab.pods {
        let role = mesh_tests::cluster::PODS.iter().find(|r| r.pod == pod.name).expect("role");
        let meshed = if role.meshed { "meshed" } else { "NOT meshed" };
        println!("    {:<5} {:<9} sa={:<7} {:<15} node n{}  {meshed}", pod.name, role.name, role.service_account, pod.ip, pod.node);
    }

    let vip = SocketAddr::from((VIP, TCP_SERVICE_PORT));
    step(&format!("traffic: 12 connections from each client to Service demo/whoami {vip} (TCP)"));
    let meshed = cluster.dial("n1p1", vip, &["--count", "12"])?;
    let legacy = cluster.dial("n1p3", vip, &["--count", "12"])?;

    step("L7: applying deploy/examples/routing/firefox-canary.yaml and weighted-split.yaml, and policies/deny-admin-writes.yaml");
    let l7 = l7_demo(&cluster)?;

    step("tracing: a Zipkin collector in n1p3, applying deploy/examples/telemetry/tracing.yaml (100 % sampling)");
    let traced = trace_demo(&mut cluster)?;

    step("policy: applying deploy/examples/policies/deny-client-to-whoami.yaml (DENY principal client)");
    let deny = fs::read_to_string(root_dir().join("deploy/examples/policies/deny-client-to-whoami.yaml"))?;
    cluster.apply_policy("deny-client", &deny)?;
    std::thread::sleep(Duration::from_millis(800));
    let denied = cluster.dial("n1p1", vip, &["--count", "6", "--timeout-ms", "2000"])?;
    cluster.delete_policy("deny-client")?;
    std::thread::sleep(Duration::from_millis(800));
    let after = cluster.dial("n1p1", vip, &["--count", "3"])?;

    step("upgrade: a new mesh-node takes over n1's listeners from the running one, under 200 HTTP requests/s");
    let upgrade = upgrade_demo(&mut cluster)?;

    let metrics = cluster.curl_on_node(2, &format!("http://127.0.0.1:{METRICS_PORT}/metrics")).unwrap_or_default();
    let mtls: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains("reporter=\"destination\""))
        .collect();

    println!();
    println!("\x1b[1mmesh lab report\x1b[0m");
    println!("  client (meshed, n1p1) -> {vip}: captured by eBPF into mesh-node n1, HBONE (mTLS) to the backend's node:");
    for (b, n) in tally(&meshed) {
        println!("      answered by {b:<22} {n:>3}");
    }
    println!("  legacy (NOT meshed, n1p3) -> {vip}: balanced in the kernel at connect(), plaintext:");
    for (b, n) in tally(&legacy) {
        println!("      answered by {b:<22} {n:>3}");
    }
    l7.print();
    println!("  identities seen by node n2 (destination reporter; principals, connection_security_policy):");
    for l in mtls.iter().take(4) {
        let pick = |k: &str| l.split(&format!("{k}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap_or("?").to_owned();
        println!(
            "      {} -> {}  [{}]",
            pick("source_principal"),
            pick("destination_principal"),
            pick("connection_security_policy")
        );
    }
    let refused = denied.iter().filter(|l| !l.starts_with("connected") || who(l).starts_with("FAILED")).count();
    traced.print();
    upgrade.print();
    println!("  policy DENY client -> whoami: {refused} of {} attempts refused; after removing it: {} of {} answered", denied.len(), after.iter().filter(|l| !who(l).starts_with("FAILED")).count(), after.len());
    println!();
    println!("  metrics   nsenter --net=/run/netns/mesh-lab-n1 curl -s localhost:{METRICS_PORT}/metrics   (also n2)");
    println!("  admin     nsenter --net=/run/netns/mesh-lab-n1 curl -s localhost:15000/config_dump");
    println!("  control   nsenter --net=/run/netns/mesh-lab-ul curl -s localhost:15014/status");
    println!("  graph     http://127.0.0.1:15014/graph in mesh-lab-ul (the live service graph; also /graph.svg .dot .json): ip netns exec mesh-lab-ul chromium --headless --no-sandbox --screenshot=/tmp/graph.png http://127.0.0.1:15014/graph");
    println!("  policies  drop Istio-shaped YAML into {}/config/policies/ (applied live)", state_dir().display());
    println!("  routes    drop HTTPRoute/GRPCRoute/VirtualService YAML into {}/config/routes/ (see deploy/examples/routing/)", state_dir().display());
    println!("  traces    nsenter --net=/run/netns/mesh-lab-n1p3 curl -s localhost:{ZIPKIN_PORT}/api/v2/traces   (Zipkin API)");
    println!("  datapath  bpftool map dump pinned /sys/fs/bpf/mesh-lab/n1/MESH_SVC_V1");
    let meshctl = crate::target_dir().join(Profile::Release.dir()).join("meshctl");
    println!("  meshctl   {} status   (also: top, graph [--format svg --file graph.svg], config n1, bpf n1 maps, explain n1p1 whoami.demo:80 --http GET /)", meshctl.display());
    println!("  a pod     cargo xtask lab exec n1p1 -- curl -s http://{VIP}:{HTTP_SERVICE_PORT}/   (or any command: its network namespace and cgroup)");
    println!("  logs      {}/logs", state_dir().display());
    println!("  remove    cargo xtask lab down");
    println!("  up in {:.1?}", started.elapsed());
    let failed = tally(&meshed).keys().chain(tally(&legacy).keys()).filter(|k| k.starts_with("FAILED")).count();
    cluster.persist();
    if failed > 0 {
        bail!("some connections failed (see the report above and the logs)");
    }
    if traced.spans.len() != 4 {
        bail!("the traced request did not give one trace of 4 spans (see the report above and the logs)");
    }
    if !l7.as_expected() {
        bail!("the L7 demo did not behave as the report above says it should (see the logs)");
    }
    if !upgrade.as_expected() {
        bail!("the upgrade lost requests or the old daemon did not exit cleanly (see the logs)");
    }
    let _ = APP_PORT;
    Ok(())
}

/// A mesh-node replaced under load (README: "Upgrading mesh-node without losing a request").
struct UpgradeDemo {
    took_over: Duration,
    old_exit: std::process::ExitStatus,
    load: serde_json::Value,
}

fn upgrade_demo(cluster: &mut Cluster) -> Result<UpgradeDemo> {
    let whoami = cluster.bins.whoami.display().to_string();
    let url = format!("http://{VIP}:{HTTP_SERVICE_PORT}/");
    let (mut load, log) = cluster.spawn_in_pod_logged("n1p1", "upgrade-load", &whoami, &["http-load", "--url", &url, "--rate", "200", "--duration", "4", "--connections", "4"])?;
    std::thread::sleep(Duration::from_secs(1));
    let (took_over, mut old) = cluster.upgrade_node(1)?;
    let old_exit = old.wait_exit(Duration::from_secs(15))?;
    load.wait_exit(Duration::from_secs(30))?;
    let text = fs::read_to_string(&log)?;
    let load = serde_json::from_str(text.lines().rfind(|l| l.starts_with('{')).unwrap_or_default()).with_context(|| format!("http-load: {text}"))?;
    Ok(UpgradeDemo { took_over, old_exit, load })
}

impl UpgradeDemo {
    fn as_expected(&self) -> bool {
        self.old_exit.success() && self.load["ok"] == self.load["scheduled"]
    }

    fn print(&self) {
        println!(
            "  upgrade of mesh-node n1 under load: new daemon took over in {:.0?}, the old one drained and exited ({}); requests {} of {} ok, p99 {} µs",
            self.took_over,
            self.old_exit,
            self.load["ok"],
            self.load["scheduled"],
            self.load["p99_us"],
        );
    }
}

/// The collector's port (Zipkin's).
const ZIPKIN_PORT: u16 = 9411;

/// One request traced through two hops, as the collector got it.
struct TraceDemo {
    /// Root first, each the child of the one before.
    spans: Vec<serde_json::Value>,
}

fn trace_demo(cluster: &mut Cluster) -> Result<TraceDemo> {
    let whoami = cluster.bins.whoami.display().to_string();
    let listen = format!("0.0.0.0:{ZIPKIN_PORT}");
    let (collector, _) = cluster.spawn_in_pod_logged("n1p3", "zipkin", &whoami, &["zipkin", "--listen", &listen])?;
    cluster.apps.insert("zipkin".into(), collector);
    let ip = cluster.lab.pod("n1p3").ip.to_string();
    let example = fs::read_to_string(root_dir().join("deploy/examples/telemetry/tracing.yaml"))?;
    cluster.apply_policy("tracing", &example.replace("zipkin.mesh-system.svc.cluster.local", &ip))?;
    let url = format!("http://{VIP}:{HTTP_SERVICE_PORT}/call/{VIP_HELLOWORLD}:{HTTP_SERVICE_PORT}/hello");
    let started = Instant::now();
    let mut spans = Vec::new();
    // The Telemetry reaches the nodes within a second; exporters flush every second.
    while spans.len() != 4 && started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(1000));
        let id = format!("lab-{}", started.elapsed().as_millis());
        cluster.lab.run_in_pod("n1p1", "curl", &["-sS", "--max-time", "5", "-o", "/dev/null", "-H", &format!("x-request-id: {id}"), &url])?;
        std::thread::sleep(Duration::from_millis(1500));
        let out = cluster.lab.run_in_pod("n1p3", "curl", &["-sS", "--max-time", "3", &format!("http://127.0.0.1:{ZIPKIN_PORT}/api/v2/traces")])?;
        let traces: Vec<Vec<serde_json::Value>> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let tag = |s: &serde_json::Value| s["tags"]["guid:x-request-id"].as_str().map(str::to_owned);
        let Some(trace) = traces.into_iter().find(|t| t.iter().any(|s| tag(s).as_deref() == Some(id.as_str()))) else { continue };
        spans = trace.iter().filter(|s| s.get("parentId").is_none()).take(1).cloned().collect();
        while let Some(child) = spans.last().and_then(|p| trace.iter().find(|s| s["parentId"] == p["id"])) {
            spans.push(child.clone());
        }
    }
    Ok(TraceDemo { spans })
}

impl TraceDemo {
    fn print(&self) {
        let Some(first) = self.spans.first() else {
            println!("  tracing: no complete trace reached the collector");
            return;
        };
        println!("  tracing (Telemetry mesh-default -> Zipkin collector in n1p3): client -> whoami -> helloworld, trace {}", first["traceId"].as_str().unwrap_or("?"));
        for (depth, s) in self.spans.iter().enumerate() {
            let tag = |k: &str| s["tags"][k].as_str().unwrap_or("-").to_owned();
            println!(
                "      {:indent$}{:<6} {:<7} {:<48} {} {:>6.2} ms  {}",
                "",
                s["kind"].as_str().unwrap_or("?"),
                tag("istio.canonical_service"),
                tag("upstream_cluster"),
                tag("http.status_code"),
                s["duration"].as_f64().unwrap_or(0.0) / 1000.0,
                tag("node_id"),
                indent = depth * 2
            );
        }
    }
}

/// What the L7 part of the lab showed.
struct L7Demo {
    /// Versions that answered 20 requests with a Firefox User-Agent, and 20 from curl.
    firefox: BTreeMap<String, usize>,
    curl: BTreeMap<String, usize>,
    /// Versions that answered 1,000 requests to Service whoami under the 90/10 split.
    split: BTreeMap<String, usize>,
    /// (status, body) of a denied write and of an allowed read.
    denied: (String, String),
    allowed: String,
}

fn versions_of(out: &std::process::Output) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|j| j["version"].as_str().map(str::to_owned)).unwrap_or_else(|| "FAILED".into());
        *t.entry(v).or_insert(0) += 1;
    }
    t
}

fn l7_demo(cluster: &Cluster) -> Result<L7Demo> {
    let example = |p: &str| fs::read_to_string(root_dir().join("deploy/examples").join(p)).with_context(|| format!("reading deploy/examples/{p}"));
    cluster.apply_routes("firefox-canary", &example("routing/firefox-canary.yaml")?)?;
    cluster.apply_routes("weighted-split", &example("routing/weighted-split.yaml")?)?;
    cluster.apply_policy("deny-admin-writes", &example("policies/deny-admin-writes.yaml")?)?;
    std::thread::sleep(Duration::from_millis(800));
    let hello = format!("http://{VIP_HELLOWORLD}:{HTTP_SERVICE_PORT}/");
    let twenty: Vec<&str> = std::iter::repeat_n(hello.as_str(), 20).collect();
    let curl = |args: &[&str]| cluster.lab.run_in_pod("n1p1", "curl", &[&["-sS", "--max-time", "5"][..], args].concat());
    let firefox = versions_of(&curl(&[&["-A", "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"][..], &twenty[..]].concat())?);
    let curl_ua = versions_of(&curl(&twenty)?);
    let whoami = cluster.bins.whoami.display().to_string();
    let url = format!("http://{VIP}:{HTTP_SERVICE_PORT}/");
    let out = cluster.lab.run_in_pod("n1p1", &whoami, &["http-load", "--url", &url, "--rate", "500", "--duration", "2"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("http-load: {}", String::from_utf8_lossy(&out.stderr)))?;
    let split = report["versions"].as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), usize::try_from(v.as_u64().unwrap_or(0)).unwrap_or(0))).collect()).unwrap_or_default();
    let admin = format!("http://{VIP}:{HTTP_SERVICE_PORT}/admin/users");
    let denied = curl(&["-o", "/dev/stderr", "-w", "%{http_code}", "-X", "POST", &admin])?;
    let allowed = curl(&["-o", "/dev/null", "-w", "%{http_code}", &admin])?;
    Ok(L7Demo {
        firefox,
        curl: curl_ua,
        split,
        denied: (String::from_utf8_lossy(&denied.stdout).into_owned(), String::from_utf8_lossy(&denied.stderr).into_owned()),
        allowed: String::from_utf8_lossy(&allowed.stdout).into_owned(),
    })
}

impl L7Demo {
    fn print(&self) {
        let show = |t: &BTreeMap<String, usize>| t.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        println!("  HTTP (L7, routed by mesh-node n1 per request, parsed again by the destination node):");
        println!("      canary (VirtualService helloworld): Firefox client -> {}; curl -> {}", show(&self.firefox), show(&self.curl));
        println!("      90/10 split (HTTPRoute whoami -> whoami-v1/whoami-v2), {} requests: {}", self.split.values().sum::<usize>(), show(&self.split));
        println!("      L7 policy deny-admin-writes: POST /admin/users -> {} {:?}; GET /admin/users -> {}", self.denied.0, self.denied.1, self.allowed);
    }

    fn as_expected(&self) -> bool {
        let only = |t: &BTreeMap<String, usize>, v: &str| t.len() == 1 && t.contains_key(v);
        let canary = self.split.get("v1.1").copied().unwrap_or(0);
        let total: usize = self.split.values().sum();
        only(&self.firefox, "v1.1") && only(&self.curl, "v1.0") && total > 0 && canary * 100 / total.max(1) <= 20 && self.denied.0 == "403" && self.allowed == "200"
    }
}
