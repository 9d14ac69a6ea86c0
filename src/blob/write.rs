//! Streaming bytes onto the end of a file. Bytes are gathered from the body
//! on the async side and written and hashed a batch at a time on a blocking
//! thread, one batch in flight while the next arrives: a blocking thread is
//! held only while there is a batch to write, never while waiting for a
//! client, so a thousand slow uploads cost buffers, not threads. Disk
//! writeback is started as the data flows.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::task::JoinHandle;

use super::BlobError;
use crate::oci::Hasher;

/// Bytes gathered before each write on the blocking side.
const WRITE_CHUNK: usize = 1 << 20;

/// What an append did.
pub(super) struct Appended {
    /// Bytes appended (and fsync-able) to the file.
    pub bytes: u64,
    /// The hasher, fed with exactly those bytes.
    pub hasher: Option<Hasher>,
    /// Why the body was cut early: the bytes that arrived before are kept.
    pub cut: Option<std::io::Error>,
}

/// The file side of an append, moved to a blocking thread for each batch.
struct Sink {
    w: std::io::BufWriter<std::fs::File>,
    hasher: Option<Hasher>,
    writeback: Writeback,
    end: u64,
}

impl Sink {
    fn write(mut self, batch: Vec<Bytes>) -> std::io::Result<Sink> {
        for chunk in batch {
            if let Some(h) = self.hasher.as_mut() {
                h.update(&chunk);
            }
            self.w.write_all(&chunk)?;
            self.end += chunk.len() as u64;
        }
        self.writeback.advance(&mut self.w, self.end)?;
        Ok(self)
    }
}

/// The sink, or the batch write that has it: one batch in flight at most.
enum Turn {
    Idle(Box<Sink>),
    Writing(JoinHandle<std::io::Result<Sink>>),
}

impl Turn {
    /// The sink once the batch in flight (if any) is written.
    async fn ready(self) -> std::io::Result<Sink> {
        match self {
            Turn::Idle(s) => Ok(*s),
            Turn::Writing(h) => joined(h.await),
        }
    }
}

fn joined<T>(r: Result<std::io::Result<T>, tokio::task::JoinError>) -> std::io::Result<T> {
    r.map_err(std::io::Error::other)?
}

/// Append `body` to the file at `path`, which is `start` bytes long, feeding
/// `hasher` (if any) as bytes pass. When the body is cut for being too slow
/// the bytes that arrived are kept and the error is returned in
/// [`Appended::cut`]. When it breaks otherwise, or the disk fails, the file
/// is truncated back to `start`.
pub(super) async fn append_stream<S>(
    path: &Path,
    start: u64,
    hasher: Option<Hasher>,
    mut body: S,
) -> Result<Appended, BlobError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
{
    let writer_path: PathBuf = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().append(true).open(writer_path)).await;
    let file = joined(opened)?;
    let sink = Sink {
        w: std::io::BufWriter::with_capacity(WRITE_CHUNK, file),
        hasher,
        writeback: Writeback::new(start),
        end: start,
    };
    let mut sink = Turn::Idle(Box::new(sink));
    let mut batch = Vec::new();
    let mut gathered = 0usize;
    let mut cut = None;
    loop {
        let item = body.next().await;
        let last = match item {
            Some(Ok(b)) => {
                gathered += b.len();
                if !b.is_empty() {
                    batch.push(b);
                }
                false
            }
            Some(Err(e)) => {
                cut = Some(e);
                true
            }
            None => true,
        };
        if gathered >= WRITE_CHUNK || (last && !batch.is_empty()) {
            let ready = match sink.ready().await {
                Ok(s) => s,
                Err(e) => return Err(roll_back(path, start, e)),
            };
            let next = std::mem::take(&mut batch);
            gathered = 0;
            sink = Turn::Writing(tokio::task::spawn_blocking(move || ready.write(next)));
        }
        if last {
            break;
        }
    }
    let finished = sink.ready().await.and_then(|mut sink| {
        sink.w.flush()?;
        Ok(sink)
    });
    match (finished, cut) {
        (Ok(sink), None) => Ok(Appended { bytes: sink.end - start, hasher: sink.hasher, cut: None }),
        (Ok(sink), Some(e)) if keeps_partial(&e) => {
            Ok(Appended { bytes: sink.end - start, hasher: sink.hasher, cut: Some(e) })
        }
        (Ok(_), Some(e)) => {
            roll_back(path, start, std::io::Error::other("body broken"));
            Err(BlobError::Body(e))
        }
        (Err(e), _) => Err(roll_back(path, start, e)),
    }
}

/// Whether the bytes of a body that ended with `e` are kept. A body cut
/// for being too slow (`TimedOut`, see `api::limits`) keeps what arrived:
/// its client is alive and may resume from there. A body that broke
/// (truncated, reset) is rolled back whole: it was sent as one piece.
fn keeps_partial(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

/// A failed disk write: put the file back as it was before the append.
fn roll_back(path: &Path, start: u64, e: std::io::Error) -> BlobError {
    if let Err(t) = std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(start)) {
        tracing::warn!(path = %path.display(), error = %t, "could not roll back a failed append");
    }
    BlobError::Io(e)
}

/// Starts disk writeback of an upload as it streams in, so the fsync at the
/// end of the upload finds little left to do: the disk works while the
/// network delivers, instead of after it. It also bounds the dirty pages one
/// upload can pile up in the page cache.
struct Writeback {
    started: u64,
}

/// Writeback is started every this many bytes.
const WRITEBACK_WINDOW: u64 = 8 << 20;

impl Writeback {
    fn new(offset: u64) -> Writeback {
        Writeback { started: offset }
    }

    fn advance(&mut self, w: &mut std::io::BufWriter<std::fs::File>, written: u64) -> std::io::Result<()> {
        if written - self.started < WRITEBACK_WINDOW {
            return Ok(());
        }
        w.flush()?;
        start_writeback(w.get_ref(), self.started, written - self.started);
        self.started = written;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads the descriptor and the range; the
    // file stays open for the duration of the call. Failure is harmless:
    // the final fsync still makes the data durable.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_f: &std::fs::File, _offset: u64, _len: u64) {}
