//! Decision table for L4 authorization: each row is a policy set, a connection, and the expected
//! decision, covering every matcher, its negation, scopes, DENY-over-ALLOW, dry-run and AUDIT.

use std::{collections::BTreeMap, net::IpAddr};

use super::*;
use crate::{
    identity::Identity,
    state::{Protocol, Workload},
};

const ROOT: &str = "istio-system";

fn wl(ns: &str, app: &str) -> Workload {
    Workload {
        name: format!("{app}-0").into(),
        namespace: ns.into(),
        service_account: app.into(),
        workload_name: None,
        ip: "198.18.2.11".parse().expect("ip"),
        node: "n2".into(),
        node_ip: "198.18.0.2".parse().expect("ip"),
        labels: BTreeMap::from([("app".into(), app.into())]).into(),
        protocol: Protocol::Hbone,
        locality: None,
    }
}

fn pol(ns: &str, name: &str, action: Action, rules: Vec<Rule>) -> Policy {
    Policy { name: name.into(), namespace: ns.into(), selector: None, action, dry_run: false, rules }
}

fn from(s: Source) -> Rule {
    Rule { from: vec![s], ..Rule::default() }
}

fn principals(p: &[&str]) -> Source {
    Source { principals: p.iter().map(|s| (*s).to_owned()).collect(), ..Source::default() }
}

fn allow() -> Decision {
    Decision::Allow
}

fn no_match() -> Decision {
    Decision::Deny(DenyReason::NoAllowMatch)
}

fn denied_by(ns: &str, name: &str) -> Decision {
    Decision::Deny(DenyReason::DenyPolicy { namespace: ns.into(), name: name.into() })
}

struct Case {
    what: &'static str,
    policies: Vec<Policy>,
    src: Option<&'static str>,
    src_ip: &'static str,
    port: u16,
    dst: Workload,
    want: Decision,
}

fn case(what: &'static str, policies: Vec<Policy>, src: Option<&'static str>, want: Decision) -> Case {
    Case { what, policies, src, src_ip: "198.18.1.11", port: 8080, dst: wl("prod", "db"), want }
}

