//! What every path into a local pod shares: authorization at the destination (HBONE, same-node,
//! plaintext; per connection on TCP ports, per request on HTTP ports) and the connection to the
//! pod itself.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

use super::{Error, Inputs, socket};
use crate::{
    authz::{self, Decision},
    state::State,
};

/// Evaluates `conn` against the state's policies, counts denials, logs dry-run matches. `Err`
/// carries the metric reason.
pub fn authorize(inputs: &Inputs, state: &State, conn: &authz::Conn<'_>) -> Result<(), &'static str> {
    let verdict = authz::evaluate(&state.policies, &state.root_namespace, conn);
    for s in verdict.shadow.iter().filter(|s| s.matched) {
        inputs.metrics.dry_run_denials.inc();
        tracing::info!(policy = %format!("{}/{}", s.namespace, s.name), action = ?s.action, src_ip = %conn.src_ip, dst = %conn.dst.ip, "non-enforced policy matched");
    }
    match verdict.decision {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => {
            let label = reason.as_label();
            inputs.metrics.deny(label);
            tracing::info!(
                ?reason,
                src.identity = ?conn.src_identity.map(ToString::to_string),
                src_ip = %conn.src_ip,
                dst = %conn.dst.ip,
                dst_port = conn.dst_port,
                method = conn.http.map(|h| h.method),
                path = conn.http.map(|h| h.path),
                "denied by policy"
            );
            Err(label)
        }
    }
}

/// Connects to a local pod, from the client's address when transparent mode is on and the client
/// is not a pod of this node: pods of one node share a subnet and answer each other directly,
/// so their replies would never be routed back to the daemon.
pub async fn connect_pod(inputs: &Inputs, state: &State, src_ip: IpAddr, dst: SocketAddr) -> Result<TcpStream, Error> {
    let src = pod_source(inputs, state, src_ip);
    tokio::time::timeout(inputs.cfg.connect_timeout, socket::connect(src, dst, inputs.cfg.socket_mark))
        .await
        .map_err(|_| Error::ConnectTimeout(dst))?
        .map_err(|source| Error::Connect { addr: dst, source })
}

/// The source address a connection to a local pod is made from for a client at `src_ip`: the
/// client's own in transparent mode (not for clients on this node, see [`connect_pod`]), else
/// the node's (`None`).
pub fn pod_source(inputs: &Inputs, state: &State, src_ip: IpAddr) -> Option<IpAddr> {
    let neighbour = state.workload(src_ip).is_some_and(|w| *w.node == *inputs.cfg.node_name);
    (inputs.cfg.transparent && !neighbour).then_some(src_ip)
}
