//! One client connection, from accept to close: its place under the
//! connection caps, then which HTTP version it speaks (told from its first
//! bytes within the header deadline, so a client that connects and says
//! nothing is cut like one that sends its head slowly), then hyper with the
//! timeouts of `[limits]`.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::limits::SendDeadline;
use super::{handle, AppState, Caller};
use crate::rewind::Rewind;

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Requests at once on one HTTP/2 connection.
const MAX_STREAMS: u32 = 128;

/// Read until the bytes either are the HTTP/2 preface or cannot be.
/// Returns the connection, those bytes put back, and whether it speaks
/// HTTP/2.
async fn sniff<T: AsyncRead + Unpin>(mut io: T) -> io::Result<(Rewind<T>, bool)> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; 24];
    while first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first) {
        let n = io.read(&mut buf[..H2_PREFACE.len() - first.len()]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        first.extend_from_slice(&buf[..n]);
    }
    let h2 = first == H2_PREFACE;
    Ok((Rewind::new(io, first), h2))
}

/// Serve one admitted connection until it closes or a limit cuts it.
pub async fn serve<T>(state: Arc<AppState>, io: T, caller: Caller)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &state.limits;
    let io = SendDeadline::new(io, limits.send_timeout);
    let (io, h2) = match tokio::time::timeout(limits.header_timeout, sniff(io)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return tracing::debug!(peer = %caller.addr, error = %e, "connection closed before a request"),
        Err(_) => return tracing::debug!(peer = %caller.addr, "connection sent no request in time; closed"),
    };
    let (header_timeout, state2, caller2) = (limits.header_timeout, state.clone(), caller.clone());
    let svc = service_fn(move |req: Request<Incoming>| {
        let (state, caller) = (state2.clone(), caller2.clone());
        async move { Ok::<_, Infallible>(handle(&state, req, &caller).await) }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        // Uploads a peer passes on to this node (their owner) come over
        // HTTP/2: a window of one round trip's worth would slow them. Pings
        // find clients that went away without closing.
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .keep_alive_interval(Some(header_timeout))
            .keep_alive_timeout(header_timeout)
            .initial_stream_window_size(crate::cluster::WINDOW)
            .initial_connection_window_size(crate::cluster::WINDOW * 2)
            .serve_connection(io, svc)
            .await
    } else {
        // A client may send its whole request, then shut its write side
        // while it waits: it still gets the answer (hyper would drop the
        // request in flight otherwise). A request head, or the next one on
        // a kept-alive connection, must come within the timeout.
        hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(io, svc)
            .await
    };
    if let Err(e) = result {
        tracing::debug!(peer = %caller.addr, error = %e, "connection ended");
    }
}