fn table() -> Vec<Case> {
    let web = Some("spiffe://cluster.local/ns/prod/sa/web");
    let evil = Some("spiffe://cluster.local/ns/dev/sa/evil");
    let web_p = "cluster.local/ns/prod/sa/web";
    let with_selector = |mut p: Policy, app: &str| {
        p.selector = Some(BTreeMap::from([("app".into(), app.into())]));
        p
    };
    let dry = |mut p: Policy| {
        p.dry_run = true;
        p
    };
    let port = |mut c: Case, p: u16| {
        c.port = p;
        c
    };
    let ip = |mut c: Case, s: &'static str| {
        c.src_ip = s;
        c
    };
    vec![
        case("no policies: allow", vec![], web, allow()),
        case("no policies, plaintext: allow", vec![], None, allow()),
        case("allow exact principal", vec![pol("prod", "a", Action::Allow, vec![from(principals(&[web_p]))])], web, allow()),
        case("allow exact principal with spiffe:// prefix", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["spiffe://cluster.local/ns/prod/sa/web"]))])], web, allow()),
        case("allow other principal: no match", vec![pol("prod", "a", Action::Allow, vec![from(principals(&[web_p]))])], evil, no_match()),
        case("allow principal, plaintext: no match", vec![pol("prod", "a", Action::Allow, vec![from(principals(&[web_p]))])], None, no_match()),
        case("allow * needs an identity: plaintext no match", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["*"]))])], None, no_match()),
        case("allow * with identity", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["*"]))])], evil, allow()),
        case("allow prefix", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["cluster.local/ns/prod/*"]))])], web, allow()),
        case("allow prefix misses", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["cluster.local/ns/prod/*"]))])], evil, no_match()),
        case("allow suffix", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["*/sa/web"]))])], web, allow()),
        case("allow suffix misses", vec![pol("prod", "a", Action::Allow, vec![from(principals(&["*/sa/web"]))])], evil, no_match()),
        case("allow notPrincipals excludes", vec![pol("prod", "a", Action::Allow, vec![from(Source { not_principals: vec![web_p.into()], ..Source::default() })])], web, no_match()),
        case("allow notPrincipals admits others", vec![pol("prod", "a", Action::Allow, vec![from(Source { not_principals: vec![web_p.into()], ..Source::default() })])], evil, allow()),
        case("allow namespaces", vec![pol("prod", "a", Action::Allow, vec![from(Source { namespaces: vec!["prod".into()], ..Source::default() })])], web, allow()),
        case("allow namespaces misses", vec![pol("prod", "a", Action::Allow, vec![from(Source { namespaces: vec!["prod".into()], ..Source::default() })])], evil, no_match()),
        case("allow notNamespaces", vec![pol("prod", "a", Action::Allow, vec![from(Source { not_namespaces: vec!["dev".into()], ..Source::default() })])], evil, no_match()),
        case("allow notNamespaces admits plaintext (no namespace to exclude)", vec![pol("prod", "a", Action::Allow, vec![from(Source { not_namespaces: vec!["dev".into()], ..Source::default() })])], None, allow()),
        case("allow ipBlocks", vec![pol("prod", "a", Action::Allow, vec![from(Source { ip_blocks: vec!["198.18.1.0/24".parse().expect("net")], ..Source::default() })])], None, allow()),
        ip(case("allow ipBlocks misses", vec![pol("prod", "a", Action::Allow, vec![from(Source { ip_blocks: vec!["198.18.1.0/24".parse().expect("net")], ..Source::default() })])], None, no_match()), "198.18.3.4"),
        case("allow notIpBlocks excludes", vec![pol("prod", "a", Action::Allow, vec![from(Source { not_ip_blocks: vec!["198.18.1.11/32".parse().expect("net")], ..Source::default() })])], web, no_match()),
        case("fields AND: principal ok, ip wrong", vec![pol("prod", "a", Action::Allow, vec![from(Source { principals: vec![web_p.into()], ip_blocks: vec!["10.0.0.0/8".parse().expect("net")], ..Source::default() })])], web, no_match()),
        case("from entries OR", vec![pol("prod", "a", Action::Allow, vec![Rule { from: vec![principals(&["x/ns/y/sa/z"]), principals(&[web_p])], ..Rule::default() }])], web, allow()),
        case("allow ports", vec![pol("prod", "a", Action::Allow, vec![Rule { from: vec![], to: vec![Destination { ports: vec![8080], ..Destination::default() }], ..Rule::default() }])], evil, allow()),
        port(case("allow ports misses", vec![pol("prod", "a", Action::Allow, vec![Rule { from: vec![], to: vec![Destination { ports: vec![8080], ..Destination::default() }], ..Rule::default() }])], evil, no_match()), 9090),
        case("allow notPorts excludes", vec![pol("prod", "a", Action::Allow, vec![Rule { from: vec![], to: vec![Destination { not_ports: vec![8080], ..Destination::default() }], ..Rule::default() }])], web, no_match()),
        case("from AND to", vec![pol("prod", "a", Action::Allow, vec![Rule { from: vec![principals(&[web_p])], to: vec![Destination { ports: vec![9090], ..Destination::default() }], ..Rule::default() }])], web, no_match()),
        case("ALLOW with no rules denies everything it selects", vec![pol("prod", "allow-nothing", Action::Allow, vec![])], web, no_match()),
        case("ALLOW with one empty rule allows everything", vec![pol("prod", "allow-all", Action::Allow, vec![Rule::default()])], None, allow()),
        case("DENY with no rules matches nothing", vec![pol("prod", "d", Action::Deny, vec![])], evil, allow()),
        case("DENY principal", vec![pol("prod", "d", Action::Deny, vec![from(principals(&["cluster.local/ns/dev/*"]))])], evil, denied_by("prod", "d")),
        case("DENY principal spares others", vec![pol("prod", "d", Action::Deny, vec![from(principals(&["cluster.local/ns/dev/*"]))])], web, allow()),
        case("DENY notPrincipals * refuses plaintext", vec![pol("prod", "d", Action::Deny, vec![from(Source { not_principals: vec!["*".into()], ..Source::default() })])], None, denied_by("prod", "d")),
        case("DENY notPrincipals * spares mTLS", vec![pol("prod", "d", Action::Deny, vec![from(Source { not_principals: vec!["*".into()], ..Source::default() })])], web, allow()),
        case("DENY beats a matching ALLOW", vec![pol("prod", "a", Action::Allow, vec![Rule::default()]), pol("prod", "d", Action::Deny, vec![from(principals(&[web_p]))])], web, denied_by("prod", "d")),
        case("one of several ALLOW policies suffices", vec![pol("prod", "a1", Action::Allow, vec![from(principals(&["x/ns/y/sa/z"]))]), pol("prod", "a2", Action::Allow, vec![from(principals(&[web_p]))])], web, allow()),
        case("other namespace's policy does not apply", vec![pol("dev", "a", Action::Allow, vec![])], web, allow()),
        case("root namespace policy applies mesh-wide", vec![pol(ROOT, "mesh", Action::Deny, vec![from(principals(&["cluster.local/ns/dev/*"]))])], evil, denied_by(ROOT, "mesh")),
        case("root namespace ALLOW applies mesh-wide", vec![pol(ROOT, "mesh", Action::Allow, vec![from(principals(&[web_p]))])], evil, no_match()),
        case("selector matches workload", vec![with_selector(pol("prod", "a", Action::Allow, vec![]), "db")], web, no_match()),
        case("selector for another workload does not apply", vec![with_selector(pol("prod", "a", Action::Allow, vec![]), "cache")], web, allow()),
        case("dry-run DENY not enforced", vec![dry(pol("prod", "d", Action::Deny, vec![Rule::default()]))], web, allow()),
        case("dry-run ALLOW does not make ALLOW apply", vec![dry(pol("prod", "a", Action::Allow, vec![]))], web, allow()),
        case("AUDIT never enforced", vec![pol("prod", "audit", Action::Audit, vec![Rule::default()])], web, allow()),
        case("dry-run next to an enforced DENY", vec![dry(pol("prod", "d1", Action::Allow, vec![Rule::default()])), pol("prod", "d2", Action::Deny, vec![Rule::default()])], web, denied_by("prod", "d2")),
    ]
}

