//! The contract with the nodes, checked from both sides: what the controller compiles (the
//! routing examples plus a route using every feature) goes through the node daemon's own proto
//! conversion (`mesh_node::control::convert::snapshot`, which refuses anything it could not run)
//! and the node's matching (`mesh_l7`) routes requests the way the examples promise.

use std::{collections::BTreeMap, path::Path};

use mesh_l7::route::{Action, RouteTable, matching};

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// Every feature of both APIs, on the Services of routing-lab.yaml.
const EVERYTHING: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: everything, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: whoami-v1, port: 80}]
  hostnames: [whoami-v1.demo.svc.cluster.local]
  rules:
  - name: api
    matches:
    - path: {type: RegularExpression, value: "/api/v[0-9]+/.*"}
      method: POST
      headers: [{name: X-Env, value: prod}, {type: RegularExpression, name: x-user, value: "a.*"}]
      queryParams: [{name: debug, value: "1"}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-d, value: "3"}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: whoami-v2, port: 80}, fraction: {numerator: 1, denominator: 3}}}
    backendRefs:
    - {name: whoami-v1, port: 80, weight: 3, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-e, value: "4"}]}}]}
    - {name: missing, port: 80, weight: 1}
    timeouts: {request: 10s, backendRequest: 1500ms}
    retry: {attempts: 2, codes: [502, 503], backoff: 100ms}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: new.demo, port: 8443, statusCode: 308, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - matches: [{path: {type: Exact, value: /none}}]
