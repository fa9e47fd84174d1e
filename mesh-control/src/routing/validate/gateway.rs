//! `HTTPRoute` and `GRPCRoute` → [`GatewayRoute`]: upstream's defaults applied, every value
//! checked the way upstream's schema and CEL rules would (a cluster on an old Kubernetes, or file
//! mode, has neither), GRPCRoute method matches turned into path matches.

mod filters;

use std::sync::LazyLock;

use filters::{Allowed, backends, filters};

use super::{
    Error, GatewayRoute, GatewayRule, Parent, ParentTarget, gep_duration, header_name,
    header_value, hostname, identity, no_unknown_fields, path, port, regex,
};
use crate::{
    crd::{Read, gateway as api},
    model::NamespacedName,
    routing::model::{Match, PathModifier, Retry, SourceKind, StringMatch, Timeouts},
};

/// `type` values of `HTTPRouteMatch.method`.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

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
    Ok(GatewayRoute {
        kind: SourceKind::HttpRoute,
        parents: parents(&o.spec.parent_refs, &id.key.namespace),
        id,
        rules,
        notes,
    })
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
            rule.matches
                .iter()
                .enumerate()
                .map(|(j, m)| grpc_match(m, &format!("{field}.matches[{j}]")))
                .collect::<Result<_, _>>()?
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
    Ok(GatewayRoute {
        kind: SourceKind::GrpcRoute,
        parents: parents(&o.spec.parent_refs, &key.namespace),
        id,
        rules,
        notes,
    })
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
    Match {
        path: Some(StringMatch::PathPrefix("/".into())),
        ..Match::default()
    }
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

fn http_rule(
    rule: &api::HttpRouteRule,
    i: usize,
    namespace: &str,
    notes: &mut Vec<String>,
) -> Result<GatewayRule, Error> {
    let field = format!("spec.rules[{i}]");
    let matches: Vec<Match> = if rule.matches.is_empty() {
        vec![every_request()]
    } else {
        rule.matches
            .iter()
            .enumerate()
            .map(|(j, m)| http_match(m, &format!("{field}.matches[{j}]")))
            .collect::<Result<_, _>>()?
    };
    let f = filters(&rule.filters, &field, Allowed::Http, namespace)?;
    // ReplacePrefixMatch replaces what a PathPrefix matched: with any other match it has no
    // defined meaning, and the spec says the route is then not accepted.
    let prefix_modifier = f
        .rewrite
        .as_ref()
        .and_then(|r| r.path.as_ref())
        .or(f.redirect.as_ref().and_then(|r| r.path.as_ref()));
    if matches!(prefix_modifier, Some(PathModifier::Prefix(_)))
        && let Some(j) = matches
            .iter()
            .position(|m| !matches!(m.path, Some(StringMatch::PathPrefix(_))))
    {
        return Err(Error::Conflict {
            field: format!("{field}.filters"),
            what: format!(
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match, and {field}.matches[{j}] is not"
            ),
        });
    }
    let backends = backends(&rule.backend_refs, &field, namespace)?;
    if f.redirect.is_some() && !backends.is_empty() {
        notes.push(format!(
            "{field}.backendRefs: not used: the rule answers with a RequestRedirect"
        ));
    }
    let mut timeouts = Timeouts::default();
    if let Some(t) = &rule.timeouts {
        timeouts.request = t
            .request
            .as_deref()
            .map(|v| gep_duration(&format!("{field}.timeouts.request"), v))
            .transpose()?
            .flatten();
        timeouts.backend_request = t
            .backend_request
            .as_deref()
            .map(|v| gep_duration(&format!("{field}.timeouts.backendRequest"), v))
            .transpose()?
            .flatten();
        if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
            && backend > request
        {
            return Err(Error::Conflict {
                field: format!("{field}.timeouts.backendRequest"),
                what: "must not be longer than timeouts.request (which covers every attempt)"
                    .into(),
            });
        }
    }
    let retry = rule
        .retry
        .as_ref()
        .map(|r| retry(r, &format!("{field}.retry")))
        .transpose()?;
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
    let attempts = r.attempts.map_or(Ok(0), |a| {
        super::in_range(
            &format!("{field}.attempts"),
            a.into(),
            0,
            i64::from(i32::MAX),
        )
    })?;
    let codes = r
        .codes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            super::in_range(&format!("{field}.codes[{i}]"), (*c).into(), 400, 599)
                .map(|c| u16::try_from(c).expect("in range"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Retry {
        attempts: u32::try_from(attempts).expect("in range"),
        codes,
        backoff: r
            .backoff
            .as_deref()
            .map(|b| gep_duration(&format!("{field}.backoff"), b))
            .transpose()?
            .flatten(),
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
                    return Err(Error::UnknownValue {
                        field: format!("{field}.path.type"),
                        value: other.into(),
                        expected: "Exact, PathPrefix or RegularExpression",
                    });
                }
            }
        }
    };
    let method = match m.method.as_deref() {
        None => None,
        Some(v) if METHODS.contains(&v) => Some(StringMatch::Exact(v.into())),
        Some(v) => {
            return Err(Error::UnknownValue {
                field: format!("{field}.method"),
                value: v.into(),
                expected: "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or PATCH",
            });
        }
    };
    let mut query_params = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let f = format!("{field}.queryParams[{i}]");
        if q.name.is_empty() {
            return Err(Error::Missing {
                field: format!("{f}.name"),
                what: "a name",
            });
        }
        if query_params
            .iter()
            .any(|p: &crate::routing::model::QueryMatch| p.name == q.name)
        {
            return Err(Error::Duplicate {
                field: format!("{field}.queryParams"),
                name: q.name.clone(),
            });
        }
        query_params.push(crate::routing::model::QueryMatch {
            name: q.name.clone(),
            value: value_match(q, &f)?,
        });
    }
    Ok(Match {
        path: Some(path),
        method,
        headers: header_matches(&m.headers, field)?,
        query_params,
        ..Match::default()
    })
}

