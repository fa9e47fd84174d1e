//! End-user authentication: Istio's `RequestAuthentication` as this node applies it. Which JWT
//! providers apply to a local workload (same selection as authorization: the root namespace is
//! mesh-wide, a selector narrows), and the key sets fetched from `jwksUri`s ([`jwks`]).
//! Verification itself is `mesh_l7::jwt`; the request layer is `mesh_l7::layer::authenticate`.

pub mod jwks;

use std::{collections::BTreeMap, sync::Arc};

use mesh_l7::jwt::{Jwks, Provider};

use crate::{authz, state::Workload};

pub use jwks::JwksCache;

/// One `RequestAuthentication`, its rules compiled into providers (inline key sets parsed once).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(serialize_with = "summary")]
    pub providers: Arc<[Provider]>,
}

impl RequestAuthentication {
    pub fn applies(&self, root_namespace: &str, dst: &Workload) -> bool {
        authz::selects(&self.namespace, self.selector.as_ref(), root_namespace, dst)
    }
}

/// The config dump shows each rule's issuer and where its keys come from.
fn summary<S: serde::Serializer>(providers: &Arc<[Provider]>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = s.serialize_seq(Some(providers.len()))?;
    for p in providers.iter() {
        let keys = match &p.jwks {
            Jwks::Inline(set) => format!("inline ({} keys)", set.len()),
            Jwks::Uri(uri) => uri.clone(),
        };
        seq.serialize_element(&serde_json::json!({"issuer": p.issuer, "audiences": p.audiences, "jwks": keys}))?;
    }
    seq.end()
}

/// The providers that apply to `dst`, in policy order: empty when no RequestAuthentication
/// selects it (the common case, without allocating).
pub fn providers_for<'a>(all: &'a [RequestAuthentication], root_namespace: &str, dst: &Workload) -> Vec<&'a Provider> {
    all.iter().filter(|r| r.applies(root_namespace, dst)).flat_map(|r| r.providers.iter()).collect()
}

/// The `jwksUri`s the state's policies name, for the cache to fetch.
pub fn jwks_uris(all: &[RequestAuthentication]) -> std::collections::BTreeSet<String> {
    all.iter()
        .flat_map(|r| r.providers.iter())
        .filter_map(|p| match &p.jwks {
            Jwks::Uri(u) => Some(u.clone()),
            Jwks::Inline(_) => None,
        })
        .collect()
}
