//! `HTTPRoute` and `GRPCRoute` → [`GatewayRoute`]: upstream's defaults applied, every value
//! checked the way upstream's schema and CEL rules would (a cluster on an old Kubernetes, or file
//! mode, has neither), GRPCRoute method matches turned into path matches.

use std::sync::LazyLock;

use super::{
    BackendRef, Error, GatewayRoute, GatewayRule, Parent, ParentTarget, gep_duration, header_modifier, header_name, header_value,
    hostname, identity, no_unknown_fields, path, path_modifier, port, redirect_scheme, redirect_status, regex, weight,
};
use crate::{
    crd::{Read, gateway as api},
    model::NamespacedName,
    routing::model::{HeaderModifier, Match, PathModifier, Redirect, Retry, SourceKind, StringMatch, Timeouts, UrlRewrite},
};

/// `type` values of `HTTPRouteMatch.method`.
const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

pub fn http_route(r: &Read<api::HttpRoute>) -> Result<GatewayRoute, Error> {
    no_unknown_fields(&r.unknown_fields, hint)?;
    let o = &r.object;
    let id = identity(&o.metadata);
    parent_ports(&o.spec.parent_refs)?;
    let mut notes = hostnames(&o.spec.hostnames)?;
    let mut rules = Vec::new();
    for (i, rule) in o.spec.rules.iter().enumerate() {
        rules.push(http_rule(rule, i, &id.key.namespace, &mut notes)?);
    }
    Ok(GatewayRoute { kind: SourceKind::HttpRoute, parents: parents(&o.spec.parent_refs, &id.key.namespace), id, rules, notes })
}

pub fn grpc_route(r: &Read<api::GrpcRoute>) -> Result<GatewayRoute, Error> {
    no_unknown_fields(&r.unknown_fields, hint)?;
    let o = &r.object;
    let id = identity(&o.metadata);
    let key = &id.key;
    parent_ports(&o.spec.parent_refs)?;
    let notes = hostnames(&o.spec.hostnames)?;
    let mut rules = Vec::new();
    for (i, rule) in o.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let matches = if rule.matches.is_empty() {
            vec![every_request()]
        } else {
            rule.matches.iter().enumerate().map(|(j, m)| grpc_match(m, &format!("{field}.matches[{j}]"))).collect::<Result<_, _>>()?
        };
        let f = filters(&rule.filters, &field, Allowed::Grpc, &key.namespace)?;
        rules.push(GatewayRule {
            index: index(i),
            name: rule.name.clone(),
            matches,
            request_headers: f.request_headers,
            response_headers: f.response_headers,
            rewrite: None,
            redirect: None,
            mirrors: f.mirrors,
            backends: backends(&rule.backend_refs, &field, &key.namespace)?,
            timeouts: Timeouts::default(),
            retry: None,
        });
    }
    Ok(GatewayRoute { kind: SourceKind::GrpcRoute, parents: parents(&o.spec.parent_refs, &key.namespace), id, rules, notes })
}

/// What we can tell a user about fields of newer or experimental Gateway API channels.
fn hint(field: &str) -> &'static str {
    match field {
        "sessionPersistence" => "session persistence is not implemented",
        "cors" | "externalAuth" => "this filter is not implemented",
        "useDefaultGateways" => "Gateways are not used by the mesh",
        _ => "a Gateway API field the mesh does not implement",
    }
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn every_request() -> Match {
    Match { path: Some(StringMatch::PathPrefix("/".into())), ..Match::default() }
}

fn hostnames(names: &[String]) -> Result<Vec<String>, Error> {
    for (i, h) in names.iter().enumerate() {
        hostname(&format!("spec.hostnames[{i}]"), h, true)?;
    }
    Ok(if names.is_empty() {
        Vec::new()
    } else {
        vec!["spec.hostnames: not matched: a route attached to a Service applies to every request sent to the Service, whatever its Host".into()]
    })
}

fn parent_ports(refs: &[api::ParentReference]) -> Result<(), Error> {
    for (i, p) in refs.iter().enumerate() {
        if let Some(v) = p.port {
            port(&format!("spec.parentRefs[{i}].port"), v.into())?;
        }
    }
    Ok(())
}

