//! `meshctl explain <source pod> <destination>[:port]`: why a connection (or an HTTP request)
//! would be allowed or denied, step by step, as the node daemons decide it.
//!
//! meshctl resolves names to addresses from the config dumps, then asks the source pod's node
//! (`GET /debug/explain?src=..&dst=..`, stage `source`) and, when that stage lets the connection
//! through, the node the source stage names in `next` (`stage=destination`, with the source's
//! identity). The verdict logic is the daemons' own; meshctl only resolves and prints.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    dump::{Service, Workload},
    http::encode_query_value,
    output::{Table, or_dash},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no workload named or addressed {0:?} (try `meshctl config <node> workloads`)")]
    UnknownSource(String),
    #[error("{name:?} names several workloads: {matches}; say namespace/name")]
    AmbiguousSource { name: String, matches: String },
    #[error("no Service {0:?} (as name.namespace; try `meshctl config <node> services`)")]
    UnknownService(String),
    #[error("{what} has ports {ports}: say which, as {what}:<port>")]
    PortNeeded { what: String, ports: String },
    #[error(
        "{0:?} is not a destination: give a Service (name.namespace), a VIP or a pod IP, with :port"
    )]
    BadDestination(String),
    #[error("header {0:?} is not `name: value`")]
    BadHeader(String),
    #[error("node {node}'s /debug/explain answered something that is not an explanation: {source}")]
    Parse {
        node: String,
        source: serde_json::Error,
    },
}

/// One node's explanation (the daemons' JSON document).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub node: String,
    pub stage: String,
    pub steps: Vec<Step>,
    /// `allowed` or `denied`.
    pub verdict: String,
    #[serde(default)]
    pub next: Option<Next>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Step {
    /// `kernel` or `daemon`.
    #[serde(rename = "where")]
    pub place: String,
    pub check: String,
    /// `allow`, `deny` or `info`.
    pub verdict: String,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub rule: Option<String>,
}

/// Where the source stage sends the connection next.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Next {
    pub node: String,
    pub dst: String,
    /// The source's SPIFFE identity; absent when it arrives in plaintext (not meshed).
    #[serde(default)]
    pub identity: Option<String>,
}

pub fn parse(node: &str, body: &str) -> Result<Explanation, Error> {
    serde_json::from_str(body).map_err(|source| Error::Parse {
        node: node.to_owned(),
        source,
    })
}

/// Both stages, as `-o json` prints them.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub source: Explanation,
    pub destination: Option<Explanation>,
}

impl Report {
    /// The final verdict: denied when either stage denies.
    pub fn verdict(&self) -> &str {
        let stages = std::iter::once(&self.source).chain(&self.destination);
        if stages.clone().any(|e| e.verdict != "allowed") {
            "denied"
        } else {
            "allowed"
        }
    }
}

/// The source: its address and the node it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    pub node: String,
    pub name: String,
}

