use super::*;

const ROOT: &str = "mesh-system";

fn ap(yaml: &str) -> crd::AuthorizationPolicy {
    serde_saphyr::from_str(yaml).expect("test YAML parses")
}

fn pa(yaml: &str) -> crd::PeerAuthentication {
    serde_saphyr::from_str(yaml).expect("test YAML parses")
}

fn ap_err(yaml: &str) -> Error {
    authorization_policy(&ap(yaml), ROOT).expect_err("policy must be rejected")
}

#[test]
fn istio_shaped_policy_translates_every_field() {
    let p = ap(r#"
apiVersion: security.mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: demo, annotations: {istio.io/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: whoami}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/frontend", "*/sa/admin"]
        notNamespaces: ["kube-*"]
        ipBlocks: ["198.18.0.0/16", "198.18.1.10"]
    to:
    - operation: {ports: ["8080"], notPorts: ["9090"], methods: [GET], paths: ["/api/*"], hosts: ["whoami.demo"]}
    when:
    - key: request.headers[x-user]
      values: [alice]
"#);
    let got = authorization_policy(&p, ROOT).expect("valid");
    assert_eq!(got.scope, Scope::Workload);
    assert_eq!(got.action, Action::Deny);
    assert!(got.dry_run);
    assert_eq!(got.selector.get("app").map(String::as_str), Some("whoami"));
    let r = &got.rules[0];
    assert_eq!(r.from[0].principals, ["cluster.local/ns/demo/sa/frontend", "*/sa/admin"]);
    assert_eq!(r.from[0].not_namespaces, ["kube-*"]);
    assert_eq!(r.from[0].ip_blocks[1].to_string(), "198.18.1.10/32");
    assert_eq!(r.to[0].ports, [8080]);
    assert_eq!(r.to[0].not_ports, [9090]);
    assert_eq!(r.to[0].paths, ["/api/*"]);
    assert_eq!(r.when[0].values, ["alice"]);
}

#[test]
fn scope_follows_namespace_and_selector() {
    let mesh = ap("metadata: {name: a, namespace: mesh-system}\nspec: {}");
    assert_eq!(authorization_policy(&mesh, ROOT).expect("valid").scope, Scope::Mesh);
    let ns = ap("metadata: {name: a, namespace: demo}\nspec: {action: ALLOW}");
    let got = authorization_policy(&ns, ROOT).expect("valid");
    assert_eq!((got.scope, got.action, got.dry_run), (Scope::Namespace, Action::Allow, false));
    let empty_selector = ap("metadata: {name: a, namespace: demo}\nspec: {selector: {matchLabels: {}}}");
    assert_eq!(authorization_policy(&empty_selector, ROOT).expect("valid").scope, Scope::Namespace);
}

#[test]
fn bad_principals_are_rejected_with_their_field_path() {
    for bad in ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/a", "a*b*", "cluster.local/ns/A_B/sa/x", "td/ns//sa/x"] {
        let e = ap_err(&format!(
            "metadata: {{name: a, namespace: demo}}\nspec:\n  rules:\n  - from:\n    - source: {{principals: [ok/ns/a/sa/b, \"{bad}\"]}}"
        ));
        assert_eq!(e.reason(), "InvalidPrincipal", "{bad}: {e}");
        assert!(e.to_string().contains("spec.rules[0].from[0].source.principals[1]"), "{e}");
    }
}

