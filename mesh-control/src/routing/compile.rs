//! Compilation (sans-IO): the valid routing objects and the inventory → one route table per
//! Service with routes, the subsets of each Service, and every object's verdict.
//!
//! Decisions made here, each once:
//! - Gateway API parents: a Service (same namespace as the route: producer routes, for every
//!   client; another namespace: consumer routes, for the route's namespace only), its port
//!   (`port`, or `sectionName` naming a port) and whether that port is HTTP as the node will see
//!   it (`mesh_l7::AppProtocol`, so both sides decide alike).
//! - References: a backend is a Service with that port; across namespaces only with a
//!   `ReferenceGrant`. An unresolved backend keeps weight 0 beside resolved ones; a rule with
//!   none resolved answers 500 (Gateway API's rule), as does a rule without backends.
//! - Order: Gateway API matches by [`Precedence`], one proto route per (rule, match) so that
//!   first-match order is the precedence (adjacent entries of one rule are merged back);
//!   VirtualService rules in `http[]` order.
//! - Conflicts: Gateway API routes on a Service override its VirtualServices; the oldest
//!   VirtualService (and DestinationRule) per Service and client set wins.

use std::collections::BTreeMap;

use mesh_l7::AppProtocol;

use super::{
    ACCEPTED, Condition, Kind, ParentVerdict, RESOLVED_REFS, Routes, Verdict, VerdictStatus,
    model::{Action, Backend, HeaderModifier, Match, Mirror, Route, RouteTable, Source, SourceKind, Timeouts},
    precedence::Precedence,
    validate::{BackendRef, Destination, DestinationRule, GatewayRoute, GatewayRule, ParentTarget, VirtualService, VsAction, VsRule},
};
use crate::{
    crd::gateway,
    model::{Inventory, NamespacedName, ServicePort},
};

/// Valid objects to compile.
#[derive(Clone, Debug, Default)]
pub struct Input {
    pub gateway_routes: Vec<GatewayRoute>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub grants: Vec<Grant>,
}

/// A `ReferenceGrant`: objects `from` (group, kind, namespace) may refer to objects `to`
/// (group, kind, name or any) of `namespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub namespace: String,
    pub from: Vec<(String, String, String)>,
    pub to: Vec<(String, String, Option<String>)>,
}

pub fn grants(list: &[gateway::ReferenceGrant]) -> Vec<Grant> {
    list.iter()
        .map(|g| Grant {
            namespace: g.metadata.namespace.clone().unwrap_or_default(),
            from: g.spec.from.iter().map(|f| (f.group.clone(), f.kind.clone(), f.namespace.clone())).collect(),
            to: g.spec.to.iter().map(|t| (t.group.clone(), t.kind.clone(), t.name.clone())).collect(),
        })
        .collect()
}

/// Which clients a list of routes is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Producer,
    Consumer(String),
}

