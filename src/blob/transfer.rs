//! Moving blob bytes between members: the one owner of it, as Garage's
//! block manager owns its own RPC. Both sides live here: the byte stream a
//! member serves from its store and reads from a peer, the `Blobs.Pull`
//! gRPC call that asks a peer to copy a blob, the per-peer bounds on
//! background copies, one error type and the deadlines of every peer call.
//!
//! **The byte stream.** A reader opens a connection to the holder's cluster
//! port (mutual TLS against the cluster CA, unless the cluster runs
//! `insecure_cluster`; see `cluster::listener`) and sends one request
//! frame; the holder answers with one frame, then exactly the bytes asked
//! for, then closes. A frame is a 24-byte header (`BERTH-BLOB/1 `, the JSON
//! body's length in ten digits, a newline) and a JSON body of at most
//! [`MAX_FRAME`] bytes. On a plain connection the holder hands the file to
//! the kernel (`sendfile`), so bytes never enter its process; over TLS it
//! encrypts them in the process (the kernel on this platform does not offer
//! TLS offload to every host, so berth does not rely on it).
//!
//! The reader hashes every byte: the holder is never trusted with content,
//! only with availability. Every read names the caller's cluster id, and a
//! holder serves only its own cluster's members.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tonic::{Request, Response, Status};

use super::throttle::{Admitted, Throttle};
use super::{BlobError, BlobStore};
use crate::cluster::listener::{self, Conn};
use crate::cluster::pb::blobs_server::Blobs;
use crate::cluster::pb::{PullReply, PullRequest};
use crate::cluster::Peers;
use crate::oci::Digest;

/// How long a peer may take to start answering (connection, TLS, the
/// answer frame) a blob read or a copy request.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long a peer's blob stream may go without a byte before the read
/// fails (and the next holder is tried, or the client's response ends
/// with an error): a frozen holder must not hang a pull or a push.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);
/// The slowest rate a copy request may take before it counts as failed:
/// its deadline is [`ANSWER_WITHIN`] plus the blob's size at this rate.
pub const SLOWEST_COPY: u64 = 1 << 20;
/// Largest JSON body of a frame.
pub const MAX_FRAME: usize = 4096;
/// Read size of a peer transfer: large reads, few wakeups.
const READ_BUF: usize = 1 << 20;
/// Bytes sent per step of a paced (background) transfer.
const PACE_STEP: u64 = 1 << 20;
const MAGIC: &[u8; 13] = b"BERTH-BLOB/1 ";

/// What went wrong moving a blob between members.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("{addr} did not answer within {secs} s")]
    TimedOut { addr: String, secs: u64 },
    #[error("{0} is not stored there")]
    NotFound(String),
    #[error("blob disk below its free-space reserve")]
    NoSpace,
    /// The peer refused the caller (another cluster, a malformed request).
    #[error("refused: {0}")]
    Refused(String),
    #[error("peer failed: {0}")]
    Remote(String),
    #[error("no holder had an intact copy (last: {0})")]
    NoSource(String),
    #[error(transparent)]
    Store(#[from] BlobError),
}

impl From<TransferError> for Status {
    fn from(e: TransferError) -> Status {
        match e {
            TransferError::NoSpace => Status::resource_exhausted(e.to_string()),
            TransferError::NotFound(_) | TransferError::NoSource(_) => Status::not_found(e.to_string()),
            TransferError::Refused(_) => Status::permission_denied(e.to_string()),
            _ => Status::unavailable(e.to_string()),
        }
    }
}

/// A blob's bytes as they arrive from a peer (not yet verified).
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Serialize, Deserialize)]
struct ReadRequest {
    /// The caller's cluster id (16 hex digits).
    cluster: String,
    digest: String,
    offset: u64,
    /// A replication or repair copy (bounded per peer), not a client's read.
    background: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReadAnswer {
    /// `len` bytes follow.
    Sending {
        len: u64,
    },
    NotFound,
    Refused {
        why: String,
    },
}

async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, body: &T) -> io::Result<()> {
    let json = serde_json::to_vec(body).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(24 + json.len());
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(format!("{:010}\n", json.len()).as_bytes());
    frame.extend_from_slice(&json);
    w.write_all(&frame).await?;
    w.flush().await
}

