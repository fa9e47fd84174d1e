//! Compilation through the real file-mode path (`fixtures::lab_state`): YAML as users write it →
//! route tables and verdicts.

use super::*;
use crate::{
    fixtures::lab_state,
    routing::{Kind, Routes, Verdict, VerdictStatus, model::StringMatch},
    view::State,
};

/// The lab plus versioned whoami pods, per-version Services, a TCP-only and a gRPC Service, and
/// a client namespace.
const SERVICES: &str = r"
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: whoami-v1-a, namespace: demo, labels: {app: whoami, track: v1, version: v1.0}}
spec: {node: n1, serviceAccount: whoami, addresses: [198.18.1.20]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: whoami-v2-a, namespace: demo, labels: {app: whoami, track: v2, version: v1.1}}
spec: {node: n2, serviceAccount: whoami, addresses: [198.18.2.20]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: whoami-v1, namespace: demo}
spec: {vips: [198.19.0.11], selector: {track: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: whoami-v2, namespace: demo}
spec: {vips: [198.19.0.12], selector: {track: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: db, namespace: demo}
spec: {vips: [198.19.0.13], ports: [{name: postgres, port: 5432}]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: greeter, namespace: demo}
spec: {vips: [198.19.0.14], ports: [{name: api, port: 9000, appProtocol: grpc}, {name: web, port: 80, appProtocol: http}]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: backend, namespace: other}
spec: {vips: [198.19.0.15], ports: [{name: http, port: 80}]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Namespace
metadata: {name: client, labels: {mesh.dev/dataplane-mode: ambient}}
";

fn state(extra: &str) -> State {
    lab_state(&format!("{SERVICES}\n---\n{extra}"))
}

fn routes(s: &State) -> &Routes {
    &s.routes
}

fn table<'a>(s: &'a State, service: &str) -> &'a RouteTable {
    s.routes
        .tables
        .values()
        .find(|t| t.service.to_string() == service)
        .unwrap_or_else(|| panic!("no table for {service}: {:?}", s.routes.tables.keys()))
}

fn verdict<'a>(s: &'a State, kind: Kind, key: &str) -> &'a Verdict {
    routes(s)
        .verdicts
        .iter()
        .find(|v| v.kind == kind && v.key.to_string() == key)
        .unwrap_or_else(|| panic!("no verdict for {key}: {:?}", routes(s).verdicts))
}

/// (type, status, reason) of each condition (of every parent).
fn conditions(v: &Verdict) -> Vec<(&str, bool, &str)> {
    v.conditions()
        .into_iter()
        .map(|c| (c.type_, c.status, c.reason))
        .collect()
}

fn message<'a>(v: &'a Verdict, type_: &str) -> &'a str {
    v.conditions()
        .into_iter()
        .find(|c| c.type_ == type_)
        .map_or("", |c| c.message.as_str())
}

fn http_route(name: &str, created: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: demo, creationTimestamp: \"{created}\"}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}\n---\n"
    )
}

const WHOAMI: &str = "{group: \"\", kind: Service, name: whoami}";

/// (path, source route name, rule) of each route of a list, in order.
fn order(routes: &[Route]) -> Vec<(String, String, u32)> {
    routes
        .iter()
        .map(|r| {
            let m = &r.matches[0];
            let path = match &m.path {
                Some(StringMatch::Exact(p)) => format!("= {p}"),
                Some(StringMatch::PathPrefix(p)) => format!("{p}*"),
                Some(StringMatch::Regex(p)) => format!("~ {p}"),
                other => format!("{other:?}"),
            };
            let extra = if m.method.is_some() {
                " +method"
            } else if m.headers.is_empty() {
                ""
            } else {
                " +header"
            };
            (
                format!("{path}{extra}"),
                r.source.key.name.clone(),
                r.source.rule,
            )
        })
        .collect()
}

