use super::*;
use crate::{
    crd::{self, Read, gateway as gw, networking as net},
    routing::model::StringMatch,
};

fn read<K: serde::de::DeserializeOwned + serde::Serialize>(yaml: &str) -> Read<K> {
    let v: serde_json::Value = serde_saphyr::from_str(yaml).expect("test YAML parses");
    crd::read(&v).expect("fits the type")
}

fn http(yaml: &str) -> Result<GatewayRoute, Error> {
    gateway::http_route(&read::<gw::HttpRoute>(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: demo}}\n{yaml}"
    )))
}

fn vs(yaml: &str) -> Result<VirtualService, Error> {
    istio::virtual_service(&read::<net::VirtualService>(&format!(
        "apiVersion: networking.mesh.dev/v1alpha1\nkind: VirtualService\nmetadata: {{name: v, namespace: demo}}\n{yaml}"
    )))
}

const PARENT: &str =
    "spec:\n  parentRefs: [{group: \"\", kind: Service, name: whoami, port: 80}]\n";

#[test]
fn an_httproute_keeps_every_field_with_upstream_defaults() {
    let r = http(&format!(
        r#"{PARENT}  hostnames: [whoami.demo.svc.cluster.local]
  rules:
  - name: api
    matches:
    - path: {{type: Exact, value: /api}}
      method: GET
      headers: [{{name: X-User, value: alice}}, {{type: RegularExpression, name: x-env, value: "prod|stage"}}]
      queryParams: [{{name: debug, value: "1"}}]
    - headers: [{{name: x-canary, value: "yes"}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: X-A, value: "1"}}], add: [{{name: x-b, value: "2"}}], remove: [X-C]}}
    - type: URLRewrite
      urlRewrite: {{hostname: other.demo, path: {{type: ReplaceFullPath, replaceFullPath: /v2}}}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: shadow, port: 80}}, fraction: {{numerator: 1, denominator: 4}}}}
    backendRefs:
    - {{name: whoami-v1, port: 80, weight: 90}}
    - name: whoami-v2
      port: 80
      filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-version, value: v2}}]}}}}]
    timeouts: {{request: 10s, backendRequest: 500ms}}
    retry: {{attempts: 3, codes: [503], backoff: 100ms}}
"#
    ))
    .expect("valid");
    assert_eq!(r.id.key, NamespacedName::new("demo", "r"));
    assert!(matches!(
        &r.parents[0].target,
        ParentTarget::Service {
            port: Some(80),
            section: None,
            ..
        }
    ));
    let rule = &r.rules[0];
    assert_eq!(rule.name.as_deref(), Some("api"));
    let m0 = &rule.matches[0];
    assert_eq!(m0.path, Some(StringMatch::Exact("/api".into())));
    assert_eq!(m0.method, Some(StringMatch::Exact("GET".into())));
    assert_eq!(m0.headers[0].name, "x-user", "header names are lower-cased");
    assert_eq!(m0.headers[1].value, StringMatch::Regex("prod|stage".into()));
    assert_eq!(m0.query_params[0].name, "debug");
    assert_eq!(
        rule.matches[1].path,
        Some(StringMatch::PathPrefix("/".into())),
        "a match without a path is PathPrefix /"
    );
    assert_eq!(
        rule.request_headers.set,
        [("x-a".to_owned(), "1".to_owned())]
    );
    assert_eq!(rule.request_headers.remove, ["x-c"]);
    assert_eq!(
        rule.rewrite.as_ref().and_then(|r| r.hostname.as_deref()),
        Some("other.demo")
    );
    assert_eq!(rule.mirrors[0].1, 250_000, "1/4 in millionths");
    assert_eq!(rule.mirrors[0].0.port, Some(80));
    assert_eq!(
        (rule.backends[0].weight, rule.backends[1].weight),
        (90, 1),
        "weight defaults to 1"
    );
    assert_eq!(
        rule.backends[1].response_headers.set,
        [("x-version".to_owned(), "v2".to_owned())]
    );
    assert_eq!(
        (
            rule.backends[0].group.as_str(),
            rule.backends[0].kind.as_str()
        ),
        ("", "Service")
    );
    assert_eq!(rule.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(
        rule.timeouts.backend_request,
        Some(Duration::from_millis(500))
    );
    let retry = rule.retry.as_ref().expect("retry carried");
    assert_eq!(
        (retry.attempts, retry.codes.as_slice(), retry.backoff),
        (3, &[503][..], Some(Duration::from_millis(100)))
    );
    assert_eq!(
        r.notes,
        [
            "spec.hostnames: not matched: a route attached to a Service applies to every request sent to the Service, whatever its Host"
        ]
    );
}

