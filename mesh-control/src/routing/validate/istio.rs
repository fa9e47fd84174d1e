//! `VirtualService` and `DestinationRule` → [`VirtualService`]/[`DestinationRule`], with
//! Istio's rules: hosts resolved relative to the object's namespace, weights adding up to 100,
//! 301 as the default redirect code. Istio fields we do not implement are refused by name
//! (`spec.tcp: not supported: TCP routes ...`); a few harmless ones are accepted with a note.

use super::{
    Destination, DestinationRule, Error, VirtualService, VsAction, VsRule, dns_label,
    header_modifier, header_name, header_value, hostname, identity, in_range, istio_duration,
    no_unknown_fields, path_modifier, percent_per_million, port, redirect_scheme, redirect_status,
    regex, traffic_policy,
};
use std::collections::BTreeMap;

use crate::{
    crd::{Read, networking as api},
    model::{Labels, NamespacedName},
    routing::model::{
        Abort, Fault, HeaderMatch, HeaderModifier, Match, QueryMatch, Redirect, Retry, StringMatch,
        Timeouts, UrlRewrite,
    },
};

/// What we can tell a user porting Istio YAML about a field we do not implement.
fn hint(field: &str) -> &'static str {
    match field {
        "tcp" => "TCP routes (only spec.http is implemented)",
        "tls" => "TLS routes (only spec.http is implemented)",
        "delegate" => "delegation to other VirtualServices",
        "uriRegexRewrite" => "regex rewrites (use rewrite.uri)",
        "authority" => {
            "matching on the authority (a VirtualService already applies to the requests of its hosts)"
        }
        "scheme" => "matching on the scheme",
        "ignoreUriCase" => "case-insensitive URI matching",
        "statPrefix" => "per-match stat prefixes",
        "bytes" => "binary bodies (use body.string)",
        "http2Error" => "HTTP/2 error aborts (use httpStatus)",
        "workloadSelector" => {
            "workload selectors (a DestinationRule applies to every client of its host)"
        }
        "portLevelSettings" => {
            "per-port traffic policies (the policy applies to every port of the host)"
        }
        "distribute" => "weighted distribution between localities (failover by priority is what the mesh does)",
        "failover" | "failoverPriority" => "explicit failover orders (the mesh fails over zone, then region)",
        "tunnel" => "tunnelling to a destination through a proxy",
        "proxyProtocol" => "PROXY protocol to the destination",
        "consecutiveLocalOriginFailures" | "splitExternalLocalOriginErrors" => {
            "local-origin failure counting (connect failures count as gateway errors)"
        }
        _ => "an Istio field the mesh does not implement",
    }
}

/// An Istio host naming a Service: `name` (in `namespace`), `name.ns`, `name.ns.svc[.<domain>]`.
fn host(field: &str, host: &str, namespace: &str) -> Result<NamespacedName, Error> {
    if host.contains('*') {
        return Err(Error::Unsupported {
            field: field.into(),
            what: format!("wildcard host {host:?} (name one Service)"),
        });
    }
    hostname(field, host, false)?;
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name] => Ok(NamespacedName::new(namespace, *name)),
        [name, ns] | [name, ns, "svc", ..] => Ok(NamespacedName::new(*ns, *name)),
        _ => Err(Error::Unsupported {
            field: field.into(),
            what: format!(
                "host {host:?} is not a Service of the cluster (name, name.namespace or name.namespace.svc.cluster.local)"
            ),
        }),
    }
}

