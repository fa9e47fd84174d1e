//! Telemetry of the node's HTTP traffic: which Telemetry applies to a workload ([`policy`]).
pub mod policy;