#[test]
fn a_rule_without_matches_matches_every_request_and_0s_disables_a_timeout() {
    let r = http(&format!("{PARENT}  rules:\n  - backendRefs: [{{name: whoami, port: 80}}]\n    timeouts: {{request: 0s}}\n")).expect("valid");
    assert_eq!(
        r.rules[0].matches,
        [Match {
            path: Some(StringMatch::PathPrefix("/".into())),
            ..Match::default()
        }]
    );
    assert_eq!(r.rules[0].timeouts.request, None);
}

/// (rule YAML under `rules:`, field the error must name, reason).
#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn invalid_httproutes_are_rejected_naming_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "- matches: [{path: {value: /a}}, {path: {type: RegularExpression, value: \"(\"}}]",
            "spec.rules[0].matches[1].path.value: regex \"(\" is invalid",
            "InvalidRegex",
        ),
        (
            "- matches: [{path: {type: Exact, value: api}}]",
            "spec.rules[0].matches[0].path.value: path \"api\" must start with /",
            "InvalidPath",
        ),
        (
            "- matches: [{path: {value: /a//b}}]",
            "spec.rules[0].matches[0].path.value",
            "InvalidPath",
        ),
        (
            "- matches: [{path: {type: Prefix, value: /a}}]",
            "spec.rules[0].matches[0].path.type: unknown value \"Prefix\"",
            "UnknownValue",
        ),
        (
            "- matches: [{method: FETCH}]",
            "spec.rules[0].matches[0].method",
            "UnknownValue",
        ),
        (
            "- matches: [{headers: [{name: \"bad header\", value: x}]}]",
            "spec.rules[0].matches[0].headers[0].name",
            "InvalidHeader",
        ),
        (
            "- matches: [{headers: [{name: X-A, value: x}, {name: x-a, value: z}]}]",
            "spec.rules[0].matches[0].headers: \"x-a\" is listed twice",
            "Duplicate",
        ),
        (
            "- matches: [{queryParams: [{type: RegularExpression, name: q, value: \"[\"}]}]",
            "spec.rules[0].matches[0].queryParams[0].value",
            "InvalidRegex",
        ),
        (
            "- timeouts: {request: \"10\"}",
            "spec.rules[0].timeouts.request: \"10\" is not a duration",
            "InvalidDuration",
        ),
        (
            "- timeouts: {request: 1.5s}",
            "spec.rules[0].timeouts.request",
            "InvalidDuration",
        ),
        (
            "- timeouts: {request: 100000s}",
            "spec.rules[0].timeouts.request",
            "InvalidDuration",
        ),
        (
            "- timeouts: {request: 1s, backendRequest: 2s}",
            "spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request",
            "Conflict",
        ),
        (
            "- retry: {codes: [200]}",
            "spec.rules[0].retry.codes[0]: 200 is out of range 400-599",
            "OutOfRange",
        ),
        (
            "- retry: {backoff: soon}",
            "spec.rules[0].retry.backoff",
            "InvalidDuration",
        ),
        (
            "- filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]",
            "spec.rules[0].filters[0].requestRedirect.statusCode: unknown value \"305\"",
            "UnknownValue",
        ),
        (
            "- filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]",
            "spec.rules[0].filters[0].requestRedirect.scheme",
            "UnknownValue",
        ),
        (
            "- filters: [{type: RequestRedirect, requestRedirect: {hostname: \"not a host\"}}]",
            "spec.rules[0].filters[0].requestRedirect.hostname",
            "InvalidHostname",
        ),
        (
            "- filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]",
            "spec.rules[0].filters: RequestRedirect and URLRewrite",
            "IncompatibleFilters",
        ),
        (
            "- matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]",
            "spec.rules[0].filters: ReplacePrefixMatch needs every match of the rule to be a PathPrefix match, and spec.rules[0].matches[0] is not",
            "Conflict",
        ),
        (
            "- filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]",
            "spec.rules[0].filters[0].urlRewrite.path: replaceFullPath is required",
            "MissingField",
        ),
        (
            "- filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: \"1\"}, {name: A, value: \"2\"}]}}]",
            "spec.rules[0].filters[0].requestHeaderModifier.set: \"a\" is listed twice",
            "Duplicate",
        ),
        (
            "- filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]",
            "spec.rules[0].filters: \"RequestHeaderModifier\" is listed twice",
            "Duplicate",
        ),
        (
            "- filters: [{type: RequestHeaderModifier, responseHeaderModifier: {}}]",
            "spec.rules[0].filters[0]: type RequestHeaderModifier must not set",
            "Conflict",
        ),
        (
            "- filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, percent: 101}}]",
            "spec.rules[0].filters[0].requestMirror.percent: 101 is out of range 0-100",
            "OutOfRange",
        ),
        (
            "- filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, percent: 5, fraction: {numerator: 1}}}]",
            "spec.rules[0].filters[0].requestMirror: set percent or fraction",
            "Conflict",
        ),
        (
            "- filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, fraction: {numerator: 5, denominator: 4}}}]",
            "spec.rules[0].filters[0].requestMirror.fraction.numerator",
            "OutOfRange",
        ),
        (
            "- filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: F, name: f}}]",
            "spec.rules[0].filters[0].type: not supported: ExtensionRef",
            "UnsupportedField",
        ),
        (
            "- filters: [{type: CORS}]",
            "spec.rules[0].filters[0].type: unknown value \"CORS\"",
            "UnknownValue",
        ),
        (
            "- backendRefs: [{name: whoami}]",
            "spec.rules[0].backendRefs[0].port: a port (for a Service backend) is required",
            "MissingField",
        ),
        (
            "- backendRefs: [{name: whoami, port: 80, weight: 1000001}]",
            "spec.rules[0].backendRefs[0].weight",
            "OutOfRange",
        ),
        (
            "- backendRefs: [{name: whoami, port: 0}]",
            "spec.rules[0].backendRefs[0].port: 0 is out of range 1-65535",
            "OutOfRange",
        ),
        (
            "- backendRefs: [{name: whoami, port: 80, filters: [{type: RequestRedirect, requestRedirect: {}}]}]",
            "spec.rules[0].backendRefs[0].filters[0].type: not supported: RequestRedirect filters here",
            "UnsupportedField",
        ),
        (
            "- sessionPersistence: {sessionName: s}",
            "spec.rules[0].sessionPersistence: not supported: session persistence",
            "UnsupportedField",
        ),
    ];
    for (rule, field, reason) in cases {
        let e = http(&format!("{PARENT}  rules:\n  {rule}\n")).expect_err(rule);
        assert!(
            e.to_string().starts_with(field),
            "{rule}:\n  got  {e}\n  want {field}..."
        );
        assert_eq!(e.reason(), *reason, "{rule}: {e}");
        let spec_reason = if *reason == "IncompatibleFilters" {
            "IncompatibleFilters"
        } else {
            "UnsupportedValue"
        };
        assert_eq!(
            e.gateway_reason(),
            spec_reason,
            "Gateway API status uses the spec's reasons"
        );
    }
    let e =
        http("spec:\n  parentRefs: [{group: \"\", kind: Service, name: whoami, port: 70000}]\n")
            .expect_err("port");
    assert_eq!(
        e.to_string(),
        "spec.parentRefs[0].port: 70000 is out of range 1-65535"
    );
}

