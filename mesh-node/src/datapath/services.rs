//! Services → kernel map entries, by diff.
//!
//! Each Service gets a stable id and a selection table (see `tables`). An update writes new
//! backends and changed slots first and flips the service entry last, so a concurrent
//! `connect()` sees either the old or the new table, never a slot that points nowhere; stale
//! slots and unreferenced backends are removed afterwards. Unchanged entries are not rewritten.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use mesh_common::{
    Addr, Backend, BackendId, ServiceFlags, ServiceKey, ServiceValue, SlotKey,
    names::{MAP_BACKENDS, MAP_SERVICES, MAP_SLOTS, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS},
    service::{PROTO_TCP, PROTO_UDP},
};

use super::{Datapath, Error, tables};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(super) const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

/// How a Service picks a backend for a new connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    /// Weighted random per connection.
    #[default]
    Random,
    /// Maglev consistent hashing on the client (network namespace + bound source port).
    Maglev,
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
    pub lb: LoadBalancing,
    /// Session affinity by client (Kubernetes `sessionAffinity: ClientIP`) with this timeout.
    pub affinity: Option<Duration>,
}

impl ServiceSpec {
    /// A TCP Service with weighted-random balancing and no affinity.
    pub fn tcp(vip: IpAddr, port: u16, backends: Vec<BackendSpec>) -> Self {
        Self { vip, port, protocol: Protocol::Tcp, backends, lb: LoadBalancing::Random, affinity: None }
    }

    fn key(&self) -> ServiceKey {
        ServiceKey::new(addr_of(self.vip), self.port, self.protocol.number())
    }

    pub fn describe(&self) -> String {
        format!("service {}:{}/{:?}", self.vip, self.port, self.protocol)
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidService { service: self.describe(), reason };
        if self.port == 0 {
            return Err(invalid("port 0".into()));
        }
        for b in &self.backends {
            if b.port == 0 {
                return Err(invalid(format!("backend {} has port 0", b.addr)));
            }
            if b.addr.is_ipv4() != self.vip.is_ipv4() {
                return Err(invalid(format!("backend {} is not of the VIP's address family", b.addr)));
            }
        }
        if let Some(t) = self.affinity
            && (t.as_secs() == 0 || t.as_secs() > u64::from(u32::MAX))
        {
            return Err(invalid(format!("affinity timeout {t:?} out of range (1 s ..= 2^32 s)")));
        }
        Ok(())
    }

    fn table(&self) -> Vec<usize> {
        match self.lb {
            LoadBalancing::Random => tables::weighted(&self.backends),
            LoadBalancing::Maglev => tables::maglev(&self.backends, tables::MAGLEV_TABLE_SIZE),
        }
    }

    fn flags(&self) -> ServiceFlags {
        let mut bits = 0;
        if self.lb == LoadBalancing::Maglev {
            bits |= ServiceFlags::MAGLEV;
        }
        if self.affinity.is_some() {
            bits |= ServiceFlags::AFFINITY;
        }
        ServiceFlags { bits }
    }
}

pub(super) fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        // Normalise IPv4-mapped IPv6 to the same key as plain IPv4: one Service, one entry.
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Addr::from_v6(v6.octets()),
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr::from_v6(v6.octets()),
    }
}

