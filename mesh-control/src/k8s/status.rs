//! Policy status writes: the `Accepted` condition of every policy object, by server-side apply on
//! the status subresource, only when it differs from what the object already says. The condition
//! and apply helpers serve the routing kinds too (`route_status`).

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use super::ca_secret::FIELD_MANAGER;
use crate::{
    crd::{self, PolicyStatus},
    election::Leadership,
    model::{NamespacedName, StatusCondition},
    validate::{PolicyKind, Verdict},
};

pub const ACCEPTED: &str = "Accepted";

/// The status a verdict calls for, or `None` when `current` already says it (sans-IO).
pub fn desired(v: &Verdict, current: Option<&PolicyStatus>, now: Timestamp) -> Option<PolicyStatus> {
    let wanted = match &v.result {
        Ok(()) => StatusCondition::yes(ACCEPTED, "Accepted", "the policy is valid and distributed to the nodes"),
        Err(e) => StatusCondition::no(ACCEPTED, e.reason(), v.message()),
    };
    let old = current.map_or(&[][..], |s| s.conditions.as_slice());
    let conditions = conditions(std::slice::from_ref(&wanted), v.generation, old, now)?;
    Some(PolicyStatus { observed_generation: v.generation, conditions })
}

/// The conditions to write, or `None` when `old` already says exactly `wanted` for this
/// generation (so an unchanged object is never written: no write loop). A condition's
/// transition time moves only when its status flips.
pub fn conditions(wanted: &[StatusCondition], generation: Option<i64>, old: &[Condition], now: Timestamp) -> Option<Vec<Condition>> {
    let status = |b: bool| if b { "True" } else { "False" };
    let same = wanted.len() == old.len()
        && wanted.iter().zip(old).all(|(w, c)| {
            c.type_ == w.type_ && c.status == status(w.status) && c.reason == w.reason && c.message == w.message && c.observed_generation == generation
        });
    if same {
        return None;
    }
    Some(
        wanted
            .iter()
            .map(|w| {
                let since = old.iter().find(|c| c.type_ == w.type_ && c.status == status(w.status)).map_or(Time(now), |c| c.last_transition_time.clone());
                Condition {
                    type_: w.type_.into(),
                    status: status(w.status).into(),
                    reason: w.reason.into(),
                    message: w.message.clone(),
                    observed_generation: generation,
                    last_transition_time: since,
                }
            })
            .collect(),
    )
}

/// Writes every policy status that is out of date while `leadership` says we lead (checked
/// before each write: a lost lead stops them at once); returns how many writes succeeded.
pub async fn write_all(
    client: &Client,
    leadership: &Leadership,
    verdicts: &[Verdict],
    authz: &[crd::AuthorizationPolicy],
    peer: &[crd::PeerAuthentication],
    request_authn: &[crd::RequestAuthentication],
    telemetry: &[crd::telemetry::Telemetry],
) -> usize {
    let mut written = 0;
    for v in verdicts.iter().take_while(|_| leadership.is_leader()) {
        let ok = match v.kind {
            PolicyKind::AuthorizationPolicy => write(client, v, authz, |o| o.status.as_ref()).await,
            PolicyKind::PeerAuthentication => write(client, v, peer, |o| o.status.as_ref()).await,
            PolicyKind::RequestAuthentication => write(client, v, request_authn, |o| o.status.as_ref()).await,
            PolicyKind::Telemetry => write(client, v, telemetry, |o| o.status.as_ref()).await,
        };
        written += usize::from(ok);
    }
    written
}

async fn write<K>(client: &Client, v: &Verdict, objects: &[K], status_of: impl Fn(&K) -> Option<&PolicyStatus>) -> bool
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let Some(obj) = find(objects, &v.key) else { return false };
    match desired(v, status_of(obj), Timestamp::now()) {
        Some(status) => apply::<K>(client, &v.key, &status).await,
        None => false,
    }
}

/// The object with this key.
fn find<'a, K: Resource>(objects: &'a [K], key: &NamespacedName) -> Option<&'a K> {
    objects.iter().find(|o| o.meta().namespace.as_deref() == Some(key.namespace.as_str()) && o.meta().name.as_deref() == Some(key.name.as_str()))
}

/// Writes `status` by server-side apply on the status subresource (forced: the controller owns
/// the status). A failure is logged and retried with the next change. Returns whether it was
/// written.
pub async fn apply<K>(client: &Client, key: &NamespacedName, status: &impl Serialize) -> bool
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let kind = K::kind(&());
    let patch = serde_json::json!({ "apiVersion": K::api_version(&()), "kind": kind, "status": status });
    let api: Api<K> = Api::namespaced(client.clone(), &key.namespace);
    match api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
        Ok(_) => {
            tracing::debug!(%kind, object = %key, "status written");
            true
        }
        Err(e) => {
            tracing::warn!(%kind, object = %key, "writing status failed: {e}");
            false
        }
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
