//! The one body type every layer passes around, and small constructors.

use std::fmt;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, combinators::UnsyncBoxBody};

/// Errors from wherever a body or connection failed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A body's error. A named type rather than `BoxError` itself: futures holding a `dyn Error`
/// inside a generic body type trip rustc's `Send` inference for async blocks ("implementation
/// of `Send` is not general enough"), a nominal type does not.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A streaming body: requests and responses are never buffered whole.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Any body whose errors convert, boxed.
pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(|e| BodyError(e.into())).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body that keeps `value` alive until it has been read to its end or dropped.
    struct Holding<T> {
        #[pin]
        body: Body,
        value: Option<T>,
    }
}

impl<T> http_body::Body for Holding<T> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            this.value.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// `body`, keeping `value` (a guard: a permit, a counter) until the body ends or is dropped.
pub fn holding<T: Send + 'static>(body: Body, value: T) -> Body {
    if http_body::Body::is_end_stream(&body) {
        return body;
    }
    Holding {
        body,
        value: Some(value),
    }
    .boxed_unsync()
}
