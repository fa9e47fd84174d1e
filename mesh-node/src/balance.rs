//! Which endpoint of a Service a new connection or request goes to. One module decides it for
//! all three places that balance: the kernel's tables (unmeshed clients, balanced at
//! `connect()`), the TCP proxy (meshed clients' connections, captured before the kernel would
//! balance them) and the HTTP proxy (per request). They share the candidate set (every endpoint
//! of the address family and subset, with the port that serves the Service port), the weights,
//! and the algorithm; the kernel then executes its tables and the daemon [`pick`]s with the same
//! distribution.

pub mod cluster;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use mesh_l7::policy::{LoadBalancer, TrafficPolicy};

use crate::{
    datapath::LoadBalancing,
    state::{Endpoint, Service, ServicePort},
};

/// One endpoint as balancing sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'s> {
    pub endpoint: &'s Endpoint,
    /// The endpoint's address with the port serving the Service port.
    pub addr: SocketAddr,
    /// Relative share of new connections (Kubernetes has no per-endpoint weight: 1).
    pub weight: u32,
}

/// The kernel's algorithm for a Service port: Maglev when the Service's DestinationRule asks
/// for consistent hashing (the kernel hashes the client socket's network namespace and port, so
/// one pod's connections stick), weighted random otherwise (the kernel cannot count requests or
/// take turns; the daemon's HTTP picks do, in [`cluster`]).
pub fn algorithm(_service: &Service, _port: &ServicePort, policy: Option<&TrafficPolicy>) -> LoadBalancing {
    match policy.and_then(|p| p.load_balancer.as_ref()) {
        Some(LoadBalancer::ConsistentHash { .. }) => LoadBalancing::Maglev,
        _ => LoadBalancing::Random,
    }
}

/// Every endpoint of `service` in the address family of `ipv4` and in `subset` (when given),
/// healthy or not (the kernel keeps unhealthy ones out of its tables itself).
pub fn candidates<'s>(service: &'s Service, port: &'s ServicePort, ipv4: bool, subset: Option<&'s str>) -> impl Iterator<Item = Candidate<'s>> + Clone + 's {
    service
        .endpoints
        .iter()
        .filter(move |e| e.address.is_ipv4() == ipv4)
        .filter(move |e| subset.is_none_or(|s| e.subsets.iter().any(|x| x == s)))
        .map(move |e| Candidate { endpoint: e, addr: SocketAddr::new(e.address, service.endpoint_port(port, e)), weight: 1 })
}

/// Weighted random among the healthy candidates with a weight: the distribution of the kernel's
/// weighted table. `random` is any uniform 64-bit value. `None`: no healthy endpoint.
pub fn pick<'s>(candidates: impl Iterator<Item = Candidate<'s>> + Clone, random: u64) -> Option<Candidate<'s>> {
    let live = candidates.filter(|c| c.endpoint.healthy && c.weight > 0);
    let total: u64 = live.clone().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut r = random % total;
    for c in live {
        let w = u64::from(c.weight);
        if r < w {
            return Some(c);
        }
        r -= w;
    }
    None
}

/// [`pick`] with a fresh random value, leaving out endpoints outlier detection ejected, and
/// preferring the client's locality when given (the TCP path's pick: it has no per-request
/// state).
pub fn pick_one<'s>(
    service: &'s Service,
    port: &'s ServicePort,
    ipv4: bool,
    subset: Option<&'s str>,
    ejected: Option<&HashSet<IpAddr>>,
    locality: Option<&str>,
) -> Option<Candidate<'s>> {
    let all = candidates(service, port, ipv4, subset);
    let live = all.clone().filter(|c| c.endpoint.healthy && c.weight > 0 && !ejected.is_some_and(|out| out.contains(&c.addr.ip())));
    let best = locality.map_or(0, |l| live.clone().map(|c| locality_priority(l, c.endpoint.locality.as_deref())).min().unwrap_or(0));
    let preferred = live.filter(|c| locality.is_none_or(|l| locality_priority(l, c.endpoint.locality.as_deref()) == best));
    // Everything ejected (or unhealthy): any endpoint rather than none.
    pick(preferred, fastrand::u64(..)).or_else(|| pick(all, fastrand::u64(..)))
}

/// Istio's locality priority of an endpoint for a client in `client` (`<region>/<zone>`): 0 in
/// the same zone of the same region, 1 in the same region, 2 elsewhere or unknown. Requests go
/// to the lowest priority that has a healthy endpoint, so they fail over zone, then region.
pub fn locality_priority(client: &str, endpoint: Option<&str>) -> u8 {
    let Some(endpoint) = endpoint else { return 2 };
    // Called per candidate on each request: compare the halves in place.
    let ((cr, cz), (er, ez)) = (client.split_once('/').unwrap_or((client, "")), endpoint.split_once('/').unwrap_or((endpoint, "")));
    match (cr == er, cz == ez) {
        (true, true) => 0,
        (true, false) => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::state::ServiceProtocol;

    fn service() -> Service {
        let ep = |last: u8, healthy: bool, subsets: &[&str]| Endpoint {
            address: IpAddr::from([198, 18, 2, last]),
            ports: BTreeMap::from([(80, 9000 + u16::from(last))]),
            healthy,
            node: "n2".into(),
            node_address: None,
            meshed: true,
            identity: None,
            subsets: subsets.iter().map(|s| (*s).to_owned()).collect(),
            locality: None,
        };
        Service {
            name: "whoami".into(),
            namespace: "demo".into(),
            vips: vec![IpAddr::from([198, 19, 0, 10])],
            ports: vec![ServicePort { name: "http".into(), port: 80, protocol: ServiceProtocol::Tcp, target_port: 8080, app_protocol: None }],
            endpoints: vec![ep(11, true, &["v1"]), ep(12, false, &["v1"]), ep(13, true, &["v2"]), Endpoint { address: "fd00::1".parse().expect("ip"), ..ep(14, true, &["v1"]) }],
        }
    }

    #[test]
    fn picks_spread_over_healthy_endpoints_of_the_family_and_subset() {
        let s = service();
        let port = &s.ports[0];
        let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
        for r in 0..1000 {
            let c = pick(candidates(&s, port, true, None), r).expect("healthy endpoints");
            *counts.entry(c.addr).or_default() += 1;
        }
        assert_eq!(counts.len(), 2, "unhealthy and IPv6 endpoints never chosen: {counts:?}");
        assert_eq!(counts[&SocketAddr::from(([198, 18, 2, 11], 9011))], 500, "uniform over two");
        let v2: Vec<SocketAddr> = (0..10).filter_map(|r| pick(candidates(&s, port, true, Some("v2")), r)).map(|c| c.addr).collect();
        assert!(v2.iter().all(|a| *a == SocketAddr::from(([198, 18, 2, 13], 9013))), "subset v2 only");
        assert!(pick(candidates(&s, port, true, Some("v3")), 0).is_none(), "empty subset: no endpoint");
        assert_eq!(candidates(&s, port, true, None).count(), 3, "the kernel sees unhealthy ones too");
    }
}
