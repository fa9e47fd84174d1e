//! Checks of `deploy/` that need no cluster: the committed CRDs equal crdgen's output, the Helm
//! chart renders to the plain manifests with its defaults and to what a values file asks
//! otherwise, its values schema refuses bad values, and the example policies load (or are
//! rejected) as their comments say. (No helm CLI exists here: `deploy/helm.rs` renders the
//! chart and checks the schema, and refuses anything outside the subset it implements.)

#[path = "deploy/helm.rs"]
mod helm;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn docs(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).expect("YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn committed_crds_equal_crdgen_output() {
    let ours = mesh_control::crd::yaml().expect("crdgen");
    let gateway_api = mesh_control::crd::gateway_api_yaml().expect("crdgen --gateway-api");
    for (path, generated) in [
        ("10-crds.yaml", &ours),
        ("helm/mesh/crds/crds.yaml", &ours),
        ("11-gateway-api-crds.yaml", &gateway_api),
        ("helm/mesh/crds/gateway-api-crds.yaml", &gateway_api),
    ] {
        assert!(read(&deploy().join(path)) == *generated, "deploy/{path} is stale: run `cargo xtask crds`");
    }
}

#[test]
fn routing_crds_keep_unknown_fields_so_the_controller_can_name_them() {
    // Istio's `tcp`, a newer Gateway API field: the API server must not prune them, or the
    // controller could not say they are not supported.
    for (file, kinds) in [("10-crds.yaml", &["virtualservices", "destinationrules"][..]), ("11-gateway-api-crds.yaml", &["httproutes", "grpcroutes"][..])] {
        for crd in docs(&read(&deploy().join(file))) {
            let name = crd["metadata"]["name"].as_str().expect("name");
            if kinds.iter().any(|k| name.starts_with(&format!("{k}."))) {
                let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
                assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true, "{name}: spec");
                let list = match name.split('.').next() {
                    Some("virtualservices") => "http",
                    Some("destinationrules") => "subsets",
                    _ => "rules",
                };
                let rules = &spec["properties"][list];
                assert_eq!(rules["items"]["x-kubernetes-preserve-unknown-fields"], true, "{name}: nested objects too");
            }
        }
    }
}

fn chart_dir() -> PathBuf {
    deploy().join("helm/mesh")
}

fn default_values() -> Value {
    serde_saphyr::from_str(&read(&chart_dir().join("values.yaml"))).expect("values")
}

/// The chart's manifests rendered with `values` in `namespace`, in file order.
fn render_chart(values: &Value, namespace: &str) -> Vec<Value> {
    let rendered = helm::Chart::load(&chart_dir()).render(values, namespace);
    ["config.yaml", "control.yaml", "node.yaml"].iter().flat_map(|t| docs(&rendered[*t])).collect()
}

/// The paths (`a.b[0].c`) where `a` and `b` differ.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                differences(x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), &format!("{path}.{k}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            // Named items (containers, env vars, volumes) by name: a new env var does not move
            // every path after it.
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                let item = p["name"].as_str().filter(|n| q["name"].as_str() == Some(*n)).map_or_else(|| i.to_string(), str::to_owned);
                differences(p, q, &format!("{path}[{item}]"), out);
            }
        }
        _ if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

#[test]
fn helm_chart_with_default_values_renders_exactly_the_plain_manifests() {
    let rendered = render_chart(&default_values(), "mesh-system");
    // The plain manifests, less the Namespace (`helm install --create-namespace` makes it).
    let mut plain: Vec<Value> = docs(&read(&deploy().join("00-namespace.yaml"))).into_iter().filter(|d| d["kind"] != "Namespace").collect();
    for f in ["20-control.yaml", "30-node.yaml"] {
        plain.extend(docs(&read(&deploy().join(f))));
    }
    assert_eq!(rendered.len(), plain.len());
    for (r, p) in rendered.iter().zip(&plain) {
        let mut diff = Vec::new();
        differences(r, p, "", &mut diff);
        assert!(diff.is_empty(), "chart and plain manifest differ for {} {} at {diff:?}", p["kind"], p["metadata"]["name"]);
    }
}

