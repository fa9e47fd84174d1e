//! Local rate limiting at the destination (a `LocalRateLimit` on the Service): Envoy's token
//! bucket per pod, or per pod and key (the caller's identity, a header's value). A request that
//! finds its bucket empty is answered `429` with body `local_rate_limited` and flag `RL`, before
//! it reaches the pod; every answer carries `x-ratelimit-limit`, `x-ratelimit-remaining` and
//! `x-ratelimit-reset` (seconds to the next fill), the IETF draft's headers.
//!
//! The buckets live in [`Buckets`], shared by every connection of the node, so a limit holds
//! across connections. Memory is bounded: at most `max_keys` keyed buckets per pod; requests with
//! further keys share one overflow bucket, and idle full buckets are dropped to make room.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderValue, Request, Response};

use crate::{
    body::Body,
    bucket::{Bucket, Refill},
    flags::ResponseFlag,
    policy::RateLimit,
};

/// The buckets of one pod under one limit.
struct Scope {
    limit: Arc<RateLimit>,
    unkeyed: Bucket,
    keyed: HashMap<String, Bucket>,
    overflow: Bucket,
}

/// What a request was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

/// Every bucket of this node, by scope (the limit's Service and the pod).
#[derive(Default)]
pub struct Buckets {
    scopes: Mutex<HashMap<String, Scope>>,
}

impl Buckets {
    /// Takes a token for one request to `scope` under `limit`, from the bucket of `key` (when
    /// the limit is keyed). A changed limit starts its buckets afresh.
    pub fn take(
        &self,
        scope: &str,
        limit: &Arc<RateLimit>,
        key: Option<&str>,
        now: Instant,
    ) -> Decision {
        let fill = Refill {
            max_tokens: limit.max_tokens,
            tokens_per_fill: limit.tokens_per_fill,
            interval: limit.fill_interval,
        };
        let mut scopes = self.scopes.lock().unwrap_or_else(PoisonError::into_inner);
        let s = match scopes.get_mut(scope) {
            Some(s) if *s.limit == **limit => s,
            _ => {
                let fresh = Scope {
                    limit: limit.clone(),
                    unkeyed: Bucket::full(&fill, now),
                    keyed: HashMap::new(),
                    overflow: Bucket::full(&fill, now),
                };
                scopes.insert(scope.to_owned(), fresh);
                scopes.get_mut(scope).expect("just inserted")
            }
        };
        let bucket = match key {
            None => &mut s.unkeyed,
            Some(k) => {
                if !s.keyed.contains_key(k) && s.keyed.len() >= limit.max_keys as usize {
                    // Make room from buckets that are full again (their callers went quiet).
                    s.keyed.retain(|_, b| {
                        b.refill(&fill, now);
                        b.tokens < limit.max_tokens
                    });
                }
                if s.keyed.contains_key(k) || s.keyed.len() < limit.max_keys as usize {
                    s.keyed
                        .entry(k.to_owned())
                        .or_insert_with(|| Bucket::full(&fill, now))
                } else {
                    &mut s.overflow
                }
            }
        };
        let allowed = bucket.take(&fill, now);
        Decision {
            allowed,
            limit: limit.max_tokens,
            remaining: bucket.tokens,
            reset: bucket.reset_in(&fill, now),
        }
    }