#[test]
fn parent_refs_are_ours_when_they_name_a_service() {
    let r = http(
        "spec:\n  parentRefs:\n  - {group: \"\", kind: Service, name: a, namespace: other, sectionName: http}\n  - {name: my-gateway}\n  - {kind: Service, name: b}\n  - {group: \"\", kind: Pod, name: c}\n  - {group: multicluster.x-k8s.io, kind: ServiceImport, name: d}\n",
    )
    .expect("valid");
    let targets: Vec<&ParentTarget> = r.parents.iter().map(|p| &p.target).collect();
    assert!(
        matches!(targets[0], ParentTarget::Service { service, port: None, section: Some(s) } if service.to_string() == "other/a" && s == "http")
    );
    assert_eq!(
        *targets[1],
        ParentTarget::NotOurs,
        "a Gateway (the defaults) is a gateway implementation's"
    );
    assert!(
        matches!(targets[2], ParentTarget::Invalid { why } if why.contains("needs group \"\"")),
        "kind Service in the default group is a mistake worth telling"
    );
    assert!(matches!(targets[3], ParentTarget::Invalid { .. }));
    assert_eq!(*targets[4], ParentTarget::NotOurs);
    assert_eq!(
        r.parents[1].reference.name, "my-gateway",
        "parentRefs are echoed verbatim"
    );
}

