//! Checks of `deploy/` that need no cluster: the committed CRDs equal crdgen's output, the Helm
//! chart renders to the plain manifests, and the example policies load (or are rejected) as their
//! comments say. (No helm CLI exists here: the chart's templates use only `{{ .Values.* }}` and
//! `{{ .Release.Namespace }}`, which `render` below substitutes; anything else fails the test.)

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

/// Substitutes `{{ .Values.<path> }}` and `{{ .Release.Namespace }}`; panics on anything else.
fn render(template: &str, values: &Value, namespace: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed {{") + start;
        let expr = rest[start + 2..end].trim();
        let value = if expr == ".Release.Namespace" {
            namespace.to_owned()
        } else {
            let path = expr.strip_prefix(".Values.").unwrap_or_else(|| panic!("unsupported template expression {expr:?}"));
            let v = path.split('.').fold(values, |v, k| &v[k]);
            v.as_str().unwrap_or_else(|| panic!("value {path} missing or not a string")).to_owned()
        };
        out.push_str(&value);
        rest = &rest[end + 2..];
    }
    out + rest
}

#[test]
fn helm_chart_renders_the_plain_manifests() {
    let chart = deploy().join("helm/mesh");
    let values: Value = serde_saphyr::from_str(&read(&chart.join("values.yaml"))).expect("values");
    let mut rendered = Vec::new();
    for t in ["control.yaml", "node.yaml"] {
        rendered.extend(docs(&render(&read(&chart.join("templates").join(t)), &values, "mesh-system")));
    }
    let mut plain = Vec::new();
    for f in ["20-control.yaml", "30-node.yaml"] {
        plain.extend(docs(&read(&deploy().join(f))));
    }
    assert_eq!(rendered.len(), plain.len());
    for (r, p) in rendered.iter().zip(&plain) {
        assert_eq!(r, p, "chart and plain manifest differ for {} {}", p["kind"], p["metadata"]["name"]);
    }
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
    assert!(state.policies.authorization.is_empty());
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
            ("DestinationRule".into(), "demo/helloworld".into(), None),
            ("DestinationRule".into(), "demo/httpbin".into(), None),
        ]
    );
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
    // The subsets select the versioned pods.
    let view = mesh_control::view::node_view(&state, "n1", "cluster.local");
    let svc = view.values().find_map(|r| match &r.kind {
        Some(mesh_proto::config::v1::resource::Kind::Service(s)) if s.name == "helloworld" => Some(s.clone()),
        _ => None,
    });
    let subsets: Vec<(String, Vec<String>)> = svc.expect("helloworld").endpoints.into_iter().map(|e| (e.address, e.subsets)).collect();
    assert_eq!(subsets, [("198.18.1.13".into(), vec!["v1-0".into()]), ("198.18.2.13".into(), vec!["v1-1".into()])]);
}