pub fn virtual_service(r: &Read<api::VirtualService>) -> Result<VirtualService, Error> {
    no_unknown_fields(&r.unknown_fields, hint)?;
    let o = &r.object;
    let id = identity(&o.metadata);
    let key = &id.key;
    let spec = &o.spec;
    mesh_gateways(&spec.gateways, "spec.gateways")?;
    let own_namespace_only = match spec
        .export_to
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] | ["*"] => false,
        ["."] => true,
        _ => {
            return Err(Error::Unsupported {
                field: "spec.exportTo".into(),
                what: "values other than \"*\" or \".\"".into(),
            });
        }
    };
    if spec.hosts.is_empty() {
        return Err(Error::Missing {
            field: "spec.hosts".into(),
            what: "at least one host",
        });
    }
    let mut hosts: Vec<(String, NamespacedName)> = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        let svc = host(&field, h, &key.namespace)?;
        if hosts.iter().any(|(_, s)| *s == svc) {
            return Err(Error::Duplicate {
                field: "spec.hosts".into(),
                name: h.clone(),
            });
        }
        hosts.push((field, svc));
    }
    if spec.http.is_empty() {
        return Err(Error::Missing {
            field: "spec.http".into(),
            what: "at least one HTTP route",
        });
    }
    let mut notes = Vec::new();
    let rules = spec
        .http
        .iter()
        .enumerate()
        .map(|(i, h)| rule(h, i, &key.namespace, &mut notes))
        .collect::<Result<_, _>>()?;
    Ok(VirtualService {
        id,
        hosts,
        own_namespace_only,
        rules,
        notes,
    })
}

pub fn destination_rule(r: &Read<api::DestinationRule>) -> Result<DestinationRule, Error> {
    no_unknown_fields(&r.unknown_fields, hint)?;
    let o = &r.object;
    let id = identity(&o.metadata);
    if !matches!(
        o.spec
            .export_to
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        [] | ["*"]
    ) {
        return Err(Error::Unsupported {
            field: "spec.exportTo".into(),
            what: "values other than \"*\" (subsets apply to every client)".into(),
        });
    }
    let host = host("spec.host", &o.spec.host, &id.key.namespace)?;
    let mut notes = Vec::new();
    let traffic_policy = o
        .spec
        .traffic_policy
        .as_ref()
        .map(|p| traffic_policy::traffic_policy(p, "spec.trafficPolicy", &mut notes))
        .transpose()?;
    let mut subsets: Vec<(String, Labels)> = Vec::new();
    let mut subset_policies = BTreeMap::new();
    for (i, s) in o.spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        let name = dns_label(&format!("{field}.name"), &s.name)?;
        if subsets.iter().any(|(n, _)| *n == name) {
            return Err(Error::Duplicate {
                field: "spec.subsets".into(),
                name,
            });
        }
        labels(&s.labels, &format!("{field}.labels"))?;
        if let Some(p) = &s.traffic_policy {
            let p = traffic_policy::traffic_policy(
                p,
                &format!("{field}.trafficPolicy"),
                &mut notes,
            )?;
            subset_policies.insert(name.clone(), p);
        }
        subsets.push((name, s.labels.clone()));
    }
    Ok(DestinationRule {
        id,
        host,
        traffic_policy,
        subsets,
        subset_policies,
        notes,
    })
}

fn mesh_gateways(gateways: &[String], field: &str) -> Result<(), Error> {
    match gateways.iter().position(|g| g != "mesh") {
        None => Ok(()),
        Some(i) => Err(Error::Unsupported {
            field: format!("{field}[{i}]"),
            what: format!(
                "gateway {:?}: the mesh routes the traffic sent to Services; use `mesh` or leave gateways out",
                gateways[i]
            ),
        }),
    }
}

