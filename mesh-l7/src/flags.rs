//! Istio's (Envoy's) response flags: why a request ended the way it did, in the
//! `response_flags` metric label and the access log. Layers that answer a request themselves put
//! a [`ResponseFlag`] in the response's extensions; the record layer reads it.

use std::fmt;

use http::{Response, StatusCode};

use crate::body::{self, Body};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// No route matched: 404.
    NoRoute,
    /// No healthy endpoint for the chosen backend: 503.
    NoHealthyUpstream,
    /// Could not connect to the endpoint: 503.
    UpstreamConnectionFailure,
    /// The endpoint reset or closed the connection before answering: 503.
    UpstreamRemoteReset,
    /// A circuit breaker's limit (DestinationRule `connectionPool`) refused the request: 503.
    UpstreamOverflow,
    /// The route's timeout passed: 504.
    UpstreamRequestTimeout,
    /// The client went away before the response was complete.
    DownstreamConnectionTermination,
    /// A fault injection aborted the request (its status is the configured one).
    FaultInjected,
    /// A local rate limit refused the request: 429.
    RateLimited,
    /// The route sent a redirect or a direct response (Envoy reports these without a flag; we
    /// keep "-" in metrics and say it in the access log).
    Direct,
}

impl ResponseFlag {
    /// Envoy's short name, as Istio's `response_flags` label carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "NR",
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamConnectionFailure => "UF",
            Self::UpstreamRemoteReset => "UR",
            Self::UpstreamOverflow => "UO",
            Self::UpstreamRequestTimeout => "UT",
            Self::DownstreamConnectionTermination => "DC",
            Self::FaultInjected => "FI",
            Self::RateLimited => "RL",
            Self::Direct => "-",
        }
    }

    /// The status a proxy answers with when this flag ends a request before the upstream did.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamRequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Direct => StatusCode::OK,
            Self::NoHealthyUpstream
            | Self::UpstreamConnectionFailure
            | Self::UpstreamRemoteReset
            | Self::UpstreamOverflow
            | Self::DownstreamConnectionTermination
            | Self::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Envoy's body text for a locally generated response.
    fn body(self) -> &'static str {
        match self {
            Self::NoHealthyUpstream => "no healthy upstream",
            Self::UpstreamConnectionFailure => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Self::UpstreamRemoteReset => {
                "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
            }
            Self::UpstreamOverflow => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            Self::UpstreamRequestTimeout => "upstream request timeout",
            Self::FaultInjected => "fault filter abort",
            Self::RateLimited => "local_rate_limited",
            Self::NoRoute | Self::DownstreamConnectionTermination | Self::Direct => "",
        }
    }

    /// The response the proxy answers with itself.
    pub fn response(self) -> Response<Body> {
        let text = self.body();
        let mut r = Response::new(body::full(text));
        *r.status_mut() = self.status();
        if !text.is_empty() {
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
        }
        r.extensions_mut().insert(self);
        r
    }
}

/// Marks a response whose request a fault injection delayed (`DI`); it joins any other flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelayInjected;

/// The `response_flags` value: `-`, or every flag that applies, comma-separated in Envoy's
/// order (`DC`, the upstream flags, `URX`, `NR`, `DI`, `FI`), e.g. `UF,URX` or `UT,DI`.
pub fn label(flag: Option<ResponseFlag>, delayed: bool, retries_exhausted: bool) -> &'static str {
    use ResponseFlag as F;
    let flag = flag.filter(|f| *f != F::Direct);
    match (flag, delayed, retries_exhausted) {
        (None, false, false) => return "-",
        (Some(f), false, false) => return f.as_str(),
        _ => {}
    }
    let order = |f: F| match f {
        F::DownstreamConnectionTermination => 0,
        F::NoHealthyUpstream => 1,
        F::UpstreamRequestTimeout => 2,
        F::UpstreamRemoteReset => 3,
        F::UpstreamConnectionFailure | F::UpstreamOverflow => 4,
        F::NoRoute => 6,
        F::FaultInjected => 8,
        F::Direct => 9,
        F::RateLimited => 10,
    };
    let mut parts: Vec<(u8, &'static str)> =
        flag.map(|f| (order(f), f.as_str())).into_iter().collect();
    if retries_exhausted {
        parts.push((5, "URX"));
    }
    if delayed {
        parts.push((7, "DI"));
    }
    parts.sort_unstable();
    let joined = parts.iter().map(|(_, s)| *s).collect::<Vec<_>>().join(",");
    intern(joined)
}

/// A combination's string, made once: there are only a few dozen, and metric labels want
/// `&'static str`.
fn intern(s: String) -> &'static str {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().expect("flags lock");
    if let Some(found) = seen.iter().find(|x| **x == s) {
        return found;
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    seen.push(leaked);
    leaked
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_flags_in_envoys_order() {
        use ResponseFlag as F;
        assert_eq!(label(None, false, false), "-");
        assert_eq!(label(Some(F::Direct), false, false), "-");
        assert_eq!(
            label(Some(F::UpstreamConnectionFailure), false, true),
            "UF,URX"
        );
        assert_eq!(label(Some(F::UpstreamRequestTimeout), true, false), "UT,DI");
        assert_eq!(label(Some(F::FaultInjected), true, false), "DI,FI");
        assert_eq!(label(None, true, true), "URX,DI");
        assert_eq!(
            label(Some(F::DownstreamConnectionTermination), true, false),
            "DC,DI"
        );
        assert!(
            std::ptr::eq(label(None, true, false), label(None, true, false)),
            "interned"
        );
    }
}
