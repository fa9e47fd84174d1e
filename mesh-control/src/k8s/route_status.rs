//! Status of the routing kinds, by server-side apply on the status subresource, only when it
//! differs from what the object says:
//! - `HTTPRoute`/`GRPCRoute`: `status.parents[]`, one entry per parent the mesh handles, with
//!   our `controllerName`. Entries of other controllers (a gateway implementation's, for its
//!   Gateway parents) are kept: `parents` is one list, so every write carries them along.
//! - `VirtualService`/`DestinationRule`: `status.conditions` (`Accepted`, and `ResolvedRefs` for
//!   VirtualServices), like the policies.

use k8s_openapi::jiff::Timestamp;
use kube::Client;

use super::status::{apply, conditions};
use crate::{
    crd::{
        PolicyStatus, Read,
        gateway::{self, RouteParentStatus, RouteStatus},
        networking,
    },
    election::Leadership,
    routing::{Condition, Kind, Objects, ParentVerdict, Verdict, VerdictStatus},
};

/// Our `controllerName` in `status.parents[]` (Gateway API's domain-prefixed form).
pub const CONTROLLER_NAME: &str = "mesh.dev/mesh-control";

/// The `status.conditions` of one of our kinds, or `None` when up to date (sans-IO).
pub fn desired_conditions(
    cs: &[Condition],
    generation: Option<i64>,
    current: Option<&PolicyStatus>,
    now: Timestamp,
) -> Option<PolicyStatus> {
    let old = current.map_or(&[][..], |s| s.conditions.as_slice());
    conditions(cs, generation, old, now).map(|conditions| PolicyStatus {
        observed_generation: generation,
        conditions,
    })
}

/// The `status.parents` of a Gateway API route: other controllers' entries as they are, ours
/// as `parents` says; `None` when our entries already say that (sans-IO).
pub fn desired_parents(
    parents: &[ParentVerdict],
    generation: Option<i64>,
    current: Option<&RouteStatus>,
    now: Timestamp,
) -> Option<RouteStatus> {
    let existing = current.map_or(&[][..], |s| s.parents.as_slice());
    let (ours, others): (Vec<&RouteParentStatus>, Vec<&RouteParentStatus>) = existing
        .iter()
        .partition(|p| p.controller_name == CONTROLLER_NAME);
    let mut changed = ours.len() != parents.len();
    let mut entries: Vec<RouteParentStatus> = others.into_iter().cloned().collect();
    for p in parents {
        let old = ours
            .iter()
            .find(|o| o.parent_ref == p.reference)
            .map_or(&[][..], |o| o.conditions.as_slice());
        let conditions = match conditions(&p.conditions, generation, old, now) {
            Some(new) => {
                changed = true;
                new
            }
            None => old.to_vec(),
        };
        entries.push(RouteParentStatus {
            parent_ref: p.reference.clone(),
            controller_name: CONTROLLER_NAME.into(),
            conditions,
        });
    }
    changed.then_some(RouteStatus { parents: entries })
}

fn find<'a, K: kube::Resource>(
    list: &'a [Read<K>],
    key: &crate::model::NamespacedName,
) -> Option<&'a K> {
    list.iter().map(|r| &r.object).find(|o| {
        o.meta().namespace.as_deref() == Some(key.namespace.as_str())
            && o.meta().name.as_deref() == Some(key.name.as_str())
    })
}

/// Writes every verdict's status that is out of date while `leadership` says we lead (checked
/// before each write); returns how many writes succeeded.
pub async fn write_all(client: &Client, leadership: &Leadership, verdicts: &[Verdict], objects: &Objects) -> usize {
    let now = Timestamp::now();
    let mut written = 0;
    for v in verdicts.iter().take_while(|_| leadership.is_leader()) {
        let (key, generation) = (&v.key, v.generation);
        match (&v.status, v.kind) {
            (VerdictStatus::Parents(ps), Kind::HttpRoute) => {
                if let Some(s) = find(&objects.http_routes, key)
                    .and_then(|o| desired_parents(ps, generation, o.status.as_ref(), now))
                {
                    written += usize::from(apply::<gateway::HttpRoute>(client, key, &s).await);
                }
            }
            (VerdictStatus::Parents(ps), Kind::GrpcRoute) => {
                if let Some(s) = find(&objects.grpc_routes, key)
                    .and_then(|o| desired_parents(ps, generation, o.status.as_ref(), now))
                {
                    written += usize::from(apply::<gateway::GrpcRoute>(client, key, &s).await);
                }
            }
            (VerdictStatus::Conditions(cs), Kind::VirtualService) => {
                if let Some(s) = find(&objects.virtual_services, key)
                    .and_then(|o| desired_conditions(cs, generation, o.status.as_ref(), now))
                {
                    written += usize::from(apply::<networking::VirtualService>(client, key, &s).await);
                }
            }
            (VerdictStatus::Conditions(cs), Kind::DestinationRule) => {
                if let Some(s) = find(&objects.destination_rules, key)
                    .and_then(|o| desired_conditions(cs, generation, o.status.as_ref(), now))
                {
                    written += usize::from(apply::<networking::DestinationRule>(client, key, &s).await);
                }
            }
            (VerdictStatus::Conditions(cs), Kind::LocalRateLimit) => {
                if let Some(s) = find(&objects.local_rate_limits, key)
                    .and_then(|o| desired_conditions(cs, generation, o.status.as_ref(), now))
                {
                    written += usize::from(apply::<networking::LocalRateLimit>(client, key, &s).await);
                }
            }
            _ => {
                tracing::error!(kind = v.kind.as_str(), object = %key, "verdict shape does not fit the kind (a bug)");
            }
        }
    }
    written
}

#[cfg(test)]
#[path = "route_status_tests.rs"]
mod tests;
