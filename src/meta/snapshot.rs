//! Snapshots: the state a node hands a peer that fell behind the log, and
//! the file a received one is spooled to before the state machine installs
//! it (see `state`).
//!
//! **Building a snapshot takes nothing.** openraft asks for one every
//! `snapshot_logs` entries so that it can purge the log behind it, and keeps
//! only the snapshot's id and membership (its data is dropped). So a build
//! records a *snapshot point*: the applied log id and membership, read
//! together, made durable by a flush of the memtables (applied entries skip
//! the write-ahead log; see `StateMachine::apply`) before openraft purges
//! anything. No checkpoint, no copy.
//!
//! **A snapshot a peer needs is a RocksDB checkpoint**, taken when a peer
//! first asks for one after the newest point (`get_current_snapshot`):
//! hard links to the immutable table files, a memtable flush and a few
//! links however large the state. The network's `full_snapshot` streams it
//! ([`Checkpoint::stream`]), reading the checkpoint through a read-only
//! RocksDB instance a few chunks ahead of the wire. The receiver spools the
//! stream to a file, writes one SST file per column family from it and
//! ingests them; the installed snapshot is its newest point.
//!
//! A checkpoint pins the tables compaction has since replaced, so it lives
//! only while it can serve: the next point retires it, and its directory
//! goes when its last transfer lets go. In steady state, with no peer
//! behind, a node holds no checkpoint at all. Checkpoints never outlive the
//! process: one is a view for a transfer, not a durable copy, and a restart
//! removes them.
//!
//! **On the wire a snapshot is a stream of records** (a header, then
//! `[cf][key][value]` per key of every state column family), not the
//! checkpoint's own table files, because:
//! - table files a database wrote carry its sequence numbers, deletions and
//!   older versions; the RocksDB release berth links (8.x) ingests only files
//!   made by `SstFileWriter` (accepting a database's files came in 9.x);
//! - a checkpoint holds every column family, the Raft log and the derived
//!   indexes too, which a snapshot must not carry;
//! - the receiver checks every record's bounds and order and writes its own
//!   table files: a peer never hands RocksDB a file to parse.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use openraft::{LogId, SnapshotMeta, StoredMembership};
use rocksdb::{IteratorMode, Options, ReadOptions, SstFileWriter, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use super::{CF_BLOBS, CF_MANIFESTS, CF_REQUESTS, CF_SM};
use crate::{NodeId, NodeInfo};

type Membership = StoredMembership<NodeId, NodeInfo>;
type Meta = SnapshotMeta<NodeId, NodeInfo>;

pub(super) const KEY_APPLIED: &[u8] = b"applied";
pub(super) const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Where releases before this one named the checkpoint they served across
/// restarts (a [`StoredSnapshot`]); removed when the snapshot store opens.
const KEY_SNAPSHOT: &[u8] = b"snapshot";
/// Present while a snapshot install may have replaced part of the state:
/// the [`StoredSnapshot`] naming the received file being installed.
pub(super) const KEY_INSTALLING: &[u8] = b"installing";

/// Column families that make up the replicated state, in snapshot order
/// (new ones go at the end: the order numbers the snapshot records).
pub(super) const STATE_CFS: [&str; 10] = [
    CF_MANIFESTS,
    super::CF_TAGS,
    super::CF_LINKS,
    CF_BLOBS,
    super::CF_REFERRERS,
    super::CF_REPOS,
    CF_REQUESTS,
    super::CF_REQUEST_AGE,
    super::CF_STAMPS,
    super::CF_EVENTS,
];

/// Largest key and value a snapshot record may carry. Keys are a repository
/// name and an item (both bounded by the spec's grammar); values are at most
/// a manifest record, and manifests are bounded by `max_manifest_bytes`,
/// which config validation keeps under [`crate::meta::MAX_ENTRY_BYTES`].
const MAX_SNAPSHOT_KEY: usize = 64 << 10;
const MAX_SNAPSHOT_VALUE: usize = super::MAX_ENTRY_BYTES;

/// A snapshot the state machine serves (a checkpoint directory) or is
/// installing (a received file): its Raft metadata and its name in the
/// snapshot directory.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    pub(super) meta: Meta,
    pub(super) file: String,
}

