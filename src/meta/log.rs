//! The Raft log on RocksDB. Appends go to the memtable at once (so readers see
//! them) and are made durable by one flusher thread that syncs the WAL for
//! every append waiting, then completes their callbacks in order: a group
//! commit, so many concurrent writes share one fsync.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use super::{CF_LOGS, CF_RAFT};
use crate::codec;
use crate::{NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;
type SResult<T> = Result<T, StorageError<NodeId>>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    committed: CommitIndex,
}

/// The highest log index this node knows to be committed, as openraft last
/// saved it. `cluster status` shows it per node; openraft 0.9's metrics do
/// not carry it.
#[derive(Clone, Debug, Default)]
pub struct CommitIndex(Arc<AtomicU64>);

impl CommitIndex {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, committed: Option<LogId<NodeId>>) {
        self.0.store(committed.map_or(0, |l| l.index), Ordering::Relaxed);
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> LogStore {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let res = flush_db.flush_wal(true);
                    for cb in batch {
                        let r = res.as_ref().map_err(|e| std::io::Error::other(e.to_string()));
                        cb.log_io_completed(r.map(|_| ()));
                    }
                }
            })
            .expect("spawn flusher");
        let store = LogStore { db, flusher: tx, committed: CommitIndex::default() };
        if let Ok(Some(c)) = store.get_raft::<Option<LogId<NodeId>>>(KEY_COMMITTED) {
            store.committed.set(c);
        }
        store
    }

    /// The index of the last entry in the log as it is on disk (0: none).
    /// A node restarted as leader reads no earlier than this: see
    /// `cluster::read_index`.
    pub fn last_index(&self) -> u64 {
        match self.db.iterator_cf(self.cf_logs(), IteratorMode::End).next() {
            Some(Ok((k, _))) => u64::from_be_bytes(k[..8].try_into().expect("8-byte key")),
            _ => 0,
        }
    }

    /// The term of the vote on disk (0: none).
    pub fn vote_term(&self) -> u64 {
        match self.get_raft::<Vote<NodeId>>(KEY_VOTE) {
            Ok(Some(v)) => v.leader_id().get_term(),
            _ => 0,
        }
    }

    /// A handle on the commit index this store records.
    pub fn commit_index(&self) -> CommitIndex {
        self.committed.clone()
    }

    fn cf_logs(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_LOGS).expect("logs cf")
    }

    fn cf_raft(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_RAFT).expect("raft cf")
    }

    fn get_raft<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> SResult<Option<T>> {
        let v = self.db.get_cf(self.cf_raft(), k).map_err(read_err)?;
        v.map(|v| codec::decode(&v).map_err(read_err)).transpose()
    }

    /// Small raft-state writes (vote, purge marker) are synced immediately:
    /// a vote that is forgotten after a crash can elect two leaders.
    fn put_raft_synced<T: serde::Serialize>(&self, k: &[u8], v: &T) -> SResult<()> {
        let bytes = codec::encode(v);
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.put_cf_opt(self.cf_raft(), k, bytes, &opts).map_err(write_err)
    }
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
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf_logs(), IteratorMode::From(&key(start), Direction::Forward)) {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k[..8].try_into().expect("8-byte key"));
            if !range.contains(&idx) {
                break;
            }
            out.push(codec::decode(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_raft(KEY_PURGED)?;
        let last = match self.db.iterator_cf(self.cf_logs(), IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let e: Entry = codec::decode(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged_log_id,
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
        self.get_raft(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        self.committed.set(committed);
        // Not synced: losing it only means re-learning the commit index.
        let bytes = codec::encode(&committed);
        self.db.put_cf(self.cf_raft(), KEY_COMMITTED, bytes).map_err(write_err)
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        Ok(self.get_raft::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for e in entries {
            let bytes = codec::encode(&e);
            batch.put_cf(self.cf_logs(), key(e.log_id.index), bytes);
        }
        self.db.write(batch).map_err(write_err)?;
        self.flusher.send(callback).map_err(|_| write_err(std::io::Error::other("log flusher stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_logs(), key(log_id.index), key(u64::MAX));
        self.db.write_opt(batch, &opts).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.put_raft_synced(KEY_PURGED, &log_id)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_logs(), key(0), key(log_id.index + 1));
        self.db.write(batch).map_err(write_err)?;
        // Drop now the tables that hold only purged
        // entries, instead of compacting them under the tombstone above:
        // the log's disk is then bounded by what is kept, not by how far
        // compaction lags. RocksDB leaves level-0 tables and tables that
        // reach past the range; the tombstone, written first and newer than
        // every entry it covers, hides whatever they hold.
        if let Err(e) = self.db.delete_file_in_range_cf(self.cf_logs(), key(0), key(log_id.index)) {
            tracing::warn!(error = %e, "dropping purged log tables");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn log_table_bytes(db: &DB) -> u64 {
        super::super::family_bytes(db).into_iter().find(|(f, _)| *f == CF_LOGS).map_or(0, |(_, b)| b)
    }

    /// A purge frees the disk of the entries it removes at once, not when
    /// compaction next reaches them: tables below level 0 that hold only
    /// purged entries are dropped.
    #[tokio::test]
    async fn a_purge_drops_the_tables_of_purged_entries_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_db(&dir.path().join("db")).unwrap();
        let mut store = LogStore::new(db.clone());
        let cf = db.cf_handle(CF_LOGS).unwrap();
        // Three thousand entries of incompressible bytes, flushed and
        // compacted out of level 0, as a busy log's older entries are.
        let mut x = 1u64;
        for i in 1..=3000u64 {
            let value: Vec<u8> = (0..1000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            db.put_cf(cf, key(i), value).unwrap();
        }
        db.flush_cf(cf).unwrap();
        db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        let before = log_table_bytes(&db);
        assert!(before > 2_000_000, "entries in tables: {before}");
        store.purge(LogId::new(CommittedLeaderId::new(1, 1), 3000)).await.unwrap();
        let after = log_table_bytes(&db);
        assert!(after < before / 10, "log tables after the purge: {after} of {before} bytes");
        // Nothing purged reads back.
        assert!(store.try_get_log_entries(0..=3000).await.unwrap().is_empty());
    }
}