#[test]
fn decision_table() {
    let cases = table();
    assert!(cases.len() >= 40, "the table is the spec; keep it broad");
    for c in cases {
        let id: Option<Identity> = c.src.map(|s| s.parse().expect("identity"));
        let conn = Conn { src_identity: id.as_ref(), src_ip: c.src_ip.parse::<IpAddr>().expect("ip"), dst: &c.dst, dst_port: c.port, http: None };
        let got = evaluate(&c.policies, ROOT, &conn);
        assert_eq!(got.decision, c.want, "case {:?}", c.what);
    }
}

#[test]
fn dry_run_and_audit_are_reported_with_their_match() {
    let mut d = pol("prod", "would-deny", Action::Deny, vec![Rule::default()]);
    d.dry_run = true;
    let audit = pol("prod", "audit", Action::Audit, vec![from(principals(&["nobody/ns/x/sa/y"]))]);
    let dst = wl("prod", "db");
    let conn = Conn { src_identity: None, src_ip: "198.18.1.11".parse().expect("ip"), dst: &dst, dst_port: 1, http: None };
    let v = evaluate(&[d, audit], ROOT, &conn);
    assert_eq!(v.decision, Decision::Allow);
    let shadow: Vec<(&str, bool)> = v.shadow.iter().map(|s| (s.name.as_str(), s.matched)).collect();
    assert_eq!(shadow, vec![("would-deny", true), ("audit", false)]);
}

#[test]
fn peer_authentication_most_specific_wins() {
    let pa = |ns: &str, app: Option<&str>, mode| PeerAuthentication {
        name: "pa".into(),
        namespace: ns.into(),
        selector: app.map(|a| BTreeMap::from([("app".to_owned(), a.to_owned())])),
        mode,
    };
    let db = wl("prod", "db");
    assert_eq!(mode_for(&[], ROOT, &db), Mode::Permissive);
    assert_eq!(mode_for(&[pa(ROOT, None, Mode::Strict)], ROOT, &db), Mode::Strict);
    assert_eq!(mode_for(&[pa(ROOT, None, Mode::Strict), pa("prod", None, Mode::Permissive)], ROOT, &db), Mode::Permissive);
    let all = [pa(ROOT, None, Mode::Permissive), pa("prod", None, Mode::Permissive), pa("prod", Some("db"), Mode::Strict)];
    assert_eq!(mode_for(&all, ROOT, &db), Mode::Strict);
    assert_eq!(mode_for(&[pa("prod", Some("cache"), Mode::Strict)], ROOT, &db), Mode::Permissive);
    assert_eq!(mode_for(&[pa("dev", None, Mode::Strict)], ROOT, &db), Mode::Permissive);
}