/// Which parentRefs are ours. Never fails, so a route that is invalid still gets its
/// `Accepted=False` on each of our parents.
pub fn parents(refs: &[api::ParentReference], namespace: &str) -> Vec<Parent> {
    refs.iter()
        .enumerate()
        .map(|(i, p)| {
            let field = format!("spec.parentRefs[{i}]");
            let port = p.port.and_then(|v| u16::try_from(v).ok()).filter(|p| *p != 0);
            let group = p.group.as_deref().unwrap_or(api::GROUP);
            let target = match (group, p.kind.as_deref().unwrap_or("Gateway")) {
                ("", "Service") => ParentTarget::Service {
                    service: NamespacedName::new(p.namespace.as_deref().unwrap_or(namespace), &p.name),
                    port,
                    section: p.section_name.clone(),
                },
                (_, "Service") => ParentTarget::Invalid {
                    why: format!("{field}: kind Service needs group \"\" (the core group); group {group:?} has no kind Service"),
                },
                ("", kind) => ParentTarget::Invalid { why: format!("{field}: kind {kind} cannot be a parent; the mesh takes Services (group \"\", kind Service)") },
                _ => ParentTarget::NotOurs,
            };
            Parent { reference: p.clone(), target }
        })
        .collect()
}

fn http_rule(rule: &api::HttpRouteRule, i: usize, namespace: &str, notes: &mut Vec<String>) -> Result<GatewayRule, Error> {
    let field = format!("spec.rules[{i}]");
    let matches: Vec<Match> = if rule.matches.is_empty() {
        vec![every_request()]
    } else {
        rule.matches.iter().enumerate().map(|(j, m)| http_match(m, &format!("{field}.matches[{j}]"))).collect::<Result<_, _>>()?
    };
    let f = filters(&rule.filters, &field, Allowed::Http, namespace)?;
    // ReplacePrefixMatch replaces what a PathPrefix matched: with any other match it has no
    // defined meaning, and the spec says the route is then not accepted.
    let prefix_modifier = f.rewrite.as_ref().and_then(|r| r.path.as_ref()).or(f.redirect.as_ref().and_then(|r| r.path.as_ref()));
    if matches!(prefix_modifier, Some(PathModifier::Prefix(_)))
        && let Some(j) = matches.iter().position(|m| !matches!(m.path, Some(StringMatch::PathPrefix(_))))
    {
        return Err(Error::Conflict {
            field: format!("{field}.filters"),
            what: format!("ReplacePrefixMatch needs every match of the rule to be a PathPrefix match, and {field}.matches[{j}] is not"),
        });
    }
    let backends = backends(&rule.backend_refs, &field, namespace)?;
    if f.redirect.is_some() && !backends.is_empty() {
        notes.push(format!("{field}.backendRefs: not used: the rule answers with a RequestRedirect"));
    }
    let mut timeouts = Timeouts::default();
    if let Some(t) = &rule.timeouts {
        timeouts.request = t.request.as_deref().map(|v| gep_duration(&format!("{field}.timeouts.request"), v)).transpose()?.flatten();
        timeouts.backend_request =
            t.backend_request.as_deref().map(|v| gep_duration(&format!("{field}.timeouts.backendRequest"), v)).transpose()?.flatten();
        if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
            && backend > request
        {
            return Err(Error::Conflict {
                field: format!("{field}.timeouts.backendRequest"),
                what: "must not be longer than timeouts.request (which covers every attempt)".into(),
            });
        }
    }
    let retry = rule.retry.as_ref().map(|r| retry(r, &format!("{field}.retry"))).transpose()?;
    if retry.is_some() {
        notes.push(format!("{field}.retry: carried, not enforced yet"));
    }
    Ok(GatewayRule {
        index: index(i),
        name: rule.name.clone(),
        matches,
        request_headers: f.request_headers,
        response_headers: f.response_headers,
        rewrite: f.rewrite,
        redirect: f.redirect,
        mirrors: f.mirrors,
        backends,
        timeouts,
        retry,
    })
}

fn retry(r: &api::HttpRouteRetry, field: &str) -> Result<Retry, Error> {
    let attempts = r.attempts.map_or(Ok(0), |a| super::in_range(&format!("{field}.attempts"), a.into(), 0, i64::from(i32::MAX)))?;
    let codes = r
        .codes
        .iter()
        .enumerate()
        .map(|(i, c)| super::in_range(&format!("{field}.codes[{i}]"), (*c).into(), 400, 599).map(|c| u16::try_from(c).expect("in range")))
        .collect::<Result<_, _>>()?;
    Ok(Retry {
        attempts: u32::try_from(attempts).expect("in range"),
        codes,
        backoff: r.backoff.as_deref().map(|b| gep_duration(&format!("{field}.backoff"), b)).transpose()?.flatten(),
        ..Retry::default()
    })
}

