//! `PeerAuthentication`: whether a meshed workload accepts plaintext. Resolution as Istio: a
//! workload-selector policy in the workload's namespace wins, then the namespace-wide one, then
//! the mesh-wide one (root namespace); with none, PERMISSIVE.

use std::collections::BTreeMap;

use crate::state::Workload;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// mTLS only: plaintext is refused.
    Strict,
    /// mTLS and plaintext both accepted.
    Permissive,
    /// Treated as PERMISSIVE at L4: the daemon never strips mTLS it receives.
    Disable,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: Mode,
}

pub fn mode_for(pas: &[PeerAuthentication], root_namespace: &str, w: &Workload) -> Mode {
    let selected = |p: &&PeerAuthentication| {
        p.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    };
    let own = || pas.iter().filter(|p| *p.namespace == *w.namespace);
    own()
        .find(selected)
        .or_else(|| own().find(|p| p.selector.is_none()))
        .or_else(|| pas.iter().find(|p| p.namespace == root_namespace && p.selector.is_none()))
        .map_or(Mode::Permissive, |p| p.mode)
}
