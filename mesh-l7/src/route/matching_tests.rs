use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::route::{Action, RouteSource, SourceKind, Timeouts};

fn route(name: &str, matches: Vec<RouteMatch>) -> Route {
    Route {
        source: RouteSource {
            kind: SourceKind::HttpRoute,
            namespace: "demo".into(),
            name: name.into(),
            rule: 0,
            rule_name: None,
        },
        matches,
        request_headers: super::super::HeaderModifier::default(),
        response_headers: super::super::HeaderModifier::default(),
        rewrite: None,
        action: Action::Respond {
            status: 200,
            body: String::new(),
        },
        mirrors: Vec::new(),
        timeouts: Timeouts::default(),
        retry: None,
        fault: None,
    }
}

fn view<'a>(
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
) -> RequestView<'a> {
    RequestView {
        method,
        path,
        query,
        headers,
        port: 80,
        client: Client::default(),
    }
}

#[test]
fn path_prefix_is_element_wise_and_string_prefix_is_not() {
    let pp = StringMatch::path_prefix("/foo/");
    assert_eq!(pp.matches("/foo"), Some(4));
    assert_eq!(pp.matches("/foo/"), Some(4));
    assert_eq!(pp.matches("/foo/bar"), Some(4));
    assert_eq!(pp.matches("/foobar"), None);
    assert_eq!(StringMatch::path_prefix("/").matches("/anything"), Some(0));
    let p = StringMatch::Prefix("/foo".into());
    assert_eq!(p.matches("/foobar"), Some(4));
    assert_eq!(p.matches("/fo"), None);
}

#[test]
fn regexes_are_anchored() {
    let r = StringMatch::regex(".*Firefox.*").expect("regex");
    assert!(
        r.matches("Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0")
            .is_some()
    );
    assert!(r.matches("curl/8.0").is_none());
    let r = StringMatch::regex("/v[0-9]+").expect("regex");
    assert!(r.matches("/v12").is_some());
    assert!(r.matches("/v12/x").is_none(), "anchored at the end");
    assert!(r.matches("x/v12").is_none(), "anchored at the start");
}

#[test]
fn every_field_of_a_match_must_hold() {
    let m = RouteMatch {
        path: Some(StringMatch::path_prefix("/api")),
        method: Some(StringMatch::Exact("GET".into())),
        headers: vec![HeaderMatch {
            name: http::HeaderName::from_static("x-user"),
            value: StringMatch::Exact("jason".into()),
            invert: false,
        }],
        query_params: vec![QueryMatch {
            name: "debug".into(),
            value: StringMatch::Exact("on x".into()),
        }],
        ..RouteMatch::default()
    };
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("jason"));
    let ok = view("GET", "/api/v1", Some("a=1&debug=on+x"), &h);
    assert_eq!(
        m.accepts(&ok),
        Some(Some(PrefixMatch {
            len: 4,
            kind: PrefixKind::Segments
        }))
    );
    assert_eq!(
        m.accepts(&view("POST", "/api/v1", Some("debug=on%20x"), &h)),
        None,
        "method"
    );
    assert_eq!(
        m.accepts(&view("GET", "/apix", Some("debug=on%20x"), &h)),
        None,
        "path"
    );
    assert_eq!(
        m.accepts(&view("GET", "/api", Some("debug=off"), &h)),
        None,
        "query"
    );
    assert_eq!(
        m.accepts(&view(
            "GET",
            "/api",
            Some("debug=on%20x"),
            &HeaderMap::new()
        )),
        None,
        "header"
    );
}

#[test]
fn inverted_headers_match_when_absent_or_different() {
    let m = RouteMatch {
        headers: vec![HeaderMatch {
            name: http::HeaderName::from_static("x-canary"),
            value: StringMatch::Present,
            invert: true,
        }],
        ..RouteMatch::default()
    };
    let mut h = HeaderMap::new();
    assert!(m.accepts(&view("GET", "/", None, &h)).is_some());
    h.insert("x-canary", HeaderValue::from_static("1"));
    assert!(m.accepts(&view("GET", "/", None, &h)).is_none());
}

#[test]
fn source_labels_namespace_and_port_restrict_the_match() {
    let labels = BTreeMap::from([
        ("app".to_owned(), "client".to_owned()),
        ("version".to_owned(), "v1".to_owned()),
    ]);
    let m = RouteMatch {
        port: Some(8081),
        source_labels: BTreeMap::from([("app".to_owned(), "client".to_owned())]),
        source_namespace: Some("demo".into()),
        ..RouteMatch::default()
    };
    let h = HeaderMap::new();
    let mut v = view("GET", "/", None, &h);
    v.port = 8081;
    assert!(m.accepts(&v).is_none(), "no client known");
    v.client = Client {
        namespace: Some("demo"),
        labels: Some(&labels),
    };
    assert!(m.accepts(&v).is_some());
    v.port = 80;
    assert!(m.accepts(&v).is_none(), "other port");
    v.port = 8081;
    v.client.namespace = Some("other");
    assert!(m.accepts(&v).is_none(), "other namespace");
}

#[test]
fn first_route_in_table_order_wins_and_empty_matches_match_all() {
    let firefox = RouteMatch {
        headers: vec![HeaderMatch {
            name: http::HeaderName::from_static("user-agent"),
            value: StringMatch::regex(".*Firefox.*").expect("regex"),
            invert: false,
        }],
        ..RouteMatch::default()
    };
    let routes = [route("canary", vec![firefox]), route("catch-all", vec![])];
    let mut h = HeaderMap::new();
    h.insert(
        "user-agent",
        HeaderValue::from_static("Mozilla/5.0 Firefox/120.0"),
    );
    assert_eq!(
        find(&routes, &view("GET", "/", None, &h))
            .expect("match")
            .route
            .source
            .name,
        "canary"
    );
    let curl = HeaderMap::new();
    assert_eq!(
        find(&routes, &view("GET", "/", None, &curl))
            .expect("match")
            .route
            .source
            .name,
        "catch-all"
    );
    assert!(
        find(&routes[..1], &view("GET", "/", None, &curl)).is_none(),
        "no route: 404 NR"
    );
}
