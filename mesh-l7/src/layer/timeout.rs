//! The route's request timeout (Gateway API `timeouts.request`, VirtualService `timeout`): no
//! response headers within it → 504 `UT`. Response bodies stream on without a deadline, so a
//! long download or a gRPC stream is not cut once it has begun (Envoy would cut it; a stream
//! that must end belongs to the application's own deadline). A gRPC client's `grpc-timeout`
//! header bounds the wait for response headers too, when it is shorter than the route's.

use std::{
    convert::Infallible,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{Request, Response};

use crate::{body::Body, flags::ResponseFlag, route::Selected};

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Timeout<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// Runs `fut` under `limit` (none: no limit); a timeout answers 504 `UT`.
pub(crate) fn limit<F>(
    fut: F,
    limit: Option<Duration>,
) -> BoxFuture<'static, Result<Response<Body>, Infallible>>
where
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    match limit {
        None => fut.boxed(),
        Some(d) => async move {
            tokio::time::timeout(d, fut)
                .await
                .unwrap_or_else(|_| Ok(ResponseFlag::UpstreamRequestTimeout.response()))
        }
        .boxed(),
    }
}

impl<S> tower::Service<Request<Body>> for Timeout<S>
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
        let route = req
            .extensions()
            .get::<Selected>()
            .and_then(|s| s.route().timeouts.request);
        // A gRPC client's own deadline bounds the call too (the shorter one wins).
        let grpc = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()));
        let d = match (route, grpc) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        limit(self.inner.call(req), d)
    }
}

/// A `grpc-timeout` header's value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`), as gRPC over HTTP/2 defines it; anything else is ignored.
pub fn grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        body,
        layer::testing::{forward, route, selected},
    };

    #[tokio::test(start_paused = true)]
    async fn slow_upstream_gets_504_ut_and_fast_one_passes() {
        let slow = tower::service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Infallible>(Response::new(body::empty()))
        });
        let mut r = route("r", vec![], forward(&[("whoami", 1)]));
        r.timeouts.request = Some(Duration::from_secs(1));
        let resp = Timeout::new(slow)
            .oneshot(selected(r.clone()))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            resp.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::UpstreamRequestTimeout)
        );
        r.timeouts.request = Some(Duration::from_secs(10));
        let resp = Timeout::new(slow)
            .oneshot(selected(r))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_deadline_shorter_than_the_route_wins() {
        let slow = tower::service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Infallible>(Response::new(body::empty()))
        });
        let mut r = route("r", vec![], forward(&[("whoami", 1)]));
        r.timeouts.request = Some(Duration::from_secs(10));
        let mut req = selected(r);
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("1500m"));
        let start = tokio::time::Instant::now();
        let resp = Timeout::new(slow).oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_hours(1)));
        assert_eq!(grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(grpc_timeout(b"123456789m"), None, "at most 8 digits");
        assert_eq!(grpc_timeout(b"10x"), None);
        assert_eq!(grpc_timeout(b"m"), None);
    }
}
