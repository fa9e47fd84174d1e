//! The election loop against a mocked apiserver (tower-test): the requests it makes, and the
//! leadership it publishes. Short timings (a real clock: these tests take ~1 s each).

use std::time::Duration;

use super::*;
use crate::{
    election::Leadership,
    fixtures::{ApiHandle, api_error, json_response, mock_client, next_request},
};

const FAST: Timing = Timing {
    lease: Duration::from_millis(1500),
    renew_every: Duration::from_millis(300),
    renew_deadline: Duration::from_secs(1),
    retry: Duration::from_millis(200),
};
const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/mesh-system/leases/mesh-control-leader";

fn lease(holder: Option<&str>, version: &str, transitions: i32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": LEASE_NAME, "namespace": "mesh-system", "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": transitions},
    })
}

/// Starts an elector named `me`; returns its leadership, a shutdown trigger and the task.
fn start(me: &str) -> (Leadership, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>, ApiHandle) {
    let (client, api) = mock_client();
    let (tx, leadership) = Leadership::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let elector = Elector::new(client, "mesh-system", me, FAST);
    let task = tokio::spawn(elector.run(tx, async move {
        let _ = stopped.await;
    }));
    (leadership, stop, task, api)
}

/// Answers the next request, which must be `method` on `uri`; returns its body.
async fn expect(api: &mut ApiHandle, method: http::Method, uri: &str, status: u16, answer: &serde_json::Value) -> serde_json::Value {
    let (m, u, body, send) = next_request(api).await;
    assert_eq!((&m, u.as_str()), (&method, uri), "{body}");
    send.send_response(json_response(status, answer));
    body
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_replica_creates_the_missing_lease_renews_it_with_the_version_it_read_and_releases_it_on_shutdown() {
    let (leadership, stop, task, mut api) = start("a");
    assert!(!leadership.is_leader());
    expect(&mut api, http::Method::GET, PATH, 404, &api_error(404, "NotFound")).await;
    let created = expect(&mut api, http::Method::POST, "/apis/coordination.k8s.io/v1/namespaces/mesh-system/leases?", 201, &lease(Some("a"), "1", 0)).await;
    assert_eq!(created["metadata"]["name"], LEASE_NAME);
    assert_eq!((created["spec"]["holderIdentity"].as_str(), created["spec"]["leaseDurationSeconds"].as_i64()), (Some("a"), Some(1)));
    assert!(created["spec"]["acquireTime"].is_string() && created["spec"]["renewTime"].is_string(), "{created}");
    eventually("leadership", || leadership.is_leader()).await;

    // The renewal: read, then write back what was read (resourceVersion "1"), renewTime moved.
    expect(&mut api, http::Method::GET, PATH, 200, &lease(Some("a"), "1", 0)).await;
    let renewed = expect(&mut api, http::Method::PUT, &format!("{PATH}?"), 200, &lease(Some("a"), "2", 0)).await;
    assert_eq!(renewed["metadata"]["resourceVersion"], "1", "optimistic concurrency: the version read");
    assert_eq!(renewed["spec"]["holderIdentity"], "a");
    assert!(renewed["spec"]["renewTime"].is_string(), "{renewed}");
    assert!(leadership.is_leader());

    stop.send(()).expect("elector running");
    let released = expect(&mut api, http::Method::PUT, &format!("{PATH}?"), 200, &lease(None, "3", 0)).await;
    assert_eq!((released["spec"]["holderIdentity"].as_str(), released["metadata"]["resourceVersion"].as_str()), (None, Some("2")));
    task.await.expect("elector stopped");
    assert!(!leadership.is_leader());
}

#[tokio::test]
async fn losing_the_write_race_leaves_the_replica_a_follower() {
    let (leadership, _stop, _task, mut api) = start("b");
    // A released Lease: claimed at once, but another replica's write got there first.
    expect(&mut api, http::Method::GET, PATH, 200, &lease(None, "5", 2)).await;
    let claim = expect(&mut api, http::Method::PUT, &format!("{PATH}?"), 409, &api_error(409, "Conflict")).await;
    assert_eq!(claim["spec"]["leaseTransitions"], 3, "a new holder counts a transition");
    // Next read shows the winner: nothing to write, no lead.
    expect(&mut api, http::Method::GET, PATH, 200, &lease(Some("a"), "6", 3)).await;
    let (m, _, _, send) = next_request(&mut api).await;
    assert_eq!(m, http::Method::GET, "a follower only reads while the holder's record is fresh");
    send.send_response(json_response(200, &lease(Some("a"), "6", 3)));
    assert!(!leadership.is_leader());
}

#[tokio::test]
async fn a_follower_takes_over_a_lease_left_unchanged_for_the_lease_duration() {
    let (leadership, _stop, _task, mut api) = start("b");
    let started = Instant::now();
    loop {
        let (m, _, body, send) = next_request(&mut api).await;
        if m == http::Method::PUT {
            assert_eq!((body["spec"]["holderIdentity"].as_str(), body["spec"]["leaseTransitions"].as_i64()), (Some("b"), Some(8)));
            send.send_response(json_response(200, &lease(Some("b"), "43", 8)));
            break;
        }
        assert_eq!(m, http::Method::GET);
        send.send_response(json_response(200, &lease(Some("a"), "42", 7)));
    }
    let waited = started.elapsed();
    assert!(waited >= FAST.lease && waited < FAST.lease + FAST.retry * 2, "took over after {waited:?}");
    eventually("leadership", || leadership.is_leader()).await;
}

#[tokio::test]
async fn a_leader_whose_renewal_hangs_stops_leading_at_the_renew_deadline() {
    let (leadership, _stop, _task, mut api) = start("a");
    expect(&mut api, http::Method::GET, PATH, 200, &lease(Some("a"), "1", 0)).await;
    let sent = Instant::now();
    expect(&mut api, http::Method::PUT, &format!("{PATH}?"), 200, &lease(Some("a"), "2", 0)).await;
    eventually("leadership", || leadership.is_leader()).await;
    // The next read is never answered (a partitioned API server): the loop is stuck in it, and
    // the lead ends by its deadline all the same.
    let (_, _, _, _held) = next_request(&mut api).await;
    let mut watcher = leadership.clone();
    tokio::time::timeout(FAST.renew_deadline, async {
        while watcher.is_leader() {
            watcher.changed().await;
        }
    })
    .await
    .expect("lead ended within the renew deadline");
    let ended = sent.elapsed();
    assert!(ended <= FAST.renew_deadline + Duration::from_millis(50), "ended {ended:?} after the renewal was sent");
    assert!(!leadership.is_leader());
}
