//! Static Service definitions from a JSON file: the node's input until the control plane
//! feeds it. Format: `[{"vip": "198.19.0.10", "port": 80, "protocol": "tcp",
//! "lb": "random", "affinity_timeout_s": 0,
//! "backends": [{"addr": "198.18.2.11", "port": 8080, "weight": 1, "healthy": true}]}]`.
//! `lb` is `random` (default) or `maglev`; `affinity_timeout_s` > 0 turns on client affinity.

use std::{fs, net::IpAddr, path::Path, time::Duration};

use crate::datapath::{BackendSpec, LoadBalancing, Protocol, ServiceSpec};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceJson {
    vip: IpAddr,
    port: u16,
    #[serde(default = "tcp")]
    protocol: ProtocolJson,
    backends: Vec<BackendJson>,
    #[serde(default)]
    lb: LbJson,
    #[serde(default)]
    affinity_timeout_s: u64,
}

#[derive(serde::Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum LbJson {
    #[default]
    Random,
    Maglev,
}

#[derive(serde::Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ProtocolJson {
    Tcp,
    Udp,
}

fn tcp() -> ProtocolJson {
    ProtocolJson::Tcp
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendJson {
    addr: IpAddr,
    port: u16,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default = "yes")]
    healthy: bool,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

pub fn parse(text: &str, path: &str) -> Result<Vec<ServiceSpec>, Error> {
    let raw: Vec<ServiceJson> =
        serde_json::from_str(text).map_err(|source| Error::Parse { path: path.into(), source })?;
    Ok(raw
        .into_iter()
        .map(|s| ServiceSpec {
            vip: s.vip,
            port: s.port,
            protocol: match s.protocol {
                ProtocolJson::Tcp => Protocol::Tcp,
                ProtocolJson::Udp => Protocol::Udp,
            },
            backends: s
                .backends
                .into_iter()
                .map(|b| BackendSpec { addr: b.addr, port: b.port, weight: b.weight, healthy: b.healthy })
                .collect(),
            lb: match s.lb {
                LbJson::Random => LoadBalancing::Random,
                LbJson::Maglev => LoadBalancing::Maglev,
            },
            affinity: (s.affinity_timeout_s > 0).then(|| Duration::from_secs(s.affinity_timeout_s)),
        })
        .collect())
}

pub fn load(path: &Path) -> Result<Vec<ServiceSpec>, Error> {
    let shown = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|source| Error::Read { path: shown.clone(), source })?;
    parse(&text, &shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_rejects_unknown_fields() {
        let specs = parse(r#"[{"vip":"198.19.0.10","port":80,"backends":[{"addr":"198.18.2.11","port":8080}]}]"#, "x").unwrap();
        assert_eq!(specs[0].protocol, Protocol::Tcp);
        assert_eq!(specs[0].backends[0].weight, 1);
        assert!(specs[0].backends[0].healthy);
        let err = parse(r#"[{"vip":"198.19.0.10","port":80,"backend":[]}]"#, "svc.json").unwrap_err();
        assert!(err.to_string().contains("svc.json") && err.to_string().contains("unknown field"), "{err}");
    }
}
