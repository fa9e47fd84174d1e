//! The CA Secret paths against a mocked apiserver (tower-test).

use super::*;
use crate::fixtures::{api_error, json_response, mock_client, next_request};

fn secret_json(root: &RootPem) -> serde_json::Value {
    serde_json::to_value(to_secret(root, "mesh-system")).expect("JSON")
}

#[tokio::test]
async fn first_start_creates_the_secret_and_publishes_the_root() {
    let (client, mut api) = mock_client();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local").await });
    let (m, uri, _, send) = next_request(&mut api).await;
    assert_eq!((m, uri.as_str()), (http::Method::GET, "/api/v1/namespaces/mesh-system/secrets/mesh-ca"));
    send.send_response(json_response(404, &api_error(404, "NotFound")));
    let (m, uri, created, send) = next_request(&mut api).await;
    assert_eq!((m, uri.as_str()), (http::Method::POST, "/api/v1/namespaces/mesh-system/secrets?"));
    assert!(created["data"]["root.key"].is_string() && created["data"]["root.crt"].is_string(), "{created}");
    send.send_response(json_response(201, &created));
    let (m, uri, cm, send) = next_request(&mut api).await;
    assert_eq!(m, http::Method::PATCH);
    assert!(uri.starts_with("/api/v1/namespaces/mesh-system/configmaps/mesh-root-cert?&force=true&fieldManager=mesh-control"), "{uri}");
    send.send_response(json_response(200, &cm));
    let ca = task.await.expect("task").expect("CA");
    assert_eq!(cm["data"]["root.crt"].as_str(), Some(ca.root().cert.as_str()), "the published root is the CA's");
}

#[tokio::test]
async fn losing_the_creation_race_uses_the_winners_root() {
    let winner = Ca::generate("cluster.local").expect("root");
    let (client, mut api) = mock_client();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local").await });
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(404, &api_error(404, "NotFound")));
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(409, &api_error(409, "AlreadyExists")));
    let (m, _, _, send) = next_request(&mut api).await;
    assert_eq!(m, http::Method::GET);
    send.send_response(json_response(200, &secret_json(winner.root())));
    let (_, _, cm, send) = next_request(&mut api).await;
    send.send_response(json_response(200, &cm));
    let ca = task.await.expect("task").expect("CA");
    assert_eq!(ca.root().cert, winner.root().cert);
}

#[tokio::test]
async fn a_secret_without_the_key_is_an_error_not_a_new_root() {
    let (client, mut api) = mock_client();
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local").await });
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
    let task = tokio::spawn(async move { load_or_create(&client, "mesh-system", "cluster.local").await });
    let (_, _, _, send) = next_request(&mut api).await;
    send.send_response(json_response(200, &secret));
    let (_, _, cm, send) = next_request(&mut api).await;
    send.send_response(json_response(200, &cm));
    let ca = task.await.expect("task").expect("CA");
    assert_eq!(ca.trust_bundle(), [current.root().cert.clone(), next.root().cert.clone()]);
    assert_eq!(cm["data"]["root.crt"].as_str(), Some(format!("{}{}", current.root().cert, next.root().cert).as_str()), "nodes get both roots");
}