    /// Scopes held (tests, metrics).
    pub fn len(&self) -> usize {
        self.scopes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which limit applies to a request, and from which bucket it takes: the node's side.
pub trait Limiter: Send + Sync + 'static {
    /// `None`: no limit applies.
    fn check(&self, req: &Request<Body>) -> Option<Decision>;
}

#[derive(Clone)]
pub struct RateLimitLayer<S> {
    inner: S,
    limiter: Arc<dyn Limiter>,
}

impl<S> RateLimitLayer<S> {
    pub fn new(inner: S, limiter: Arc<dyn Limiter>) -> Self {
        Self { inner, limiter }
    }
}

fn headers(resp: &mut Response<Body>, d: Decision) {
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert(
        "x-ratelimit-reset",
        HeaderValue::from(d.reset.as_secs_f64().ceil() as u64),
    );
}

impl<S> tower::Service<Request<Body>> for RateLimitLayer<S>
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
        match self.limiter.check(&req) {
            None => self.inner.call(req).boxed(),
            Some(d) if !d.allowed => {
                let mut resp = ResponseFlag::RateLimited.response();
                headers(&mut resp, d);
                futures::future::ready(Ok(resp)).boxed()
            }
            Some(d) => {
                let fut = self.inner.call(req);
                async move {
                    let mut resp = fut.await?;
                    headers(&mut resp, d);
                    Ok(resp)
                }
                .boxed()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;
    use crate::{layer::testing, policy::RateLimitKey};

    fn limit(max: u32, per_fill: u32, ms: u64, key: RateLimitKey, max_keys: u32) -> Arc<RateLimit> {
        Arc::new(RateLimit {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(ms),
            key,
            max_keys,
        })
    }

    #[test]
    fn a_bucket_starts_full_refills_per_interval_and_never_above_max() {
        let b = Buckets::default();
        let l = limit(3, 2, 1000, RateLimitKey::None, 10);
        let t0 = Instant::now();
        let taken = (0..5).filter(|_| b.take("s", &l, None, t0).allowed).count();
        assert_eq!(taken, 3, "full bucket of 3");
        let d = b.take("s", &l, None, t0 + Duration::from_millis(999));
        assert!(!d.allowed && d.reset <= Duration::from_millis(1));
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(
            (0..5).filter(|_| b.take("s", &l, None, t1).allowed).count(),
            2,
            "one fill of 2"
        );
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(
            (0..5).filter(|_| b.take("s", &l, None, t2).allowed).count(),
            3,
            "capped at max"
        );
    }

    #[test]
    fn keys_get_their_own_buckets_up_to_max_keys_then_share_one() {
        let b = Buckets::default();
        let l = limit(1, 1, 1000, RateLimitKey::SourcePrincipal, 2);
        let t = Instant::now();
        assert!(b.take("s", &l, Some("a"), t).allowed);
        assert!(b.take("s", &l, Some("b"), t).allowed);
        assert!(
            !b.take("s", &l, Some("a"), t).allowed,
            "a's bucket is empty"
        );
        assert!(
            b.take("s", &l, Some("c"), t).allowed,
            "c: the shared overflow bucket"
        );
        assert!(
            !b.take("s", &l, Some("d"), t).allowed,
            "d shares c's (empty) bucket"
        );
        // A second later a and b are full again and idle: room for new keys.
        let later = t + Duration::from_secs(2);
        assert!(b.take("s", &l, Some("e"), later).allowed);
        assert!(b.take("s", &l, Some("f"), later).allowed);
    }

    struct Fixed(Arc<Buckets>, Arc<RateLimit>);

    impl Limiter for Fixed {
        fn check(&self, _req: &Request<Body>) -> Option<Decision> {
            Some(self.0.take("s", &self.1, None, Instant::now()))
        }
    }

    #[tokio::test]
    async fn an_empty_bucket_answers_429_rl_with_the_headers() {
        let svc = RateLimitLayer::new(
            testing::echo(),
            Arc::new(Fixed(
                Arc::default(),
                limit(1, 1, 60_000, RateLimitKey::None, 1),
            )),
        );
        let ok = svc
            .clone()
            .oneshot(Request::new(crate::body::empty()))
            .await
            .expect("infallible");
        assert_eq!(ok.status(), 200);
        assert_eq!(
            (
                ok.headers()["x-ratelimit-limit"].to_str().ok(),
                ok.headers()["x-ratelimit-remaining"].to_str().ok()
            ),
            (Some("1"), Some("0"))
        );
        let limited = svc
            .oneshot(Request::new(crate::body::empty()))
            .await
            .expect("infallible");
        assert_eq!(limited.status(), 429);
        assert_eq!(
            limited.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::RateLimited)
        );
        assert_eq!(limited.headers()["x-ratelimit-reset"], "60");
    }
}
