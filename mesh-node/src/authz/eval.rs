//! The decision function: pure, so the decision table can test it exhaustively.

use std::{collections::BTreeMap, net::IpAddr};

use super::policy::{Action, Destination, Policy, Rule, Source};
use crate::{identity::Identity, state::Workload};

/// What is known about a connection when it is authorized at the destination.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    /// `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst: &'a Workload,
    pub dst_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched.
    DenyPolicy { namespace: String, name: String },
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatch,
}

impl DenyReason {
    /// Stable label value for metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::DenyPolicy { .. } => "deny_policy",
            Self::NoAllowMatch => "no_allow_match",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(DenyReason),
}

/// A dry-run or AUDIT policy that matched (or, for dry-run ALLOW, would have denied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRun {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// Whether the policy's rules matched the connection.
    pub matched: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Non-enforced policies that applied, with whether they matched: for logs.
    pub shadow: Vec<DryRun>,
}

pub(crate) fn applies(p: &Policy, root_namespace: &str, dst: &Workload) -> bool {
    let ns_ok = p.namespace == root_namespace || p.namespace == dst.namespace;
    ns_ok && p.selector.as_ref().is_none_or(|sel| selects(sel, &dst.labels))
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Istio string match: `*` (any value present), `prefix*`, `*suffix`, or exact.
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn any_match(patterns: &[String], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| string_match(p.strip_prefix("spiffe://").unwrap_or(p), v)))
}

fn source_matches(s: &Source, c: &Conn<'_>) -> bool {
    let principal = c.src_identity.map(Identity::principal);
    let namespace = c.src_identity.map(|i| i.namespace.as_str());
    (s.principals.is_empty() || any_match(&s.principals, principal.as_deref()))
        && !any_match(&s.not_principals, principal.as_deref())
        && (s.namespaces.is_empty() || any_match(&s.namespaces, namespace))
        && !any_match(&s.not_namespaces, namespace)
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|n| n.contains(&c.src_ip)))
        && !s.not_ip_blocks.iter().any(|n| n.contains(&c.src_ip))
}

fn destination_matches(d: &Destination, c: &Conn<'_>) -> bool {
    (d.ports.is_empty() || d.ports.contains(&c.dst_port)) && !d.not_ports.contains(&c.dst_port)
}

fn rule_matches(r: &Rule, c: &Conn<'_>) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, c)))
        && (r.to.is_empty() || r.to.iter().any(|d| destination_matches(d, c)))
}

fn policy_matches(p: &Policy, c: &Conn<'_>) -> bool {
    p.rules.iter().any(|r| rule_matches(r, c))
}

pub fn evaluate(policies: &[Policy], root_namespace: &str, c: &Conn<'_>) -> Verdict {
    let mut shadow = Vec::new();
    let mut deny = None;
    let mut allow_applies = false;
    let mut allowed = false;
    for p in policies.iter().filter(|p| applies(p, root_namespace, c.dst)) {
        let matched = policy_matches(p, c);
        if p.dry_run || p.action == Action::Audit {
            shadow.push(DryRun { namespace: p.namespace.clone(), name: p.name.clone(), action: p.action, matched });
            continue;
        }
        match p.action {
            Action::Deny if matched && deny.is_none() => {
                deny = Some(DenyReason::DenyPolicy { namespace: p.namespace.clone(), name: p.name.clone() });
            }
            Action::Allow => {
                allow_applies = true;
                allowed |= matched;
            }
            _ => {}
        }
    }
    let decision = match deny {
        Some(reason) => Decision::Deny(reason),
        None if allow_applies && !allowed => Decision::Deny(DenyReason::NoAllowMatch),
        None => Decision::Allow,
    };
    Verdict { decision, shadow }
}
