//! Request mirroring (Gateway API `RequestMirror`, VirtualService `mirror`): a share of the
//! requests is copied to the mirror backend, whose answer is thrown away. The copy's authority
//! gets Envoy's `-shadow` suffix so the mirror can tell copies apart. The body is streamed to
//! both: the primary never waits for the mirror (a mirror that falls behind by more than
//! [`MIRROR_BUFFER`] chunks loses the rest of that copy's body, and its request fails).

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderValue, Request, Response, header::HOST};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt as _, StreamBody};
use tokio::sync::mpsc;

use super::split::{Chosen, Which};
use crate::{
    body::{self, Body, BodyError, BoxError},
    route::Selected,
};

/// Body chunks a mirror may lag behind the primary.
pub const MIRROR_BUFFER: usize = 32;

#[derive(Clone)]
pub struct Mirror<S> {
    inner: S,
}

impl<S> Mirror<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// `host` → `host-shadow` (a port stays at the end).
fn shadow(authority: &str) -> String {
    if let Some((h, p)) = authority.rsplit_once(':')
        && !p.is_empty()
        && p.bytes().all(|b| b.is_ascii_digit())
        && (!h.contains(':') || h.ends_with(']'))
    {
        return format!("{h}-shadow:{p}");
    }
    format!("{authority}-shadow")
}

impl<S> tower::Service<Request<Body>> for Mirror<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(selected) = req.extensions().get::<Selected>().cloned() else {
            return self.inner.call(req).boxed();
        };
        let mirrors: Vec<usize> = selected
            .route()
            .mirrors
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.per_million >= 1_000_000 || fastrand::u32(0..1_000_000) < m.per_million
            })
            .map(|(i, _)| i)
            .collect();
        if mirrors.is_empty() {
            return self.inner.call(req).boxed();
        }
        let (parts, mut primary) = req.into_parts();
        for i in mirrors {
            let mut copy = Request::new(body::empty());
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = parts.uri.clone();
            *copy.version_mut() = parts.version;
            *copy.headers_mut() = parts.headers.clone();
            if let Some(a) =
                crate::route::filter::authority_in(&parts.uri, &parts.headers).map(shadow)
            {
                rewrite_authority(&mut copy, &a);
            }
            if !primary.is_end_stream() {
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(MIRROR_BUFFER);
                primary = body::boxed(Tee {
                    inner: primary,
                    tx: Some(tx),
                });
                *copy.body_mut() = body::boxed(StreamBody::new(tokio_stream_from(rx)));
            }
            copy.extensions_mut().insert(selected.clone());
            copy.extensions_mut().insert(Chosen {
                selected: selected.clone(),
                which: Which::Mirror(i),
            });
            let mirror = self.inner.clone();
            tokio::spawn(
                tower::ServiceExt::oneshot(mirror, copy).then(|Ok(resp)| async move {
                    let status = resp.status();
                    // Read the answer to its end so its connection can be reused, then drop it.
                    let _ = resp.into_body().collect().await;
                    tracing::debug!(%status, "mirrored request answered (discarded)");
                }),
            );
        }
        self.inner.call(Request::from_parts(parts, primary)).boxed()
    }
}

fn rewrite_authority(req: &mut Request<Body>, authority: &str) {
    if req.uri().authority().is_some() {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(a) = authority.parse() {
            parts.authority = Some(a);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(authority) {
        req.headers_mut().insert(HOST, v);
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The primary's body, copying each frame to the mirror's channel without ever waiting for it.
struct Tee {
    inner: Body,
    tx: Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>,
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(tx) = &this.tx
        {
            let copy = if let Some(d) = frame.data_ref() {
                Some(Frame::data(d.clone()))
            } else {
                frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
            };
            if let Some(copy) = copy
                && tx.try_send(Ok(copy)).is_err()
            {
                // Full (the mirror lags) or gone: the mirror's copy ends with an error.
                if let Some(tx) = this.tx.take() {
                    let _ = tx.try_send(Err("mirror fell behind the primary request".into()));
                }
            }
        }
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.tx = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::StatusCode;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        layer::testing::{forward, route, selected},
        route::{Backend, Mirror as MirrorSpec},
    };

    #[test]
    fn shadow_authority_keeps_the_port() {
        assert_eq!(shadow("whoami.demo:8081"), "whoami.demo-shadow:8081");
        assert_eq!(shadow("whoami"), "whoami-shadow");
        assert_eq!(shadow("[fd00::1]:80"), "[fd00::1]-shadow:80");
    }

    #[tokio::test]
    async fn every_request_is_mirrored_with_its_body_and_the_client_gets_the_primary() {
        let seen = Arc::new(Mutex::new(Vec::<(String, String, String)>::new()));
        let upstream = {
            let seen = seen.clone();
            tower::service_fn(move |req: Request<Body>| {
                let seen = seen.clone();
                async move {
                    let which = req
                        .extensions()
                        .get::<Chosen>()
                        .map_or("primary".to_owned(), |c| c.backend().name.clone());
                    let host = req
                        .headers()
                        .get(HOST)
                        .map(|h| h.to_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    let body = req.into_body().collect().await.map_or_else(
                        |e| format!("error: {e}"),
                        |b| String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                    );
                    seen.lock().expect("lock").push((which.clone(), host, body));
                    let mut resp = Response::new(body::full(which));
                    *resp.status_mut() = StatusCode::OK;
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let mut r = route("r", vec![], forward(&[("whoami", 1)]));
        r.mirrors = vec![MirrorSpec {
            backend: Backend::service("demo", "whoami-mirror"),
            per_million: 1_000_000,
        }];
        let mut req = selected(r);
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("whoami:8081"));
        *req.body_mut() = body::full("payload");
        let resp = Mirror::new(upstream)
            .oneshot(req)
            .await
            .expect("infallible");
        assert_eq!(crate::layer::testing::text(resp).await, "primary");
        for _ in 0..100 {
            if seen.lock().expect("lock").len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut seen = seen.lock().expect("lock").clone();
        seen.sort();
        assert_eq!(
            seen,
            [
                (
                    "primary".to_owned(),
                    "whoami:8081".to_owned(),
                    "payload".to_owned()
                ),
                (
                    "whoami-mirror".to_owned(),
                    "whoami-shadow:8081".to_owned(),
                    "payload".to_owned()
                )
            ]
        );
    }
}
