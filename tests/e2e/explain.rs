//! The node daemons' `GET /debug/explain` (what `meshctl explain` shows) against what the
//! traffic actually did, in the lab: an L7 request the destination denies, one it allows, and a
//! plaintext connection to a STRICT workload the kernel refuses. Each explanation comes from the
//! source pod's node, then from the node its `next` names, as `meshctl explain` asks them.

use std::time::Duration;

use mesh_tests::cluster::{Cluster, HTTP_SERVICE_PORT, TCP_SERVICE_PORT, VIP};
use serde_json::Value;

use super::{cluster, eventually};

const DENY_ADMIN_WRITES: &str = include_str!("../../deploy/examples/policies/deny-admin-writes.yaml");
const STRICT: &str = include_str!("../../deploy/examples/policies/strict-mtls.yaml");

/// Asks `node`'s admin endpoint; the JSON answer.
fn explain(c: &Cluster, node: u8, query: &str) -> Value {
    let text = c.curl_on_node(node, &format!("http://127.0.0.1:15000/debug/explain?{query}")).expect("admin endpoint");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Source then destination, as `meshctl explain` does: (source answer, destination answer).
fn both(c: &Cluster, pod: &str, dst: &str, http: &str) -> (Value, Option<Value>) {
    let src = c.lab.pod(pod).ip.to_string();
    let node = c.lab.pod(pod).node;
    let first = explain(c, node, &format!("src={src}&dst={dst}{http}"));
    let Some(next) = first["next"].as_object() else { return (first, None) };
    let to: u8 = next["node"].as_str().and_then(|n| n.trim_start_matches('n').parse().ok()).expect("node n<i>");
    let identity = next["identity"].as_str().map(|i| format!("&identity={}", i.replace(':', "%3A").replace('/', "%2F"))).unwrap_or_default();
    let second = explain(c, to, &format!("stage=destination&src={src}&dst={}{identity}{http}", next["dst"].as_str().expect("dst")));
    (first, Some(second))
}

fn checks(v: &Value) -> Vec<String> {
    v["steps"].as_array().expect("steps").iter().map(|s| format!("{}/{}={}", s["where"].as_str().unwrap_or(""), s["check"].as_str().unwrap_or(""), s["verdict"].as_str().unwrap_or(""))).collect()
}

#[test]
fn explain_gives_the_verdict_the_traffic_got_and_names_the_rule() {
    let c = cluster();
    c.apply_policy("deny-admin-writes", DENY_ADMIN_WRITES).expect("apply");
    let admin = format!("http://{VIP}:{HTTP_SERVICE_PORT}/admin/users");
    let status = |method: &str| -> String {
        let out = c.lab.run_in_pod("n1p1", "curl", &["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, &admin]).expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eventually("the DENY policy on every whoami pod", Duration::from_secs(10), || (0..6).all(|_| status("POST") == "403"));
    assert_eq!(status("GET"), "200");

    let vip = format!("{VIP}:{HTTP_SERVICE_PORT}");
    let (src, dst) = both(&c, "n1p1", &vip, "&method=POST&path=%2Fadmin%2Fusers");
    let dst = dst.expect("a destination to ask");
    println!("{}\n{}", serde_json::to_string_pretty(&src).unwrap_or_default(), serde_json::to_string_pretty(&dst).unwrap_or_default());
    assert_eq!(src["verdict"], "allowed", "the source lets it go: {src:#}");
    let src_checks = checks(&src);
    assert!(src_checks.starts_with(&["kernel/capture=info".to_owned(), "kernel/service=info".to_owned(), "daemon/route=allow".to_owned()]), "{src_checks:?}");
    let route = src["steps"].as_array().expect("steps").iter().find(|s| s["check"] == "route").expect("route step");
    assert!(route["rule"].as_str().unwrap_or("").contains("demo/whoami"), "{route:#}");
    assert!(src["next"]["identity"].as_str().unwrap_or("").ends_with("/ns/demo/sa/client"), "{src:#}");
    assert_eq!(dst["verdict"], "denied", "POST was answered 403: {dst:#}");
    let authz = dst["steps"].as_array().expect("steps").iter().find(|s| s["check"] == "authorization").expect("authorization step");
    assert_eq!((authz["verdict"].as_str(), authz["rule"].as_str()), (Some("deny"), Some("AuthorizationPolicy demo/deny-admin-writes")), "{dst:#}");

    let (_, dst) = both(&c, "n1p1", &vip, "&method=GET&path=%2Fadmin%2Fusers");
    assert_eq!(dst.expect("destination")["verdict"], "allowed", "GET was answered 200");

    // PERMISSIVE: the unmeshed pod's plaintext is handed to the destination daemon.
    let tcp = std::net::SocketAddr::from((VIP, TCP_SERVICE_PORT));
    let (_, dst) = both(&c, "n1p3", &tcp.to_string(), "");
    let dst = dst.expect("a destination to ask");
    assert!(checks(&dst).contains(&"kernel/steer=info".to_owned()) && dst["verdict"] == "allowed", "{dst:#}");

    // STRICT: the unmeshed pod's plaintext connection is refused by the kernel guard.
    c.apply_policy("strict", STRICT).expect("apply");
    eventually("STRICT refusing the unmeshed client", Duration::from_secs(10), || {
        c.dial("n1p3", tcp, &["--count", "3", "--timeout-ms", "300"]).map(|lines| lines.iter().all(|l| l.starts_with("error"))).unwrap_or(false)
    });
    let (src, dst) = both(&c, "n1p3", &tcp.to_string(), "");
    let dst = dst.expect("a destination to ask");
    assert!(checks(&src).iter().any(|s| s == "kernel/backend=info"), "the kernel balances the unmeshed client: {src:#}");
    assert!(src["next"]["identity"].is_null(), "plaintext: {src:#}");
    assert_eq!(dst["verdict"], "denied", "{dst:#}");
    assert!(checks(&dst).contains(&"kernel/strict=deny".to_owned()), "{dst:#}");
}
