//! Gateway API routes → entries of the Services' route lists, in precedence order, and each
//! route's per-parent verdict.

use std::collections::BTreeMap;

use mesh_l7::AppProtocol;

use super::{
    Grant, Input, Problem, Slot, Slots, accepted, resolved_refs, service_port, unresolved,
};
use crate::{
    crd::gateway,
    model::{Inventory, NamespacedName, ServicePort},
    routing::{
        ACCEPTED, Condition, Kind, ParentVerdict, Verdict, VerdictStatus,
        model::{Action, Backend, Match, Mirror, Route, Source, SourceKind},
        precedence::Precedence,
        validate::{BackendRef, GatewayRoute, GatewayRule, ParentTarget},
    },
};

/// Compiles the Gateway API routes into `slots`; returns, per Service, the routes attached to it
/// (they override its VirtualServices).
/// One (rule, match) of a route attached to one parent, to be placed by its precedence.
struct Entry {
    service: NamespacedName,
    slot: Slot,
    precedence: Precedence,
    /// (route, parent, rule): entries with the same origin adjacent after sorting merge.
    origin: (usize, usize, u32),
    route: Route,
}

/// A rule with its backends resolved.
type Resolved<'a> = (&'a GatewayRule, Action, Vec<Mirror>);

pub(super) fn routes(
    input: &Input,
    inv: &Inventory,
    slots: &mut Slots,
    verdicts: &mut Vec<Verdict>,
) -> BTreeMap<NamespacedName, Vec<String>> {
    let mut entries = Vec::new();
    let mut routed: BTreeMap<NamespacedName, Vec<String>> = BTreeMap::new();
    for (ri, r) in input.gateway_routes.iter().enumerate() {
        let mut problems = Vec::new();
        let rules: Vec<Resolved<'_>> = r
            .rules
            .iter()
            .map(|rule| {
                let (action, mirrors) = gateway_action(rule, r, &input.grants, inv, &mut problems);
                (rule, action, mirrors)
            })
            .collect();
        let resolved = resolved_refs(&problems);
        let mut parents = Vec::new();
        for (pi, p) in r.parents.iter().enumerate() {
            let condition = match &p.target {
                ParentTarget::NotOurs => continue,
                ParentTarget::Invalid { why } => {
                    Condition::no(ACCEPTED, "NoMatchingParent", why.clone())
                }
                ParentTarget::Service {
                    service,
                    port,
                    section,
                } => match attach(r.kind, service, *port, section.as_deref(), inv) {
                    Err(c) => c,
                    Ok(port) => {
                        let label = format!("{} {}", r.kind.as_str(), r.id.key);
                        let labels = routed.entry(service.clone()).or_default();
                        if !labels.contains(&label) {
                            labels.push(label);
                        }
                        add_entries(r, (ri, pi), service, port, &rules, &mut entries);
                        accepted(&r.notes, "the route is valid and distributed to the nodes")
                    }
                },
            };
            parents.push(ParentVerdict {
                reference: p.reference.clone(),
                conditions: vec![condition, resolved.clone()],
            });
        }
        let kind = if r.kind == SourceKind::GrpcRoute {
            Kind::GrpcRoute
        } else {
            Kind::HttpRoute
        };
        verdicts.push(Verdict {
            kind,
            key: r.id.key.clone(),
            generation: r.id.generation,
            status: VerdictStatus::Parents(parents),
        });
    }
    place(entries, slots);
    routed
}

