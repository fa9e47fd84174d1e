//! Test fixtures shared by the unit tests of several modules.

use crate::{filemode::build, manifest, view::State};

/// A two-node lab: a meshed namespace with two whoami pods, an unmeshed client, one Service.
pub(crate) const LAB: &str = r"
apiVersion: lab.mesh.dev/v1alpha1
kind: Node
metadata: {name: n1}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Node
metadata: {name: n2}
spec: {address: 198.18.0.2}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Namespace
metadata: {name: demo, labels: {mesh.dev/dataplane-mode: ambient}}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: whoami-1, namespace: demo, labels: {app: whoami}}
spec: {node: n1, serviceAccount: whoami, addresses: [198.18.1.10]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: whoami-2, namespace: demo, labels: {app: whoami}}
spec: {node: n2, serviceAccount: whoami, addresses: [198.18.2.10], healthy: false}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: demo, labels: {app: client, mesh.dev/dataplane-mode: none}}
spec: {node: n1, addresses: [198.18.1.11]}
---
apiVersion: lab.mesh.dev/v1alpha1
kind: Service
metadata: {name: whoami, namespace: demo}
spec:
  vips: [198.19.0.10]
  selector: {app: whoami}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

pub(crate) fn lab_state(extra: &str) -> State {
    let docs = manifest::parse(&format!("{LAB}\n---\n{extra}")).expect("YAML").into_iter().map(|d| d.expect("valid document")).collect();
    build(docs, "mesh-system")
}


/// A kube client whose apiserver is the test itself (tower-test): the test receives every request
/// and answers it. Used where the real apiserver cannot run in a plain `cargo test`; the real one
/// is exercised by `tests/apiserver/`.
pub(crate) type ApiHandle = tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

pub(crate) fn mock_client() -> (kube::Client, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// Receives the next request: (method, path and query, JSON body or Null) and a responder.
pub(crate) async fn next_request(
    handle: &mut ApiHandle,
) -> (http::Method, String, serde_json::Value, tower_test::mock::SendResponse<http::Response<kube::client::Body>>) {
    let (req, send) = tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5 s")
        .expect("the client is alive");
    let (method, uri) = (req.method().clone(), req.uri().to_string());
    let bytes = req.into_body().collect_bytes().await.expect("body");
    let body = if bytes.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
    (method, uri, body, send)
}

pub(crate) fn json_response(status: u16, body: &serde_json::Value) -> http::Response<kube::client::Body> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(body).expect("JSON")))
        .expect("response")
}

pub(crate) fn api_error(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
}
