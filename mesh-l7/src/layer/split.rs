//! Chooses the backend Service of a forwarding route by weight (a canary's 90/10), applies the
//! backend's header modifiers, and bounds one attempt by the route's backend request timeout.
//! The choice goes into the request's extensions as [`Chosen`]; the node's upstream picks an
//! endpoint of it. A route whose backends all have weight 0 (or none) answers 500, as Gateway
//! API requires.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{Request, Response, StatusCode};

use super::timeout::limit;
use crate::{
    body::{self, Body},
    flags::ResponseFlag,
    route::{Action, Backend, Selected, filter::modify_headers},
};

/// The backend a request is sent to: a route backend or, for a mirrored copy, a mirror's.
#[derive(Clone, Debug)]
pub struct Chosen {
    pub selected: Selected,
    pub which: Which,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Backend(usize),
    Mirror(usize),
}

impl Chosen {
    pub fn backend(&self) -> &Backend {
        let route = self.selected.route();
        match self.which {
            Which::Backend(i) => match &route.action {
                Action::Forward(b) => &b[i],
                _ => unreachable!("a backend is chosen only for a forwarding route"),
            },
            Which::Mirror(i) => &route.mirrors[i].backend,
        }
    }
}

/// Index of the backend a uniform `r` in `0..total weight` falls on.
pub fn weighted_index(backends: &[Backend], mut r: u64) -> Option<usize> {
    for (i, b) in backends.iter().enumerate() {
        let w = u64::from(b.weight);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[derive(Clone)]
pub struct Split<S> {
    inner: S,
}

impl<S> Split<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> tower::Service<Request<Body>> for Split<S>
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // A mirrored copy already names its backend.
        let chosen = if let Some(c) = req.extensions().get::<Chosen>() {
            c.clone()
        } else {
            {
                let Some(selected) = req.extensions().get::<Selected>().cloned() else {
                    return self.inner.call(req).boxed();
                };
                let Action::Forward(backends) = &selected.route().action else {
                    return self.inner.call(req).boxed();
                };
                let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
                let Some(i) = (total > 0)
                    .then(|| fastrand::u64(0..total))
                    .and_then(|r| weighted_index(backends, r))
                else {
                    let mut resp = Response::new(body::full("no backend with a weight above 0"));
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    resp.extensions_mut().insert(ResponseFlag::Direct);
                    return futures::future::ready(Ok(resp)).boxed();
                };
                let chosen = Chosen {
                    selected,
                    which: Which::Backend(i),
                };
                req.extensions_mut().insert(chosen.clone());
                chosen
            }
        };
        modify_headers(req.headers_mut(), &chosen.backend().request_headers);
        // One attempt: a retry policy's `perTryTimeout`, else the route's backend timeout.
        let route = chosen.selected.route();
        let per_try = route
            .retry
            .as_ref()
            .and_then(|r| r.per_try_timeout)
            .or(route.timeouts.backend_request);
        limit(self.inner.call(req), per_try)
            .map(move |Ok(mut resp)| {
                modify_headers(resp.headers_mut(), &chosen.backend().response_headers);
                Ok(resp)
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tower::ServiceExt as _;

    use super::*;
    use crate::layer::testing::{forward, route, selected};

    #[test]
    fn weights_partition_the_range() {
        let Action::Forward(b) = forward(&[("v1", 90), ("v2", 0), ("v3", 10)]) else {
            unreachable!()
        };
        assert_eq!(weighted_index(&b, 0), Some(0));
        assert_eq!(weighted_index(&b, 89), Some(0));
        assert_eq!(weighted_index(&b, 90), Some(2), "weight 0 never chosen");
        assert_eq!(weighted_index(&b, 99), Some(2));
        assert_eq!(weighted_index(&b, 100), None);
    }

    #[tokio::test]
    async fn a_90_10_split_sends_about_a_tenth_to_the_canary() {
        let upstream = tower::service_fn(|req: Request<Body>| async move {
            let name = req
                .extensions()
                .get::<Chosen>()
                .expect("chosen")
                .backend()
                .name
                .clone();
            let mut resp = Response::new(body::empty());
            resp.extensions_mut().insert(name);
            Ok::<_, Infallible>(resp)
        });
        let r = route("r", vec![], forward(&[("v1", 90), ("v2", 10)]));
        let mut counts = BTreeMap::<String, u32>::new();
        for _ in 0..10_000 {
            let resp = Split::new(upstream)
                .oneshot(selected(r.clone()))
                .await
                .expect("infallible");
            *counts
                .entry(resp.extensions().get::<String>().expect("name").clone())
                .or_default() += 1;
        }
        let v2 = counts.get("v2").copied().unwrap_or(0);
        assert!(
            (800..=1200).contains(&v2),
            "v2 got {v2} of 10000: {counts:?}"
        );
    }

    #[tokio::test]
    async fn zero_total_weight_answers_500() {
        let panics = tower::service_fn(|_req: Request<Body>| async {
            panic!("upstream must not be called")
        });
        let resp = Split::new(panics)
            .oneshot(selected(route("r", vec![], forward(&[("v1", 0)]))))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
