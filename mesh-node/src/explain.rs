//! `GET /debug/explain` on the admin port: why a connection (or request) from a pod to a
//! destination ends as it does, step by step, from this node's own state and with the same
//! modules that decide it for real traffic: capture and Service lookup as the kernel tables are
//! built from them, the route table match, the candidate endpoints, the transport, and at the
//! destination the STRICT guard, the authorization evaluator (naming the policy that decided),
//! end-user authentication and rate limits. `meshctl explain` asks the source pod's node
//! (`stage=source`), then the destination's (`stage=destination`) for the endpoint it names.
//!
//! Balancing is random or least-request per connection or request: where several endpoints are
//! possible, the step lists them and the destination checks are explained for the first healthy
//! one (the answer says so).

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr as _,
};

use http::HeaderMap;
use mesh_l7::route::{
    Action, Selected,
    matching::{Client, RequestView},
};
use serde::Serialize;

use crate::{
    authn, authz,
    authz::{Decision, DenyReason, Mode},
    identity::Identity,
    state::{Protocol, Service, ServicePort, State, Workload},
};

/// Which side of the connection a node explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Source,
    Destination,
}

/// The request, when asking about HTTP.
#[derive(Clone, Debug, Default)]
pub struct HttpQuery {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: HeaderMap,
}

/// A parsed `/debug/explain` query.
#[derive(Clone, Debug)]
pub struct Query {
    pub stage: Stage,
    pub src: IpAddr,
    pub dst: SocketAddr,
    /// The caller's SPIFFE identity (destination stage; absent: plaintext).
    pub identity: Option<String>,
    pub http: Option<HttpQuery>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    #[serde(rename = "where")]
    pub at: &'static str,
    pub check: &'static str,
    /// `allow`, `deny` or `info`.
    pub verdict: &'static str,
    pub detail: String,
    /// The resource that decided, when one did.
    pub rule: Option<String>,
}

/// Where the destination side should be asked, and as whom the caller arrives there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Next {
    pub node: String,
    pub dst: SocketAddr,
    pub identity: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub node: String,
    pub stage: Stage,
    pub steps: Vec<Step>,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    pub next: Option<Next>,
}

fn step(at: &'static str, check: &'static str, verdict: &'static str, detail: impl Into<String>, rule: Option<String>) -> Step {
    Step { at, check, verdict, detail: detail.into(), rule }
}

/// Parses `src=..&dst=..[&stage=..&identity=..&method=..&path=..&host=..&header=name:value]`
/// (values percent-encoded).
pub fn parse_query(q: &str) -> Result<Query, String> {
    let mut src = None;
    let mut dst = None;
    let mut stage = Stage::Source;
    let mut identity = None;
    let mut method = None;
    let mut path = None;
    let mut host = None;
    let mut headers = HeaderMap::new();
    for kv in q.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned();
        match k {
            "src" => src = Some(v.parse::<IpAddr>().map_err(|_| format!("src={v:?} is not an IP address"))?),
            "dst" => dst = Some(v.parse::<SocketAddr>().map_err(|_| format!("dst={v:?} is not <ip>:<port>"))?),
            "stage" => {
                stage = match v.as_str() {
                    "source" => Stage::Source,
                    "destination" => Stage::Destination,
                    _ => return Err(format!("stage={v:?}: expected source or destination")),
                };
            }
            "identity" if !v.is_empty() => identity = Some(v),
            "identity" => {}
            "method" => method = Some(v),
            "path" => path = Some(v),
            "host" => host = Some(v),
            "header" => {
                let (name, value) = v.split_once(':').ok_or_else(|| format!("header={v:?}: expected name:value"))?;
                let name = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
                let value = http::HeaderValue::from_str(value.trim()).map_err(|_| format!("{value:?} is not a header value"))?;
                headers.append(name, value);
            }
            other => return Err(format!("unknown parameter {other:?} (src, dst, stage, identity, method, path, host, header)")),
        }
    }
    let http = (method.is_some() || path.is_some()).then(|| HttpQuery {
        method: method.unwrap_or_else(|| "GET".into()),
        path: path.unwrap_or_else(|| "/".into()),
        host,
        headers,
    });
    Ok(Query { stage, src: src.ok_or("src= is required")?, dst: dst.ok_or("dst= is required")?, identity, http })
}

