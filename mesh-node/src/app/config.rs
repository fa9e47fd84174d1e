//! The proxy side of the daemon's configuration (`MESH_*` variables), parsed once at start with
//! the rest of `crate::config`; every invalid value names its variable.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use crate::{
    config::{Error, Source},
    proxy,
};

pub const ENV_TRUST_DOMAIN: &str = "MESH_TRUST_DOMAIN";
pub const ENV_ROOT_NAMESPACE: &str = "MESH_ROOT_NAMESPACE";
pub const ENV_CLUSTER_ID: &str = "MESH_CLUSTER_ID";
pub const ENV_LOCAL_CONFIG: &str = "MESH_LOCAL_CONFIG";
pub const ENV_CA_CERT: &str = "MESH_CA_CERT";
pub const ENV_CA_KEY: &str = "MESH_CA_KEY";
pub const ENV_CERT_TTL_SECS: &str = "MESH_CERT_TTL_SECS";
pub const ENV_OUTBOUND_ADDR: &str = "MESH_OUTBOUND_ADDR";
pub const ENV_INBOUND_ADDR: &str = "MESH_INBOUND_ADDR";
pub const ENV_INBOUND_PLAINTEXT_ADDR: &str = "MESH_INBOUND_PLAINTEXT_ADDR";
pub const ENV_METRICS_ADDR: &str = "MESH_METRICS_ADDR";
pub const ENV_ADMIN_ADDR: &str = "MESH_ADMIN_ADDR";
pub const ENV_DRAIN_DEADLINE_SECS: &str = "MESH_DRAIN_DEADLINE_SECS";
pub const ENV_LOG_FORMAT: &str = "MESH_LOG_FORMAT";
pub const ENV_DATAPATH: &str = "MESH_DATAPATH";
pub const ENV_TRANSPARENT: &str = "MESH_INBOUND_TRANSPARENT";
pub const ENV_STREAM_WINDOW: &str = "MESH_HBONE_STREAM_WINDOW";
pub const ENV_CONNECTION_WINDOW: &str = "MESH_HBONE_CONNECTION_WINDOW";
pub const ENV_FRAME_SIZE: &str = "MESH_HBONE_FRAME_SIZE";
pub const ENV_POOL_MAX_STREAMS: &str = "MESH_POOL_MAX_STREAMS";
pub const ENV_POOL_IDLE_SECS: &str = "MESH_POOL_IDLE_SECS";
pub const ENV_WORKER_THREADS: &str = "MESH_WORKER_THREADS";
pub const ENV_HBONE_DIAL: &str = "MESH_HBONE_DIAL";
pub const ENV_CLUSTER_DOMAIN: &str = "MESH_CLUSTER_DOMAIN";
pub const ENV_HBONE_REDIRECT: &str = "MESH_HBONE_REDIRECT";
pub const ENV_PLAINTEXT_REDIRECT: &str = "MESH_PLAINTEXT_REDIRECT";
pub const ENV_SOCKET_MARK: &str = "MESH_SOCKET_MARK";
pub const ENV_JWKS_REFRESH_SECS: &str = "MESH_JWKS_REFRESH_SECS";
pub const ENV_HANDSHAKE_TIMEOUT_SECS: &str = "MESH_HANDSHAKE_TIMEOUT_SECS";
pub const ENV_TCP_IDLE_TIMEOUT_SECS: &str = "MESH_TCP_IDLE_TIMEOUT_SECS";
pub const ENV_HTTP_HEADER_TIMEOUT_SECS: &str = "MESH_HTTP_HEADER_TIMEOUT_SECS";
pub const ENV_HBONE_HANDSHAKES_PER_SOURCE: &str = "MESH_HBONE_HANDSHAKES_PER_SOURCE";
pub const ENV_MAX_CONNECTIONS: &str = "MESH_MAX_CONNECTIONS";
pub const ENV_MAX_CONNECTIONS_PER_SOURCE: &str = "MESH_MAX_CONNECTIONS_PER_SOURCE";

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub proxy: proxy::Config,
    pub trust_domain: String,
    pub root_namespace: String,
    /// Workloads and policies (JSON, `state::Snapshot`) until the control plane feeds the node.
    pub local_config: Option<PathBuf>,
    /// Test CA root (PEM) and key, until the control plane's CA: both daemons of a lab share it.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub cert_ttl: Duration,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub inbound_plain_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The admin token's file (`admin::credential`); none: admin mutations are refused.
    pub admin_token_file: Option<PathBuf>,
    pub drain_deadline: Duration,
    pub log_json: bool,
    /// Load and attach the kernel datapath (off: proxy only, for labs that capture with iptables).
    pub datapath: bool,
    /// Proxy threads: 1 runs everything on one thread (lowest latency); more use a work-stealing
    /// runtime for throughput across cores.
    pub worker_threads: usize,
    /// Install the policy routing that delivers HBONE addressed to local pods (and, when
    /// transparent, their replies) to this daemon (`crate::routing`).
    pub hbone_redirect: bool,
    /// Also bring plaintext for local meshed pods (from unmeshed clients, other hosts) to the
    /// plaintext listener, so that their policies apply to it: routing rules plus the kernel's
    /// `sk_lookup` (needs the datapath and `hbone_redirect`).
    pub plaintext_redirect: bool,
}

