//! The decision function: pure, so the decision table can test it exhaustively.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use mesh_l7::jwt::RequestAuth;

use super::policy::{Action, Condition, Destination, Policy, Rule, Source};
use crate::{identity::Identity, state::Workload};

/// What is known about a connection (and, on HTTP ports, the request) when it is authorized at
/// the destination.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    /// `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst: &'a Workload,
    pub dst_port: u16,
    /// The request, on HTTP ports; `None` for a TCP connection.
    pub http: Option<HttpRequest<'a>>,
}

/// The parts of a request Istio's rules look at.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    /// `:authority` / `Host`.
    pub host: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    /// The request's verified JWT, if it carried one (`crate::authn`).
    pub auth: Option<&'a RequestAuth>,
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
    /// The first enforced ALLOW policy that matched (namespace, name), for explanations.
    pub allowed_by: Option<(String, String)>,
    /// Non-enforced policies that applied, with whether they matched: for logs.
    pub shadow: Vec<DryRun>,
}

pub(crate) fn applies(p: &Policy, root_namespace: &str, dst: &Workload) -> bool {
    selects(&p.namespace, p.selector.as_ref(), root_namespace, dst)
}

/// Istio's selection of a policy in `namespace` with `selector`: one in the root namespace
/// applies mesh-wide, another to its own namespace; the selector (if any) narrows by labels.
pub(crate) fn selects(namespace: &str, selector: Option<&BTreeMap<String, String>>, root_namespace: &str, dst: &Workload) -> bool {
    let ns_ok = namespace == root_namespace || namespace == &*dst.namespace;
    ns_ok && selector.is_none_or(|sel| sel.iter().all(|(k, v)| dst.labels.get(k) == Some(v)))
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

fn source_matches(s: &Source, c: &Conn<'_>, action: Action) -> bool {
    let principal = c.src_identity.map(Identity::principal);
    let namespace = c.src_identity.map(|i| i.namespace.as_str());
    let request_principals = match c.http {
        // Istio's request principal `<iss>/<sub>`; a request without a token has none, so it
        // matches no `requestPrincipals` (not even "*") and every `notRequestPrincipals`.
        Some(r) => {
            let p = r.auth.map(|a| a.principal.as_str());
            (s.request_principals.is_empty() || s.request_principals.iter().any(|pat| p.is_some_and(|p| string_match(pat, p))))
                && !s.not_request_principals.iter().any(|pat| p.is_some_and(|p| string_match(pat, p)))
        }
        // Not HTTP: fail closed.
        None => !s.needs_request() || action == Action::Deny,
    };
    request_principals
        && (s.principals.is_empty() || any_match(&s.principals, principal.as_deref()))
        && !any_match(&s.not_principals, principal.as_deref())
        && (s.namespaces.is_empty() || any_match(&s.namespaces, namespace))
        && !any_match(&s.not_namespaces, namespace)
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|n| n.contains(&c.src_ip)))
        && !s.not_ip_blocks.iter().any(|n| n.contains(&c.src_ip))
}

/// Istio string match over a list: any pattern (`*`, `prefix*`, `*suffix`, exact) matches.
fn matches_any(patterns: &[String], value: &str, case_insensitive: bool) -> bool {
    patterns.iter().any(|p| {
        if case_insensitive { string_match(&p.to_ascii_lowercase(), &value.to_ascii_lowercase()) } else { string_match(p, value) }
    })
}

/// A field that is set must match; a `not` field must not. An unset field always passes.
fn field(include: &[String], exclude: &[String], value: &str, case_insensitive: bool) -> bool {
    (include.is_empty() || matches_any(include, value, case_insensitive)) && !matches_any(exclude, value, case_insensitive)
}