fn labels(l: &Labels, field: &str) -> Result<(), Error> {
    for (k, v) in l {
        if !crate::validate::valid_label_key(k) || !crate::validate::valid_label_value(v) {
            return Err(Error::UnknownValue {
                field: format!("{field}[{k}]"),
                value: v.clone(),
                expected: "a valid label key and value",
            });
        }
    }
    Ok(())
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// What a rule does: exactly one of `route`, `redirect`, `directResponse`.
fn action(h: &api::HttpRoute, field: &str, namespace: &str) -> Result<VsAction, Error> {
    let field = field.to_owned();
    Ok(
        match (!h.route.is_empty(), &h.redirect, &h.direct_response) {
            (true, None, None) => VsAction::Route(destinations(
                &h.route,
                &format!("{field}.route"),
                namespace,
            )?),
            (false, Some(r), None) => {
                VsAction::Redirect(redirect(r, &format!("{field}.redirect"))?)
            }
            (false, None, Some(d)) => {
                let status = in_range(
                    &format!("{field}.directResponse.status"),
                    d.status,
                    200,
                    599,
                )?;
                let body = d
                    .body
                    .as_ref()
                    .and_then(|b| b.string.clone())
                    .unwrap_or_default();
                VsAction::Respond {
                    status: u16::try_from(status).expect("in range"),
                    body,
                }
            }
            (false, None, None) => {
                return Err(Error::Missing {
                    field,
                    what: "route, redirect or directResponse",
                });
            }
            _ => {
                return Err(Error::Conflict {
                    field,
                    what: "route, redirect and directResponse exclude each other".into(),
                });
            }
        },
    )
}

fn rule(
    h: &api::HttpRoute,
    i: usize,
    namespace: &str,
    notes: &mut Vec<String>,
) -> Result<VsRule, Error> {
    let field = format!("spec.http[{i}]");
    let matches = h
        .match_
        .iter()
        .enumerate()
        .map(|(j, m)| http_match(m, &format!("{field}.match[{j}]")))
        .collect::<Result<_, _>>()?;
    let action = action(h, &field, namespace)?;
    if h.rewrite.is_some() && !matches!(action, VsAction::Route(_)) {
        return Err(Error::Conflict {
            field: format!("{field}.rewrite"),
            what: "a rewrite needs a route (not a redirect or directResponse)".into(),
        });
    }
    let rewrite = h
        .rewrite
        .as_ref()
        .map(|r| -> Result<_, Error> {
            Ok(UrlRewrite {
                hostname: r
                    .authority
                    .as_deref()
                    .map(|a| hostname(&format!("{field}.rewrite.authority"), a, false))
                    .transpose()?,
                // Istio replaces what a prefix match matched, and the whole path otherwise.
                path: r
                    .uri
                    .as_deref()
                    .map(|u| path_modifier(&format!("{field}.rewrite.uri"), true, u))
                    .transpose()?,
            })
        })
        .transpose()?;
    let headers = |which: &str, ops: Option<&api::HeaderOperations>| match ops {
        None => Ok(HeaderModifier::default()),
        Some(o) => header_ops(o, &format!("{field}.headers.{which}")),
    };
    let retry = h
        .retries
        .as_ref()
        .map(|r| retries(r, &format!("{field}.retries")))
        .transpose()?;
    let fault = h
        .fault
        .as_ref()
        .map(|f| fault(f, &format!("{field}.fault")))
        .transpose()?;
    if h.cors_policy.is_some() {
        notes.push(format!(
            "{field}.corsPolicy: ignored: CORS is not implemented"
        ));
    }
    Ok(VsRule {
        index: index(i),
        name: h.name.clone(),
        matches,
        request_headers: headers(
            "request",
            h.headers.as_ref().and_then(|x| x.request.as_ref()),
        )?,
        response_headers: headers(
            "response",
            h.headers.as_ref().and_then(|x| x.response.as_ref()),
        )?,
        rewrite,
        action,
        mirrors: mirrors(h, &field, namespace)?,
        timeouts: Timeouts {
            request: h
                .timeout
                .as_deref()
                .map(|t| istio_duration(&format!("{field}.timeout"), t))
                .transpose()?
                .flatten(),
            backend_request: None,
        },
        retry,
        fault,
    })
}

/// `allow_present`: `{}` (no field) means "present" (headers, query parameters).
fn string_match(
    m: &api::StringMatch,
    field: &str,
    allow_present: bool,
) -> Result<StringMatch, Error> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok(StringMatch::Exact(v.clone())),
        (None, Some(v), None) => Ok(StringMatch::Prefix(v.clone())),
        (None, None, Some(v)) => Ok(StringMatch::Regex(regex(&format!("{field}.regex"), v)?)),
        (None, None, None) if allow_present => Ok(StringMatch::Present),
        (None, None, None) => Err(Error::Missing {
            field: field.into(),
            what: "one of exact, prefix or regex",
        }),
        _ => Err(Error::Conflict {
            field: field.into(),
            what: "exact, prefix and regex exclude each other".into(),
        }),
    }
}

