//! Program and map names. Userspace never writes these literals itself.
//!
//! The kernel keeps 15 characters of an object name, so every name here fits in 15.
//! A map's `_V<n>` suffix is bumped whenever its key or value layout changes.

/// `cgroup/connect4`: rewrites a Service VIP:port to a backend at `connect()` time.
pub const PROG_CONNECT4: &str = "mesh_connect4";

/// Service VIP:port/proto → [`crate::ServiceValue`].
pub const MAP_SERVICES: &str = "MESH_SVC_V1";
/// (service id, slot) → [`crate::BackendId`]: the selection table of each Service.
pub const MAP_SLOTS: &str = "MESH_SLOT_V1";
/// [`crate::BackendId`] → [`crate::Backend`].
pub const MAP_BACKENDS: &str = "MESH_BE_V1";
/// Per-CPU counters indexed by [`crate::DropReason`].
pub const MAP_DROPS: &str = "MESH_DROP_V1";

/// Every map the object defines, for pinning and inspection.
pub const ALL_MAPS: &[&str] = &[MAP_SERVICES, MAP_SLOTS, MAP_BACKENDS, MAP_DROPS];
/// Every program the object defines.
pub const ALL_PROGRAMS: &[&str] = &[PROG_CONNECT4];

/// Capacity of the service map (VIP:port/proto entries).
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the slot map: sum of all services' selection tables.
pub const MAX_SLOTS: u32 = 1_048_576;
/// Capacity of the backend map.
pub const MAX_BACKENDS: u32 = 262_144;

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= 15, "map name longer than the kernel keeps");
        i += 1;
    }
    let mut i = 0;
    while i < ALL_PROGRAMS.len() {
        assert!(ALL_PROGRAMS[i].len() <= 15, "program name longer than the kernel keeps");
        i += 1;
    }
};