/// What a platform team sets (`ci/overrides-values.yaml`, also chart-testing's convention): every
/// value lands where it should, and nothing else changes.
#[test]
fn helm_chart_renders_a_platform_teams_overrides_and_nothing_else_changes() {
    let over: Value = serde_saphyr::from_str(&read(&chart_dir().join("ci/overrides-values.yaml"))).expect("values");
    let values = helm::merge(&default_values(), &over);
    let schema: Value = serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).expect("schema");
    assert_eq!(helm::validate(&schema, &values), Vec::<String>::new());
    let base = render_chart(&default_values(), "platform-mesh");
    let custom = render_chart(&values, "platform-mesh");
    let find = |docs: &[Value], kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned().unwrap_or_else(|| panic!("{kind}"));
    let (deploy, ds, cm) = (find(&custom, "Deployment"), find(&custom, "DaemonSet"), find(&custom, "ConfigMap"));
    assert_eq!(cm["data"]["trustDomain"], "prod.example.com");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let pod = &deploy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!((c["image"].as_str(), c["imagePullPolicy"].as_str()), (Some("registry.example.com/mesh/mesh-control:0.1.1"), Some("Always")));
    assert_eq!(pod["nodeSelector"], serde_json::json!({"node-role.kubernetes.io/control-plane": ""}));
    assert_eq!(pod["tolerations"][0]["key"], "node-role.kubernetes.io/control-plane");
    // Helm merges maps: the override's nodeAffinity joins the default podAntiAffinity (a values
    // file drops that with `podAntiAffinity: null`).
    assert_eq!(pod["affinity"]["nodeAffinity"], over["control"]["affinity"]["nodeAffinity"]);
    assert_eq!(pod["affinity"]["podAntiAffinity"], default_values()["control"]["affinity"]["podAntiAffinity"], "maps merge");
    assert_eq!(c["resources"], over["control"]["resources"]);
    let env = |c: &Value, name: &str| c["env"].as_array().expect("env").iter().find(|e| e["name"] == name).expect("env var")["value"].clone();
    assert_eq!(env(c, "MESH_LOG"), "debug");
    let pod = &ds["spec"]["template"]["spec"];
    let n = &pod["containers"][0];
    assert_eq!((n["image"].as_str(), n["imagePullPolicy"].as_str()), (Some("registry.example.com/mesh/mesh-node:0.1.0"), Some("Always")));
    assert_eq!(env(n, "MESH_LOG"), "info,mesh_node=debug");
    assert_eq!(pod["tolerations"], over["node"]["tolerations"], "the list replaced, not appended");
    assert_eq!(pod["nodeSelector"], serde_json::json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["priorityClassName"], "mesh-critical");
    assert_eq!(n["resources"]["limits"]["memory"], "2Gi");

    let mut changed = Vec::new();
    for (b, c) in base.iter().zip(&custom) {
        let mut diff = Vec::new();
        differences(b, c, "", &mut diff);
        changed.extend(diff.into_iter().map(|p| format!("{} {}", c["kind"].as_str().unwrap_or_default(), p)));
    }
    let expected = [
        "ConfigMap .data.trustDomain",
        "Deployment .spec.replicas",
        "Deployment .spec.template.spec.nodeSelector",
        "Deployment .spec.template.spec.tolerations",
        "Deployment .spec.template.spec.affinity.nodeAffinity",
        "Deployment .spec.template.spec.containers[mesh-control].image",
        "Deployment .spec.template.spec.containers[mesh-control].imagePullPolicy",
        "Deployment .spec.template.spec.containers[mesh-control].env[MESH_LOG].value",
        "Deployment .spec.template.spec.containers[mesh-control].resources.requests.cpu",
        "Deployment .spec.template.spec.containers[mesh-control].resources.requests.memory",
        "Deployment .spec.template.spec.containers[mesh-control].resources.limits.memory",
        "DaemonSet .spec.template.spec.priorityClassName",
        "DaemonSet .spec.template.spec.nodeSelector",
        // One toleration replaces the default one: compared field by field.
        "DaemonSet .spec.template.spec.tolerations[0].effect",
        "DaemonSet .spec.template.spec.tolerations[0].key",
        "DaemonSet .spec.template.spec.tolerations[0].operator",
        "DaemonSet .spec.template.spec.tolerations[0].value",
        "DaemonSet .spec.template.spec.containers[mesh-node].image",
        "DaemonSet .spec.template.spec.containers[mesh-node].imagePullPolicy",
        "DaemonSet .spec.template.spec.containers[mesh-node].env[MESH_LOG].value",
        "DaemonSet .spec.template.spec.containers[mesh-node].resources.limits.memory",
    ];
    let mut got: Vec<&str> = changed.iter().map(String::as_str).collect();
    let mut want = expected.to_vec();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    // The release namespace reaches every namespaced object and the node's namespace rule.
    for d in &custom {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "platform-mesh", "{} {}", d["kind"], d["metadata"]["name"]);
        }
    }
    let node_role = custom.iter().find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mesh-node").expect("ClusterRole mesh-node");
    assert_eq!(node_role["rules"][0]["resourceNames"][0], "platform-mesh");
}

