use super::*;
use crate::fixtures::{LAB, lab_state};

#[test]
fn lab_documents_become_workloads_services_and_endpoints() {
    let s = lab_state("");
    let inv = &s.inventory;
    assert_eq!(inv.nodes.keys().collect::<Vec<_>>(), ["n1", "n2"]);
    assert_eq!(inv.nodes["n2"], Some("198.18.0.2".parse().expect("ip")), "spec.address is the node's HBONE address");
    assert_eq!(inv.nodes["n1"], None);
    // Endpoints carry their node's address, so a node can tunnel to pods it does not host.
    let view = crate::view::node_view(&s, "n1", "cluster.local");
    let svc = view.values().find_map(|r| match &r.kind {
        Some(mesh_proto::config::v1::resource::Kind::Service(s)) => Some(s.clone()),
        _ => None,
    });
    let remote = svc.expect("service in view").endpoints.into_iter().find(|e| e.node == "n2").expect("n2 endpoint");
    assert_eq!(remote.node_address, "198.18.0.2");
    let w1 = &inv.workloads["demo/whoami-1"];
    assert!(w1.meshed && w1.healthy);
    assert_eq!((w1.node.as_str(), w1.service_account.as_str()), ("n1", "whoami"));
    let client = &inv.workloads["demo/client"];
    assert!(!client.meshed, "the pod label none opts out of a meshed namespace");
    assert_eq!(client.service_account, "default");
    let svc = &inv.services[&model::NamespacedName::new("demo", "whoami")];
    assert_eq!(svc.vips, ["198.19.0.10".parse::<std::net::IpAddr>().expect("ip")]);
    assert_eq!((svc.ports[0].port, svc.ports[0].target_port), (80, 8080));
    let eps: Vec<(String, bool)> = svc.endpoints.iter().map(|e| (e.address.to_string(), e.healthy)).collect();
    assert_eq!(eps, [("198.18.1.10".into(), true), ("198.18.2.10".into(), false)]);
    assert_eq!(svc.endpoints[0].ports.get(&80), Some(&8080));
}

#[test]
fn bad_documents_are_reported_and_the_rest_still_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("lab.yaml"), LAB).expect("write");
    std::fs::create_dir(dir.path().join("policies")).expect("mkdir");
    std::fs::write(
        dir.path().join("policies/p.yaml"),
        "apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY}\n---\napiVersion: lab.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: demo}\nspec: {node: n1, addresses: [not-an-ip]}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("broken.yml"), "a: [unclosed").expect("write");
    std::fs::write(dir.path().join(".hidden.yaml"), "a: [unclosed").expect("write");
    std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
    let (state, errors) = load(dir.path(), "mesh-system");
    assert_eq!(state.inventory.workloads.len(), 3, "the bad workload is skipped, the others stay");
    assert!(state.policies.authorization.contains_key(&model::NamespacedName::new("demo", "deny")));
    let mut got: Vec<(String, Option<usize>)> =
        errors.iter().map(|e| (e.file.file_name().expect("name").to_string_lossy().into_owned(), e.document)).collect();
    got.sort();
    assert_eq!(got, [("broken.yml".into(), None), ("p.yaml".into(), Some(1)), ("p.yaml".into(), Some(2)), ("p.yaml".into(), Some(3))]);
    assert!(errors.iter().any(|e| e.message.contains("unknown kind \"Deployment\"")), "{errors:?}");
    assert!(errors.iter().any(|e| e.message.contains("ConfigMap x: the only ConfigMap read is \"mesh-config\"")), "{errors:?}");
}

#[test]
fn mesh_config_and_telemetry_reach_the_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("lab.yaml"), LAB).expect("write");
    std::fs::write(
        dir.path().join("telemetry.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mesh-config, namespace: mesh-system}\ndata:\n  mesh: |\n    extensionProviders:\n    - name: zipkin\n      zipkin: {service: zipkin.mesh-system, port: 9411}\n---\napiVersion: telemetry.mesh.dev/v1alpha1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: mesh-system}\nspec:\n  tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: 100}]\n",
    )
    .expect("write");
    let (state, errors) = load(dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(state.policies.mesh_config.tracing_providers.contains_key("zipkin"));
    let t = &state.policies.telemetry[&model::NamespacedName::new("mesh-system", "mesh-default")];
    assert_eq!((t.scope, t.tracing[0].sampling_ppm), (model::Scope::Mesh, Some(1_000_000)));
}

#[tokio::test]
async fn watch_publishes_changes_and_skips_unchanged_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("lab.yaml"), LAB).expect("write");
    let publisher = Publisher::new();
    let mut rx = publisher.subscribe();
    let task = tokio::spawn(watch(dir.path().to_path_buf(), "mesh-system".into(), Duration::from_millis(20), publisher.clone()));
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.version == 1)).await.expect("first publish").expect("open");
    assert!(publisher.current().state.policies.authorization.is_empty());
    std::fs::write(dir.path().join("deny.yaml"), "apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY}\n").expect("write");
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.version == 2)).await.expect("change seen").expect("open");
    assert_eq!(publisher.current().state.policies.authorization.len(), 1);
    // Rewriting the same content changes the mtime but not the state: no new version.
    std::fs::write(dir.path().join("lab.yaml"), LAB).expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(publisher.current().version, 2);
    task.abort();
}

