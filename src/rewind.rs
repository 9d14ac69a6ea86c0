//! A connection whose first bytes, read to tell what it speaks (the HTTP/2
//! preface, berth's forward preface, or anything else), are read again by
//! whoever serves it. Used by both listeners: the API's and the cluster's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io` with `first` (already read from it) put back in front.
pub struct Rewind<T> {
    io: T,
    first: Vec<u8>,
    replayed: usize,
}

impl<T> Rewind<T> {
    pub fn new(io: T, first: Vec<u8>) -> Rewind<T> {
        Rewind { io, first, replayed: 0 }
    }

    /// The bytes read to tell the connection's kind.
    pub fn first(&self) -> &[u8] {
        &self.first
    }

    /// Drop the first bytes instead of reading them again (a preface that
    /// only said which handler the connection is for).
    pub fn skip_first(&mut self) {
        self.replayed = self.first.len();
    }

    /// The connection itself, once nothing is left to read again (so bytes
    /// may go to its socket directly); None before.
    pub fn drained(&self) -> Option<&T> {
        (self.replayed == self.first.len()).then_some(&self.io)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.first.len() {
            let n = (this.first.len() - this.replayed).min(buf.remaining());
            buf.put_slice(&this.first[this.replayed..this.replayed + n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