fn value_match(m: &api::ValueMatch, field: &str) -> Result<StringMatch, Error> {
    match m.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(StringMatch::Exact(m.value.clone())),
        "RegularExpression" => Ok(StringMatch::Regex(regex(
            &format!("{field}.value"),
            &m.value,
        )?)),
        other => Err(Error::UnknownValue {
            field: format!("{field}.type"),
            value: other.into(),
            expected: "Exact or RegularExpression",
        }),
    }
}

fn header_matches(
    list: &[api::ValueMatch],
    field: &str,
) -> Result<Vec<crate::routing::model::HeaderMatch>, Error> {
    let mut out: Vec<crate::routing::model::HeaderMatch> = Vec::new();
    for (i, h) in list.iter().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = header_name(&format!("{f}.name"), &h.name)?;
        if out.iter().any(|o| o.name == name) {
            return Err(Error::Duplicate {
                field: format!("{field}.headers"),
                name,
            });
        }
        let value = value_match(h, &f)?;
        if let StringMatch::Exact(v) = &value {
            header_value(&format!("{f}.value"), v)?;
        }
        out.push(crate::routing::model::HeaderMatch {
            name,
            value,
            invert: false,
        });
    }
    Ok(out)
}

/// gRPC calls are `POST /<service>/<method>`: a method match is a path match. A service alone
/// matches every method of it (`PathPrefix /<service>`, segment-wise, so not `/<service>x/...`),
/// a method alone any service's method of that name.
fn grpc_match(m: &api::GrpcRouteMatch, field: &str) -> Result<Match, Error> {
    static SERVICE: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$").expect("valid regex")
    });
    static METHOD: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"^[A-Za-z_][A-Za-z_0-9]*$").expect("valid regex"));
    let path = match &m.method {
        None => StringMatch::PathPrefix("/".into()),
        Some(mm) => {
            let (sf, mf) = (
                format!("{field}.method.service"),
                format!("{field}.method.method"),
            );
            match mm.type_.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    let check = |f: &str, v: &str, re: &regex::Regex, what| {
                        if re.is_match(v) {
                            Ok(())
                        } else {
                            Err(Error::UnknownValue {
                                field: f.into(),
                                value: v.into(),
                                expected: what,
                            })
                        }
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
                        (None, Some(m)) => {
                            StringMatch::Regex(format!("/[^/]+/{}", regex::escape(m)))
                        }
                        (None, None) => {
                            return Err(Error::Missing {
                                field: format!("{field}.method"),
                                what: "service or method",
                            });
                        }
                    }
                }
                "RegularExpression" => {
                    let s = mm.service.as_deref().map(|s| regex(&sf, s)).transpose()?;
                    let m = mm.method.as_deref().map(|m| regex(&mf, m)).transpose()?;
                    let (s, m) = match (s, m) {
                        (None, None) => {
                            return Err(Error::Missing {
                                field: format!("{field}.method"),
                                what: "service or method",
                            });
                        }
                        (s, m) => (
                            s.map_or("[^/]+".into(), |s| format!("(?:{s})")),
                            m.map_or("[^/]+".into(), |m| format!("(?:{m})")),
                        ),
                    };
                    StringMatch::Regex(format!("/{s}/{m}"))
                }
                other => {
                    return Err(Error::UnknownValue {
                        field: format!("{field}.method.type"),
                        value: other.into(),
                        expected: "Exact or RegularExpression",
                    });
                }
            }
        }
    };
    Ok(Match {
        path: Some(path),
        headers: header_matches(&m.headers, field)?,
        ..Match::default()
    })
}