#[test]
fn a_half_written_file_keeps_its_last_good_documents() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("lab.yaml"), LAB).expect("write");
    let policy = "apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY}\n";
    std::fs::write(dir.path().join("p.yaml"), policy).expect("write");
    let mut last_good = LastGood::new();
    let (before, errors) = load_keeping(dir.path(), "mesh-system", &mut last_good);
    assert!(errors.is_empty());
    std::fs::write(dir.path().join("p.yaml"), &policy[..policy.len() - 5]).expect("truncate"); // ends inside "{action: D"
    let (during, errors) = load_keeping(dir.path(), "mesh-system", &mut last_good);
    assert_eq!(errors.len(), 1, "the broken file is reported");
    assert_eq!(during, before, "and its last good policy stays in force");
    std::fs::remove_file(dir.path().join("p.yaml")).expect("rm");
    let (after, _) = load_keeping(dir.path(), "mesh-system", &mut last_good);
    assert!(after.policies.authorization.is_empty(), "a deleted file's documents go away");
}

#[test]
fn routing_documents_load_with_their_unknown_fields_and_older_gateway_api_versions() {
    let docs = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: old, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: whoami}]
  rules: [{backendRefs: [{name: whoami, port: 80}]}]
---
apiVersion: networking.mesh.dev/v1alpha1
kind: VirtualService
metadata: {name: v}
spec: {hosts: [whoami], http: [{route: [{destination: {host: whoami}}], timout: 5s}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: forgot-to-port}
spec: {}
"#;
    let parsed = manifest::parse(docs).expect("YAML");
    let Ok(Document::HttpRoute(r)) = &parsed[0] else { panic!("an HTTPRoute: {:?}", parsed[0]) };
    assert_eq!(r.object.metadata.name.as_deref(), Some("old"));
    let Ok(Document::VirtualService(v)) = &parsed[1] else { panic!("a VirtualService") };
    assert_eq!(v.object.metadata.namespace.as_deref(), Some("default"), "file mode's default namespace");
    assert_eq!(v.unknown_fields, ["spec.http[0].timout"]);
    let e = parsed[2].as_ref().expect_err("Istio's own apiVersion");
    assert!(e.to_string().contains("networking.mesh.dev/v1alpha1 VirtualService/DestinationRule"), "{e}");
    let state = lab_state(docs.split("---").take(2).collect::<Vec<_>>().join("---").as_str());
    assert_eq!(state.routes.tables.len(), 1, "the v1beta1 route compiles");
    let rejected = state.routes.verdicts.iter().find(|v| v.key.name == "v").and_then(routing::Verdict::rejection);
    assert_eq!(rejected, Some("UnsupportedField"));
}