/// Explains `q` on node `node` from `state`.
pub fn explain(state: &State, node: &str, q: &Query) -> Explanation {
    let mut steps = Vec::new();
    let (verdict, next) = match q.stage {
        Stage::Source => source(state, node, q, &mut steps),
        Stage::Destination => (destination(state, node, q, &mut steps), None),
    };
    Explanation { node: node.to_owned(), stage: q.stage, steps, verdict: if verdict { "allowed" } else { "denied" }, next }
}

fn workload_name(w: &Workload) -> String {
    format!("{}/{}", w.namespace, w.name)
}

/// The source side; returns whether it lets the connection go on, and where to ask next.
fn source(state: &State, node: &str, q: &Query, steps: &mut Vec<Step>) -> (bool, Option<Next>) {
    let src = state.workload(q.src);
    let captured = match src {
        Some(w) if *w.node != *node => {
            steps.push(step("kernel", "capture", "info", format!("{} runs on node {}: ask that node", workload_name(w), w.node), None));
            return (true, None);
        }
        Some(w) if w.protocol == Protocol::Hbone => {
            steps.push(step("kernel", "capture", "info", format!("{} is meshed: its connect() is captured into this node's daemon", workload_name(w)), None));
            true
        }
        Some(w) => {
            steps.push(step("kernel", "capture", "info", format!("{} is not meshed: its connections go out as they are", workload_name(w)), None));
            false
        }
        None => {
            steps.push(step("kernel", "capture", "info", format!("{} is not a workload of this node: not captured", q.src), None));
            false
        }
    };
    let identity = src.filter(|_| captured).map(|w| state.identity(w).to_string());
    let Some((svc, port)) = state.vip(q.dst) else {
        return direct(state, q, captured, identity, steps);
    };
    let l7 = port.app_protocol().is_http();
    let mode = if l7 { "HTTP (L7: routed per request)" } else { "TCP (L4)" };
    steps.push(step("kernel", "service", "info", format!("{} is Service {}/{} port {} ({mode})", q.dst, svc.namespace, svc.name, port.port), Some(format!("Service {}/{}", svc.namespace, svc.name))));
    // Which Service's endpoints: the route's backend on HTTP ports (meshed clients), else this one.
    let (backend, backend_port) = if captured && l7 {
        match route(state, svc, port, src, q, steps) {
            Some(b) => b,
            None => return (false, None),
        }
    } else {
        (svc, port)
    };
    let mut endpoints: Vec<_> = backend.endpoints.iter().collect();
    endpoints.sort_by_key(|e| (!e.healthy, e.address));
    let list: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{}:{}{}", e.address, backend.endpoint_port(backend_port, e), if e.healthy { "" } else { " (unhealthy)" }))
        .collect();
    let who = if captured { "the daemon" } else { "the kernel, at connect()" };
    let Some(first) = endpoints.first().filter(|e| e.healthy) else {
        steps.push(step(if captured { "daemon" } else { "kernel" }, "backend", "deny", format!("Service {}/{} has no healthy endpoint: the connection fails", backend.namespace, backend.name), None));
        return (false, None);
    };
    steps.push(step(
        if captured { "daemon" } else { "kernel" },
        "backend",
        "info",
        format!("{who} picks one of {} endpoint(s): {}; explained below for {}", list.len(), list.join(", "), list[0]),
        None,
    ));
    let dst = SocketAddr::new(first.address, backend.endpoint_port(backend_port, first));
    let transport = if captured && first.meshed {
        format!("HBONE (mTLS) to node {}, expecting {}", if first.node.is_empty() { "?" } else { &*first.node }, first.identity.as_deref().unwrap_or("?"))
    } else if captured {
        "plaintext TCP from the daemon (the endpoint is not meshed)".to_owned()
    } else {
        "plaintext TCP from the pod".to_owned()
    };
    steps.push(step("daemon", "transport", "info", transport, None));
    let node_of = state.workload(first.address).map(|w| w.node.to_string()).or_else(|| (!first.node.is_empty()).then(|| first.node.to_string()));
    let next = node_of.map(|n| Next { node: n, dst, identity: identity.filter(|_| first.meshed) });
    (true, next)
}

