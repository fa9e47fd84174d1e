use super::*;
use crate::{model::NamespacedName, validate::Error};

fn verdict(result: Result<(), Error>, generation: i64) -> Verdict {
    Verdict { kind: PolicyKind::AuthorizationPolicy, key: NamespacedName::new("demo", "p"), generation: Some(generation), result, enforced_as: None }
}

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

#[test]
fn rejected_policy_gets_accepted_false_with_reason_and_message() {
    let bad = verdict(Err(Error::UnknownAction { value: "NOPE".into() }), 3);
    let s = desired(&bad, None, ts("2026-01-01T00:00:00Z")).expect("a status to write");
    assert_eq!(s.observed_generation, Some(3));
    let c = &s.conditions[0];
    assert_eq!((c.type_.as_str(), c.status.as_str(), c.reason.as_str()), ("Accepted", "False", "UnknownAction"));
    assert!(c.message.contains("NOPE"), "{}", c.message);
    // Up to date: nothing to write (no write loop).
    assert_eq!(desired(&bad, Some(&s), ts("2026-01-02T00:00:00Z")), None);
    // A new generation with the same error is written, keeping the transition time.
    let again = desired(&verdict(Err(Error::UnknownAction { value: "NOPE".into() }), 4), Some(&s), ts("2026-01-03T00:00:00Z")).expect("write");
    assert_eq!(again.conditions[0].last_transition_time, c.last_transition_time);
    // Fixed: Accepted=True, with a new transition time.
    let fixed = desired(&verdict(Ok(()), 5), Some(&again), ts("2026-01-04T00:00:00Z")).expect("write");
    assert_eq!((fixed.conditions[0].status.as_str(), fixed.conditions[0].reason.as_str()), ("True", "Accepted"));
    assert_eq!(fixed.conditions[0].last_transition_time, Time(ts("2026-01-04T00:00:00Z")));
}

#[tokio::test]
async fn write_all_patches_only_stale_statuses_by_server_side_apply() {
    use crate::fixtures::{json_response, mock_client, next_request};
    let (client, mut api) = mock_client();
    let policy = |name: &str, action: &str, status: Option<PolicyStatus>| {
        let mut p: crd::AuthorizationPolicy =
            serde_saphyr::from_str(&format!("metadata: {{name: {name}, namespace: demo, generation: 2}}\nspec: {{action: {action}}}")).expect("yaml");
        p.status = status;
        p
    };
    let bad = Verdict { kind: PolicyKind::AuthorizationPolicy, key: NamespacedName::new("demo", "bad"), generation: Some(2), result: Err(Error::UnknownAction { value: "NOPE".into() }), enforced_as: None };
    let good = Verdict { key: NamespacedName::new("demo", "good"), result: Ok(()), ..bad.clone() };
    // "good" already says Accepted=True for generation 2: no request for it.
    let current = desired(&good, None, ts("2026-01-01T00:00:00Z"));
    let objects = [policy("bad", "NOPE", None), policy("good", "ALLOW", current)];
    let writer = tokio::spawn(async move { write_all(&client, &Leadership::alone(), &[bad, good], &objects, &[], &[], &[]).await });

    let (method, uri, body, send) = next_request(&mut api).await;
    assert_eq!(method, http::Method::PATCH);
    assert_eq!(uri, "/apis/security.mesh.dev/v1alpha1/namespaces/demo/authorizationpolicies/bad/status?&force=true&fieldManager=mesh-control");
    assert_eq!(body["apiVersion"], "security.mesh.dev/v1alpha1");
    assert_eq!(body["kind"], "AuthorizationPolicy");
    let c = &body["status"]["conditions"][0];
    assert_eq!((c["type"].as_str(), c["status"].as_str(), c["reason"].as_str()), (Some("Accepted"), Some("False"), Some("UnknownAction")));
    assert_eq!(c["observedGeneration"], 2);
    send.send_response(json_response(200, &body));
    writer.await.expect("writer finished");
    assert!(api.next_request().await.is_none(), "no second request: the accepted policy was up to date");
}

#[tokio::test]
async fn a_failed_status_write_is_logged_and_does_not_stop_the_others() {
    use crate::fixtures::{api_error, json_response, mock_client, next_request};
    let (client, mut api) = mock_client();
    let obj = |name: &str| -> crd::AuthorizationPolicy { serde_saphyr::from_str(&format!("metadata: {{name: {name}, namespace: demo}}\nspec: {{}}")).expect("yaml") };
    let v = |name: &str| Verdict { kind: PolicyKind::AuthorizationPolicy, key: NamespacedName::new("demo", name), generation: None, result: Ok(()), enforced_as: None };
    let objects = [obj("a"), obj("b")];
    let writer = tokio::spawn(async move { write_all(&client, &Leadership::alone(), &[v("a"), v("b")], &objects, &[], &[], &[]).await });
    let (_, uri, _, send) = next_request(&mut api).await;
    assert!(uri.contains("/authorizationpolicies/a/status"), "{uri}");
    send.send_response(json_response(403, &api_error(403, "Forbidden")));
    let (_, uri, body, send) = next_request(&mut api).await;
    assert!(uri.contains("/authorizationpolicies/b/status"), "{uri}");
    send.send_response(json_response(200, &body));
    writer.await.expect("writer finished");
}

#[tokio::test]
async fn only_the_leader_writes_and_a_lead_lost_between_writes_stops_the_rest() {
    use crate::{
        election::Lead,
        fixtures::{json_response, mock_client, next_request},
    };
    let obj = |name: &str| -> crd::AuthorizationPolicy { serde_saphyr::from_str(&format!("metadata: {{name: {name}, namespace: demo}}\nspec: {{}}")).expect("yaml") };
    let v = |name: &str| Verdict { kind: PolicyKind::AuthorizationPolicy, key: NamespacedName::new("demo", name), generation: None, result: Ok(()), enforced_as: None };

    // A follower: every status is stale, and not one request is made.
    let (client, mut api) = mock_client();
    let (_election, follower) = Leadership::channel();
    let objects = [obj("a"), obj("b")];
    let written = write_all(&client, &follower, &[v("a"), v("b")], &objects, &[], &[], &[]).await;
    drop(client);
    assert_eq!(written, 0);
    assert!(api.next_request().await.is_none(), "a follower writes nothing");

    // The leader loses its lead while its first write is in flight: the second is never sent.
    let (client, mut api) = mock_client();
    let (election, leadership) = Leadership::channel();
    election.send_replace(Lead::LeaderUntil(tokio::time::Instant::now() + std::time::Duration::from_secs(10)));
    let writer = tokio::spawn(async move { write_all(&client, &leadership, &[v("a"), v("b")], &objects, &[], &[], &[]).await });
    let (_, uri, body, send) = next_request(&mut api).await;
    assert!(uri.contains("/authorizationpolicies/a/status"), "{uri}");
    election.send_replace(Lead::Follower);
    let _ = body;
    let written = serde_json::json!({"apiVersion": "security.mesh.dev/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "a", "namespace": "demo"}, "spec": {}});
    send.send_response(json_response(200, &written));
    assert_eq!(writer.await.expect("writer"), 1);
    assert!(api.next_request().await.is_none(), "no write after the lead was lost");
}