/// A failed reference: (ResolvedRefs reason, message naming the field).
type Problem = (&'static str, String);

type Slots = BTreeMap<(NamespacedName, Slot), Vec<Route>>;

pub fn compile(input: &Input, inv: &Inventory) -> Routes {
    let mut verdicts = Vec::new();
    let rules = destination_rules(&input.destination_rules, inv, &mut verdicts);
    let mut slots = Slots::new();
    let routed = gateway_routes(input, inv, &mut slots, &mut verdicts);
    virtual_services(&input.virtual_services, inv, &routed, &rules, &mut slots, &mut verdicts);

    let mut tables: BTreeMap<NamespacedName, RouteTable> = BTreeMap::new();
    for ((service, slot), routes) in slots {
        let table = tables.entry(service.clone()).or_insert_with(|| RouteTable {
            traffic_policy_json: rules.get(&service).and_then(|d| d.traffic_policy_json.clone()),
            service,
            ..RouteTable::default()
        });
        match slot {
            Slot::Producer => table.routes = routes,
            Slot::Consumer(ns) => {
                table.consumers.insert(ns, routes);
            }
        }
    }
    for table in tables.values_mut() {
        if table.routes.is_empty() {
            table.routes.push(default_route(table));
        }
    }
    let subsets = rules.into_iter().map(|(svc, d)| (svc, d.subsets.clone())).collect();
    Routes { tables, subsets, verdicts }
}

/// Consumer routes change only their namespace's clients: everyone else keeps the Service's
/// default behaviour, which a table with producer routes would otherwise lose (no route: 404).
/// The proto has no "default" source kind the nodes accept, so it is labelled with the API of
/// the consumer routes that made the table, and the rule name `default`.
fn default_route(table: &RouteTable) -> Route {
    let kind = table.consumers.values().flatten().next().map_or(SourceKind::HttpRoute, |r| r.source.kind);
    Route {
        source: Source { kind, key: table.service.clone(), rule: 0, rule_name: Some("default".into()) },
        matches: Vec::new(),
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
        rewrite: None,
        action: Action::Forward(vec![Backend::plain(table.service.clone(), None, 1)]),
        mirrors: Vec::new(),
        timeouts: Timeouts::default(),
        retry: None,
        fault: None,
    }
}

/// `Accepted=True`, with the notes (fields carried or ignored) as the message when there are any.
fn accepted(notes: &[String], ok: &str) -> Condition {
    if notes.is_empty() { Condition::yes(ACCEPTED, "Accepted", ok) } else { Condition::yes(ACCEPTED, "PartiallyEnforced", notes.join("; ")) }
}

fn resolved_refs(problems: &[Problem]) -> Condition {
    match problems.first() {
        None => Condition::yes(RESOLVED_REFS, "ResolvedRefs", "all references resolved"),
        Some((reason, _)) => Condition::no(RESOLVED_REFS, reason, problems.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ")),
    }
}

fn oldest_first<T>(list: &[T], id: impl Fn(&T) -> &super::validate::Identity) -> Vec<&T> {
    let mut sorted: Vec<&T> = list.iter().collect();
    sorted.sort_by(|a, b| {
        let (a, b) = (id(a), id(b));
        (a.created.is_none(), a.created, &a.key).cmp(&(b.created.is_none(), b.created, &b.key))
    });
    sorted
}

/// The DestinationRule that configures each Service (its namespace's oldest).
fn destination_rules<'a>(list: &'a [DestinationRule], inv: &Inventory, verdicts: &mut Vec<Verdict>) -> BTreeMap<NamespacedName, &'a DestinationRule> {
    let mut winners: BTreeMap<NamespacedName, &DestinationRule> = BTreeMap::new();
    for dr in oldest_first(list, |d| &d.id) {
        let host = &dr.host;
        let condition = if dr.id.key.namespace != host.namespace {
            Condition::no(
                ACCEPTED,
                "WrongNamespace",
                format!("spec.host: Service {host}: a DestinationRule must be in its host's namespace ({}); client-side DestinationRules are not supported", host.namespace),
            )
        } else if !inv.services.contains_key(host) {
            Condition::no(ACCEPTED, "NoMatchingHost", format!("spec.host: Service {host} not found"))
        } else if let Some(older) = winners.get(host) {
            Condition::no(
                ACCEPTED,
                "Conflicted",
                format!("DestinationRule {} (older) already configures Service {host}; Istio would merge them, the mesh uses the oldest only", older.id.key),
            )
        } else {
            winners.insert(host.clone(), dr);
            accepted(&dr.notes, "the subsets are distributed to the nodes")
        };
        verdicts.push(Verdict { kind: Kind::DestinationRule, key: dr.id.key.clone(), generation: dr.id.generation, status: VerdictStatus::Conditions(vec![condition]) });
    }
    winners
}