fn http_match(m: &api::HttpRouteMatch, field: &str) -> Result<Match, Error> {
    let path = match &m.path {
        None => StringMatch::PathPrefix("/".into()),
        Some(p) => {
            let value = p.value.as_deref().unwrap_or("/");
            let vfield = format!("{field}.path.value");
            match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => StringMatch::Exact(path(&vfield, value)?),
                "PathPrefix" => StringMatch::PathPrefix(path(&vfield, value)?),
                "RegularExpression" => StringMatch::Regex(regex(&vfield, value)?),
                other => {
                    return Err(Error::UnknownValue { field: format!("{field}.path.type"), value: other.into(), expected: "Exact, PathPrefix or RegularExpression" });
                }
            }
        }
    };
    let method = match m.method.as_deref() {
        None => None,
        Some(v) if METHODS.contains(&v) => Some(StringMatch::Exact(v.into())),
        Some(v) => {
            return Err(Error::UnknownValue { field: format!("{field}.method"), value: v.into(), expected: "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or PATCH" });
        }
    };
    let mut query_params = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let f = format!("{field}.queryParams[{i}]");
        if q.name.is_empty() {
            return Err(Error::Missing { field: format!("{f}.name"), what: "a name" });
        }
        if query_params.iter().any(|p: &crate::routing::model::QueryMatch| p.name == q.name) {
            return Err(Error::Duplicate { field: format!("{field}.queryParams"), name: q.name.clone() });
        }
        query_params.push(crate::routing::model::QueryMatch { name: q.name.clone(), value: value_match(q, &f)? });
    }
    Ok(Match { path: Some(path), method, headers: header_matches(&m.headers, field)?, query_params, ..Match::default() })
}

fn value_match(m: &api::ValueMatch, field: &str) -> Result<StringMatch, Error> {
    match m.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(StringMatch::Exact(m.value.clone())),
        "RegularExpression" => Ok(StringMatch::Regex(regex(&format!("{field}.value"), &m.value)?)),
        other => Err(Error::UnknownValue { field: format!("{field}.type"), value: other.into(), expected: "Exact or RegularExpression" }),
    }
}

fn header_matches(list: &[api::ValueMatch], field: &str) -> Result<Vec<crate::routing::model::HeaderMatch>, Error> {
    let mut out: Vec<crate::routing::model::HeaderMatch> = Vec::new();
    for (i, h) in list.iter().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = header_name(&format!("{f}.name"), &h.name)?;
        if out.iter().any(|o| o.name == name) {
            return Err(Error::Duplicate { field: format!("{field}.headers"), name });
        }
        let value = value_match(h, &f)?;
        if let StringMatch::Exact(v) = &value {
            header_value(&format!("{f}.value"), v)?;
        }
        out.push(crate::routing::model::HeaderMatch { name, value, invert: false });
    }
    Ok(out)
}

/// gRPC calls are `POST /<service>/<method>`: a method match is a path match. A service alone
/// matches every method of it (`PathPrefix /<service>`, segment-wise, so not `/<service>x/...`),
/// a method alone any service's method of that name.
fn grpc_match(m: &api::GrpcRouteMatch, field: &str) -> Result<Match, Error> {
    static SERVICE: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$").expect("valid regex"));
    static METHOD: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"^[A-Za-z_][A-Za-z_0-9]*$").expect("valid regex"));
    let path = match &m.method {
        None => StringMatch::PathPrefix("/".into()),
        Some(mm) => {
            let (sf, mf) = (format!("{field}.method.service"), format!("{field}.method.method"));
            match mm.type_.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    let check = |f: &str, v: &str, re: &regex::Regex, what| {
                        if re.is_match(v) { Ok(()) } else { Err(Error::UnknownValue { field: f.into(), value: v.into(), expected: what }) }
                    };
                    if let Some(s) = &mm.service {
                        check(&sf, s, &SERVICE, "a gRPC service name like pkg.v1.Service")?;
                    }
                    if let Some(m) = &mm.method {
                        check(&mf, m, &METHOD, "a gRPC method name like GetThing")?;
                    }
                    match (&mm.service, &mm.method) {
                        (Some(s), Some(m)) => StringMatch::Exact(format!("/{s}/{m}")),
                        (Some(s), None) => StringMatch::PathPrefix(format!("/{s}")),
                        (None, Some(m)) => StringMatch::Regex(format!("/[^/]+/{}", regex::escape(m))),
                        (None, None) => return Err(Error::Missing { field: format!("{field}.method"), what: "service or method" }),
                    }
                }
                "RegularExpression" => {
                    let s = mm.service.as_deref().map(|s| regex(&sf, s)).transpose()?;
                    let m = mm.method.as_deref().map(|m| regex(&mf, m)).transpose()?;
                    let (s, m) = match (s, m) {
                        (None, None) => return Err(Error::Missing { field: format!("{field}.method"), what: "service or method" }),
                        (s, m) => (s.map_or("[^/]+".into(), |s| format!("(?:{s})")), m.map_or("[^/]+".into(), |m| format!("(?:{m})"))),
                    };
                    StringMatch::Regex(format!("/{s}/{m}"))
                }
                other => {
                    return Err(Error::UnknownValue { field: format!("{field}.method.type"), value: other.into(), expected: "Exact or RegularExpression" });
                }
            }
        }
    };
    Ok(Match { path: Some(path), headers: header_matches(&m.headers, field)?, ..Match::default() })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Allowed {
    Http,
    Grpc,
    /// A backendRef's own filters.
    Backend,
}

