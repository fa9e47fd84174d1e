use super::*;
use crate::fixtures::lab_state;

const TD: &str = "cluster.local";

const POLICIES: &str = r#"
apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: whoami-deny, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami}}
  action: DENY
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
---
apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: other-ns, namespace: elsewhere}
spec: {}
---
apiVersion: security.mesh.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh-strict, namespace: mesh-system}
spec: {mtls: {mode: STRICT}}
"#;

fn workloads(v: &View) -> Vec<&pb::Workload> {
    v.values().filter_map(|r| match &r.kind {
        Some(pb::resource::Kind::Workload(w)) => Some(w),
        _ => None,
    }).collect()
}

fn authz(v: &View) -> Vec<&pb::AuthorizationPolicy> {
    v.values().filter_map(|r| match &r.kind {
        Some(pb::resource::Kind::AuthorizationPolicy(p)) => Some(p),
        _ => None,
    }).collect()
}

#[test]
fn each_node_gets_its_own_workloads_every_service_and_its_policies() {
    let state = lab_state(POLICIES);
    let n1 = node_view(&state, "n1", TD);
    let names: Vec<&str> = workloads(&n1).iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["client", "whoami-1", "whoami-2"], "n1 gets both local pods, meshed or not, and n2's meshed pod");
    let w1 = workloads(&n1).into_iter().find(|w| w.name == "whoami-1").expect("whoami-1");
    assert_eq!(w1.identity, "spiffe://cluster.local/ns/demo/sa/whoami");
    assert_eq!(w1.addresses, ["198.18.1.10"]);
    let n2 = node_view(&state, "n2", TD);
    assert_eq!(
        workloads(&n2).iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["whoami-1", "whoami-2"],
        "n2 gets its own pod and the other node's meshed pods, not the unmeshed client"
    );

    for view in [&n1, &n2] {
        let svc = view.get(&(pb::ResourceKind::Service.into(), "demo/whoami".into())).expect("every node gets the service");
        let Some(pb::resource::Kind::Service(svc)) = &svc.kind else { panic!("not a service") };
        assert_eq!(svc.vips, ["198.19.0.10"]);
        let remote = svc.endpoints.iter().find(|e| e.address == "198.18.2.10").expect("endpoint on n2");
        assert!(remote.meshed && !remote.healthy);
        assert_eq!((remote.node.as_str(), remote.identity.as_str()), ("n2", "spiffe://cluster.local/ns/demo/sa/whoami"));
        assert_eq!(remote.ports.get(&80), Some(&8080));
    }

    let p1 = authz(&n1);
    assert_eq!(p1.len(), 1, "the policy of a namespace without workloads here is not sent");
    assert_eq!(p1[0].workload_uids, ["demo/whoami-1"], "only meshed, selected, local workloads");
    assert_eq!(p1[0].action, i32::from(pb::Action::Deny));
    assert_eq!(p1[0].rules[0].to[0].ports, [8080]);
    assert_eq!(authz(&n2)[0].workload_uids, ["demo/whoami-2"]);

    let pa = n1.get(&(pb::ResourceKind::PeerAuthentication.into(), "mesh-system/mesh-strict".into())).expect("mesh-wide PA");
    let Some(pb::resource::Kind::PeerAuthentication(pa)) = &pa.kind else { panic!("not a PA") };
    assert_eq!((pa.scope, pa.mode), (i32::from(pb::Scope::Mesh), i32::from(pb::MtlsMode::Strict)));
    assert_eq!(pa.workload_uids, ["demo/whoami-1"], "the unmeshed client is not covered");
}

#[test]
fn unknown_node_gets_services_and_meshed_workloads_only() {
    let v = node_view(&lab_state(POLICIES), "n9", TD);
    let kinds = [i32::from(pb::ResourceKind::Service), i32::from(pb::ResourceKind::Workload)];
    assert!(v.keys().all(|(k, _)| kinds.contains(k)), "no policies: {:?}", v.keys().collect::<Vec<_>>());
    assert_eq!(workloads(&v).iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["whoami-1", "whoami-2"]);
    assert_eq!(v.len(), 3);
}

