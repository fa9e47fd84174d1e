//! The CA Secret paths against a mocked apiserver (tower-test).

use super::*;
use crate::fixtures::{api_error, json_response, mock_client, next_request};

fn secret_json(root: &RootPem) -> serde_json::Value {
    serde_json::to_value(to_secret(root, "mesh-system")).expect("JSON")
}

const SECRET: &str = "/api/v1/namespaces/mesh-system/secrets/mesh-ca";

#[tokio::test]
async fn the_leader_creates_the_secret_on_first_start_and_publishes_the_root() {
    let (client, mut api) = mock_client();
    let c = client.clone();
    let task = tokio::spawn(async move { load_or_create(&c, "mesh-system", "cluster.local", &Leadership::alone()).await });
    let (m, uri, _, send) = next_request(&mut api).await;
    assert_eq!((m, uri.as_str()), (http::Method::GET, SECRET));
    send.send_response(json_response(404, &api_error(404, "NotFound")));
    let (m, uri, created, send) = next_request(&mut api).await;
    assert_eq!((m, uri.as_str()), (http::Method::POST, "/api/v1/namespaces/mesh-system/secrets?"));
    assert!(created["data"]["root.key"].is_string() && created["data"]["root.crt"].is_string(), "{created}");
    send.send_response(json_response(201, &created));
    let ca = task.await.expect("task").expect("CA");

    let task = tokio::spawn(async move { publish(&client, "mesh-system", &ca).await.map(|()| ca) });
    let (m, uri, cm, send) = next_request(&mut api).await;
    assert_eq!(m, http::Method::PATCH);
    assert!(uri.starts_with("/api/v1/namespaces/mesh-system/configmaps/mesh-root-cert?&force=true&fieldManager=mesh-control"), "{uri}");
    send.send_response(json_response(200, &cm));
    let ca = task.await.expect("task").expect("published");
    assert_eq!(cm["data"]["root.crt"].as_str(), Some(ca.root().cert.as_str()), "the published root is the CA's");
}

#[tokio::test]
async fn a_replica_that_does_not_lead_creates_nothing_and_adopts_the_leaders_secret() {
    let leaders = Ca::generate("cluster.local").expect("root");
    let (client, mut api) = mock_client();
    let (_election, follower) = Leadership::channel();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local", &follower).await });
    // Two looks find nothing; the third finds the leader's Secret. Never a POST.
    for _ in 0..2 {
        let (m, uri, _, send) = next_request(&mut api).await;
        assert_eq!((m, uri.as_str()), (http::Method::GET, SECRET), "a follower only reads");
        send.send_response(json_response(404, &api_error(404, "NotFound")));
    }
    let (m, _, _, send) = next_request(&mut api).await;
    assert_eq!(m, http::Method::GET);
    send.send_response(json_response(200, &secret_json(leaders.root())));
    let ca = task.await.expect("task").expect("CA");
    assert_eq!(ca.root().cert, leaders.root().cert);
    assert!(api.next_request().await.is_none(), "nothing written");
}

#[tokio::test]
async fn a_waiting_replica_that_becomes_the_leader_creates_the_secret() {
    let (client, mut api) = mock_client();
    let (election, leadership) = Leadership::channel();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local", &leadership).await });
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(404, &api_error(404, "NotFound")));
    // It leads from now on: it looks again at once (no poll interval) and creates the Secret.
    election.send_replace(crate::election::Lead::LeaderUntil(tokio::time::Instant::now() + std::time::Duration::from_secs(10)));
    // (It may have seen the lead before its next look, and create straight away.)
    let (mut m, _, mut created, mut send) = tokio::time::timeout(std::time::Duration::from_millis(500), next_request(&mut api)).await.expect("at once");
    if m == http::Method::GET {
        send.send_response(json_response(404, &api_error(404, "NotFound")));
        (m, _, created, send) = next_request(&mut api).await;
    }
    assert_eq!(m, http::Method::POST);
    send.send_response(json_response(201, &created));
    task.await.expect("task").expect("CA");
}

#[tokio::test]
async fn losing_the_creation_race_uses_the_winners_root() {
    let winner = Ca::generate("cluster.local").expect("root");
    let (client, mut api) = mock_client();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local", &Leadership::alone()).await });
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(404, &api_error(404, "NotFound")));
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(409, &api_error(409, "AlreadyExists")));
    let (m, _, _, send) = next_request(&mut api).await;
    assert_eq!(m, http::Method::GET);
    send.send_response(json_response(200, &secret_json(winner.root())));
    let ca = task.await.expect("task").expect("CA");
    assert_eq!(ca.root().cert, winner.root().cert);
}

#[tokio::test]
async fn a_secret_without_the_key_is_an_error_not_a_new_root() {
    let (client, mut api) = mock_client();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local", &Leadership::alone()).await });
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(200, &serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mesh-ca"}, "data": {}})));
    let e = task.await.expect("task").expect_err("must not overwrite or invent a root");
    assert!(matches!(e, Error::MissingKey { key: "root.crt", .. }), "{e}");
}

#[tokio::test]
async fn extra_roots_in_the_secret_are_trusted_and_published_with_the_root() {
    let current = Ca::generate("cluster.local").expect("root");
    let next = Ca::generate("cluster.local").expect("new root");
    let mut secret = secret_json(current.root());
    secret["data"][ca::EXTRA_ROOTS] = serde_json::to_value(ByteString(next.root().cert.clone().into_bytes())).expect("base64");
    let (client, mut api) = mock_client();
    let task = tokio::spawn(async move {
        let ca = load_or_create(&client, "mesh-system", "cluster.local", &Leadership::alone()).await?;
        publish(&client, "mesh-system", &ca).await.map(|()| ca)
    });
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(200, &secret));
    let (_, _, cm, send) = next_request(&mut api).await;
    send.send_response(json_response(200, &cm));
    let ca = task.await.expect("task").expect("CA");
    assert_eq!(ca.trust_bundle(), [current.root().cert.clone(), next.root().cert.clone()]);
    assert_eq!(cm["data"]["root.crt"].as_str(), Some(format!("{}{}", current.root().cert, next.root().cert).as_str()), "nodes get both roots");
}
