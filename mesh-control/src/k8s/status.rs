//! Policy status writes: the `Accepted` condition of every policy object, by server-side apply on
//! the status subresource, only when it differs from what the object already says.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use super::ca_secret::FIELD_MANAGER;
use crate::{
    crd::{self, PolicyStatus},
    validate::{PolicyKind, Verdict},
};

pub const ACCEPTED: &str = "Accepted";

/// The status a verdict calls for, or `None` when `current` already says it (sans-IO).
pub fn desired(v: &Verdict, current: Option<&PolicyStatus>, now: Timestamp) -> Option<PolicyStatus> {
    let (status, reason, message) = match &v.result {
        Ok(()) => ("True", "Accepted", String::from("the policy is valid and distributed to the nodes")),
        Err(e) => ("False", e.reason(), e.to_string()),
    };
    let old = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
    if let Some(c) = old
        && c.status == status
        && c.reason == reason
        && c.message == message
        && c.observed_generation == v.generation
    {
        return None;
    }
    // The transition time moves only when the status value flips.
    let since = old.filter(|c| c.status == status).map_or(Time(now), |c| c.last_transition_time.clone());
    Some(PolicyStatus {
        observed_generation: v.generation,
        conditions: vec![Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: v.generation,
            last_transition_time: since,
        }],
    })
}

pub async fn write_all(client: &Client, verdicts: &[Verdict], authz: &[crd::AuthorizationPolicy], peer: &[crd::PeerAuthentication]) {
    for v in verdicts {
        match v.kind {
            PolicyKind::AuthorizationPolicy => write(client, v, authz, |o| o.status.as_ref()).await,
            PolicyKind::PeerAuthentication => write(client, v, peer, |o| o.status.as_ref()).await,
        }
    }
}

async fn write<K>(client: &Client, v: &Verdict, objects: &[K], status_of: impl Fn(&K) -> Option<&PolicyStatus>)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let Some(obj) = objects.iter().find(|o| o.namespace().as_deref() == Some(v.key.namespace.as_str()) && o.name_any() == v.key.name) else {
        return;
    };
    let Some(status) = desired(v, status_of(obj), Timestamp::now()) else { return };
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let api: Api<K> = Api::namespaced(client.clone(), &v.key.namespace);
    match api.patch_status(&v.key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
        Ok(_) => tracing::debug!(kind = v.kind.as_str(), policy = %v.key, "status written"),
        Err(e) => tracing::warn!(kind = v.kind.as_str(), policy = %v.key, "writing status failed: {e}"),
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