/// `meshConfig` (Istio's extension providers) renders into ConfigMap mesh-config's `mesh` key,
/// which the controller reads back into the same providers; the tracing example loads in file
/// mode with its Telemetry accepted.
#[test]
fn helm_mesh_config_and_the_tracing_example_reach_the_controller() {
    let over = serde_json::json!({"meshConfig": {
        "extensionProviders": [{"name": "zipkin", "zipkin": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411}}],
        "defaultProviders": {"tracing": ["zipkin"]}
    }});
    let values = helm::merge(&default_values(), &over);
    let schema: Value = serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).expect("schema");
    assert_eq!(helm::validate(&schema, &values), Vec::<String>::new());
    let docs = render_chart(&values, "mesh-system");
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "mesh-config").expect("mesh-config");
    let text = cm["data"]["mesh"].as_str().expect("a mesh key");
    let mesh = mesh_control::validate::telemetry::mesh_config(&mesh_control::manifest::mesh_config(text).expect("parses"));
    assert_eq!(mesh.config.default_tracing_provider.as_deref(), Some("zipkin"));
    assert_eq!(mesh.config.tracing_providers["zipkin"].port, 9411);
    let bad = helm::merge(&default_values(), &serde_json::json!({"meshConfig": {"extensionProvider": []}}));
    assert!(!helm::validate(&schema, &bad).is_empty(), "a typo in meshConfig is refused");

    let ex = deploy().join("examples");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(ex.join("file-mode/cluster.yaml"), dir.path().join("cluster.yaml")).expect("copy");
    std::fs::copy(ex.join("telemetry/tracing.yaml"), dir.path().join("tracing.yaml")).expect("copy");
    let (state, errors) = mesh_control::filemode::load(dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(state.policies.verdicts.iter().all(|v| v.result.is_ok()), "{:?}", state.policies.verdicts);
    assert_eq!(state.policies.mesh_config.tracing_providers.keys().collect::<Vec<_>>(), ["otel", "zipkin"]);
    assert_eq!(state.policies.telemetry.len(), 1);
}

/// Typos and wrong types in a values file are refused by values.schema.json (Helm validates it
/// before rendering). The same cases run through Python's jsonschema in `cargo xtask test`.
#[test]
fn values_schema_accepts_the_defaults_and_rejects_typos_and_wrong_types() {
    let schema: Value = serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).expect("schema");
    assert_eq!(helm::validate(&schema, &default_values()), Vec::<String>::new());
    let cases: Vec<Value> = docs(&read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deploy/bad-values.yaml")));
    assert!(cases.len() >= 8, "{} cases", cases.len());
    for case in cases {
        let values = helm::merge(&default_values(), &case["values"]);
        let errors = helm::validate(&schema, &values);
        let expect = case["expect"].as_str().expect("expect");
        assert!(errors.iter().any(|e| e.contains(expect)), "{}: wanted an error containing {expect:?}, got {errors:?}", case["values"]);
    }
}

