//! Retries (VirtualService `retries`, HTTPRoute `retry`): a failed attempt is sent again, to a
//! freshly picked backend and endpoint, while attempts, the request's body buffer and the
//! Service's retry budget allow. The first attempt streams its body as usual; what it sends is
//! kept (up to [`REPLAY_LIMIT`]) so the next attempt can send it again. A larger body is not
//! retried, and the access log says so. When the last attempt still fails with a retriable
//! outcome, its response goes to the client flagged `URX`.

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::{
    body::{self, Body, BodyError},
    flags::ResponseFlag,
    layer::HttpService,
    route::{RetryPolicy, Selected},
};

/// Request bytes kept for replay; Envoy's default per-request buffer limit is similar.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Backoff base when the policy sets none (Envoy's 25 ms); the cap is ten times the base.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Set on the response when retries ran out on a retriable outcome (`URX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetriesExhausted;

/// How many attempts a request took, and why it was not retried when it could have been.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    pub count: u32,
    pub not_retried: Option<&'static str>,
}

/// Retry budgets, one per Service (keyed by the route table's Service), shared by every
/// connection of a daemon: retries may add at most 20 % to a Service's requests, plus 10 per
/// second, over the last 10 s (linkerd's defaults), so a failing backend is never hit with a
/// multiple of its load.
#[derive(Default)]
pub struct Budgets {
    /// By namespace, then name: found by `&str` without allocating.
    by_service: Mutex<HashMap<String, HashMap<String, Arc<ServiceRetries>>>>,
}

/// One Service's retry budget, and its retries in flight (DestinationRule
/// `connectionPool.http.maxRetries` caps them).
struct ServiceRetries {
    budget: TpsBudget,
    active: AtomicU32,
}

/// One retry in flight, counted until dropped.
struct Retrying(Arc<ServiceRetries>);

impl Drop for Retrying {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServiceRetries {
    /// A retry may start if fewer than `max` are in flight (`None`: no limit).
    fn start(self: &Arc<Self>, max: Option<u32>) -> Option<Retrying> {
        let before = self.active.fetch_add(1, Ordering::Relaxed);
        let retrying = Retrying(self.clone());
        (!max.is_some_and(|m| before >= m)).then_some(retrying)
    }
}

impl Budgets {
    fn get(&self, namespace: &str, name: &str) -> Arc<ServiceRetries> {
        let mut m = self.by_service.lock().expect("budgets lock");
        if let Some(b) = m.get(namespace).and_then(|n| n.get(name)) {
            return b.clone();
        }
        m.entry(namespace.to_owned())
            .or_default()
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(ServiceRetries {
                    budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
                    active: AtomicU32::new(0),
                })
            })
            .clone()
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    budgets: Arc<Budgets>,
}

impl<S> Retry<S> {
    pub fn new(inner: S, budgets: Arc<Budgets>) -> Self {
        Self { inner, budgets }
    }
}

/// gRPC statuses by Istio's `retryOn` names.
const GRPC_CONDITIONS: [(&str, &str); 5] = [
    ("cancelled", "1"),
    ("deadline-exceeded", "4"),
    ("resource-exhausted", "8"),
    ("internal", "13"),
    ("unavailable", "14"),
];

/// Istio's default conditions when a policy names none (`connect-failure,refused-stream,
/// unavailable,cancelled,retriable-status-codes`, the latter with 503 unless codes are given).
const DEFAULT_CONDITIONS: [&str; 5] = [
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];

/// Whether `resp` is an outcome `policy` retries (Envoy's `retry_on` semantics).
pub fn retriable(policy: &RetryPolicy, resp: &Response<Body>) -> bool {
    let status = resp.status().as_u16();
    let flag = resp.extensions().get::<ResponseFlag>().copied();
    let reset = flag == Some(ResponseFlag::UpstreamRemoteReset);
    let connect = flag == Some(ResponseFlag::UpstreamConnectionFailure);
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok());
    let default_codes = [503];
    let codes: &[u16] = if policy.codes.is_empty() && policy.retry_on.is_empty() {
        &default_codes
    } else {
        &policy.codes
    };
    let holds = |c: &str| match c {
        "5xx" => status >= 500 || reset || connect,
        "gateway-error" => matches!(status, 502..=504) || reset || connect,
        // Our upstream reports a refused stream as a reset before any response.
        "reset" | "reset-before-request" | "refused-stream" => reset,
        "connect-failure" => connect,
        "retriable-4xx" => status == 409,
        "retriable-status-codes" => codes.contains(&status),
        other => GRPC_CONDITIONS
            .iter()
            .any(|(name, code)| *name == other && grpc == Some(*code)),
    };
    let condition = if policy.retry_on.is_empty() {
        DEFAULT_CONDITIONS.iter().any(|c| holds(c))
    } else {
        policy.retry_on.iter().any(|c| holds(c))
    };
    condition || (!policy.codes.is_empty() && codes.contains(&status))
}

