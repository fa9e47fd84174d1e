//! End-user authentication through the whole mesh, applied as the repository's example file:
//! a `RequestAuthentication` whose `jwksUri` the node daemons fetch from a key server in the
//! lab, and an AuthorizationPolicy that needs a token's principal and claim on `/private/*`.
//! Real curl requests with tokens signed by generated ES256 keys: the JWT matrix (valid,
//! expired, wrong issuer, wrong audience, missing, wrong claim) and a key rotation at the server.

use std::time::Duration;

use mesh_l7::jwt::testing::{SigningKey, jwks, now};
use mesh_tests::{
    cluster::{VIP, write_atomic},
    tools,
};
use serde_json::{Value, json};

use super::{
    cluster, eventually,
    l7::{metrics, sample},
};

const REQUIRE_JWT: &str = include_str!("../../deploy/examples/policies/require-jwt.yaml");
const ISSUER: &str = "https://idp.mesh.test";
/// The key server: a plain HTTP server in the unmeshed pod on node 1, reached by both daemons.
const KEY_SERVER_POD: &str = "n1p3";
const KEY_SERVER_PORT: u16 = 8099;

fn claims(extra: &Value) -> Value {
    let mut c = json!({"iss": ISSUER, "sub": "alice", "aud": "whoami", "exp": now() + 600, "groups": ["dev"]});
    c.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
    c
}

#[test]
fn request_authentication_verifies_tokens_and_policies_read_their_principal_and_claims() {
    let mut c = cluster();
    let keys_dir = c.config_dir.parent().expect("base dir").join("jwks");
    std::fs::create_dir_all(&keys_dir).expect("jwks dir");
    let first = SigningKey::generate("first");
    write_atomic(&keys_dir.join("jwks.json"), &jwks(&[&first])).expect("write the key set");
    let dir = keys_dir.display().to_string();
    let port = KEY_SERVER_PORT.to_string();
    let (_server, _) = c
        .spawn_in_pod_logged(KEY_SERVER_POD, "jwks-server", "python3", &["-m", "http.server", &port, "--bind", "0.0.0.0", "--directory", &dir])
        .expect("start the key server");
    let uri = format!("http://{}:{KEY_SERVER_PORT}/jwks.json", c.lab.pod(KEY_SERVER_POD).ip);
    c.apply_policy("require-jwt", &REQUIRE_JWT.replace("http://jwks.demo.svc.cluster.local:8099/jwks.json", &uri)).expect("apply");

    let curl = tools::curl().expect("curl").display().to_string();
    // (status, body) of GET `path` with `token` as a bearer token.
    let get = |path: &str, token: Option<&str>| -> (String, String) {
        let url = format!("http://{VIP}{path}");
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec!["-sS", "--max-time", "5", "-o", "/dev/stderr", "-w", "%{http_code}", url.as_str()];
        if let Some(a) = &auth {
            args.extend(["-H", a.as_str()]);
        }
        let out = c.lab.run_in_pod("n1p1", &curl, &args).expect("curl");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let valid = first.sign(&claims(&json!({})));
    // Both daemons fetch the key set before the first token verifies on each. A 200 alone
    // proves nothing: before the policies arrive every request is allowed, token or not. So
    // first each node must have fetched the set (it fetches only once the policies name the
    // URI); the key server may start after the first attempt, and a retry follows in 2 s.
    let fetched_ok = |n: u8| sample(&metrics(&c, n), &["mesh_jwks_fetches_total{", "result=\"ok\""]);
    let mut last = (String::new(), String::new());
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually("the policies and the fetched keys on both nodes", Duration::from_secs(30), || {
            fetched_ok(1) >= 1.0
                && fetched_ok(2) >= 1.0
                && (0..6).all(|_| {
                    last = get("/private/x", Some(&valid));
                    last.0 == "200"
                })
        })
    }));
    if waited.is_err() {
        let logs: String = [1, 2].iter().map(|n| std::fs::read_to_string(c.node_log(*n)).unwrap_or_default()).collect();
        let jwt_lines: Vec<&str> = logs.lines().filter(|l| l.contains("JWK") || l.contains("jwks") || l.contains("refused")).take(20).collect();
        panic!("no valid token got through; the last answer: {last:?}; node logs: {jwt_lines:#?}");
    }

    let (status, body) = get("/private/x", Some(&valid));
    assert_eq!(status, "200", "{body}");
    let seen: Value = serde_json::from_str(&body).expect("the app's JSON");
    assert_eq!(seen["headers"]["x-jwt-sub"], "alice", "outputClaimToHeaders reached the app: {seen}");
    assert!(seen["headers"].get("authorization").is_none(), "the token is not forwarded by default: {seen}");

    let cases: [(&str, Option<String>, &str, &str); 6] = [
        ("no token, public path", None, "200", ""),
        ("no token, private path", None, "403", "RBAC: access denied"),
        ("expired", Some(first.sign(&claims(&json!({"exp": now() - 600})))), "401", "Jwt is expired"),
        ("wrong issuer", Some(first.sign(&claims(&json!({"iss": "https://evil.test"})))), "401", "Jwt issuer is not configured"),
        ("wrong audience", Some(first.sign(&claims(&json!({"aud": "billing"})))), "401", "Audiences in Jwt are not allowed"),
        ("valid, without the dev group", Some(first.sign(&claims(&json!({"groups": ["guest"]})))), "403", "RBAC: access denied"),
    ];
    for (what, token, want, want_body) in &cases {
        let path = if *what == "no token, public path" { "/public" } else { "/private/x" };
        // Several times: the Service's endpoints are on both nodes, each verifies on its own.
        for _ in 0..4 {
            let (status, body) = get(path, token.as_deref());
            assert_eq!(&status, want, "{what}: {body}");
            assert!(body.contains(want_body), "{what}: {body:?} should say {want_body:?}");
        }
    }
    let failures = |reason: &str| -> f64 {
        [1, 2].iter().map(|n| sample(&metrics(&c, *n), &["mesh_jwt_failures_total{", &format!("reason=\"{reason}\"")])).sum()
    };
    assert_eq!(failures("expired"), 4.0, "each refused token is counted by reason");
    assert_eq!(failures("issuer_not_configured"), 4.0);
    assert_eq!(failures("audience_not_allowed"), 4.0);

    // Key rotation at the server: the new key's tokens verify once the daemons refetch (a
    // token naming an unknown key asks for it early), the old key's stop verifying.
    let second = SigningKey::generate("second");
    write_atomic(&keys_dir.join("jwks.json"), &jwks(&[&second])).expect("rotate the key set");
    let rotated = second.sign(&claims(&json!({})));
    let took = eventually("the rotated key to verify on both nodes", Duration::from_secs(20), || {
        (0..6).all(|_| get("/private/x", Some(&rotated)).0 == "200")
    });
    for _ in 0..4 {
        let (status, body) = get("/private/x", Some(&valid));
        assert_eq!((status.as_str(), body.as_str()), ("401", "Jwks doesn't have key to match kid or alg from Jwt"), "the retired key");
    }
    let fetched: f64 = [1, 2].iter().map(|n| sample(&metrics(&c, *n), &["mesh_jwks_fetches_total{", "result=\"ok\""])).sum();
    assert!(fetched >= 4.0, "each node fetched the set, then the rotated one: {fetched}");
    println!("JWT: matrix as expected on both nodes; a rotated key verified {took:?} after the key server changed");
}
