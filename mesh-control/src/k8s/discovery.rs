//! Kubernetes discovery: one reflector per kind (Nodes, Namespaces, Pods, Services,
//! EndpointSlices, and both policy CRDs). Any change rebuilds the state from the stores (after a
//! short debounce), validates the policies, publishes, and writes policy status conditions.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;

use super::status;
use crate::{crd, snapshot::Publisher, validate, view::State};

pub struct Config {
    pub root_namespace: String,
}

/// Coalesces bursts of events (a rollout touches pods, slices and services at once).
const DEBOUNCE: Duration = Duration::from_millis(50);

fn reflect<K>(client: &Client) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    reflect_api(Api::<K>::all(client.clone()), ())
}

fn reflect_api<K>(api: Api<K>, dyntype: K::DynamicType) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    let kind = K::kind(&dyntype).into_owned();
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .map(move |event| {
            if let Err(e) = event {
                tracing::warn!(kind, "watch error (retrying): {e}");
            }
        });
    (reader, stream.boxed())
}

struct Stores {
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    /// discovery.k8s.io v1, or v1beta1 on Kubernetes < 1.21, read as v1 (same fields we use).
    slices: Store<DynamicObject>,
    authz: Store<crd::AuthorizationPolicy>,
    peer: Store<crd::PeerAuthentication>,
}

fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state().iter().map(|o| K::clone(o)).collect()
}

impl Stores {
    async fn ready(&self) {
        // A store whose writer is gone never becomes ready; the watch streams live as long as we do.
        let _ = futures::join!(
            self.nodes.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.authz.wait_until_ready(),
            self.peer.wait_until_ready(),
        );
    }

    fn state(&self, root_namespace: &str) -> State {
        let inventory = super::translate::inventory(
            &owned(&self.nodes),
            &owned(&self.namespaces),
            &owned(&self.pods),
            &owned(&self.services),
            &self.slices.state().iter().filter_map(|o| as_slice(o)).collect::<Vec<_>>(),
        );
        let policies = validate::policies(&owned(&self.authz), &owned(&self.peer), root_namespace);
        State { inventory, policies }
    }
}

/// EndpointSlice is GA (v1) since Kubernetes 1.21; older servers serve only v1beta1.
async fn endpoint_slice_api(client: &Client) -> ApiResource {
    // Only a 404 means "no v1": any other error (a blip) keeps v1, which every current server has.
    let version = match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Err(kube::Error::Api(e)) if e.code == 404 => "v1beta1",
        Err(e) => {
            tracing::warn!("discovering the EndpointSlice version failed, assuming v1: {e}");
            "v1"
        }
        Ok(_) => "v1",
    };
    tracing::info!(version, "reading EndpointSlices as discovery.k8s.io/{version}");
    let gvk = kube::api::GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice");
    ApiResource::from_gvk_with_plural(&gvk, "endpointslices")
}

/// A v1 or v1beta1 EndpointSlice as the v1 type (v1beta1's extra `topology` is dropped).
fn as_slice(o: &DynamicObject) -> Option<EndpointSlice> {
    let mut v = serde_json::to_value(o).ok()?;
    v["apiVersion"] = "discovery.k8s.io/v1".into();
    serde_json::from_value(v).map_err(|e| tracing::warn!(slice = ?o.metadata.name, "unreadable EndpointSlice: {e}")).ok()
}

/// Runs until the process stops; watch errors are retried with backoff inside the watchers.
pub async fn run(client: Client, config: Config, publisher: Publisher) {
    let (nodes, s1) = reflect::<Node>(&client);
    let (namespaces, s2) = reflect::<Namespace>(&client);
    let (pods, s3) = reflect::<Pod>(&client);
    let (services, s4) = reflect::<Service>(&client);
    let slice_api = endpoint_slice_api(&client).await;
    let (slices, s5) = reflect_api(Api::<DynamicObject>::all_with(client.clone(), &slice_api), slice_api);
    let (authz, s6) = reflect::<crd::AuthorizationPolicy>(&client);
    let (peer, s7) = reflect::<crd::PeerAuthentication>(&client);
    let stores = Arc::new(Stores { nodes, namespaces, pods, services, slices, authz, peer });
    let mut events = futures::stream::select_all([s1, s2, s3, s4, s5, s6, s7]);
    // notify_one keeps a permit when nobody waits, so no change is lost while we publish.
    let changed = Arc::new(tokio::sync::Notify::new());
    let publish = {
        let changed = Arc::clone(&changed);
        async move {
            stores.ready().await;
            tracing::info!("all watches synced");
            loop {
                publish_once(&client, &stores, &config, &publisher).await;
                changed.notified().await;
                tokio::time::sleep(DEBOUNCE).await;
            }
        }
    };
    let drive = async move {
        while events.next().await.is_some() {
            changed.notify_one();
        }
    };
    tokio::join!(publish, drive);
}

async fn publish_once(client: &Client, stores: &Stores, config: &Config, publisher: &Publisher) {
    let state = stores.state(&config.root_namespace);
    let verdicts = state.policies.verdicts.clone();
    if let Some(version) = publisher.publish(state, Vec::new()) {
        tracing::info!(version, "cluster state changed");
    }
    status::write_all(client, &verdicts, &owned(&stores.authz), &owned(&stores.peer)).await;
}
