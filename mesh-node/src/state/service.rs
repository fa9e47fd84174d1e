//! A Service as the node needs it: VIPs and ports to balance, endpoints with where they run and
//! who they are (so the node can tunnel to them and verify them without knowing remote pods).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
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
    /// Node the endpoint runs on ("" if unknown). Shared ([`intern`], as its parsers do):
    /// thousands of endpoints name one node.
    #[serde(default, with = "shared_name")]
    pub node: Arc<str>,
    /// Where that node accepts HBONE, when known.
    #[serde(default)]
    pub node_address: Option<IpAddr>,
    /// In the mesh: reach it over HBONE and expect `identity`.
    #[serde(default)]
    pub meshed: bool,
    /// SPIFFE identity (`spiffe://...`), when meshed. Shared like `node`: the endpoints of a
    /// workload all run as one identity.
    #[serde(default, with = "shared_name::option")]
    pub identity: Option<Arc<str>>,
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
    #[serde(default, deserialize_with = "exact_endpoints")]
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

/// Serde for shared names as plain strings. Parsing interns ([`intern`]), which serde's `rc`
/// feature does not: no string is allocated per endpoint or workload.
pub(crate) mod shared_name {
    use std::{fmt, sync::Arc};

    use serde::{Deserializer, Serializer, de::Visitor};

    pub fn serialize<S: Serializer>(name: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name)
    }

    struct Name;
    impl Visitor<'_> for Name {
        type Value = Arc<str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Arc<str>, E> {
            Ok(super::intern(v))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        d.deserialize_str(Name)
    }

    pub mod option {
        use std::{fmt, sync::Arc};

        use serde::{Deserializer, Serializer, de::Visitor};

        #[allow(clippy::ref_option, reason = "the signature serde's `with` calls")]
        pub fn serialize<S: Serializer>(name: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
            match name {
                Some(n) => s.serialize_some(&**n),
                None => s.serialize_none(),
            }
        }

        struct MaybeName;
        impl<'de> Visitor<'de> for MaybeName {
            type Value = Option<Arc<str>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::deserialize(d).map(Some)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
            d.deserialize_option(MaybeName)
        }
    }
}

/// The shared copy of a name endpoints repeat (a node, an identity), for the config file's
/// parser (the control plane's conversion shares through its own, pruned `Interner`): one
/// string per name, not one per endpoint. A string per endpoint, freed again once shared, left holes between the endpoint lists that glibc could not return (~8 MB of RSS
/// at 100,000 endpoints). The cache forgets everything at 4,096 names, so names of nodes and
/// identities that went away do not stay.
pub fn intern(name: &str) -> Arc<str> {
    thread_local! {
        static SEEN: std::cell::RefCell<HashSet<Arc<str>>> = std::cell::RefCell::new(HashSet::new());
    }
    SEEN.with_borrow_mut(|seen| {
        if let Some(shared) = seen.get(name) {
            return shared.clone();
        }
        if seen.len() >= 4096 {
            seen.clear();
        }
        let shared: Arc<str> = Arc::from(name);
        seen.insert(shared.clone());
        shared
    })
}

/// A Service's endpoints parsed into one reused buffer, then moved into an allocation of exactly
/// their number. A list grown by pushes (4, 8, then 16 slots for 10 endpoints) keeps the unused
/// slots, and the smaller buffers it outgrew stay as holes between live blocks that glibc cannot
/// hand back: at 100,000 endpoints that was ~20 MB of the daemon's RSS.
#[allow(clippy::drain_collect, reason = "collecting a drain allocates exactly the length; taking the buffer would keep its slack")]
fn exact_endpoints<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Endpoint>, D::Error> {
    struct Into<'a>(&'a mut Vec<Endpoint>);
    impl<'de> serde::de::Visitor<'de> for Into<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of endpoints")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(e) = seq.next_element()? {
                self.0.push(e);
            }
            Ok(())
        }
    }
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<Endpoint>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let parsed = d.deserialize_seq(Into(scratch)).map(|()| scratch.drain(..).collect());
        if scratch.capacity() > 4096 {
            *scratch = Vec::new(); // one huge Service does not pin its buffer for good
        }
        parsed
    })
}

