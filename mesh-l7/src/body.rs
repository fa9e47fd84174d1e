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
