//! Kubernetes discovery: one reflector per kind (Nodes, Namespaces, Pods, Services,
//! EndpointSlices, the policy CRDs, the routing kinds, Telemetry and the root namespace's
//! ConfigMap `mesh-config`). Any change rebuilds the state from
//! the stores (after a short debounce), validates policies and routes, publishes, and — on the
//! leader only (`election`) — writes status. Every replica publishes (and so serves nodes); a
//! replica that becomes the leader rebuilds at once, so statuses that went stale while nobody
//! led are written.
//!
//! The routing kinds are optional: a cluster may not have Gateway API (or may not have applied
//! our newer CRDs yet). A kind the API server does not serve at start is still watched (the
//! watcher retries, and picks it up once its CRD is installed), but startup does not wait for it.
//! They are read as dynamic objects and typed by [`crd::read`], which keeps the fields our types
//! do not know, so validation can name them.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;

use super::{route_status, status};
use crate::{
    crd::{self, gateway, networking, telemetry},
    election::Leadership,
    metrics::Metrics,
    routing,
    snapshot::Publisher,
    validate,
    view::State,
};

pub struct Config {
    pub root_namespace: String,
    /// Status is written only while this says we lead.
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
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
    /// Read as JSON, so fields its type does not have are named in its status, not lost.
    request_authn: Optional,
    http_routes: Optional,
    grpc_routes: Optional,
    reference_grants: Optional,
    virtual_services: Optional,
    destination_rules: Optional,
    local_rate_limits: Optional,
    telemetry: Optional,
    /// The ConfigMap `mesh-config` of the root namespace (Istio's MeshConfig providers).
    mesh_config: Store<ConfigMap>,
}

/// A routing kind's store; startup waits for it only if the kind was served at start.
struct Optional {
    store: Store<DynamicObject>,
    wait: bool,
}

impl Optional {
    async fn ready(&self) {
        if self.wait {
            let _ = self.store.wait_until_ready().await;
        }
    }

    /// The objects, typed; one that does not fit its type (the CRD's schema should prevent it)
    /// is logged and left out.
    fn read<K: DeserializeOwned + serde::Serialize>(&self) -> Vec<crd::Read<K>> {
        self.store
            .state()
            .iter()
            .filter_map(|o| {
                let value = serde_json::to_value(&**o).ok()?;
                crd::read(&value).map_err(|e| tracing::warn!(object = ?o.metadata.name, namespace = ?o.metadata.namespace, "unreadable object: {e}")).ok()
            })
            .collect()
    }
}

/// (group, version, kind, plural) of the routing kinds.
const HTTP_ROUTES: (&str, &str, &str, &str) = (gateway::GROUP, "v1", "HTTPRoute", "httproutes");
const GRPC_ROUTES: (&str, &str, &str, &str) = (gateway::GROUP, "v1", "GRPCRoute", "grpcroutes");
const REFERENCE_GRANTS: (&str, &str, &str, &str) = (gateway::GROUP, "v1beta1", "ReferenceGrant", "referencegrants");
const VIRTUAL_SERVICES: (&str, &str, &str, &str) = (networking::GROUP, "v1alpha1", "VirtualService", "virtualservices");
const DESTINATION_RULES: (&str, &str, &str, &str) = (networking::GROUP, "v1alpha1", "DestinationRule", "destinationrules");
const LOCAL_RATE_LIMITS: (&str, &str, &str, &str) = (networking::GROUP, "v1alpha1", "LocalRateLimit", "localratelimits");
const REQUEST_AUTHENTICATIONS: (&str, &str, &str, &str) = (crd::GROUP, crd::VERSION, "RequestAuthentication", "requestauthentications");
const TELEMETRIES: (&str, &str, &str, &str) = (telemetry::GROUP, "v1alpha1", "Telemetry", "telemetries");

async fn reflect_optional(client: &Client, (group, version, kind, plural): (&str, &str, &str, &str)) -> (Optional, BoxStream<'static, ()>) {
    let served = match client.list_api_group_resources(&format!("{group}/{version}")).await {
        Ok(list) => list.resources.iter().any(|r| r.name == plural),
        Err(kube::Error::Api(e)) if e.code == 404 => false,
        Err(e) => {
            tracing::warn!(kind, "discovering {group}/{version} failed, assuming it is served: {e}");
            true
        }
    };
    if !served {
        let file = if group == gateway::GROUP { "deploy/11-gateway-api-crds.yaml (or upstream Gateway API)" } else { "deploy/10-crds.yaml" };
        tracing::warn!(kind, "{group}/{version} {plural} are not served (CRD not installed: {file}); watching until they are");
    }
    let ar = ApiResource::from_gvk_with_plural(&kube::api::GroupVersionKind::gvk(group, version, kind), plural);
    let (store, stream) = reflect_api(Api::<DynamicObject>::all_with(client.clone(), &ar), ar);
    (Optional { store, wait: served }, stream)
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
            self.request_authn.ready(),
            self.http_routes.ready(),
            self.grpc_routes.ready(),
            self.reference_grants.ready(),
            self.virtual_services.ready(),
            self.destination_rules.ready(),
            self.local_rate_limits.ready(),
            self.telemetry.ready(),
            self.mesh_config.wait_until_ready(),
        );
    }

    fn routing_objects(&self) -> routing::Objects {
        routing::Objects {
            http_routes: self.http_routes.read(),
            grpc_routes: self.grpc_routes.read(),
            reference_grants: self.reference_grants.read::<gateway::ReferenceGrant>().into_iter().map(|r| r.object).collect(),
            virtual_services: self.virtual_services.read(),
            destination_rules: self.destination_rules.read(),
            local_rate_limits: self.local_rate_limits.read(),
        }
    }

    fn state(&self, root_namespace: &str, objects: &routing::Objects) -> State {
        let inventory = super::translate::inventory(
            &owned(&self.nodes),
            &owned(&self.namespaces),
            &owned(&self.pods),
            &owned(&self.services),
            &self.slices.state().iter().filter_map(|o| as_slice(o)).collect::<Vec<_>>(),
        );
        let mut policies = validate::policies(&owned(&self.authz), &owned(&self.peer), &self.request_authn.read(), root_namespace);
        validate::telemetry::apply(&mut policies, &self.telemetry.read(), &self.mesh_config(), root_namespace);
        let routes = routing::build(objects, &inventory);
        State { inventory, policies, routes }
    }
}