#[test]
fn ports_out_of_range_and_non_numeric_are_rejected() {
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - to:\n    - operation: {ports: [\"70000\"]}");
    assert_eq!(e, Error::PortOutOfRange { field: "spec.rules[0].to[0].operation.ports[0]".into(), value: 70000 });
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - to:\n    - operation: {notPorts: [\"0\"]}");
    assert_eq!(e.reason(), "PortOutOfRange");
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - to:\n    - operation: {ports: [http]}");
    assert_eq!(e.reason(), "InvalidPort");
}

#[test]
fn unknown_action_mode_ip_block_path_condition_and_annotation_are_rejected() {
    assert_eq!(ap_err("metadata: {name: a, namespace: demo}\nspec: {action: CUSTOM}").reason(), "UnknownAction");
    assert_eq!(ap_err("metadata: {name: a, namespace: demo}\nspec: {action: allow}").reason(), "UnknownAction");
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {notIpBlocks: [\"10.0.0.0/33\"]}");
    assert_eq!(e.reason(), "InvalidIpBlock");
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - to:\n    - operation: {paths: [api]}");
    assert_eq!(e.reason(), "InvalidPath");
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - when:\n    - key: source.ip");
    assert_eq!(e.reason(), "InvalidCondition");
    let e = ap_err("metadata: {name: a, namespace: demo, annotations: {istio.io/dry-run: \"yes\"}}\nspec: {}");
    assert_eq!(e.reason(), "InvalidAnnotation");
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {namespaces: [\"Demo\"]}");
    assert_eq!(e.reason(), "InvalidNamespace");
    let e = ap_err("metadata: {name: a, namespace: demo}\nspec: {selector: {matchLabels: {\"app\": \"-bad\"}}}");
    assert_eq!(e.reason(), "InvalidSelector");
}

#[test]
fn peer_authentication_modes_and_port_levels() {
    let p = pa("metadata: {name: p, namespace: demo}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: DISABLE}");
    let got = peer_authentication(&p, ROOT).expect("valid");
    assert_eq!((got.scope, got.mode), (Scope::Workload, MtlsMode::Strict));
    assert_eq!(got.port_level.get(&8080), Some(&MtlsMode::Disable));
    let p = pa("metadata: {name: p, namespace: demo}\nspec: {mtls: {mode: STRICTEST}}");
    assert_eq!(peer_authentication(&p, ROOT).expect_err("bad mode").reason(), "UnknownMode");
    let p = pa("metadata: {name: p, namespace: demo}\nspec:\n  portLevelMtls:\n    \"99999\": {mode: STRICT}");
    assert_eq!(peer_authentication(&p, ROOT).expect_err("bad port").reason(), "PortOutOfRange");
}

#[test]
fn conflicting_peer_authentications_reject_the_younger_and_keep_the_rest() {
    let older = pa("metadata: {name: b-older, namespace: demo, creationTimestamp: \"2026-01-01T00:00:00Z\"}\nspec: {mtls: {mode: STRICT}}");
    let younger = pa("metadata: {name: a-younger, namespace: demo, creationTimestamp: \"2026-02-01T00:00:00Z\"}\nspec: {mtls: {mode: PERMISSIVE}}");
    let other_ns = pa("metadata: {name: c, namespace: other}\nspec: {mtls: {mode: STRICT}}");
    let bad = ap("metadata: {name: bad, namespace: demo}\nspec: {action: NOPE}");
    let good = ap("metadata: {name: good, namespace: demo}\nspec: {action: DENY}");
    // Input order must not matter.
    let got = policies(&[bad, good], &[younger, other_ns, older], &[], ROOT);
    let keys: Vec<String> = got.peer_authentication.keys().map(ToString::to_string).collect();
    assert_eq!(keys, ["demo/b-older", "other/c"]);
    assert_eq!(got.authorization.keys().map(ToString::to_string).collect::<Vec<_>>(), ["demo/bad", "demo/good"], "the invalid one is enforced, closed");
    let rejected: Vec<(String, &str)> = got
        .verdicts
        .iter()
        .filter_map(|v| v.result.as_ref().err().map(|e| (v.key.to_string(), e.reason())))
        .collect();
    assert_eq!(rejected, [("demo/bad".into(), "UnknownAction"), ("demo/a-younger".into(), "ConflictingSelector")]);
    assert_eq!(got.verdicts.len(), 5);
}

#[test]
fn condition_keys_are_istios_and_unknown_ones_are_named() {
    let with_key = |key: &str| format!("metadata: {{name: a, namespace: demo}}\nspec:\n  rules:\n  - when:\n    - key: \"{key}\"\n      values: [x]\n");
    for key in ["request.headers[x-user]", "source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip", "destination.port", "request.auth.claims[iss]", "request.auth.principal", "connection.sni"] {
        assert!(authorization_policy(&ap(&with_key(key)), ROOT).is_ok(), "{key} is one of Istio's keys");
    }
    for key in ["request.header[x-user]", "request.headers[]", "source.user", "destination.host"] {
        let e = ap_err(&with_key(key));
        assert_eq!(e.reason(), "UnknownConditionKey", "{key}");
        assert!(e.to_string().starts_with("spec.rules[0].when[0].key: unknown condition key"), "{e}");
    }
}

#[test]
fn an_authorization_policy_that_cannot_be_applied_fails_closed() {
    // An Istio field this mesh does not implement and a principal with the spiffe:// prefix
    // typo: each used to be pruned or dropped, leaving the workloads open to every client.
    let jwt_only = ap("metadata: {name: jwt, namespace: demo}\nspec:\n  selector: {matchLabels: {app: api}}\n  rules:\n  - from:\n    - source: {notRemoteIpBlocks: [10.0.0.0/8]}\n");
    let typo = ap("metadata: {name: typo, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"spiffe://cluster.local/ns/demo/sa/client\"]}\n");
    let bad_deny = ap("metadata: {name: deny, namespace: demo}\nspec:\n  action: DENY\n  selector: {matchLabels: {app: db}}\n  rules:\n  - from:\n    - source: {remoteIpBlocks: [10.0.0.0/8]}\n");
    let got = policies(&[jwt_only, typo, bad_deny], &[], &[], ROOT);
    let jwt = &got.authorization[&NamespacedName::new("demo", "jwt")];
    assert_eq!((jwt.action, jwt.rules.len(), jwt.scope, jwt.selector.get("app").map(String::as_str)), (Action::Allow, 0, Scope::Workload, Some("api")), "ALLOW that matches nothing, on its workloads");
    let typo = &got.authorization[&NamespacedName::new("demo", "typo")];
    assert_eq!((typo.action, typo.rules.len(), typo.scope), (Action::Allow, 0, Scope::Namespace));
    let deny = &got.authorization[&NamespacedName::new("demo", "deny")];
    assert_eq!((deny.action, deny.rules.clone()), (Action::Deny, vec![model::Rule::default()]), "DENY of everything");
    let messages: Vec<(String, &str, String)> = got.verdicts.iter().map(|v| (v.key.to_string(), v.result.as_ref().err().map_or("", Error::reason), v.message())).collect();
    assert_eq!(messages[0].1, "UnsupportedField");
    assert!(messages[0].2.starts_with("spec.rules[0].from[0].source.notRemoteIpBlocks: not supported") && messages[0].2.ends_with("(fails closed)"), "{messages:?}");
    assert_eq!(messages[1].1, "InvalidPrincipal");
    assert!(messages[2].2.contains("enforced as a DENY of every request to its workloads"), "{messages:?}");
}

fn ra(yaml: &str) -> crd::Read<crd::RequestAuthentication> {
    let value: serde_json::Value = serde_saphyr::from_str(yaml).expect("test YAML parses");
    crd::read(&value).expect("reads")
}

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k","x":"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis","y":"y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}]}"#;

#[test]
fn request_authentication_translates_istios_fields() {
    let r = ra(&format!(
        r#"
apiVersion: security.mesh.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: https://idp.example
    audiences: [orders]
    jwksUri: https://idp.example/.well-known/jwks.json
    fromHeaders: [{{name: x-jwt, prefix: "Token "}}]
    fromParams: [token]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{{header: x-sub, claim: sub}}]
  - issuer: other
    jwks: '{JWKS}'
"#
    ));
    let got = policies(&[], &[], &[r], ROOT);
    assert!(got.verdicts.iter().all(|v| v.result.is_ok()), "{:?}", got.verdicts);
    let p = &got.request_authentication[&NamespacedName::new("demo", "jwt")];
    assert_eq!((p.scope, p.rules.len()), (Scope::Workload, 2));
    let r = &p.rules[0];
    assert_eq!(r.jwks, model::Jwks::Uri("https://idp.example/.well-known/jwks.json".into()));
    assert_eq!(r.from_headers, vec![("x-jwt".to_owned(), "Token ".to_owned())]);
    assert!(r.forward_original_token);
    assert_eq!(r.output_claim_to_headers, vec![("x-sub".to_owned(), "sub".to_owned())]);
    assert!(matches!(p.rules[1].jwks, model::Jwks::Inline(_)));
}

#[test]
fn request_authentication_errors_name_the_field() {
    let cases = [
        ("  - issuer: a\n    jwksUri: https://a/k\n    timeout: 5s\n", "spec.jwtRules[0].timeout: unknown field"),
        ("  - jwksUri: https://a/k\n", "spec.jwtRules[0].issuer: an issuer is required"),
        ("  - issuer: a\n", "spec.jwtRules[0].jwksUri: not supported: OpenID discovery"),
        ("  - issuer: a\n    jwksUri: https://a/k\n    jwks: '{}'\n", "spec.jwtRules[0].jwks: set one of jwks and jwksUri"),
        ("  - issuer: a\n    jwks: '{\"keys\": []}'\n", "spec.jwtRules[0].jwks: the JWK set has no key"),
        ("  - issuer: a\n    jwksUri: ftp://a/k\n", "spec.jwtRules[0].jwksUri: \"ftp://a/k\" must be an http:// or https:// URI"),
        ("  - issuer: a\n    jwksUri: https://a/k\n    fromHeaders: [{name: \"bad header\"}]\n", "spec.jwtRules[0].fromHeaders[0].name: \"bad header\" is not a header name"),
        ("  - issuer: a\n    jwksUri: https://a/k\n  - issuer: a\n    jwksUri: https://b/k\n", "spec.jwtRules[1].issuer: issuer \"a\" appears in two rules"),
    ];
    for (rules, want) in cases {
        let r = ra(&format!("apiVersion: security.mesh.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: demo}}\nspec:\n  jwtRules:\n{rules}"));
        let got = policies(&[], &[], &[r], ROOT);
        let v = &got.verdicts[0];
        assert!(v.message().starts_with(want), "want {want:?}, got {:?}", v.message());
        assert!(v.message().contains("policies requiring one deny them"), "says what is enforced instead: {}", v.message());
        assert!(got.request_authentication.is_empty());
    }
}

#[test]
fn request_principals_are_checked() {
    let ok = ap("metadata: {name: p, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\", \"https://idp/alice\", \"https://idp/*\"], notRequestPrincipals: [\"*@evil\"]}\n");
    let got = authorization_policy(&ok, ROOT).expect("valid");
    assert_eq!(got.rules[0].from[0].request_principals.len(), 3);
    let e = ap_err("metadata: {name: p, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {requestPrincipals: [\"alice\"]}\n");
    assert_eq!(e.reason(), "InvalidRequestPrincipal");
    assert!(e.to_string().starts_with("spec.rules[0].from[0].source.requestPrincipals[0]"), "{e}");
}

fn telemetry_of(yaml: &str) -> crd::Read<crd::telemetry::Telemetry> {
    let value: serde_json::Value = serde_saphyr::from_str(yaml).expect("test YAML parses");
    crd::read(&value).expect("reads")
}

const MESH_CONFIG: &str = "
extensionProviders:
- name: zipkin
  zipkin: {service: zipkin.mesh-system.svc.cluster.local, port: 9411}
- name: otel
  opentelemetry: {service: otel.observability, port: 4317}
- name: otel-http
  opentelemetry: {service: otel.observability, port: 4318, http: {path: /v1/traces}}
- name: sky
  skywalking: {service: sky.observability, port: 11800}
defaultProviders:
  tracing: [zipkin]
";

fn mesh() -> telemetry::MeshConfigCheck {
    telemetry::mesh_config(&crate::manifest::mesh_config(MESH_CONFIG).expect("mesh config parses"))
}

#[test]
fn mesh_config_keeps_zipkin_and_otlp_and_names_what_it_refuses() {
    let m = mesh();
    assert_eq!(m.config.tracing_providers.keys().collect::<Vec<_>>(), ["otel", "zipkin"]);
    assert_eq!(m.config.tracing_providers["zipkin"].protocol, model::TraceProtocol::Zipkin { path: "/api/v2/spans".into() });
    assert_eq!(m.config.tracing_providers["zipkin"].port, 9411);
    assert_eq!(m.config.default_tracing_provider.as_deref(), Some("zipkin"));
    assert!(m.refused["otel-http"].contains("OTLP over HTTP is not exported"), "{:?}", m.refused);
    assert!(m.refused["sky"].contains("\"skywalking\" is not supported"), "{:?}", m.refused);
    let err = crate::manifest::mesh_config("extensionProviders: []\nenableTracing: true\n").expect_err("unknown key");
    assert!(err.contains("enableTracing"), "{err}");
}

#[test]
fn telemetry_translates_istios_tracing_fields() {
    let t = telemetry_of(
        "apiVersion: telemetry.mesh.dev/v1alpha1
kind: Telemetry
metadata: {name: t, namespace: demo}
spec:
  selector: {matchLabels: {app: whoami}}
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 12.5
    customTags:
      team: {literal: {value: payments}}
      user: {header: {name: X-User, defaultValue: anonymous}}
      pod: {environment: {name: POD_NAME}}
  - match: {mode: SERVER}
    disableSpanReporting: true
  accessLogging:
  - disabled: true
",
    );
    let got = telemetry::telemetry(&t, &mesh(), "mesh-system").expect("valid");
    assert_eq!(got.scope, Scope::Workload);
    assert_eq!(got.access_log_disabled, Some(true));
    assert_eq!(got.tracing.len(), 2);
    let r = &got.tracing[0];
    assert_eq!((r.mode, r.provider.as_deref(), r.sampling_ppm), (model::TracingMode::ClientAndServer, Some("otel"), Some(125_000)));
    assert_eq!(r.custom_tags["team"], model::CustomTag::Literal("payments".into()));
    assert_eq!(r.custom_tags["user"], model::CustomTag::Header { name: "x-user".into(), default: Some("anonymous".into()) });
    assert_eq!(r.custom_tags["pod"], model::CustomTag::Environment { name: "POD_NAME".into(), default: None });
    assert_eq!((got.tracing[1].mode, got.tracing[1].disable_span_reporting), (model::TracingMode::Server, Some(true)));
}

#[test]
fn telemetry_refusals_name_the_field() {
    let cases = [
        ("tracing: [{providers: [{name: nope}]}]", "spec.tracing[0].providers[0]: no tracing provider \"nope\""),
        ("tracing: [{providers: [{name: sky}]}]", "provider \"sky\" is refused in the mesh config"),
        ("tracing: [{providers: [{name: zipkin}, {name: otel}]}]", "spec.tracing[0].providers: one provider per tracing entry"),
        ("tracing: [{randomSamplingPercentage: 101}]", "spec.tracing[0].randomSamplingPercentage: 101 is outside 0-100"),
        ("tracing: [{match: {mode: BOTH}}]", "spec.tracing[0].match.mode: unknown mode \"BOTH\""),
        ("tracing: [{}, {match: {mode: CLIENT_AND_SERVER}}]", "spec.tracing[1].match.mode: two tracing entries"),
        ("tracing: [{customTags: {t: {literal: {value: a}, header: {name: b}}}}]", "spec.tracing[0].customTags[t]: set exactly one"),
        ("accessLogging: [{providers: [{name: otel}]}]", "spec.accessLogging[0].providers: provider \"otel\""),
        ("metrics: [{providers: [{name: prometheus}]}]", "spec.metrics: unknown field"),
    ];
    for (spec, want) in cases {
        let t = telemetry_of(&format!("apiVersion: telemetry.mesh.dev/v1alpha1\nkind: Telemetry\nmetadata: {{name: t, namespace: demo}}\nspec:\n  {spec}\n"));
        let e = telemetry::telemetry(&t, &mesh(), "mesh-system").expect_err(spec);
        assert!(e.to_string().starts_with(want) || e.to_string().contains(want), "{spec}: {e}");
    }
}
