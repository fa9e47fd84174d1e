//! Authorization with Istio `AuthorizationPolicy` semantics, and `PeerAuthentication` modes.
//! Enforced at the destination node, before a byte reaches the destination pod: per connection
//! on TCP ports, per request on HTTP ports. The one evaluator for both.
//!
//! Evaluation (Istio's order): a matching enforced DENY policy denies; otherwise, if any enforced
//! ALLOW policy applies to the workload, one of its rules must match; otherwise allow. AUDIT
//! policies and dry-run policies never change the decision; their would-be outcome is reported.
//! Rules that need a request (L7 fields, `request.*` conditions) fail closed on a connection that
//! is not HTTP: they never match in ALLOW, and match on their L4 part in DENY.

mod eval;
mod peer_auth;
mod policy;
#[cfg(test)]
mod tests;

pub use eval::{Conn, Decision, DenyReason, DryRun, HttpRequest, Verdict, evaluate};
pub(crate) use eval::{applies, selects};
pub use peer_auth::{Mode, PeerAuthentication, mode_for};
pub use policy::{Action, Condition, Destination, Policy, Rule, Source};