#[test]
fn grpc_method_matches_become_path_matches() {
    let route = |method: &str| {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: demo}}\nspec:\n  rules:\n  - matches: [{{method: {method}, headers: [{{name: x-user, value: a}}]}}]\n"
        );
        gateway::grpc_route(&read::<gw::GrpcRoute>(&yaml))
    };
    let path = |method: &str| {
        route(method).expect("valid").rules[0].matches[0]
            .path
            .clone()
            .expect("a path")
    };
    assert_eq!(
        path("{service: helloworld.Greeter, method: SayHello}"),
        StringMatch::Exact("/helloworld.Greeter/SayHello".into())
    );
    assert_eq!(
        path("{service: helloworld.Greeter}"),
        StringMatch::PathPrefix("/helloworld.Greeter".into())
    );
    assert_eq!(
        path("{method: SayHello}"),
        StringMatch::Regex("/[^/]+/SayHello".into())
    );
    assert_eq!(
        path("{type: RegularExpression, service: \"hello.*\", method: \"Say.*\"}"),
        StringMatch::Regex("/(?:hello.*)/(?:Say.*)".into())
    );
    assert_eq!(
        path("{type: RegularExpression, service: \"hello.*\"}"),
        StringMatch::Regex("/(?:hello.*)/[^/]+".into())
    );
    assert_eq!(
        route("{service: helloworld.Greeter}").expect("valid").rules[0].matches[0].headers[0].name,
        "x-user"
    );
    let e = route("{service: \"hello/world\"}").expect_err("not a service name");
    assert!(
        e.to_string()
            .starts_with("spec.rules[0].matches[0].method.service"),
        "{e}"
    );
    let e = route("{type: RegularExpression, method: \"(\"}").expect_err("bad regex");
    assert!(
        e.to_string()
            .starts_with("spec.rules[0].matches[0].method.method: regex"),
        "{e}"
    );
    assert_eq!(
        route("{type: Exact}").expect_err("empty").reason(),
        "MissingField"
    );
    let redirect = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: demo}\nspec:\n  rules:\n  - filters: [{type: URLRewrite, urlRewrite: {}}]\n";
    let e = gateway::grpc_route(&read::<gw::GrpcRoute>(redirect)).expect_err("HTTP-only filter");
    assert!(
        e.to_string()
            .starts_with("spec.rules[0].filters[0].type: not supported: URLRewrite filters here"),
        "{e}"
    );
}

