//! mesh-control: turns Kubernetes objects (or a folder of YAML) plus the policy CRDs into one
//! view per node, pushes it over gRPC, and runs the workload CA.
//!
//! Data flow: sources (`filemode`, `k8s`) → `validate` → `snapshot::Publisher` (versioned
//! state) → `view::node_view` per node → `server` (config streams, CA; `tls`, `auth`) ; `status` serves the
//! status endpoint and metrics.

#![allow(clippy::doc_markdown, reason = "Kubernetes kind names (ServiceAccount, TokenReview, ...) are prose in our docs")]
#![allow(clippy::missing_panics_doc, reason = "we only expect() invariants: a bound listener has an address, locks are never poisoned")]

pub mod auth;
pub mod ca;
pub mod client;
pub mod crd;
pub mod election;
pub mod filemode;
pub mod graph;
#[cfg(test)]
mod fixtures;
pub mod k8s;
pub mod manifest;
pub mod metrics;
pub mod routing;
pub mod model;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod tls;
pub mod validate;
pub mod view;

/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default root namespace (its policies apply mesh-wide) and namespace of the controller.
pub const DEFAULT_ROOT_NAMESPACE: &str = "mesh-system";