#[test]
fn matches_of_every_route_of_a_service_are_ordered_by_gateway_api_precedence() {
    let older = http_route(
        "b-older",
        "2026-01-01T00:00:00Z",
        WHOAMI,
        "  - matches: [{path: {value: /api}}, {path: {type: Exact, value: /api/v1/users}}]\n    backendRefs: [{name: whoami-v1, port: 80}]\n  - matches: [{headers: [{name: x-canary, value: \"on\"}]}]\n    backendRefs: [{name: whoami-v2, port: 80}]",
    );
    let newer = http_route(
        "a-newer",
        "2026-02-01T00:00:00Z",
        WHOAMI,
        "  - matches: [{path: {value: /api}, method: GET}]\n    backendRefs: [{name: whoami-v2, port: 80}]\n  - matches: [{path: {type: RegularExpression, value: \"/api/.*/items\"}}]\n    backendRefs: [{name: whoami-v1, port: 80}]\n  - backendRefs: [{name: whoami, port: 80}]",
    );
    let s = state(&(older + &newer));
    let t = table(&s, "demo/whoami");
    assert_eq!(
        order(&t.routes),
        [
            ("= /api/v1/users".into(), "b-older".into(), 0),
            ("/api* +method".into(), "a-newer".into(), 0),
            ("/api*".into(), "b-older".into(), 0),
            ("~ /api/.*/items".into(), "a-newer".into(), 1),
            ("/* +header".into(), "b-older".into(), 1),
            ("/*".into(), "a-newer".into(), 2),
        ]
    );
    assert!(t.consumers.is_empty());
    for r in ["demo/a-newer", "demo/b-older"] {
        assert_eq!(
            conditions(verdict(&s, Kind::HttpRoute, r)),
            [
                ("Accepted", true, "Accepted"),
                ("ResolvedRefs", true, "ResolvedRefs")
            ],
            "{r}"
        );
    }
}

#[test]
fn adjacent_matches_of_one_rule_stay_one_route_and_a_parent_port_restricts_them() {
    let r = http_route(
        "r",
        "2026-01-01T00:00:00Z",
        "{group: \"\", kind: Service, name: whoami, port: 80}",
        "  - matches: [{path: {value: /aa}}, {path: {value: /bb}}]\n    backendRefs: [{name: whoami-v1, port: 80}]",
    );
    let s = state(&r);
    let t = table(&s, "demo/whoami");
    assert_eq!(t.routes.len(), 1, "{:#?}", t.routes);
    let paths: Vec<(Option<StringMatch>, Option<u16>)> = t.routes[0]
        .matches
        .iter()
        .map(|m| (m.path.clone(), m.port))
        .collect();
    assert_eq!(
        paths,
        [
            (Some(StringMatch::PathPrefix("/aa".into())), Some(80)),
            (Some(StringMatch::PathPrefix("/bb".into())), Some(80))
        ]
    );
    let Action::Forward(b) = &t.routes[0].action else {
        panic!("forward")
    };
    assert_eq!(
        (b[0].service.to_string(), b[0].port, b[0].weight),
        ("demo/whoami-v1".into(), Some(80), 1)
    );
}

