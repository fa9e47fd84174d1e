//! A node daemon's `/config_dump` (admin port): what it was given, with where each item came
//! from. Workloads and Services are typed (names resolve against them); policies, routes and
//! telemetry stay JSON and are summarised for tables, so a new field in the daemon never breaks
//! meshctl.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node {node}'s /config_dump is not the expected JSON: {source}")]
    Parse {
        node: String,
        source: serde_json::Error,
    },
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    /// mesh-node's version (`buildVersion`; absent from daemons older than meshctl).
    #[serde(default)]
    pub build_version: Option<String>,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub root_namespace: String,
    #[serde(default)]
    pub config: Config,
    #[serde(default)]
    pub certificates: Vec<Certificate>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Value>,
    #[serde(default)]
    pub peer_authentications: Vec<Value>,
    #[serde(default)]
    pub request_authentications: Vec<Value>,
    #[serde(default)]
    pub routes: Vec<RouteTable>,
    #[serde(default)]
    pub telemetry: Vec<Value>,
    #[serde(default)]
    pub mesh_tracing: Value,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    pub ip: IpAddr,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `HBONE` when meshed, `TCP` when not.
    #[serde(default)]
    pub protocol: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub target_port: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: IpAddr,
    #[serde(default)]
    pub healthy: bool,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub identity: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RouteTable {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub routes: Vec<Value>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Certificate {
    pub identity: String,
    #[serde(default)]
    pub serial: u64,
    #[serde(default)]
    pub not_after_unix: u64,
    #[serde(default)]
    pub refresh_at_unix: u64,
}

pub fn parse(node: &str, body: &str) -> Result<ConfigDump, Error> {
    serde_json::from_str(body).map_err(|source| Error::Parse {
        node: node.to_owned(),
        source,
    })
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A JSON value on one line (for table cells).
pub fn compact(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Where an item came from: `Kind/namespace/name`, plus `#rule` for a route.
pub fn source_of(kind: &str, item: &Value) -> String {
    format!(
        "{kind}/{}/{}",
        str_at(item, "namespace"),
        str_at(item, "name")
    )
}

/// A route's source as the daemon records it: `HTTPRoute/demo/whoami-split#0`.
pub fn route_source(route: &Value) -> String {
    let Some(source) = route.get("source") else {
        return "-".into();
    };
    let mut s = source_of(str_at(source, "kind"), source);
    if let Some(rule) = source.get("rule").and_then(Value::as_u64) {
        let _ = write!(s, "#{rule}");
    }
    if let Some(name) = source.get("rule_name").and_then(Value::as_str) {
        let _ = write!(s, " ({name})");
    }
    s
}

/// A route's matches in short: `prefix / port 80`, `header user-agent ~ .*Firefox.*`, `*` for none.
pub fn route_matches(route: &Value) -> String {
    let Some(matches) = route.get("matches").and_then(Value::as_array) else {
        return "*".into();
    };
    if matches.is_empty() {
        return "*".into();
    }
    let one = |m: &Value| -> String {
        let Some(fields) = m.as_object() else {
            return compact(m);
        };
        let mut parts = Vec::new();
        for (key, value) in fields {
            match (key.as_str(), value) {
                ("path", Value::Object(p)) => {
                    for (how, path) in p {
                        let how = how.strip_prefix("path").unwrap_or(how).to_lowercase();
                        parts.push(format!("{how} {}", compact(path)));
                    }
                }
                ("headers", Value::Array(hs)) => {
                    for h in hs {
                        parts.push(format!(
                            "header {} {}",
                            str_at(h, "name"),
                            compact(&h["value"])
                        ));
                    }
                }
                (_, Value::Array(a)) if a.is_empty() => {}
                (key, value) => parts.push(format!("{key} {}", compact(value))),
            }
        }
        parts.join(" ")
    };
    matches.iter().map(one).collect::<Vec<_>>().join(" | ")
}

/// A route's action in short: `whoami-v1:80 90%, whoami-v2:80 10%`, else its JSON.
pub fn route_action(route: &Value) -> String {
    let action = &route["action"];
    let Some(forward) = action.get("forward").and_then(Value::as_array) else {
        return compact(action);
    };
    forward
        .iter()
        .map(|f| {
            let mut target = str_at(f, "name").to_owned();
            if let Some(subset) = f.get("subset").and_then(Value::as_str) {
                let _ = write!(target, "[{subset}]");
            }
            if let Some(port) = f.get("port").and_then(Value::as_u64) {
                let _ = write!(target, ":{port}");
            }
            match f.get("weight").and_then(Value::as_u64) {
                Some(w) => format!("{target} {w}%"),
                None => target,
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real lab run's `/config_dump` of n1 (`cargo xtask lab up`).
    pub const DUMP: &str = include_str!("../testdata/config_dump_n1.json");

    #[test]
    fn a_real_dump_parses_with_every_section() {
        let d = parse("n1", DUMP).expect("parse");
        assert_eq!(d.trust_domain, "cluster.local");
        let names: Vec<String> = d.config.workloads.iter().map(Workload::key).collect();
        assert!(names.contains(&"demo/client".to_owned()), "{names:?}");
        let whoami = d
            .config
            .services
            .iter()
            .find(|s| s.key() == "demo/whoami")
            .expect("svc");
        assert_eq!(whoami.vips, ["198.19.0.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(whoami.endpoints.len(), 3);
        assert_eq!(d.config.policies.len(), 1);
        assert_eq!(
            source_of("AuthorizationPolicy", &d.config.policies[0]),
            "AuthorizationPolicy/demo/deny-admin-writes"
        );
        assert!(
            d.certificates
                .iter()
                .any(|c| c.identity.ends_with("/sa/client"))
        );
        // Serials above 2^53 survive (u64, not f64).
        assert!(d.certificates.iter().any(|c| c.serial > 1 << 53));
        assert!(parse("n1", "{\"config\": 3}").is_err());
    }

    #[test]
    fn routes_show_their_source_matches_and_action() {
        let d = parse("n1", DUMP).expect("parse");
        let table = d
            .config
            .routes
            .iter()
            .find(|t| t.name == "whoami")
            .expect("whoami routes");
        let route = &table.routes[0];
        assert_eq!(route_source(route), "HTTPRoute/demo/whoami-split#0");
        assert_eq!(route_matches(route), "prefix / port 80");
        assert_eq!(route_action(route), "whoami-v1:80 90%, whoami-v2:80 10%");
        let canary = &d
            .config
            .routes
            .iter()
            .find(|t| t.name == "helloworld")
            .expect("hw")
            .routes;
        assert_eq!(
            route_source(&canary[0]),
            "VirtualService/demo/helloworld#0 (firefox)"
        );
        assert_eq!(
            route_matches(&canary[0]),
            "header user-agent {\"regex\":\".*Firefox.*\"}"
        );
        assert_eq!(route_matches(&canary[1]), "*");
        assert_eq!(route_action(&canary[1]), "helloworld[v1-0] 100%");
    }
}
