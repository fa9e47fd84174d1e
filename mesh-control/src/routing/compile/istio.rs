//! DestinationRules (which one configures each Service, its subsets) and VirtualServices (which
//! Services and clients each one routes) → route lists and verdicts.

use std::collections::BTreeMap;

use super::{
    Problem, Slot, Slots, accepted, oldest_first, resolved_refs, service_port, unresolved,
};
use crate::{
    model::{Inventory, NamespacedName},
    routing::{
        ACCEPTED, Condition, Kind, Verdict, VerdictStatus,
        model::{Action, Backend, Mirror, Route, Source, SourceKind},
        validate::{Destination, DestinationRule, VirtualService, VsAction, VsRule},
    },
};

/// The DestinationRule that configures each Service (its namespace's oldest).
pub(super) fn destination_rules<'a>(
    list: &'a [DestinationRule],
    inv: &Inventory,
    verdicts: &mut Vec<Verdict>,
) -> BTreeMap<NamespacedName, &'a DestinationRule> {
    let mut winners: BTreeMap<NamespacedName, &DestinationRule> = BTreeMap::new();
    for dr in oldest_first(list, |d| &d.id) {
        let host = &dr.host;
        let condition = if dr.id.key.namespace != host.namespace {
            Condition::no(
                ACCEPTED,
                "WrongNamespace",
                format!(
                    "spec.host: Service {host}: a DestinationRule must be in its host's namespace ({}); client-side DestinationRules are not supported",
                    host.namespace
                ),
            )
        } else if !inv.services.contains_key(host) {
            Condition::no(
                ACCEPTED,
                "NoMatchingHost",
                format!("spec.host: Service {host} not found"),
            )
        } else if let Some(older) = winners.get(host) {
            Condition::no(
                ACCEPTED,
                "Conflicted",
                format!(
                    "DestinationRule {} (older) already configures Service {host}; Istio would merge them, the mesh uses the oldest only",
                    older.id.key
                ),
            )
        } else {
            winners.insert(host.clone(), dr);
            accepted(&dr.notes, "the subsets are distributed to the nodes")
        };
        verdicts.push(Verdict {
            kind: Kind::DestinationRule,
            key: dr.id.key.clone(),
            generation: dr.id.generation,
            status: VerdictStatus::Conditions(vec![condition]),
        });
    }
    winners
}

pub(super) fn virtual_services(
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
        let routes: Vec<Route> = vs
            .rules
            .iter()
            .map(|rule| vs_route(vs, rule, inv, rules, &mut problems))
            .collect();
        let ns = &vs.id.key.namespace;
        let mut notes = vs.notes.clone();
        let mut not_applied: Vec<Problem> = Vec::new();
        for (field, svc) in &vs.hosts {
            if !inv.services.contains_key(svc) {
                not_applied.push((
                    "NoMatchingHost",
                    format!("{field}: Service {svc} not found"),
                ));
                continue;
            }
            if let Some(by) = routed.get(svc) {
                not_applied.push(("Overridden", format!("{field}: Service {svc} is routed by {} (Gateway API routes win over VirtualServices)", by.join(", "))));
                continue;
            }
            let slot = if vs.own_namespace_only || *ns != svc.namespace {
                Slot::Consumer(ns.clone())
            } else {
                Slot::Producer
            };
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
            slots
                .entry((svc.clone(), slot))
                .or_default()
                .extend(routes.iter().cloned());
        }
        let applied = not_applied.len() < vs.hosts.len();
        let accepted = match not_applied.first() {
            Some((reason, _)) if !applied => Condition::no(
                ACCEPTED,
                reason,
                not_applied
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
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

fn vs_route(
    vs: &VirtualService,
    rule: &VsRule,
    inv: &Inventory,
    rules: &BTreeMap<NamespacedName, &DestinationRule>,
    problems: &mut Vec<Problem>,
) -> Route {
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
            if usable {
                Action::Forward(backends)
            } else {
                Action::internal_error()
            }
        }
        VsAction::Redirect(r) => Action::Redirect(r.clone()),
        VsAction::Respond { status, body } => Action::Respond {
            status: *status,
            body: body.clone(),
        },
    };
    Route {
        source: Source {
            kind: SourceKind::VirtualService,
            key: vs.id.key.clone(),
            rule: rule.index,
            rule_name: rule.name.clone(),
        },
        matches: rule.matches.clone(),
        request_headers: rule.request_headers.clone(),
        response_headers: rule.response_headers.clone(),
        rewrite: rule.rewrite.clone(),
        action,
        mirrors: rule
            .mirrors
            .iter()
            .filter_map(|(d, per_million)| {
                destination(d, inv, rules, problems).map(|backend| Mirror {
                    backend,
                    per_million: *per_million,
                })
            })
            .collect(),
        timeouts: rule.timeouts,
        retry: rule.retry.clone(),
        fault: rule.fault.clone(),
    }
}

/// A destination as a backend (`None` when its Service or port does not exist). An unknown
/// subset is a problem too, but the backend is kept: the subset may be defined later, and until
/// then no endpoint carries it.
fn destination(
    d: &Destination,
    inv: &Inventory,
    rules: &BTreeMap<NamespacedName, &DestinationRule>,
    problems: &mut Vec<Problem>,
) -> Option<Backend> {
    if let Err(p) = service_port(&d.field, &d.service, d.port, inv) {
        problems.push(p);
        return None;
    }
    if let Some(subset) = &d.subset
        && !rules
            .get(&d.service)
            .is_some_and(|dr| dr.subsets.iter().any(|(n, _)| n == subset))
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