/// The per-connection lookups, built once per state so a connection costs a hash lookup or a
/// binary search, not a scan of every Service and endpoint. Positions index the `services` it
/// was built from.
#[derive(Debug, Default)]
pub struct Index {
    /// VIP:port (TCP) → (Service, port); the first Service and port in order win.
    vips: HashMap<SocketAddr, (usize, usize)>,
    /// Endpoint address and port on the pod → the (Service, port) pairs serving it: one flat
    /// list sorted by address, port, then Service namespace and name, one entry per Service.
    /// Flat because there is one entry per endpoint: at 100,000 endpoints a map of vectors
    /// held ~120 bytes each, this holds 28.
    serving: Vec<Serving>,
    /// namespace → name → Service (nested so a lookup borrows, never allocates).
    by_name: HashMap<String, HashMap<String, usize>>,
}

#[derive(Debug)]
struct Serving {
    at: (IpAddr, u16),
    service: u32,
    port: u32,
}

impl Serving {
    fn of<'a>(&self, services: &'a [Arc<Service>]) -> (&'a Service, &'a ServicePort) {
        let s = &*services[self.service as usize];
        (s, &s.ports[self.port as usize])
    }
}

impl Index {
    /// # Panics
    /// With 2^32 Services, or a Service with 2^32 ports, or more.
    pub fn build(services: &[Arc<Service>]) -> Self {
        let mut index = Self::default();
        let position = |i: usize| u32::try_from(i).expect("fewer than 2^32 Services and ports");
        for (i, s) in services.iter().enumerate() {
            index.by_name.entry(s.namespace.clone()).or_default().entry(s.name.clone()).or_insert(i);
            for (j, p) in s.ports.iter().enumerate().filter(|(_, p)| p.protocol == ServiceProtocol::Tcp) {
                for vip in &s.vips {
                    index.vips.entry(SocketAddr::new(*vip, p.port)).or_insert((i, j));
                }
            }
            for e in &s.endpoints {
                for (j, p) in s.ports.iter().enumerate() {
                    let at = (e.address, s.endpoint_port(p, e));
                    index.serving.push(Serving { at, service: position(i), port: position(j) });
                }
            }
        }
        let name = |e: &Serving| {
            let (s, _) = e.of(services);
            (s.namespace.as_str(), s.name.as_str())
        };
        // Stable: a Service's ports stay in their order, so the first port of each is kept.
        index.serving.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| name(a).cmp(&name(b))).then(a.service.cmp(&b.service)));
        index.serving.dedup_by(|b, a| a.at == b.at && a.service == b.service);
        index.serving.shrink_to_fit();
        index
    }

    /// The entries for `dst`, first by Service namespace and name.
    fn serving_at(&self, dst: SocketAddr) -> &[Serving] {
        let at = (dst.ip(), dst.port());
        let start = self.serving.partition_point(|e| e.at < at);
        let len = self.serving[start..].partition_point(|e| e.at == at);
        &self.serving[start..start + len]
    }

    /// The Service and port a VIP:port (TCP) belongs to.
    pub fn vip<'a>(&self, services: &'a [Arc<Service>], dst: SocketAddr) -> Option<(&'a Service, &'a ServicePort)> {
        let &(i, j) = self.vips.get(&dst)?;
        Some((&*services[i], &services[i].ports[j]))
    }

    pub fn by_name<'a>(&self, services: &'a [Arc<Service>], namespace: &str, name: &str) -> Option<&'a Service> {
        self.by_name.get(namespace).and_then(|n| n.get(name)).map(|&i| &*services[i])
    }

    /// The Service a connection to a pod's `dst` (ip:port) is reaching: one with an endpoint at
    /// that address whose target port is `dst`'s port; when several qualify, the first by
    /// namespace and name, so every daemon reports the same one.
    pub fn serving<'a>(&self, services: &'a [Arc<Service>], dst: SocketAddr) -> Option<(&'a Service, &'a ServicePort)> {
        self.serving_at(dst).first().map(|e| e.of(services))
    }

    /// Every Service serving `dst`, by namespace and name (see [`Index::serving`]).
    pub fn serving_all<'a>(&'a self, services: &'a [Arc<Service>], dst: SocketAddr) -> impl Iterator<Item = (&'a Service, &'a ServicePort)> {
        self.serving_at(dst).iter().map(|e| e.of(services))
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
    fn parsed_endpoints_fill_their_list_exactly_and_share_their_names() {
        let endpoint = |i: u8| format!(r#"{{"address":"10.0.0.{i}","healthy":true,"node":"n2","identity":"spiffe://td/ns/a/sa/b"}}"#);
        let list: Vec<String> = (1..=10).map(endpoint).collect();
        let json = format!(r#"{{"name":"s","namespace":"a","vips":[],"ports":[],"endpoints":[{}]}}"#, list.join(","));
        let parsed: Service = serde_json::from_str(&json).expect("parse");
        assert_eq!((parsed.endpoints.len(), parsed.endpoints.capacity()), (10, 10));
        let (first, last) = (&parsed.endpoints[0], &parsed.endpoints[9]);
        assert!(Arc::ptr_eq(&first.node, &last.node) && Arc::ptr_eq(first.identity.as_ref().expect("set"), last.identity.as_ref().expect("set")));
        let none: Endpoint = serde_json::from_str(r#"{"address":"10.0.0.1","healthy":true,"identity":null}"#).expect("parse");
        assert_eq!((none.identity, &*none.node), (None, ""));
        // Written back as the plain strings they were.
        let back = serde_json::to_value(first).expect("serialize");
        assert_eq!((back["node"].as_str(), back["identity"].as_str()), (Some("n2"), Some("spiffe://td/ns/a/sa/b")));
    }

    #[test]
    fn endpoints_share_one_copy_of_each_name() {
        let (mut a, mut b) = (svc(), svc());
        for e in a.endpoints.iter_mut().chain(&mut b.endpoints) {
            e.node = intern(&e.node);
            e.identity = Some(intern(&String::from("spiffe://cluster.local/ns/demo/sa/whoami")));
        }
        let (first, last) = (&a.endpoints[0], &b.endpoints[2]);
        assert!(Arc::ptr_eq(&first.node, &last.node), "one node name");
        assert!(Arc::ptr_eq(first.identity.as_ref().expect("set"), last.identity.as_ref().expect("set")), "one identity");
    }

    #[test]
    fn vips_and_names_find_their_service_port() {
        let services = [Arc::new(svc())];
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
        let services = [Arc::new(svc()), Arc::new(other)];
        let index = Index::build(&services);
        let serving = |services, dst| index.serving(services, dst);
        let at = |last: u8, port: u16| SocketAddr::from(([198, 18, 2, last], port));
        assert_eq!(serving(&services, at(11, 9011)).map(|(s, _)| s.name.as_str()), Some("another"), "first by name");
        assert_eq!(serving(&services, at(11, 80)), None, "80 is the Service port, not the pod's");
        assert_eq!(serving(&services, at(99, 9011)), None, "not an endpoint");
        let all: Vec<&str> = index.serving_all(&services, at(11, 9011)).map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(all, ["another", "whoami"], "every Service, by name, once each");
        assert_eq!(index.serving_all(&services, at(12, 9012)).count(), 2, "the neighbour address");
        assert_eq!(services[0].hostname("cluster.local"), "whoami.demo.svc.cluster.local");
    }
}
