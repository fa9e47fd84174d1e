//! The span model: what one proxy reports about one request, in the terms Envoy's tracers use,
//! independent of the wire format a collector wants ([`super::zipkin`], OTLP in the node).

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Deref,
    sync::Arc,
    time::{Duration, SystemTime},
};

/// Which side of the request this proxy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpanKind {
    /// The source node: the span of the call as its client sent it.
    Client,
    /// The destination node: the span of the call as the server received it.
    Server,
}

/// A trace id: 128 bits, or 64 when it arrived in a 64-bit B3 header, which is remembered so that
/// B3 headers and Zipkin spans carry it onward at the width the caller used (16 hex digits).
/// `traceparent` always carries 32 digits (the 64-bit id zero-padded on the left, as B3 says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId {
    id: u128,
    b3_64: bool,
}

impl TraceId {
    /// A 128-bit id.
    pub fn new(id: u128) -> Self {
        Self { id, b3_64: false }
    }

    /// A 64-bit B3 id.
    pub fn b3_64(id: u64) -> Self {
        Self {
            id: u128::from(id),
            b3_64: true,
        }
    }

    /// A new random, non-zero, 128-bit id.
    pub fn random() -> Self {
        Self::new(fastrand::u128(1..))
    }

    pub fn get(self) -> u128 {
        self.id
    }

    /// It arrived as a 64-bit B3 id.
    pub fn is_64(self) -> bool {
        self.b3_64
    }
}

/// Lower-case hex: 16 digits for a 64-bit B3 id, else 32.
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.b3_64 {
            write!(f, "{:016x}", self.id)
        } else {
            write!(f, "{:032x}", self.id)
        }
    }
}

/// A span id (64 bits, never zero when valid).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub u64);

impl SpanId {
    /// A new random, non-zero id.
    pub fn random() -> Self {
        Self(fastrand::u64(1..))
    }
}

/// Lower-case hex, 16 digits.
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One finished span.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's span (absent for a trace this proxy started).
    pub parent_id: Option<SpanId>,
    /// `{host}:{port}/*`, as Istio names proxy spans.
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub duration: Duration,
    /// `{canonical_service}.{namespace}`: Istio's service name for the proxy's workload.
    pub local_service: Arc<str>,
    pub local_ip: Option<IpAddr>,
    /// The upstream endpoint (client spans) or the downstream peer (server spans).
    pub remote: Option<SocketAddr>,
    /// Envoy's and Istio's tag names and values, `error` included when it applies.
    pub tags: Vec<(Cow<'static, str>, TagText)>,
    /// The request failed: a 5xx, or a response flag.
    pub error: bool,
}

impl Span {
    /// The value of tag `name`.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A tag's value. Most of a span's tags are the same for every request of a connection (the
/// node, the workload's names): those are shared with it, so a span costs a reference count for
/// them instead of an allocation, which matters when every request is sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagText {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
}

impl TagText {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Static(s) => s,
            Self::Shared(s) => s,
            Self::Owned(s) => s,
        }
    }

    /// Cut to at most `max` bytes, on a character boundary (`maxTagLength`).
    pub fn truncate(&mut self, max: usize) {
        if self.len() <= max {
            return;
        }
        let mut end = max;
        while !self.is_char_boundary(end) {
            end -= 1;
        }
        *self = Self::Owned(self[..end].to_owned());
    }
}

impl Deref for TagText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TagText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl From<&'static str> for TagText {
    fn from(s: &'static str) -> Self {
        Self::Static(s)
    }
}

impl From<String> for TagText {
    fn from(s: String) -> Self {
        Self::Owned(s)
    }
}

impl From<Arc<str>> for TagText {
    fn from(s: Arc<str>) -> Self {
        Self::Shared(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_cut_on_character_boundaries() {
        let mut v = TagText::from("h\u{e9}llo");
        v.truncate(2);
        assert_eq!(
            v.as_str(),
            "h",
            "é is two bytes: cutting inside it keeps what precedes it"
        );
        let mut v = TagText::from("h\u{e9}llo".to_owned());
        v.truncate(4);
        assert_eq!(v.as_str(), "h\u{e9}l");
        let mut short = TagText::from("ok");
        short.truncate(256);
        assert_eq!(
            short,
            TagText::Static("ok"),
            "short values stay as they are"
        );
    }

    #[test]
    fn ids_print_as_lower_hex_at_their_width() {
        assert_eq!(
            TraceId::new(0xabc).to_string(),
            "00000000000000000000000000000abc"
        );
        assert_eq!(TraceId::b3_64(0xabc).to_string(), "0000000000000abc");
        assert_eq!(SpanId(0xABC).to_string(), "0000000000000abc");
        assert_ne!(TraceId::random().get(), 0);
        assert_ne!(SpanId::random().0, 0);
    }
}