#[test]
fn a_route_in_the_client_namespace_is_a_consumer_route_and_others_keep_the_default() {
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: mine, namespace: client}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: whoami, namespace: demo}]\n  rules:\n  - backendRefs: [{name: whoami, namespace: demo, port: 80}]\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: clients, namespace: demo}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: client}]\n  to: [{group: \"\", kind: Service, name: whoami}]\n";
    let s = state(consumer);
    let t = table(&s, "demo/whoami");
    let mine = &t.consumers["client"];
    assert_eq!(mine[0].source.key.to_string(), "client/mine");
    assert_eq!(
        conditions(verdict(&s, Kind::HttpRoute, "client/mine")),
        [
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", true, "ResolvedRefs")
        ]
    );
    // Everyone else: the Service itself, as without routes.
    assert_eq!(t.routes.len(), 1);
    let d = &t.routes[0];
    assert!(d.matches.is_empty());
    assert_eq!(
        (d.source.kind, d.source.rule_name.as_deref()),
        (SourceKind::HttpRoute, Some("default"))
    );
    assert_eq!(
        d.action,
        Action::Forward(vec![Backend::plain(
            NamespacedName::new("demo", "whoami"),
            None,
            1
        )])
    );

    // With producer routes too, those are the everyone-else routes.
    let producer = http_route(
        "p",
        "2026-01-01T00:00:00Z",
        WHOAMI,
        "  - backendRefs: [{name: whoami-v1, port: 80}]",
    );
    let s = state(&format!("{consumer}---\n{producer}"));
    let t = table(&s, "demo/whoami");
    assert_eq!(
        (t.routes.len(), t.routes[0].source.key.to_string()),
        (1, "demo/p".to_owned())
    );
    assert_eq!(t.consumers["client"].len(), 1);

    // Without the grant, the cross-namespace backend is not permitted: 500 for those clients.
    let s = state(consumer.split("---").next().expect("the route"));
    let v = verdict(&s, Kind::HttpRoute, "client/mine");
    assert_eq!(
        conditions(v),
        [
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", false, "RefNotPermitted")
        ]
    );
    assert!(message(v, "ResolvedRefs").starts_with("spec.rules[0].backendRefs[0]: Service demo/whoami is in another namespace, and no ReferenceGrant in namespace demo allows HTTPRoutes from namespace client"), "{}", message(v, "ResolvedRefs"));
    assert_eq!(
        table(&s, "demo/whoami").consumers["client"][0].action,
        Action::internal_error()
    );
}

#[test]
fn each_parent_gets_its_own_accepted_condition() {
    let parents = [
        (
            "{group: \"\", kind: Service, name: whoami, sectionName: http}",
            ("Accepted", true, "Accepted"),
            "",
        ),
        (
            "{group: \"\", kind: Service, name: whoami, port: 81}",
            ("Accepted", false, "NoMatchingParent"),
            "Service demo/whoami has no port 81",
        ),
        (
            "{group: \"\", kind: Service, name: whoami, port: 80, sectionName: metrics}",
            ("Accepted", false, "NoMatchingParent"),
            "Service demo/whoami has no port named \"metrics\" (sectionName)",
        ),
        (
            "{group: \"\", kind: Service, name: nope}",
            ("Accepted", false, "NoMatchingParent"),
            "Service demo/nope not found",
        ),
        (
            "{group: \"\", kind: Service, name: db}",
            ("Accepted", false, "NotAllowedByListeners"),
            "no port of Service demo/db is HTTP",
        ),
        (
            "{kind: Service, name: whoami}",
            ("Accepted", false, "NoMatchingParent"),
            "spec.parentRefs[0]: kind Service needs group \"\"",
        ),
    ];
    for (parent, want, msg) in parents {
        let s = state(&http_route(
            "r",
            "2026-01-01T00:00:00Z",
            &format!("{parent}, {{name: some-gateway}}"),
            "  - backendRefs: [{name: whoami, port: 80}]",
        ));
        let v = verdict(&s, Kind::HttpRoute, "demo/r");
        let VerdictStatus::Parents(ps) = &v.status else {
            panic!("parents")
        };
        assert_eq!(
            ps.len(),
            1,
            "{parent}: only our parent gets an entry, not the Gateway"
        );
        let c = &ps[0].conditions[0];
        assert_eq!(
            (c.type_, c.status, c.reason),
            want,
            "{parent}: {}",
            c.message
        );
        assert!(c.message.starts_with(msg), "{parent}: {}", c.message);
        assert_eq!(
            !s.routes.tables.is_empty(),
            want.1,
            "{parent}: routes are compiled only for accepted parents"
        );
    }
    let s = state(&http_route(
        "r",
        "2026-01-01T00:00:00Z",
        "{group: \"\", kind: Service, name: whoami, sectionName: http}",
        "  - backendRefs: [{name: whoami, port: 80}]",
    ));
    assert_eq!(
        table(&s, "demo/whoami").routes[0].matches[0].port,
        Some(80),
        "sectionName names the port"
    );
}

#[test]
fn unresolved_backends_get_weight_0_or_a_500_and_resolvedrefs_says_why() {
    let rules = "  - backendRefs: [{name: whoami-v1, port: 80, weight: 90}, {name: missing, port: 80, weight: 10}]\n  - backendRefs: [{name: missing, port: 80}, {group: multicluster.x-k8s.io, kind: ServiceImport, name: x}]\n  - matches: [{path: {value: /empty}}]\n  - matches: [{path: {value: /port}}]\n    backendRefs: [{name: whoami, port: 81}]";
    let s = state(&http_route("r", "2026-01-01T00:00:00Z", WHOAMI, rules));
    let t = table(&s, "demo/whoami");
    let by_rule = |i: u32| {
        t.routes
            .iter()
            .find(|r| r.source.rule == i)
            .expect("rule compiled")
    };
    let Action::Forward(b) = &by_rule(0).action else {
        panic!("forward")
    };
    assert_eq!(
        b.iter()
            .map(|b| (b.service.name.as_str(), b.weight))
            .collect::<Vec<_>>(),
        [("whoami-v1", 90), ("missing", 0)]
    );
    assert_eq!(
        by_rule(1).action,
        Action::internal_error(),
        "nothing resolves: 500"
    );
    assert_eq!(
        by_rule(2).action,
        Action::internal_error(),
        "no backendRefs: 500"
    );
    assert_eq!(by_rule(3).action, Action::internal_error());
    let v = verdict(&s, Kind::HttpRoute, "demo/r");
    assert_eq!(
        conditions(v),
        [
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", false, "BackendNotFound")
        ]
    );
    assert_eq!(
        message(v, "ResolvedRefs"),
        "spec.rules[0].backendRefs[1]: Service demo/missing not found; spec.rules[1].backendRefs[0]: Service demo/missing not found; spec.rules[1].backendRefs[1]: kind multicluster.x-k8s.io/ServiceImport is not supported (backends are Services: group \"\", kind Service); spec.rules[3].backendRefs[0]: Service demo/whoami has no port 81"
    );
    let s = state(&http_route(
        "r",
        "2026-01-01T00:00:00Z",
        WHOAMI,
        "  - backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: x}]",
    ));
    assert_eq!(
        conditions(verdict(&s, Kind::HttpRoute, "demo/r"))[1],
        ("ResolvedRefs", false, "InvalidKind")
    );
}

#[test]
fn an_invalid_route_is_not_accepted_on_any_of_its_parents_and_routes_nothing() {
    let s = state(&http_route(
        "bad",
        "2026-01-01T00:00:00Z",
        "{group: \"\", kind: Service, name: whoami}, {group: \"\", kind: Service, name: whoami-v1}, {name: gw}",
        "  - matches: [{path: {value: /a}}, {path: {type: RegularExpression, value: \"(\"}}]\n    backendRefs: [{name: whoami, port: 80}]",
    ));
    assert!(s.routes.tables.is_empty());
    let v = verdict(&s, Kind::HttpRoute, "demo/bad");
    assert_eq!(
        conditions(v),
        [
            ("Accepted", false, "UnsupportedValue"),
            ("Accepted", false, "UnsupportedValue")
        ]
    );
    assert!(
        message(v, "Accepted")
            .starts_with("spec.rules[0].matches[1].path.value: regex \"(\" is invalid"),
        "{}",
        message(v, "Accepted")
    );
    assert_eq!(v.rejection(), Some("UnsupportedValue"));
}

#[test]
fn grpc_routes_attach_to_http2_ports_only() {
    let grpc = |port: u16| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: demo}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: greeter, port: {port}}}]\n  rules:\n  - matches: [{{method: {{service: helloworld.Greeter, method: SayHello}}}}, {{method: {{service: helloworld.Greeter}}}}]\n    backendRefs: [{{name: greeter, port: 9000}}]\n"
        )
    };
    let s = state(&grpc(9000));
    let t = table(&s, "demo/greeter");
    assert_eq!(
        t.routes.len(),
        1,
        "the rule's two matches stay together: nothing else sorts between them"
    );
    let paths: Vec<Option<StringMatch>> =
        t.routes[0].matches.iter().map(|m| m.path.clone()).collect();
    assert_eq!(
        paths,
        [
            Some(StringMatch::Exact("/helloworld.Greeter/SayHello".into())),
            Some(StringMatch::PathPrefix("/helloworld.Greeter".into()))
        ]
    );
    assert_eq!(
        (t.routes[0].source.kind, t.routes[0].matches[0].port),
        (SourceKind::GrpcRoute, Some(9000))
    );
    let s = state(&grpc(80));
    let v = verdict(&s, Kind::GrpcRoute, "demo/g");
    assert_eq!(
        conditions(v)[0],
        ("Accepted", false, "NotAllowedByListeners")
    );
    assert!(
        message(v, "Accepted")
            .starts_with("port 80 (\"web\") of Service demo/greeter speaks HTTP/2"),
        "{}",
        message(v, "Accepted")
    );
}

