//! Turning a request the proxy received into one it may send upstream, and a response the
//! upstream sent into one the client may receive: hop-by-hop headers removed (RFC 9110 §7.6.1),
//! the HTTP version of the next hop, its authority form, and protocol upgrades (WebSocket)
//! spliced through once both sides agreed.

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE},
    uri::{Authority, Scheme},
};
use hyper_util::rt::TokioIo;

use crate::{body::Body, client, flags::ResponseFlag};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers. An upgrade request keeps `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(CONNECTION) {
        strip_named(headers, keep_upgrade);
    }
    for n in [KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING] {
        headers.remove(n);
    }
    if headers.get(TE).is_some_and(|v| v != "trailers") {
        headers.remove(TE);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
}

/// Removes the headers the `Connection` header names (hop-by-hop by declaration).
fn strip_named(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
}

/// Puts the request in the form `version` needs: HTTP/2 carries the authority in the URI
/// (`:authority`, no `Host`), HTTP/1.1 in `Host` with an origin-form target.
pub fn prepare_request(req: &mut Request<Body>, version: client::Version) {
    let upgrade = version == client::Version::Http1 && client::is_upgrade(req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if version == client::Version::Http1
        && req.uri().authority().is_none()
        && req.headers().contains_key(HOST)
    {
        // Already what HTTP/1.1 sends: origin form and a Host header (the common case).
        *req.version_mut() = Version::HTTP_11;
        return;
    }
    let authority = req.uri().authority().cloned().or_else(|| {
        req.headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
    });
    let pq = req.uri().path_and_query().cloned();
    match version {
        client::Version::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            if let Some(a) = authority {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(a);
                parts.path_and_query =
                    pq.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
                req.headers_mut().remove(HOST);
            }
        }
        client::Version::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if let Some(a) = authority
                && !req.headers().contains_key(HOST)
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(HOST, v);
            }
            if let Some(pq) = pq
                && req.uri().authority().is_some()
                && let Ok(uri) = Uri::try_from(pq.as_str())
            {
                *req.uri_mut() = uri;
            }
        }
    }
}

/// Cleans the upstream's response for the client (hop-by-hop headers; a `101` keeps its
/// upgrade headers).
pub fn prepare_response(resp: &mut Response<Body>) {
    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrade);
}

/// When the upstream agreed to switch protocols, joins the client's upgraded connection to the
/// upstream's and copies bytes both ways in a task of its own. `client` is the client side's
/// pending upgrade, taken from the request before it was sent on.
pub fn splice_upgrade(client: Option<hyper::upgrade::OnUpgrade>, resp: &mut Response<Body>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let (Some(client), Some(upstream)) = (
        client,
        resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>(),
    ) else {
        return;
    };
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
                    Err(e) => tracing::debug!(error = %e, "upgraded connection failed"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "protocol upgrade did not complete"),
        }
    });
}

/// Sends `req` upstream through `pool` the way the next hop needs it, splicing an upgrade when
/// the upstream switches protocols. Failures become the proxy's own response with its flag
/// (`UF`, `UR`).
pub async fn send<C: client::Connect>(
    pool: &client::Pool<C>,
    key: &C::Key,
    version: client::Version,
    mut req: Request<Body>,
) -> Response<Body> {
    prepare_request(&mut req, version);
    let client_upgrade = (version == client::Version::Http1 && client::is_upgrade(&req))
        .then(|| hyper::upgrade::on(&mut req));
    match pool.send(key, version, req).await {
        Ok(mut resp) => {
            prepare_response(&mut resp);
            splice_upgrade(client_upgrade, &mut resp);
            resp
        }
        Err(e) => {
            let flag = e.flag();
            tracing::debug!(?key, error = ?e, %flag, "upstream request failed");
            flag.response()
        }
    }
}

/// The flag for a request that got no upstream at all (no healthy endpoint).
pub fn no_healthy_upstream() -> Response<Body> {
    ResponseFlag::NoHealthyUpstream.response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_by_connection() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-kept"]
        );
        let mut h = HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key(TE), "gRPC's TE: trailers stays");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }

    #[test]
    fn http1_requests_become_http2_with_the_authority_in_the_uri_and_back() {
        let mut req = Request::get("/a?b=1")
            .header(HOST, "whoami.demo:8081")
            .body(body::empty())
            .expect("request");
        prepare_request(&mut req, client::Version::Http2);
        assert_eq!(req.uri().to_string(), "http://whoami.demo:8081/a?b=1");
        assert!(!req.headers().contains_key(HOST));
        assert_eq!(req.version(), Version::HTTP_2);
        prepare_request(&mut req, client::Version::Http1);
        assert_eq!(req.uri().to_string(), "/a?b=1");
        assert_eq!(req.headers()[HOST], "whoami.demo:8081");
        assert_eq!(req.version(), Version::HTTP_11);
    }
}
