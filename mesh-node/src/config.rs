//! Daemon configuration: read once from `MESH_*` environment variables into a typed struct.
//! Every invalid value is rejected at start with a message naming the variable.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

pub const ENV_NODE_NAME: &str = "MESH_NODE_NAME";
pub const ENV_CGROUP: &str = "MESH_CGROUP";
pub const ENV_BPF_PIN_DIR: &str = "MESH_BPF_PIN_DIR";
pub const ENV_SERVICES_FILE: &str = "MESH_SERVICES_FILE";
pub const ENV_CONTROL_ADDR: &str = "MESH_CONTROL_ADDR";
pub const ENV_CONTROL_SERVER_NAME: &str = "MESH_CONTROL_SERVER_NAME";
pub const ENV_CONTROL_ROOT_CERT: &str = "MESH_CONTROL_ROOT_CERT";
pub const ENV_CONTROL_TOKEN_FILE: &str = "MESH_CONTROL_TOKEN_FILE";
pub const ENV_LAST_CONFIG_FILE: &str = "MESH_LAST_CONFIG_FILE";
pub const ENV_CONTROL_NODE_CERT_TTL_SECS: &str = "MESH_CONTROL_NODE_CERT_TTL_SECS";
pub const ENV_CONTROL_CALL_TIMEOUT_SECS: &str = "MESH_CONTROL_CALL_TIMEOUT_SECS";
pub const ENV_CONTROL_KEEPALIVE_SECS: &str = "MESH_CONTROL_KEEPALIVE_SECS";
pub const ENV_CONTROL_KEEPALIVE_TIMEOUT_SECS: &str = "MESH_CONTROL_KEEPALIVE_TIMEOUT_SECS";
pub const ENV_NODE_ADDRESS: &str = "MESH_NODE_ADDRESS";
pub const ENV_CAPTURE_ADDR: &str = "MESH_CAPTURE_ADDR";
pub const ENV_BYPASS: &str = "MESH_BYPASS";
pub const ENV_POD_INTERFACES: &str = "MESH_POD_INTERFACES";
pub const ENV_DAEMONSET: &str = "MESH_DAEMONSET";
pub const ENV_KUBE_CA_FILE: &str = "MESH_KUBE_CA_FILE";
pub const ENV_KUBE_TOKEN_FILE: &str = "MESH_KUBE_TOKEN_FILE";
pub const ENV_HANDOFF_SOCKET: &str = "MESH_HANDOFF_SOCKET";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{var} is required: {hint}")]
    Missing { var: &'static str, hint: &'static str },
    #[error("{var}={value:?}: {reason}")]
    Invalid { var: &'static str, value: String, reason: String },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub node_name: String,
    /// cgroup v2 directory of this node's pods (attach point of the socket programs); `None`:
    /// the kubelet's pods cgroup the daemon runs in (`kubepods::discover`), resolved at start.
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps.
    pub bpf_pin_dir: PathBuf,
    /// Static Service definitions (JSON), used until the control plane feeds the node.
    pub services_file: Option<PathBuf>,
    /// The control plane (`MESH_CONTROL_ADDR` and friends); `None`: state from
    /// `MESH_LOCAL_CONFIG` and the test CA.
    pub control: Option<crate::control::Config>,
    /// This node's HBONE address, used for its own workloads when the control plane omits it.
    pub node_address: Option<IpAddr>,
    /// Where the kernel redirects meshed pods' connections (the outbound listener as pods reach
    /// it); `None` disables capture.
    pub capture: Option<SocketAddr>,
    /// Same-node sockmap bypass (default on).
    pub bypass: bool,
    /// Host-side interfaces of this node's pods (comma-separated), where the kernel enforces
    /// PeerAuthentication STRICT; the CNI knows them (in the lab, the lab does).
    pub pod_interfaces: Vec<String>,
    /// Uninstall at exit when the API server says the mesh is being removed (`removal`);
    /// `MESH_DAEMONSET` names the DaemonSet (in `MESH_ROOT_NAMESPACE`).
    pub removal: Option<crate::removal::Config>,
    /// Unix socket where a running daemon hands its listeners to its successor
    /// (`crate::handoff`); `None`: no hitless upgrade (a restart closes the ports meanwhile).
    pub handoff: Option<PathBuf>,
    /// The L4 proxy: identities, HBONE, authorization, metrics, admin (`app::config`).
    pub app: crate::app::Config,
}

/// Where configuration values come from: the process environment, or a map in tests.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

pub struct Env;

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| (*v).to_owned())
    }
}