fn http_match(m: &api::HttpMatchRequest, field: &str) -> Result<Match, Error> {
    mesh_gateways(&m.gateways, &format!("{field}.gateways"))?;
    let mut headers = Vec::new();
    for (list, invert, name) in [
        (&m.headers, false, "headers"),
        (&m.without_headers, true, "withoutHeaders"),
    ] {
        for (k, v) in list {
            let f = format!("{field}.{name}[{k}]");
            let value = string_match(v, &f, true)?;
            if let StringMatch::Exact(x) = &value {
                header_value(&f, x)?;
            }
            headers.push(HeaderMatch {
                name: header_name(&f, k)?,
                value,
                invert,
            });
        }
    }
    let query_params = m
        .query_params
        .iter()
        .map(|(k, v)| {
            let f = format!("{field}.queryParams[{k}]");
            if k.is_empty() {
                return Err(Error::Missing {
                    field: f,
                    what: "a parameter name",
                });
            }
            Ok(QueryMatch {
                name: k.clone(),
                value: string_match(v, &f, true)?,
            })
        })
        .collect::<Result<_, _>>()?;
    labels(&m.source_labels, &format!("{field}.sourceLabels"))?;
    Ok(Match {
        path: m
            .uri
            .as_ref()
            .map(|u| string_match(u, &format!("{field}.uri"), false))
            .transpose()?,
        method: m
            .method
            .as_ref()
            .map(|u| string_match(u, &format!("{field}.method"), false))
            .transpose()?,
        headers,
        query_params,
        port: m
            .port
            .map(|p| port(&format!("{field}.port"), p))
            .transpose()?,
        source_labels: m.source_labels.clone(),
        source_namespace: m
            .source_namespace
            .as_deref()
            .map(|n| dns_label(&format!("{field}.sourceNamespace"), n))
            .transpose()?,
    })
}

fn destination(
    d: &api::Destination,
    weight: u32,
    headers: Option<&api::Headers>,
    field: &str,
    namespace: &str,
) -> Result<Destination, Error> {
    let ops = |which: &str, o: Option<&api::HeaderOperations>| {
        o.map_or(Ok(HeaderModifier::default()), |o| {
            header_ops(o, &format!("{field}.headers.{which}"))
        })
    };
    Ok(Destination {
        field: field.into(),
        service: host(&format!("{field}.destination.host"), &d.host, namespace)?,
        port: d
            .port
            .as_ref()
            .and_then(|p| p.number)
            .map(|p| port(&format!("{field}.destination.port.number"), p))
            .transpose()?,
        subset: d
            .subset
            .as_deref()
            .map(|s| dns_label(&format!("{field}.destination.subset"), s))
            .transpose()?,
        weight,
        request_headers: ops("request", headers.and_then(|h| h.request.as_ref()))?,
        response_headers: ops("response", headers.and_then(|h| h.response.as_ref()))?,
    })
}

