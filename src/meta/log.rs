//! The Raft log: entries in segment files of their own (see [`Segments`]),
//! the vote, the commit index and the purge mark in the state database's
//! raft column family. Appends go to the page cache at once (so readers see
//! them) and are made durable by one flusher thread that syncs for every
//! append waiting, then completes their callbacks in order: a group commit,
//! so many concurrent writes share one fsync.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{IteratorMode, DB};

use super::segments::Segments;
use super::{CF_LOGS, CF_RAFT};
use crate::codec;
use crate::{NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;
type SResult<T> = Result<T, StorageError<NodeId>>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// How many entries one step of moving a log out of the database carries
/// (see [`LogStore::open`]): the move never holds the whole log.
const MOVE_BATCH: usize = 1024;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    segments: Arc<Segments>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    stats: LogStats,
}

/// What `cluster status` and `/metrics` show of this node's log: the
/// highest index it knows to be committed, as openraft last saved it
/// (openraft 0.9's metrics do not carry it), and the bytes of its segment
/// files.
#[derive(Clone)]
pub struct LogStats {
    committed: Arc<AtomicU64>,
    segments: Arc<Segments>,
}

impl LogStats {
    /// The commit index (0: none yet).
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Bytes of the log's segment files on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.bytes()
    }

    fn set_committed(&self, committed: Option<LogId<NodeId>>) {
        self.committed.store(committed.map_or(0, |l| l.index), Ordering::Relaxed);
    }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// Open the log whose segments are in `dir` and whose vote and marks are
    /// in `db`. A log a release before this one kept in `db`'s `logs`
    /// column family is moved into segments first, idempotently: entries
    /// are copied (those the segments lack), synced, and only then deleted
    /// from the database, synced; a crash midway repeats what is left.
    pub fn open(db: Arc<DB>, dir: &Path) -> anyhow::Result<LogStore> {
        let segments = Arc::new(Segments::open(dir)?);
        move_from_db(&db, &segments)?;
        let purged: Option<LogId<NodeId>> = get_raft(&db, KEY_PURGED)?;
        if let Some(p) = purged {
            segments.purge(p.index)?;
        }
        let live = purged.map_or(0, |p| p.index + 1);
        if let Some(gap) = segments.first_gap_after(live) {
            anyhow::bail!(
                "the Raft log in {} lacks entry {gap}, which is after its purge mark ({live}): it cannot be \
                 replayed; remove this node's data dir and join it again",
                dir.display()
            );
        }
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush = segments.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let res = flush.sync();
                    for cb in batch {
                        let r = res.as_ref().map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
                        cb.log_io_completed(r.map(|_| ()));
                    }
                }
            })
            .expect("spawn flusher");
        let stats = LogStats { committed: Arc::default(), segments: segments.clone() };
        if let Some(c) = get_raft::<Option<LogId<NodeId>>>(&db, KEY_COMMITTED)? {
            stats.set_committed(c);
        }
        Ok(LogStore { db, segments, flusher: tx, stats })
    }

    /// The index of the last entry in the log as it is on disk (0: none).
    /// A node restarted as leader reads no earlier than this: see
    /// `cluster::read_index`.
    pub fn last_index(&self) -> u64 {
        self.segments.last_index().unwrap_or(0)
    }

    /// The term of the vote on disk (0: none).
    pub fn vote_term(&self) -> u64 {
        match get_raft::<Vote<NodeId>>(&self.db, KEY_VOTE) {
            Ok(Some(v)) => v.leader_id().get_term(),
            _ => 0,
        }
    }

    /// A handle on what this log shows of itself.
    pub fn stats(&self) -> LogStats {
        self.stats.clone()
    }

    fn cf_raft(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_RAFT).expect("raft cf")
    }

    /// Small raft-state writes (vote, purge marker) are synced immediately:
    /// a vote that is forgotten after a crash can elect two leaders.
    fn put_raft_synced<T: serde::Serialize>(&self, k: &[u8], v: &T) -> SResult<()> {
        let bytes = codec::encode(v);
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.put_cf_opt(self.cf_raft(), k, bytes, &opts).map_err(write_err)
    }

    fn decode_range(&self, start: u64, end: u64) -> SResult<Vec<Entry>> {
        let read = self.segments.read(start..end).map_err(read_err)?;
        read.iter().map(|(_, v)| codec::decode(v).map_err(read_err)).collect()
    }
}

fn get_raft<T: serde::de::DeserializeOwned>(db: &DB, k: &[u8]) -> SResult<Option<T>> {
    let v = db.get_cf(db.cf_handle(CF_RAFT).expect("raft cf"), k).map_err(read_err)?;
    v.map(|v| codec::decode(&v).map_err(read_err)).transpose()
}

