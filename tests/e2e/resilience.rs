//! DestinationRule traffic policies through the whole mesh, applied as the repository's example
//! files: circuit breaking (503 `UO` at once), outlier detection (an app killed under load is
//! ejected from the HTTP picks and from the kernel's table for L4 clients, and comes back after
//! its ejection time), consistent hashing (a user sticks to one endpoint), a local rate limit
//! (429 `RL` beyond the bucket, counted per source), and locality failover (requests stay in the
//! client's zone until it has no healthy endpoint).

use std::{collections::BTreeMap, time::Duration};

use mesh_tests::{
    cluster::{TCP_SERVICE_PORT, VIP, VIP_V1, VIP_V2},
    tools,
};

use super::{
    answered, cluster, eventually,
    l7::{curl_json, load, metrics, sample},
};

const CIRCUIT_BREAKER: &str = include_str!("../../deploy/examples/routing/circuit-breaker.yaml");
const OUTLIER: &str = include_str!("../../deploy/examples/routing/outlier-detection.yaml");
const CONSISTENT_HASH: &str = include_str!("../../deploy/examples/routing/consistent-hash.yaml");
const RATE_LIMIT: &str = include_str!("../../deploy/examples/routing/rate-limit.yaml");
const COOKIE_HASH: &str = "apiVersion: networking.mesh.dev/v1alpha1
kind: DestinationRule
metadata: {name: whoami-v1-cookie, namespace: demo}
spec:
  host: whoami-v1
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, ttl: 3600s}
";

#[test]
fn the_circuit_breaker_answers_overflow_at_once_with_uo() {
    let c = cluster();
    c.apply_routes("circuit-breaker", CIRCUIT_BREAKER).expect("apply");
    let overflowed = || {
        let r = load(&c, &["--url", &format!("http://{VIP_V2}/delay/100"), "--rate", "40", "--duration", "1", "--connections", "8"]);
        r.status.get("503").copied().unwrap_or(0) > 0
    };
    eventually("the connection pool limits to reach node 1", Duration::from_secs(5), overflowed);
    // Istio's task: one connection and one pending request, 8 clients asking 40 requests/s of
    // 100 ms each. One connection carries at most ~10 requests/s: the rest overflow, at once.
    let m1 = metrics(&c, 1);
    let r = load(&c, &["--url", &format!("http://{VIP_V2}/delay/100"), "--rate", "40", "--duration", "3", "--connections", "8"]);
    let (ok, overflow) = (r.ok, r.status.get("503").copied().unwrap_or(0));
    let uo = |m: &str| sample(m, &["istio_requests_total{", "reporter=\"source\"", "destination_service=\"whoami-v2.demo.svc.cluster.local\"", "response_flags=\"UO\""]);
    let counted = uo(&metrics(&c, 1)) - uo(&m1);
    c.delete_routes("circuit-breaker").expect("delete");
    assert_eq!(ok + overflow, r.scheduled, "every request answered, 2xx or 503: {r:?}");
    assert!(ok <= 3 * 11 + 2, "one connection, 100 ms per request: at most ~10/s get through, {ok} did: {r:?}");
    assert!(ok >= 10, "requests do get through: {r:?}");
    assert!(overflow >= r.scheduled / 2, "most overflow: {overflow} of {}", r.scheduled);
    assert_eq!(counted, overflow as f64, "each overflow is counted with response_flags=\"UO\"");
    // An overflow is answered without waiting for the connection: far below the 100 ms a
    // request that got through takes.
    assert!(r.p50_us < 100_000, "the median answer (an overflow) came at once: {} µs", r.p50_us);
    println!("circuit breaker: {ok} of {} through, {overflow} UO, median {} µs", r.scheduled, r.p50_us);
}

