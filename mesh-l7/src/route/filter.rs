//! What a matched route changes: headers (set, add, remove), URL rewrites, and redirects. Pure
//! functions over `http` types, so each rule of the specs has a unit test.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderValue, Request, Uri, header::HOST, uri::PathAndQuery};

use super::{
    HeaderModifier, PathModifier, RequestRedirect, UrlRewrite,
    matching::{PrefixKind, PrefixMatch},
};

/// Set (replace), add (append), then remove.
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (k, v) in &m.set {
        headers.insert(k.clone(), v.clone());
    }
    for (k, v) in &m.add {
        headers.append(k.clone(), v.clone());
    }
    for k in &m.remove {
        headers.remove(k);
    }
}

/// The request's authority: the URI's (HTTP/2, absolute form) or the `Host` header (HTTP/1.1).
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    authority_in(req.uri(), req.headers())
}

/// [`authority`] from a request's parts.
pub fn authority_in<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
}

/// The new path for `path` under `m`, given how the route's path matched.
pub fn rewrite_path(path: &str, prefix: Option<PrefixMatch>, m: &PathModifier) -> String {
    match (m, prefix) {
        (PathModifier::Full(p), _) | (PathModifier::Prefix(p), None) => p.clone(),
        (
            PathModifier::Prefix(p),
            Some(PrefixMatch {
                len,
                kind: PrefixKind::String,
            }),
        ) => format!("{p}{}", &path[len.min(path.len())..]),
        (
            PathModifier::Prefix(p),
            Some(PrefixMatch {
                len,
                kind: PrefixKind::Segments,
            }),
        ) => {
            // Gateway API's table: the remainder keeps its leading `/`, the replacement loses a
            // trailing one, and an empty result is `/`.
            let rest = &path[len.min(path.len())..];
            if rest.is_empty() {
                return if p.is_empty() { "/".into() } else { p.clone() };
            }
            let joined = format!("{}{rest}", p.trim_end_matches('/'));
            if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rewritten URI is invalid: {0}")]
    Uri(#[from] http::Error),
    #[error("rewritten hostname {0:?} is not a valid header value")]
    Hostname(String),
}

/// Applies a URL rewrite (hostname, path) to the request; the query string is kept.
pub fn apply_rewrite<B>(
    req: &mut Request<B>,
    rw: &UrlRewrite,
    prefix: Option<PrefixMatch>,
) -> Result<(), Error> {
    if let Some(m) = &rw.path {
        let path = rewrite_path(req.uri().path(), prefix, m);
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        set_uri(req, None, Some(&pq))?;
    }
    if let Some(host) = &rw.hostname {
        let value = HeaderValue::from_str(host).map_err(|_| Error::Hostname(host.clone()))?;
        if req.uri().authority().is_some() {
            set_uri(req, Some(host), None)?;
        }
        req.headers_mut().insert(HOST, value);
    }
    Ok(())
}

fn set_uri<B>(
    req: &mut Request<B>,
    authority: Option<&str>,
    path_and_query: Option<&str>,
) -> Result<(), Error> {
    let old = req.uri().clone().into_parts();
    let mut b = Uri::builder();
    if let Some(s) = old.scheme {
        b = b.scheme(s);
    }
    match (authority, old.authority) {
        (Some(a), _) => b = b.authority(a),
        (None, Some(a)) => b = b.authority(a),
        (None, None) => {}
    }
    match (path_and_query, old.path_and_query) {
        (Some(pq), _) => b = b.path_and_query(pq),
        (None, Some(pq)) => b = b.path_and_query(pq),
        (None, None) => b = b.path_and_query(PathAndQuery::from_static("/")),
    }
    *req.uri_mut() = b.build()?;
    Ok(())
}

/// The `Location` of a redirect. Unset parts keep the request's; the port is the redirect's, or
/// none when the scheme changes (the scheme's well-known port), else the request's.
pub fn redirect_location<B>(
    req: &Request<B>,
    r: &RequestRedirect,
    prefix: Option<PrefixMatch>,
) -> String {
    let scheme = r
        .scheme
        .as_deref()
        .or_else(|| req.uri().scheme_str())
        .unwrap_or("http");
    let (req_host, req_port) = split_host_port(authority(req).unwrap_or(""));
    let host = r.hostname.as_deref().unwrap_or(req_host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => req_port,
    };
    let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path = r.path.as_ref().map_or_else(
        || req.uri().path().to_owned(),
        |m| rewrite_path(req.uri().path(), prefix, m),
    );
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port {
        let _ = write!(loc, ":{p}");
    }
    loc.push_str(&path);
    if let Some(q) = req.uri().query() {
        loc.push('?');
        loc.push_str(q);
    }
    loc
}

/// `host[:port]` (IPv6 in brackets) → host and port.
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => {
            (&authority[..i], authority[i + 1..].parse().ok())
        }
        _ => (authority, None),
    };
    (host, port)
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
