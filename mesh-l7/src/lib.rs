//! The node daemon's HTTP layer, with no kernel dependency: which ports are HTTP
//! ([`protocol`]), the route model and its matching and filters ([`route`]).
//!
//! `mesh-node` owns sockets, identities and HBONE; this crate owns what happens to a request.

pub mod protocol;
pub mod route;

pub use protocol::AppProtocol;