#[derive(Default)]
struct Filters {
    request_headers: HeaderModifier,
    response_headers: HeaderModifier,
    rewrite: Option<UrlRewrite>,
    redirect: Option<Redirect>,
    mirrors: Vec<(BackendRef, u32)>,
}

fn filters(list: &[api::RouteFilter], parent: &str, allowed: Allowed, namespace: &str) -> Result<Filters, Error> {
    let mut out = Filters::default();
    let mut seen: Vec<&str> = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let field = format!("{parent}.filters[{i}]");
        let t = f.type_.as_str();
        if t != "RequestMirror" && seen.contains(&t) {
            return Err(Error::Duplicate { field: format!("{parent}.filters"), name: t.into() });
        }
        seen.push(t);
        let set = [
            ("RequestHeaderModifier", f.request_header_modifier.is_some()),
            ("ResponseHeaderModifier", f.response_header_modifier.is_some()),
            ("RequestMirror", f.request_mirror.is_some()),
            ("RequestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", f.url_rewrite.is_some()),
            ("ExtensionRef", f.extension_ref.is_some()),
        ];
        if let Some((other, _)) = set.iter().find(|(name, is_set)| *is_set && *name != t) {
            return Err(Error::Conflict { field, what: format!("type {t} must not set the field of filter type {other}") });
        }
        let kinds: &[&str] = match allowed {
            Allowed::Http => &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect", "URLRewrite"],
            Allowed::Grpc => &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"],
            Allowed::Backend => &["RequestHeaderModifier", "ResponseHeaderModifier"],
        };
        if t == "ExtensionRef" {
            return Err(Error::Unsupported { field: format!("{field}.type"), what: "ExtensionRef filters (the mesh has no extensions)".into() });
        }
        if !kinds.contains(&t) {
            return Err(if set.iter().any(|(name, _)| *name == t) {
                Error::Unsupported { field: format!("{field}.type"), what: format!("{t} filters here (allowed: {})", kinds.join(", ")) }
            } else {
                Error::UnknownValue { field: format!("{field}.type"), value: t.into(), expected: "a filter type of this route kind" }
            });
        }
        let missing = || Error::Missing { field: field.clone(), what: "the field named by type" };
        match t {
            "RequestHeaderModifier" => out.request_headers = modifier(f.request_header_modifier.as_ref().ok_or_else(missing)?, &format!("{field}.requestHeaderModifier"))?,
            "ResponseHeaderModifier" => {
                out.response_headers = modifier(f.response_header_modifier.as_ref().ok_or_else(missing)?, &format!("{field}.responseHeaderModifier"))?;
            }
            "RequestMirror" => out.mirrors.push(mirror(f.request_mirror.as_ref().ok_or_else(missing)?, &format!("{field}.requestMirror"), namespace)?),
            "RequestRedirect" => out.redirect = Some(redirect(f.request_redirect.as_ref().ok_or_else(missing)?, &format!("{field}.requestRedirect"))?),
            _ => out.rewrite = Some(rewrite(f.url_rewrite.as_ref().ok_or_else(missing)?, &format!("{field}.urlRewrite"))?),
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(Error::IncompatibleFilters { field: format!("{parent}.filters"), what: "RequestRedirect and URLRewrite cannot be used together".into() });
    }
    Ok(out)
}

