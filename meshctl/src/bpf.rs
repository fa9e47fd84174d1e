//! `meshctl bpf <node> maps`: the kernel datapath's pinned maps, decoded with mesh-common's
//! layouts (the same types mesh-node writes them with).
//!
//! Reading needs root and the node's bpffs: in the lab `/sys/fs/bpf/mesh-<run>/<node>/`, on a
//! cluster node `/sys/fs/bpf/mesh/<node>/` (the DaemonSet's `MESH_BPF_PIN_DIR`). The maps are
//! only read; the connection-tracking maps (LRU) are not shown.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use mesh_common::{
    Addr, Backend, BackendId, DropReason, EndpointInfo, PodInfo, PolicyKey, PolicyValue,
    ServiceFlags, ServiceKey, ServiceValue, SlotKey, Stat, TrustedSender,
    endpoint::flags,
    names::{
        MAP_BACKENDS, MAP_DROPS, MAP_ENDPOINTS, MAP_PODS, MAP_POLICY, MAP_SERVICES, MAP_SLOTS,
        MAP_STATS, MAP_TRUSTED,
    },
    service::{PROTO_TCP, PROTO_UDP},
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no pinned maps in {dir} (is the node daemon running with this pin directory?)")]
    NoPinDir { dir: PathBuf },
    #[error("opening pinned map {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        source: MapError,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Maps {
    pub pin_dir: PathBuf,
    pub services: Vec<ServiceEntry>,
    pub backends: Vec<BackendEntry>,
    pub pods: Vec<PodEntry>,
    pub endpoints: Vec<EndpointEntry>,
    pub policy: Vec<PolicyEntry>,
    /// Processes of the node whose connections STRICT pods admit (the kubelets' probes).
    pub trusted: Vec<TrustedEntry>,
    pub drops: Vec<Counter>,
    pub events: Vec<Counter>,
    /// `bpftool map dump pinned ...` for each map shown.
    pub commands: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// `VIP:port`.
    pub service: String,
    pub protocol: String,
    pub id: u32,
    /// Size of the selection table (0: no healthy backend).
    pub slots: u32,
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: u32,
    /// The backends in the table; a backend's weight is its number of slots.
    pub backends: Vec<WeightedBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedBackend {
    pub id: u32,
    /// `ip:port`, or `missing` when the backend map has no such id.
    pub address: String,
    pub slots: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendEntry {
    pub id: u32,
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    pub cgroup_id: u64,
    pub address: IpAddr,
    pub identity: u32,
    pub flags: Vec<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointEntry {
    pub address: IpAddr,
    pub identity: u32,
    pub flags: Vec<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyEntry {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub port: u16,
    pub protocol: String,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustedEntry {
    pub cgroup_id: u64,
    pub pid: u32,
    /// `/proc/<pid>/comm` where this process can see it (`?` otherwise).
    pub process: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub code: u32,
    /// Summed over CPUs.
    pub count: u64,
}

pub fn ip(a: &Addr) -> IpAddr {
    if a.is_v4() {
        let o = &a.octets;
        IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a.octets))
    }
}

fn socket(a: &Addr, port: u16) -> String {
    std::net::SocketAddr::new(ip(a), port).to_string()
}

fn protocol(number: u8) -> String {
    match number {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        n => n.to_string(),
    }
}

fn flag_names(bits: u32, known: &[(u32, &'static str)]) -> Vec<&'static str> {
    known
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

const ENDPOINT_FLAGS: &[(u32, &str)] = &[
    (flags::MESHED, "MESHED"),
    (flags::STRICT, "STRICT"),
    (flags::LOCAL, "LOCAL"),
];

/// Services with their selection tables resolved to backends. Pure: the unit tests feed it.
pub fn assemble_services(
    services: &[(ServiceKey, ServiceValue)],
    slots: &[(SlotKey, BackendId)],
    backends: &BTreeMap<u32, Backend>,
) -> Vec<ServiceEntry> {
    let mut per_service: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (key, backend) in slots {
        *per_service
            .entry(key.service_id)
            .or_default()
            .entry(backend.id)
            .or_default() += 1;
    }
    let mut out: Vec<ServiceEntry> = services
        .iter()
        .map(|(k, v)| {
            let table = per_service.get(&v.id).cloned().unwrap_or_default();
            let backends = table
                .into_iter()
                .map(|(id, slots)| WeightedBackend {
                    id,
                    address: backends
                        .get(&id)
                        .map_or("missing".into(), |b| socket(&b.addr, b.port)),
                    slots,
                })
                .collect();
            ServiceEntry {
                service: socket(&k.addr, k.port),
                protocol: protocol(k.proto),
                id: v.id,
                slots: v.slot_count,
                flags: flag_names(
                    v.flags.bits,
                    &[
                        (ServiceFlags::MAGLEV, "MAGLEV"),
                        (ServiceFlags::AFFINITY, "AFFINITY"),
                    ],
                ),
                affinity_timeout_s: v.affinity_timeout_s,
                backends,
            }
        })
        .collect();
    out.sort_by(|a, b| (ip_key(&a.service), &a.protocol).cmp(&(ip_key(&b.service), &b.protocol)));
    out
}

/// Sorts `198.19.0.10:80` before `198.19.0.10:7000` and `198.19.0.9:80` before both.
fn ip_key(socket: &str) -> Option<std::net::SocketAddr> {
    socket.parse().ok()
}

fn open(dir: &Path, name: &'static str) -> Result<Map, Error> {
    let path = dir.join(name);
    let open_err = |source| Error::Open {
        path: path.clone(),
        source,
    };
    Map::from_map_data(MapData::from_pin(&path).map_err(open_err)?).map_err(open_err)
}

fn hash_entries<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    let read = |source| Error::Read { name, source };
    let map: HashMap<MapData, K, V> = HashMap::try_from(open(dir, name)?).map_err(read)?;
    map.iter().collect::<Result<Vec<_>, _>>().map_err(read)
}

fn counters(
    dir: &Path,
    name: &'static str,
    codes: impl Iterator<Item = (&'static str, u32)>,
) -> Result<Vec<Counter>, Error> {
    let read = |source| Error::Read { name, source };
    let array: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(dir, name)?).map_err(read)?;
    codes
        .map(|(counter, code)| {
            let count = array.get(&code, 0).map_err(read)?.iter().sum();
            Ok(Counter {
                name: counter,
                code,
                count,
            })
        })
        .collect()
}

/// Reads and decodes the maps pinned in `dir`.
/// The trusted-sender map, each entry with the name of its process where this one can see it.
fn trusted_senders(dir: &Path) -> Result<Vec<TrustedEntry>, Error> {
    let mut trusted: Vec<TrustedEntry> = hash_entries::<u64, TrustedSender>(dir, MAP_TRUSTED)?
        .into_iter()
        .map(|(cgroup_id, t)| TrustedEntry {
            cgroup_id,
            pid: t.pid,
            process: std::fs::read_to_string(format!("/proc/{}/comm", t.pid))
                .map_or_else(|_| "?".into(), |c| c.trim_end().to_owned()),
        })
        .collect();
    trusted.sort_by_key(|t| t.cgroup_id);
    Ok(trusted)
}

pub fn read(dir: &Path) -> Result<Maps, Error> {
    if !dir.join(MAP_SERVICES).exists() {
        return Err(Error::NoPinDir {
            dir: dir.to_path_buf(),
        });
    }
    let backends: BTreeMap<u32, Backend> = hash_entries::<BackendId, Backend>(dir, MAP_BACKENDS)?
        .into_iter()
        .map(|(k, v)| (k.id, v))
        .collect();
    let services = assemble_services(
        &hash_entries(dir, MAP_SERVICES)?,
        &hash_entries(dir, MAP_SLOTS)?,
        &backends,
    );
    let mut pods: Vec<PodEntry> = hash_entries::<u64, PodInfo>(dir, MAP_PODS)?
        .into_iter()
        .map(|(cgroup_id, p)| PodEntry {
            cgroup_id,
            address: ip(&p.addr),
            identity: p.identity,
            flags: flag_names(p.flags, ENDPOINT_FLAGS),
        })
        .collect();
    pods.sort_by_key(|p| p.address);
    let mut endpoints: Vec<EndpointEntry> = hash_entries::<Addr, EndpointInfo>(dir, MAP_ENDPOINTS)?
        .into_iter()
        .map(|(a, e)| EndpointEntry {
            address: ip(&a),
            identity: e.identity,
            flags: flag_names(e.flags, ENDPOINT_FLAGS),
        })
        .collect();
    endpoints.sort_by_key(|e| e.address);
    let mut policy: Vec<PolicyEntry> = hash_entries::<PolicyKey, PolicyValue>(dir, MAP_POLICY)?
        .into_iter()
        .map(|(k, v)| PolicyEntry {
            src_identity: k.src_identity,
            dst_identity: k.dst_identity,
            port: k.port,
            protocol: protocol(k.proto),
            verdict: if v.verdict == PolicyValue::DENY {
                "deny"
            } else {
                "allow"
            },
        })
        .collect();
    policy.sort_by_key(|p| (p.src_identity, p.dst_identity, p.port));
    let trusted = trusted_senders(dir)?;
    let drops = counters(
        dir,
        MAP_DROPS,
        DropReason::ALL.into_iter().map(|r| (r.as_str(), r as u32)),
    )?;
    let events = counters(
        dir,
        MAP_STATS,
        Stat::ALL.into_iter().map(|s| (s.as_str(), s as u32)),
    )?;
    let shown = [
        MAP_SERVICES,
        MAP_SLOTS,
        MAP_BACKENDS,
        MAP_PODS,
        MAP_ENDPOINTS,
        MAP_POLICY,
        MAP_TRUSTED,
        MAP_DROPS,
        MAP_STATS,
    ];
    let commands = shown
        .iter()
        .map(|m| format!("bpftool map dump pinned {}", dir.join(m).display()))
        .collect();
    let backends = backends
        .into_iter()
        .map(|(id, b)| BackendEntry {
            id,
            address: socket(&b.addr, b.port),
        })
        .collect();
    Ok(Maps {
        pin_dir: dir.to_path_buf(),
        services,
        backends,
        pods,
        endpoints,
        policy,
        trusted,
        drops,
        events,
        commands,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Addr {
        let ip: Ipv4Addr = s.parse().expect("ip");
        Addr::from_v4(ip.octets())
    }

    #[test]
    fn services_resolve_their_slots_to_weighted_backends() {
        let svc = |vip, port, id, slot_count, bits| {
            (
                ServiceKey::new(v4(vip), port, PROTO_TCP),
                ServiceValue {
                    id,
                    slot_count,
                    flags: ServiceFlags { bits },
                    affinity_timeout_s: 0,
                },
            )
        };
        let services = [
            svc("198.19.0.10", 7000, 2, 3, 0),
            svc("198.19.0.10", 80, 1, 4, ServiceFlags::MAGLEV),
            svc("198.19.0.12", 80, 3, 0, 0),
        ];
        let slot = |service_id, slot, id| (SlotKey { service_id, slot }, BackendId { id });
        // Service 1: backend 10 in two slots, 11 and 12 in one each; 2: 10, 11, and a
        // backend the backend map lacks.
        let slots = [
            slot(1, 0, 10),
            slot(1, 1, 11),
            slot(1, 2, 10),
            slot(1, 3, 12),
            slot(2, 0, 10),
            slot(2, 1, 11),
            slot(2, 2, 99),
        ];
        let backends: BTreeMap<u32, Backend> = [
            (10, Backend::new(v4("198.18.1.12"), 8081)),
            (11, Backend::new(v4("198.18.2.11"), 8081)),
            (12, Backend::new(v4("198.18.2.12"), 8081)),
        ]
        .into();
        let out = assemble_services(&services, &slots, &backends);
        let names: Vec<&str> = out.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(
            names,
            ["198.19.0.10:80", "198.19.0.10:7000", "198.19.0.12:80"]
        );
        let http = &out[0];
        assert_eq!(
            (http.id, http.slots, http.flags.as_slice()),
            (1, 4, ["MAGLEV"].as_slice())
        );
        let weights: Vec<(&str, u32)> = http
            .backends
            .iter()
            .map(|b| (b.address.as_str(), b.slots))
            .collect();
        assert_eq!(
            weights,
            [
                ("198.18.1.12:8081", 2),
                ("198.18.2.11:8081", 1),
                ("198.18.2.12:8081", 1)
            ]
        );
        assert_eq!(out[1].backends[2].address, "missing");
        assert!(out[2].backends.is_empty());
    }

    #[test]
    fn addresses_and_flags_decode() {
        assert_eq!(
            ip(&v4("198.18.1.11")),
            IpAddr::V4(Ipv4Addr::new(198, 18, 1, 11))
        );
        let v6: Ipv6Addr = "fd6d:6573:6800:1::b".parse().expect("v6");
        assert_eq!(ip(&Addr::from_v6(v6.octets())), IpAddr::V6(v6));
        assert_eq!(
            flag_names(flags::MESHED | flags::STRICT, ENDPOINT_FLAGS),
            ["MESHED", "STRICT"]
        );
        assert!(flag_names(0, ENDPOINT_FLAGS).is_empty());
    }
}
