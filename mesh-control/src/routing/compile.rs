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

mod gateway_api;
mod istio;

use super::{
    ACCEPTED, Condition, Kind, RESOLVED_REFS, Routes, Verdict, VerdictStatus,
    model::{
        Action, Backend, HeaderModifier, RateLimit, Route, RouteTable, Source, SourceKind, Timeouts,
    },
    validate::{
        DestinationRule, GatewayRoute, Identity, VirtualService, rate_limit::LocalRateLimit,
    },
};
use crate::{
    crd::gateway,
    model::{Inventory, NamespacedName},
};

/// Valid objects to compile.
#[derive(Clone, Debug, Default)]
pub struct Input {
    pub gateway_routes: Vec<GatewayRoute>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub local_rate_limits: Vec<LocalRateLimit>,
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
            from: g
                .spec
                .from
                .iter()
                .map(|f| (f.group.clone(), f.kind.clone(), f.namespace.clone()))
                .collect(),
            to: g
                .spec
                .to
                .iter()
                .map(|t| (t.group.clone(), t.kind.clone(), t.name.clone()))
                .collect(),
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
    let rules = istio::destination_rules(&input.destination_rules, inv, &mut verdicts);
    let mut slots = Slots::new();
    let routed = gateway_api::routes(input, inv, &mut slots, &mut verdicts);
    istio::virtual_services(
        &input.virtual_services,
        inv,
        &routed,
        &rules,
        &mut slots,
        &mut verdicts,
    );

    let mut tables: BTreeMap<NamespacedName, RouteTable> = BTreeMap::new();
    for ((service, slot), routes) in slots {
        let table = tables
            .entry(service.clone())
            .or_insert_with(|| RouteTable {
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
    // A traffic policy applies with or without routes: a Service with only a policy gets a
    // table with the default route to carry it.
    for (service, rule) in &rules {
        if rule.traffic_policy.is_none() && rule.subset_policies.is_empty() {
            continue;
        }
        let table = tables
            .entry(service.clone())
            .or_insert_with(|| RouteTable {
                service: service.clone(),
                ..RouteTable::default()
            });
        table.traffic_policy.clone_from(&rule.traffic_policy);
        let base = rule.traffic_policy.clone().unwrap_or_default();
        table.subset_policies = rule
            .subset_policies
            .iter()
            .map(|(name, p)| (name.clone(), base.overlaid_by(p)))
            .collect();
    }
    for (service, limit) in rate_limits(&input.local_rate_limits, inv, &mut verdicts) {
        tables
            .entry(service.clone())
            .or_insert_with(|| RouteTable {
                service,
                ..RouteTable::default()
            })
            .rate_limit = Some(limit);
    }
    for table in tables.values_mut() {
        if table.routes.is_empty() {
            table.routes.push(default_route(table));
        }
    }
    let subsets = rules
        .into_iter()
        .map(|(svc, d)| (svc, d.subsets.clone()))
        .collect();
    Routes {
        tables,
        subsets,
        verdicts,
    }
}

/// Consumer routes change only their namespace's clients: everyone else keeps the Service's
/// default behaviour, which a table with producer routes would otherwise lose (no route: 404).
/// The proto has no "default" source kind the nodes accept, so it is labelled with the API of
/// the consumer routes that made the table, and the rule name `default`.
fn default_route(table: &RouteTable) -> Route {
    let kind = table
        .consumers
        .values()
        .flatten()
        .next()
        .map_or(SourceKind::HttpRoute, |r| r.source.kind);
    Route {
        source: Source {
            kind,
            key: table.service.clone(),
            rule: 0,
            rule_name: Some("default".into()),
        },
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
    if notes.is_empty() {
        Condition::yes(ACCEPTED, "Accepted", ok)
    } else {
        Condition::yes(ACCEPTED, "PartiallyEnforced", notes.join("; "))
    }
}

fn resolved_refs(problems: &[Problem]) -> Condition {
    match problems.first() {
        None => Condition::yes(RESOLVED_REFS, "ResolvedRefs", "all references resolved"),
        Some((reason, _)) => Condition::no(
            RESOLVED_REFS,
            reason,
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

fn oldest_first<T>(list: &[T], id: impl Fn(&T) -> &Identity) -> Vec<&T> {
    let mut sorted: Vec<&T> = list.iter().collect();
    sorted.sort_by(|a, b| {
        let (a, b) = (id(a), id(b));
        (a.created.is_none(), a.created, &a.key).cmp(&(b.created.is_none(), b.created, &b.key))
    });
    sorted
}

/// The Service exists (and has the port, when one is named).
fn service_port(
    field: &str,
    target: &NamespacedName,
    port: Option<u16>,
    inv: &Inventory,
) -> Result<(), Problem> {
    let svc = inv.services.get(target).ok_or_else(|| {
        (
            "BackendNotFound",
            format!("{field}: Service {target} not found"),
        )
    })?;
    match port {
        Some(p) if !svc.ports.iter().any(|sp| sp.port == p) => Err((
            "BackendNotFound",
            format!("{field}: Service {target} has no port {p}"),
        )),
        _ => Ok(()),
    }
}

/// A backend that did not resolve, kept (for the config dump) with weight 0.
fn unresolved(service: &NamespacedName, port: Option<u16>) -> Backend {
    Backend::plain(service.clone(), port, 0)
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;

/// The LocalRateLimit of each Service (its namespace's oldest; a Service that does not exist
/// gets none).
fn rate_limits(
    list: &[LocalRateLimit],
    inv: &Inventory,
    verdicts: &mut Vec<Verdict>,
) -> BTreeMap<NamespacedName, RateLimit> {
    let mut winners: BTreeMap<NamespacedName, (NamespacedName, RateLimit)> = BTreeMap::new();
    for l in oldest_first(list, |l| &l.id) {
        let condition = if !inv.services.contains_key(&l.service) {
            Condition::no(
                ACCEPTED,
                "NoMatchingHost",
                format!("spec.targetRefs[0]: Service {} not found", l.service),
            )
        } else if let Some((older, _)) = winners.get(&l.service) {
            Condition::no(
                ACCEPTED,
                "Conflicted",
                format!(
                    "LocalRateLimit {older} (older) already limits Service {}",
                    l.service
                ),
            )
        } else {
            winners.insert(l.service.clone(), (l.id.key.clone(), l.limit.clone()));
            accepted(&[], "enforced by the nodes of the Service's pods")
        };
        verdicts.push(Verdict {
            kind: Kind::LocalRateLimit,
            key: l.id.key.clone(),
            generation: l.id.generation,
            status: VerdictStatus::Conditions(vec![condition]),
        });
    }
    winners.into_iter().map(|(s, (_, l))| (s, l)).collect()
}