#[test]
fn helm_notes_say_what_was_installed_and_how_to_mesh_a_namespace() {
    let notes = &helm::Chart::load(&chart_dir()).render(&default_values(), "platform-mesh")["NOTES.txt"];
    for wanted in [
        "installed in namespace platform-mesh",
        "2 replica(s) of mesh-control:0.1.0",
        "DaemonSet of mesh-node:0.1.0",
        "kubectl label namespace <namespace> mesh.dev/dataplane-mode=ambient",
        "kubectl -n platform-mesh rollout status daemonset/mesh-node",
        "get lease mesh-control-leader",
        "spiffe://cluster.local/ns/<namespace>/sa/<service account>",
    ] {
        assert!(notes.contains(wanted), "NOTES.txt lacks {wanted:?}:\n{notes}");
    }
    assert!(!notes.contains("{{"), "{notes}");
}

#[test]
fn node_daemonset_is_not_privileged_and_adds_only_the_needed_capabilities() {
    let node = docs(&read(&deploy().join("30-node.yaml")));
    let ds = node.iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false);
    let added: Vec<&str> = sc["capabilities"]["add"].as_array().expect("add").iter().filter_map(Value::as_str).collect();
    assert!(added.iter().all(|c| ["BPF", "NET_ADMIN", "SYS_ADMIN"].contains(c)), "{added:?}");
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let sa = node.iter().find(|d| d["kind"] == "ServiceAccount").expect("ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false, "the node needs no API access");
}

