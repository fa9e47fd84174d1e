//! The node daemon's HTTP layer, with no kernel dependency: which ports are HTTP
//! ([`protocol`]), the route model with its matching and filters ([`route`]), the request
//! layers ([`layer`], [`record`]), distributed tracing ([`trace`]), upstream connection pools
//! ([`client`]) and the hygiene of forwarding ([`forward`]), and serving a connection
//! ([`server`]).
//!
//! `mesh-node` owns sockets, identities, HBONE and endpoint picking; this crate owns what happens
//! to a request.

pub mod body;
mod bucket;
pub mod circuit;
pub mod client;
pub mod flags;
pub mod forward;
pub mod jwt;
pub mod layer;
pub mod metrics;
pub mod outlier;
pub mod per_source;
pub mod policy;
pub mod protocol;
pub mod record;
pub mod route;
pub mod server;
pub mod trace;

pub use protocol::AppProtocol;