impl Config {
    pub fn from_source(src: &impl Source) -> Result<Self, Error> {
        let node_name = src.get(ENV_NODE_NAME).filter(|v| !v.is_empty()).ok_or(Error::Missing {
            var: ENV_NODE_NAME,
            hint: "the name of this node (spec.nodeName of its pods)",
        })?;
        let cgroup = absolute(src, ENV_CGROUP)?;
        let bpf_pin_dir = absolute(src, ENV_BPF_PIN_DIR)?.unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh"));
        let services_file = absolute(src, ENV_SERVICES_FILE)?;
        let app = crate::app::Config::from_source(src, &node_name)?;
        let control = match src.get(ENV_CONTROL_ADDR) {
            None => None,
            Some(address) => {
                if !address.starts_with("https://") {
                    return Err(Error::Invalid { var: ENV_CONTROL_ADDR, value: address, reason: "must be https://host:port".into() });
                }
                // The DaemonSet builds it from the Service's environment variables, which exist
                // only if the Service did when the pod was created.
                if address.contains("$(") {
                    return Err(Error::Invalid {
                        var: ENV_CONTROL_ADDR,
                        value: address,
                        reason: "contains an unexpanded $(VAR): Service mesh-control did not exist when this pod was created; apply the controller's manifest, then delete this pod".into(),
                    });
                }
                let required = |var: &'static str, hint: &'static str| absolute(src, var)?.ok_or(Error::Missing { var, hint });
                let d = crate::control::Deadlines::default();
                let deadlines = crate::control::Deadlines {
                    call: positive_secs(src, ENV_CONTROL_CALL_TIMEOUT_SECS)?.unwrap_or(d.call),
                    keepalive_interval: positive_secs(src, ENV_CONTROL_KEEPALIVE_SECS)?.unwrap_or(d.keepalive_interval),
                    keepalive_timeout: positive_secs(src, ENV_CONTROL_KEEPALIVE_TIMEOUT_SECS)?.unwrap_or(d.keepalive_timeout),
                };
                Some(crate::control::Config {
                    server_name: src.get(ENV_CONTROL_SERVER_NAME).unwrap_or_else(|| "mesh-control".into()),
                    root_cert: required(ENV_CONTROL_ROOT_CERT, "the mesh root certificate (PEM) that signed mesh-control's")?,
                    token_file: required(ENV_CONTROL_TOKEN_FILE, "this node's credential file")?,
                    node_cert_ttl: std::time::Duration::from_secs(parsed(src, ENV_CONTROL_NODE_CERT_TTL_SECS, "a number of seconds (0: the controller's default)")?.unwrap_or(0)),
                    node_name: node_name.clone(),
                    last_config: absolute(src, ENV_LAST_CONFIG_FILE)?,
                    deadlines,
                    address,
                })
            }
        };
        let node_address = parsed(src, ENV_NODE_ADDRESS, "an IP address")?;
        let capture = parsed(src, ENV_CAPTURE_ADDR, "an address:port, e.g. 198.18.1.1:15001")?;
        let bypass = match src.get(ENV_BYPASS).as_deref() {
            None | Some("1" | "true") => true,
            Some("0" | "false") => false,
            Some(v) => return Err(Error::Invalid { var: ENV_BYPASS, value: v.into(), reason: "must be true or false".into() }),
        };
        let pod_interfaces = src.get(ENV_POD_INTERFACES).map_or_else(Vec::new, |v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect());
        let removal = match src.get(ENV_DAEMONSET).filter(|v| !v.is_empty()) {
            None => None,
            Some(daemonset) => {
                // The DaemonSet projects one token per audience: the controller's refuses tokens
                // for the API server and the API server refuses the controller's.
                let token_file = match absolute(src, ENV_KUBE_TOKEN_FILE)? {
                    Some(path) => path,
                    None => control.as_ref().map(|c| c.token_file.clone()).ok_or(Error::Missing {
                        var: ENV_KUBE_TOKEN_FILE,
                        hint: "MESH_DAEMONSET asks the API server with this node's ServiceAccount token",
                    })?,
                };
                let (host, port) = (src.get("KUBERNETES_SERVICE_HOST"), src.get("KUBERNETES_SERVICE_PORT"));
                let (Some(host), Some(port)) = (host, port) else {
                    return Err(Error::Missing { var: "KUBERNETES_SERVICE_HOST", hint: "set by the kubelet in every container; MESH_DAEMONSET needs the API server" });
                };
                let api = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                let ca_file = absolute(src, ENV_KUBE_CA_FILE)?.unwrap_or_else(|| PathBuf::from("/var/run/mesh/token/ca.crt"));
                Some(crate::removal::Config { namespace: app.root_namespace.clone(), daemonset, api, ca_file, token_file })
            }
        };
        let handoff = absolute(src, ENV_HANDOFF_SOCKET)?;
        Ok(Self { node_name, cgroup, bpf_pin_dir, services_file, control, node_address, capture, bypass, pod_interfaces, removal, handoff, app })
    }
}