/// A view too large for one message goes out in parts of at most the limit that join back into
/// the same update; one that fits is sent whole, as before.
#[test]
fn large_updates_are_split_into_parts_that_join_back_into_the_update() {
    use prost::Message as _;
    let view = node_view(&lab_state(POLICIES), "n1", TD);
    let whole = pb::ConfigUpdate { version: 7, full: false, more: false, upserts: view.values().cloned().collect(), removals: vec![pb::ResourceKey { kind: 1, key: "demo/gone".into() }; 40] };
    assert_eq!(split(whole.clone(), MAX_MESSAGE_BYTES), std::slice::from_ref(&whole), "fits: one message, no `more`");

    let limit = 400;
    let parts = split(whole.clone(), limit);
    assert!(parts.len() > 3, "{} parts", parts.len());
    for (i, p) in parts.iter().enumerate() {
        assert_eq!((p.version, p.full, p.more), (7, false, i + 1 < parts.len()), "part {i}");
        let alone = p.upserts.len() + p.removals.len() == 1;
        assert!(p.encoded_len() <= limit || alone, "part {i} has {} bytes", p.encoded_len());
        assert!(!p.upserts.is_empty() || !p.removals.is_empty(), "no empty part");
    }
    let joined = pb::ConfigUpdate {
        upserts: parts.iter().flat_map(|p| p.upserts.clone()).collect(),
        removals: parts.iter().flat_map(|p| p.removals.clone()).collect(),
        ..parts[0].clone()
    };
    assert_eq!(joined, pb::ConfigUpdate { more: true, ..whole }, "same resources, same order");
}

#[test]
fn diff_sends_changed_and_removed_resources_only() {
    let before = node_view(&lab_state(POLICIES), "n1", TD);
    let no_policies = node_view(&lab_state(""), "n1", TD);
    let (upserts, removals) = diff(&before, &before);
    assert!(upserts.is_empty() && removals.is_empty());
    let (upserts, removals) = diff(&before, &no_policies);
    assert!(upserts.is_empty());
    let mut removed: Vec<String> = removals.iter().map(|k| k.key.clone()).collect();
    removed.sort();
    assert_eq!(removed, ["demo/whoami-deny", "mesh-system/mesh-strict"]);
    let (upserts, removals) = diff(&no_policies, &before);
    assert_eq!((upserts.len(), removals.len()), (2, 0));
    // A policy edit is one upsert of that policy.
    let edited = node_view(&lab_state(&POLICIES.replace("action: DENY", "action: ALLOW")), "n1", TD);
    let (upserts, removals) = diff(&before, &edited);
    assert!(removals.is_empty());
    assert_eq!(upserts.len(), 1);
    assert_eq!(key_of(upserts[0].kind.as_ref().expect("kind")).key, "demo/whoami-deny");
}

#[test]
fn every_node_gets_every_route_table_and_endpoints_carry_their_subsets() {
    let extra = r"
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: whoami-v1, namespace: demo, labels: {app: whoami, version: v1}}
spec: {node: n2, serviceAccount: whoami, addresses: [198.18.2.30]}
---
apiVersion: networking.mesh.dev/v1alpha1
kind: DestinationRule
metadata: {name: whoami, namespace: demo}
spec:
  host: whoami
  subsets: [{name: v1, labels: {version: v1}}, {name: all, labels: {app: whoami}}]
---
apiVersion: networking.mesh.dev/v1alpha1
kind: VirtualService
metadata: {name: whoami, namespace: demo}
spec:
  hosts: [whoami]
  http:
  - match: [{uri: {prefix: /v1}}]
    rewrite: {uri: /}
    route: [{destination: {host: whoami, subset: v1}}]
    timeout: 2s
    mirror: {host: whoami}
    mirrorPercentage: {value: 5}
  - redirect: {uri: /v1, redirectCode: 308}