/// Compiles the Gateway API routes into `slots`; returns, per Service, the routes attached to it
/// (they override its VirtualServices).
fn gateway_routes(input: &Input, inv: &Inventory, slots: &mut Slots, verdicts: &mut Vec<Verdict>) -> BTreeMap<NamespacedName, Vec<String>> {
    struct Entry {
        service: NamespacedName,
        slot: Slot,
        precedence: Precedence,
        /// (route, parent, rule): entries with the same origin adjacent after sorting merge.
        origin: (usize, usize, u32),
        route: Route,
    }
    let mut entries = Vec::new();
    let mut routed: BTreeMap<NamespacedName, Vec<String>> = BTreeMap::new();
    for (ri, r) in input.gateway_routes.iter().enumerate() {
        let mut problems = Vec::new();
        let rules: Vec<(&GatewayRule, Action, Vec<Mirror>)> = r
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
                ParentTarget::Invalid { why } => Condition::no(ACCEPTED, "NoMatchingParent", why.clone()),
                ParentTarget::Service { service, port, section } => match attach(r.kind, service, *port, section.as_deref(), inv) {
                    Err(c) => c,
                    Ok(port) => {
                        let slot = if r.id.key.namespace == service.namespace { Slot::Producer } else { Slot::Consumer(r.id.key.namespace.clone()) };
                        let label = format!("{} {}", r.kind.as_str(), r.id.key);
                        let labels = routed.entry(service.clone()).or_default();
                        if !labels.contains(&label) {
                            labels.push(label);
                        }
                        for (rule, action, mirrors) in &rules {
                            for (mi, m) in rule.matches.iter().enumerate() {
                                let m = Match { port, ..m.clone() };
                                let precedence = Precedence::of(&m, r.id.created, &r.id.key, rule.index, u32::try_from(mi).unwrap_or(u32::MAX));
                                let route = Route {
                                    source: Source { kind: r.kind, key: r.id.key.clone(), rule: rule.index, rule_name: rule.name.clone() },
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
                                entries.push(Entry { service: service.clone(), slot: slot.clone(), precedence, origin: (ri, pi, rule.index), route });
                            }
                        }
                        accepted(&r.notes, "the route is valid and distributed to the nodes")
                    }
                },
            };
            parents.push(ParentVerdict { reference: p.reference.clone(), conditions: vec![condition, resolved.clone()] });
        }
        let kind = if r.kind == SourceKind::GrpcRoute { Kind::GrpcRoute } else { Kind::HttpRoute };
        verdicts.push(Verdict { kind, key: r.id.key.clone(), generation: r.id.generation, status: VerdictStatus::Parents(parents) });
    }
    entries.sort_by(|a, b| (&a.service, &a.slot, &a.precedence).cmp(&(&b.service, &b.slot, &b.precedence)));
    let mut last: Option<(NamespacedName, Slot, (usize, usize, u32))> = None;
    for e in entries {
        let list = slots.entry((e.service.clone(), e.slot.clone())).or_default();
        let here = Some((e.service, e.slot, e.origin));
        match list.last_mut() {
            Some(prev) if last == here => prev.matches.extend(e.route.matches),
            _ => list.push(e.route),
        }
        last = here;
    }
    routed
}

/// Attaches a route to a Service parent: the port it applies to (`None`: every HTTP port), or
/// the `Accepted=False` condition saying why it cannot attach.
fn attach(kind: SourceKind, service: &NamespacedName, port: Option<u16>, section: Option<&str>, inv: &Inventory) -> Result<Option<u16>, Condition> {
    let no_parent = |m: String| Condition::no(ACCEPTED, "NoMatchingParent", m);
    let svc = inv.services.get(service).ok_or_else(|| no_parent(format!("Service {service} not found")))?;
    let by_port = port.map(|p| svc.ports.iter().find(|sp| sp.port == p).ok_or_else(|| no_parent(format!("Service {service} has no port {p}")))).transpose()?;
    let by_name =
        section.map(|s| svc.ports.iter().find(|sp| sp.name == s).ok_or_else(|| no_parent(format!("Service {service} has no port named {s:?} (sectionName)")))).transpose()?;
    let chosen = match (by_port, by_name) {
        (Some(a), Some(b)) if a.port != b.port => return Err(no_parent(format!("port {} and sectionName {:?} name different ports of Service {service}", a.port, b.name))),
        (a, b) => a.or(b),
    };
    let grpc = kind == SourceKind::GrpcRoute;
    let usable = |sp: &&ServicePort| {
        let p = AppProtocol::classify(&sp.name, sp.app_protocol.as_deref());
        if grpc { p.upstream_h2() } else { p.is_http() }
    };
    let candidates: Vec<&ServicePort> = chosen.map_or_else(|| svc.ports.iter().collect(), |c| vec![c]);
    if candidates.iter().any(usable) {
        return Ok(chosen.map(|c| c.port));
    }
    let which = chosen.map_or_else(|| format!("no port of Service {service}"), |c| format!("port {} ({:?}) of Service {service}", c.port, c.name));
    let fix = if grpc {
        "speaks HTTP/2 to its backends, which gRPC needs: set appProtocol grpc or kubernetes.io/h2c, or name the port grpc* or http2*"
    } else {
        "is HTTP, so the nodes would never route it: set appProtocol (http, http2, kubernetes.io/h2c, grpc) or name the port http*, http2* or grpc*"
    };
    Err(Condition::no(ACCEPTED, "NotAllowedByListeners", format!("{which} {fix}")))
}