/// Hosts match the authority with or without its port (Istio compares both forms).
fn host_field(include: &[String], exclude: &[String], host: Option<&str>) -> bool {
    let host = host.unwrap_or("");
    let bare = host.rsplit_once(':').filter(|(h, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')).map_or(host, |(h, _)| h);
    let any = |list: &[String]| matches_any(list, host, true) || matches_any(list, bare, true);
    (include.is_empty() || any(include)) && !any(exclude)
}

fn destination_matches(d: &Destination, c: &Conn<'_>, action: Action) -> bool {
    let l4 = (d.ports.is_empty() || d.ports.contains(&c.dst_port)) && !d.not_ports.contains(&c.dst_port);
    if !l4 || !d.has_l7() {
        return l4;
    }
    match c.http {
        Some(r) => {
            field(&d.methods, &d.not_methods, r.method, false)
                && field(&d.paths, &d.not_paths, r.path, false)
                && host_field(&d.hosts, &d.not_hosts, r.host)
        }
        // Not HTTP: the L7 part cannot be evaluated. Fail closed.
        None => action == Action::Deny,
    }
}

fn ip_matches(values: &[String], ip: IpAddr) -> bool {
    values.iter().any(|v| v.parse::<IpNet>().map(|n| n.contains(&ip)).or_else(|_| v.parse::<IpAddr>().map(|a| a == ip)).unwrap_or(false))
}

fn condition_matches(k: &Condition, c: &Conn<'_>, action: Action) -> bool {
    let principal = c.src_identity.map(Identity::principal);
    // An absent attribute (plaintext has no principal) matches no value and is excluded by none.
    let strings = |value: Option<&str>| {
        (k.values.is_empty() || value.is_some_and(|v| matches_any(&k.values, v, false))) && !value.is_some_and(|v| matches_any(&k.not_values, v, false))
    };
    let ips = |ip: IpAddr| (k.values.is_empty() || ip_matches(&k.values, ip)) && !ip_matches(&k.not_values, ip);
    let auth = c.http.and_then(|r| r.auth);
    // JWT attributes: absent without a token (matching no value, excluded by none).
    let claims = |values: Vec<&str>| {
        (k.values.is_empty() || values.iter().any(|v| matches_any(&k.values, v, false))) && !values.iter().any(|v| matches_any(&k.not_values, v, false))
    };
    match k.key.as_str() {
        "request.auth.principal" if c.http.is_some() => strings(auth.map(|a| a.principal.as_str())),
        "request.auth.audiences" if c.http.is_some() => claims(auth.map(|a| a.audiences.iter().map(String::as_str).collect()).unwrap_or_default()),
        "request.auth.presenter" if c.http.is_some() => strings(auth.and_then(|a| a.presenter.as_deref())),
        key if c.http.is_some() && key.starts_with("request.auth.claims[") => {
            let path = claim_path(key);
            claims(auth.zip(path).map(|(a, p)| a.claim(&p)).unwrap_or_default())
        }
        "source.ip" | "remote.ip" => ips(c.src_ip),
        "destination.ip" => ips(c.dst.ip),
        "source.namespace" => strings(c.src_identity.map(|i| i.namespace.as_str())),
        "source.principal" => strings(principal.as_deref()),
        "destination.port" => strings(Some(&c.dst_port.to_string())),
        key => match (key.strip_prefix("request.headers[").and_then(|h| h.strip_suffix(']')), c.http) {
            (Some(name), Some(r)) => {
                let values: Vec<&str> = r.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                (k.values.is_empty() || values.iter().any(|v| matches_any(&k.values, v, false)))
                    && !values.iter().any(|v| matches_any(&k.not_values, v, false))
            }
            // Not HTTP, or an attribute this node does not have (`connection.sni`): fail closed.
            _ => action == Action::Deny,
        },
    }
}

/// `request.auth.claims[a][b]` → `["a", "b"]`; `None` if malformed.
fn claim_path(key: &str) -> Option<Vec<&str>> {
    let inner = key.strip_prefix("request.auth.claims[")?.strip_suffix(']')?;
    let path: Vec<&str> = inner.split("][").collect();
    path.iter().all(|p| !p.is_empty() && !p.contains(['[', ']'])).then_some(path)
}

fn rule_matches(r: &Rule, c: &Conn<'_>, action: Action) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, c, action)))
        && (r.to.is_empty() || r.to.iter().any(|d| destination_matches(d, c, action)))
        && r.when.iter().all(|k| condition_matches(k, c, action))
}

fn policy_matches(p: &Policy, c: &Conn<'_>) -> bool {
    // AUDIT and dry-run policies are evaluated as what they report: "would this match".
    let action = if p.action == Action::Deny { Action::Deny } else { Action::Allow };
    p.rules.iter().any(|r| rule_matches(r, c, action))
}

pub fn evaluate(policies: &[Policy], root_namespace: &str, c: &Conn<'_>) -> Verdict {
    let mut shadow = Vec::new();
    let mut deny = None;
    let mut allow_applies = false;
    let mut allowed = false;
    let mut allowed_by = None;
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
                if matched && allowed_by.is_none() {
                    allowed_by = Some((p.namespace.clone(), p.name.clone()));
                }
            }
            _ => {}
        }
    }
    let decision = match deny {
        Some(reason) => Decision::Deny(reason),
        None if allow_applies && !allowed => Decision::Deny(DenyReason::NoAllowMatch),
        None => Decision::Allow,
    };
    Verdict { decision, allowed_by, shadow }
}