---
apiVersion: networking.mesh.dev/v1alpha1
kind: VirtualService
metadata: {name: everything, namespace: demo}
spec:
  hosts: [whoami-v2]
  http:
  - match:
    - uri: {prefix: /a}
      method: {regex: "GET|HEAD"}
      withoutHeaders: {x-skip: {}}
      queryParams: {q: {}}
      sourceLabels: {app: client}
      sourceNamespace: demo
      port: 80
    rewrite: {uri: /b, authority: other.demo}
    route: [{destination: {host: whoami-v2, port: {number: 80}}, headers: {request: {set: {x-f: "5"}}}}]
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,reset,503"}
    fault: {delay: {fixedDelay: 1s, percentage: {value: 0.1}}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}
    mirrors: [{destination: {host: whoami-v1}, percentage: {value: 25}}]
  - match: [{headers: {x-teapot: {exact: "yes"}}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - redirect: {uri: /elsewhere, redirectCode: 302}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client}
spec:
  parentRefs: [{group: "", kind: Service, name: whoami, namespace: demo, port: 80}]
  rules: [{backendRefs: [{name: whoami-v2, namespace: demo, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: clients, namespace: demo}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: client}]
  to: [{group: "", kind: Service}]
"#;

fn tables() -> BTreeMap<String, RouteTable> {
    let dir = tempfile::tempdir().expect("tempdir");
    let ex = deploy().join("examples");
    for f in [
        "file-mode/cluster.yaml",
        "file-mode/routing-lab.yaml",
        "routing/firefox-canary.yaml",
        "routing/weighted-split.yaml",
        "routing/header-route.yaml",
        "routing/path-rewrite.yaml",
        "routing/mirror.yaml",
    ] {
        std::fs::copy(ex.join(f), dir.path().join(f.replace('/', "-"))).expect("copy");
    }
    std::fs::write(dir.path().join("everything.yaml"), EVERYTHING).expect("write");
    let (state, errors) = mesh_control::filemode::load(dir.path(), "mesh-system");
    assert!(errors.is_empty(), "{errors:?}");
    let rejected: Vec<_> = state
        .routes
        .verdicts
        .iter()
        .filter(|v| v.rejection().is_some())
        .map(|v| (&v.key, v.conditions()))
        .collect();
    assert!(rejected.is_empty(), "{rejected:#?}");
    let view = mesh_control::view::node_view(&state, "n1", "cluster.local");
    let snapshot = mesh_node::control::convert::snapshot(
        view.into_values(),
        "n1",
        "198.18.0.1".parse().expect("ip"),
    )
    .expect("the node accepts every route table");
    snapshot
        .routes
        .into_iter()
        .map(|t| (format!("{}/{}", t.namespace, t.name), t))
        .collect()
}

fn request(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder().uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request")
}

/// (kind/name#rule of the route taken, backends or the answer).
fn route_for(t: &RouteTable, client_namespace: &str, req: &http::Request<()>) -> (String, String) {
    let client = matching::Client {
        namespace: Some(client_namespace),
        labels: None,
    };
    let view = matching::RequestView::of(req, 80, client);
    let m = matching::find(t.routes_for(Some(client_namespace)), &view).expect("a route matches");
    let action = match &m.route.action {
        Action::Forward(b) => b
            .iter()
            .map(|b| {
                format!(
                    "{}{}={}",
                    b.name,
                    b.subset
                        .as_deref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    b.weight
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        Action::Redirect(r) => format!("redirect {}", r.status),
        Action::Respond { status, .. } => format!("respond {status}"),
    };
    (m.route.source.to_string(), action)
}

#[test]
fn the_node_accepts_every_compiled_table_and_routes_as_the_examples_say() {
    let t = tables();
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        [
            "demo/helloworld",
            "demo/httpbin",
            "demo/whoami",
            "demo/whoami-v1",
            "demo/whoami-v2"
        ]
    );

    let hello = &t["demo/helloworld"];
    let firefox = request(
        "/",
        &[(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0",
        )],
    );
    assert_eq!(route_for(hello, "demo", &firefox).1, "helloworld/v1-1=100");
    assert_eq!(
        route_for(hello, "demo", &request("/", &[("user-agent", "curl/8.0")])).1,
        "helloworld/v1-0=100"
    );

    let whoami = &t["demo/whoami"];
    assert_eq!(
        route_for(whoami, "demo", &request("/v2/api", &[])).0,
        "HTTPRoute/demo/whoami-rewrite#0"
    );
    assert_eq!(
        route_for(whoami, "demo", &request("/", &[("x-canary", "true")])).1,
        "whoami-v2=1"
    );
    assert_eq!(
        route_for(whoami, "demo", &request("/", &[])).1,
        "whoami-v1=90,whoami-v2=10"
    );
    // The consumer route: clients in namespace client only.
    assert_eq!(
        route_for(whoami, "client", &request("/", &[])).0,
        "HTTPRoute/client/mine#0"
    );

    let httpbin = &t["demo/httpbin"].routes[0];
    assert_eq!(
        (
            httpbin.mirrors[0].backend.subset.as_deref(),
            httpbin.mirrors[0].per_million
        ),
        (Some("v2"), 1_000_000)
    );

    let v1 = &t["demo/whoami-v1"];
    let api = request(
        "/api/v2/items?debug=1",
        &[("x-env", "prod"), ("x-user", "alice")],
    );
    let mut post = api;
    *post.method_mut() = http::Method::POST;
    assert_eq!(
        route_for(v1, "demo", &post),
        (
            "HTTPRoute/demo/everything#0".into(),
            "whoami-v1=3,missing=0".into()
        )
    );
    assert_eq!(
        route_for(v1, "demo", &request("/old/x", &[])).1,
        "redirect 308"
    );
    assert_eq!(
        route_for(v1, "demo", &request("/none", &[])).1,
        "respond 500"
    );

    let v2 = &t["demo/whoami-v2"];
    assert_eq!(
        route_for(v2, "demo", &request("/", &[("x-teapot", "yes")])).1,
        "respond 418"
    );
    assert_eq!(route_for(v2, "demo", &request("/", &[])).1, "redirect 302");
    let first = &v2.routes[0];
    assert_eq!(
        first.timeouts.request,
        Some(std::time::Duration::from_millis(500))
    );
    assert_eq!(
        first.retry.as_ref().map(|r| (r.attempts, r.codes.clone())),
        Some((3, vec![503]))
    );
    assert_eq!(
        first
            .fault
            .as_ref()
            .and_then(|f| f.abort_grpc_status.clone())
            .as_deref(),
        Some("UNAVAILABLE")
    );
}