fn granted(grants: &[Grant], from_kind: SourceKind, from_namespace: &str, to: &NamespacedName) -> bool {
    grants.iter().any(|g| {
        g.namespace == to.namespace
            && g.from.iter().any(|(group, kind, ns)| group == gateway::GROUP && kind == from_kind.as_str() && ns == from_namespace)
            && g.to.iter().any(|(group, kind, name)| group.is_empty() && kind == "Service" && name.as_ref().is_none_or(|n| *n == to.name))
    })
}

fn resolve(b: &BackendRef, r: &GatewayRoute, grants: &[Grant], inv: &Inventory) -> Result<Backend, Problem> {
    if !b.group.is_empty() || b.kind != "Service" {
        let kind = if b.group.is_empty() { b.kind.clone() } else { format!("{}/{}", b.group, b.kind) };
        return Err(("InvalidKind", format!("{}: kind {kind} is not supported (backends are Services: group \"\", kind Service)", b.field)));
    }
    let target = &b.target;
    if target.namespace != r.id.key.namespace && !granted(grants, r.kind, &r.id.key.namespace, target) {
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

/// The Service exists (and has the port, when one is named).
fn service_port(field: &str, target: &NamespacedName, port: Option<u16>, inv: &Inventory) -> Result<(), Problem> {
    let svc = inv.services.get(target).ok_or_else(|| ("BackendNotFound", format!("{field}: Service {target} not found")))?;
    match port {
        Some(p) if !svc.ports.iter().any(|sp| sp.port == p) => Err(("BackendNotFound", format!("{field}: Service {target} has no port {p}"))),
        _ => Ok(()),
    }
}

fn gateway_action(rule: &GatewayRule, r: &GatewayRoute, grants: &[Grant], inv: &Inventory, problems: &mut Vec<Problem>) -> (Action, Vec<Mirror>) {
    let mut mirrors = Vec::new();
    for (b, per_million) in &rule.mirrors {
        match resolve(b, r, grants, inv) {
            Ok(backend) => mirrors.push(Mirror { backend, per_million: *per_million }),
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
    (if usable { Action::Forward(backends) } else { Action::internal_error() }, mirrors)
}

/// A backend that did not resolve, kept (for the config dump) with weight 0.
fn unresolved(service: &NamespacedName, port: Option<u16>) -> Backend {
    Backend::plain(service.clone(), port, 0)
}

fn virtual_services(
    list: &[VirtualService],
    inv: &Inventory,
    routed: &BTreeMap<NamespacedName, Vec<String>>,
    rules: &BTreeMap<NamespacedName, &DestinationRule>,
    slots: &mut Slots,
    verdicts: &mut Vec<Verdict>,
) {
    let mut taken: BTreeMap<(NamespacedName, Slot), NamespacedName> = BTreeMap::new();
    for vs in oldest_first(list, |v| &v.id) {
        let mut problems = Vec::new();
        let routes: Vec<Route> = vs.rules.iter().map(|rule| vs_route(vs, rule, inv, rules, &mut problems)).collect();
        let ns = &vs.id.key.namespace;
        let mut notes = vs.notes.clone();
        let mut not_applied: Vec<Problem> = Vec::new();
        for (field, svc) in &vs.hosts {
            if !inv.services.contains_key(svc) {
                not_applied.push(("NoMatchingHost", format!("{field}: Service {svc} not found")));
                continue;
            }
            if let Some(by) = routed.get(svc) {
                not_applied.push(("Overridden", format!("{field}: Service {svc} is routed by {} (Gateway API routes win over VirtualServices)", by.join(", "))));
                continue;
            }
            let slot = if vs.own_namespace_only || *ns != svc.namespace { Slot::Consumer(ns.clone()) } else { Slot::Producer };
            if let Some(older) = taken.get(&(svc.clone(), slot.clone())) {
                not_applied.push((
                    "Conflicted",
                    format!("{field}: VirtualService {older} (older) already routes Service {svc} for these clients; Istio would merge them, the mesh uses the oldest only"),
                ));
                continue;
            }
            if *ns != svc.namespace && !vs.own_namespace_only {
                notes.push(format!(
                    "{field}: applies to clients in namespace {ns} only: a VirtualService outside its host's namespace is a consumer route (Istio's default exportTo would make it mesh-wide)"
                ));
            }
            taken.insert((svc.clone(), slot.clone()), vs.id.key.clone());
            slots.entry((svc.clone(), slot)).or_default().extend(routes.iter().cloned());
        }
        let applied = not_applied.len() < vs.hosts.len();
        let accepted = match not_applied.first() {
            Some((reason, _)) if !applied => Condition::no(ACCEPTED, reason, not_applied.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ")),
            _ => {
                notes.extend(not_applied.into_iter().map(|(_, m)| m));
                accepted(&notes, "the routes are valid and distributed to the nodes")
            }
        };
        verdicts.push(Verdict {
            kind: Kind::VirtualService,
            key: vs.id.key.clone(),
            generation: vs.id.generation,
            status: VerdictStatus::Conditions(vec![accepted, resolved_refs(&problems)]),
        });
    }
}

fn vs_route(vs: &VirtualService, rule: &VsRule, inv: &Inventory, rules: &BTreeMap<NamespacedName, &DestinationRule>, problems: &mut Vec<Problem>) -> Route {
    let action = match &rule.action {
        VsAction::Route(dests) => {
            let mut usable = false;
            let backends = dests
                .iter()
                .map(|d| match destination(d, inv, rules, problems) {
                    Some(b) => {
                        usable = true;
                        b
                    }
                    None => unresolved(&d.service, d.port),
                })
                .collect();
            if usable { Action::Forward(backends) } else { Action::internal_error() }
        }
        VsAction::Redirect(r) => Action::Redirect(r.clone()),
        VsAction::Respond { status, body } => Action::Respond { status: *status, body: body.clone() },
    };
    Route {
        source: Source { kind: SourceKind::VirtualService, key: vs.id.key.clone(), rule: rule.index, rule_name: rule.name.clone() },
        matches: rule.matches.clone(),
        request_headers: rule.request_headers.clone(),
        response_headers: rule.response_headers.clone(),
        rewrite: rule.rewrite.clone(),
        action,
        mirrors: rule
            .mirrors
            .iter()
            .filter_map(|(d, per_million)| destination(d, inv, rules, problems).map(|backend| Mirror { backend, per_million: *per_million }))
            .collect(),
        timeouts: rule.timeouts,
        retry: rule.retry.clone(),
        fault: rule.fault.clone(),
    }
}

/// A destination as a backend (`None` when its Service or port does not exist). An unknown
/// subset is a problem too, but the backend is kept: the subset may be defined later, and until
/// then no endpoint carries it.
fn destination(d: &Destination, inv: &Inventory, rules: &BTreeMap<NamespacedName, &DestinationRule>, problems: &mut Vec<Problem>) -> Option<Backend> {
    if let Err(p) = service_port(&d.field, &d.service, d.port, inv) {
        problems.push(p);
        return None;
    }
    if let Some(subset) = &d.subset
        && !rules.get(&d.service).is_some_and(|dr| dr.subsets.iter().any(|(n, _)| n == subset))
    {
        problems.push((
            "SubsetNotFound",
            format!("{}.destination.subset: no DestinationRule for Service {} defines subset {subset:?}", d.field, d.service),
        ));
    }
    Some(Backend {
        service: d.service.clone(),
        port: d.port,
        subset: d.subset.clone(),
        weight: d.weight,
        request_headers: d.request_headers.clone(),
        response_headers: d.response_headers.clone(),
    })
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
