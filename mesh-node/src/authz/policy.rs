//! `AuthorizationPolicy` as a domain type, Istio's CRD (field names follow it): sources, L4 and L7
//! operations, and `when` conditions.

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

/// Matches when any `from` entry matches (or there are none), any `to` entry matches (or there
/// are none) and every `when` condition holds.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether anything in the rule needs the request (HTTP) to be evaluated.
    pub fn needs_request(&self) -> bool {
        self.from.iter().any(Source::needs_request) || self.to.iter().any(Destination::has_l7) || self.when.iter().any(Condition::needs_request)
    }
}

/// Istio's `when`: `key` is one of the attributes below; `values` alternatives (OR), `notValues`
/// exclusions. Values use Istio's string matching (`*`, `prefix*`, `*suffix`) and, for IP keys,
/// addresses or CIDRs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

impl Condition {
    /// `request.*` keys, and keys this node cannot evaluate, need the request: without one they
    /// fail closed.
    pub fn needs_request(&self) -> bool {
        !matches!(
            self.key.as_str(),
            "source.ip" | "remote.ip" | "source.namespace" | "source.principal" | "destination.ip" | "destination.port"
        )
    }
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
    /// `<iss>/<sub>` of the request's verified JWT (`crate::authn`): HTTP requests only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
}

impl Source {
    /// Request principals come from a request's token: a TCP connection has none to check.
    pub fn needs_request(&self) -> bool {
        !(self.request_principals.is_empty() && self.not_request_principals.is_empty())
    }
}

/// Istio's `to.operation`. `methods`, `paths` and `hosts` (and their negations) are L7: they are
/// evaluated against each HTTP request; on a port that is not HTTP they cannot match, which
/// fails closed (see `eval`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

impl Destination {
    pub fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}
