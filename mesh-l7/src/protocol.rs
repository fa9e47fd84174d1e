//! Which traffic is HTTP: decided once per Service port, from what Kubernetes and Istio users
//! already write. Everything else stays on the L4 path, byte for byte.

use serde::Serialize;

/// How the mesh handles a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Opaque TCP: the L4 proxy relays bytes.
    Tcp,
    /// HTTP/1.1 to the backend (clients may speak HTTP/1.1 or HTTP/2).
    Http,
    /// HTTP/2 without TLS (prior knowledge) to the backend.
    Http2,
    /// gRPC: HTTP/2 to the backend; requests are reported as `grpc`.
    Grpc,
}

impl AppProtocol {
    /// From the Service port's `appProtocol` (wins when set and known) or, as Istio does, the
    /// port name: `http`, `http2`, `grpc`, or those followed by `-suffix`.
    pub fn classify(port_name: &str, app_protocol: Option<&str>) -> Self {
        if let Some(p) = app_protocol.and_then(Self::from_app_protocol) {
            return p;
        }
        let name = port_name.to_ascii_lowercase();
        let prefix = name.split_once('-').map_or(name.as_str(), |(p, _)| p);
        match prefix {
            "http" => Self::Http,
            "http2" => Self::Http2,
            "grpc" => Self::Grpc,
            _ => Self::Tcp,
        }
    }

    /// Kubernetes `appProtocol` values (IANA names, `kubernetes.io/h2c`), case-insensitive.
    fn from_app_protocol(p: &str) -> Option<Self> {
        match p.to_ascii_lowercase().as_str() {
            "http" | "http1" | "http/1.1" => Some(Self::Http),
            "http2" | "h2c" | "kubernetes.io/h2c" => Some(Self::Http2),
            "grpc" => Some(Self::Grpc),
            "tcp" | "https" | "tls" | "kubernetes.io/ws" | "kubernetes.io/wss" => Some(Self::Tcp),
            _ => None,
        }
    }

    pub fn is_http(self) -> bool {
        self != Self::Tcp
    }

    /// The backend speaks HTTP/2 (prior knowledge).
    pub fn upstream_h2(self) -> bool {
        matches!(self, Self::Http2 | Self::Grpc)
    }
}

/// Istio's `request_protocol` label of one request: `grpc` when its content type says so.
pub fn request_protocol(headers: &http::HeaderMap) -> &'static str {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc { "grpc" } else { "http" }
}

#[cfg(test)]
mod tests {
    use super::AppProtocol::{self, *};

    #[test]
    fn app_protocol_wins_then_istio_port_name_prefixes() {
        let cases: &[(&str, Option<&str>, AppProtocol)] = &[
            ("http", None, Http),
            ("http-web", None, Http),
            ("HTTP-web", None, Http),
            ("http2-api", None, Http2),
            ("grpc", None, Grpc),
            ("grpc-api", None, Grpc),
            ("httpx", None, Tcp),
            ("web", None, Tcp),
            ("", None, Tcp),
            ("tcp", Some("http"), Http),
            ("web", Some("kubernetes.io/h2c"), Http2),
            ("web", Some("grpc"), Grpc),
            ("http", Some("tcp"), Tcp),
            ("http", Some("example.com/custom"), Http),
            ("db", Some("postgresql"), Tcp),
        ];
        for (name, app, want) in cases {
            assert_eq!(
                AppProtocol::classify(name, *app),
                *want,
                "port name {name:?}, appProtocol {app:?}"
            );
        }
    }

    #[test]
    fn grpc_requests_are_told_by_content_type() {
        let mut h = http::HeaderMap::new();
        assert_eq!(super::request_protocol(&h), "http");
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        assert_eq!(super::request_protocol(&h), "grpc");
    }
}
