use super::*;
use crate::crd::{Read, read};

fn doc<K: serde::de::DeserializeOwned + serde::Serialize>(yaml: &str) -> Read<K> {
    let v: serde_json::Value = serde_saphyr::from_str(yaml).expect("YAML");
    read(&v).expect("fits the type")
}

#[test]
fn every_object_gets_one_verdict_sorted_by_kind_and_key_valid_or_not() {
    let objects = Objects {
        http_routes: vec![
            doc(
                "metadata: {name: b, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: whoami}]\n  rules: [{sessionPersistence: {sessionName: x}}]\n",
            ),
            doc("metadata: {name: a, namespace: demo}\nspec:\n  parentRefs: [{name: a-gateway}]\n"),
        ],
        grpc_routes: vec![doc("metadata: {name: g, namespace: demo}\nspec: {}\n")],
        reference_grants: Vec::new(),
        virtual_services: vec![doc(
            "metadata: {name: v, namespace: demo}\nspec: {hosts: [whoami], http: [{route: [{destination: {host: whoami}}]}], tcp: [{}]}\n",
        )],
        local_rate_limits: Vec::new(),
        destination_rules: vec![doc(
            "metadata: {name: d, namespace: demo}\nspec: {host: whoami}\n",
        )],
    };
    let routes = build(&objects, &Inventory::default());
    let got: Vec<(&str, String, Option<&str>)> = routes
        .verdicts
        .iter()
        .map(|v| (v.kind.as_str(), v.key.to_string(), v.rejection()))
        .collect();
    assert_eq!(
        got,
        [
            ("HTTPRoute", "demo/a".into(), None),
            ("HTTPRoute", "demo/b".into(), Some("UnsupportedValue")),
            ("GRPCRoute", "demo/g".into(), None),
            ("VirtualService", "demo/v".into(), Some("UnsupportedField")),
            ("DestinationRule", "demo/d".into(), Some("NoMatchingHost")),
        ]
    );
    // A route with only a Gateway parent is not the mesh's: no status entry of ours.
    assert_eq!(
        routes.verdicts[0].status,
        VerdictStatus::Parents(Vec::new())
    );
    let b = routes.verdicts[1].conditions();
    assert_eq!(
        b[0].message,
        "spec.rules[0].sessionPersistence: not supported: session persistence is not implemented"
    );
    let v = routes.verdicts[3].conditions();
    assert_eq!(
        v[0].message,
        "spec.tcp: not supported: TCP routes (only spec.http is implemented)"
    );
    assert!(routes.tables.is_empty() && routes.subsets.is_empty());
}