fn parse<T: FromStr>(src: &impl Source, var: &'static str, default: T) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    match src.get(var) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e: T::Err| Error::Invalid { var, value: v, reason: e.to_string() }),
    }
}

fn boolean(src: &impl Source, var: &'static str, default: bool) -> Result<bool, Error> {
    match src.get(var).as_deref() {
        None => Ok(default),
        Some("1" | "true" | "on") => Ok(true),
        Some("0" | "false" | "off") => Ok(false),
        Some(v) => Err(Error::Invalid { var, value: v.into(), reason: "expected true/false".into() }),
    }
}

fn at_least_one(src: &impl Source, var: &'static str, default: usize) -> Result<usize, Error> {
    match parse(src, var, default)? {
        0 => Err(Error::Invalid { var, value: "0".into(), reason: "must be at least 1".into() }),
        n => Ok(n),
    }
}

fn secs(src: &impl Source, var: &'static str, default: u64) -> Result<Duration, Error> {
    let s: u64 = parse(src, var, default)?;
    if s == 0 {
        return Err(Error::Invalid { var, value: "0".into(), reason: "must be at least 1".into() });
    }
    Ok(Duration::from_secs(s))
}

/// A packet mark: `0x1000` or `4096`; not 0 (a mark of no bits would mark nothing).
fn mark(src: &impl Source, var: &'static str, default: u32) -> Result<u32, Error> {
    let Some(v) = src.get(var) else { return Ok(default) };
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    };
    match parsed {
        Ok(0) => Err(Error::Invalid { var, value: v, reason: "must have at least one bit set".into() }),
        Ok(m) => Ok(m),
        Err(e) => Err(Error::Invalid { var, value: v, reason: format!("expected a number like 0x1000: {e}") }),
    }
}

fn path(src: &impl Source, var: &'static str) -> Result<Option<PathBuf>, Error> {
    match src.get(var) {
        None => Ok(None),
        Some(v) if v.starts_with('/') => Ok(Some(PathBuf::from(v))),
        Some(v) => Err(Error::Invalid { var, value: v, reason: "must be an absolute path".into() }),
    }
}

fn addr(src: &impl Source, var: &'static str, default: &str) -> Result<SocketAddr, Error> {
    parse(src, var, default.parse().expect("valid default"))
}