/// Finds the source pod by IP, by `namespace/name`, or by a unique name; `lab_ip` is the
/// address a lab pod name (`n1p1`) stands for.
pub fn resolve_source(
    arg: &str,
    workloads: &[Workload],
    lab_ip: Option<IpAddr>,
) -> Result<Source, Error> {
    let found = |w: &Workload| Source {
        ip: w.ip,
        node: w.node.clone(),
        name: w.key(),
    };
    let ip = arg.parse::<IpAddr>().ok().or(lab_ip);
    if let Some(ip) = ip {
        return workloads
            .iter()
            .find(|w| w.ip == ip)
            .map(found)
            .ok_or_else(|| Error::UnknownSource(arg.to_owned()));
    }
    let matches: Vec<&Workload> = if arg.contains('/') {
        workloads.iter().filter(|w| w.key() == arg).collect()
    } else {
        workloads.iter().filter(|w| w.name == arg).collect()
    };
    match matches.as_slice() {
        [w] => Ok(found(w)),
        [] => Err(Error::UnknownSource(arg.to_owned())),
        many => Err(Error::AmbiguousSource {
            name: arg.to_owned(),
            matches: many.iter().map(|w| w.key()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The destination: an address with a port, and the `Host` an HTTP client would send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: SocketAddr,
    pub host: String,
    /// `Service demo/whoami` or `pod demo/whoami-1` or `address`.
    pub what: String,
}

/// A Service as `name.namespace` (a `.svc.<domain>` tail is allowed), a Service VIP, or a pod IP;
/// `:port` is needed unless the Service has one port.
pub fn resolve_destination(
    arg: &str,
    services: &[Service],
    workloads: &[Workload],
) -> Result<Destination, Error> {
    let (host, port) = split_port(arg).ok_or_else(|| Error::BadDestination(arg.to_owned()))?;
    let service_port = |s: &Service| -> Result<u16, Error> {
        if let Some(p) = port {
            return Ok(p);
        }
        match s.ports.as_slice() {
            [only] => Ok(only.port),
            ports => Err(Error::PortNeeded {
                what: arg.to_owned(),
                ports: ports
                    .iter()
                    .map(|p| p.port.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        if let Some(s) = services.iter().find(|s| s.vips.contains(&ip)) {
            let port = service_port(s)?;
            return Ok(Destination {
                addr: SocketAddr::new(ip, port),
                host: host.to_owned(),
                what: format!("Service {}", s.key()),
            });
        }
        let port = port.ok_or_else(|| Error::PortNeeded {
            what: arg.to_owned(),
            ports: "any".into(),
        })?;
        let what = workloads
            .iter()
            .find(|w| w.ip == ip)
            .map_or_else(|| "address".to_owned(), |w| format!("pod {}", w.key()));
        return Ok(Destination {
            addr: SocketAddr::new(ip, port),
            host: host.to_owned(),
            what,
        });
    }
    let mut labels = host.split('.');
    let (Some(name), Some(namespace)) = (labels.next(), labels.next()) else {
        return Err(Error::BadDestination(arg.to_owned()));
    };
    let s = services
        .iter()
        .find(|s| s.name == name && s.namespace == namespace)
        .ok_or_else(|| Error::UnknownService(host.to_owned()))?;
    let vip = *s
        .vips
        .first()
        .ok_or_else(|| Error::UnknownService(host.to_owned()))?;
    Ok(Destination {
        addr: SocketAddr::new(vip, service_port(s)?),
        host: host.to_owned(),
        what: format!("Service {}", s.key()),
    })
}

/// `host[:port]`, `[v6]:port`, or a bare IPv6 address.
fn split_port(arg: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = arg.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        let port = tail.strip_prefix(':').map(str::parse).transpose().ok()?;
        return Some((host, port));
    }
    if arg.parse::<IpAddr>().is_ok() {
        return Some((arg, None));
    }
    match arg.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((arg, None)),
    }
}

/// The HTTP request to explain (`--http METHOD PATH`, `-H 'name: value'`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub host: String,
    /// `name:value`, name lowercased.
    pub headers: Vec<String>,
}

impl HttpRequest {
    /// `host` is used unless a `Host` header is given.
    pub fn new(method: &str, path: &str, host: &str, headers: &[String]) -> Result<Self, Error> {
        let mut r = Self {
            method: method.to_uppercase(),
            path: path.to_owned(),
            host: host.to_owned(),
            headers: Vec::new(),
        };
        for h in headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| Error::BadHeader(h.clone()))?;
            let (name, value) = (name.trim().to_lowercase(), value.trim());
            if name.is_empty() {
                return Err(Error::BadHeader(h.clone()));
            }
            if name == "host" {
                value.clone_into(&mut r.host);
            } else {
                r.headers.push(format!("{name}:{value}"));
            }
        }
        Ok(r)
    }

    fn query(&self) -> String {
        let mut q = format!(
            "&method={}&path={}&host={}",
            encode_query_value(&self.method),
            encode_query_value(&self.path),
            encode_query_value(&self.host)
        );
        for h in &self.headers {
            q.push_str("&header=");
            q.push_str(&encode_query_value(h));
        }
        q
    }
}

/// The source node's request: `/debug/explain?src=<ip>&dst=<ip:port>[&method..]`.
pub fn source_path(src: IpAddr, dst: SocketAddr, http: Option<&HttpRequest>) -> String {
    let mut p = format!(
        "/debug/explain?src={}&dst={}",
        encode_query_value(&src.to_string()),
        encode_query_value(&dst.to_string())
    );
    p.push_str(&http.map(HttpRequest::query).unwrap_or_default());
    p
}

/// The destination node's request, from the source stage's `next` (no identity: plaintext).
pub fn destination_path(src: IpAddr, next: &Next, http: Option<&HttpRequest>) -> String {
    let mut p = format!(
        "/debug/explain?stage=destination&src={}&dst={}",
        encode_query_value(&src.to_string()),
        encode_query_value(&next.dst),
    );
    if let Some(identity) = &next.identity {
        let _ = write!(p, "&identity={}", encode_query_value(identity));
    }
    p.push_str(&http.map(HttpRequest::query).unwrap_or_default());
    p
}

pub fn render(r: &Report) -> String {
    let mut t = Table::new(&[
        "NODE", "STAGE", "WHERE", "CHECK", "VERDICT", "RULE", "DETAIL",
    ]);
    for e in std::iter::once(&r.source).chain(&r.destination) {
        for s in &e.steps {
            let verdict = if s.verdict == "deny" {
                "DENY".to_owned()
            } else {
                s.verdict.clone()
            };
            t.row(vec![
                e.node.clone(),
                e.stage.clone(),
                s.place.clone(),
                s.check.clone(),
                verdict,
                or_dash(s.rule.as_ref()),
                s.detail.clone(),
            ]);
        }
    }
    let mut out = t.render();
    if let Some(next) = r.source.next.as_ref().filter(|_| r.destination.is_none()) {
        let _ = writeln!(
            out,
            "(the destination stage on {} was not asked)",
            next.node
        );
    }
    let _ = write!(out, "\nverdict: {}\n", r.verdict().to_uppercase());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump;

    /// Recorded against the endpoint's contract (the shapes the brief fixes), not yet a live run.
    const SOURCE: &str = include_str!("../testdata/explain_source.json");
    const DESTINATION: &str = include_str!("../testdata/explain_destination.json");

    fn config() -> dump::Config {
        dump::parse("n1", include_str!("../testdata/config_dump_n1.json"))
            .expect("dump")
            .config
    }

    #[test]
    fn sources_by_lab_name_namespace_name_name_or_ip() {
        let c = config();
        let client = Source {
            ip: "198.18.1.11".parse().expect("ip"),
            node: "n1".into(),
            name: "demo/client".into(),
        };
        assert_eq!(
            resolve_source("n1p1", &c.workloads, Some(client.ip)).expect("lab name"),
            client
        );
        assert_eq!(
            resolve_source("demo/client", &c.workloads, None).expect("ns/name"),
            client
        );
        assert_eq!(
            resolve_source("client", &c.workloads, None).expect("name"),
            client
        );
        assert_eq!(
            resolve_source("198.18.1.11", &c.workloads, None).expect("ip"),
            client
        );
        assert_eq!(
            resolve_source("whoami-3", &c.workloads, None)
                .expect("n2")
                .node,
            "n2"
        );
        assert!(matches!(
            resolve_source("nobody", &c.workloads, None),
            Err(Error::UnknownSource(_))
        ));
        assert!(matches!(
            resolve_source("198.18.9.9", &c.workloads, None),
            Err(Error::UnknownSource(_))
        ));
        let mut twice = c.workloads.clone();
        let mut other = twice[0].clone();
        other.namespace = "prod".into();
        twice.push(other);
        assert!(matches!(
            resolve_source("client", &twice, None),
            Err(Error::AmbiguousSource { .. })
        ));
    }

    #[test]
    fn destinations_by_service_vip_or_pod_ip() {
        let c = config();
        let (s, w) = (&c.services, &c.workloads);
        let d = resolve_destination("whoami.demo:80", s, w).expect("service");
        assert_eq!(
            (d.addr.to_string(), d.host.as_str(), d.what.as_str()),
            (
                "198.19.0.10:80".into(),
                "whoami.demo",
                "Service demo/whoami"
            )
        );
        // One port: no need to say it.
        assert_eq!(
            resolve_destination("helloworld.demo", s, w)
                .expect("one port")
                .addr
                .to_string(),
            "198.19.0.20:80"
        );
        assert_eq!(
            resolve_destination("whoami.demo.svc.cluster.local:7000", s, w)
                .expect("fqdn")
                .addr
                .port(),
            7000
        );
        assert!(matches!(
            resolve_destination("whoami.demo", s, w),
            Err(Error::PortNeeded { .. })
        ));
        assert_eq!(
            resolve_destination("198.19.0.10:9090", s, w)
                .expect("vip")
                .what,
            "Service demo/whoami"
        );
        let pod = resolve_destination("198.18.2.11:8081", s, w).expect("pod ip");
        assert_eq!(pod.what, "pod demo/whoami-2");
        assert!(matches!(
            resolve_destination("198.18.2.11", s, w),
            Err(Error::PortNeeded { .. })
        ));
        assert!(matches!(
            resolve_destination("nope.demo:80", s, w),
            Err(Error::UnknownService(_))
        ));
        assert!(matches!(
            resolve_destination("whoami", s, w),
            Err(Error::BadDestination(_))
        ));
        assert!(matches!(
            resolve_destination("whoami.demo:http", s, w),
            Err(Error::BadDestination(_))
        ));
        assert_eq!(split_port("[fd6d::1]:80"), Some(("fd6d::1", Some(80))));
        assert_eq!(split_port("fd6d::1"), Some(("fd6d::1", None)));
    }

    #[test]
    fn queries_carry_the_request_url_encoded() {
        let http = HttpRequest::new(
            "post",
            "/admin/users?x=1",
            "whoami.demo",
            &["X-User: alice".into(), "Host: example.com".into()],
        )
        .expect("request");
        assert_eq!(http.host, "example.com");
        let src = "198.18.1.11".parse().expect("ip");
        assert_eq!(
            source_path(src, "198.19.0.10:80".parse().expect("dst"), Some(&http)),
            "/debug/explain?src=198.18.1.11&dst=198.19.0.10%3A80&method=POST&path=%2Fadmin%2Fusers%3Fx%3D1&host=example.com&header=x-user%3Aalice"
        );
        let next = Next {
            node: "n2".into(),
            dst: "198.18.2.11:8081".into(),
            identity: Some("spiffe://cluster.local/ns/demo/sa/client".into()),
        };
        assert_eq!(
            destination_path(src, &next, None),
            "/debug/explain?stage=destination&src=198.18.1.11&dst=198.18.2.11%3A8081&identity=spiffe%3A%2F%2Fcluster.local%2Fns%2Fdemo%2Fsa%2Fclient"
        );
        let plaintext = Next {
            identity: None,
            ..next
        };
        assert_eq!(
            destination_path(src, &plaintext, None),
            "/debug/explain?stage=destination&src=198.18.1.11&dst=198.18.2.11%3A8081"
        );
        assert!(matches!(
            HttpRequest::new("GET", "/", "h", &["no colon".into()]),
            Err(Error::BadHeader(_))
        ));
    }

    #[test]
    fn both_stages_render_as_steps_and_a_verdict() {
        let source = parse("n1", SOURCE).expect("source");
        let destination = parse("n2", DESTINATION).expect("destination");
        assert_eq!(source.next.as_ref().expect("next").node, "n2");
        let report = Report {
            source,
            destination: Some(destination),
        };
        assert_eq!(report.verdict(), "denied");
        let text = render(&report);
        assert!(text.contains("n1    source       kernel"), "{text}");
        assert!(
            text.contains("DENY     AuthorizationPolicy demo/deny-admin-writes"),
            "{text}"
        );
        assert!(text.ends_with("verdict: DENIED\n"), "{text}");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["destination"]["steps"][0]["where"], "daemon");
        assert!(parse("n1", "{\"steps\": 1}").is_err());
    }
}
