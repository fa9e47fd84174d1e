//! The route's request timeout (Gateway API `timeouts.request`, VirtualService `timeout`): no
//! response headers within it → 504 `UT`. Response bodies stream on without a deadline, so a
//! long download or a gRPC stream is not cut once it has begun (Envoy would cut it; a stream
//! that must end belongs to the application's own deadline, e.g. `grpc-timeout`).

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
        let d = req
            .extensions()
            .get::<Selected>()
            .and_then(|s| s.route().timeouts.request);
        limit(self.inner.call(req), d)
    }
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
}