const CANARY: &str = r#"spec:
  hosts: [whoami]
  http:
  - name: firefox
    match:
    - headers:
        user-agent: {regex: ".*Firefox.*"}
    route:
    - destination: {host: whoami, subset: v1-1}
  - route:
    - destination: {host: whoami.demo.svc.cluster.local, subset: v1-0, port: {number: 80}}
"#;

#[test]
fn the_canary_virtualservice_gets_istio_defaults() {
    let v = vs(CANARY).expect("valid");
    assert_eq!(
        v.hosts,
        [(
            "spec.hosts[0]".to_owned(),
            NamespacedName::new("demo", "whoami")
        )],
        "a short host is in the VirtualService's namespace"
    );
    assert!(!v.own_namespace_only);
    let r0 = &v.rules[0];
    assert_eq!(r0.name.as_deref(), Some("firefox"));
    assert_eq!(
        r0.matches[0].headers[0].value,
        StringMatch::Regex(".*Firefox.*".into())
    );
    let VsAction::Route(d) = &r0.action else {
        panic!("a route")
    };
    assert_eq!(
        (d[0].subset.as_deref(), d[0].weight),
        (Some("v1-1"), 100),
        "one destination without a weight gets 100"
    );
    let VsAction::Route(d) = &v.rules[1].action else {
        panic!("a route")
    };
    assert_eq!(
        (d[0].service.to_string(), d[0].port),
        ("demo/whoami".into(), Some(80))
    );
    assert!(v.rules[1].matches.is_empty(), "no match: every request");
}

const EVERY_FIELD: &str = r#"spec:
  hosts: [whoami.demo, other.elsewhere.svc.cluster.local]
  gateways: [mesh]
  exportTo: ["."]
  http:
  - match:
    - uri: {prefix: /api}
      method: {exact: POST}
      withoutHeaders: {x-test: {}}
      queryParams: {v: {exact: "2"}}
      port: 8080
      sourceLabels: {app: client}
      sourceNamespace: client
    rewrite: {uri: /, authority: api.internal}
    headers:
      request: {set: {x-a: "1"}, remove: [x-b]}
      response: {add: {x-c: "2"}}
    route:
    - destination: {host: whoami}
      weight: 90
    - destination: {host: whoami, subset: canary}
      weight: 10
      headers: {response: {set: {x-canary: "true"}}}
    mirror: {host: shadow}
    mirrorPercentage: {value: 12.5}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,connect-failure,503"}
    fault:
      delay: {fixedDelay: 5s, percentage: {value: 10}}
      abort: {httpStatus: 503, percentage: {value: 1}}
    corsPolicy: {allowOrigins: [{exact: "https://example.com"}]}
  - redirect: {uri: /new, authority: new.demo, scheme: https, port: 8443}
  - directResponse: {status: 418, body: {string: teapot}}
"#;

