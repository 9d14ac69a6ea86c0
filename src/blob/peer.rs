//! The node-to-node read of a whole blob (`GET /_berth/blobs/<digest>`),
//! used when a client waits on a read-through. Over plain HTTP the holder
//! copies every byte from the page cache into its process and out again;
//! with the `berth-blob` upgrade it answers `101 Switching Protocols` with
//! the blob's size and hands the file to the kernel (`sendfile`), which
//! moves it to the socket without it ever entering the process. Either way
//! the reading node hashes every byte: the holder is never trusted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The `Upgrade` token of the sendfile transfer.
pub const UPGRADE: &str = "berth-blob";
/// Response header of a `101`: how many bytes follow.
pub const SIZE_HEADER: &str = "berth-size";

/// How long a peer may take to start answering a blob read.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long a peer's blob stream may go without a byte before the read
/// fails (and the next holder is tried, or the client's response ends
/// with an error): a frozen holder must not hang a pull or a push.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// `stream`, ending with a `TimedOut` error if no chunk arrives within
/// [`IDLE_LIMIT`].
pub fn idle_limited<S>(stream: S) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let limited = tokio_stream::StreamExt::timeout(stream, IDLE_LIMIT);
    Box::pin(limited.map(|r| {
        r.unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("peer sent nothing for {} s", IDLE_LIMIT.as_secs())))
        })
    }))
}

/// The accepted socket of an HTTP connection, carried in each request's
/// extensions so an upgraded request can write to it directly.
#[derive(Debug, Clone, Copy)]
pub struct ConnFd(pub RawFd);

/// Send `len` bytes of `file` from its start to the socket `sock` with
/// sendfile, waiting for the socket to drain when its buffer is full.
///
/// The caller must keep the connection that owns `sock` open until this
/// returns; the socket is duplicated on entry, so the transfer never uses a
/// descriptor number that could be reused underneath it.
pub async fn send_file(sock: RawFd, file: std::fs::File, len: u64) -> io::Result<()> {
    // SAFETY: `sock` is open (the caller holds its connection); dup gives
    // this function its own descriptor for the same socket.
    let dup = unsafe { libc::dup(sock) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else; the OwnedFd
    // keeps it open, and its as_raw_fd never changes, for the AsyncFd's life.
    let sock = unsafe { AsyncFd::register_with_interest(OwnedFd::from_raw_fd(dup), Interest::WRITABLE) }?;
    let mut offset: libc::off_t = 0;
    while (offset as u64) < len {
        let mut ready = sock.writable().await?;
        let left = (len - offset as u64).min(1 << 30) as usize;
        let sent = ready.try_io(|s| {
            // SAFETY: both descriptors are open for the duration of the call
            // and `offset` is a valid pointer.
            let n = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut offset, left) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match sent {
            Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shrank")),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            // The socket buffer is full: readiness was cleared, wait again.
            Err(_would_block) => {}
        }
    }
    Ok(())
}