fn parsed<T: std::str::FromStr>(src: &impl Source, var: &'static str, what: &str) -> Result<Option<T>, Error> {
    src.get(var)
        .map(|v| v.parse().map_err(|_| Error::Invalid { var, value: v.clone(), reason: format!("must be {what}") }))
        .transpose()
}

/// A whole number of seconds, at least 1 (0 would turn a bound off or make it fire at once).
fn positive_secs(src: &impl Source, var: &'static str) -> Result<Option<std::time::Duration>, Error> {
    match parsed::<u64>(src, var, "a whole number of seconds, at least 1")? {
        Some(0) => Err(Error::Invalid { var, value: "0".into(), reason: "must be at least 1 second".into() }),
        s => Ok(s.map(std::time::Duration::from_secs)),
    }
}

fn absolute(src: &impl Source, var: &'static str) -> Result<Option<PathBuf>, Error> {
    match src.get(var) {
        None => Ok(None),
        Some(v) if v.starts_with('/') => Ok(Some(PathBuf::from(v))),
        Some(v) => Err(Error::Invalid { var, value: v, reason: "must be an absolute path".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let src = HashMap::from([(ENV_NODE_NAME, "n1"), (ENV_CGROUP, "/sys/fs/cgroup/kubepods")]);
        let cfg = Config::from_source(&src).unwrap();
        assert_eq!(cfg.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/mesh"));
        assert_eq!(cfg.services_file, None);
    }

    #[test]
    fn errors_name_the_variable() {
        let err = Config::from_source(&HashMap::from([(ENV_NODE_NAME, "n1"), (ENV_CONTROL_ADDR, "https://$(MESH_CONTROL_SERVICE_HOST):15012")])).unwrap_err();
        assert!(err.to_string().contains("Service mesh-control did not exist"), "{err}");
        let err = Config::from_source(&HashMap::from([(ENV_CGROUP, "/x")])).unwrap_err();
        assert!(err.to_string().starts_with("MESH_NODE_NAME is required"), "{err}");
        let err = Config::from_source(&HashMap::from([(ENV_NODE_NAME, "n1"), (ENV_CGROUP, "relative")])).unwrap_err();
        assert_eq!(err.to_string(), "MESH_CGROUP=\"relative\": must be an absolute path");
    }

    /// The removal check asks the API server with a token for its audience; without one given,
    /// the control token (a file-mode or pre-audience install).
    #[test]
    fn the_removal_check_uses_the_api_servers_token() {
        let mut src = HashMap::from([
            (ENV_NODE_NAME, "n1"),
            (ENV_CGROUP, "/sys/fs/cgroup/kubepods"),
            (ENV_DAEMONSET, "mesh-node"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]);
        let err = Config::from_source(&src).unwrap_err();
        assert!(err.to_string().starts_with("MESH_KUBE_TOKEN_FILE is required"), "{err}");
        src.insert(ENV_KUBE_TOKEN_FILE, "/var/run/mesh/token/kube-token");
        let removal = Config::from_source(&src).unwrap().removal.expect("checked at exit");
        assert_eq!(removal.token_file, PathBuf::from("/var/run/mesh/token/kube-token"));
        assert_eq!(removal.api, "10.96.0.1:443");
    }

    /// The control channel's deadlines: defaults, overridden in whole seconds, and 0 refused
    /// (it would turn a bound off).
    #[test]
    fn control_deadlines_default_and_override() {
        let mut src = HashMap::from([
            (ENV_NODE_NAME, "n1"),
            (ENV_CONTROL_ADDR, "https://mesh-control:15012"),
            (ENV_CONTROL_ROOT_CERT, "/etc/mesh/root.pem"),
            (ENV_CONTROL_TOKEN_FILE, "/etc/mesh/token"),
        ]);
        let control = Config::from_source(&src).unwrap().control.expect("control plane configured");
        assert_eq!(control.deadlines, crate::control::Deadlines::default());
        src.insert(ENV_CONTROL_KEEPALIVE_SECS, "3");
        src.insert(ENV_CONTROL_CALL_TIMEOUT_SECS, "7");
        let d = Config::from_source(&src).unwrap().control.expect("control plane configured").deadlines;
        assert_eq!((d.keepalive_interval.as_secs(), d.call.as_secs(), d.keepalive_timeout), (3, 7, crate::control::Deadlines::default().keepalive_timeout));
        src.insert(ENV_CONTROL_KEEPALIVE_TIMEOUT_SECS, "0");
        let err = Config::from_source(&src).unwrap_err();
        assert_eq!(err.to_string(), "MESH_CONTROL_KEEPALIVE_TIMEOUT_SECS=\"0\": must be at least 1 second");
    }
}