";
    let state = lab_state(extra);
    for node in ["n1", "n2", "n9"] {
        let v = node_view(&state, node, TD);
        let t = v.get(&(pb::ResourceKind::RouteTable.into(), "demo/whoami".into())).unwrap_or_else(|| panic!("{node} gets the table"));
        let Some(pb::resource::Kind::RouteTable(t)) = &t.kind else { panic!("a route table") };
        let r0 = &t.routes[0];
        let source = r0.source.as_ref().expect("source");
        assert_eq!((source.kind.as_str(), source.name.as_str(), source.rule), ("VirtualService", "whoami", 0));
        let m = &r0.matches[0];
        assert_eq!(m.path.as_ref().map(|p| (p.kind, p.value.as_str())), Some((pb::MatchKind::Prefix.into(), "/v1")));
        let rw = r0.rewrite.as_ref().and_then(|r| r.path.as_ref()).expect("rewrite");
        assert_eq!((rw.kind, rw.value.as_str()), (pb::PathModifierKind::Prefix.into(), "/"));
        assert_eq!((r0.backends[0].subset.as_str(), r0.backends[0].weight, r0.backends[0].port), ("v1", 100, 0));
        assert_eq!((r0.request_timeout_ms, r0.mirrors[0].per_million), (2000, 50_000));
        let rd = t.routes[1].redirect.as_ref().expect("redirect");
        assert_eq!((rd.status_code, rd.path.as_ref().map(|p| p.kind)), (308, Some(pb::PathModifierKind::Full.into())));
        assert!(t.routes[1].backends.is_empty() && t.routes[1].direct_response.is_none());
    }
    let v = node_view(&state, "n1", TD);
    let Some(pb::resource::Kind::Service(svc)) = &v.get(&(pb::ResourceKind::Service.into(), "demo/whoami".into())).expect("the Service").kind else { panic!("service") };
    let subsets: Vec<(&str, Vec<&str>)> = svc.endpoints.iter().map(|e| (e.address.as_str(), e.subsets.iter().map(String::as_str).collect())).collect();
    assert_eq!(subsets, [("198.18.1.10", vec!["all"]), ("198.18.2.10", vec!["all"]), ("198.18.2.30", vec!["v1", "all"])]);
}

/// Every node's view shares one copy of what all nodes receive (meshed workloads, Services), and
/// the next state reuses each resource that did not change: a diff finds the one change without
/// comparing the rest, and nothing is converted again per node.
#[test]
fn views_share_what_every_node_receives_and_states_share_what_did_not_change() {
    let cache = Cache::default();
    let build = |state: &State, version| cache.get(version, |previous| reuse(common(state, TD), previous));
    let first = lab_state(POLICIES);
    let (n1, n2) = (node_view_with(build(&first, 1), &first, "n1", TD), node_view_with(build(&first, 1), &first, "n2", TD));
    let whoami = (pb::ResourceKind::Workload.into(), "demo/whoami-2".to_owned());
    let service = (pb::ResourceKind::Service.into(), "demo/whoami".to_owned());
    for key in [&whoami, &service] {
        assert!(std::ptr::eq(n1.get(key).expect("n1 has it"), n2.get(key).expect("n2 has it")), "one copy of {key:?}");
    }
    // The unmeshed client is n1's own; n2 does not get it.
    let client = (pb::ResourceKind::Workload.into(), "demo/client".to_owned());
    assert!(n1.contains_key(&client) && !n2.contains_key(&client));
    assert_eq!(n1, node_view(&first, "n1", TD), "the same view as one built alone");

    // A new state with one more Service: everything else is the same allocation.
    let second = lab_state(&format!("{POLICIES}\n---\napiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: other, namespace: demo}}\nspec: {{vips: [198.19.0.11], selector: {{app: whoami}}, ports: [{{port: 81, targetPort: 8081}}]}}\n"));
    let next = node_view_with(build(&second, 2), &second, "n1", TD);
    assert!(std::ptr::eq(n1.get(&whoami).expect("before"), next.get(&whoami).expect("after")), "an unchanged workload is reused");
    let (upserts, removals) = diff(&n1, &next);
    assert!(removals.is_empty());
    let keys: Vec<String> = upserts.iter().map(|r| key_of(r.kind.as_ref().expect("kind")).key).collect();
    assert_eq!(keys, ["demo/other"]);
    // A stream still on the first state gets its own copy; the cache keeps the newer one.
    let late = node_view_with(build(&first, 1), &first, "n2", TD);
    assert!(!std::ptr::eq(late.get(&whoami).expect("late"), n2.get(&whoami).expect("n2")));
    assert!(std::ptr::eq(next.get(&whoami).expect("next"), node_view_with(build(&second, 2), &second, "n2", TD).get(&whoami).expect("n2 on 2")));
}