/// L7: each row is a rule, a request (or none: a TCP connection) and the decision.
#[test]
fn l7_decision_table() {
    let op = |f: fn(&mut Destination)| {
        let mut d = Destination::default();
        f(&mut d);
        Rule { to: vec![d], ..Rule::default() }
    };
    let when = |key: &str, values: &[&str], not: &[&str]| Rule {
        when: vec![Condition { key: key.into(), values: values.iter().map(|s| (*s).into()).collect(), not_values: not.iter().map(|s| (*s).into()).collect() }],
        ..Rule::default()
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("alice"));
    let get = |path: &'static str| Some(HttpRequest { method: "GET", path, host: Some("whoami.demo:8081"), headers: &headers, auth: None });
    let post = Some(HttpRequest { method: "POST", path: "/api/v1", host: Some("whoami.demo:8081"), headers: &headers, auth: None });
    let web: Identity = "spiffe://cluster.local/ns/prod/sa/web".parse().expect("identity");
    let rows: Vec<(&str, Action, Rule, Option<HttpRequest<'_>>, Decision)> = vec![
        ("ALLOW GET, GET", Action::Allow, op(|d| d.methods = vec!["GET".into()]), get("/"), allow()),
        ("ALLOW GET, POST", Action::Allow, op(|d| d.methods = vec!["GET".into()]), post, no_match()),
        ("ALLOW notMethods POST, POST", Action::Allow, op(|d| d.not_methods = vec!["POST".into()]), post, no_match()),
        ("ALLOW path prefix", Action::Allow, op(|d| d.paths = vec!["/api/*".into()]), get("/api/x"), allow()),
        ("ALLOW path prefix misses", Action::Allow, op(|d| d.paths = vec!["/api/*".into()]), get("/web"), no_match()),
        ("ALLOW path suffix", Action::Allow, op(|d| d.paths = vec!["*.html".into()]), get("/index.html"), allow()),
        ("ALLOW exact path", Action::Allow, op(|d| d.paths = vec!["/health".into()]), get("/health"), allow()),
        ("ALLOW host with port matches the bare host", Action::Allow, op(|d| d.hosts = vec!["whoami.demo".into()]), get("/"), allow()),
        ("ALLOW host is case-insensitive, wildcard", Action::Allow, op(|d| d.hosts = vec!["*.DEMO".into()]), get("/"), allow()),
        ("ALLOW notHosts", Action::Allow, op(|d| d.not_hosts = vec!["whoami.*".into()]), get("/"), no_match()),
        ("ALLOW methods on TCP fails closed", Action::Allow, op(|d| d.methods = vec!["GET".into()]), None, no_match()),
        ("ALLOW ports only on TCP", Action::Allow, op(|d| d.ports = vec![8080]), None, allow()),
        ("ALLOW header condition", Action::Allow, when("request.headers[x-user]", &["alice", "bob"], &[]), get("/"), allow()),
        ("ALLOW header condition misses", Action::Allow, when("request.headers[x-user]", &["bob"], &[]), get("/"), no_match()),
        ("ALLOW header notValues", Action::Allow, when("request.headers[x-user]", &[], &["ali*"]), get("/"), no_match()),
        ("ALLOW header condition on TCP fails closed", Action::Allow, when("request.headers[x-user]", &["alice"], &[]), None, no_match()),
        ("ALLOW source.ip condition at L4", Action::Allow, when("source.ip", &["198.18.1.0/24"], &[]), None, allow()),
        ("ALLOW source.namespace condition", Action::Allow, when("source.namespace", &["prod"], &[]), None, allow()),
        ("ALLOW source.principal condition misses", Action::Allow, when("source.principal", &["cluster.local/ns/dev/*"], &[]), get("/"), no_match()),
        ("ALLOW destination.port condition", Action::Allow, when("destination.port", &["8080"], &[]), None, allow()),
        ("ALLOW JWT claim condition without a token misses", Action::Allow, when("request.auth.claims[iss]", &["*"], &[]), get("/"), no_match()),
        ("DENY POST, POST", Action::Deny, op(|d| d.methods = vec!["POST".into()]), post, denied_by("prod", "p")),
        ("DENY POST, GET", Action::Deny, op(|d| d.methods = vec!["POST".into()]), get("/"), allow()),
        ("DENY path on TCP denies on its L4 part", Action::Deny, op(|d| d.paths = vec!["/admin*".into()]), None, denied_by("prod", "p")),
        ("DENY path with another port on TCP spares it", Action::Deny, op(|d| { d.paths = vec!["/admin*".into()]; d.ports = vec![9090]; }), None, allow()),
        ("DENY JWT condition on TCP denies (fail closed)", Action::Deny, when("request.auth.claims[iss]", &["x"], &[]), None, denied_by("prod", "p")),
        ("DENY JWT condition without a token spares it", Action::Deny, when("request.auth.claims[iss]", &["x"], &[]), get("/"), allow()),
    ];
    let dst = wl("prod", "db");
    for (what, action, rule, http, want) in rows {
        let policies = [pol("prod", "p", action, vec![rule])];
        let conn = Conn { src_identity: Some(&web), src_ip: "198.18.1.11".parse().expect("ip"), dst: &dst, dst_port: 8080, http };
        assert_eq!(evaluate(&policies, ROOT, &conn).decision, want, "case {what:?}");
    }
}

