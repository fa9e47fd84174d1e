//! Every map of the object, in one place. BTF-defined (`#[btf_map]`) so that
//! `bpftool map dump name MESH_SVC_V1` prints field names. Names come from `mesh_common::names`;
//! the `name = "..."` literals below are checked against them by `cargo xtask build-ebpf`.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    macros::btf_map,
};
use mesh_common::{
    Backend, BackendId, DropReason, ServiceKey, ServiceValue, SlotKey,
    names::{MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS},
};

#[btf_map(name = "MESH_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map(name = "MESH_SLOT_V1")]
pub static SLOTS: HashMap<SlotKey, BackendId, { MAX_SLOTS as usize }> = HashMap::new();

#[btf_map(name = "MESH_BE_V1")]
pub static BACKENDS: HashMap<BackendId, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "MESH_DROP_V1")]
pub static DROPS: PerCpuArray<u64, { DropReason::COUNT as usize }> = PerCpuArray::new();

/// Count one drop for `reason`.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}
