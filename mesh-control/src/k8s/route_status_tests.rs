use super::*;
use crate::{
    crd::gateway::ParentReference,
    fixtures::{json_response, mock_client, next_request},
    model::NamespacedName,
};

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

fn service_parent(name: &str) -> ParentReference {
    ParentReference {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name: name.into(),
        ..ParentReference::default()
    }
}

fn parent(name: &str, accepted: bool) -> ParentVerdict {
    let c = if accepted {
        Condition::yes("Accepted", "Accepted", "ok")
    } else {
        Condition::no("Accepted", "NoMatchingParent", "Service demo/x not found")
    };
    ParentVerdict {
        reference: service_parent(name),
        conditions: vec![
            c,
            Condition::yes("ResolvedRefs", "ResolvedRefs", "all references resolved"),
        ],
    }
}

#[test]
fn parents_of_other_controllers_are_kept_and_ours_written_once() {
    let gateway = RouteParentStatus {
        parent_ref: ParentReference {
            name: "gw".into(),
            ..ParentReference::default()
        },
        controller_name: "example.com/gateway".into(),
        conditions: Vec::new(),
    };
    let current = RouteStatus {
        parents: vec![gateway.clone()],
    };
    let s = desired_parents(
        &[parent("whoami", true)],
        Some(2),
        Some(&current),
        ts("2026-01-01T00:00:00Z"),
    )
    .expect("ours are missing");
    assert_eq!(
        s.parents[0], gateway,
        "another controller's entry stays as it is"
    );
    let ours = &s.parents[1];
    assert_eq!(
        (ours.controller_name.as_str(), ours.parent_ref.name.as_str()),
        (CONTROLLER_NAME, "whoami")
    );
    let c: Vec<(&str, &str, &str, Option<i64>)> = ours
        .conditions
        .iter()
        .map(|c| {
            (
                c.type_.as_str(),
                c.status.as_str(),
                c.reason.as_str(),
                c.observed_generation,
            )
        })
        .collect();
    assert_eq!(
        c,
        [
            ("Accepted", "True", "Accepted", Some(2)),
            ("ResolvedRefs", "True", "ResolvedRefs", Some(2))
        ]
    );
    // Up to date: nothing to write.
    assert_eq!(
        desired_parents(
            &[parent("whoami", true)],
            Some(2),
            Some(&s),
            ts("2026-01-02T00:00:00Z")
        ),
        None
    );
    // A flip moves only that condition's transition time.
    let flipped = desired_parents(
        &[parent("whoami", false)],
        Some(3),
        Some(&s),
        ts("2026-01-03T00:00:00Z"),
    )
    .expect("changed");
    let (accepted, resolved) = (
        &flipped.parents[1].conditions[0],
        &flipped.parents[1].conditions[1],
    );
    assert_eq!(
        (accepted.status.as_str(), accepted.last_transition_time.0),
        ("False", ts("2026-01-03T00:00:00Z"))
    );
    assert_eq!(resolved.last_transition_time.0, ts("2026-01-01T00:00:00Z"));
    // A parent that is no longer ours (or gone) loses its entry.
    let gone = desired_parents(&[], Some(4), Some(&flipped), ts("2026-01-04T00:00:00Z"))
        .expect("our entry goes");
    assert_eq!(gone.parents, [gateway]);
    assert_eq!(
        desired_parents(&[], Some(4), None, ts("2026-01-04T00:00:00Z")),
        None,
        "nothing of ours, nothing written"
    );
}

#[tokio::test]
async fn write_all_patches_stale_route_and_virtualservice_statuses_by_server_side_apply() {
    let (client, mut api) = mock_client();
    let route: gateway::HttpRoute = serde_saphyr::from_str("metadata: {name: r, namespace: demo, generation: 1}\nspec: {parentRefs: [{group: \"\", kind: Service, name: whoami}]}").expect("yaml");
    let vs: networking::VirtualService = serde_saphyr::from_str(
        "metadata: {name: v, namespace: demo, generation: 5}\nspec: {hosts: [whoami]}",
    )
    .expect("yaml");
    let objects = Objects {
        http_routes: vec![Read::known(route)],
        virtual_services: vec![Read::known(vs)],
        ..Objects::default()
    };
    let verdicts = vec![
        Verdict {
            kind: Kind::HttpRoute,
            key: NamespacedName::new("demo", "r"),
            generation: Some(1),
            status: VerdictStatus::Parents(vec![parent("whoami", true)]),
        },
        Verdict {
            kind: Kind::VirtualService,
            key: NamespacedName::new("demo", "v"),
            generation: Some(5),
            status: VerdictStatus::Conditions(vec![Condition::yes(
                "Accepted",
                "PartiallyEnforced",
                "spec.http[0].corsPolicy: ignored: CORS is not implemented",
            )]),
        },
    ];
    let writer = tokio::spawn(async move { write_all(&client, &Leadership::alone(), &verdicts, &objects).await });
    let (method, uri, body, send) = next_request(&mut api).await;
    assert_eq!(method, http::Method::PATCH);
    assert_eq!(
        uri,
        "/apis/gateway.networking.k8s.io/v1/namespaces/demo/httproutes/r/status?&force=true&fieldManager=mesh-control"
    );
    assert_eq!(
        (
            body["kind"].as_str(),
            body["status"]["parents"][0]["controllerName"].as_str()
        ),
        (Some("HTTPRoute"), Some(CONTROLLER_NAME))
    );
    assert_eq!(
        body["status"]["parents"][0]["parentRef"],
        serde_json::json!({"group": "", "kind": "Service", "name": "whoami"})
    );
    send.send_response(json_response(200, &body));
    let (_, uri, body, send) = next_request(&mut api).await;
    assert_eq!(
        uri,
        "/apis/networking.mesh.dev/v1alpha1/namespaces/demo/virtualservices/v/status?&force=true&fieldManager=mesh-control"
    );
    let c = &body["status"]["conditions"][0];
    assert_eq!(
        (
            c["reason"].as_str(),
            c["message"].as_str(),
            c["observedGeneration"].as_i64()
        ),
        (
            Some("PartiallyEnforced"),
            Some("spec.http[0].corsPolicy: ignored: CORS is not implemented"),
            Some(5)
        )
    );
    assert_eq!(body["status"]["observedGeneration"], 5);
    send.send_response(json_response(200, &body));
    writer.await.expect("writer finished");
    assert!(api.next_request().await.is_none());
}
