//! A workload (pod) as the proxies need it: where it runs and who it is.

use std::{collections::BTreeMap, net::IpAddr};

/// How a workload's traffic is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Meshed: HBONE (mTLS) between nodes.
    Hbone,
    /// Not meshed: plain TCP (passthrough).
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Owner name used as Istio's `*_workload` metric label (Deployment name); defaults to `name`.
    #[serde(default)]
    pub workload_name: Option<String>,
    pub ip: IpAddr,
    pub node: String,
    /// Where this workload's node accepts HBONE.
    pub node_ip: IpAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub protocol: Protocol,
    /// `<region>/<zone>` of its node, when known (locality failover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

impl Workload {
    pub fn workload_name(&self) -> &str {
        self.workload_name.as_deref().unwrap_or(&self.name)
    }
}