/// What this process knows the maps hold, so updates touch only what changed.
#[derive(Default)]
pub(super) struct ServiceTable {
    services: BTreeMap<ServiceKey, Installed>,
    /// Backend → (id, number of slots-tables referencing it). A `u32` count: there are at most
    /// `MAX_SLOTS` slots, and the entry is 28 bytes instead of 40 (100,000 backends at scale).
    backends: HashMap<Backend, (BackendId, u32)>,
    /// The reverse index of `backends`, so a release finds its backend without a scan.
    by_id: HashMap<BackendId, Backend>,
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

pub(super) fn full_or(e: MapError, name: &'static str, capacity: u32, item: &str) -> Error {
    let full = matches!(&e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
    if full { Error::MapFull { name, capacity, item: item.to_owned() } } else { Error::Map { name, source: e } }
}

impl Datapath {
    fn service_maps(&mut self) -> Result<(Maps<'_>, &mut ServiceTable), Error> {
        let (mut services, mut slots, mut backends) = (None, None, None);
        // Take the three maps out of the object at once: aya hands out one &mut per name.
        for (name, map) in self.ebpf.maps_mut() {
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
        let maps = Maps {
            services: BpfHashMap::try_from(services).map_err(map_err(MAP_SERVICES))?,
            slots: BpfHashMap::try_from(slots).map_err(map_err(MAP_SLOTS))?,
            backends: BpfHashMap::try_from(backends).map_err(map_err(MAP_BACKENDS))?,
        };
        Ok((maps, &mut self.services))
    }

    /// Rebuilds the in-memory view from pinned maps left by an earlier run.
    pub(super) fn adopt_services(&mut self) -> Result<(), Error> {
        let (maps, state) = self.service_maps()?;
        let mut backends_by_id = HashMap::new();
        for entry in maps.backends.iter() {
            let (id, backend) = entry.map_err(map_err(MAP_BACKENDS))?;
            state.next_backend_id = state.next_backend_id.max(id.id);
            backends_by_id.insert(id, backend);
        }
        let mut slots: BTreeMap<u32, BTreeMap<u32, BackendId>> = BTreeMap::new();
        for entry in maps.slots.iter() {
            let (key, id) = entry.map_err(map_err(MAP_SLOTS))?;
            slots.entry(key.service_id).or_default().insert(key.slot, id);
        }
        for entry in maps.services.iter() {
            let (key, value) = entry.map_err(map_err(MAP_SERVICES))?;
            state.next_service_id = state.next_service_id.max(value.id);
            let table: Vec<BackendId> = slots
                .get(&value.id)
                .map(|s| s.values().take(value.slot_count as usize).copied().collect())
                .unwrap_or_default();
            for id in table.iter().collect::<BTreeSet<_>>() {
                if let Some(b) = backends_by_id.get(id) {
                    state.backends.entry(*b).or_insert((*id, 0)).1 += 1;
                    state.by_id.insert(*id, *b);
                }
            }
            state.services.insert(key, Installed { value, slots: table });
        }
        Ok(())
    }

    /// Makes the Service maps equal to `desired`: upserts each, removes the rest.
    pub fn sync_services(&mut self, desired: &[ServiceSpec]) -> Result<(), Error> {
        let wanted: BTreeSet<ServiceKey> = desired.iter().map(ServiceSpec::key).collect();
        let stale: Vec<ServiceKey> = self.services.services.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for spec in desired {
            self.upsert_service(spec)?;
        }
        for key in stale {
            self.remove_service_key(key)?;
        }
        Ok(())
    }

    /// Installs or updates one Service. Only healthy backends with weight > 0 are selectable; a
    /// Service with none makes `connect()` to its VIP fail fast with ECONNREFUSED.
    pub fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), Error> {
        spec.validate()?;
        let key = spec.key();
        let table = spec.table();
        let describe = spec.describe();
        let (mut maps, state) = self.service_maps()?;
        if state.unchanged(key, spec, &table) {
            return Ok(()); // a full resync of an unchanged Service writes nothing
        }
        let id = match state.services.get(&key) {
            Some(installed) => installed.value.id,
            None => {
                if state.services.len() >= MAX_SERVICES as usize {
                    return Err(Error::MapFull { name: MAP_SERVICES, capacity: MAX_SERVICES, item: describe });
                }
                state.next_service_id += 1;
                state.next_service_id
            }
        };
        // 1. Backends the new table uses (one reference per table that uses them).
        let mut used: BTreeMap<usize, BackendId> = BTreeMap::new();
        for &i in table.iter().collect::<BTreeSet<_>>() {
            let b = &spec.backends[i];
            let backend = Backend::new(addr_of(b.addr), b.port);
            used.insert(i, state.acquire_backend(&mut maps, backend, &describe)?);
        }
        let slots: Vec<BackendId> = table.iter().map(|i| used[i]).collect();
        let old = state.services.get(&key);
        // 2. Changed slots only.
        for (slot, backend_id) in slots.iter().enumerate() {
            if old.is_some_and(|o| o.slots.get(slot) == Some(backend_id)) {
                continue;
            }
            let slot = u32::try_from(slot).expect("tables are bounded");
            maps.slots
                .insert(SlotKey { service_id: id, slot }, backend_id, 0)
                .map_err(|e| full_or(e, MAP_SLOTS, MAX_SLOTS, &describe))?;
        }
        // 3. Flip the service entry (if it changed).
        let value = value_of(spec, id, slots.len());
        if old.is_none_or(|o| o.value != value) {
            maps.services.insert(key, value, 0).map_err(|e| full_or(e, MAP_SERVICES, MAX_SERVICES, &describe))?;
        }
        // 4. Remove slots beyond the new table, release the old table's backends.
        if let Some(old) = state.services.insert(key, Installed { value, slots }) {
            for slot in value.slot_count as usize..old.slots.len() {
                let slot = u32::try_from(slot).expect("bounded");
                let _ = maps.slots.remove(&SlotKey { service_id: id, slot });
            }
            for backend_id in old.slots.iter().collect::<BTreeSet<_>>() {
                state.release_backend(&mut maps, *backend_id);
            }
        }
        Ok(())
    }

    /// Removes a Service: connects to its VIP are no longer rewritten.
    pub fn remove_service(&mut self, vip: IpAddr, port: u16, protocol: Protocol) -> Result<(), Error> {
        self.remove_service_key(ServiceKey::new(addr_of(vip), port, protocol.number()))
    }

    fn remove_service_key(&mut self, key: ServiceKey) -> Result<(), Error> {
        let (mut maps, state) = self.service_maps()?;
        let Some(old) = state.services.remove(&key) else { return Ok(()) };
        maps.services.remove(&key).map_err(map_err(MAP_SERVICES))?;
        for slot in 0..old.slots.len() {
            let slot = u32::try_from(slot).expect("bounded");
            let _ = maps.slots.remove(&SlotKey { service_id: old.value.id, slot });
        }
        for backend_id in old.slots.iter().collect::<BTreeSet<_>>() {
            state.release_backend(&mut maps, *backend_id);
        }
        Ok(())
    }

    /// Number of Services installed.
    pub fn service_count(&self) -> usize {
        self.services.services.len()
    }
}

fn value_of(spec: &ServiceSpec, id: u32, slot_count: usize) -> ServiceValue {
    ServiceValue {
        id,
        slot_count: u32::try_from(slot_count).expect("tables are bounded"),
        flags: spec.flags(),
        affinity_timeout_s: spec.affinity.map_or(0, |t| u32::try_from(t.as_secs()).expect("validated")),
    }
}

impl ServiceTable {
    /// True if `spec` with selection `table` is exactly what is installed under `key`.
    fn unchanged(&self, key: ServiceKey, spec: &ServiceSpec, table: &[usize]) -> bool {
        let Some(old) = self.services.get(&key) else { return false };
        if old.value != value_of(spec, old.value.id, table.len()) || old.slots.len() != table.len() {
            return false;
        }
        table.iter().zip(&old.slots).all(|(&i, id)| {
            let b = &spec.backends[i];
            self.backends.get(&Backend::new(addr_of(b.addr), b.port)).is_some_and(|(bid, _)| bid == id)
        })
    }

    fn acquire_backend(&mut self, maps: &mut Maps<'_>, backend: Backend, item: &str) -> Result<BackendId, Error> {
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
        maps.backends.insert(id, backend, 0).map_err(|e| full_or(e, MAP_BACKENDS, MAX_BACKENDS, item))?;
        self.backends.insert(backend, (id, 1));
        self.by_id.insert(id, backend);
        Ok(id)
    }

    fn release_backend(&mut self, maps: &mut Maps<'_>, id: BackendId) {
        let Some(backend) = self.by_id.get(&id).copied() else { return };
        let entry = self.backends.get_mut(&backend).expect("the two indexes agree");
        entry.1 -= 1;
        if entry.1 == 0 {
            self.backends.remove(&backend);
            self.by_id.remove(&id);
            let _ = maps.backends.remove(&id);
            self.free_backend_ids.push(id.id);
        }
    }
}