/// One destination: its weight (if any) is 100. Several: each weight 0-100, adding up to 100.
fn destinations(
    list: &[api::HttpRouteDestination],
    field: &str,
    namespace: &str,
) -> Result<Vec<Destination>, Error> {
    let mut out = Vec::new();
    let mut sum = 0;
    for (i, d) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let w = match (list.len(), d.weight) {
            (1, None) => 100,
            (_, None) => 0,
            (_, Some(w)) => in_range(&format!("{f}.weight"), w, 0, 100)?,
        };
        sum += w;
        out.push(destination(
            &d.destination,
            u32::try_from(w).expect("in range"),
            d.headers.as_ref(),
            &f,
            namespace,
        )?);
    }
    if list.len() > 1 && sum != 100 {
        return Err(Error::WeightSum {
            field: field.into(),
            sum,
        });
    }
    Ok(out)
}

fn header_ops(o: &api::HeaderOperations, field: &str) -> Result<HeaderModifier, Error> {
    let set = o.set.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    header_modifier(
        field,
        set,
        o.add.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &o.remove,
    )
}

fn redirect(r: &api::HttpRedirect, field: &str) -> Result<Redirect, Error> {
    match r.derive_port.as_deref() {
        None | Some("FROM_REQUEST_PORT") => {}
        Some(other) => {
            return Err(Error::Unsupported {
                field: format!("{field}.derivePort"),
                what: format!("{other} (FROM_REQUEST_PORT, the default, is)"),
            });
        }
    }
    if r.derive_port.is_some() && r.port.is_some() {
        return Err(Error::Conflict {
            field: field.into(),
            what: "port and derivePort exclude each other".into(),
        });
    }
    Ok(Redirect {
        scheme: redirect_scheme(&format!("{field}.scheme"), r.scheme.as_deref())?,
        hostname: r
            .authority
            .as_deref()
            .map(|a| hostname(&format!("{field}.authority"), a, false))
            .transpose()?,
        path: r
            .uri
            .as_deref()
            .map(|u| path_modifier(&format!("{field}.uri"), false, u))
            .transpose()?,
        port: r
            .port
            .map(|p| port(&format!("{field}.port"), p))
            .transpose()?,
        status: redirect_status(&format!("{field}.redirectCode"), r.redirect_code, 301)?,
    })
}

fn mirrors(
    h: &api::HttpRoute,
    field: &str,
    namespace: &str,
) -> Result<Vec<(Destination, u32)>, Error> {
    if h.mirror.is_some() && !h.mirrors.is_empty() {
        return Err(Error::Conflict {
            field: format!("{field}.mirrors"),
            what: "mirror and mirrors exclude each other".into(),
        });
    }
    if h.mirror_percentage.is_some() && h.mirror_percent.is_some() {
        return Err(Error::Conflict {
            field: format!("{field}.mirrorPercentage"),
            what: "mirrorPercentage and mirror_percent exclude each other".into(),
        });
    }
    let share = |p: Option<&api::Percent>, f: &str| {
        p.map_or(Ok(1_000_000), |p| percent_per_million(f, p.value))
    };
    let mut out = Vec::new();
    if let Some(m) = &h.mirror {
        let per_million = match h.mirror_percent {
            #[expect(clippy::cast_precision_loss, reason = "0..=100")]
            Some(p) => percent_per_million(
                &format!("{field}.mirror_percent"),
                in_range(&format!("{field}.mirror_percent"), p, 0, 100)? as f64,
            )?,
            None => share(
                h.mirror_percentage.as_ref(),
                &format!("{field}.mirrorPercentage.value"),
            )?,
        };
        out.push((
            destination(m, 1, None, &format!("{field}.mirror"), namespace)?,
            per_million,
        ));
    }
    for (i, m) in h.mirrors.iter().enumerate() {
        let f = format!("{field}.mirrors[{i}]");
        out.push((
            destination(&m.destination, 1, None, &f, namespace)?,
            share(m.percentage.as_ref(), &format!("{f}.percentage.value"))?,
        ));
    }
    Ok(out)
}