#[test]
fn a_virtualservice_with_every_supported_field() {
    let v = vs(EVERY_FIELD).expect("valid");
    assert_eq!(v.hosts[1].1.to_string(), "elsewhere/other");
    assert!(v.own_namespace_only);
    let r = &v.rules[0];
    let m = &r.matches[0];
    assert_eq!(
        (m.path.clone(), m.method.clone(), m.port),
        (
            Some(StringMatch::Prefix("/api".into())),
            Some(StringMatch::Exact("POST".into())),
            Some(8080)
        )
    );
    assert!(
        m.headers[0].invert && m.headers[0].value == StringMatch::Present,
        "withoutHeaders with {{}}: not present"
    );
    assert_eq!(m.query_params[0].value, StringMatch::Exact("2".into()));
    assert_eq!(
        (
            m.source_labels.get("app").map(String::as_str),
            m.source_namespace.as_deref()
        ),
        (Some("client"), Some("client"))
    );
    assert_eq!(
        r.rewrite.as_ref().and_then(|w| w.path.clone()),
        Some(PathModifier::Prefix("/".into()))
    );
    assert_eq!(r.request_headers.remove, ["x-b"]);
    assert_eq!(r.response_headers.add, [("x-c".to_owned(), "2".to_owned())]);
    let VsAction::Route(d) = &r.action else {
        panic!("a route")
    };
    assert_eq!(d.iter().map(|d| d.weight).collect::<Vec<_>>(), [90, 10]);
    assert_eq!(
        d[1].response_headers.set,
        [("x-canary".to_owned(), "true".to_owned())]
    );
    assert_eq!(r.mirrors[0].1, 125_000);
    assert_eq!(r.timeouts.request, Some(Duration::from_millis(1500)));
    let retry = r.retry.as_ref().expect("retries");
    assert_eq!(
        (retry.attempts, retry.per_try_timeout),
        (3, Some(Duration::from_secs(2)))
    );
    assert_eq!(
        (retry.retry_on.as_slice(), retry.codes.as_slice()),
        (
            &["5xx".to_owned(), "connect-failure".to_owned()][..],
            &[503][..]
        )
    );
    let fault = r.fault.as_ref().expect("fault");
    assert_eq!(fault.delay, Some((100_000, Duration::from_secs(5))));
    assert_eq!(
        fault.abort.as_ref().map(|a| (a.per_million, a.http_status)),
        Some((10_000, Some(503)))
    );
    let VsAction::Redirect(rd) = &v.rules[1].action else {
        panic!("a redirect")
    };
    assert_eq!(
        (rd.status, rd.port, rd.path.clone()),
        (301, Some(8443), Some(PathModifier::Full("/new".into()))),
        "Istio's default redirect is 301"
    );
    assert_eq!(
        v.rules[2].action,
        VsAction::Respond {
            status: 418,
            body: "teapot".into()
        }
    );
    assert_eq!(
        v.notes,
        [
            "spec.http[0].corsPolicy: ignored: CORS is not implemented"
        ]
    );
}

