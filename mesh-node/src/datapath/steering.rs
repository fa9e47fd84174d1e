//! Where plaintext for local meshed pods goes: `mesh_sk_lookup` hands it to the socket at
//! `names::LISTENER_PLAINTEXT` of the `MESH_LSN_V1` sockmap, which the daemon sets to its
//! plaintext listener (15006) once that listener exists.
//!
//! The sockmap holds no reference that keeps a listener alive: when the last process holding it
//! closes it (the daemon exited and no successor or service manager holds it), the kernel drops
//! the entry, and plaintext SYNs for meshed pods go unanswered until a daemon sets it again
//! (clients retry them) — never let through to the pod unauthorized.

use std::os::fd::BorrowedFd;

use aya::{
    Ebpf,
    maps::{MapData, SockMap},
};
use mesh_common::names;

use super::Error;

/// Owns the listener sockmap (taken out of the loaded object).
pub struct Steering {
    map: SockMap<MapData>,
}

impl Steering {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let name = names::MAP_LISTENERS;
        let map = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
        let map = SockMap::try_from(map).map_err(|source| Error::Map { name, source })?;
        Ok(Self { map })
    }

    /// Steers plaintext for local meshed pods to `listener` (a listening TCP socket of this
    /// network namespace; the kernel refuses anything else). Replaces an earlier listener.
    pub fn serve(&mut self, listener: BorrowedFd<'_>) -> Result<(), Error> {
        let name = names::MAP_LISTENERS;
        self.map.set(names::LISTENER_PLAINTEXT, &listener, 0).map_err(|source| Error::Map { name, source })
    }
}