/// The entries of a route attached to a Service: a producer route in the Service's namespace, a
/// consumer route (for its own namespace's clients) elsewhere; `port` restricts every match.
fn add_entries(
    r: &GatewayRoute,
    (route_index, parent_index): (usize, usize),
    service: &NamespacedName,
    port: Option<u16>,
    rules: &[Resolved<'_>],
    out: &mut Vec<Entry>,
) {
    let slot = if r.id.key.namespace == service.namespace {
        Slot::Producer
    } else {
        Slot::Consumer(r.id.key.namespace.clone())
    };
    for (rule, action, mirrors) in rules {
        for (mi, m) in rule.matches.iter().enumerate() {
            let m = Match { port, ..m.clone() };
            let mi = u32::try_from(mi).unwrap_or(u32::MAX);
            let precedence = Precedence::of(&m, r.id.created, &r.id.key, rule.index, mi);
            let route = Route {
                source: Source {
                    kind: r.kind,
                    key: r.id.key.clone(),
                    rule: rule.index,
                    rule_name: rule.name.clone(),
                },
                matches: vec![m],
                request_headers: rule.request_headers.clone(),
                response_headers: rule.response_headers.clone(),
                rewrite: rule.rewrite.clone(),
                action: action.clone(),
                mirrors: mirrors.clone(),
                timeouts: rule.timeouts,
                retry: rule.retry.clone(),
                fault: None,
            };
            out.push(Entry {
                service: service.clone(),
                slot: slot.clone(),
                precedence,
                origin: (route_index, parent_index, rule.index),
                route,
            });
        }
    }
}

/// Sorts the entries into each Service's lists by precedence; adjacent entries of one rule (and
/// parent) become one route again, with their matches as alternatives.
fn place(mut entries: Vec<Entry>, slots: &mut Slots) {
    entries.sort_by(|a, b| {
        (&a.service, &a.slot, &a.precedence).cmp(&(&b.service, &b.slot, &b.precedence))
    });
    let mut last: Option<(NamespacedName, Slot, (usize, usize, u32))> = None;
    for e in entries {
        let list = slots
            .entry((e.service.clone(), e.slot.clone()))
            .or_default();
        let here = Some((e.service, e.slot, e.origin));
        match list.last_mut() {
            Some(prev) if last == here => prev.matches.extend(e.route.matches),
            _ => list.push(e.route),
        }
        last = here;
    }
}

/// Attaches a route to a Service parent: the port it applies to (`None`: every HTTP port), or
/// the `Accepted=False` condition saying why it cannot attach.
fn attach(
    kind: SourceKind,
    service: &NamespacedName,
    port: Option<u16>,
    section: Option<&str>,
    inv: &Inventory,
) -> Result<Option<u16>, Condition> {
    let no_parent = |m: String| Condition::no(ACCEPTED, "NoMatchingParent", m);
    let svc = inv
        .services
        .get(service)
        .ok_or_else(|| no_parent(format!("Service {service} not found")))?;
    let by_port = port
        .map(|p| {
            svc.ports
                .iter()
                .find(|sp| sp.port == p)
                .ok_or_else(|| no_parent(format!("Service {service} has no port {p}")))
        })
        .transpose()?;
    let by_name = section
        .map(|s| {
            svc.ports.iter().find(|sp| sp.name == s).ok_or_else(|| {
                no_parent(format!(
                    "Service {service} has no port named {s:?} (sectionName)"
                ))
            })
        })
        .transpose()?;
    let chosen = match (by_port, by_name) {
        (Some(a), Some(b)) if a.port != b.port => {
            return Err(no_parent(format!(
                "port {} and sectionName {:?} name different ports of Service {service}",
                a.port, b.name
            )));
        }
        (a, b) => a.or(b),
    };
    let grpc = kind == SourceKind::GrpcRoute;
    let usable = |sp: &&ServicePort| {
        let p = AppProtocol::classify(&sp.name, sp.app_protocol.as_deref());
        if grpc { p.upstream_h2() } else { p.is_http() }
    };
    let candidates: Vec<&ServicePort> =
        chosen.map_or_else(|| svc.ports.iter().collect(), |c| vec![c]);
    if candidates.iter().any(usable) {
        return Ok(chosen.map(|c| c.port));
    }
    let which = chosen.map_or_else(
        || format!("no port of Service {service}"),
        |c| format!("port {} ({:?}) of Service {service}", c.port, c.name),
    );
    let fix = if grpc {
        "speaks HTTP/2 to its backends, which gRPC needs: set appProtocol grpc or kubernetes.io/h2c, or name the port grpc* or http2*"
    } else {
        "is HTTP, so the nodes would never route it: set appProtocol (http, http2, kubernetes.io/h2c, grpc) or name the port http*, http2* or grpc*"
    };
    Err(Condition::no(
        ACCEPTED,
        "NotAllowedByListeners",
        format!("{which} {fix}"),
    ))
}

fn granted(
    grants: &[Grant],
    from_kind: SourceKind,
    from_namespace: &str,
    to: &NamespacedName,
) -> bool {
    grants.iter().any(|g| {
        g.namespace == to.namespace
            && g.from.iter().any(|(group, kind, ns)| {
                group == gateway::GROUP && kind == from_kind.as_str() && ns == from_namespace
            })
            && g.to.iter().any(|(group, kind, name)| {
                group.is_empty() && kind == "Service" && name.as_ref().is_none_or(|n| *n == to.name)
            })
    })
}

fn resolve(
    b: &BackendRef,
    r: &GatewayRoute,
    grants: &[Grant],
    inv: &Inventory,
) -> Result<Backend, Problem> {
    if !b.group.is_empty() || b.kind != "Service" {
        let kind = if b.group.is_empty() {
            b.kind.clone()
        } else {
            format!("{}/{}", b.group, b.kind)
        };
        return Err((
            "InvalidKind",
            format!(
                "{}: kind {kind} is not supported (backends are Services: group \"\", kind Service)",
                b.field
            ),
        ));
    }
    let target = &b.target;
    if target.namespace != r.id.key.namespace
        && !granted(grants, r.kind, &r.id.key.namespace, target)
    {
        return Err((
            "RefNotPermitted",
            format!(
                "{}: Service {target} is in another namespace, and no ReferenceGrant in namespace {} allows {}s from namespace {} to refer to it",
                b.field,
                target.namespace,
                r.kind.as_str(),
                r.id.key.namespace
            ),
        ));
    }
    service_port(&b.field, target, b.port, inv)?;
    Ok(Backend {
        service: target.clone(),
        port: b.port,
        subset: None,
        weight: b.weight,
        request_headers: b.request_headers.clone(),
        response_headers: b.response_headers.clone(),
    })
}

fn gateway_action(
    rule: &GatewayRule,
    r: &GatewayRoute,
    grants: &[Grant],
    inv: &Inventory,
    problems: &mut Vec<Problem>,
) -> (Action, Vec<Mirror>) {
    let mut mirrors = Vec::new();
    for (b, per_million) in &rule.mirrors {
        match resolve(b, r, grants, inv) {
            Ok(backend) => mirrors.push(Mirror {
                backend,
                per_million: *per_million,
            }),
            Err(p) => problems.push(p),
        }
    }
    if let Some(redirect) = &rule.redirect {
        return (Action::Redirect(redirect.clone()), mirrors);
    }
    let mut usable = false;
    let backends = rule
        .backends
        .iter()
        .map(|b| match resolve(b, r, grants, inv) {
            Ok(backend) => {
                usable = true;
                backend
            }
            Err(p) => {
                problems.push(p);
                unresolved(&b.target, b.port)
            }
        })
        .collect();
    (
        if usable {
            Action::Forward(backends)
        } else {
            Action::internal_error()
        },
        mirrors,
    )
}