#[test]
fn invalid_virtualservices_are_rejected_naming_the_field() {
    let http = "  http: [{route: [{destination: {host: whoami}}]}]\n";
    let cases: &[(String, &str, &str)] = &[
        (format!("spec:\n  hosts: [whoami]\n{http}  tcp: [{{route: [{{destination: {{host: db}}}}]}}]\n"), "spec.tcp: not supported: TCP routes", "UnsupportedField"),
        (format!("spec:\n  hosts: [whoami]\n{http}  tls: [{{}}]\n"), "spec.tls: not supported: TLS routes", "UnsupportedField"),
        (format!("spec:\n  hosts: [whoami]\n  gateways: [mesh, istio-system/ingress]\n{http}"), "spec.gateways[1]: not supported: gateway \"istio-system/ingress\"", "UnsupportedField"),
        (format!("spec:\n  hosts: [whoami]\n  exportTo: [other]\n{http}"), "spec.exportTo: not supported", "UnsupportedField"),
        (format!("spec:\n  hosts: [\"*.demo.svc.cluster.local\"]\n{http}"), "spec.hosts[0]: not supported: wildcard host", "UnsupportedField"),
        (format!("spec:\n  hosts: [example.com.external]\n{http}"), "spec.hosts[0]: not supported: host \"example.com.external\" is not a Service", "UnsupportedField"),
        ("spec:\n  hosts: [whoami]\n".into(), "spec.http: at least one HTTP route is required", "MissingField"),
        ("spec:\n  http: [{route: [{destination: {host: whoami}}]}]\n".into(), "spec.hosts: at least one host is required", "MissingField"),
        (
            "spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}, weight: 80}, {destination: {host: b}, weight: 10}]}]\n".into(),
            "spec.http[0].route: the weights add up to 90",
            "InvalidWeights",
        ),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a, subset: v1.1}}]}]\n".into(), "spec.http[0].route[0].destination.subset", "InvalidName"),
        ("spec:\n  hosts: [whoami]\n  http: [{match: [{headers: {user-agent: {regex: \"(\"}}}], route: [{destination: {host: a}}]}]\n".into(), "spec.http[0].match[0].headers[user-agent].regex: regex", "InvalidRegex"),
        ("spec:\n  hosts: [whoami]\n  http: [{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: a}}]}]\n".into(), "spec.http[0].match[0].uri: exact, prefix and regex exclude", "Conflict"),
        ("spec:\n  hosts: [whoami]\n  http: [{match: [{authority: {exact: x}}], route: [{destination: {host: a}}]}]\n".into(), "spec.http[0].match[0].authority: not supported: matching on the authority", "UnsupportedField"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], redirect: {uri: /x}}]\n".into(), "spec.http[0]: route, redirect and directResponse exclude each other", "Conflict"),
        ("spec:\n  hosts: [whoami]\n  http: [{redirect: {redirectCode: 304}}]\n".into(), "spec.http[0].redirect.redirectCode", "UnknownValue"),
        ("spec:\n  hosts: [whoami]\n  http: [{redirect: {derivePort: FROM_PROTOCOL_DEFAULT}}]\n".into(), "spec.http[0].redirect.derivePort: not supported", "UnsupportedField"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], timeout: soon}]\n".into(), "spec.http[0].timeout: \"soon\" is not a duration", "InvalidDuration"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], retries: {attempts: 2, retryOn: \"5xx,99\"}}]\n".into(), "spec.http[0].retries.retryOn[1]: 99 is out of range 100-599", "OutOfRange"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], retries: {attempts: 2, retryOn: \"5xx,retriable-headers\"}}]\n".into(), "spec.http[0].retries.retryOn[1]: unknown value \"retriable-headers\"", "UnknownValue"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], fault: {abort: {percentage: {value: 5}}}}]\n".into(), "spec.http[0].fault.abort: httpStatus or grpcStatus is required", "MissingField"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], fault: {abort: {grpcStatus: UNAVAIL, percentage: {value: 5}}}}]\n".into(), "spec.http[0].fault.abort.grpcStatus: unknown value \"UNAVAIL\"", "UnknownValue"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], mirror: {host: s}, mirrorPercentage: {value: 101}}]\n".into(), "spec.http[0].mirrorPercentage.value: 101 is out of range 0-100", "OutOfRange"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], rewrite: {uriRegexRewrite: {match: a, rewrite: b}}}]\n".into(), "spec.http[0].rewrite.uriRegexRewrite: not supported: regex rewrites", "UnsupportedField"),
        ("spec:\n  hosts: [whoami]\n  http: [{route: [{destination: {host: a}}], headers: {request: {set: {\"bad name\": x}}}}]\n".into(), "spec.http[0].headers.request.set[0].name", "InvalidHeader"),
    ];
    for (yaml, field, reason) in cases {
        let e = vs(yaml).expect_err(yaml);
        assert!(
            e.to_string().starts_with(field),
            "{yaml}\n  got  {e}\n  want {field}..."
        );
        assert_eq!(e.reason(), *reason, "{yaml}: {e}");
    }
}

