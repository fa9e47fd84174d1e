//! End-user authentication at the destination: a request carrying an invalid JWT is answered
//! `401` with Envoy's reason as the body and a `www-authenticate` challenge, before authorization
//! and before a byte reaches the workload; a valid one continues with its [`RequestAuth`] in the
//! request's extensions, where authorization reads it.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::{
    body::{self, Body},
    jwt::{self, RequestAuth},
};

/// The node's side: which providers apply to the request's workload, and its key sets.
pub trait Authenticate: Send + Sync + 'static {
    /// `Ok(None)`: no provider applies or no token; `Ok(Some)`: a verified token.
    fn authenticate(&self, req: &mut Request<Body>) -> Result<Option<RequestAuth>, jwt::Error>;
}

#[derive(Clone)]
pub struct AuthenticateLayer<S> {
    inner: S,
    authn: Arc<dyn Authenticate>,
}

impl<S> AuthenticateLayer<S> {
    pub fn new(inner: S, authn: Arc<dyn Authenticate>) -> Self {
        Self { inner, authn }
    }
}

/// The 401 a request with an invalid token gets (Envoy's body and challenge).
pub fn unauthenticated_response(e: jwt::Error) -> Response<Body> {
    let mut resp = Response::new(body::full(e.to_string()));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mesh\", error=\"invalid_token\""),
    );
    resp.extensions_mut().insert(e);
    resp
}

impl<S> tower::Service<Request<Body>> for AuthenticateLayer<S>
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
        match self.authn.authenticate(&mut req) {
            Ok(auth) => {
                if let Some(auth) = auth {
                    req.extensions_mut().insert(auth);
                }
                self.inner.call(req).boxed()
            }
            Err(e) => futures::future::ready(Ok(unauthenticated_response(e))).boxed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        jwt::{Jwks, KeySet, KeySource, Provider, testing::*},
        layer::testing::text,
    };

    struct NoFetched;

    impl KeySource for NoFetched {
        fn keys(&self, _: &str) -> Option<Arc<KeySet>> {
            None
        }
    }

    struct Providers(Vec<Provider>);

    impl Authenticate for Providers {
        fn authenticate(&self, req: &mut Request<Body>) -> Result<Option<RequestAuth>, jwt::Error> {
            jwt::authenticate(&self.0, &NoFetched, req)
        }
    }

    /// Answers with the principal the request arrived with.
    fn principal_echo() -> impl crate::layer::HttpService {
        tower::service_fn(|req: Request<Body>| async move {
            let p = req
                .extensions()
                .get::<RequestAuth>()
                .map_or("-".to_owned(), |a| a.principal.clone());
            Ok::<_, Infallible>(Response::new(body::full(p)))
        })
    }

    #[tokio::test]
    async fn invalid_tokens_get_401_and_valid_ones_carry_their_principal_inward() {
        let key = SigningKey::generate("k");
        let provider = Provider::new(
            "iss",
            Jwks::Inline(Arc::new(KeySet::parse(&jwks(&[&key])).expect("jwks"))),
        );
        let svc = AuthenticateLayer::new(principal_echo(), Arc::new(Providers(vec![provider])));
        let call = |token: Option<String>| {
            let svc = svc.clone();
            async move {
                let mut req = Request::get("/");
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                svc.oneshot(req.body(body::empty()).expect("request"))
                    .await
                    .expect("infallible")
            }
        };
        let ok = call(Some(key.sign(&json!({"iss": "iss", "sub": "ann"})))).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(text(ok).await, "iss/ann");
        let none = call(None).await;
        assert_eq!(text(none).await, "-");
        let expired = call(Some(
            key.sign(&json!({"iss": "iss", "sub": "ann", "exp": now() - 3600})),
        ))
        .await;
        assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            expired.extensions().get::<jwt::Error>(),
            Some(&jwt::Error::Expired)
        );
        assert!(
            expired.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .expect("ascii")
                .contains("invalid_token")
        );
        assert_eq!(text(expired).await, "Jwt is expired");
    }
}
