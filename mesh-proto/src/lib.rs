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
