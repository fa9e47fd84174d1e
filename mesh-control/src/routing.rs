//! L7 routing: Gateway API `HTTPRoute`/`GRPCRoute` (GAMMA: a Service as parent) and Istio-shaped
//! `VirtualService`/`DestinationRule`, compiled into one route table per Service (the proto's
//! `RouteTable`), with a verdict per object for its status.
//!
//! Data flow: a source (file mode, Kubernetes) reads objects with [`crate::crd::read`] into
//! [`Objects`] → [`build`]: [`validate`] each object (invalid: left out, `Accepted=False`) →
//! [`compile`] what is valid against the inventory (references resolved, precedence applied,
//! conflicts decided) → [`Routes`], part of the published state → `view` sends every table to
//! every node and fills `Endpoint.subsets`.
//!
//! Precedence between the APIs: Gateway API routes attached to a Service win over every
//! VirtualService for it; of several VirtualServices for one Service and client set, the oldest
//! wins (Istio would merge them; we do not, and say so in the losers' status).

pub mod compile;
pub mod model;
pub mod precedence;
pub mod validate;

use std::collections::BTreeMap;

use crate::{
    crd::{Read, gateway, networking},
    model::{Inventory, Labels, NamespacedName},
};

/// The routing objects a source holds, as read (typed, with the fields the types do not know).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub http_routes: Vec<Read<gateway::HttpRoute>>,
    pub grpc_routes: Vec<Read<gateway::GrpcRoute>>,
    pub reference_grants: Vec<gateway::ReferenceGrant>,
    pub virtual_services: Vec<Read<networking::VirtualService>>,
    pub destination_rules: Vec<Read<networking::DestinationRule>>,
    pub local_rate_limits: Vec<Read<networking::LocalRateLimit>>,
}

/// The outcome of routing: part of the published state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Only Services that have routes.
    pub tables: BTreeMap<NamespacedName, model::RouteTable>,
    /// Service → its DestinationRule's subsets (name, labels), for `Endpoint.subsets`.
    pub subsets: BTreeMap<NamespacedName, Vec<(String, Labels)>>,
    /// One per object.
    pub verdicts: Vec<Verdict>,
}

/// Validates and compiles every routing object (sans-IO).
pub fn build(objects: &Objects, inventory: &Inventory) -> Routes {
    let mut input = compile::Input {
        grants: compile::grants(&objects.reference_grants),
        ..compile::Input::default()
    };
    let mut rejected = Vec::new();
    let gateway_routes = objects
        .http_routes
        .iter()
        .map(|r| {
            (
                &r.object.metadata,
                &r.object.spec.parent_refs,
                Kind::HttpRoute,
                validate::gateway::http_route(r),
            )
        })
        .chain(objects.grpc_routes.iter().map(|r| {
            (
                &r.object.metadata,
                &r.object.spec.parent_refs,
                Kind::GrpcRoute,
                validate::gateway::grpc_route(r),
            )
        }));
    for (meta, parent_refs, kind, result) in gateway_routes {
        match result {
            Ok(route) => input.gateway_routes.push(route),
            Err(e) => {
                let id = validate::identity(meta);
                let parents = validate::gateway::parents(parent_refs, &id.key.namespace)
                    .into_iter()
                    .filter(|p| !matches!(p.target, validate::ParentTarget::NotOurs))
                    .map(|p| ParentVerdict {
                        reference: p.reference,
                        conditions: vec![Condition::no(
                            ACCEPTED,
                            e.gateway_reason(),
                            e.to_string(),
                        )],
                    })
                    .collect();
                rejected.push(Verdict {
                    kind,
                    key: id.key,
                    generation: id.generation,
                    status: VerdictStatus::Parents(parents),
                });
            }
        }
    }
    for r in &objects.virtual_services {
        match validate::istio::virtual_service(r) {
            Ok(vs) => input.virtual_services.push(vs),
            Err(e) => rejected.push(Verdict::rejected(
                Kind::VirtualService,
                &r.object.metadata,
                &e,
            )),
        }
    }
    for r in &objects.destination_rules {
        match validate::istio::destination_rule(r) {
            Ok(dr) => input.destination_rules.push(dr),
            Err(e) => rejected.push(Verdict::rejected(
                Kind::DestinationRule,
                &r.object.metadata,
                &e,
            )),
        }
    }
    for r in &objects.local_rate_limits {
        match validate::rate_limit::local_rate_limit(r) {
            Ok(l) => input.local_rate_limits.push(l),
            Err(e) => rejected.push(Verdict::rejected(
                Kind::LocalRateLimit,
                &r.object.metadata,
                &e,
            )),
        }
    }
    let mut routes = compile::compile(&input, inventory);
    routes.verdicts.extend(rejected);
    routes
        .verdicts
        .sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
    routes
}

/// Logs what is not fully in force: rejections as warnings, partial enforcement as info.
pub fn log_verdicts(verdicts: &[Verdict]) {
    for v in verdicts {
        for c in v.conditions() {
            if !c.status {
                tracing::warn!(kind = v.kind.as_str(), object = %v.key, condition = c.type_, reason = c.reason, "{}", c.message);
            } else if c.reason == "PartiallyEnforced" {
                tracing::info!(kind = v.kind.as_str(), object = %v.key, "{}", c.message);
            }
        }
    }
}

/// The routing kinds, as their status and metrics name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    HttpRoute,
    GrpcRoute,
    VirtualService,
    DestinationRule,
    LocalRateLimit,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
            Self::VirtualService => "VirtualService",
            Self::DestinationRule => "DestinationRule",
            Self::LocalRateLimit => "LocalRateLimit",
        }
    }
}

pub const ACCEPTED: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";

/// One status condition of a routing object.
pub use crate::model::StatusCondition as Condition;

/// What the controller says about one routing object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub key: NamespacedName,
    pub generation: Option<i64>,
    pub status: VerdictStatus,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerdictStatus {
    /// Gateway API: conditions per parent the mesh handles (`status.parents[]`).
    Parents(Vec<ParentVerdict>),
    /// Our kinds: the object's `status.conditions`.
    Conditions(Vec<Condition>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentVerdict {
    /// Echoed verbatim in `status.parents[].parentRef`.
    pub reference: gateway::ParentReference,
    pub conditions: Vec<Condition>,
}

impl Verdict {
    fn rejected(kind: Kind, meta: &kube::api::ObjectMeta, e: &validate::Error) -> Self {
        let id = validate::identity(meta);
        Self {
            kind,
            key: id.key,
            generation: id.generation,
            status: VerdictStatus::Conditions(vec![Condition::no(
                ACCEPTED,
                e.reason(),
                e.to_string(),
            )]),
        }
    }

    /// Every condition, flattened (for logs, metrics and `/status`).
    pub fn conditions(&self) -> Vec<&Condition> {
        match &self.status {
            VerdictStatus::Parents(ps) => ps.iter().flat_map(|p| &p.conditions).collect(),
            VerdictStatus::Conditions(cs) => cs.iter().collect(),
        }
    }

    /// The reason of the first `Accepted=False`, if any.
    pub fn rejection(&self) -> Option<&'static str> {
        self.conditions()
            .into_iter()
            .find(|c| c.type_ == ACCEPTED && !c.status)
            .map(|c| c.reason)
    }
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;