impl Config {
    pub fn from_source(src: &impl Source, node_name: &str) -> Result<Self, Error> {
        let d = proxy::Config::default();
        let log_json = match src.get(ENV_LOG_FORMAT).as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(v) => return Err(Error::Invalid { var: ENV_LOG_FORMAT, value: v.into(), reason: "expected text or json".into() }),
        };
        let frame: u32 = parse(src, ENV_FRAME_SIZE, d.max_frame_size)?;
        if !(16_384..=16_777_215).contains(&frame) {
            return Err(Error::Invalid { var: ENV_FRAME_SIZE, value: frame.to_string(), reason: "HTTP/2 allows 16384..=16777215".into() });
        }
        let ca_cert = path(src, ENV_CA_CERT)?;
        let ca_key = path(src, ENV_CA_KEY)?;
        if ca_cert.is_some() != ca_key.is_some() {
            return Err(Error::Missing { var: if ca_cert.is_some() { ENV_CA_KEY } else { ENV_CA_CERT }, hint: "MESH_CA_CERT and MESH_CA_KEY go together" });
        }
        Ok(Self {
            proxy: proxy::Config {
                node_name: node_name.to_owned(),
                cluster_id: src.get(ENV_CLUSTER_ID).unwrap_or(d.cluster_id),
                hbone_port: proxy::HBONE_PORT,
                stream_window: parse(src, ENV_STREAM_WINDOW, d.stream_window)?,
                connection_window: parse(src, ENV_CONNECTION_WINDOW, d.connection_window)?,
                max_frame_size: frame,
                max_streams_per_conn: parse(src, ENV_POOL_MAX_STREAMS, d.max_streams_per_conn)?.max(1),
                pool_idle_timeout: secs(src, ENV_POOL_IDLE_SECS, d.pool_idle_timeout.as_secs())?,
                connect_timeout: d.connect_timeout,
                handshake_timeout: secs(src, ENV_HANDSHAKE_TIMEOUT_SECS, d.handshake_timeout.as_secs())?,
                tcp_idle_timeout: match parse(src, ENV_TCP_IDLE_TIMEOUT_SECS, d.tcp_idle_timeout.map_or(0, |t| t.as_secs()))? {
                    0 => None,
                    s => Some(Duration::from_secs(s)),
                },
                http_header_timeout: match parse(src, ENV_HTTP_HEADER_TIMEOUT_SECS, d.http_header_timeout.map_or(0, |t| t.as_secs()))? {
                    0 => None,
                    s => Some(Duration::from_secs(s)),
                },
                connection_limits: proxy::accept::Limits {
                    max: at_least_one(src, ENV_MAX_CONNECTIONS, d.connection_limits.max)?,
                    per_source: at_least_one(src, ENV_MAX_CONNECTIONS_PER_SOURCE, d.connection_limits.per_source)?,
                    rate: None,
                },
                hbone_handshake_rate: match parse(src, ENV_HBONE_HANDSHAKES_PER_SOURCE, 200u32)? {
                    0 => None,
                    n => Some(proxy::handshake_rate(n)),
                },
                transparent: boolean(src, ENV_TRANSPARENT, false)?,
                hbone_dial: parse(src, ENV_HBONE_DIAL, d.hbone_dial)?,
                cluster_domain: src.get(ENV_CLUSTER_DOMAIN).unwrap_or(d.cluster_domain),
                jwks_refresh: secs(src, ENV_JWKS_REFRESH_SECS, d.jwks_refresh.as_secs())?,
                socket_mark: mark(src, ENV_SOCKET_MARK, d.socket_mark)?,
            },
            trust_domain: src.get(ENV_TRUST_DOMAIN).unwrap_or_else(|| "cluster.local".into()),
            root_namespace: src.get(ENV_ROOT_NAMESPACE).unwrap_or_else(|| "mesh-system".into()),
            local_config: path(src, ENV_LOCAL_CONFIG)?,
            ca_cert,
            ca_key,
            cert_ttl: secs(src, ENV_CERT_TTL_SECS, 24 * 3600)?,
            outbound_addr: addr(src, ENV_OUTBOUND_ADDR, "0.0.0.0:15001")?,
            inbound_addr: addr(src, ENV_INBOUND_ADDR, "0.0.0.0:15008")?,
            inbound_plain_addr: addr(src, ENV_INBOUND_PLAINTEXT_ADDR, "0.0.0.0:15006")?,
            metrics_addr: addr(src, ENV_METRICS_ADDR, "0.0.0.0:15020")?,
            admin_addr: addr(src, ENV_ADMIN_ADDR, "127.0.0.1:15000")?,
            admin_token_file: path(src, crate::admin::credential::ENV_ADMIN_TOKEN_FILE)?,
            drain_deadline: secs(src, ENV_DRAIN_DEADLINE_SECS, 10)?,
            log_json,
            datapath: boolean(src, ENV_DATAPATH, true)?,
            worker_threads: at_least_one(src, ENV_WORKER_THREADS, 1)?,
            hbone_redirect: boolean(src, ENV_HBONE_REDIRECT, true)?,
            plaintext_redirect: boolean(src, ENV_PLAINTEXT_REDIRECT, true)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn defaults_and_named_errors() {
        let cfg = Config::from_source(&HashMap::new(), "n1").expect("defaults");
        assert_eq!(cfg.inbound_addr.port(), 15008);
        assert_eq!(cfg.admin_addr.ip().to_string(), "127.0.0.1", "admin is localhost only by default");
        assert!(cfg.datapath);
        assert_eq!(cfg.proxy.hbone_dial, proxy::HboneDial::Pod, "ztunnel-compatible by default");
        assert!(cfg.hbone_redirect);
        assert!(cfg.plaintext_redirect, "policies apply to plaintext by default, as in Istio ambient");
        assert_eq!(cfg.proxy.socket_mark, 0x1000);
        assert_eq!(cfg.proxy.tcp_idle_timeout, Some(Duration::from_hours(1)), "Envoy's TCP idle timeout");
        let off = Config::from_source(&HashMap::from([(ENV_TCP_IDLE_TIMEOUT_SECS, "0")]), "n1").expect("0 turns it off");
        assert_eq!(off.proxy.tcp_idle_timeout, None);
        assert_eq!(cfg.proxy.http_header_timeout, Some(Duration::from_secs(10)));
        let off = Config::from_source(&HashMap::from([(ENV_HTTP_HEADER_TIMEOUT_SECS, "0")]), "n1").expect("0 turns it off");
        assert_eq!(off.proxy.http_header_timeout, None);
        assert_eq!(cfg.proxy.hbone_handshake_rate, Some(proxy::handshake_rate(200)));
        let off = Config::from_source(&HashMap::from([(ENV_HBONE_HANDSHAKES_PER_SOURCE, "0")]), "n1").expect("0 turns it off");
        assert_eq!(off.proxy.hbone_handshake_rate, None);
        for (value, mark) in [("0x20000", 0x20000), ("4096", 4096)] {
            let cfg = Config::from_source(&HashMap::from([(ENV_SOCKET_MARK, value)]), "n1").expect(value);
            assert_eq!(cfg.proxy.socket_mark, mark);
        }
        for (var, value, needle) in [
            (ENV_INBOUND_ADDR, "15008", "MESH_INBOUND_ADDR=\"15008\""),
            (ENV_FRAME_SIZE, "100", "MESH_HBONE_FRAME_SIZE=\"100\""),
            (ENV_DATAPATH, "maybe", "MESH_DATAPATH=\"maybe\""),
            (ENV_DRAIN_DEADLINE_SECS, "0", "MESH_DRAIN_DEADLINE_SECS"),
            (ENV_LOG_FORMAT, "xml", "MESH_LOG_FORMAT"),
            (ENV_CA_CERT, "/ca.pem", "MESH_CA_KEY is required"),
            (ENV_HBONE_DIAL, "gateway", "MESH_HBONE_DIAL=\"gateway\": expected pod or node"),
            (ENV_HBONE_REDIRECT, "yes", "MESH_HBONE_REDIRECT"),
            (ENV_PLAINTEXT_REDIRECT, "enabled", "MESH_PLAINTEXT_REDIRECT"),
            (ENV_SOCKET_MARK, "0", "MESH_SOCKET_MARK=\"0\": must have at least one bit set"),
            (ENV_SOCKET_MARK, "0xzz", "MESH_SOCKET_MARK=\"0xzz\": expected a number"),
            (ENV_TCP_IDLE_TIMEOUT_SECS, "1h", "MESH_TCP_IDLE_TIMEOUT_SECS=\"1h\""),
        ] {
            let err = Config::from_source(&HashMap::from([(var, value)]), "n1").expect_err(var);
            assert!(err.to_string().contains(needle), "{var}: {err}");
        }
    }
}