const CANARY: &str = r#"apiVersion: networking.mesh.dev/v1alpha1
kind: VirtualService
metadata: {name: whoami, namespace: demo, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: [whoami]
  http:
  - match: [{headers: {user-agent: {regex: ".*Firefox.*"}}}]
    route: [{destination: {host: whoami, subset: v1-1}}]
  - route: [{destination: {host: whoami, subset: v1-0}}]
---
apiVersion: networking.mesh.dev/v1alpha1
kind: DestinationRule
metadata: {name: whoami, namespace: demo}
spec:
  host: whoami.demo.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1-0, labels: {version: v1.0}}
  - {name: v1-1, labels: {version: v1.1}}
---
"#;

#[test]
fn the_firefox_canary_compiles_to_subset_routes_in_http_order() {
    let s = state(CANARY);
    let t = table(&s, "demo/whoami");
    assert_eq!(t.routes.len(), 2);
    assert_eq!(
        t.routes[0].matches[0].headers[0].value,
        StringMatch::Regex(".*Firefox.*".into())
    );
    let subset = |r: &Route| match &r.action {
        Action::Forward(b) => b[0].subset.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (subset(&t.routes[0]), subset(&t.routes[1])),
        (Some("v1-1".into()), Some("v1-0".into()))
    );
    assert!(t.routes[1].matches.is_empty());
    assert_eq!(
        t.traffic_policy
            .as_ref()
            .and_then(|p| p.load_balancer.clone()),
        Some(crate::routing::model::LoadBalancer::LeastRequest)
    );
    assert_eq!(
        conditions(verdict(&s, Kind::VirtualService, "demo/whoami")),
        [
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", true, "ResolvedRefs")
        ]
    );
    let dr = verdict(&s, Kind::DestinationRule, "demo/whoami");
    assert_eq!(conditions(dr), [("Accepted", true, "Accepted")]);
    let subsets: Vec<&str> = s.routes.subsets[&NamespacedName::new("demo", "whoami")]
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(subsets, ["v1-0", "v1-1"]);
}

