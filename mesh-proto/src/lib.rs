//! Generated gRPC types and stubs of the mesh API (see `proto/`). No logic lives here: each side
//! converts these types into its own domain types at its module boundary.

/// Config distribution: `ConfigDistribution.StreamConfig` (see `config.proto`).
pub mod config {
    #[allow(warnings, clippy::all, clippy::pedantic, reason = "generated code")]
    pub mod v1 {
        tonic::include_proto!("mesh.config.v1");
    }
}

/// Workload CA: `Certificates.CreateCertificate` (see `ca.proto`).
pub mod ca {
    #[allow(warnings, clippy::all, clippy::pedantic, reason = "generated code")]
    pub mod v1 {
        tonic::include_proto!("mesh.ca.v1");
    }
}

/// gRPC metadata key carrying the calling node's name.
pub const NODE_NAME_HEADER: &str = "mesh-node-name";

/// Puts a node's bootstrap credential on a request (`CreateNodeCertificate`):
/// `authorization: Bearer <credential>` and its name under [`NODE_NAME_HEADER`]. The one
/// definition the node daemon and the controller's own client both use.
///
/// # Errors
/// When the name or the credential is not a valid header value.
pub fn authenticate_node<T>(
    req: &mut tonic::Request<T>,
    node: &str,
    credential: &str,
) -> Result<(), tonic::metadata::errors::InvalidMetadataValue> {
    let bearer = format!("Bearer {}", credential.trim()).parse()?;
    let name = node.parse()?;
    req.metadata_mut().insert("authorization", bearer);
    req.metadata_mut().insert(NODE_NAME_HEADER, name);
    Ok(())
}

/// The key of the one `MeshConfig` resource.
pub const MESH_CONFIG_KEY: &str = "mesh";

/// The key of a config resource, as `mesh/config/v1/config.proto` defines it: workloads by uid,
/// the mesh config by [`MESH_CONFIG_KEY`], everything else by "<namespace>/<name>". The one definition both ends of the stream use, so
/// the controller's diffs and the node's view can never disagree.
pub fn resource_key(kind: &config::v1::resource::Kind) -> config::v1::ResourceKey {
    use config::v1::{ResourceKind, resource::Kind as K};
    let (kind, key) = match kind {
        K::Workload(w) => (ResourceKind::Workload, w.uid.clone()),
        K::Service(s) => (ResourceKind::Service, format!("{}/{}", s.namespace, s.name)),
        K::AuthorizationPolicy(p) => (ResourceKind::AuthorizationPolicy, format!("{}/{}", p.namespace, p.name)),
        K::PeerAuthentication(p) => (ResourceKind::PeerAuthentication, format!("{}/{}", p.namespace, p.name)),
        K::RouteTable(t) => (ResourceKind::RouteTable, format!("{}/{}", t.namespace, t.name)),
        K::RequestAuthentication(p) => (ResourceKind::RequestAuthentication, format!("{}/{}", p.namespace, p.name)),
        K::Telemetry(t) => (ResourceKind::Telemetry, format!("{}/{}", t.namespace, t.name)),
        K::MeshConfig(_) => (ResourceKind::MeshConfig, MESH_CONFIG_KEY.to_owned()),
    };
    config::v1::ResourceKey { kind: kind.into(), key }
}