#[test]
fn outlier_detection_ejects_a_killed_backend_for_http_and_kernel_clients_and_lets_it_back() {
    let mut c = cluster();
    c.apply_routes("outlier", OUTLIER).expect("apply");
    std::thread::sleep(Duration::from_secs(1)); // the policy reaches the nodes (no visible effect to wait for)
    let l4 = |c: &mesh_tests::cluster::Cluster| answered(&c.dial("n1p3", format!("{VIP}:{TCP_SERVICE_PORT}").parse().expect("addr"), &["--count", "30"]).expect("dial"));
    let before = l4(&c);
    assert!(before.contains_key("n2p1") && !before.contains_key("FAILED"), "the unmeshed client reaches every endpoint through the kernel: {before:?}");

    // The app in n2p1 dies under a steady load from the meshed client.
    let app = c.apps.remove("n2p1").expect("the app of n2p1");
    let steady = std::thread::scope(|s| {
        let run = s.spawn(|| load(&c, &["--url", &format!("http://{VIP}/"), "--rate", "100", "--duration", "4", "--connections", "4"]));
        std::thread::sleep(Duration::from_millis(1500));
        drop(app); // killed
        (run.join().expect("load"), std::time::Instant::now())
    });
    let (steady, killed) = steady;
    let failed = steady.scheduled - steady.ok;
    assert!(failed <= 8, "3 gateway errors in a row eject it (a few more were in flight): {failed} failed: {steady:?}");
    assert!(steady.ok >= steady.scheduled - 8, "{steady:?}");
    let after = load(&c, &["--url", &format!("http://{VIP}/"), "--rate", "100", "--duration", "2", "--connections", "4"]);
    assert_eq!((after.ok, after.pods.get("n2p1").copied()), (after.scheduled, None), "ejected: no request goes to it: {after:?}");
    assert!(after.pods.get("n1p2").is_some_and(|n| *n >= 40) && after.pods.get("n2p2").is_some_and(|n| *n >= 40), "the other two share the load: {:?}", after.pods);
    // The kernel's table for the Service lost it too: every L4 connection succeeds.
    let kernel = l4(&c);
    assert!(!kernel.contains_key("FAILED") && !kernel.contains_key("n2p1"), "the kernel stopped balancing to it: {kernel:?}");
    let m1 = metrics(&c, 1);
    assert!(sample(&m1, &["mesh_outlier_ejections_total{", "service=\"demo/whoami\""]) >= 1.0, "the ejection is counted");
    assert_eq!(sample(&m1, &["mesh_outlier_ejected_endpoints{", "service=\"demo/whoami\""]), 1.0, "one endpoint out now");

    // Back up: after the 10 s ejection it gets requests again (and from the kernel), its share
    // at once: it is measured afresh, not judged by how it answered while dying.
    c.start_app("n2p1").expect("restart the app");
    let restarted = killed.elapsed();
    let mut last = None;
    let back = std::time::Instant::now();
    while last.as_ref().is_none_or(|r: &mesh_tests::whoami::load::Report| r.pods.get("n2p1").is_none_or(|n| *n < 10)) {
        assert!(
            back.elapsed() < Duration::from_secs(12),
            "the endpoint did not come back within 12 s of its restart ({restarted:?} after it died; ejected for 10 s): last load {last:?}; node 1's outlier metrics: {:?}",
            metrics(&c, 1).lines().filter(|l| l.starts_with("mesh_outlier")).collect::<Vec<_>>()
        );
        last = Some(load(&c, &["--url", &format!("http://{VIP}/"), "--rate", "100", "--duration", "1", "--connections", "4"]));
    }
    let back = back.elapsed();
    assert!(l4(&c).contains_key("n2p1"), "back in the kernel's table");
    c.delete_routes("outlier").expect("delete");
    println!("outlier detection: {failed} of {} requests failed when the app died; back {back:.1?} after the restart; kernel clients: {kernel:?}", steady.scheduled);
}

