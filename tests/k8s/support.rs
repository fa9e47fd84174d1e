//! Helpers of the k8s suite: images, the sample app's manifests, reading a node daemon's metrics
//! from the node's namespace, captures on a node's link, and the node's own state (what must be
//! left as found).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{capture::Capture, image, k8s::KubeCluster};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn target_dir() -> PathBuf {
    // target/<profile>/ is the parent of this test's deps/ directory.
    let exe = std::env::current_exe().expect("test executable");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// The project's images (as `cargo xtask images` builds them), from this build's binaries.
pub fn images() -> Vec<PathBuf> {
    let out = target_dir().join("images");
    image::project_images(&target_dir(), VERSION).iter().map(|s| image::build(s, &out).unwrap_or_else(|e| panic!("image {}: {e}", s.reference))).collect()
}

pub fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The sample app: three whoami backends spread over both nodes, a meshed client and an
/// unmeshed one on n1, Service `demo/whoami` (TCP 80 → 8080).
pub fn demo_app() -> String {
    let whoami_args = "[serve, --name, $(POD_NAME), --node, $(NODE_NAME), --tcp, '8080']";
    let env = "[{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}, {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]";
    let container = |name: &str, args: &str| format!("[{{name: {name}, image: mesh-whoami:{VERSION}, imagePullPolicy: IfNotPresent, args: {args}, env: {env}, readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}}}]");
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{mesh.dev/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: whoami, namespace: demo}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: demo}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: whoami, namespace: demo}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: whoami}}}}
  template:
    metadata: {{labels: {{app: whoami}}}}
    spec:
      serviceAccountName: whoami
      automountServiceAccountToken: false
      topologySpreadConstraints: [{{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: whoami}}}}}}]
      containers: {whoami}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: demo}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: client}}}}
  template:
    metadata: {{labels: {{app: client}}}}
    spec:
      serviceAccountName: client
      automountServiceAccountToken: false
      nodeSelector: {{kubernetes.io/hostname: n1}}
      containers: {client}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: legacy, namespace: demo}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: legacy}}}}
  template:
    metadata: {{labels: {{app: legacy, mesh.dev/dataplane-mode: none}}}}
    spec:
      automountServiceAccountToken: false
      nodeSelector: {{kubernetes.io/hostname: n1}}
      containers: {legacy}
---
apiVersion: v1
kind: Service
metadata: {{name: whoami, namespace: demo}}
spec:
  selector: {{app: whoami}}
  ports: [{{name: tcp, port: 80, targetPort: 8080}}]
",
        whoami = container("whoami", whoami_args),
        client = container("client", whoami_args),
        legacy = container("legacy", whoami_args),
    )
}

/// `kubectl get` of one field with jsonpath.
pub fn get(c: &KubeCluster, args: &[&str], jsonpath: &str) -> String {
    let jp = format!("-o=jsonpath={jsonpath}");
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.push(&jp);
    c.kubectl_ok(&full).unwrap_or_default().trim().to_owned()
}

/// The name of the running pod of deployment `app` in `demo` (on `node` if given).
pub fn pod_of(c: &KubeCluster, app: &str) -> String {
    get(c, &["pods", "-n", "demo", "-l", &format!("app={app}"), "--field-selector=status.phase=Running"], "{.items[0].metadata.name}")
}

/// Runs the sample app's client in a pod (`kubectl exec`); one line per connection.
pub fn dial(c: &KubeCluster, pod: &str, target: &str, count: u32, timeout_ms: u32) -> Vec<String> {
    let (n, t) = (count.to_string(), timeout_ms.to_string());
    let out = c.kubectl(&["exec", "-n", "demo", pod, "--", "mesh-whoami", "connect", target, "--count", &n, "--timeout-ms", &t]);
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

pub fn who(line: &str) -> Option<&str> {
    line.starts_with("connected").then(|| line.split("name=").nth(1).and_then(|s| s.split_whitespace().next())).flatten()
}

/// Which backend answered how often; failures under "FAILED".
pub fn tally(lines: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for l in lines {
        *t.entry(who(l).unwrap_or("FAILED").to_owned()).or_insert(0) += 1;
    }
    t
}

/// `curl` inside node `i`'s namespace (the daemon is hostNetwork there).
pub fn curl_on_node(c: &KubeCluster, i: u8, url: &str) -> String {
    let ns = format!("--net=/run/netns/{}", c.lab.node(i).netns);
    let out = Command::new("nsenter").args([ns.as_str(), "curl", "-sS", "--max-time", "3", url]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn metrics(c: &KubeCluster, i: u8) -> String {
    curl_on_node(c, i, "http://127.0.0.1:15020/metrics")
}

/// Sum of the samples of `name` whose labels contain every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Captures what crosses node `i`'s underlay link while `traffic` runs.
pub fn capture(c: &KubeCluster, i: u8, traffic: impl FnOnce()) -> Vec<u8> {
    let file = std::env::temp_dir().join(format!("mesh-{}-n{i}.pcap", c.lab.spec.run));
    Capture::around(&c.lab.node(i).netns, "eth0", &file, traffic).expect("capture the node's link")
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// TCP segments to port `port` in a capture (an option-less IPv4 header's destination address
/// is followed by the source port, then the destination port).
pub fn has_port(pcap: &[u8], port: u16) -> bool {
    pcap.windows(4).any(|w| w[2..] == port.to_be_bytes())
}

/// What the mesh may leave on a node, seen from the host: routing rules and the local table in
/// the node's namespace, programs attached to the kubelet's pods cgroup, and pins (the STRICT
/// guards' tc links are pinned there: bpftool 7.1 cannot list TCX links).
#[derive(Debug, PartialEq, Eq)]
pub struct NodeState {
    pub rules: String,
    pub table: String,
    pub cgroup_programs: String,
    pub pins: Vec<String>,
}

pub fn node_state(c: &KubeCluster, i: u8) -> NodeState {
    let node = c.lab.node(i);
    let run = |args: &[&str]| String::from_utf8_lossy(&Command::new(args[0]).args(&args[1..]).output().expect("runs").stdout).into_owned();
    let kubepods = node.cgroup.join("kubepods").display().to_string();
    let pins = std::fs::read_dir(Path::new("/sys/fs/bpf/mesh").join(&node.name))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    NodeState {
        rules: run(&["ip", "-n", &node.netns, "rule", "show"]),
        table: run(&["ip", "-n", &node.netns, "route", "show", "table", "15008"]),
        cgroup_programs: run(&["bpftool", "cgroup", "tree", &kubepods]).lines().filter(|l| l.contains("mesh_")).collect::<Vec<_>>().join("\n"),
        pins,
    }
}

/// Polls `f` every 50 ms until true or `limit`; returns the time it took.
pub fn eventually(what: &str, limit: Duration, f: impl FnMut() -> bool) -> Duration {
    eventually_or(what, limit, f, String::new)
}

/// [`eventually`], and on a time-out the panic carries `diagnose()` (read only then: the state
/// of the nodes when it failed, for a failure seen once that needs its cause).
pub fn eventually_or(what: &str, limit: Duration, mut f: impl FnMut() -> bool, diagnose: impl FnOnce() -> String) -> Duration {
    let started = Instant::now();
    while !f() {
        if started.elapsed() >= limit {
            panic!("timed out after {limit:?} waiting for {what}\n{}", diagnose());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}
