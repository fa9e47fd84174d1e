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
    /// The route's timeout passed: 504.
    UpstreamRequestTimeout,
    /// The client went away before the response was complete.
    DownstreamConnectionTermination,
    /// A fault injection aborted the request (its status is the configured one).
    FaultInjected,
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
            Self::UpstreamRequestTimeout => "UT",
            Self::DownstreamConnectionTermination => "DC",
            Self::FaultInjected => "FI",
            Self::Direct => "-",
        }
    }

    /// The status a proxy answers with when this flag ends a request before the upstream did.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::UpstreamRequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Direct => StatusCode::OK,
            Self::NoHealthyUpstream
            | Self::UpstreamConnectionFailure
            | Self::UpstreamRemoteReset
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
            Self::UpstreamRequestTimeout => "upstream request timeout",
            Self::FaultInjected => "fault filter abort",
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

/// The `response_flags` value: `-`, one flag, or with an injected delay both, comma-separated in
/// Envoy's order (`DC` first, then the upstream flags, then `DI`, then `FI`).
pub fn label(flag: Option<ResponseFlag>, delayed: bool) -> &'static str {
    use ResponseFlag as F;
    match (flag, delayed) {
        (None | Some(F::Direct), false) => "-",
        (Some(f), false) => f.as_str(),
        (None | Some(F::Direct), true) => "DI",
        (Some(F::DownstreamConnectionTermination), true) => "DC,DI",
        (Some(F::NoHealthyUpstream), true) => "UH,DI",
        (Some(F::UpstreamRequestTimeout), true) => "UT,DI",
        (Some(F::UpstreamRemoteReset), true) => "UR,DI",
        (Some(F::UpstreamConnectionFailure), true) => "UF,DI",
        (Some(F::NoRoute), true) => "NR,DI",
        (Some(F::FaultInjected), true) => "DI,FI",
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