/// Move a log kept in `db`'s `logs` column family (by releases before the
/// segment files) into `segments`; see [`LogStore::open`].
fn move_from_db(db: &DB, segments: &Segments) -> anyhow::Result<()> {
    let cf = db.cf_handle(CF_LOGS).expect("logs cf");
    if db.iterator_cf(cf, IteratorMode::Start).next().is_none() {
        super::upgrade::mark_log_moved(db)?;
        return Ok(());
    }
    let have = segments.last_index();
    let mut moved = 0u64;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(MOVE_BATCH);
    let flush = |batch: &mut Vec<(u64, Vec<u8>)>| -> std::io::Result<()> {
        // Entries after a hole (a snapshot install's) start a new run.
        let mut start = 0;
        for i in 1..=batch.len() {
            if i == batch.len() || batch[i].0 != batch[i - 1].0 + 1 {
                segments.append(&batch[start..i])?;
                start = i;
            }
        }
        batch.clear();
        Ok(())
    };
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item?;
        let index =
            u64::from_be_bytes(k[..8].try_into().map_err(|_| anyhow::anyhow!("a log key of {} bytes", k.len()))?);
        if have.is_some_and(|h| index <= h) {
            continue;
        }
        batch.push((index, v.to_vec()));
        moved += 1;
        if batch.len() >= MOVE_BATCH {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)?;
    segments.sync()?;
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    let mut wb = rocksdb::WriteBatch::default();
    wb.delete_range_cf(cf, 0u64.to_be_bytes(), u64::MAX.to_be_bytes());
    db.write_opt(wb, &opts)?;
    db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
    super::upgrade::mark_log_moved(db)?;
    tracing::info!(entries = moved, "moved the Raft log out of the metadata database into segment files");
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        self.decode_range(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = get_raft(&self.db, KEY_PURGED)?;
        let last = match self.segments.last_index() {
            Some(i) if last_purged_log_id.is_none_or(|p| i > p.index) => {
                self.decode_range(i, i + 1)?.pop().map(|e| e.log_id)
            }
            _ => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        self.put_raft_synced(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        get_raft(&self.db, KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        self.stats.set_committed(committed);
        // Not synced: losing it only means re-learning the commit index.
        let bytes = codec::encode(&committed);
        self.db.put_cf(self.cf_raft(), KEY_COMMITTED, bytes).map_err(write_err)
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        Ok(get_raft::<Option<LogId<NodeId>>>(&self.db, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let batch: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.log_id.index, codec::encode(&e))).collect();
        self.segments.append(&batch).map_err(write_err)?;
        self.flusher.send(callback).map_err(|_| write_err(std::io::Error::other("log flusher stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.segments.truncate(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        // The mark first, synced: entries at or below it are never read
        // again, whatever of them a crash leaves on disk.
        self.put_raft_synced(KEY_PURGED, &log_id)?;
        self.segments.purge(log_id.index).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    /// A data dir of the release before keeps its log in the database's
    /// `logs` family: opening moves it into segments, once, even when a
    /// crash cut the first move short, and nothing is left behind.
    #[tokio::test]
    async fn a_log_kept_in_the_database_is_moved_into_segments_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_db(&dir.path().join("db")).unwrap();
        let cf = db.cf_handle(CF_LOGS).unwrap();
        let raft = db.cf_handle(CF_RAFT).unwrap();
        let format = || db.get_cf(raft, super::super::upgrade::KEY_FORMAT).unwrap();
        db.put_cf(raft, super::super::upgrade::KEY_FORMAT, [1u8]).unwrap();
        for i in 1..=3000u64 {
            db.put_cf(cf, i.to_be_bytes(), codec::encode(&entry(i))).unwrap();
        }
        let segs = dir.path().join("raft-log");
        // A first move that stopped after 1000 entries, before deleting.
        {
            let s = Segments::open(&segs).unwrap();
            let part: Vec<_> = (1..=1000u64).map(|i| (i, codec::encode(&entry(i)))).collect();
            s.append(&part).unwrap();
            s.sync().unwrap();
        }
        let mut store = LogStore::open(db.clone(), &segs).unwrap();
        let got = store.try_get_log_entries(1..=3000).await.unwrap();
        assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (1..=3000).collect::<Vec<_>>());
        assert!(db.iterator_cf(cf, IteratorMode::Start).next().is_none(), "the family is emptied");
        // Marked so that a release before, which reads the log from the
        // family, refuses the data dir.
        assert_eq!(format().as_deref(), Some(&[super::super::upgrade::DIR_FORMAT][..]));
        assert_eq!(store.get_log_state().await.unwrap().last_log_id.unwrap().index, 3000);
        drop(store);
        let mut store = LogStore::open(db, &segs).unwrap();
        assert_eq!(store.try_get_log_entries(2999..).await.unwrap().len(), 2);
    }

    /// A purge's mark holds across a reopen, and the entries after it read
    /// back (the segments' own tests show whole files going).
    #[tokio::test]
    async fn a_purge_mark_holds_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_db(&dir.path().join("db")).unwrap();
        let segs = dir.path().join("raft-log");
        let mut store = LogStore::open(db.clone(), &segs).unwrap();
        let batch: Vec<_> = (1..=1000u64).map(|i| (i, codec::encode(&entry(i)))).collect();
        store.segments.append(&batch).unwrap();
        store.segments.sync().unwrap();
        store.purge(LogId::new(CommittedLeaderId::new(1, 1), 900)).await.unwrap();
        drop(store);
        let mut store = LogStore::open(db, &segs).unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.unwrap().index, 900);
        assert_eq!(state.last_log_id.unwrap().index, 1000);
        assert_eq!(store.try_get_log_entries(901..=1000).await.unwrap().len(), 100);
        assert!(store.stats().bytes() > 0);
    }
}
