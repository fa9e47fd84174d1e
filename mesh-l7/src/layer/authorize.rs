//! L7 authorization at the destination: the node's evaluator sees each request (method, path,
//! host, headers) and a denial is answered as Istio does, `403` with body `RBAC: access denied`,
//! before a byte reaches the workload.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header::CONTENT_TYPE};

use crate::body::{self, Body};

/// Why a request was denied, for the metric and the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// Stable metric label (`deny_policy`, `no_allow_match`).
    pub reason: &'static str,
}

/// The node's authorization evaluator, per request.
pub trait Authorize: Send + Sync + 'static {
    fn check(&self, req: &Request<Body>) -> Result<(), Denied>;
}

/// Istio's body for a denied request.
pub const DENIED_BODY: &str = "RBAC: access denied";

#[derive(Clone)]
pub struct AuthorizeLayer<S> {
    inner: S,
    authz: Arc<dyn Authorize>,
}

impl<S> AuthorizeLayer<S> {
    pub fn new(inner: S, authz: Arc<dyn Authorize>) -> Self {
        Self { inner, authz }
    }
}

/// The 403 a denied request gets.
pub fn denied_response(d: Denied) -> Response<Body> {
    let mut resp = Response::new(body::full(DENIED_BODY));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.extensions_mut().insert(d);
    resp
}

impl<S> tower::Service<Request<Body>> for AuthorizeLayer<S>
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
        match self.authz.check(&req) {
            Ok(()) => self.inner.call(req).boxed(),
            Err(d) => futures::future::ready(Ok(denied_response(d))).boxed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;
    use crate::layer::testing::{echo, text};

    struct OnlyGet;

    impl Authorize for OnlyGet {
        fn check(&self, req: &Request<Body>) -> Result<(), Denied> {
            if req.method() == http::Method::GET {
                Ok(())
            } else {
                Err(Denied {
                    reason: "no_allow_match",
                })
            }
        }
    }

    #[tokio::test]
    async fn denied_requests_get_istios_403_and_never_reach_upstream() {
        let svc = AuthorizeLayer::new(echo(), Arc::new(OnlyGet));
        let resp = svc
            .clone()
            .oneshot(Request::get("/x").body(body::empty()).expect("request"))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = svc
            .oneshot(Request::post("/x").body(body::empty()).expect("request"))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            resp.extensions().get::<Denied>(),
            Some(&Denied {
                reason: "no_allow_match"
            })
        );
        assert_eq!(text(resp).await, "RBAC: access denied");
    }
}