async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<T> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("blob transfer frame: {why}"));
    let mut head = [0u8; 24];
    r.read_exact(&mut head).await?;
    if &head[..13] != MAGIC || head[23] != b'\n' {
        return Err(bad("not a berth blob transfer"));
    }
    let len: usize =
        std::str::from_utf8(&head[13..23]).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("length"))?;
    if len > MAX_FRAME {
        return Err(bad("too long"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| bad(&e.to_string()))
}

/// The owner of blob transfer between members. Cheap to clone.
#[derive(Clone)]
pub struct Transfer {
    store: BlobStore,
    peers: Peers,
    throttle: Throttle,
}

impl Transfer {
    pub fn new(store: BlobStore, peers: Peers, throttle: Throttle) -> Transfer {
        Transfer { store, peers, throttle }
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    // ---- reading from a peer ----

    /// Stream `digest` from `offset` from the member at `addr` (its cluster
    /// address). The answer must start within [`ANSWER_WITHIN`]; the stream
    /// then fails if it stalls for [`IDLE_LIMIT`]. `background` reads are
    /// paced by the holder; a client's read is not.
    #[tracing::instrument(level = "debug", skip(self, digest), fields(%digest))]
    pub async fn read(
        &self,
        addr: &str,
        digest: &Digest,
        offset: u64,
        background: bool,
    ) -> Result<ByteStream, TransferError> {
        let req = ReadRequest {
            cluster: self.peers.identity().cluster_label(),
            digest: digest.to_string(),
            offset,
            background,
        };
        let unreachable = |source| TransferError::Unreachable { addr: addr.to_owned(), source };
        let opened = tokio::time::timeout(ANSWER_WITHIN, async {
            let mut io = listener::connect(addr, self.peers.tls()).await.map_err(unreachable)?;
            write_frame(&mut io, &req).await.map_err(unreachable)?;
            let answer: ReadAnswer = read_frame(&mut io).await.map_err(unreachable)?;
            Ok::<_, TransferError>((io, answer))
        })
        .await
        .map_err(|_| TransferError::TimedOut { addr: addr.to_owned(), secs: ANSWER_WITHIN.as_secs() })??;
        match opened {
            (io, ReadAnswer::Sending { len }) => {
                let body = tokio_util::io::ReaderStream::with_capacity(io.take(len), READ_BUF);
                // An empty chunk marks the end, where the length is checked.
                let checked = body.chain(futures::stream::once(async { Ok(Bytes::new()) }));
                Ok(Box::pin(idle_limited(length_checked(checked, len))))
            }
            (_, ReadAnswer::NotFound) => Err(TransferError::NotFound(digest.to_string())),
            (_, ReadAnswer::Refused { why }) => Err(TransferError::Refused(why)),
        }
    }

    /// Copy `digest` into the local store from the first of `sources`
    /// (cluster addresses) that has it intact. Returns its size.
    pub async fn copy_from(&self, digest: &Digest, sources: &[String]) -> Result<u64, TransferError> {
        // A copy already here is claimed afresh: the caller records it in
        // the index next, and the garbage sweep must not take it meanwhile.
        if let Some(size) = self.store.claim_existing(digest).await.map_err(BlobError::from)? {
            return Ok(size);
        }
        let mut last = TransferError::NoSource("no holder is known".into());
        for src in sources {
            let copied = match self.read(src, digest, 0, true).await {
                Ok(stream) => self.store.ingest(digest, stream).await.map_err(TransferError::from),
                Err(e) => Err(e),
            };
            match copied {
                Ok(size) => return Ok(size),
                Err(e) => {
                    tracing::warn!(%digest, source = %src, error = %e, "copy from peer failed");
                    last = e;
                }
            }
        }
        Err(TransferError::NoSource(last.to_string()))
    }

    /// Ask the member at `target` to copy `digest` (of `size` bytes) from
    /// one of `sources`; answered once its copy is fsynced. The call fails
    /// if the copy runs slower than [`SLOWEST_COPY`].
    pub async fn ask_copy(
        &self,
        target: &str,
        digest: &Digest,
        size: u64,
        sources: &[String],
    ) -> Result<(), TransferError> {
        let mut client = self
            .peers
            .blobs(target)
            .map_err(|e| TransferError::Unreachable { addr: target.into(), source: io::Error::other(e) })?;
        let mut req = Request::new(PullRequest { digest: digest.to_string(), sources: sources.to_vec() });
        let within = ANSWER_WITHIN + Duration::from_secs(size / SLOWEST_COPY);
        req.set_timeout(within);
        match client.pull(req).await {
            Ok(_) => Ok(()),
            Err(s) => Err(match s.code() {
                tonic::Code::ResourceExhausted => TransferError::NoSpace,
                tonic::Code::PermissionDenied => TransferError::Refused(s.message().to_owned()),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    TransferError::TimedOut { addr: target.into(), secs: within.as_secs() }
                }
                _ => TransferError::Remote(s.message().to_owned()),
            }),
        }
    }

    // ---- serving peers ----

    /// Answer a blob read on a connection the cluster listener accepted.
    pub fn serve(&self, conn: Conn) {
        let me = self.clone();
        tokio::spawn(async move {
            let remote = conn.remote();
            if let Err(e) = me.answer(conn).await {
                tracing::debug!(%remote, error = %e, "serving a blob to a peer ended early");
            }
        });
    }

    async fn answer(&self, mut conn: Conn) -> io::Result<()> {
        let req: ReadRequest = tokio::time::timeout(ANSWER_WITHIN, read_frame(&mut conn))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
        let mine = self.peers.identity().cluster_label();
        if mine.is_empty() || req.cluster != mine {
            let why = format!("this node serves blobs to members of cluster {mine:?} only");
            return write_frame(&mut conn, &ReadAnswer::Refused { why }).await;
        }
        let Ok(digest) = req.digest.parse::<Digest>() else {
            return write_frame(&mut conn, &ReadAnswer::Refused { why: "malformed digest".into() }).await;
        };
        // A background copy waits for one of its peer's slots and keeps it
        // until the transfer ends.
        let admitted = match req.background {
            true => Some(self.throttle.admit(conn.remote().ip()).await),
            false => None,
        };
        let Some(reader) = self.store.open(&digest).await? else {
            return write_frame(&mut conn, &ReadAnswer::NotFound).await;
        };
        let (size, offset) = (reader.size, req.offset.min(reader.size));
        write_frame(&mut conn, &ReadAnswer::Sending { len: size - offset }).await?;
        if let Some(sock) = conn.plain_socket() {
            let fd = sock.as_raw_fd();
            // `conn` owns the socket `fd` names and lives until this returns.
            return send_file(fd, reader.into_std().await, offset, size, admitted.as_ref()).await;
        }
        let mut chunks = Box::pin(reader.stream(offset, size).await?);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if let Some(a) = &admitted {
                a.pace(chunk.len()).await;
            }
            conn.write_all(&chunk).await?;
        }
        conn.shutdown().await
    }
}

