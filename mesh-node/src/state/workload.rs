//! A workload (pod) as the proxies need it: where it runs and who it is.
//!
//! A node holds every meshed workload of the mesh (`mesh-control/src/view.rs`), so this struct
//! is the largest part of its memory at scale: the names pods share (namespace, service
//! account, node, locality) and the label sets of one ReplicaSet are one allocation for all of
//! them (the control plane's conversion shares them through an [`Interner`], the config file's
//! parser through [`super::service::intern`]); only the pod's own name is its own.

use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

/// How a workload's traffic is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Meshed: HBONE (mTLS) between nodes.
    Hbone,
    /// Not meshed: plain TCP (passthrough).
    Tcp,
}

/// A pod's labels, shared by the pods that have the same ones.
pub type Labels = Arc<BTreeMap<String, String>>;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: Arc<str>,
    #[serde(with = "super::service::shared_name")]
    pub namespace: Arc<str>,
    #[serde(with = "super::service::shared_name")]
    pub service_account: Arc<str>,
    /// Owner name used as Istio's `*_workload` metric label (Deployment name); defaults to `name`.
    #[serde(default, with = "super::service::shared_name::option")]
    pub workload_name: Option<Arc<str>>,
    pub ip: IpAddr,
    #[serde(with = "super::service::shared_name")]
    pub node: Arc<str>,
    /// Where this workload's node accepts HBONE.
    pub node_ip: IpAddr,
    #[serde(default)]
    pub labels: Labels,
    pub protocol: Protocol,
    /// `<region>/<zone>` of its node, when known (locality failover).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "super::service::shared_name::option")]
    pub locality: Option<Arc<str>>,
}

impl Workload {
    pub fn workload_name(&self) -> &str {
        self.workload_name.as_deref().unwrap_or(&self.name)
    }
}

/// One shared copy of each value seen (names, label sets): the workloads of one ReplicaSet then
/// hold one label set. [`Interner::prune`] forgets what no one else holds any more.
pub struct Interner<T: ?Sized>(HashSet<Arc<T>>);

impl<T: ?Sized + Hash + Eq> Default for Interner<T> {
    fn default() -> Self {
        Self(HashSet::new())
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// The shared copy of `value`, made by `make` the first time.
    pub fn get<Q>(&mut self, value: &Q, make: impl FnOnce(&Q) -> Arc<T>) -> Arc<T>
    where
        Arc<T>: std::borrow::Borrow<Q>,
        Q: ?Sized + Hash + Eq,
    {
        if let Some(shared) = self.0.get(value) {
            return shared.clone();
        }
        let shared = make(value);
        self.0.insert(shared.clone());
        shared
    }

    /// Forgets the values only this holds.
    pub fn prune(&mut self) {
        self.0.retain(|v| Arc::strong_count(v) > 1);
    }
}

/// Two workloads that claim one address.
pub type ClaimedTwice = (Arc<Workload>, Arc<Workload>);

/// The workloads of a state by address: one sorted list, looked up by binary search. A hash map
/// of 100,000 workloads allocated 131,072 slots of the whole struct (~22 MB); this is 8 bytes
/// a workload beside the workloads themselves.
#[derive(Debug, Default)]
pub struct Workloads(Vec<Arc<Workload>>);

impl Workloads {
    /// Indexes `all`; an address two workloads claim belongs to neither (returned, for the
    /// caller to say so).
    pub fn new(all: impl IntoIterator<Item = Arc<Workload>>) -> (Self, Vec<ClaimedTwice>) {
        let mut list: Vec<Arc<Workload>> = all.into_iter().collect();
        list.sort_by_key(|w| w.ip);
        let mut claimed_twice = Vec::new();
        let mut kept: Vec<Arc<Workload>> = Vec::with_capacity(list.len());
        for same_ip in list.chunk_by(|a, b| a.ip == b.ip) {
            match same_ip {
                [one] => kept.push(one.clone()),
                [a, b, ..] => claimed_twice.push((a.clone(), b.clone())),
                [] => {}
            }
        }
        kept.shrink_to_fit();
        (Self(kept), claimed_twice)
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&Workload> {
        self.0.binary_search_by_key(ip, |w| w.ip).ok().map(|i| &*self.0[i])
    }

    /// Every workload, by address.
    pub fn values(&self) -> impl Iterator<Item = &Workload> {
        self.0.iter().map(|w| &**w)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
