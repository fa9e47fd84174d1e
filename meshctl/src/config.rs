//! `meshctl config <node> [section]`: a node daemon's config as tables, each item with where it
//! came from (`Kind/namespace/name`, routes with their rule).

use serde_json::{Map, Value};

use crate::{
    dump::{Config, compact, route_action, route_matches, route_source, source_of},
    output::{Table, section},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Workloads,
    Services,
    Routes,
    /// AuthorizationPolicies, PeerAuthentications, RequestAuthentications.
    Policies,
    Telemetry,
    #[default]
    All,
}

impl Section {
    fn includes(self, other: Self) -> bool {
        self == Self::All || self == other
    }
}

/// The chosen sections as JSON (the dump's own fields, for `-o json|yaml`).
pub fn select(config: &Config, which: Section) -> Value {
    let full = serde_json::to_value(config).unwrap_or_default();
    let keys: &[&str] = match which {
        Section::All => return full,
        Section::Workloads => &["workloads"],
        Section::Services => &["services"],
        Section::Routes => &["routes"],
        Section::Policies => &["policies", "peerAuthentications", "requestAuthentications"],
        Section::Telemetry => &["telemetry", "meshTracing"],
    };
    let picked: Map<String, Value> = keys
        .iter()
        .map(|k| ((*k).to_owned(), full[*k].clone()))
        .collect();
    Value::Object(picked)
}

fn selector(item: &Value) -> String {
    match item.get("selector") {
        Some(Value::Object(labels)) if !labels.is_empty() => labels
            .iter()
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "(namespace)".into(),
    }
}

/// Renders one section of the config as a titled table.
type Render = fn(&Config) -> String;

pub fn render(config: &Config, which: Section) -> String {
    let sections: [(Section, Render); 5] = [
        (Section::Workloads, workloads),
        (Section::Services, services),
        (Section::Routes, routes),
        (Section::Policies, policies),
        (Section::Telemetry, telemetry),
    ];
    let shown = sections.iter().filter(|(s, _)| which.includes(*s));
    shown
        .map(|(_, render)| render(config))
        .collect::<Vec<_>>()
        .join("\n")
}

fn workloads(config: &Config) -> String {
    let mut parts = Vec::new();
    let mut t = Table::new(&[
        "WORKLOAD",
        "IP",
        "NODE",
        "SERVICE ACCOUNT",
        "PROTOCOL",
        "LABELS",
        "SOURCE",
    ]);
    for w in &config.workloads {
        let labels = w
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        t.row(vec![
            w.key(),
            w.ip.to_string(),
            w.node.clone(),
            w.service_account.clone(),
            w.protocol.clone(),
            labels,
            format!("Workload/{}", w.key()),
        ]);
    }
    parts.push(section("WORKLOADS", &t));
    parts.join("\n")
}

