//! Streaming bytes onto the end of a file: hashed on a blocking thread while
//! the next chunk arrives, with disk writeback started as the data flows.

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::BlobError;
use crate::oci::Hasher;

/// Bytes buffered before each write on the blocking side.
const WRITE_CHUNK: usize = 1 << 20;

/// Append `body` to the file at `path`, which is `start` bytes long, feeding
/// `hasher` (if any) as bytes pass. Returns the bytes appended and the
/// hasher. On any error the file is truncated back to `start`.
pub(super) async fn append_stream<S>(
    path: &Path,
    start: u64,
    hasher: Option<Hasher>,
    mut body: S,
) -> Result<(u64, Option<Hasher>), BlobError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let writer_path = path.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Option<Hasher>)> {
        let mut hasher = hasher;
        let f = std::fs::OpenOptions::new().append(true).open(&writer_path)?;
        let mut w = std::io::BufWriter::with_capacity(WRITE_CHUNK, f);
        let mut n = 0u64;
        let mut writeback = Writeback::new(start);
        while let Some(chunk) = rx.blocking_recv() {
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            w.write_all(&chunk)?;
            n += chunk.len() as u64;
            writeback.advance(&mut w, start + n)?;
        }
        w.flush()?;
        Ok((n, hasher))
    });
    let mut body_err = None;
    while let Some(item) = body.next().await {
        match item {
            Ok(b) if b.is_empty() => {}
            Ok(b) => {
                if tx.send(b).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                body_err = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| BlobError::Io(std::io::Error::other(e)))?;
    match (written, body_err) {
        (Ok(done), None) => Ok(done),
        (res, err) => {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.set_len(start)?;
            match err {
                Some(e) => Err(BlobError::Body(e)),
                None => Err(BlobError::Io(res.err().unwrap_or_else(|| std::io::Error::other("write failed")))),
            }
        }
    }
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
