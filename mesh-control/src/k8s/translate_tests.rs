use super::*;

fn pod(yaml: &str) -> Pod {
    serde_saphyr::from_str(yaml).expect("pod YAML")
}

const NS: &str = "metadata: {name: demo, labels: {mesh.dev/dataplane-mode: ambient}}";

fn namespaces() -> Vec<Namespace> {
    vec![serde_saphyr::from_str(NS).expect("ns"), serde_saphyr::from_str("metadata: {name: plain}").expect("ns")]
}

const WHOAMI: &str = r#"
metadata: {name: whoami-1, namespace: demo, uid: u-1, labels: {app: whoami}}
spec: {nodeName: n1, serviceAccountName: whoami, containers: []}
status:
  podIP: 10.0.1.5
  podIPs: [{ip: 10.0.1.5}, {ip: "fd00::5"}]
  conditions: [{type: Ready, status: "True"}]
"#;

#[test]
fn pods_become_workloads_with_identity_health_and_mesh_membership() {
    let ns_labels: BTreeMap<String, Labels> = namespaces().iter().map(|n| (n.name_any(), n.labels().clone())).collect();
    let w = workload(&pod(WHOAMI), &ns_labels).expect("workload");
    assert_eq!((w.uid.as_str(), w.node.as_str(), w.service_account.as_str()), ("u-1", "n1", "whoami"));
    assert_eq!(w.addresses.len(), 2);
    assert!(w.meshed && w.healthy);

    let not_ready = WHOAMI.replace("status: \"True\"", "status: \"False\"");
    assert!(!workload(&pod(&not_ready), &ns_labels).expect("workload").healthy);
    let plain_ns = WHOAMI.replace("namespace: demo", "namespace: plain");
    assert!(!workload(&pod(&plain_ns), &ns_labels).expect("workload").meshed);
    let opted_in = plain_ns.replace("{app: whoami}", "{app: whoami, mesh.dev/dataplane-mode: ambient}");
    assert!(workload(&pod(&opted_in), &ns_labels).expect("workload").meshed);

    // Unusable pods are skipped, not errors.
    assert!(workload(&pod("metadata: {name: p, namespace: demo}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}"), &ns_labels).is_none(), "unscheduled");
    assert!(workload(&pod("metadata: {name: p, namespace: demo}\nspec: {nodeName: n1, containers: []}\nstatus: {}"), &ns_labels).is_none(), "no IP yet");
    assert!(workload(&pod(&WHOAMI.replace("podIP: 10.0.1.5", "podIP: 10.0.1.5\n  phase: Succeeded")), &ns_labels).is_none(), "finished");
    assert!(workload(&pod(&WHOAMI.replace("containers: []", "containers: [], hostNetwork: true")), &ns_labels).is_none(), "host network");
}

#[test]
fn services_take_endpoints_and_named_target_ports_from_their_slices() {
    let svc: Service = serde_saphyr::from_str(
        "metadata: {name: whoami, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: metrics, port: 9090, targetPort: 9091, protocol: TCP}\n",
    )
    .expect("svc");
    let slice: EndpointSlice = serde_saphyr::from_str(
        "
metadata: {name: whoami-abc, namespace: demo, labels: {kubernetes.io/service-name: whoami}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: metrics, port: 9091}]
endpoints:
- addresses: [10.0.1.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: whoami-1, namespace: demo, uid: u-1}
- addresses: [10.0.2.5]
  conditions: {ready: false}
- addresses: [10.0.3.5]
",
    )
    .expect("slice");
    let inv = inventory(&[], &namespaces(), &[pod(WHOAMI)], &[svc], &[slice]);
    let s = &inv.services[&NamespacedName::new("demo", "whoami")];
    assert_eq!(s.vips, ["10.96.0.10".parse::<IpAddr>().expect("ip")]);
    assert_eq!(s.ports.iter().map(|p| (p.port, p.target_port)).collect::<Vec<_>>(), [(80, 80), (9090, 9091)]);
    let eps: Vec<(String, Option<&str>, bool, Option<&u16>)> =
        s.endpoints.iter().map(|e| (e.address.to_string(), e.workload_uid.as_deref(), e.healthy, e.ports.get(&80))).collect();
    assert_eq!(
        eps,
        [
            ("10.0.1.5".into(), Some("u-1"), true, Some(&8080)),
            ("10.0.2.5".into(), None, false, Some(&8080)),
            ("10.0.3.5".into(), None, true, Some(&8080)),
        ],
        "a named target port resolves from the slice; a missing ready condition means ready"
    );
    assert_eq!(inv.workloads.len(), 1);
}