/// JWT attributes (`requestPrincipals`, `request.auth.*`): each row a rule, the request's token
/// (or none, or a TCP connection) and the decision.
#[test]
fn jwt_decision_table() {
    use mesh_l7::jwt::RequestAuth;
    let claims = serde_json::json!({"iss": "https://idp", "sub": "alice", "groups": ["dev", "ops"], "org": {"team": "pay"}});
    let alice = RequestAuth {
        principal: "https://idp/alice".into(),
        audiences: vec!["orders".into()],
        presenter: Some("web".into()),
        claims: claims.as_object().expect("object").clone(),
    };
    let headers = http::HeaderMap::new();
    let req = |auth: Option<&'static RequestAuth>| Some(HttpRequest { method: "GET", path: "/", host: None, headers: &headers, auth });
    let alice: &'static RequestAuth = Box::leak(Box::new(alice));
    let from = |f: fn(&mut Source)| {
        let mut s = Source::default();
        f(&mut s);
        Rule { from: vec![s], ..Rule::default() }
    };
    let when = |key: &str, values: &[&str]| Rule {
        when: vec![Condition { key: key.into(), values: values.iter().map(|s| (*s).into()).collect(), not_values: Vec::new() }],
        ..Rule::default()
    };
    let rows: Vec<(&str, Action, Rule, Option<HttpRequest<'_>>, Decision)> = vec![
        ("requestPrincipals * with a token", Action::Allow, from(|s| s.request_principals = vec!["*".into()]), req(Some(alice)), allow()),
        ("requestPrincipals * without a token", Action::Allow, from(|s| s.request_principals = vec!["*".into()]), req(None), no_match()),
        ("requestPrincipals * on TCP fails closed", Action::Allow, from(|s| s.request_principals = vec!["*".into()]), None, no_match()),
        ("exact principal", Action::Allow, from(|s| s.request_principals = vec!["https://idp/alice".into()]), req(Some(alice)), allow()),
        ("another subject", Action::Allow, from(|s| s.request_principals = vec!["https://idp/bob".into()]), req(Some(alice)), no_match()),
        ("issuer prefix", Action::Allow, from(|s| s.request_principals = vec!["https://idp/*".into()]), req(Some(alice)), allow()),
        ("DENY notRequestPrincipals * without a token", Action::Deny, from(|s| s.not_request_principals = vec!["*".into()]), req(None), denied_by("prod", "p")),
        ("DENY notRequestPrincipals * with a token", Action::Deny, from(|s| s.not_request_principals = vec!["*".into()]), req(Some(alice)), allow()),
        ("DENY requestPrincipals on TCP denies", Action::Deny, from(|s| s.request_principals = vec!["*".into()]), None, denied_by("prod", "p")),
        ("claim in a list", Action::Allow, when("request.auth.claims[groups]", &["ops"]), req(Some(alice)), allow()),
        ("claim not in the list", Action::Allow, when("request.auth.claims[groups]", &["admin"]), req(Some(alice)), no_match()),
        ("nested claim", Action::Allow, when("request.auth.claims[org][team]", &["pay"]), req(Some(alice)), allow()),
        ("claim without a token", Action::Allow, when("request.auth.claims[groups]", &["ops"]), req(None), no_match()),
        ("request.auth.principal", Action::Allow, when("request.auth.principal", &["https://idp/alice"]), req(Some(alice)), allow()),
        ("request.auth.audiences", Action::Allow, when("request.auth.audiences", &["orders"]), req(Some(alice)), allow()),
        ("request.auth.presenter", Action::Allow, when("request.auth.presenter", &["mobile"]), req(Some(alice)), no_match()),
    ];
    let dst = wl("prod", "db");
    for (what, action, rule, http, want) in rows {
        let policies = [pol("prod", "p", action, vec![rule])];
        let conn = Conn { src_identity: None, src_ip: "198.18.1.11".parse().expect("ip"), dst: &dst, dst_port: 8080, http };
        assert_eq!(evaluate(&policies, ROOT, &conn).decision, want, "case {what:?}");
    }
}
