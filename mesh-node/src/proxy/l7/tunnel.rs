//! An HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), so HTTP can be spoken inside
//! it: requests from a source node to an endpoint, and their parsing at the destination node.
//! Received chunks are handed out as they come and their flow-control window returned at once;
//! writes wait for the stream's window.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::pool::Checkout;

pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received, not yet read.
    pending: Bytes,
    eof: bool,
    shut: bool,
    /// The pooled connection's stream slot (outbound), released when the tunnel is dropped.
    _slot: Option<Checkout>,
}

impl TunnelIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<Checkout>) -> Self {
        Self { send, recv, pending: Bytes::new(), eof: false, shut: false, _slot: slot }
    }
}

fn io_error(e: h2::Error) -> io::Error {
    e.into_io().unwrap_or_else(|| io::Error::new(io::ErrorKind::ConnectionReset, "HBONE stream reset"))
}

impl AsyncRead for TunnelIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(out.remaining());
                out.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // Fails only when the stream is already gone; the next poll says so.
                    let _ = this.recv.flow_control().release_capacity(chunk.len());
                    this.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => this.eof = true,
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(data.len());
        loop {
            let cap = send.capacity();
            if cap > 0 {
                let n = cap.min(data.len());
                send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes whatever the stream buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