/// The route an HTTP request takes at the source, and its first weighted backend Service.
fn route<'s>(state: &'s State, svc: &Service, port: &'s ServicePort, src: Option<&Workload>, q: &Query, steps: &mut Vec<Step>) -> Option<(&'s Service, &'s ServicePort)> {
    let table = state.route_table(&svc.namespace, &svc.name);
    let empty = HttpQuery::default();
    let http = q.http.as_ref().unwrap_or(&empty);
    let (path, query) = http.path.split_once('?').map_or((http.path.as_str(), None), |(p, q)| (p, Some(q)));
    let view = RequestView {
        method: if q.http.is_some() { &http.method } else { "GET" },
        path: if q.http.is_some() { path } else { "/" },
        query,
        headers: &http.headers,
        port: port.port,
        client: Client { namespace: src.map(|w| &*w.namespace), labels: src.map(|w| &*w.labels) },
    };
    let Some(selected) = Selected::find(&table, &view) else {
        steps.push(step("daemon", "route", "deny", format!("no route of {}/{} matches: 404 (NR)", svc.namespace, svc.name), None));
        return None;
    };
    let r = selected.route();
    let source = format!("{}/{}/{} rule {}", r.source.kind.as_str(), r.source.namespace, r.source.name, r.source.rule);
    let asked = if q.http.is_some() { format!("{} {}", view.method, http.path) } else { "a request (none given: GET /)".to_owned() };
    match &r.action {
        Action::Forward(backends) => {
            let split: Vec<String> = backends.iter().map(|b| format!("{}/{}{} weight {}", b.namespace, b.name, b.subset.as_ref().map(|s| format!(" subset {s}")).unwrap_or_default(), b.weight)).collect();
            steps.push(step("daemon", "route", "allow", format!("{asked} matches; forwarded to {}", split.join(", ")), Some(source)));
            let b = backends.iter().find(|b| b.weight > 0).or_else(|| backends.first())?;
            let backend = state.service(&b.namespace, &b.name)?;
            let want = b.port.unwrap_or(port.port);
            let bport = backend.ports.iter().find(|p| p.port == want)?;
            Some((backend, bport))
        }
        Action::Redirect(_) => {
            steps.push(step("daemon", "route", "info", format!("{asked} matches a redirect: answered by the daemon"), Some(source)));
            None
        }
        Action::Respond { status, .. } => {
            steps.push(step("daemon", "route", "deny", format!("{asked} matches; answered {status} by the daemon"), Some(source)));
            None
        }
    }
}

/// A destination that is not a Service VIP: a pod, or outside the mesh.
fn direct(state: &State, q: &Query, captured: bool, identity: Option<String>, steps: &mut Vec<Step>) -> (bool, Option<Next>) {
    match state.workload(q.dst.ip()) {
        Some(w) => {
            let meshed = w.protocol == Protocol::Hbone;
            let how = match (captured, meshed) {
                (true, true) => format!("HBONE (mTLS) to node {}, expecting {}", w.node, state.identity(w)),
                (true, false) => "plaintext TCP from the daemon (the pod is not meshed)".to_owned(),
                (false, _) => "plaintext TCP from the pod".to_owned(),
            };
            steps.push(step("kernel", "service", "info", format!("{} is pod {} (not a Service VIP: no routing, no balancing)", q.dst, workload_name(w)), None));
            steps.push(step("daemon", "transport", "info", how, None));
            (true, Some(Next { node: w.node.to_string(), dst: q.dst, identity: identity.filter(|_| meshed) }))
        }
        None => {
            steps.push(step("kernel", "service", "info", format!("{} is neither a Service VIP nor a workload: passed through as addressed", q.dst), None));
            (true, None)
        }
    }
}