fn services(config: &Config) -> String {
    let mut parts = Vec::new();
    let mut t = Table::new(&[
        "SERVICE",
        "VIPS",
        "PORTS",
        "ENDPOINTS (healthy/all)",
        "SOURCE",
    ]);
    for s in &config.services {
        let vips = s
            .vips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let ports = s
            .ports
            .iter()
            .map(|p| format!("{}→{}", p.port, p.target_port))
            .collect::<Vec<_>>()
            .join(",");
        let healthy = s.endpoints.iter().filter(|e| e.healthy).count();
        let endpoints = format!(
            "{healthy}/{}: {}",
            s.endpoints.len(),
            s.endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        t.row(vec![
            s.key(),
            vips,
            ports,
            endpoints,
            format!("Service/{}", s.key()),
        ]);
    }
    parts.push(section("SERVICES", &t));
    parts.join("\n")
}

fn routes(config: &Config) -> String {
    let mut parts = Vec::new();
    let mut t = Table::new(&["SERVICE", "MATCH", "ACTION", "SOURCE"]);
    for table in &config.routes {
        for r in &table.routes {
            t.row(vec![
                format!("{}/{}", table.namespace, table.name),
                route_matches(r),
                route_action(r),
                route_source(r),
            ]);
        }
    }
    parts.push(section(
        "ROUTES (explicit route tables; a Service without one is routed to its endpoints)",
        &t,
    ));
    parts.join("\n")
}

fn policies(config: &Config) -> String {
    let mut parts = Vec::new();
    let mut t = Table::new(&["KIND", "NAME", "SELECTOR", "ACTION/MODE", "RULES", "SOURCE"]);
    for p in &config.policies {
        let mut action = compact(&p["action"]);
        if p["dryRun"] == Value::Bool(true) {
            action.push_str(" (dry run)");
        }
        let rules = p["rules"].as_array().map_or(0, Vec::len);
        t.row(vec![
            "AuthorizationPolicy".into(),
            name(p),
            selector(p),
            action,
            rules.to_string(),
            source_of("AuthorizationPolicy", p),
        ]);
    }
    for p in &config.peer_authentications {
        let mode = p.get("mode").map_or_else(|| compact(&p["mtls"]), compact);
        t.row(vec![
            "PeerAuthentication".into(),
            name(p),
            selector(p),
            mode,
            "-".into(),
            source_of("PeerAuthentication", p),
        ]);
    }
    for p in &config.request_authentications {
        let issuers = p["jwtRules"].as_array().map_or(0, Vec::len);
        t.row(vec![
            "RequestAuthentication".into(),
            name(p),
            selector(p),
            "JWT".into(),
            format!("{issuers} issuers"),
            source_of("RequestAuthentication", p),
        ]);
    }
    parts.push(section("POLICIES", &t));
    parts.join("\n")
}

fn telemetry(config: &Config) -> String {
    let mut parts = Vec::new();
    let mut t = Table::new(&[
        "TELEMETRY",
        "SELECTOR",
        "TRACING",
        "ACCESS LOGGING",
        "SOURCE",
    ]);
    for tel in &config.telemetry {
        let tracing = tel["tracing"].as_array().into_iter().flatten().map(|tr| {
            format!(
                "{} {}%",
                compact(&tr["provider"]),
                compact(&tr["samplingPercent"])
            )
        });
        let tracing = tracing.collect::<Vec<_>>().join(", ");
        t.row(vec![
            name(tel),
            selector(tel),
            or_default(tracing),
            compact(&tel["accessLogging"]),
            source_of("Telemetry", tel),
        ]);
    }
    let mut providers = Table::new(&["PROVIDER", "SERVICE", "PORT", "PROTOCOL", "DEFAULT"]);
    let default = compact(&config.mesh_tracing["defaultProvider"]);
    for (n, p) in config.mesh_tracing["providers"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let protocol = match &p["protocol"] {
            Value::Object(o) => o.keys().cloned().collect::<Vec<_>>().join(","),
            other => compact(other),
        };
        providers.row(vec![
            n.clone(),
            compact(&p["service"]),
            compact(&p["port"]),
            protocol,
            if *n == default {
                "yes".into()
            } else {
                String::new()
            },
        ]);
    }
    parts.push(section("TELEMETRY", &t));
    parts.push(section(
        "TRACING PROVIDERS (mesh config, ConfigMap mesh-config)",
        &providers,
    ));
    parts.join("\n")
}

fn name(item: &Value) -> String {
    format!(
        "{}/{}",
        item["namespace"].as_str().unwrap_or_default(),
        item["name"].as_str().unwrap_or_default()
    )
}

fn or_default(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::dump::parse("n1", include_str!("../testdata/config_dump_n1.json"))
            .expect("dump")
            .config
    }

    #[test]
    fn each_section_lists_items_with_their_source() {
        let c = config();
        let services = render(&c, Section::Services);
        assert!(services.starts_with("SERVICES\n"), "{services}");
        let whoami = services
            .lines()
            .find(|l| l.starts_with("demo/whoami "))
            .expect("demo/whoami row");
        for part in ["198.19.0.10", "80→8081", "3/3:", "Service/demo/whoami"] {
            assert!(whoami.contains(part), "{part} not in {whoami}");
        }
        assert!(!services.contains("WORKLOADS"));
        let routes = render(&c, Section::Routes);
        assert!(routes.contains("HTTPRoute/demo/whoami-split#0"), "{routes}");
        let policies = render(&c, Section::Policies);
        assert!(
            policies.contains("AuthorizationPolicy  demo/deny-admin-writes  app=whoami  DENY"),
            "{policies}"
        );
        let workloads = render(&c, Section::Workloads);
        assert!(workloads.contains("demo/legacy"), "{workloads}");
        let telemetry = render(&c, Section::Telemetry);
        assert!(
            telemetry.contains("mesh-system/mesh-default  (namespace)  zipkin 100.0%"),
            "{telemetry}"
        );
        assert!(telemetry.contains("zipkin    198.18.1.13"), "{telemetry}");
        let all = render(&c, Section::All);
        for title in ["WORKLOADS", "SERVICES", "ROUTES", "POLICIES", "TELEMETRY"] {
            assert!(all.contains(title), "{title}");
        }
    }

    #[test]
    fn json_selects_the_dump_s_own_fields() {
        let c = config();
        let v = select(&c, Section::Policies);
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(
            keys,
            ["peerAuthentications", "policies", "requestAuthentications"]
        );
        assert_eq!(v["policies"][0]["name"], "deny-admin-writes");
        assert!(select(&c, Section::All)["workloads"].is_array());
    }
}
