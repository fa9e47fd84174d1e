//! A Service as the node needs it: VIPs and ports to balance, endpoints with where they run and
//! who they are (so the node can tunnel to them and verify them without knowing remote pods).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use mesh_l7::AppProtocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServiceProtocol {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The port's name (Istio's protocol selection reads its prefix).
    #[serde(default)]
    pub name: String,
    pub port: u16,
    pub protocol: ServiceProtocol,
    /// Port on the endpoints unless an endpoint maps it otherwise.
    pub target_port: u16,
    /// Kubernetes `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// How the mesh handles this port: HTTP (routes, L7 policy, request metrics) or TCP.
    pub fn app_protocol(&self) -> AppProtocol {
        if self.protocol == ServiceProtocol::Udp {
            return AppProtocol::Tcp;
        }
        AppProtocol::classify(&self.name, self.app_protocol.as_deref())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Service port → port on this endpoint (when it differs from the target port).
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    pub healthy: bool,
    /// Node the endpoint runs on ("" if unknown).
    #[serde(default)]
    pub node: String,
    /// Where that node accepts HBONE, when known.
    #[serde(default)]
    pub node_address: Option<IpAddr>,
    /// In the mesh: reach it over HBONE and expect `identity`.
    #[serde(default)]
    pub meshed: bool,
    /// SPIFFE identity (`spiffe://...`), when meshed.
    #[serde(default)]
    pub identity: Option<String>,
    /// DestinationRule subsets of the Service this endpoint belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<String>,
    /// `<region>/<zone>` of its node, when known (locality failover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// The Service's DNS name, as Istio's `destination_service` label carries it.
    pub fn hostname(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{cluster_domain}", self.name, self.namespace)
    }

    /// The port on `endpoint` that serves `port` of this Service.
    pub fn endpoint_port(&self, port: &ServicePort, endpoint: &Endpoint) -> u16 {
        endpoint.ports.get(&port.port).copied().unwrap_or(port.target_port)
    }
}

/// The per-connection lookups, built once per state so a connection costs two hash lookups,
/// not a scan of every Service and endpoint. Positions index the `services` it was built from.
#[derive(Debug, Default)]
pub struct Index {
    /// VIP:port (TCP) → (Service, port); the first Service and port in order win.
    vips: HashMap<SocketAddr, (usize, usize)>,
    /// Endpoint address:port on the pod → every (Service, port) serving it, by namespace and name.
    serving: HashMap<SocketAddr, Vec<(usize, usize)>>,
    /// namespace → name → Service (nested so a lookup borrows, never allocates).
    by_name: HashMap<String, HashMap<String, usize>>,
}

impl Index {
    pub fn build(services: &[Service]) -> Self {
        let mut index = Self::default();
        for (i, s) in services.iter().enumerate() {
            index.by_name.entry(s.namespace.clone()).or_default().entry(s.name.clone()).or_insert(i);
            for (j, p) in s.ports.iter().enumerate().filter(|(_, p)| p.protocol == ServiceProtocol::Tcp) {
                for vip in &s.vips {
                    index.vips.entry(SocketAddr::new(*vip, p.port)).or_insert((i, j));
                }
            }
            for e in &s.endpoints {
                for (j, p) in s.ports.iter().enumerate() {
                    let at = SocketAddr::new(e.address, s.endpoint_port(p, e));
                    index.serving.entry(at).or_default().push((i, j));
                }
            }
        }
        for all in index.serving.values_mut() {
            all.sort_by(|a, b| {
                let (x, y) = (&services[a.0], &services[b.0]);
                (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name))
            });
            all.dedup_by_key(|(i, _)| *i);
        }
        index
    }

    /// The Service and port a VIP:port (TCP) belongs to.
    pub fn vip<'a>(&self, services: &'a [Service], dst: SocketAddr) -> Option<(&'a Service, &'a ServicePort)> {
        let &(i, j) = self.vips.get(&dst)?;
        Some((&services[i], &services[i].ports[j]))
    }

    pub fn by_name<'a>(&self, services: &'a [Service], namespace: &str, name: &str) -> Option<&'a Service> {
        self.by_name.get(namespace).and_then(|n| n.get(name)).map(|&i| &services[i])
    }

    /// The Service a connection to a pod's `dst` (ip:port) is reaching: one with an endpoint at
    /// that address whose target port is `dst`'s port; when several qualify, the first by
    /// namespace and name, so every daemon reports the same one.
    pub fn serving<'a>(&self, services: &'a [Service], dst: SocketAddr) -> Option<(&'a Service, &'a ServicePort)> {
        let &(i, j) = self.serving.get(&dst)?.first()?;
        Some((&services[i], &services[i].ports[j]))
    }

    /// Every Service serving `dst`, by namespace and name (see [`Index::serving`]).
    pub fn serving_all<'a>(&'a self, services: &'a [Service], dst: SocketAddr) -> impl Iterator<Item = (&'a Service, &'a ServicePort)> {
        self.serving.get(&dst).into_iter().flatten().map(|&(i, j)| (&services[i], &services[i].ports[j]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        let ep = |last: u8, healthy| Endpoint {
            address: IpAddr::from([198, 18, 2, last]),
            ports: BTreeMap::from([(80, 9000 + u16::from(last))]),
            healthy,
            node: "n2".into(),
            node_address: None,
            meshed: true,
            identity: None,
            subsets: Vec::new(),
            locality: None,
        };
        Service {
            name: "whoami".into(),
            namespace: "demo".into(),
            vips: vec![IpAddr::from([198, 19, 0, 10])],
            ports: vec![ServicePort { name: "tcp".into(), port: 80, protocol: ServiceProtocol::Tcp, target_port: 8080, app_protocol: None }],
            endpoints: vec![ep(11, true), ep(12, false), ep(13, true)],
        }
    }

    #[test]
    fn vips_and_names_find_their_service_port() {
        let services = [svc()];
        let index = Index::build(&services);
        let vip = SocketAddr::from(([198, 19, 0, 10], 80));
        assert_eq!(index.vip(&services, vip).map(|(s, p)| (s.name.as_str(), p.port)), Some(("whoami", 80)));
        assert!(index.vip(&services, SocketAddr::from(([198, 19, 0, 10], 81))).is_none(), "not a service port");
        assert!(index.vip(&services, SocketAddr::from(([198, 18, 2, 11], 80))).is_none(), "not a VIP");
        assert_eq!(index.by_name(&services, "demo", "whoami").map(|s| s.vips.len()), Some(1));
        assert!(index.by_name(&services, "other", "whoami").is_none());
    }

    #[test]
    fn the_serving_service_is_found_by_endpoint_address_and_target_port() {
        let mut other = svc();
        other.name = "another".into();
        let services = [svc(), other];
        let index = Index::build(&services);
        let serving = |services, dst| index.serving(services, dst);
        let at = |last: u8, port: u16| SocketAddr::from(([198, 18, 2, last], port));
        assert_eq!(serving(&services, at(11, 9011)).map(|(s, _)| s.name.as_str()), Some("another"), "first by name");
        assert_eq!(serving(&services, at(11, 80)), None, "80 is the Service port, not the pod's");
        assert_eq!(serving(&services, at(99, 9011)), None, "not an endpoint");
        assert_eq!(services[0].hostname("cluster.local"), "whoami.demo.svc.cluster.local");
    }
}