/// The destination side, for the local workload at `q.dst`.
fn destination(state: &State, node: &str, q: &Query, steps: &mut Vec<Step>) -> bool {
    let Some(w) = state.workload(q.dst.ip()).filter(|w| *w.node == *node) else {
        steps.push(step("daemon", "destination", "info", format!("{} is not a workload of node {node}", q.dst.ip()), None));
        return true;
    };
    let caller = q.identity.as_deref().and_then(|i| Identity::from_str(i).ok());
    let mode = authz::mode_for(&state.peer_authentications, &state.root_namespace, w);
    let pa = |m: &str| Some(format!("PeerAuthentication mode {m} for {}", workload_name(w)));
    match (mode, &caller) {
        (Mode::Strict, None) => {
            steps.push(step("kernel", "strict", "deny", format!("{} requires mTLS (STRICT): a plaintext connection is refused by the kernel guard", workload_name(w)), pa("STRICT")));
            return false;
        }
        (Mode::Strict, Some(id)) => steps.push(step("daemon", "peer-authentication", "allow", format!("mTLS from {id} (STRICT)"), pa("STRICT"))),
        (_, Some(id)) => steps.push(step("daemon", "peer-authentication", "allow", format!("mTLS from {id}"), pa("PERMISSIVE"))),
        (_, None) => {
            let how = "plaintext for a meshed pod from outside this node is handed to the daemon's plaintext listener (routing rule 15011, sk_lookup); from a pod on the same bridge it reaches the pod directly";
            steps.push(step("kernel", "steer", "info", how, None));
            steps.push(step("daemon", "peer-authentication", "info", "plaintext accepted (PERMISSIVE); the caller has no identity", pa("PERMISSIVE")));
        }
    }
    let app_http = state.app_protocol_at(q.dst).is_http();
    // On an HTTP port every request is authorized on its own: without one given, `GET /` (as the
    // source side assumes), never the connection's L4 view, which real traffic never gets here.
    let assumed = HttpQuery { method: "GET".into(), path: "/".into(), ..HttpQuery::default() };
    let http = app_http.then(|| q.http.as_ref().unwrap_or(&assumed)).map(|h| authz::HttpRequest {
        method: &h.method,
        path: h.path.split('?').next().unwrap_or("/"),
        host: h.host.as_deref(),
        headers: &h.headers,
        auth: None,
    });
    if app_http && q.http.is_some() {
        let providers = authn::providers_for(&state.request_authn, &state.root_namespace, w);
        if !providers.is_empty() {
            let issuers: Vec<&str> = providers.iter().map(|p| p.issuer.as_str()).collect();
            steps.push(step("daemon", "authentication", "info", format!("a token, if present, must be valid for {issuers:?} (401 otherwise); explained here without one"), None));
        }
    }
    let conn = authz::Conn { src_identity: caller.as_ref(), src_ip: q.src, dst: w, dst_port: q.dst.port(), http };
    let verdict = authz::evaluate(&state.policies, &state.root_namespace, &conn);
    let what = if conn.http.is_some() { "the request" } else { "the connection" };
    let allowed = match verdict.decision {
        Decision::Allow => {
            let (detail, rule) = match &verdict.allowed_by {
                Some((ns, name)) => (format!("{what} matches ALLOW policy {ns}/{name}"), Some(format!("AuthorizationPolicy {ns}/{name}"))),
                None => (format!("no ALLOW policy applies to {}, and no DENY matches: allowed", workload_name(w)), None),
            };
            steps.push(step("daemon", "authorization", "allow", detail, rule));
            true
        }
        Decision::Deny(DenyReason::DenyPolicy { namespace, name }) => {
            let how = if conn.http.is_some() { "403 (RBAC: access denied)" } else { "connection closed" };
            steps.push(step("daemon", "authorization", "deny", format!("{what} matches DENY policy {namespace}/{name}: {how}"), Some(format!("AuthorizationPolicy {namespace}/{name}"))));
            false
        }
        Decision::Deny(DenyReason::NoAllowMatch) => {
            steps.push(step("daemon", "authorization", "deny", format!("ALLOW policies apply to {} and none matches {what}", workload_name(w)), None));
            false
        }
    };
    for s in verdict.shadow.iter().filter(|s| s.matched) {
        steps.push(step("daemon", "authorization", "info", format!("dry-run/AUDIT policy {}/{} matched ({:?}, not enforced)", s.namespace, s.name, s.action), Some(format!("AuthorizationPolicy {}/{}", s.namespace, s.name))));
    }
    if allowed && let Some((scope, _)) = state.rate_limit_at(q.dst.ip()) {
        steps.push(step("daemon", "rate-limit", "info", format!("a local rate limit applies ({scope}): 429 when its bucket is empty"), None));
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_errors_name_the_parameter() {
        let q = parse_query("src=198.18.1.10&dst=198.19.0.10:80&method=POST&path=%2Fadmin%2Fx&header=x-user%3A%20alice").expect("parses");
        assert_eq!((q.stage, q.src.to_string(), q.dst.to_string()), (Stage::Source, "198.18.1.10".into(), "198.19.0.10:80".into()));
        let http = q.http.expect("http");
        assert_eq!((http.method.as_str(), http.path.as_str()), ("POST", "/admin/x"));
        assert_eq!(http.headers["x-user"], "alice");
        assert!(parse_query("src=1.2.3.4&dst=5.6.7.8:9&stage=destination&identity=spiffe%3A%2F%2Fcluster.local%2Fns%2Fdemo%2Fsa%2Fclient").expect("parses").identity.is_some());
        assert_eq!(parse_query("dst=1.2.3.4:80").expect_err("no src"), "src= is required");
        assert!(parse_query("src=x&dst=1.2.3.4:80").expect_err("bad src").contains("src=\"x\""));
        assert!(parse_query("src=1.2.3.4&dst=1.2.3.4:80&bogus=1").expect_err("unknown").contains("bogus"));
    }
}