/// Exponential backoff with full jitter: a random wait below `base × 2^(retry-1)`, capped at
/// ten times the base.
fn backoff(base: Option<Duration>, retry: u32) -> Duration {
    let base = base.unwrap_or(BACKOFF_BASE);
    let ceiling = base
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(base * 10);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(fastrand::u64(0..nanos))
}

impl<S: HttpService> tower::Service<Request<Body>> for Retry<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The common case, no policy, costs one lookup.
        let policy = req.extensions().get::<Selected>().and_then(|s| {
            let p = s.route().retry.as_ref().filter(|p| p.attempts > 0)?;
            let max_retries = s
                .table
                .traffic_policy
                .as_ref()
                .and_then(|t| t.connection_pool.max_retries);
            Some((
                p.clone(),
                self.budgets.get(&s.table.namespace, &s.table.name),
                max_retries,
            ))
        });
        let Some((policy, retries, max_retries)) = policy else {
            return self.inner.call(req).boxed();
        };
        retries.budget.deposit();
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        async move {
            let (parts, body) = req.into_parts();
            let replay = Replay::new(body);
            let mut attempt = 1;
            let mut _retrying = None;
            loop {
                let req = Request::from_parts(parts.clone(), replay.attempt_body());
                let mut resp = inner.call(req).await?;
                if !retriable(&policy, &resp) {
                    resp.extensions_mut().insert(Attempts {
                        count: attempt,
                        not_retried: None,
                    });
                    return Ok(resp);
                }
                let stop = if attempt > policy.attempts {
                    Some("attempts")
                } else if !replay.replayable() {
                    Some("request body above the replay buffer")
                } else if !retries.budget.withdraw() {
                    Some("retry budget")
                } else {
                    _retrying = retries.start(max_retries);
                    _retrying
                        .is_none()
                        .then_some("circuit breaker: maxRetries retries in flight")
                };
                if let Some(why) = stop {
                    resp.extensions_mut().insert(RetriesExhausted);
                    resp.extensions_mut().insert(Attempts {
                        count: attempt,
                        not_retried: Some(why),
                    });
                    return Ok(resp);
                }
                drop(resp);
                tokio::time::sleep(backoff(policy.backoff, attempt)).await;
                attempt += 1;
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            }
        }
        .boxed()
    }
}

/// The request body of every attempt: what earlier attempts read is kept and replayed, then
/// the rest of the client's body follows (and is kept too), until the kept bytes pass the limit.
/// `None` for a request without a body (most of them): nothing to keep, no lock to take.
#[derive(Clone)]
struct Replay {
    shared: Option<Arc<Mutex<Kept>>>,
}

struct Kept {
    /// The client's body, not yet read to its end.
    rest: Option<Body>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    /// More than the limit was read: nothing is kept and no later attempt may start.
    overflow: bool,
}

impl Replay {
    fn new(body: Body) -> Self {
        if http_body::Body::is_end_stream(&body) {
            return Self { shared: None };
        }
        Self {
            shared: Some(Arc::new(Mutex::new(Kept {
                rest: Some(body),
                chunks: Vec::new(),
                trailers: None,
                len: 0,
                overflow: false,
            }))),
        }
    }

    fn replayable(&self) -> bool {
        self.shared
            .as_ref()
            .is_none_or(|s| !s.lock().expect("replay lock").overflow)
    }

    fn attempt_body(&self) -> Body {
        let Some(shared) = &self.shared else {
            return body::empty();
        };
        let kept = shared.lock().expect("replay lock");
        if kept.rest.is_none() && kept.chunks.is_empty() && kept.trailers.is_none() {
            return body::empty();
        }
        drop(kept);
        body::boxed(AttemptBody {
            shared: shared.clone(),
            next: 0,
            trailers_sent: false,
        })
    }
}

struct AttemptBody {
    shared: Arc<Mutex<Kept>>,
    next: usize,
    trailers_sent: bool,
}