/// The `retryOn` conditions the nodes execute (`mesh_l7::layer::retry::retriable`).
const RETRY_ON: [&str; 13] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn retries(r: &api::HttpRetry, field: &str) -> Result<Retry, Error> {
    let mut retry = Retry {
        attempts: u32::try_from(r.attempts.map_or(Ok(0), |a| {
            in_range(&format!("{field}.attempts"), a, 0, i64::from(i32::MAX))
        })?)
        .expect("in range"),
        per_try_timeout: r
            .per_try_timeout
            .as_deref()
            .map(|t| istio_duration(&format!("{field}.perTryTimeout"), t))
            .transpose()?
            .flatten(),
        backoff: r
            .backoff
            .as_deref()
            .map(|t| istio_duration(&format!("{field}.backoff"), t))
            .transpose()?
            .flatten(),
        ..Retry::default()
    };
    for (i, cond) in r
        .retry_on
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .enumerate()
    {
        match cond.parse::<i64>() {
            Ok(code) => retry.codes.push(
                u16::try_from(in_range(&format!("{field}.retryOn[{i}]"), code, 100, 599)?)
                    .expect("in range"),
            ),
            Err(_) if RETRY_ON.contains(&cond) => retry.retry_on.push(cond.to_owned()),
            Err(_) => {
                return Err(Error::UnknownValue {
                    field: format!("{field}.retryOn[{i}]"),
                    value: cond.to_owned(),
                    expected: "5xx, gateway-error, reset, reset-before-request, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or a status code",
                });
            }
        }
    }
    Ok(retry)
}

fn fault(f: &api::HttpFaultInjection, field: &str) -> Result<Fault, Error> {
    let share = |p: Option<&api::Percent>, percent: Option<i64>, f: &str| -> Result<u32, Error> {
        match (p, percent) {
            (Some(p), _) => percent_per_million(&format!("{f}.percentage.value"), p.value),
            #[expect(clippy::cast_precision_loss, reason = "0..=100")]
            (None, Some(p)) => percent_per_million(
                &format!("{f}.percent"),
                in_range(&format!("{f}.percent"), p, 0, 100)? as f64,
            ),
            (None, None) => Ok(1_000_000),
        }
    };
    let delay = f
        .delay
        .as_ref()
        .map(|d| -> Result<_, Error> {
            let df = format!("{field}.delay");
            let fixed = d.fixed_delay.as_deref().ok_or(Error::Missing {
                field: df.clone(),
                what: "fixedDelay",
            })?;
            let fixed = istio_duration(&format!("{df}.fixedDelay"), fixed)?.unwrap_or_default();
            Ok((share(d.percentage.as_ref(), d.percent, &df)?, fixed))
        })
        .transpose()?;
    let abort = f
        .abort
        .as_ref()
        .map(|a| -> Result<_, Error> {
            let af = format!("{field}.abort");
            let http_status = a
                .http_status
                .map(|s| {
                    in_range(&format!("{af}.httpStatus"), s, 200, 599)
                        .map(|s| u16::try_from(s).expect("in range"))
                })
                .transpose()?;
            match (&http_status, &a.grpc_status) {
                (None, None) => {
                    return Err(Error::Missing {
                        field: af,
                        what: "httpStatus or grpcStatus",
                    });
                }
                (Some(_), Some(_)) => {
                    return Err(Error::Conflict {
                        field: af,
                        what: "httpStatus and grpcStatus exclude each other".into(),
                    });
                }
                _ => {}
            }
            if let Some(g) = &a.grpc_status
                && mesh_l7::layer::fault::grpc_code(g).is_none()
            {
                return Err(Error::UnknownValue {
                    field: format!("{af}.grpcStatus"),
                    value: g.clone(),
                    expected: "a gRPC status name such as UNAVAILABLE, or its number 0-16",
                });
            }
            Ok(Abort {
                per_million: share(a.percentage.as_ref(), None, &af)?,
                http_status,
                grpc_status: a.grpc_status.clone(),
            })
        })
        .transpose()?;
    Ok(Fault { delay, abort })
}