#[test]
fn example_folder_loads_cleanly_and_invalid_examples_are_rejected_with_reasons() {
    let ex = deploy().join("examples");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(ex.join("file-mode/cluster.yaml"), dir.path().join("cluster.yaml")).expect("copy");
    for p in ["allow-client-to-whoami.yaml", "strict-mtls.yaml"] {
        std::fs::copy(ex.join("policies").join(p), dir.path().join(p)).expect("copy");
    }
    let (state, errors) = mesh_control::filemode::load(dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((state.inventory.nodes.len(), state.inventory.workloads.len(), state.inventory.services.len()), (2, 4, 1));
    assert!(state.policies.verdicts.iter().all(|v| v.result.is_ok()), "{:?}", state.policies.verdicts);
    assert_eq!((state.policies.authorization.len(), state.policies.peer_authentication.len()), (1, 1));

    let (state, errors) = mesh_control::filemode::load(&ex.join("invalid"), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    let reasons: Vec<&str> = state.policies.verdicts.iter().filter_map(|v| v.result.as_ref().err().map(mesh_control::validate::Error::reason)).collect();
    assert_eq!(reasons, ["InvalidPrincipal", "PortOutOfRange", "UnknownAction"]);
    // Each invalid AuthorizationPolicy is still enforced, closed: ALLOW matching nothing, or
    // DENY of everything (the unknown action).
    let enforced: Vec<(String, mesh_control::model::Action, usize)> = state.policies.authorization.values().map(|p| (p.name.clone(), p.action, p.rules.len())).collect();
    assert!(enforced.iter().all(|(_, a, n)| (*a == mesh_control::model::Action::Allow && *n == 0) || (*a == mesh_control::model::Action::Deny && *n == 1)), "{enforced:?}");
    assert_eq!(enforced.len(), 3, "{enforced:?}");
    let routes: Vec<(String, Option<&str>)> = state.routes.verdicts.iter().map(|v| (v.key.name.clone(), v.rejection())).collect();
    assert_eq!(
        routes,
        [("bad-regex".into(), Some("UnsupportedValue")), ("bad-tcp".into(), Some("UnsupportedField")), ("bad-weights".into(), Some("InvalidWeights"))]
    );
    assert!(state.routes.tables.is_empty());
}

/// The routing examples, on the file-mode lab plus `routing-lab.yaml`, all loaded together as a
/// user would apply them: every object accepted, and the routes each example promises.
#[test]
fn routing_examples_load_together_and_compile_to_what_their_comments_say() {
    use mesh_control::routing::model::{Action, PathModifier, StringMatch};
    let ex = deploy().join("examples");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["file-mode/cluster.yaml", "file-mode/routing-lab.yaml"] {
        std::fs::copy(ex.join(f), dir.path().join(f.replace('/', "-"))).expect("copy");
    }
    let mut examples: Vec<PathBuf> = std::fs::read_dir(ex.join("routing")).expect("examples").map(|e| e.expect("entry").path()).collect();
    examples.sort();
    for p in &examples {
        std::fs::copy(p, dir.path().join(p.file_name().expect("name"))).expect("copy");
    }
    let (state, errors) = mesh_control::filemode::load(dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    let verdicts: Vec<(String, String, Option<&str>)> =
        state.routes.verdicts.iter().map(|v| (v.kind.as_str().to_owned(), v.key.to_string(), v.rejection())).collect();
    assert_eq!(
        verdicts,
        [
            ("HTTPRoute".into(), "demo/whoami-header".into(), None),
            ("HTTPRoute".into(), "demo/whoami-rewrite".into(), None),
            ("HTTPRoute".into(), "demo/whoami-split".into(), None),
            ("VirtualService".into(), "demo/helloworld".into(), None),
            ("VirtualService".into(), "demo/httpbin".into(), None),
            ("VirtualService".into(), "demo/whoami-v1".into(), None),
            ("VirtualService".into(), "demo/whoami-v2".into(), None),
            ("DestinationRule".into(), "demo/helloworld".into(), None),
            ("DestinationRule".into(), "demo/httpbin".into(), None),
            ("DestinationRule".into(), "demo/whoami".into(), None),
            ("DestinationRule".into(), "demo/whoami-v1".into(), None),
            // An alternative policy for the same host as consistent-hash.yaml: the older wins.
            ("DestinationRule".into(), "demo/whoami-v1-locality".into(), Some("Conflicted")),
            ("DestinationRule".into(), "demo/whoami-v2".into(), None),
            ("LocalRateLimit".into(), "demo/whoami-v2".into(), None),
        ]
    );
    // The traffic policies: outlier detection on whoami, Maglev on whoami-v1, Istio's circuit
    // breaker on whoami-v2.
    let policy = |name: &str| {
        state.routes.tables.values().find(|t| t.service.name == name).and_then(|t| t.traffic_policy.clone()).unwrap_or_else(|| panic!("policy of {name}"))
    };
    assert_eq!(policy("whoami").outlier_detection.map(|o| (o.consecutive_gateway, o.base_ejection_time.as_secs(), o.max_ejection_percent)), Some((3, 10, 50)));
    assert!(matches!(policy("whoami-v1").load_balancer, Some(mesh_control::routing::model::LoadBalancer::ConsistentHash { .. })));
    let limit = state.routes.tables.values().find(|t| t.service.name == "whoami-v2").and_then(|t| t.rate_limit.clone()).expect("rate limit");
    assert_eq!((limit.max_tokens, limit.tokens_per_fill, limit.fill_interval.as_secs()), (100, 100, 1));
    let pool = policy("whoami-v2").connection_pool.expect("pool");
    assert_eq!((pool.max_connections, pool.http1_max_pending_requests, pool.max_requests_per_connection), (Some(1), Some(1), Some(1)));
    let table = |name: &str| state.routes.tables.values().find(|t| t.service.name == name).unwrap_or_else(|| panic!("table {name}"));
    // whoami: the /v2 prefix first, then the header match, then the split for everything else.
    let whoami = table("whoami");
    let names: Vec<&str> = whoami.routes.iter().map(|r| r.source.key.name.as_str()).collect();
    assert_eq!(names, ["whoami-rewrite", "whoami-header", "whoami-split"]);
    assert_eq!(whoami.routes[0].rewrite.as_ref().and_then(|r| r.path.clone()), Some(PathModifier::Prefix("/".into())));
    let Action::Forward(split) = &whoami.routes[2].action else { panic!("forward") };
    assert_eq!(split.iter().map(|b| (b.service.name.as_str(), b.weight)).collect::<Vec<_>>(), [("whoami-v1", 90), ("whoami-v2", 10)]);
    assert!(whoami.routes.iter().all(|r| r.matches.iter().all(|m| m.port == Some(80))), "parentRef port 80");
    // helloworld: Firefox → v1-1, else v1-0.
    let hello = table("helloworld");
    assert_eq!(hello.routes[0].matches[0].headers[0].value, StringMatch::Regex(".*Firefox.*".into()));
    let subset = |r: &mesh_control::routing::model::Route| match &r.action {
        Action::Forward(b) => b[0].subset.clone().unwrap_or_default(),
        other => panic!("{other:?}"),
    };
    assert_eq!((subset(&hello.routes[0]), subset(&hello.routes[1])), ("v1-1".into(), "v1-0".into()));
    // httpbin: served by v1, all mirrored to v2.
    let httpbin = &table("httpbin").routes[0];
    assert_eq!((subset(httpbin), httpbin.mirrors[0].backend.subset.as_deref(), httpbin.mirrors[0].per_million), ("v1".into(), Some("v2"), 1_000_000));
    // whoami-v1: 10 s in all, 2 s per try, 3 retries on gateway errors and failed connections.
    let v1 = &table("whoami-v1").routes[0];
    let retry = v1.retry.clone().expect("retry");
    assert_eq!((retry.attempts, retry.per_try_timeout, v1.timeouts.request), (3, Some(std::time::Duration::from_secs(2)), Some(std::time::Duration::from_secs(10))));
    assert_eq!(retry.retry_on, ["gateway-error", "connect-failure", "refused-stream"]);
    // whoami-v2: jason's requests delayed 7 s, 10 % of the others aborted with 500.
    let faults: Vec<_> = table("whoami-v2").routes.iter().map(|r| r.fault.clone().expect("fault")).collect();
    let delay = faults[0].delay.expect("delay");
    assert_eq!((delay.0, delay.1), (1_000_000, std::time::Duration::from_secs(7)));
    let abort = faults[1].abort.clone().expect("abort");
    assert_eq!((abort.per_million, abort.http_status), (100_000, Some(500)));
    // The subsets select the versioned pods.
    let view = mesh_control::view::node_view(&state, "n1", "cluster.local");
    let svc = view.values().find_map(|r| match &r.kind {
        Some(mesh_proto::config::v1::resource::Kind::Service(s)) if s.name == "helloworld" => Some(s.clone()),
        _ => None,
    });
    let subsets: Vec<(String, Vec<String>)> = svc.expect("helloworld").endpoints.into_iter().map(|e| (e.address, e.subsets)).collect();
    assert_eq!(subsets, [("198.18.1.13".into(), vec!["v1-0".into()]), ("198.18.2.13".into(), vec!["v1-1".into()])]);
}

/// `monitoring.*` renders nothing by default; with `ci/monitoring-values.yaml`, two PodMonitors
/// that select exactly the daemon's and the controller's pods by their labels and named metrics
/// ports, and the dashboards ConfigMap with the sidecar's label and deploy/dashboards/*.json as
/// they are.
#[test]
fn helm_monitoring_renders_pod_monitors_for_our_pods_and_the_dashboards_for_grafana() {
    let chart = helm::Chart::load(&chart_dir());
    let by_default = chart.render(&default_values(), "mesh-system");
    assert!(docs(&by_default["monitoring.yaml"]).is_empty(), "{}", by_default["monitoring.yaml"]);
    let over: Value = serde_saphyr::from_str(&read(&chart_dir().join("ci/monitoring-values.yaml"))).expect("values");
    let values = helm::merge(&default_values(), &over);
    let schema: Value = serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).expect("schema");
    assert_eq!(helm::validate(&schema, &values), Vec::<String>::new());
    let monitoring = docs(&chart.render(&values, "mesh-system")["monitoring.yaml"]);
    let workloads = render_chart(&values, "mesh-system");
    let find = |kind: &str, name: &str, among: &[Value]| {
        among.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).cloned().unwrap_or_else(|| panic!("{kind} {name}"))
    };
    // The DaemonSet declares no ports (hostPorts would block its surge updates): its monitor sets
    // the address to the pod's IP and the annotated port.
    for (monitor, kind, other, port) in [("mesh-node", "DaemonSet", "Deployment", None), ("mesh-control", "Deployment", "DaemonSet", Some("http-status"))] {
        let pm = find("PodMonitor", monitor, &monitoring);
        assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(pm["metadata"]["namespace"], "mesh-system");
        assert_eq!(pm["metadata"]["labels"]["release"], "kps", "the label a Prometheus selects PodMonitors by");
        let selects = |w: &Value| {
            let labels = &w["spec"]["template"]["metadata"]["labels"];
            pm["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels").iter().all(|(k, v)| &labels[k] == v)
        };
        let ours = workloads.iter().find(|d| d["kind"] == kind).expect("workload");
        let others = workloads.iter().find(|d| d["kind"] == other).expect("the other workload");
        assert!(selects(ours) && !selects(others), "{monitor} selects only its own pods");
        let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
        assert_eq!((endpoint["port"].as_str(), endpoint["path"].as_str(), endpoint["interval"].as_str()), (port, Some("/metrics"), Some("30s")));
        let container = &ours["spec"]["template"]["spec"]["containers"][0];
        let number = match port {
            Some(port) => container["ports"].as_array().expect("ports").iter().find(|p| p["name"] == port).unwrap_or_else(|| panic!("{monitor} has no port {port}"))["containerPort"].to_string(),
            None => {
                assert!(container["ports"].is_null(), "{monitor}: no declared ports (hostPorts)");
                let to: Vec<&str> = endpoint["relabelings"].as_array().expect("relabelings").iter().filter(|r| r["targetLabel"] == "__address__").filter_map(|r| r["replacement"].as_str()).collect();
                assert_eq!(to, ["$1:15020", "[$1]:15020"], "IPv4 and IPv6 pod addresses get the metrics port");
                "15020".to_owned()
            }
        };
        // The same port the pods' prometheus.io annotations and deploy/prometheus/scrape.yaml name.
        assert_eq!(ours["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"], number);
    }
    let cm = find("ConfigMap", "mesh-dashboards", &monitoring);
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "Grafana's sidecar finds dashboards by this label");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Mesh");
    for name in ["mesh.json", "service.json", "workload.json"] {
        let shipped: Value = serde_json::from_str(&read(&deploy().join("dashboards").join(name))).expect("dashboard JSON");
        let in_chart: Value = serde_json::from_str(cm["data"][name].as_str().unwrap_or_else(|| panic!("{name} in the ConfigMap"))).expect("JSON");
        assert_eq!(in_chart, shipped, "{name}");
    }
}