#[test]
fn gateway_api_routes_override_virtualservices_and_the_oldest_virtualservice_wins() {
    let s = state(&format!(
        "{CANARY}{}",
        http_route(
            "r",
            "2026-03-01T00:00:00Z",
            WHOAMI,
            "  - backendRefs: [{name: whoami, port: 80}]"
        )
    ));
    let v = verdict(&s, Kind::VirtualService, "demo/whoami");
    assert_eq!(conditions(v)[0], ("Accepted", false, "Overridden"));
    assert_eq!(
        message(v, "Accepted"),
        "spec.hosts[0]: Service demo/whoami is routed by HTTPRoute demo/r (Gateway API routes win over VirtualServices)"
    );
    assert_eq!(
        table(&s, "demo/whoami").routes[0].source.kind,
        SourceKind::HttpRoute
    );

    let younger = CANARY.split("---").next().expect("vs").replace(
        "name: whoami, namespace: demo, creationTimestamp: \"2026-01-01T00:00:00Z\"",
        "name: a-younger, namespace: demo, creationTimestamp: \"2026-02-01T00:00:00Z\"",
    );
    let s = state(&format!("{CANARY}{younger}"));
    let v = verdict(&s, Kind::VirtualService, "demo/a-younger");
    assert_eq!(conditions(v)[0], ("Accepted", false, "Conflicted"));
    assert!(message(v, "Accepted").contains("VirtualService demo/whoami (older) already routes Service demo/whoami for these clients; Istio would merge them"), "{}", message(v, "Accepted"));
    assert!(
        table(&s, "demo/whoami")
            .routes
            .iter()
            .all(|r| r.source.key.name == "whoami")
    );
}

