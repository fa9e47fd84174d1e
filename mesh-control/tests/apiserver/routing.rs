//! Routing against the real apiserver: the routing CRDs (ours and our Gateway API copies) apply
//! and are established, the examples pass a server-side dry run, and the controller — running
//! with deploy/'s RBAC — writes each route's `status.parents` (keeping another controller's
//! entry), a VirtualService's not-enforced message, the invalid examples' reasons, and sends the
//! route table to a node.

use super::*;

const ROUTING_CRDS: [&str; 6] = [
    "crd/httproutes.gateway.networking.k8s.io",
    "crd/grpcroutes.gateway.networking.k8s.io",
    "crd/referencegrants.gateway.networking.k8s.io",
    "crd/virtualservices.networking.mesh.dev",
    "crd/destinationrules.networking.mesh.dev",
    "crd/localratelimits.networking.mesh.dev",
];

/// The Services the routing examples name (selectors match no pod: routes need Services only).
const SERVICES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {mesh.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Service
metadata: {name: whoami, namespace: demo}
spec: {selector: {app: whoami}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: whoami-v1, namespace: demo}
spec: {selector: {app: whoami, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: whoami-v2, namespace: demo}
spec: {selector: {app: whoami, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: demo}
spec: {selector: {app: helloworld}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-node-n1, namespace: mesh-system}
spec: {nodeName: n1, serviceAccountName: mesh-node, automountServiceAccountToken: false, containers: [{name: c, image: mesh-node}]}
";

/// `status.parents` of a route as (controllerName, parent name, Accepted reason, ResolvedRefs reason).
fn parents(c: &Cluster, kind: &str, name: &str) -> Vec<(String, String, String, String)> {
    let out = c.kubectl_ok(&["get", kind, name, "-n", "demo", "-o", "json"]);
    let obj: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let reason = |p: &serde_json::Value, t: &str| {
        p["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t)
            .map(|c| {
                format!(
                    "{}/{}",
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default()
    };
    obj["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["controllerName"].as_str().unwrap_or("").to_owned(),
                p["parentRef"]["name"].as_str().unwrap_or("").to_owned(),
                reason(p, "Accepted"),
                reason(p, "ResolvedRefs"),
            )
        })
        .collect()
}

fn accepted(c: &Cluster, kind: &str, name: &str) -> String {
    c.kubectl_ok(&["get", kind, name, "-n", "demo", "-o", "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}/{.status.conditions[?(@.type==\"Accepted\")].reason}: {.status.conditions[?(@.type==\"Accepted\")].message}"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario on one cluster: starting a cluster costs seconds"
)]
async fn routing_crds_examples_status_and_distribution_against_a_real_apiserver() {
    let c = Cluster::start();
    apply_deploy(&c);
    c.kubectl_ok(
        &[
            &["wait", "--for=condition=Established", "--timeout=30s"][..],
            &ROUTING_CRDS,
        ]
        .concat(),
    );
    c.apply(SERVICES);

    // Server-side dry run of every routing example and invalid route: the schemas take them.
    for dir in ["examples/routing", "examples/invalid/bad-routes.yaml"] {
        let dry = c.kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-f",
            &deploy().join(dir).display().to_string(),
        ]);
        assert!(dry.contains("(server dry run)"), "{dry}");
    }
    // deploy/'s RBAC lets the controller read the routing kinds and write only their status.
    let can = |args: &[&str]| {
        let out = c.kubectl(
            &[
                &["auth", "can-i"],
                args,
                &["--as=system:serviceaccount:mesh-system:mesh-control"],
            ]
            .concat(),
        );
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for allowed in [
        &["watch", "httproutes.gateway.networking.k8s.io", "-A"][..],
        &["list", "referencegrants.gateway.networking.k8s.io", "-A"],
        &[
            "patch",
            "httproutes.gateway.networking.k8s.io",
            "--subresource=status",
            "-n",
            "demo",
        ],
        &[
            "patch",
            "grpcroutes.gateway.networking.k8s.io",
            "--subresource=status",
            "-n",
            "demo",
        ],
        &["watch", "virtualservices.networking.mesh.dev", "-A"],
        &[
            "patch",
            "destinationrules.networking.mesh.dev",
            "--subresource=status",
            "-n",
            "demo",
        ],
    ] {
        assert!(
            can(allowed),
            "mesh-control should be allowed to {allowed:?}"
        );
    }
    for denied in [
        &[
            "patch",
            "httproutes.gateway.networking.k8s.io",
            "-n",
            "demo",
        ][..],
        &[
            "update",
            "virtualservices.networking.mesh.dev",
            "-n",
            "demo",
        ],
    ] {
        assert!(
            !can(denied),
            "mesh-control must not be allowed to {denied:?}"
        );
    }

    // A route another controller already wrote status for (as a gateway would, for a Gateway).
    c.apply(
        &std::fs::read_to_string(deploy().join("examples/routing/weighted-split.yaml"))
            .expect("read"),
    );
    let foreign = r#"{"status":{"parents":[{"parentRef":{"name":"gw"},"controllerName":"example.com/gateway","conditions":[]}]}}"#;
    c.kubectl_ok(&[
        "patch",
        "httproute",
        "whoami-split",
        "-n",
        "demo",
        "--subresource=status",
        "--type=merge",
        "-p",
        foreign,
    ]);
    for f in ["header-route.yaml", "firefox-canary.yaml"] {
        c.apply(&std::fs::read_to_string(deploy().join("examples/routing").join(f)).expect("read"));
    }
    c.apply(
        &std::fs::read_to_string(deploy().join("examples/invalid/bad-routes.yaml")).expect("read"),
    );
    // A VirtualService with retries (enforced) and CORS (not implemented: named in the status),
    // for another host (the Firefox one owns helloworld).
    c.apply("apiVersion: networking.mesh.dev/v1alpha1\nkind: VirtualService\nmetadata: {name: retrying, namespace: demo}\nspec:\n  hosts: [whoami-v1]\n  http:\n  - route: [{destination: {host: whoami-v1}}]\n    retries: {attempts: 3, perTryTimeout: 2s}\n    corsPolicy: {allowOrigins: [{exact: x}]}\n");

    let ctl = start_controller(&c);
    let whoami_split = Cluster::eventually("whoami-split status", 30, || {
        let p = parents(&c, "httproute", "whoami-split");
        (p.len() == 2).then_some(p)
    });
    assert_eq!(
        whoami_split,
        [
            (
                "example.com/gateway".into(),
                "gw".into(),
                String::new(),
                String::new()
            ),
            (
                "mesh.dev/mesh-control".into(),
                "whoami".into(),
                "True/Accepted".into(),
                "True/ResolvedRefs".into()
            ),
        ],
        "the other controller's entry is kept"
    );
    assert_eq!(
        parents(&c, "httproute", "whoami-header")[0].2,
        "True/Accepted"
    );
    Cluster::eventually("bad-regex status", 20, || {
        (!parents(&c, "httproute", "bad-regex").is_empty()).then_some(())
    });
    assert_eq!(
        parents(&c, "httproute", "bad-regex")[0].2,
        "False/UnsupportedValue"
    );
    let msg = c.kubectl_ok(&[
        "get",
        "httproute",
        "bad-regex",
        "-n",
        "demo",
        "-o",
        "jsonpath={.status.parents[0].conditions[0].message}",
    ]);
    assert!(
        msg.starts_with("spec.rules[0].matches[0].path.value: regex \"/users/([\" is invalid"),
        "{msg}"
    );

    Cluster::eventually("VirtualService status", 20, || {
        accepted(&c, "virtualservice", "retrying")
            .starts_with("True/")
            .then_some(())
    });
    assert_eq!(
        accepted(&c, "virtualservice", "retrying"),
        "True/PartiallyEnforced: spec.http[0].corsPolicy: ignored: CORS is not implemented"
    );
    assert_eq!(
        accepted(&c, "virtualservice", "helloworld"),
        "True/Accepted: the routes are valid and distributed to the nodes"
    );
    assert!(
        accepted(&c, "virtualservice", "bad-tcp")
            .starts_with("False/UnsupportedField: spec.tcp: not supported: TCP routes"),
        "{}",
        accepted(&c, "virtualservice", "bad-tcp")
    );
    assert!(
        accepted(&c, "virtualservice", "bad-weights").starts_with("False/InvalidWeights"),
        "{}",
        accepted(&c, "virtualservice", "bad-weights")
    );
    assert!(
        accepted(&c, "destinationrule", "helloworld").starts_with("True/Accepted"),
        "{}",
        accepted(&c, "destinationrule", "helloworld")
    );

    // A node gets the route tables: whoami's two HTTPRoutes in precedence order.
    let root = c.kubectl_ok(&[
        "get",
        "configmap",
        "mesh-root-cert",
        "-n",
        "mesh-system",
        "-o",
        "jsonpath={.data.root\\.crt}",
    ]);
    pod_ready(&c, "mesh-system", "mesh-node-n1", "10.0.1.1");
    let server = client::Server {
        address: format!("https://127.0.0.1:{}", ctl.grpc),
        name: "localhost".into(),
        roots_pem: root,
    };
    let channel = server
        .connect_as("n1", &node_token(&c, "n1"))
        .await
        .expect("mutual TLS as n1");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::NodeMessage {
        kind: Some(pb::node_message::Kind::Subscribe(pb::Subscribe {
            node_name: "n1".into(),
            last_applied_version: 0,
        })),
    })
    .await
    .expect("send");
    let updates = ConfigDistributionClient::new(channel)
        .stream_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("subscribed")
        .into_inner();
    let mut n1 = NodeView {
        updates,
        acks: tx,
        view: BTreeMap::new(),
    };
    let key = (
        i32::from(pb::ResourceKind::RouteTable),
        "demo/whoami".to_owned(),
    );
    n1.until("whoami's route table", |v| v.contains_key(&key))
        .await;
    let Some(pb::resource::Kind::RouteTable(t)) = &n1.view[&key].kind else {
        panic!("a route table")
    };
    let names: Vec<&str> = t
        .routes
        .iter()
        .filter_map(|r| r.source.as_ref())
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["whoami-header", "whoami-split"]);
    assert!(n1.view.contains_key(&(
        i32::from(pb::ResourceKind::RouteTable),
        "demo/helloworld".to_owned()
    )));

    // Fixing the invalid route flips its status (the controller reacts to the change).
    c.apply("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad-regex, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: whoami}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/users/[0-9]+\"}}]\n    backendRefs: [{name: whoami, port: 80}]\n");
    Cluster::eventually("fixed route accepted", 20, || {
        (parents(&c, "httproute", "bad-regex")
            .first()
            .map(|p| p.2.as_str())
            == Some("True/Accepted"))
        .then_some(())
    });
    let status = status_json(&ctl).expect("status");
    assert!(
        status["routes"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r["name"] == "bad-regex" && r["accepted"] == true)),
        "{status:#}"
    );
}

/// A cluster without Gateway API: the controller starts and serves anyway, and picks routes up
/// once the CRDs are installed (no restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_crds_installed_after_the_controller_started_are_picked_up() {
    let c = Cluster::start();
    for f in [
        "00-namespace.yaml",
        "10-crds.yaml",
        "20-control.yaml",
        "30-node.yaml",
    ] {
        c.kubectl_ok(&["apply", "-f", &deploy().join(f).display().to_string()]);
    }
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/virtualservices.networking.mesh.dev",
        "crd/authorizationpolicies.security.mesh.dev",
    ]);
    c.apply(SERVICES);
    let ctl = start_controller(&c);
    Cluster::eventually("controller ready without Gateway API", 30, || {
        status_json(&ctl).filter(|s| s["version"].as_u64() > Some(0))
    });

    c.kubectl_ok(&[
        "apply",
        "-f",
        &deploy()
            .join("11-gateway-api-crds.yaml")
            .display()
            .to_string(),
    ]);
    c.kubectl_ok(
        &[
            &["wait", "--for=condition=Established", "--timeout=30s"][..],
            &ROUTING_CRDS[..3],
        ]
        .concat(),
    );
    c.apply(
        &std::fs::read_to_string(deploy().join("examples/routing/weighted-split.yaml"))
            .expect("read"),
    );
    let p = Cluster::eventually("the route's status", 90, || {
        let p = parents(&c, "httproute", "whoami-split");
        (!p.is_empty()).then_some(p)
    });
    assert_eq!(p[0].2, "True/Accepted", "{p:?}");
    let status = status_json(&ctl).expect("status");
    assert_eq!(status["routeTables"], 1, "{status:#}");
}
