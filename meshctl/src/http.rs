//! A small blocking HTTP/1.1 GET over a connected `TcpStream`.
//!
//! The lab's endpoints live in network namespaces: the socket is opened inside one (see
//! `target::lab`) and handed here. All we need is one GET per connection, so the request says
//! `Connection: close` and the body is what arrives until EOF (or `Content-Length`), de-chunked
//! when the server chunked it.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("talking to {peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer} answered something that is not HTTP/1.1: {detail}")]
    Malformed { peer: String, detail: String },
}

/// An answer: status code and body (lossy UTF-8; every endpoint we read is text or JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How long one request may take (connect is done by the caller).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `GET <path_and_query>` with `Host: <host>` and reads the whole answer.
pub fn get(mut stream: TcpStream, host: &str, path_and_query: &str) -> Result<Response, Error> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| host.to_owned(), |a| a.to_string());
    let io = |source| Error::Io {
        peer: peer.clone(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    stream
        .write_all(request(host, path_and_query).as_bytes())
        .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    parse(&raw).map_err(|detail| Error::Malformed { peer, detail })
}

/// The request [`get`] sends.
pub fn request(host: &str, path_and_query: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meshctl/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether `raw` holds a whole response: its headers, then `Content-Length` bytes or the last
/// chunk. For streams whose end the peer's close may not reach (a port-forward).
pub fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v == "chunked") {
        return dechunk(body).is_ok();
    }
    header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

/// Parses a whole HTTP/1.1 response (status line, headers, body).
pub fn parse(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let decoded;
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decoded = dechunk(body)?;
        body = &decoded;
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = body
            .get(..len)
            .ok_or_else(|| format!("body shorter than Content-Length {len}"))?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay as they are).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_chunked_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready";
        assert_eq!(
            parse(plain).expect("parse"),
            Response {
                status: 200,
                body: "ready".into()
            }
        );
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
        let r = parse(chunked).expect("parse");
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
        assert!(!r.is_success());
        let until_eof = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{\"a\":1}";
        assert_eq!(parse(until_eof).expect("parse").body, "{\"a\":1}");
    }

    /// A response is whole once its declared length or last chunk arrived (a port-forward's
    /// stream may not end when the server closes).
    #[test]
    fn a_response_is_complete_at_its_length_or_last_chunk() {
        assert!(!complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n"));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nrea"
        ));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nready"
        ));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnot \r\n"
        ));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n0\r\n\r\n"
        ));
        assert!(
            !complete(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{}"),
            "until EOF: only the end says"
        );
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(parse(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").is_err());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query_value("x-user: alice"), "x-user%3A%20alice");
        assert_eq!(
            encode_query_value("/admin/a?b=c&d"),
            "%2Fadmin%2Fa%3Fb%3Dc%26d"
        );
        assert_eq!(encode_query_value("198.18.2.11:8081"), "198.18.2.11%3A8081");
    }
}