#[test]
fn virtualservice_placement_subsets_and_carried_fields_show_in_its_conditions() {
    let vs = |ns: &str, http: &str| {
        format!(
            "apiVersion: networking.mesh.dev/v1alpha1\nkind: VirtualService\nmetadata: {{name: v, namespace: {ns}}}\nspec:\n  hosts: [whoami.demo]\n  http:\n{http}\n---\n"
        )
    };
    // In another namespace: a consumer route, and the message says so.
    let s = state(&vs(
        "client",
        "  - route: [{destination: {host: whoami.demo}}]",
    ));
    let t = table(&s, "demo/whoami");
    assert_eq!(t.consumers["client"][0].source.key.to_string(), "client/v");
    assert_eq!(t.routes[0].source.rule_name.as_deref(), Some("default"));
    let v = verdict(&s, Kind::VirtualService, "client/v");
    assert_eq!(conditions(v)[0], ("Accepted", true, "PartiallyEnforced"));
    assert!(
        message(v, "Accepted")
            .starts_with("spec.hosts[0]: applies to clients in namespace client only"),
        "{}",
        message(v, "Accepted")
    );
    // Retries are carried, named in the message; an unknown subset is carried and flagged.
    let s = state(&vs(
        "demo",
        "  - route: [{destination: {host: whoami, subset: v9}}]\n    retries: {attempts: 3, perTryTimeout: 2s}\n    corsPolicy: {allowOrigins: [{exact: x}]}",
    ));
    let v = verdict(&s, Kind::VirtualService, "demo/v");
    assert_eq!(
        conditions(v),
        [
            ("Accepted", true, "PartiallyEnforced"),
            ("ResolvedRefs", false, "SubsetNotFound")
        ]
    );
    assert_eq!(
        message(v, "Accepted"),
        "spec.http[0].corsPolicy: ignored: CORS is not implemented"
    );
    assert_eq!(
        message(v, "ResolvedRefs"),
        "spec.http[0].route[0].destination.subset: no DestinationRule for Service demo/whoami defines subset \"v9\""
    );
    let route = &table(&s, "demo/whoami").routes[0];
    assert_eq!(route.retry.as_ref().map(|r| r.attempts), Some(3));
    assert!(matches!(&route.action, Action::Forward(b) if b[0].subset.as_deref() == Some("v9")));
    // A host that is not a Service: nothing applies.
    let s = state(
        &vs("demo", "  - route: [{destination: {host: whoami}}]")
            .replace("whoami.demo]", "nothere]"),
    );
    assert_eq!(
        conditions(verdict(&s, Kind::VirtualService, "demo/v"))[0],
        ("Accepted", false, "NoMatchingHost")
    );
    // An unknown destination: a 500, like Gateway API.
    let s = state(&vs("demo", "  - route: [{destination: {host: gone}}]"));
    assert_eq!(
        table(&s, "demo/whoami").routes[0].action,
        Action::internal_error()
    );
    assert_eq!(
        conditions(verdict(&s, Kind::VirtualService, "demo/v"))[1],
        ("ResolvedRefs", false, "BackendNotFound")
    );
}

#[test]
fn destination_rules_must_live_with_their_service_and_the_oldest_wins() {
    let dr = |ns: &str, name: &str, created: &str| {
        format!(
            "apiVersion: networking.mesh.dev/v1alpha1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec:\n  host: whoami.demo\n  subsets: [{{name: {name}, labels: {{version: v1.0}}}}]\n---\n"
        )
    };
    let s = state(
        &(dr("demo", "older", "2026-01-01T00:00:00Z")
            + &dr("demo", "newer", "2026-02-01T00:00:00Z")
            + &dr("client", "theirs", "2025-01-01T00:00:00Z")),
    );
    assert_eq!(
        conditions(verdict(&s, Kind::DestinationRule, "demo/older")),
        [("Accepted", true, "Accepted")]
    );
    assert_eq!(
        conditions(verdict(&s, Kind::DestinationRule, "demo/newer")),
        [("Accepted", false, "Conflicted")]
    );
    assert_eq!(
        conditions(verdict(&s, Kind::DestinationRule, "client/theirs")),
        [("Accepted", false, "WrongNamespace")]
    );
    assert_eq!(
        s.routes.subsets[&NamespacedName::new("demo", "whoami")][0].0,
        "older"
    );
    assert!(
        s.routes.tables.is_empty(),
        "subsets alone make no route table"
    );
}

#[test]
fn a_traffic_policy_without_routes_gets_a_default_table_and_subsets_replace_whole_settings() {
    let s = state(
        r"
apiVersion: networking.mesh.dev/v1alpha1
kind: DestinationRule
metadata: {name: whoami-v1, namespace: demo}
spec:
  host: whoami-v1
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 10}}
    outlierDetection: {consecutive5xxErrors: 2}
  subsets:
  - name: canary
    labels: {version: v1.1}
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
",
    );
    let t = table(&s, "demo/whoami-v1");
    assert_eq!(t.routes.len(), 1, "the default route");
    let policy = t.traffic_policy.as_ref().expect("policy");
    assert_eq!(
        policy
            .connection_pool
            .as_ref()
            .and_then(|c| c.http2_max_requests),
        Some(10)
    );
    let canary = &t.subset_policies["canary"];
    let pool = canary.connection_pool.as_ref().expect("the subset's own pool");
    assert_eq!(
        (pool.max_connections, pool.http2_max_requests),
        (Some(1), None),
        "connectionPool replaced whole"
    );
    assert_eq!(
        canary.outlier_detection, policy.outlier_detection,
        "outlierDetection inherited"
    );
    assert_eq!(
        conditions(verdict(&s, Kind::DestinationRule, "demo/whoami-v1")),
        [("Accepted", true, "Accepted")]
    );
}