#[test]
fn consistent_hashing_keeps_each_user_on_one_endpoint() {
    let c = cluster();
    c.apply_routes("hash", CONSISTENT_HASH).expect("apply");
    let url = format!("http://{VIP_V1}/");
    let pods_of = |user: &str| -> Vec<String> {
        curl_json(&c, &["--http1.1", "-H", &format!("x-user: {user}"), &url, &url, &url, &url])
            .iter()
            .map(|a| a["pod"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    eventually("the hash policy to reach node 1", Duration::from_secs(5), || {
        (0..5).all(|u| {
            let p = pods_of(&format!("probe-{u}"));
            p.iter().all(|x| *x == p[0])
        })
    });
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for u in 0..24 {
        let pods = pods_of(&format!("user-{u}"));
        assert!(pods.iter().all(|p| *p == pods[0]), "user-{u} moved between endpoints: {pods:?}");
        *spread.entry(pods[0].clone()).or_default() += 1;
    }
    c.delete_routes("hash").expect("delete");
    assert_eq!(spread.len(), 2, "users spread over both endpoints of whoami-v1: {spread:?}");

    // A cookie with a TTL: the first answer sets it, and requests carrying it stick.
    c.apply_routes("cookie", COOKIE_HASH).expect("apply");
    let curl = tools::curl().expect("curl").display().to_string();
    let session = || -> Option<String> {
        let out = c.lab.run_in_pod("n1p1", &curl, &["-sS", "-o", "/dev/null", "-D", "-", &url]).expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie: session=").then(|| l["set-cookie: ".len()..].split(';').next().unwrap_or_default().to_owned()))
    };
    let mut cookie = None;
    eventually("the cookie policy to reach node 1", Duration::from_secs(5), || {
        cookie = session();
        cookie.is_some()
    });
    let cookie = cookie.expect("a Set-Cookie");
    let mut sticky: BTreeMap<String, usize> = BTreeMap::new();
    for a in curl_json(&c, &["--http1.1", "-H", &format!("cookie: {cookie}"), &url, &url, &url, &url, &url, &url]) {
        *sticky.entry(a["pod"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    c.delete_routes("cookie").expect("delete");
    assert_eq!(sticky.len(), 1, "requests with the generated cookie ({cookie}) stick to one endpoint: {sticky:?}");
    println!("consistent hash: 24 users × 4 requests, each on one endpoint; users per endpoint {spread:?}; generated cookie {cookie} → {sticky:?}");
}

#[test]
fn a_local_rate_limit_passes_its_rate_and_answers_the_rest_429() {
    let c = cluster();
    c.apply_routes("rate-limit", RATE_LIMIT).expect("apply");
    let url = format!("http://{VIP_V2}/");
    eventually("the rate limit to reach node 2", Duration::from_secs(5), || {
        load(&c, &["--url", &url, "--rate", "400", "--duration", "1", "--connections", "8"]).status.contains_key("429")
    });
    std::thread::sleep(Duration::from_millis(1100)); // a full bucket again
    let m2 = metrics(&c, 2);
    // 100 per second with bursts of 100, offered 300 per second for 10 s.
    let r = load(&c, &["--url", &url, "--rate", "300", "--duration", "10", "--connections", "8"]);
    let (ok, limited) = (r.ok, r.status.get("429").copied().unwrap_or(0));
    let rl = |m: &str| sample(m, &["istio_requests_total{", "reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"", "response_code=\"429\"", "response_flags=\"RL\""]);
    let counted = rl(&metrics(&c, 2)) - rl(&m2);
    let headers = c.lab.run_in_pod("n1p1", &tools::curl().expect("curl").display().to_string(), &["-sS", "-o", "/dev/null", "-D", "-", &url]).expect("curl");
    c.delete_routes("rate-limit").expect("delete");
    assert_eq!(ok + limited, r.scheduled, "every request answered 2xx or 429: {r:?}");
    // The first second's burst (100) plus 100 per second: 1,000 to 1,100 in 10 s, ± 5 %.
    assert!((950..=1155).contains(&ok), "100/s (+ one burst) passed: {ok} of {}", r.scheduled);
    assert_eq!(counted, limited as f64, "each 429 counted at the destination for the client's identity with flag RL");
    let text = String::from_utf8_lossy(&headers.stdout).to_lowercase();
    assert!(text.contains("x-ratelimit-limit: 100") && text.contains("x-ratelimit-remaining:"), "{text}");
    println!("rate limit: {ok} of {} passed in 10 s at 300/s offered ({:.1}/s), {limited} answered 429 RL", r.scheduled, ok as f64 / 10.0);
}

const LOCALITY: &str = include_str!("../../deploy/examples/routing/locality-failover.yaml");

#[test]
fn locality_failover_keeps_requests_in_the_zone_and_fails_over_when_it_has_no_healthy_endpoint() {
    let mut c = cluster();
    // n1 (the client n1p1 and whoami-v1's n1p2) in zone-a, n2 (whoami-v1's n2p1) in zone-b.
    c.set_localities(&[("n1", "region-1", "zone-a"), ("n2", "region-1", "zone-b")]).expect("label the nodes");
    c.apply_routes("locality", LOCALITY).expect("apply");
    let url = format!("http://{VIP_V1}/");
    let run = |c: &mesh_tests::cluster::Cluster, secs: &str| load(c, &["--url", &url, "--rate", "100", "--duration", secs, "--connections", "4"]);
    eventually("the zones and the policy to reach node 1", Duration::from_secs(5), || run(&c, "0.3").pods.keys().eq(["n1p2"]));
    let local = run(&c, "2");
    assert_eq!((local.ok, local.pods.get("n1p2").copied()), (local.scheduled, Some(local.scheduled)), "every request stays in zone-a: {local:?}");

    // zone-a's only endpoint dies: ejected, requests fail over to zone-b.
    let app = c.apps.remove("n1p2").expect("the app of n1p2");
    let failing = std::thread::scope(|s| {
        let during = s.spawn(|| run(&c, "3"));
        std::thread::sleep(Duration::from_millis(1000));
        drop(app);
        during.join().expect("load")
    });
    let failed = failing.scheduled - failing.ok;
    assert!(failed <= 8, "3 gateway errors eject it, the rest fail over: {failed} failed: {failing:?}");
    let over = run(&c, "2");
    assert_eq!((over.ok, over.pods.get("n2p1").copied()), (over.scheduled, Some(over.scheduled)), "all in zone-b now: {over:?}");

    // Back after its ejection time: requests return to the client's zone.
    c.start_app("n1p2").expect("restart the app");
    let back = eventually("requests to return to zone-a", Duration::from_secs(10), || run(&c, "0.5").pods.keys().eq(["n1p2"]));
    c.delete_routes("locality").expect("delete");
    println!("locality failover: {} requests in zone-a; {failed} of {} failed when it died, then {} in zone-b; back in zone-a {back:.1?} after the restart", local.ok, failing.scheduled, over.ok);
}