/// What openraft carries as a snapshot's data. openraft has one type for
/// every use, so each is here: a snapshot being received is a file openraft
/// writes chunks into; one this node serves is a checkpoint, which only the
/// network's `full_snapshot` reads ([`Checkpoint::stream`]); a build returns
/// a point, whose data openraft drops unread. Only a received file can be
/// read, written or sought as a file.
pub enum SnapshotData {
    Receiving(tokio::fs::File),
    Checkpoint(Arc<Checkpoint>),
    /// What a build returns: openraft keeps only its meta.
    Point,
}

impl SnapshotData {
    fn file(self: Pin<&mut Self>) -> io::Result<Pin<&mut tokio::fs::File>> {
        match self.get_mut() {
            SnapshotData::Receiving(f) => Ok(Pin::new(f)),
            SnapshotData::Checkpoint(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a checkpoint is sent by streaming it (Checkpoint::stream), not read as a file",
            )),
            SnapshotData::Point => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot point has no data: a peer is sent a checkpoint taken when it asks",
            )),
        }
    }
}

impl tokio::io::AsyncRead for SnapshotData {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.file() {
            Ok(f) => f.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncWrite for SnapshotData {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.file() {
            Ok(f) => f.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.file() {
            Ok(f) => f.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.file() {
            Ok(f) => f.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, pos: io::SeekFrom) -> io::Result<()> {
        self.file()?.start_seek(pos)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.file() {
            Ok(f) => f.poll_complete(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// A checkpoint of the database that a snapshot is: its directory and
/// the Raft metadata of the state it holds.
pub struct Checkpoint {
    dir: PathBuf,
    meta: Meta,
    /// Set once a newer snapshot replaced this one: the directory is
    /// removed when the last holder (a transfer to a peer) lets go.
    retired: AtomicBool,
}

impl Checkpoint {
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Write the snapshot as a record stream (the header, then every key
    /// of every state column family) into `out`. Streams: memory holds a
    /// table block and one record.
    pub fn write_records(&self, out: &mut impl Write) -> io::Result<()> {
        let db = open_read_only(&self.dir, &STATE_CFS)?;
        out.write_all(&SNAPSHOT_HEADER)?;
        for (i, name) in STATE_CFS.iter().enumerate() {
            let mut ro = ReadOptions::default();
            // A transfer reads everything once: keep the cache for serving.
            ro.fill_cache(false);
            for item in db.iterator_cf_opt(cf(&db, name), ro, IteratorMode::Start) {
                let (k, v) = item.map_err(io::Error::other)?;
                write_record(out, i as u8, &k, &v)?;
            }
        }
        Ok(())
    }

    /// The record stream in chunks of `chunk` bytes, produced on a blocking
    /// thread at most two chunks ahead of the consumer; a failure is the
    /// last item. Dropping the receiver stops the producer.
    pub fn stream(self: Arc<Self>, chunk: usize) -> tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let mut out = Chunks { tx, buf: Vec::with_capacity(chunk), chunk };
            if let Err(e) = self.write_records(&mut out).and_then(|()| out.flush()) {
                let _ = out.tx.blocking_send(Err(e));
            }
        });
        rx
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire) {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "removing a retired snapshot checkpoint");
            }
        }
    }
}

/// A [`Write`] that hands out full chunks through a bounded channel.
struct Chunks {
    tx: tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
}

impl Chunks {
    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.tx.blocking_send(Ok(full)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "transfer stopped"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.send()?;
        }
        Ok(n)
    }

    /// Sends what is buffered: called once, at the end of the stream.
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.send()
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column family exists")
}

/// A read-only instance over a checkpoint; its reads go through the shared
/// block cache (see `meta::table_options`), and a transfer's do not fill it.
fn open_read_only(dir: &Path, cfs: &[&str]) -> io::Result<DB> {
    let cfs = cfs.iter().map(|n| rocksdb::ColumnFamilyDescriptor::new(*n, super::table_options(n)));
    DB::open_cf_descriptors_read_only(&Options::default(), dir, cfs, false)
        .map_err(|e| io::Error::other(format!("opening snapshot checkpoint {}: {e}", dir.display())))
}

/// The applied log id and membership `db` holds, read together: through one
/// iterator, so as of one sequence number. Not through a RocksDB snapshot:
/// releasing one has RocksDB rewrite every bottommost table whose keys
/// still carry sequence numbers (tables moved down whole, as one
/// repository's keys are), which in the scale bench was a fifth of each
/// node's compaction input, for nothing. berth takes no RocksDB snapshot.
pub(super) fn applied_of(db: &DB) -> io::Result<(Option<LogId<NodeId>>, Membership)> {
    let mut it = db.raw_iterator_cf(cf(db, CF_SM));
    let mut get = |k: &[u8]| -> io::Result<Option<Vec<u8>>> {
        it.seek(k);
        it.status().map_err(io::Error::other)?;
        Ok(it.key().filter(|found| *found == k).and(it.value()).map(<[u8]>::to_vec))
    };
    let applied = match get(KEY_APPLIED)? {
        Some(v) => crate::codec::decode(&v).map_err(io::Error::other)?,
        None => None,
    };
    let membership = match get(KEY_MEMBERSHIP)? {
        Some(v) => crate::codec::decode(&v).map_err(io::Error::other)?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

/// A value the state machine keeps about itself in [`CF_SM`].
pub(super) fn get_sm<T: serde::de::DeserializeOwned>(db: &DB, k: &[u8]) -> io::Result<Option<T>> {
    let v = db.get_cf(cf(db, CF_SM), k).map_err(io::Error::other)?;
    v.map(|v| crate::codec::decode(&v).map_err(io::Error::other)).transpose()
}

fn put_sm_synced(db: &DB, batch: WriteBatch) -> io::Result<()> {
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts).map_err(io::Error::other)
}

/// What a snapshot stream begins with: a magic and the format of the values
/// in its records. Streams of releases before format 1 have no header
/// (their first byte is a column family index, below 16), and are refused.
const SNAPSHOT_MAGIC: &[u8; 8] = b"BERTHSNP";
pub(super) const SNAPSHOT_HEADER: [u8; 9] = {
    let mut h = [crate::codec::FORMAT; 9];
    let mut i = 0;
    while i < 8 {
        h[i] = SNAPSHOT_MAGIC[i];
        i += 1;
    }
    h
};

/// Read and check a snapshot stream's header, leaving `r` at its first record.
pub(super) fn read_snapshot_header(r: &mut impl Read) -> io::Result<()> {
    let mut h = [0u8; 9];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(io::Error::other("corrupt snapshot: no header"))
        }
        Err(e) => return Err(e),
    }
    if &h[..8] != SNAPSHOT_MAGIC {
        return Err(io::Error::other(
            "a snapshot without a format header: sent by a release before format 1 (upgrade every node)",
        ));
    }
    match h[8] {
        crate::codec::FORMAT => Ok(()),
        f if f > crate::codec::FORMAT => Err(io::Error::other(format!(
            "a snapshot of format {f}, from a newer release; this one reads up to {}",
            crate::codec::FORMAT
        ))),
        f => Err(io::Error::other(format!("corrupt snapshot: format {f}"))),
    }
}

/// Rewrite a snapshot file of a release before format 1 in the current
/// format, in place (a new file renamed over it; done already if it has the
/// header). Streams: memory holds one record. Part of the data dir's
/// conversion, see `meta::upgrade`: a node of that release may have been
/// installing one when it stopped.
pub(super) fn convert_snapshot_file(path: &Path) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut first = [0u8; 8];
    let n = r.read(&mut first)?;
    if n == 8 && &first == SNAPSHOT_MAGIC {
        return Ok(());
    }
    let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let tmp = path.with_extension("converting");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    w.write_all(&SNAPSHOT_HEADER)?;
    while let Some((i, k, mut v)) = read_record(&mut r)? {
        let name = STATE_CFS[i];
        if [CF_MANIFESTS, CF_BLOBS, CF_REQUESTS].contains(&name) {
            v = super::upgrade::convert_value(name, &k, &v)
                .map_err(|why| io::Error::other(format!("snapshot record of {name}: {why}")))?;
        }
        write_record(&mut w, i as u8, &k, &v)?;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    crate::durable::rename_into_place(&tmp, path)
}

fn write_record(w: &mut impl Write, cf_index: u8, k: &[u8], v: &[u8]) -> io::Result<()> {
    w.write_all(&[cf_index])?;
    w.write_all(&(k.len() as u32).to_be_bytes())?;
    w.write_all(k)?;
    w.write_all(&(v.len() as u32).to_be_bytes())?;
    w.write_all(v)
}

/// A snapshot record: the index of its column family in [`STATE_CFS`],
/// its key, its value.
type Record = (usize, Vec<u8>, Vec<u8>);

/// The next snapshot record, None at the end of the stream; an index
/// beyond [`STATE_CFS`] is corrupt.
pub(super) fn read_record(r: &mut impl Read) -> io::Result<Option<Record>> {
    let mut tag = [0u8; 1];
    match r.read_exact(&mut tag) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let i = tag[0] as usize;
    if i >= STATE_CFS.len() {
        return Err(io::Error::other("corrupt snapshot: bad column family"));
    }
    let k = read_field(r, MAX_SNAPSHOT_KEY)?;
    let v = read_field(r, MAX_SNAPSHOT_VALUE)?;
    Ok(Some((i, k, v)))
}

/// Read one length-prefixed field of a snapshot record, at most `max` bytes
/// (a length is whatever the sender wrote: bound it before allocating).
fn read_field(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::other(format!("corrupt snapshot: a field of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Turn a received snapshot file into one SST file per state column family
/// (None for an empty one), streaming: memory holds one record and one SST
/// block. Records must come grouped by column family, each group in key
/// order, as [`Checkpoint::write_records`] writes them; anything else is
/// refused as corrupt.
pub(super) fn write_ssts(store: &SnapshotStore, file: std::fs::File) -> io::Result<Vec<Option<PathBuf>>> {
    let opts: Vec<Options> = STATE_CFS.iter().map(|n| super::table_options(n)).collect();
    let mut out: Vec<Option<PathBuf>> = vec![None; STATE_CFS.len()];
    let mut writer: Option<(usize, SstFileWriter<'_>)> = None;
    let finish = |w: &mut SstFileWriter<'_>| w.finish().map_err(io::Error::other);
    let mut r = BufReader::with_capacity(1 << 20, file);
    read_snapshot_header(&mut r)?;
    while let Some((i, k, v)) = read_record(&mut r)? {
        match &mut writer {
            Some((current, _)) if *current == i => {}
            Some((current, _)) if *current > i => {
                return Err(io::Error::other("corrupt snapshot: column families out of order"));
            }
            _ => {
                if let Some((_, w)) = &mut writer {
                    finish(w)?;
                }
                let path = store.scratch_sst(i);
                let w = SstFileWriter::create(&opts[i]);
                w.open(&path).map_err(io::Error::other)?;
                out[i] = Some(path);
                writer = Some((i, w));
            }
        }
        let (_, w) = writer.as_mut().expect("a writer is open");
        // Keys out of order are refused here.
        w.put(&k, &v).map_err(|e| io::Error::other(format!("corrupt snapshot: {e}")))?;
    }
    if let Some((_, w)) = &mut writer {
        finish(w)?;
    }
    Ok(out)
}

/// Prefix of the SST files an install writes before ingesting them.
const SST_SCRATCH: &str = "ingest-";
/// Prefix of a checkpoint being taken, not yet serving.
const BUILD_SCRATCH: &str = "build-";
/// Prefix of a snapshot being received.
const RECV_SCRATCH: &str = "recv-";
/// Prefix of a serving (or retired, still being sent) checkpoint.
const CHECKPOINT: &str = "ckpt-";

/// A checkpoint taken, not yet serving.
pub(super) struct Taken {
    path: PathBuf,
    pub(super) applied: Option<LogId<NodeId>>,
    pub(super) membership: Membership,
}

/// What this node serves a peer that needs a snapshot.
#[derive(Default)]
struct Serving {
    /// The newest snapshot point: the applied state a build made durable
    /// (openraft purges the log behind it) or an install put in place.
    /// None until the first since the process started.
    point: Option<Meta>,
    /// A checkpoint at or after `point`, taken when a peer first asked.
    checkpoint: Option<Arc<Checkpoint>>,
}

/// The snapshot directory (checkpoints serving peers, checkpoints being
/// taken, received snapshots being installed) and the newest snapshot
/// point. Builds run in a task of their own while the state machine goes on
/// applying and installing, so moving the point and installing a received
/// snapshot take one lock: a build that finishes after a newer snapshot was
/// installed must neither fail nor move the point back.
pub(super) struct SnapshotStore {
    dir: PathBuf,
    serving: Mutex<Serving>,
}

fn stamp() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros()
}

impl SnapshotStore {
    /// Open the directory, keeping only a received snapshot whose install a
    /// restart must finish. Everything else is removed: checkpoints (they
    /// never outlive a process), checkpoints and transfers a crash cut
    /// short, and the snapshot files of releases before.
    pub(super) fn open(dir: PathBuf, db: &DB) -> io::Result<SnapshotStore> {
        crate::durable::create_dir_all(&dir)?;
        let installing: Option<StoredSnapshot> = get_sm(db, KEY_INSTALLING)?;
        let keep = installing.map(|s| dir.join(s.file));
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            if keep.as_ref() == Some(&path) {
                continue;
            }
            let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            if let Err(e) = gone {
                tracing::warn!(path = %path.display(), error = %e, "removing a stale snapshot");
            }
        }
        if db.get_cf(cf(db, CF_SM), KEY_SNAPSHOT).map_err(io::Error::other)?.is_some() {
            db.delete_cf(cf(db, CF_SM), KEY_SNAPSHOT).map_err(io::Error::other)?;
        }
        Ok(SnapshotStore { dir, serving: Mutex::new(Serving::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Serving> {
        self.serving.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest snapshot point, if there was one since the start.
    pub(super) fn point(&self) -> Option<Meta> {
        self.lock().point.clone()
    }

    /// The checkpoint to serve the newest point with, if one was taken
    /// since that point.
    pub(super) fn serving(&self) -> Option<Arc<Checkpoint>> {
        let s = self.lock();
        s.checkpoint.clone().filter(|c| s.point.as_ref().is_some_and(|p| c.meta.last_log_id >= p.last_log_id))
    }

    /// Make `meta` the newest snapshot point, unless a newer one already is
    /// (an install that finished first): then that one is returned. The
    /// caller made the state at `meta` durable. A checkpoint older than the
    /// point is retired: a peer that needs a snapshot now needs a newer one.
    pub(super) fn mark(&self, meta: Meta) -> Meta {
        let mut s = self.lock();
        if let Some(p) = s.point.as_ref().filter(|p| p.last_log_id > meta.last_log_id) {
            return p.clone();
        }
        if s.checkpoint.as_ref().is_some_and(|c| c.meta.last_log_id < meta.last_log_id) {
            if let Some(old) = s.checkpoint.take() {
                old.retire();
            }
        }
        s.point = Some(meta.clone());
        meta
    }

    /// Take a checkpoint of `db` as it is now. None if `unfenced`, asked
    /// once the checkpoint is taken, says a snapshot install began
    /// meanwhile (the checkpoint would hold a half-replaced state; it is
    /// removed). Nothing is synced: a checkpoint does not outlive the
    /// process, and the tables it links are already durable.
    pub(super) fn take(&self, db: &DB, unfenced: impl FnOnce() -> bool) -> io::Result<Option<Taken>> {
        let path = self.dir.join(format!("{BUILD_SCRATCH}{}", stamp()));
        let made = rocksdb::checkpoint::Checkpoint::new(db).and_then(|c| c.create_checkpoint(&path));
        made.map_err(|e| io::Error::other(format!("taking a checkpoint in {}: {e}", path.display())))?;
        if !unfenced() {
            std::fs::remove_dir_all(&path)?;
            return Ok(None);
        }
        // The id and membership the checkpoint holds, not the live
        // database's: entries go on being applied meanwhile.
        let (applied, membership) = applied_of(&open_read_only(&path, &[CF_SM])?)?;
        Ok(Some(Taken { path, applied, membership }))
    }

    /// Serve a taken checkpoint, with `meta`, unless one as new already
    /// serves: then the taken one is removed and that one returned.
    pub(super) fn serve(&self, taken: Taken, meta: Meta) -> io::Result<Arc<Checkpoint>> {
        let mut s = self.lock();
        if let Some(c) = s.checkpoint.as_ref().filter(|c| c.meta.last_log_id >= meta.last_log_id) {
            std::fs::remove_dir_all(&taken.path)?;
            return Ok(c.clone());
        }
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let dir = self.dir.join(format!("{CHECKPOINT}{index}-{}", stamp()));
        std::fs::rename(&taken.path, &dir)?;
        let new = Arc::new(Checkpoint { dir, meta, retired: AtomicBool::new(false) });
        if let Some(old) = s.checkpoint.replace(new.clone()) {
            old.retire();
        }
        Ok(new)
    }

    /// A fresh path for a snapshot being received.
    pub(super) fn receiving(&self) -> PathBuf {
        self.dir.join(format!("{RECV_SCRATCH}{}.snap", stamp()))
    }

    /// Mark the received snapshot at `from` as being installed: refused if
    /// a newer snapshot is current; otherwise renamed to a name of ours and
    /// named by [`KEY_INSTALLING`] in a synced write, so a restart finishes
    /// the install from it. Returns its path.
    pub(super) fn begin_install(&self, db: &DB, from: &Path, meta: &Meta) -> io::Result<PathBuf> {
        let s = self.lock();
        if s.point.as_ref().is_some_and(|p| p.last_log_id > meta.last_log_id) {
            return Err(io::Error::other("a newer snapshot than the one to install is current"));
        }
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let name = format!("install-{index}-{}.snap", stamp());
        let path = self.dir.join(&name);
        crate::durable::rename_into_place(from, &path)?;
        let mut batch = WriteBatch::default();
        let stored = StoredSnapshot { meta: meta.clone(), file: name };
        batch.put_cf(cf(db, CF_SM), KEY_INSTALLING, crate::codec::encode(&stored));
        put_sm_synced(db, batch)?;
        Ok(path)
    }

    /// A fresh path for the SST file of state column family `i`.
    fn scratch_sst(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{SST_SCRATCH}{}-{i}.sst", stamp()))
    }

    /// Remove the SST files an install left (ingestion moves them into the
    /// database; a failure midway leaves them).
    pub(super) fn remove_scratch_ssts(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(SST_SCRATCH) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The snapshot a stored [`KEY_INSTALLING`] names, if any: a restart
/// finishes installing it.
pub(super) fn pending_install(db: &DB, store: &SnapshotStore) -> io::Result<Option<(Meta, PathBuf)>> {
    let pending: Option<StoredSnapshot> = get_sm(db, KEY_INSTALLING)?;
    Ok(pending.map(|p| (p.meta, store.dir.join(p.file))))
}
