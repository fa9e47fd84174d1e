use http::{HeaderMap, HeaderName, HeaderValue, Request};

use super::*;

#[expect(
    clippy::unnecessary_wraps,
    reason = "reads like the argument it stands for"
)]
fn seg(len: usize) -> Option<PrefixMatch> {
    Some(PrefixMatch {
        len,
        kind: PrefixKind::Segments,
    })
}

#[test]
fn replace_prefix_match_follows_the_gateway_api_table() {
    // (matched prefix, replacement, request path, expected) from the spec's HTTPPathModifier docs.
    let cases = [
        ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz", "/foo", "/xyz"),
        ("/foo", "/xyz", "/foo/", "/xyz/"),
        ("/foo", "/", "/foo/bar", "/bar"),
        ("/", "/xyz", "/foo", "/xyz/foo"),
        ("/", "/", "/foo", "/foo"),
        ("/foo", "/", "/foo", "/"),
    ];
    for (prefix, repl, path, want) in cases {
        let m = crate::route::matching::StringMatch::path_prefix(prefix);
        let len = m.matches(path).expect("matches");
        assert_eq!(
            rewrite_path(path, seg(len), &PathModifier::Prefix(repl.into())),
            want,
            "{prefix} → {repl} on {path}"
        );
    }
}

#[test]
fn string_prefix_rewrites_concatenate_and_full_replaces() {
    let s = Some(PrefixMatch {
        len: 4,
        kind: PrefixKind::String,
    });
    assert_eq!(
        rewrite_path("/v1/api", s, &PathModifier::Prefix("/v2/".into())),
        "/v2/api"
    );
    assert_eq!(
        rewrite_path("/anything", None, &PathModifier::Prefix("/new".into())),
        "/new",
        "no prefix match: whole path"
    );
    assert_eq!(
        rewrite_path("/a/b", seg(2), &PathModifier::Full("/c".into())),
        "/c"
    );
}

#[test]
fn rewrite_keeps_the_query_and_sets_host() {
    let mut req = Request::get("/v1/items?x=1")
        .header("host", "whoami:8081")
        .body(())
        .expect("request");
    let rw = UrlRewrite {
        hostname: Some("backend.demo".into()),
        path: Some(PathModifier::Prefix("/v2".into())),
    };
    apply_rewrite(&mut req, &rw, seg(3)).expect("rewrite");
    assert_eq!(req.uri().to_string(), "/v2/items?x=1");
    assert_eq!(req.headers()["host"], "backend.demo");
    // HTTP/2: the authority is in the URI.
    let mut req = Request::get("http://whoami:8081/a")
        .body(())
        .expect("request");
    apply_rewrite(
        &mut req,
        &UrlRewrite {
            hostname: Some("other".into()),
            path: None,
        },
        None,
    )
    .expect("rewrite");
    assert_eq!(req.uri().to_string(), "http://other/a");
}

#[test]
fn redirects_keep_what_they_do_not_change() {
    let req = Request::get("/old/page?q=1")
        .header("host", "whoami.demo:8081")
        .body(())
        .expect("request");
    let r = |scheme: Option<&str>, host: Option<&str>, port, path| RequestRedirect {
        scheme: scheme.map(Into::into),
        hostname: host.map(Into::into),
        path,
        port,
        status: 301,
    };
    assert_eq!(
        redirect_location(&req, &r(None, None, None, None), None),
        "http://whoami.demo:8081/old/page?q=1"
    );
    assert_eq!(
        redirect_location(&req, &r(Some("https"), None, None, None), None),
        "https://whoami.demo/old/page?q=1",
        "scheme change drops the port"
    );
    assert_eq!(
        redirect_location(&req, &r(None, Some("new"), Some(80), None), None),
        "http://new/old/page?q=1",
        "well-known port omitted"
    );
    let prefix = Some(PrefixMatch {
        len: 4,
        kind: PrefixKind::Segments,
    });
    assert_eq!(
        redirect_location(
            &req,
            &r(
                None,
                None,
                Some(9000),
                Some(PathModifier::Prefix("/new".into()))
            ),
            prefix
        ),
        "http://whoami.demo:9000/new/page?q=1"
    );
}

#[test]
fn header_modifier_sets_adds_then_removes() {
    let mut h = HeaderMap::new();
    h.insert("x-a", HeaderValue::from_static("1"));
    h.insert("x-b", HeaderValue::from_static("1"));
    h.insert("x-c", HeaderValue::from_static("1"));
    let m = HeaderModifier {
        set: vec![(
            HeaderName::from_static("x-a"),
            HeaderValue::from_static("2"),
        )],
        add: vec![(
            HeaderName::from_static("x-b"),
            HeaderValue::from_static("2"),
        )],
        remove: vec![HeaderName::from_static("x-c")],
    };
    modify_headers(&mut h, &m);
    assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["2"]);
    assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["1", "2"]);
    assert!(!h.contains_key("x-c"));
}