impl Stores {
    /// The mesh config's providers; a ConfigMap that does not parse is logged and read as empty.
    fn mesh_config(&self) -> validate::telemetry::MeshConfigCheck {
        let text = self.mesh_config.state().first().and_then(|cm| cm.data.as_ref()?.get(telemetry::MESH_CONFIG_KEY).cloned()).unwrap_or_default();
        let config = crate::manifest::mesh_config(&text).unwrap_or_else(|e| {
            tracing::warn!("ConfigMap {}: {e}; no tracing providers", telemetry::MESH_CONFIG_MAP);
            telemetry::MeshConfig::default()
        });
        validate::telemetry::mesh_config(&config)
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
    let (http_routes, s8) = reflect_optional(&client, HTTP_ROUTES).await;
    let (grpc_routes, s9) = reflect_optional(&client, GRPC_ROUTES).await;
    let (reference_grants, s10) = reflect_optional(&client, REFERENCE_GRANTS).await;
    let (virtual_services, s11) = reflect_optional(&client, VIRTUAL_SERVICES).await;
    let (destination_rules, s12) = reflect_optional(&client, DESTINATION_RULES).await;
    let (local_rate_limits, s13) = reflect_optional(&client, LOCAL_RATE_LIMITS).await;
    let (request_authn, s14) = reflect_optional(&client, REQUEST_AUTHENTICATIONS).await;
    let (telemetry, s15) = reflect_optional(&client, TELEMETRIES).await;
    let (mesh_config, s16) = {
        let api = Api::<ConfigMap>::namespaced(client.clone(), &config.root_namespace);
        let writer = reflector::store::Writer::default();
        let reader = writer.as_reader();
        let selector = watcher::Config::default().fields(&format!("metadata.name={}", telemetry::MESH_CONFIG_MAP));
        let stream = watcher(api, selector).default_backoff().reflect(writer).map(|event| {
            if let Err(e) = event {
                tracing::warn!("watch error on ConfigMap {} (retrying): {e}", telemetry::MESH_CONFIG_MAP);
            }
        });
        (reader, stream.boxed())
    };
    let stores = Arc::new(Stores {
        nodes,
        namespaces,
        pods,
        services,
        slices,
        authz,
        peer,
        request_authn,
        http_routes,
        grpc_routes,
        reference_grants,
        virtual_services,
        destination_rules,
        local_rate_limits,
        telemetry,
        mesh_config,
    });
    let mut events = futures::stream::select_all([s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16]);
    // notify_one keeps a permit when nobody waits, so no change is lost while we publish.
    let changed = Arc::new(tokio::sync::Notify::new());
    let (on_gain, mut leadership) = (Arc::clone(&changed), config.leadership.clone());
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
    let gained = async move {
        let mut leading = leadership.is_leader();
        loop {
            leadership.changed().await;
            let now = leadership.is_leader();
            if now && !leading {
                on_gain.notify_one();
            }
            leading = now;
        }
    };
    tokio::join!(publish, drive, gained);
}

async fn publish_once(client: &Client, stores: &Stores, config: &Config, publisher: &Publisher) {
    let objects = stores.routing_objects();
    let state = stores.state(&config.root_namespace, &objects);
    let verdicts = state.policies.verdicts.clone();
    let route_verdicts = state.routes.verdicts.clone();
    if let Some(version) = publisher.publish(state, Vec::new()) {
        tracing::info!(version, "cluster state changed");
        routing::log_verdicts(&route_verdicts);
    }
    if config.leadership.is_leader() {
        let request_authn: Vec<crd::RequestAuthentication> = stores.request_authn.read().into_iter().map(|r| r.object).collect();
        let telemetry: Vec<telemetry::Telemetry> = stores.telemetry.read().into_iter().map(|r| r.object).collect();
        let policies = status::write_all(client, &config.leadership, &verdicts, &owned(&stores.authz), &owned(&stores.peer), &request_authn, &telemetry).await;
        let routes = route_status::write_all(client, &config.leadership, &route_verdicts, &objects).await;
        config.metrics.status_writes.inc_by(u64::try_from(policies + routes).unwrap_or(u64::MAX));
    }
}
