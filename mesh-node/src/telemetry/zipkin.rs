//! Zipkin's collector API: `POST {path}` with the batch as a v2 JSON array, over an HTTP/1.1
//! connection kept between batches while the collector's address stays the same.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Error;

pub(super) struct Client {
    path: String,
    conn: Option<(SocketAddr, SendRequest<Full<Bytes>>)>,
}

impl Client {
    pub(super) fn new(path: String) -> Self {
        Self { path, conn: None }
    }

    pub(super) fn reset(&mut self) {
        self.conn = None;
    }

    pub(super) async fn export(&mut self, addr: SocketAddr, body: Bytes) -> Result<(), Error> {
        let request = || {
            Request::post(self.path.as_str())
                .header(header::HOST, addr.to_string())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|source| Error::Request {
                    path: self.path.clone(),
                    source,
                })
        };
        // Taken out while in use: a batch that fails, or is cut off by the timeout, leaves no
        // half-used connection behind.
        let reused = self
            .conn
            .take()
            .filter(|(a, s)| *a == addr && !s.is_closed());
        let was_reused = reused.is_some();
        let mut sender = match reused {
            Some((_, s)) => s,
            None => connect(addr).await?,
        };
        let sent = match sender.ready().await {
            Ok(()) => sender.send_request(request()?).await,
            Err(e) => Err(e),
        };
        let resp = match sent {
            Ok(resp) => resp,
            // The collector closed the kept-alive connection as we used it: once more, anew.
            Err(_) if was_reused => {
                sender = connect(addr).await?;
                sender.ready().await?;
                sender.send_request(request()?).await?
            }
            Err(e) => return Err(e.into()),
        };
        let status = resp.status();
        // Read the answer to its end, so the connection can carry the next batch.
        resp.into_body().collect().await?;
        self.conn = Some((addr, sender));
        if status.is_success() {
            Ok(())
        } else {
            Err(Error::Status(status))
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Error> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| Error::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "zipkin collector connection ended");
        }
    });
    Ok(sender)
}
