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

