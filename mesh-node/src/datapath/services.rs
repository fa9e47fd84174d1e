//! Services → kernel map entries.
//!
//! Each Service gets a stable id and a selection table (slots) built here from its healthy
//! backends and their weights. An update writes new backends and slots first and flips the
//! service entry last, so a concurrent `connect()` sees either the old or the new table, never a
//! slot that points nowhere; stale slots and unreferenced backends are removed afterwards.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use mesh_common::{
    Addr, Backend, BackendId, ServiceFlags, ServiceKey, ServiceValue, SlotKey,
    names::{MAP_BACKENDS, MAP_SERVICES, MAP_SLOTS, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS},
    service::{PROTO_TCP, PROTO_UDP},
};

use super::{Datapath, Error};

/// Largest weighted-random selection table per Service.
pub const MAX_WEIGHTED_SLOTS: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    /// Relative share of new connections; 0 takes none.
    pub weight: u32,
    pub healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<BackendSpec>,
}

impl ServiceSpec {
    fn key(&self) -> ServiceKey {
        ServiceKey::new(addr_of(self.vip), self.port, self.protocol.number())
    }

    fn describe(&self) -> String {
        format!("{}:{}/{:?}", self.vip, self.port, self.protocol)
    }
}

fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr::from_v6(v6.octets()),
    }
}

/// Builds the weighted selection table: each healthy backend with weight w > 0 fills slots in
/// proportion to w (weights reduced by their gcd, scaled down to [`MAX_WEIGHTED_SLOTS`] keeping
/// at least one slot each). Returns indices into `backends`.
pub fn weighted_table(backends: &[BackendSpec]) -> Vec<usize> {
    let live: Vec<(usize, u64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.healthy && b.weight > 0)
        .map(|(i, b)| (i, u64::from(b.weight)))
        .collect();
    let divisor = live.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let total: u64 = live.iter().map(|&(_, w)| w / divisor).sum();
    let cap = u64::from(MAX_WEIGHTED_SLOTS);
    let mut table = Vec::new();
    for &(i, w) in &live {
        let share = w / divisor;
        let slots = if total > cap { (share * cap / total).max(1) } else { share };
        table.extend(std::iter::repeat_n(i, usize::try_from(slots).unwrap_or(usize::MAX)));
    }
    table
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// What this process has written, so updates touch only what changed.
#[derive(Default)]
pub(super) struct ServiceTable {
    services: BTreeMap<ServiceKey, Installed>,
    backends: HashMap<Backend, (BackendId, usize)>,
    next_service_id: u32,
    next_backend_id: u32,
    free_backend_ids: Vec<u32>,
}

struct Installed {
    value: ServiceValue,
    slots: Vec<BackendId>,
}

struct Maps<'a> {
    services: BpfHashMap<&'a mut MapData, ServiceKey, ServiceValue>,
    slots: BpfHashMap<&'a mut MapData, SlotKey, BackendId>,
    backends: BpfHashMap<&'a mut MapData, BackendId, Backend>,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

impl Datapath {
    fn maps(&mut self) -> Result<(Maps<'_>, &mut ServiceTable), Error> {
        let (ebpf, table) = self.parts();
        // Take the three maps out of the object at once: aya hands out one &mut per name.
        let mut services = None;
        let mut slots = None;
        let mut backends = None;
        for (name, map) in ebpf.maps_mut() {
            match name {
                MAP_SERVICES => services = Some(map),
                MAP_SLOTS => slots = Some(map),
                MAP_BACKENDS => backends = Some(map),
                _ => {}
            }
        }
        let services = services.ok_or(Error::MissingMap { name: MAP_SERVICES })?;
        let slots = slots.ok_or(Error::MissingMap { name: MAP_SLOTS })?;
        let backends = backends.ok_or(Error::MissingMap { name: MAP_BACKENDS })?;
        Ok((
            Maps {
                services: BpfHashMap::try_from(services).map_err(map_err(MAP_SERVICES))?,
                slots: BpfHashMap::try_from(slots).map_err(map_err(MAP_SLOTS))?,
                backends: BpfHashMap::try_from(backends).map_err(map_err(MAP_BACKENDS))?,
            },
            table,
        ))
    }

    /// Installs or updates one Service. Only healthy backends with weight > 0 are selectable; a
    /// Service with none makes `connect()` to its VIP fail fast instead of leaking to the network.
    pub fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), Error> {
        if spec.vip.is_ipv6() || spec.backends.iter().any(|b| b.addr.is_ipv6()) {
            return Err(Error::InvalidService {
                service: spec.describe(),
                reason: "IPv6 services are not supported by this datapath yet".into(),
            });
        }
        if let Some(b) = spec.backends.iter().find(|b| b.port == 0) {
            return Err(Error::InvalidService {
                service: spec.describe(),
                reason: format!("backend {} has port 0", b.addr),
            });
        }
        let key = spec.key();
        let table = weighted_table(&spec.backends);
        let (mut maps, state) = self.maps()?;
        let id = match state.services.get(&key) {
            Some(installed) => installed.value.id,
            None => {
                if state.services.len() >= MAX_SERVICES as usize {
                    return Err(Error::MapFull {
                        name: MAP_SERVICES,
                        capacity: MAX_SERVICES,
                        service: spec.describe(),
                    });
                }
                state.next_service_id += 1;
                state.next_service_id
            }
        };
        // 1. Backends (reference-counted across services).
        let mut ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let backend = Backend::new(addr_of(b.addr), b.port);
            ids.push(state.acquire_backend(&mut maps, backend, &spec.describe())?);
        }
        // 2. Slots of the new table.
        let slots: Vec<BackendId> = table.iter().map(|&i| ids[i]).collect();
        for (slot, backend_id) in slots.iter().enumerate() {
            let slot = u32::try_from(slot).expect("table is bounded by MAX_WEIGHTED_SLOTS");
            maps.slots
                .insert(SlotKey { service_id: id, slot }, backend_id, 0)
                .map_err(|e| full_or(e, MAP_SLOTS, MAX_SLOTS, spec))?;
        }
        // 3. Flip the service entry.
        let value = ServiceValue {
            id,
            slot_count: u32::try_from(slots.len()).expect("bounded"),
            flags: ServiceFlags::default(),
            affinity_timeout_s: 0,
        };
        maps.services.insert(key, value, 0).map_err(|e| full_or(e, MAP_SERVICES, MAX_SERVICES, spec))?;
        // 4. Remove what the old table had beyond the new one, and release old backends.
        let old = state.services.insert(key, Installed { value, slots: slots.clone() });
        if let Some(old) = old {
            for slot in slots.len()..old.slots.len() {
                let slot = u32::try_from(slot).expect("bounded");
                let _ = maps.slots.remove(&SlotKey { service_id: id, slot });
            }
            for backend_id in dedup(&old.slots) {
                state.release_backend(&mut maps, backend_id);
            }
        }
        // The new table holds its own references (acquired once per spec backend above);
        // drop the references of spec backends that received no slot (unhealthy/weight 0).
        let used = dedup(&slots);
        for backend_id in &ids {
            if !used.contains(backend_id) {
                state.release_backend(&mut maps, *backend_id);
            }
        }
        Ok(())
    }

    /// Removes a Service: connects to its VIP are no longer rewritten.
    pub fn remove_service(&mut self, vip: IpAddr, port: u16, protocol: Protocol) -> Result<(), Error> {
        let key = ServiceKey::new(addr_of(vip), port, protocol.number());
        let (mut maps, state) = self.maps()?;
        let Some(old) = state.services.remove(&key) else { return Ok(()) };
        maps.services.remove(&key).map_err(map_err(MAP_SERVICES))?;
        for slot in 0..old.slots.len() {
            let slot = u32::try_from(slot).expect("bounded");
            let _ = maps.slots.remove(&SlotKey { service_id: old.value.id, slot });
        }
        for backend_id in dedup(&old.slots) {
            state.release_backend(&mut maps, backend_id);
        }
        Ok(())
    }
}

