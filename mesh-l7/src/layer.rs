//! The request layers, each a small tower `Service` wrapper with a test of its own. Outbound
//! (source node), outside-in: [`crate::record`] → [`trace`] → [`router`] → [`fault`] →
//! [`timeout`] → [`filters`] → [`mirror`] → [`retry`] → [`split`] → the node's upstream. Inbound
//! (destination node): [`crate::record`] → [`trace`] → [`authenticate`] → [`authorize`] →
//! [`rate_limit`] → the node's connection to the local pod.
//!
//! [`trace`] comes right after [`crate::record`], outside every layer that may answer a request
//! itself: a request the router, a fault or a policy answers still gets its span, and the span
//! sees the peers, the endpoint and the response flags the inner layers put in the response.
//!
//! Every layer answers errors itself (a response with a [`crate::flags::ResponseFlag`]), so the
//! stacks are infallible and the record layer sees every outcome.

pub mod authenticate;
pub mod authorize;
pub mod fault;
pub mod filters;
pub mod mirror;
pub mod rate_limit;
pub mod retry;
pub mod router;
pub mod split;
pub mod timeout;
pub mod trace;

use std::convert::Infallible;

use http::{Request, Response};

use crate::body::Body;

/// What every layer wraps and is: an infallible, cloneable HTTP service.
pub trait HttpService:
    tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> HttpService for T where
    T: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A boxed [`HttpService`], for stacks assembled at run time.
pub type BoxHttp = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Test helpers shared by the layers' tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::{convert::Infallible, sync::Arc};

    use http::{Request, Response};
    use http_body_util::BodyExt as _;

    use crate::{
        body::{self, Body},
        route::{
            Action, Backend, HeaderModifier, Route, RouteSource, RouteTable, Selected, SourceKind,
            Timeouts, matching::RouteMatch,
        },
    };

    pub fn route(name: &str, matches: Vec<RouteMatch>, action: Action) -> Route {
        Route {
            source: RouteSource {
                kind: SourceKind::HttpRoute,
                namespace: "demo".into(),
                name: name.into(),
                rule: 0,
                rule_name: None,
            },
            matches,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
            rewrite: None,
            action,
            mirrors: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
            fault: None,
        }
    }

    pub fn forward(backends: &[(&str, u32)]) -> Action {
        Action::Forward(
            backends
                .iter()
                .map(|(n, w)| Backend {
                    weight: *w,
                    ..Backend::service("demo", n)
                })
                .collect(),
        )
    }

    pub fn table(routes: Vec<Route>) -> Arc<RouteTable> {
        Arc::new(RouteTable {
            routes,
            ..RouteTable::default_for("demo", "whoami")
        })
    }

    /// A request that already took `route` (what the router layer would have inserted).
    pub fn selected(route: Route) -> Request<Body> {
        let mut req = Request::get("/").body(body::empty()).expect("request");
        req.extensions_mut().insert(Selected {
            table: table(vec![route]),
            consumer: None,
            index: 0,
            prefix: None,
        });
        req
    }

    /// An upstream that answers 200 with the request's method and path and echoes headers.
    pub fn echo() -> impl crate::layer::HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let mut resp = Response::new(body::full(format!("{} {}", req.method(), req.uri())));
            for (k, v) in req.headers() {
                resp.headers_mut().append(k.clone(), v.clone());
            }
            Ok::<_, Infallible>(resp)
        })
    }

    pub async fn text(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }
}
