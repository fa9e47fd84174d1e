//! A Service as the node needs it: VIPs and ports to balance, endpoints with where they run and
//! who they are (so the node can tunnel to them and verify them without knowing remote pods).

use std::{collections::BTreeMap, net::IpAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServiceProtocol {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    pub protocol: ServiceProtocol,
    /// Port on the endpoints unless an endpoint maps it otherwise.
    pub target_port: u16,
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
    /// The port on `endpoint` that serves `port` of this Service.
    pub fn endpoint_port(&self, port: &ServicePort, endpoint: &Endpoint) -> u16 {
        endpoint.ports.get(&port.port).copied().unwrap_or(port.target_port)
    }
}