fn dedup(ids: &[BackendId]) -> Vec<BackendId> {
    let mut v: Vec<BackendId> = Vec::new();
    for id in ids {
        if !v.contains(id) {
            v.push(*id);
        }
    }
    v
}

fn full_or(e: MapError, name: &'static str, capacity: u32, spec: &ServiceSpec) -> Error {
    if is_full(&e) {
        Error::MapFull { name, capacity, service: spec.describe() }
    } else {
        Error::Map { name, source: e }
    }
}

impl ServiceTable {
    fn acquire_backend(&mut self, maps: &mut Maps<'_>, backend: Backend, service: &str) -> Result<BackendId, Error> {
        if let Some((id, refs)) = self.backends.get_mut(&backend) {
            *refs += 1;
            return Ok(*id);
        }
        let id = BackendId {
            id: self.free_backend_ids.pop().unwrap_or_else(|| {
                self.next_backend_id += 1;
                self.next_backend_id
            }),
        };
        maps.backends.insert(id, backend, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull { name: MAP_BACKENDS, capacity: MAX_BACKENDS, service: service.to_owned() }
            } else {
                Error::Map { name: MAP_BACKENDS, source: e }
            }
        })?;
        self.backends.insert(backend, (id, 1));
        Ok(id)
    }

    fn release_backend(&mut self, maps: &mut Maps<'_>, id: BackendId) {
        let Some(backend) = self.backends.iter().find(|(_, (bid, _))| *bid == id).map(|(b, _)| *b) else {
            return;
        };
        let entry = self.backends.get_mut(&backend).expect("found above");
        entry.1 -= 1;
        if entry.1 == 0 {
            self.backends.remove(&backend);
            let _ = maps.backends.remove(&id);
            self.free_backend_ids.push(id.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, weight: u32, healthy: bool) -> BackendSpec {
        BackendSpec { addr: IpAddr::from([198, 18, 2, last]), port: 8080, weight, healthy }
    }

    #[test]
    fn equal_weights_give_one_slot_each() {
        let t = weighted_table(&[backend(1, 5, true), backend(2, 5, true), backend(3, 5, true)]);
        assert_eq!(t, vec![0, 1, 2]);
    }

    #[test]
    fn weights_are_proportional_after_gcd() {
        let t = weighted_table(&[backend(1, 10, true), backend(2, 30, true)]);
        assert_eq!(t, vec![0, 1, 1, 1]);
    }

    #[test]
    fn unhealthy_and_zero_weight_backends_get_no_slot() {
        let t = weighted_table(&[backend(1, 1, false), backend(2, 0, true), backend(3, 2, true)]);
        assert_eq!(t, vec![2]); // gcd reduces 2 to 1
        assert!(weighted_table(&[backend(1, 1, false)]).is_empty());
    }

    #[test]
    fn huge_weights_are_capped_but_keep_every_backend() {
        let t = weighted_table(&[backend(1, 1_000_000, true), backend(2, 1, true), backend(3, 999_999, true)]);
        assert!(t.len() <= MAX_WEIGHTED_SLOTS as usize + 3);
        for i in 0..3 {
            assert!(t.contains(&i), "backend {i} lost its slot");
        }
    }
}