impl http_body::Body for AttemptBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let mut kept = this.shared.lock().expect("replay lock");
        if let Some(chunk) = kept.chunks.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if let Some(rest) = kept.rest.as_mut() {
            let polled = Pin::new(rest).poll_frame(cx);
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        kept.len += d.len();
                        if kept.overflow || kept.len > REPLAY_LIMIT {
                            kept.overflow = true;
                            kept.chunks = Vec::new();
                        } else {
                            kept.chunks.push(d.clone());
                            this.next += 1;
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        kept.trailers = Some(t.clone());
                        this.trailers_sent = true;
                    }
                }
                Poll::Ready(None) => kept.rest = None,
                Poll::Ready(Some(Err(_))) | Poll::Pending => {}
            }
            return polled;
        }
        if !this.trailers_sent
            && let Some(t) = kept.trailers.clone()
        {
            this.trailers_sent = true;
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        let kept = self.shared.lock().expect("replay lock");
        self.next >= kept.chunks.len()
            && kept.rest.is_none()
            && (self.trailers_sent || kept.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use http::StatusCode;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;
    use crate::layer::testing::{forward, route, selected};

    fn policy(attempts: u32, retry_on: &[&str]) -> RetryPolicy {
        RetryPolicy {
            attempts,
            retry_on: retry_on.iter().map(|s| (*s).to_owned()).collect(),
            backoff: Some(Duration::from_millis(1)),
            ..RetryPolicy::default()
        }
    }

    fn request(p: RetryPolicy, body: Body) -> Request<Body> {
        let mut r = route("r", vec![], forward(&[("whoami", 1)]));
        r.retry = Some(p);
        let mut req = selected(r);
        *req.body_mut() = body;
        *req.method_mut() = http::Method::POST;
        req
    }

    /// An upstream failing the first `fail` calls with `status`, echoing the body it read.
    fn flaky(fail: u32, status: u16) -> (impl HttpService, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let bytes = req.into_body().collect().await.expect("body").to_bytes();
                let mut resp = Response::new(body::full(bytes));
                if n < fail {
                    *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                }
                Ok::<_, Infallible>(resp)
            }
        });
        (svc, calls)
    }

    #[tokio::test]
    async fn a_503_is_retried_with_the_same_body_until_it_succeeds() {
        let (svc, calls) = flaky(2, 503);
        let resp = Retry::new(svc, Arc::default())
            .oneshot(request(policy(3, &["5xx"]), body::full("payload")))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            resp.extensions().get::<Attempts>().map(|a| a.count),
            Some(3)
        );
        let text = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&text[..], b"payload", "the body replayed byte for byte");
    }

    #[tokio::test]
    async fn attempts_run_out_with_urx_and_other_codes_are_not_retried() {
        let (svc, calls) = flaky(10, 503);
        let resp = Retry::new(svc, Arc::default())
            .oneshot(request(policy(2, &["gateway-error"]), body::empty()))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "one try and two retries");
        assert!(resp.extensions().get::<RetriesExhausted>().is_some());
        let (svc, calls) = flaky(10, 500);
        let resp = Retry::new(svc, Arc::default())
            .oneshot(request(policy(2, &["gateway-error"]), body::empty()))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "500 is not a gateway error"
        );
    }

    #[tokio::test]
    async fn a_body_above_the_buffer_is_sent_once() {
        let (svc, calls) = flaky(10, 503);
        let big = Bytes::from(vec![7u8; REPLAY_LIMIT + 1]);
        let resp = Retry::new(svc, Arc::default())
            .oneshot(request(policy(3, &["5xx"]), body::full(big)))
            .await
            .expect("infallible");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            resp.extensions()
                .get::<Attempts>()
                .and_then(|a| a.not_retried),
            Some("request body above the replay buffer")
        );
    }

    #[tokio::test]
    async fn the_budget_bounds_retries_under_sustained_failure() {
        let (svc, calls) = flaky(u32::MAX, 503);
        let budgets = Arc::new(Budgets::default());
        for _ in 0..1000 {
            Retry::new(svc.clone(), budgets.clone())
                .oneshot(request(policy(3, &["5xx"]), body::empty()))
                .await
                .expect("infallible");
        }
        let extra = calls.load(Ordering::SeqCst) - 1000;
        // 20 % of 1000 requests plus the 10/s floor over the 10 s window (the test takes well
        // under a second, so the floor counts once).
        assert!(extra <= 200 + 100 + 10, "{extra} retries for 1000 requests");
        assert!(extra >= 150, "the budget allows retries: {extra}");
    }

    #[test]
    fn conditions_follow_envoy() {
        let resp = |status: u16, flag: Option<ResponseFlag>, grpc: Option<&str>| {
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::from_u16(status).expect("status");
            if let Some(f) = flag {
                r.extensions_mut().insert(f);
            }
            if let Some(g) = grpc {
                r.headers_mut()
                    .insert("grpc-status", g.parse().expect("value"));
            }
            r
        };
        let uf = Some(ResponseFlag::UpstreamConnectionFailure);
        let defaults = policy(1, &[]);
        assert!(
            retriable(&defaults, &resp(503, uf, None)),
            "connect-failure"
        );
        assert!(
            retriable(&defaults, &resp(503, None, None)),
            "503 by default"
        );
        assert!(!retriable(&defaults, &resp(502, None, None)));
        assert!(
            retriable(&defaults, &resp(200, None, Some("14"))),
            "unavailable"
        );
        assert!(!retriable(&defaults, &resp(200, None, Some("13"))));
        let codes = RetryPolicy {
            codes: vec![429],
            ..policy(1, &[])
        };
        assert!(retriable(&codes, &resp(429, None, None)));
        assert!(
            !retriable(&codes, &resp(503, None, None)),
            "only the codes given"
        );
        assert!(
            retriable(&codes, &resp(503, uf, None)),
            "and connect failures"
        );
        assert!(retriable(
            &policy(1, &["retriable-4xx"]),
            &resp(409, None, None)
        ));
        assert!(retriable(
            &policy(1, &["deadline-exceeded"]),
            &resp(200, None, Some("4"))
        ));
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling() {
        for retry in 1..6 {
            let d = backoff(Some(Duration::from_millis(10)), retry);
            assert!(d < Duration::from_millis(10 << (retry - 1)).min(Duration::from_millis(100)));
        }
    }
}