#[test]
fn destination_rules_carry_subsets_and_their_traffic_policy() {
    let dr = |yaml: &str| {
        istio::destination_rule(&read::<net::DestinationRule>(&format!(
            "apiVersion: networking.mesh.dev/v1alpha1\nkind: DestinationRule\nmetadata: {{name: d, namespace: demo}}\n{yaml}"
        )))
    };
    let d = dr("spec:\n  host: whoami\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n  subsets:\n  - {name: v1-0, labels: {version: v1.0}}\n  - {name: v1-1, labels: {version: v1.1}, trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}}}\n").expect("valid");
    assert_eq!(d.host.to_string(), "demo/whoami");
    assert_eq!(d.subsets[1].0, "v1-1");
    assert_eq!(
        d.subsets[1].1.get("version").map(String::as_str),
        Some("v1.1")
    );
    assert_eq!(
        d.traffic_policy
            .as_ref()
            .and_then(|p| p.load_balancer.clone()),
        Some(crate::routing::model::LoadBalancer::RoundRobin)
    );
    assert_eq!(
        d.subset_policies["v1-1"]
            .connection_pool
            .as_ref()
            .and_then(|c| c.max_connections),
        Some(10)
    );
    assert!(d.notes.is_empty(), "{:?}", d.notes);
    assert_eq!(
        dr("spec:\n  host: whoami\n  subsets: [{name: a}, {name: a}]\n")
            .expect_err("dup")
            .to_string(),
        "spec.subsets: \"a\" is listed twice"
    );
    assert_eq!(
        dr("spec:\n  host: whoami\n  subsets: [{name: v1.0}]\n")
            .expect_err("name")
            .reason(),
        "InvalidName"
    );
    let e = dr("spec:\n  host: whoami\n  workloadSelector: {matchLabels: {app: x}}\n")
        .expect_err("unknown");
    assert!(
        e.to_string()
            .starts_with("spec.workloadSelector: not supported: workload selectors"),
        "{e}"
    );
}

#[test]
fn durations_follow_gep_2257_for_gateway_api_and_go_for_istio() {
    for (v, want) in [
        ("10s", Some(10_000)),
        ("500ms", Some(500)),
        ("1h2m", Some(3_720_000)),
        ("1h2m3s4ms", Some(3_723_004)),
        ("0s", None),
        ("0ms", None),
    ] {
        assert_eq!(
            gep_duration("f", v)
                .expect(v)
                .map(|d| u64::try_from(d.as_millis()).expect("fits")),
            want,
            "{v}"
        );
    }
    for bad in [
        "10",
        "1.5s",
        "1d",
        "100000s",
        "-1s",
        "",
        "1h2m3s4ms5s",
        "10 s",
    ] {
        let e = gep_duration("spec.x", bad).expect_err(bad);
        assert!(
            e.to_string()
                .starts_with(&format!("spec.x: {bad:?} is not a duration")),
            "{e}"
        );
    }
    for (v, want) in [
        ("1.5s", Some(1500)),
        ("0.5s", Some(500)),
        ("500ms", Some(500)),
        ("1m30s", Some(90_000)),
        ("0s", None),
    ] {
        assert_eq!(
            istio_duration("f", v)
                .expect(v)
                .map(|d| u64::try_from(d.as_millis()).expect("fits")),
            want,
            "{v}"
        );
    }
    for bad in ["-1s", "soon", "10"] {
        assert_eq!(
            istio_duration("f", bad).expect_err(bad).reason(),
            "InvalidDuration",
            "{bad}"
        );
    }
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let r = read::<net::VirtualService>(
        "metadata: {name: v, namespace: demo}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    timout: 5s\n  - route: [{destination: {host: a, subsett: x}}]\n",
    );
    assert_eq!(
        r.unknown_fields,
        [
            "spec.http[0].timout",
            "spec.http[1].route[0].destination.subsett"
        ]
    );
    let e = istio::virtual_service(&r).expect_err("unknown fields");
    assert_eq!(
        e.to_string(),
        "spec.http[0].timout: not supported: an Istio field the mesh does not implement (and spec.http[1].route[0].destination.subsett)"
    );
    // Empty values and free-form fields are not unknown; traffic policy fields are typed.
    let r = read::<net::DestinationRule>(
        "metadata: {name: d}\nspec: {host: a, exportTo: [], trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 7200s}}}, portLevelSettings: [{port: {number: 80}}]}}\n",
    );
    assert_eq!(r.unknown_fields, ["spec.trafficPolicy.portLevelSettings"]);
    let e = istio::destination_rule(&r).expect_err("unknown field");
    assert_eq!(
        e.to_string(),
        "spec.trafficPolicy.portLevelSettings: not supported: per-port traffic policies (the policy applies to every port of the host)"
    );
}