fn modifier(m: &api::HeaderModifier, field: &str) -> Result<HeaderModifier, Error> {
    let set = m.set.iter().map(|h| (h.name.as_str(), h.value.as_str()));
    header_modifier(field, set, m.add.iter().map(|h| (h.name.as_str(), h.value.as_str())), &m.remove)
}

fn path_mod(p: &api::PathModifier, field: &str) -> Result<PathModifier, Error> {
    let (value, prefix) = match p.type_.as_str() {
        "ReplaceFullPath" => (p.replace_full_path.as_deref().ok_or(Error::Missing { field: field.into(), what: "replaceFullPath" })?, false),
        "ReplacePrefixMatch" => (p.replace_prefix_match.as_deref().ok_or(Error::Missing { field: field.into(), what: "replacePrefixMatch" })?, true),
        other => return Err(Error::UnknownValue { field: format!("{field}.type"), value: other.into(), expected: "ReplaceFullPath or ReplacePrefixMatch" }),
    };
    path_modifier(&format!("{field}.{}", if prefix { "replacePrefixMatch" } else { "replaceFullPath" }), prefix, value)
}

fn redirect(r: &api::RequestRedirect, field: &str) -> Result<Redirect, Error> {
    Ok(Redirect {
        scheme: redirect_scheme(&format!("{field}.scheme"), r.scheme.as_deref())?,
        hostname: r.hostname.as_deref().map(|h| hostname(&format!("{field}.hostname"), h, false)).transpose()?,
        path: r.path.as_ref().map(|p| path_mod(p, &format!("{field}.path"))).transpose()?,
        port: r.port.map(|p| port(&format!("{field}.port"), p.into())).transpose()?,
        status: redirect_status(&format!("{field}.statusCode"), r.status_code.map(i64::from), 302)?,
    })
}

fn rewrite(r: &api::UrlRewrite, field: &str) -> Result<UrlRewrite, Error> {
    Ok(UrlRewrite {
        hostname: r.hostname.as_deref().map(|h| hostname(&format!("{field}.hostname"), h, false)).transpose()?,
        path: r.path.as_ref().map(|p| path_mod(p, &format!("{field}.path"))).transpose()?,
    })
}

fn mirror(m: &api::RequestMirror, field: &str, namespace: &str) -> Result<(BackendRef, u32), Error> {
    let per_million = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => return Err(Error::Conflict { field: field.into(), what: "set percent or fraction, not both".into() }),
        (Some(p), None) => u32::try_from(super::in_range(&format!("{field}.percent"), p.into(), 0, 100)? * 10_000).expect("in range"),
        (None, Some(f)) => {
            let denominator = super::in_range(&format!("{field}.fraction.denominator"), f.denominator.unwrap_or(100).into(), 1, i64::from(i32::MAX))?;
            let numerator = super::in_range(&format!("{field}.fraction.numerator"), f.numerator.into(), 0, denominator)?;
            u32::try_from(numerator * 1_000_000 / denominator).expect("at most a million")
        }
        (None, None) => 1_000_000,
    };
    Ok((backend(&m.backend_ref, 1, &[], &format!("{field}.backendRef"), namespace)?, per_million))
}

fn backends(list: &[api::BackendRef], parent: &str, namespace: &str) -> Result<Vec<BackendRef>, Error> {
    list.iter()
        .enumerate()
        .map(|(i, b)| {
            let field = format!("{parent}.backendRefs[{i}]");
            let w = weight(&format!("{field}.weight"), b.weight.map_or(1, i64::from))?;
            backend(&b.object, w, &b.filters, &field, namespace)
        })
        .collect()
}

fn backend(b: &api::BackendObjectReference, weight: u32, filters_: &[api::RouteFilter], field: &str, namespace: &str) -> Result<BackendRef, Error> {
    let group = b.group.clone().unwrap_or_default();
    let kind = b.kind.clone().unwrap_or_else(|| "Service".into());
    let port = b.port.map(|p| port(&format!("{field}.port"), p.into())).transpose()?;
    if group.is_empty() && kind == "Service" && port.is_none() {
        return Err(Error::Missing { field: format!("{field}.port"), what: "a port (for a Service backend)" });
    }
    let f = filters(filters_, field, Allowed::Backend, namespace)?;
    Ok(BackendRef {
        field: field.into(),
        group,
        kind,
        target: NamespacedName::new(b.namespace.as_deref().unwrap_or(namespace), &b.name),
        port,
        weight,
        request_headers: f.request_headers,
        response_headers: f.response_headers,
    })
}