#[tonic::async_trait]
impl Blobs for Transfer {
    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<PullReply>, Status> {
        let req = req.into_inner();
        let digest: Digest = req.digest.parse().map_err(|_| Status::invalid_argument("invalid digest"))?;
        // A node short of space takes no new copies: the caller places the
        // copy on another node.
        if self.store.short_of_space() && !self.store.path(&digest).exists() {
            return Err(TransferError::NoSpace.into());
        }
        let size = self.copy_from(&digest, &req.sources).await?;
        Ok(Response::new(PullReply { size }))
    }
}

/// `stream` (ending with an empty marker chunk), failing if fewer than
/// `len` bytes came before the marker: a holder that closes early must
/// not look like a short blob.
fn length_checked<S>(stream: S, len: u64) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let mut seen = 0u64;
    stream.filter_map(move |r| {
        let out = match r {
            Ok(b) if b.is_empty() => (seen < len)
                .then(|| Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("peer sent {seen} of {len} bytes")))),
            Ok(b) => {
                seen += b.len() as u64;
                Some(Ok(b))
            }
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    })
}

/// `stream`, ending with a `TimedOut` error if no chunk arrives within
/// [`IDLE_LIMIT`].
fn idle_limited<S>(stream: S) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static
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

/// Send bytes `offset..end` of `file` to the socket `sock` with sendfile,
/// waiting for the socket to drain when its buffer is full, paced by
/// `pace` if set.
///
/// The caller must keep the connection that owns `sock` open until this
/// returns; the socket is duplicated on entry, so the transfer never uses a
/// descriptor number that could be reused underneath it.
async fn send_file(sock: RawFd, file: std::fs::File, offset: u64, end: u64, pace: Option<&Admitted>) -> io::Result<()> {
    // SAFETY: `sock` is open (the caller holds its connection); dup gives
    // this function its own descriptor for the same socket.
    let dup = unsafe { libc::dup(sock) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else; the OwnedFd
    // keeps it open, and its as_raw_fd never changes, for the AsyncFd's life.
    let sock = unsafe { AsyncFd::register_with_interest(OwnedFd::from_raw_fd(dup), Interest::WRITABLE) }?;
    let mut pos = offset as libc::off_t;
    while (pos as u64) < end {
        let step = if pace.is_some() { PACE_STEP } else { 1 << 30 };
        let left = (end - pos as u64).min(step) as usize;
        if let Some(a) = pace {
            a.pace(left).await;
        }
        let mut sent_step = 0usize;
        while sent_step < left {
            let mut ready = sock.writable().await?;
            let sent = ready.try_io(|s| {
                // SAFETY: both descriptors are open for the duration of the
                // call and `pos` is a valid pointer.
                let n = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut pos, left - sent_step) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match sent {
                Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shrank")),
                Ok(Ok(n)) => sent_step += n,
                Ok(Err(e)) => return Err(e),
                // The socket buffer is full: readiness was cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }
    Ok(())
}
