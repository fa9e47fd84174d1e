//! WebSocket (RFC 6455, HTTP/1.1 Upgrade) on the HTTP port's `/ws`: every text or binary
//! message is sent back unchanged; pings are answered by tungstenite. And `ws-client`, which
//! checks that echo byte for byte.

use std::{process::ExitCode, sync::Arc, time::Duration};

use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use super::{
    App,
    http::{Body, POD_HEADER, respond, text},
    payload,
};

/// Answers the upgrade (101) and echoes on the upgraded connection; anything that is not a
/// WebSocket handshake gets `426 Upgrade Required`.
pub fn accept(app: &Arc<App>, mut req: Request<Incoming>) -> Response<Body> {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY);
    let key = key.and_then(|k| HeaderValue::from_str(&derive_accept_key(k.as_bytes())).ok());
    let (true, true, Some(accept_key)) = (has(header::CONNECTION, "upgrade"), has(header::UPGRADE, "websocket"), key) else {
        return text(StatusCode::UPGRADE_REQUIRED, app, "/ws needs a WebSocket handshake (HTTP/1.1 Upgrade: websocket)");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        // The client may give up between our 101 and the switch: nothing to echo then.
        if let Ok(upgraded) = upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            echo(ws).await;
        }
    });
    let mut response = respond(StatusCode::SWITCHING_PROTOCOLS, app, "application/octet-stream", Empty::new().boxed());
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    response
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    while let Some(Ok(message)) = ws.next().await {
        // Close frames are answered by tungstenite itself; the stream then ends.
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

/// `ws-client URL --messages N --size B`: sends N binary messages of B bytes one at a time,
/// each different, and waits for each echo. Prints `ws ok messages=N bytes=TOTAL pod=POD`
/// (POD from the 101's `x-whoami-pod`, `?` when absent) or `error: ...`; exit 0 only if every
/// message came back intact.
pub async fn client(url: &str, messages: usize, size: usize, timeout: Duration) -> ExitCode {
    match tokio::time::timeout(timeout, run_client(url, messages, size)).await {
        Ok(Ok(line)) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => super::l4::fail(&e),
        Err(_) => super::l4::fail(&format!("ws-client {url}: no result within {timeout:?}")),
    }
}

async fn run_client(url: &str, messages: usize, size: usize) -> Result<String, String> {
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.map_err(|e| format!("connect {url}: {e}"))?;
    let pod = response.headers().get(POD_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned();
    for i in 0..messages {
        let sent = payload(i, size);
        ws.send(Message::binary(sent.clone())).await.map_err(|e| format!("send message {i}: {e}"))?;
        let back = loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => break data,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(other)) => return Err(format!("message {i}: expected a binary echo, got {other:?}")),
                Some(Err(e)) => return Err(format!("message {i}: {e}")),
                None => return Err(format!("message {i}: the server closed the connection")),
            }
        };
        if let Some(at) = back.iter().zip(&sent).position(|(a, b)| a != b) {
            return Err(format!("message {i}: echo differs at byte {at}"));
        }
        if back.len() != sent.len() {
            return Err(format!("message {i}: echoed {} bytes of {}", back.len(), sent.len()));
        }
    }
    // A clean close handshake, so a proxy in between sees the connection end normally.
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(format!("ws ok messages={messages} bytes={} pod={pod}", messages * size))
}
