//! `MESH_PORT_V1`: which pod interfaces are bridge ports, and their bridge's MAC, for
//! `mesh_tc_steer` (same-node plaintext to meshed pods goes up to the node, not across the
//! bridge). Keyed by interface index, which the kernel reuses: entries of interfaces that are
//! gone are removed (pruned pods, and at load those an earlier run left).

use aya::maps::{HashMap as BpfHashMap, MapData};
use mesh_common::{BridgePort, names::MAP_PORTS};

use super::{Datapath, Error};

fn map(dp: &mut Datapath) -> Result<BpfHashMap<&mut MapData, u32, BridgePort>, Error> {
    let map = dp.ebpf.map_mut(MAP_PORTS).ok_or(Error::MissingMap { name: MAP_PORTS })?;
    BpfHashMap::try_from(map).map_err(|source| Error::Map { name: MAP_PORTS, source })
}

impl Datapath {
    /// Records `ifname` (of this network namespace) as a port of the bridge whose MAC is `mac`.
    pub(super) fn set_bridge_port(&mut self, ifname: &str, mac: [u8; 6]) -> Result<(), Error> {
        let index = nix::net::if_::if_nametoindex(ifname).map_err(|e| Error::Syscall { what: "if_nametoindex of a pod interface", source: e.into() })?;
        map(self)?.insert(index, BridgePort { bridge_mac: mac, _pad: [0; 2] }, 0).map_err(|source| Error::Map { name: MAP_PORTS, source })?;
        self.bridge_ports.insert(ifname.to_owned(), index);
        Ok(())
    }

    pub(super) fn forget_bridge_port(&mut self, ifname: &str) {
        if let Some(index) = self.bridge_ports.remove(ifname)
            && let Ok(mut m) = map(self)
        {
            let _ = m.remove(&index);
        }
    }

    /// Removes entries whose interface no longer exists (left by an earlier run).
    pub(super) fn drop_stale_bridge_ports(&mut self) -> Result<(), Error> {
        // Interfaces of this process's network namespace (the daemon runs in the node's); if
        // they cannot be listed, nothing is removed.
        let Ok(interfaces) = nix::net::if_::if_nameindex() else { return Ok(()) };
        let existing: std::collections::BTreeSet<u32> = interfaces.iter().map(nix::net::if_::Interface::index).collect();
        let mut m = map(self)?;
        let stale: Vec<u32> = m.keys().flatten().filter(|i| !existing.contains(i)).collect();
        for index in stale {
            let _ = m.remove(&index);
        }
        Ok(())
    }
}
