//! Picks the route: the latest table of the connection's Service (so a route change applies to
//! the next request, also on kept-alive connections), first match. No match: 404 `NR`.
//! The [`Selected`] route goes into the request's extensions for the layers below, and into the
//! response's for the record layer.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{Request, Response};

use crate::{
    body::Body,
    flags::ResponseFlag,
    route::{
        RouteTable, Selected,
        matching::{Client, RequestView},
    },
};

/// Where the router finds the current table (the node reads its latest config).
pub trait RouteLookup: Send + Sync + 'static {
    fn table(&self) -> Arc<RouteTable>;
}

impl<F: Fn() -> Arc<RouteTable> + Send + Sync + 'static> RouteLookup for F {
    fn table(&self) -> Arc<RouteTable> {
        self()
    }
}

/// The calling workload, for consumer routes and `sourceLabels`/`sourceNamespace` matches.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub namespace: Option<Arc<str>>,
    pub labels: Option<Arc<BTreeMap<String, String>>>,
}

#[derive(Clone)]
pub struct Router<S> {
    inner: S,
    lookup: Arc<dyn RouteLookup>,
    /// The Service port the connection was addressed to.
    port: u16,
    client: ClientInfo,
}

impl<S> Router<S> {
    pub fn new(inner: S, lookup: Arc<dyn RouteLookup>, port: u16, client: ClientInfo) -> Self {
        Self {
            inner,
            lookup,
            port,
            client,
        }
    }
}

impl<S> tower::Service<Request<Body>> for Router<S>
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
        let table = self.lookup.table();
        let client = Client {
            namespace: self.client.namespace.as_deref(),
            labels: self.client.labels.as_deref(),
        };
        let Some(selected) = Selected::find(&table, &RequestView::of(&req, self.port, client))
        else {
            return futures::future::ready(Ok(ResponseFlag::NoRoute.response())).boxed();
        };
        req.extensions_mut().insert(selected.clone());
        self.inner
            .call(req)
            .map(move |Ok(mut resp)| {
                resp.extensions_mut().insert(selected);
                Ok(resp)
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        body,
        layer::testing::{echo, forward, route, table},
        route::matching::{RouteMatch, StringMatch},
    };

    fn path(p: &str) -> RouteMatch {
        RouteMatch {
            path: Some(StringMatch::path_prefix(p)),
            ..RouteMatch::default()
        }
    }

    #[tokio::test]
    async fn the_latest_table_decides_each_request() {
        let current = Arc::new(std::sync::Mutex::new(table(vec![route(
            "api",
            vec![path("/api")],
            forward(&[("whoami", 1)]),
        )])));
        let lookup = {
            let current = current.clone();
            move || current.lock().expect("lock").clone()
        };
        let router = Router::new(echo(), Arc::new(lookup), 80, ClientInfo::default());
        let get = |p: &str| Request::get(p).body(body::empty()).expect("request");
        let resp = router
            .clone()
            .oneshot(get("/api/x"))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.extensions()
                .get::<Selected>()
                .expect("selected")
                .route()
                .source
                .name,
            "api"
        );
        let resp = router
            .clone()
            .oneshot(get("/web"))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            resp.extensions().get::<ResponseFlag>(),
            Some(&ResponseFlag::NoRoute)
        );
        // A route change applies to the next request on the same service (connection).
        *current.lock().expect("lock") = table(vec![route(
            "web",
            vec![path("/web")],
            forward(&[("whoami", 1)]),
        )]);
        let resp = router.oneshot(get("/web")).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn consumer_routes_replace_producer_routes_for_their_namespace() {
        let mut t = RouteTable::clone(&table(vec![route(
            "producer",
            vec![],
            forward(&[("whoami", 1)]),
        )]));
        t.consumers.insert(
            "client-ns".into(),
            vec![route("consumer", vec![], forward(&[("whoami-v2", 1)]))],
        );
        let t = Arc::new(t);
        let name = |ns: Option<&str>| {
            let t = t.clone();
            let client = ClientInfo {
                namespace: ns.map(Arc::from),
                labels: None,
            };
            async move {
                let r = Router::new(echo(), Arc::new(move || t.clone()), 80, client);
                let resp = r
                    .oneshot(Request::get("/").body(body::empty()).expect("request"))
                    .await
                    .expect("infallible");
                resp.extensions()
                    .get::<Selected>()
                    .expect("selected")
                    .route()
                    .source
                    .name
                    .clone()
            }
        };
        assert_eq!(name(Some("client-ns")).await, "consumer");
        assert_eq!(name(Some("other")).await, "producer");
        assert_eq!(name(None).await, "producer");
    }
}
