//! What the route does before and after forwarding: answer itself (redirect, direct response),
//! or change the request (header modifier, URL rewrite) and then the response (header modifier).

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header::LOCATION};

use crate::{
    body::{self, Body},
    flags::ResponseFlag,
    route::{
        Action, Selected,
        filter::{apply_rewrite, modify_headers, redirect_location},
    },
};

#[derive(Clone)]
pub struct Filters<S> {
    inner: S,
}

impl<S> Filters<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

fn direct(status: u16, text: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.extensions_mut().insert(ResponseFlag::Direct);
    resp
}

impl<S> tower::Service<Request<Body>> for Filters<S>
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
        let Some(selected) = req.extensions().get::<Selected>().cloned() else {
            return self.inner.call(req).boxed();
        };
        let route = selected.route();
        match &route.action {
            Action::Redirect(r) => {
                let mut resp = direct(r.status, "");
                if let Ok(loc) = HeaderValue::from_str(&redirect_location(&req, r, selected.prefix))
                {
                    resp.headers_mut().insert(LOCATION, loc);
                }
                return futures::future::ready(Ok(resp)).boxed();
            }
            Action::Respond { status, body } => {
                return futures::future::ready(Ok(direct(*status, body.clone()))).boxed();
            }
            Action::Forward(_) => {}
        }
        modify_headers(req.headers_mut(), &route.request_headers);
        if let Some(rw) = &route.rewrite
            && let Err(e) = apply_rewrite(&mut req, rw, selected.prefix)
        {
            tracing::warn!(route = %route.source, error = %e, "URL rewrite failed; answering 500");
            return futures::future::ready(Ok(direct(500, "invalid URL rewrite"))).boxed();
        }
        self.inner
            .call(req)
            .map(move |Ok(mut resp)| {
                modify_headers(resp.headers_mut(), &selected.route().response_headers);
                Ok(resp)
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, header::HOST};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        layer::testing::{echo, forward, route, selected, text},
        route::{HeaderModifier, PathModifier, RequestRedirect, UrlRewrite},
    };

    #[tokio::test]
    async fn rewrite_and_header_modifiers_reach_upstream_and_client() {
        let mut r = route("r", vec![], forward(&[("whoami", 1)]));
        r.rewrite = Some(UrlRewrite {
            hostname: Some("v2.whoami".into()),
            path: Some(PathModifier::Full("/v2".into())),
        });
        r.request_headers = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-route"),
                HeaderValue::from_static("r"),
            )],
            ..HeaderModifier::default()
        };
        r.response_headers = HeaderModifier {
            remove: vec![HeaderName::from_static("x-route")],
            add: vec![(
                HeaderName::from_static("x-served"),
                HeaderValue::from_static("1"),
            )],
            ..HeaderModifier::default()
        };
        let resp = Filters::new(echo())
            .oneshot(selected(r))
            .await
            .expect("infallible");
        assert_eq!(
            resp.headers()[HOST],
            "v2.whoami",
            "rewritten host reached the upstream"
        );
        assert!(
            !resp.headers().contains_key("x-route"),
            "response modifier removed what the request modifier set"
        );
        assert_eq!(resp.headers()["x-served"], "1");
        assert_eq!(text(resp).await, "GET /v2");
    }

    #[tokio::test]
    async fn redirects_and_direct_responses_never_reach_upstream() {
        let panics = tower::service_fn(|_req: Request<Body>| async {
            panic!("upstream must not be called")
        });
        let r = route(
            "r",
            vec![],
            Action::Redirect(RequestRedirect {
                scheme: Some("https".into()),
                hostname: Some("example.test".into()),
                path: None,
                port: None,
                status: 301,
            }),
        );
        let resp = Filters::new(panics)
            .oneshot(selected(r))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(resp.headers()[LOCATION], "https://example.test/");
        let r = route(
            "r",
            vec![],
            Action::Respond {
                status: 503,
                body: "down".into(),
            },
        );
        let resp = Filters::new(panics)
            .oneshot(selected(r))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text(resp).await, "down");
    }
}