/// Istio's metrics the node daemons export (mesh-l7's and mesh-node's metrics modules) and their
/// labels: the dashboards may use nothing else. (`tests/e2e/prometheus.rs` runs every panel
/// against a Prometheus scraping the real daemons.)
const EXPORTED_METRICS: [&str; 8] = [
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_bytes_bucket",
    "istio_response_bytes_bucket",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
];
const EXPORTED_LABELS: [&str; 26] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "connection_security_policy",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "le",
];

/// deploy/dashboards/*.json are Grafana dashboards: a schema version, unique uids and panel ids,
/// panels inside the 24-column grid that do not overlap, every target on the `$datasource`
/// variable with a refId and an expression, using only metrics and labels the nodes export.
#[test]
fn dashboards_are_grafana_json_on_the_metrics_and_labels_the_nodes_export() {
    let metric = regex::Regex::new(r"\b(istio|mesh|envoy|pilot)_[a-z0-9_]+").expect("regex");
    let matcher = regex::Regex::new(r"([a-z_]+)\s*(=~|!~|!=|=)\s*\x22").expect("regex");
    let grouping = regex::Regex::new(r"\bby\s*\(([^)]*)\)").expect("regex");
    let mut uids = Vec::new();
    for name in ["mesh.json", "service.json", "workload.json"] {
        let board: Value = serde_json::from_str(&read(&deploy().join("dashboards").join(name))).expect("dashboard JSON");
        assert!(board["schemaVersion"].as_u64() >= Some(36), "{name}: schemaVersion");
        assert!(board["title"].as_str().is_some_and(|t| t.starts_with("Mesh / ")), "{name}: title");
        uids.push(board["uid"].as_str().expect("uid").to_owned());
        let variables = board["templating"]["list"].as_array().expect("templating");
        assert!(variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"), "{name}: $datasource");
        let exported = |what: &str, expr: &str| {
            for m in metric.find_iter(expr) {
                assert!(EXPORTED_METRICS.contains(&m.as_str()), "{name} {what}: {} is not exported", m.as_str());
            }
            let labels = matcher.captures_iter(expr).map(|c| c[1].to_owned());
            let grouped = grouping.captures_iter(expr).flat_map(|c| c[1].split(',').map(|l| l.trim().to_owned()).collect::<Vec<_>>());
            for l in labels.chain(grouped) {
                assert!(EXPORTED_LABELS.contains(&l.as_str()), "{name} {what}: label {l} is not exported");
            }
        };
        for v in variables.iter().filter(|v| v["type"] == "query") {
            let query = v["query"].as_str().expect("query");
            // label_values(<selector>, <label>): Grafana lists the label's values among the series.
            let (selector, label) = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).and_then(|q| q.rsplit_once(',')).unwrap_or_else(|| panic!("{name}: {query}"));
            exported(&format!("${}", v["name"]), &format!("{selector} by ({label})"));
            assert_eq!(v["datasource"]["uid"], "${datasource}", "{name} {query}");
        }
        let panels = board["panels"].as_array().expect("panels");
        let mut ids = Vec::new();
        let mut cells = std::collections::BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().expect("title");
            ids.push(p["id"].as_u64().expect("id"));
            let grid = &p["gridPos"];
            let [height, width, left, top] = ["h", "w", "x", "y"].map(|k| grid[k].as_u64().unwrap_or_else(|| panic!("{name} {title}: gridPos.{k}")));
            assert!(height > 0 && width > 0 && left + width <= 24, "{name} {title}: gridPos {grid}");
            for cell in (left..left + width).flat_map(|column| (top..top + height).map(move |row| (column, row))) {
                assert!(cells.insert(cell), "{name} {title}: overlaps another panel at {cell:?}");
            }
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name} {title}");
            let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{name} {title}: targets"));
            assert!(!targets.is_empty(), "{name} {title}: no target");
            let mut refs = Vec::new();
            for t in targets {
                refs.push(t["refId"].as_str().expect("refId"));
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{name} {title}");
                exported(title, t["expr"].as_str().unwrap_or_else(|| panic!("{name} {title}: expr")));
            }
            refs.sort_unstable();
            assert!(refs.windows(2).all(|w| w[0] != w[1]), "{name} {title}: refIds {refs:?}");
        }
        ids.sort_unstable();
        assert!(ids.windows(2).all(|w| w[0] != w[1]), "{name}: panel ids {ids:?}");
    }
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), 3, "dashboard uids are unique");
}