#[test]
fn an_address_two_workloads_claim_is_taken_from_both_and_the_rest_still_applies() {
    // whoami-1 has 198.18.1.10 in the lab fixture; an impostor claims it, and one more address.
    let s = lab_state(
        "---\napiVersion: lab.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: impostor, namespace: demo}\nspec: {node: n2, serviceAccount: admin, addresses: [198.18.1.10, 198.18.2.99]}\n",
    );
    let inv = &s.inventory;
    assert!(!inv.workloads.contains_key("demo/whoami-1"), "its only address was shared: {:?}", inv.workloads.keys());
    assert_eq!(inv.workloads["demo/impostor"].addresses, ["198.18.2.99".parse::<std::net::IpAddr>().expect("ip")], "keeps what it alone claims");
    assert!(inv.workloads.contains_key("demo/client"), "the rest of the inventory stays");
    let svc = &inv.services[&model::NamespacedName::new("demo", "whoami")];
    assert!(svc.endpoints.iter().all(|e| e.address.to_string() != "198.18.1.10"), "no endpoint at the shared address");
}

#[test]
fn an_unchanged_file_is_not_parsed_again_and_its_refused_documents_are_still_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deny = "apiVersion: security.mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY}\n---\nkind: Nonsense\n";
    let path = dir.path().join("p.yaml");
    std::fs::write(&path, deny).expect("write");
    let mut last_good = LastGood::new();
    let (first, errors) = load_keeping(dir.path(), "mesh-system", &mut last_good);
    assert_eq!(errors.iter().map(|e| e.document).collect::<Vec<_>>(), [Some(1)], "{errors:?}");
    assert_eq!(first.policies.authorization.len(), 1);

    // Other text of the same length under the same mtime: what an unchanged file looks like
    // to the folder's watcher, so it is taken from the last parse (the policy stays DENY).
    let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
    let allow = deny.replace("action: DENY}", "action: ALLOW");
    assert_eq!(allow.len(), deny.len());
    std::fs::write(&path, &allow).expect("write");
    std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(mtime)).expect("set mtime");
    let (again, errors) = load_keeping(dir.path(), "mesh-system", &mut last_good);
    assert_eq!(again, first, "not parsed again");
    assert_eq!(errors.iter().map(|e| e.document).collect::<Vec<_>>(), [Some(1)], "the refused document is reported again: {errors:?}");

    // A new mtime: parsed again (and now not valid YAML: `{action: ALLOW` never closes).
    std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(mtime + Duration::from_secs(1))).expect("set mtime");
    let (changed, errors) = load_keeping(dir.path(), "mesh-system", &mut last_good);
    assert_eq!(errors.iter().map(|e| e.document).collect::<Vec<_>>(), [None], "read again, and refused whole: {errors:?}");
    assert_eq!(changed, first, "the last good documents stay in force");
}

#[test]
fn a_selector_picks_the_workloads_of_its_namespace_with_all_of_its_labels() {
    let workload = |ns: &str, name: &str, labels: &[(&str, &str)], last: u8| {
        format!(
            "apiVersion: lab.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{}}}}}\nspec: {{node: n1, serviceAccount: sa, addresses: [10.0.0.{last}]}}\n---\n",
            labels.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        )
    };
    let service = |name: &str, selector: &str| {
        format!("apiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  vips: [198.19.0.1]\n  selector: {{{selector}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n")
    };
    let mut yaml = String::new();
    yaml += &workload("a", "v1-x", &[("app", "web"), ("version", "v1")], 1);
    yaml += &workload("a", "v2-x", &[("app", "web"), ("version", "v2")], 2);
    yaml += &workload("a", "v1-y", &[("app", "web"), ("version", "v1"), ("extra", "label")], 3);
    yaml += &workload("b", "v1-z", &[("app", "web"), ("version", "v1")], 4);
    yaml += &service("web", "app: web");
    yaml += &service("v1", "app: web, version: v1");
    yaml += &service("none", "app: web, version: v3");
    yaml += &service("empty", "");
    let docs = manifest::parse(&yaml).expect("YAML").into_iter().collect::<Result<Vec<_>, _>>().expect("documents");
    let s = build(docs, "mesh-system");
    let selected = |name: &str| -> Vec<String> {
        s.inventory.services[&model::NamespacedName::new("a", name)].endpoints.iter().map(|e| e.workload_uid.clone().expect("a workload's")).collect()
    };
    assert_eq!(selected("web"), ["a/v1-x", "a/v1-y", "a/v2-x"], "not namespace b's");
    assert_eq!(selected("v1"), ["a/v1-x", "a/v1-y"], "every label of the selector, extra labels allowed");
    assert!(selected("none").is_empty());
    assert!(selected("empty").is_empty(), "a Service without a selector selects nothing");
}
