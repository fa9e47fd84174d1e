//! `AuthorizationPolicy` as a domain type: the L4 subset of Istio's CRD (field names follow it).

use std::collections::BTreeMap;

use ipnet::IpNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Logged and counted, never enforced.
    Audit,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// `selector.matchLabels`; `None` selects every workload of the namespace (or of the mesh, in
    /// the root namespace).
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    /// Istio's `istio.io/dry-run` annotation: evaluated and reported, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// No rules: an ALLOW policy matches nothing (so it denies everything it selects), a DENY
    /// policy matches nothing. One empty rule matches everything.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Matches when any `from` entry matches (or there are none) and any `to` entry matches (or
/// there are none).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Destination>,
}

/// Every field that is set must match (AND); values within a field are alternatives (OR); a
/// `not*` field matches when none of its values does. Principals and namespaces come from the
/// peer's mTLS identity, so plaintext never matches them (and always matches their negations).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpNet>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}
