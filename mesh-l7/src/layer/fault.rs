//! Fault injection (VirtualService `fault`): delay a share of requests by a fixed time (`DI`),
//! then abort a share of them with an HTTP status or a gRPC status (`FI`) instead of sending
//! them upstream. It runs right after the router, as Envoy's fault filter runs before its
//! router, so an injected delay does not count against the route's timeout.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderValue, Request, Response, StatusCode};

use crate::{
    body::{self, Body},
    flags::{DelayInjected, ResponseFlag},
    layer::HttpService,
    route::{FaultInjection, Selected},
};

#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
}

impl<S> Fault<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// Whether a share given in millionths is drawn this time.
fn drawn(per_million: u32) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && fastrand::u32(0..1_000_000) < per_million)
}

/// gRPC's status codes by the names Istio's `grpcStatus` takes (a number is accepted too).
pub fn grpc_code(name: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let code = NAMES
        .iter()
        .position(|n| *n == name)
        .or_else(|| name.parse::<usize>().ok().filter(|c| *c < NAMES.len()))?;
    u8::try_from(code).ok()
}

/// The answer of an injected abort: Envoy's body for HTTP, a trailers-only gRPC response
/// (HTTP 200 with `grpc-status`) for gRPC.
fn abort(f: &FaultInjection) -> Response<Body> {
    let mut resp = Response::new(body::full("fault filter abort"));
    if let Some(code) = f.abort_grpc_status.as_deref().and_then(grpc_code) {
        *resp.body_mut() = body::empty();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(u16::from(code)));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("fault filter abort"),
        );
    } else {
        *resp.status_mut() = f
            .abort_http_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    resp.extensions_mut().insert(ResponseFlag::FaultInjected);
    resp
}

impl<S: HttpService> tower::Service<Request<Body>> for Fault<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let fault = req
            .extensions()
            .get::<Selected>()
            .and_then(|s| s.route().fault.clone());
        let Some(f) = fault else {
            return self.inner.call(req).boxed();
        };
        let delay = f.delay.filter(|_| drawn(f.delay_per_million));
        let aborted = drawn(f.abort_per_million)
            && (f.abort_http_status.is_some() || f.abort_grpc_status.is_some());
        // Take the service that poll_ready readied; the clone stays for the next call.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let mut resp = if aborted {
                abort(&f)
            } else {
                inner.call(req).await?
            };
            if delay.is_some() {
                resp.extensions_mut().insert(DelayInjected);
            }
            Ok(resp)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt as _;

    use super::*;
    use crate::layer::testing::{echo, forward, route, selected};

    fn with_fault(f: FaultInjection) -> Request<Body> {
        let mut r = route("r", vec![], forward(&[("whoami", 1)]));
        r.fault = Some(f);
        selected(r)
    }

    #[tokio::test(start_paused = true)]
    async fn delay_then_forward_marks_di() {
        let f = FaultInjection {
            delay_per_million: 1_000_000,
            delay: Some(Duration::from_millis(200)),
            ..FaultInjection::default()
        };
        let start = tokio::time::Instant::now();
        let resp = Fault::new(echo())
            .oneshot(with_fault(f))
            .await
            .expect("infallible");
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        assert_eq!(resp.status(), StatusCode::OK, "forwarded after the delay");
        assert!(resp.extensions().get::<DelayInjected>().is_some());
        assert!(resp.extensions().get::<ResponseFlag>().is_none());
    }

    #[tokio::test]
    async fn http_and_grpc_aborts_answer_without_the_upstream() {
        let never = tower::service_fn(|_req: Request<Body>| async {
            panic!("an aborted request must not reach the upstream")
        });
        let f = FaultInjection {
            abort_per_million: 1_000_000,
            abort_http_status: Some(418),
            ..FaultInjection::default()
        };
        let resp = Fault::new(never)
            .oneshot(with_fault(f))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(
            resp.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::FaultInjected)
        );
        let f = FaultInjection {
            abort_per_million: 1_000_000,
            abort_grpc_status: Some("UNAVAILABLE".into()),
            ..FaultInjection::default()
        };
        let resp = Fault::new(never)
            .oneshot(with_fault(f))
            .await
            .expect("infallible");
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "gRPC errors travel in grpc-status"
        );
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
    }

    #[tokio::test]
    async fn shares_are_drawn_per_request() {
        let f = FaultInjection {
            abort_per_million: 300_000,
            abort_http_status: Some(503),
            ..FaultInjection::default()
        };
        let mut aborted = 0;
        for _ in 0..10_000 {
            let resp = Fault::new(echo())
                .oneshot(with_fault(f.clone()))
                .await
                .expect("infallible");
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
                aborted += 1;
            }
        }
        assert!((2_700..=3_300).contains(&aborted), "30 % ± 3: {aborted}");
        let none = FaultInjection {
            abort_per_million: 0,
            abort_http_status: Some(503),
            ..FaultInjection::default()
        };
        let resp = Fault::new(echo())
            .oneshot(with_fault(none))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK, "0 % never aborts");
    }

    #[test]
    fn grpc_codes_by_name_or_number() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("OK"), Some(0));
        assert_eq!(grpc_code("16"), Some(16));
        assert_eq!(grpc_code("17"), None);
        assert_eq!(
            grpc_code("unavailable"),
            None,
            "Istio's names are upper case"
        );
    }
}
