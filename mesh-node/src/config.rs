//! Daemon configuration: read once from `MESH_*` environment variables into a typed struct.
//! Every invalid value is rejected at start with a message naming the variable.

use std::{collections::HashMap, path::PathBuf};

pub const ENV_NODE_NAME: &str = "MESH_NODE_NAME";
pub const ENV_CGROUP: &str = "MESH_CGROUP";
pub const ENV_BPF_PIN_DIR: &str = "MESH_BPF_PIN_DIR";
pub const ENV_SERVICES_FILE: &str = "MESH_SERVICES_FILE";

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
    /// cgroup v2 directory of this node's pods (attach point of the socket programs).
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps.
    pub bpf_pin_dir: PathBuf,
    /// Static Service definitions (JSON), used until the control plane feeds the node.
    pub services_file: Option<PathBuf>,
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
        let cgroup = absolute(src, ENV_CGROUP)?.ok_or(Error::Missing {
            var: ENV_CGROUP,
            hint: "the cgroup v2 directory holding this node's pods",
        })?;
        let bpf_pin_dir = absolute(src, ENV_BPF_PIN_DIR)?.unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh"));
        let services_file = absolute(src, ENV_SERVICES_FILE)?;
        let app = crate::app::Config::from_source(src, &node_name)?;
        Ok(Self { node_name, cgroup, bpf_pin_dir, services_file, app })
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
        let err = Config::from_source(&HashMap::from([(ENV_CGROUP, "/x")])).unwrap_err();
        assert!(err.to_string().starts_with("MESH_NODE_NAME is required"), "{err}");
        let err = Config::from_source(&HashMap::from([(ENV_NODE_NAME, "n1"), (ENV_CGROUP, "relative")])).unwrap_err();
        assert_eq!(err.to_string(), "MESH_CGROUP=\"relative\": must be an absolute path");
    }
}
