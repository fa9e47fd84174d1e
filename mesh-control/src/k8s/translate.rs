//! Kubernetes objects → [`Inventory`] (sans-IO): pods become workloads, Services plus their
//! EndpointSlices become services with endpoints. Objects that cannot be used (a pod without a
//! node or IP, a Service without a name) are skipped, never a panic.

use std::{
    collections::BTreeMap,
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

use crate::model::{self, Endpoint, Inventory, Labels, NamespacedName, Protocol, ServicePort, Workload};

/// Label EndpointSlices carry with their Service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn inventory(nodes: &[Node], namespaces: &[Namespace], pods: &[Pod], services: &[Service], slices: &[EndpointSlice]) -> Inventory {
    let ns_labels: BTreeMap<String, Labels> = namespaces.iter().map(|n| (n.name_any(), n.labels().clone())).collect();
    let mut inv = Inventory {
        nodes: nodes.iter().map(|n| (n.name_any(), internal_ip(n))).collect(),
        localities: nodes.iter().filter_map(|n| Some((n.name_any(), model::locality(n.labels())?))).collect(),
        ..Inventory::default()
    };
    for p in pods {
        if let Some(w) = workload(p, &ns_labels) {
            inv.workloads.insert(w.uid.clone(), w);
        }
    }
    for problem in inv.drop_shared_addresses() {
        tracing::warn!("Pod {problem}");
    }
    let mut by_service: BTreeMap<NamespacedName, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let (Some(ns), Some(svc)) = (s.namespace(), s.labels().get(SERVICE_NAME_LABEL)) {
            by_service.entry(NamespacedName::new(ns, svc.clone())).or_default().push(s);
        }
    }
    for s in services {
        if let Some(svc) = service(s, by_service.get(&NamespacedName::new(s.namespace().unwrap_or_default(), s.name_any())).map_or(&[][..], Vec::as_slice)) {
            inv.services.insert(svc.key(), svc);
        }
    }
    inv
}

/// A scheduled pod with an IP becomes a workload; finished pods do not.
pub fn workload(p: &Pod, ns_labels: &BTreeMap<String, Labels>) -> Option<Workload> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) || p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let node = spec.node_name.clone()?;
    let mut addresses: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|i| i.ip.parse().ok()).collect();
    if addresses.is_empty() {
        addresses.extend(status.pod_ip.as_ref().and_then(|i| i.parse::<IpAddr>().ok()));
    }
    if addresses.is_empty() || spec.host_network == Some(true) {
        // Without an own IP there is nothing to capture; host-network pods are not meshed.
        return None;
    }
    let namespace = p.namespace().unwrap_or_default();
    let healthy = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    Some(Workload {
        uid: p.uid().unwrap_or_else(|| format!("{namespace}/{}", p.name_any())),
        name: p.name_any(),
        meshed: model::meshed(ns_labels.get(&namespace), p.labels()),
        namespace,
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node,
        addresses,
        labels: p.labels().clone(),
        healthy,
    })
}

pub fn service(s: &Service, slices: &[&EndpointSlice]) -> Option<model::Service> {
    let spec = s.spec.as_ref()?;
    let vips: Vec<IpAddr> = match &spec.cluster_ips {
        Some(ips) => ips.iter().filter_map(|i| i.parse().ok()).collect(),
        None => spec.cluster_ip.iter().filter_map(|i| i.parse().ok()).collect(),
    };
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|p| *p > 0)?;
            let target = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => u16::try_from(*t).ok().filter(|t| *t > 0)?,
                _ => port, // named target ports are resolved per endpoint, from the slice
            };
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                target_port: target,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    let mut endpoints = Vec::new();
    for slice in slices {
        // Slice ports are named like the Service ports they serve.
        let slice_ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?)))
            .collect();
        let port_map: BTreeMap<u16, u16> = ports
            .iter()
            .map(|sp| (sp.port, slice_ports.get(&sp.name).copied().unwrap_or(sp.target_port)))
            .collect();
        for e in &slice.endpoints {
            // Kubernetes: a nil `ready` means ready.
            let healthy = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let uid = e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| r.uid.clone());
            for a in &e.addresses {
                if let Ok(address) = a.parse() {
                    endpoints.push(Endpoint { workload_uid: uid.clone(), address, ports: port_map.clone(), healthy });
                }
            }
        }
    }
    endpoints.sort_by_key(|a| a.address);
    endpoints.dedup_by(|a, b| a.address == b.address);
    Some(model::Service { name: s.name_any(), namespace: s.namespace().unwrap_or_default(), vips, ports, endpoints })
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;

/// A Node's InternalIP (where the node daemon listens for HBONE, as it runs with hostNetwork).
fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == "InternalIP").and_then(|a| a.address.parse().ok())
}
