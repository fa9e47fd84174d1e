//! L4 authorization with Istio `AuthorizationPolicy` semantics, and `PeerAuthentication` modes.
//! Enforced at the destination node, before a byte reaches the destination pod.
//!
//! Evaluation (Istio's order): a matching enforced DENY policy denies; otherwise, if any enforced
//! ALLOW policy applies to the workload, one of its rules must match; otherwise allow. AUDIT
//! policies and dry-run policies never change the decision; their would-be outcome is reported.

mod eval;
mod peer_auth;
mod policy;
#[cfg(test)]
mod tests;

pub use eval::{Conn, Decision, DenyReason, DryRun, Verdict, evaluate};
pub(crate) use eval::applies;
pub use peer_auth::{Mode, PeerAuthentication, mode_for};
pub use policy::{Action, Destination, Policy, Rule, Source};
