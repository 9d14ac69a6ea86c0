//! The replicated metadata: the Raft log entry ([`Command`]), the RocksDB
//! state machine that applies it, the Raft log store, and read-only queries
//! over the applied state. Knows nothing of HTTP or gRPC.

mod command;
mod events;
mod fence;
mod identity;
mod log;
mod lost;
mod segments;
mod snapshot;
mod state;
pub mod upgrade;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, DB};
use serde::{Deserialize, Serialize};

pub use command::{
    glob_match, Batch, Command, Context, EventKey, ImmutableTags, Outcome, Outcomes, Proposal, Rejection, RequestId,
    RequestIds, RequestInfo,
};
pub use events::{EventAction, StoredEvent, TagStamp};
pub use fence::{InstallFence, Installing};
pub use identity::{IdentityError, IdentityStore, StoredIdentity};
pub use log::{LogStats, LogStore};
pub use lost::LostCopies;
pub use snapshot::{Checkpoint, SnapshotData};
pub use state::StateMachine;

use crate::oci::{Descriptor, Digest, Name, Tag};
use crate::NodeId;

const CF_LOGS: &str = "logs";
const CF_RAFT: &str = "raft";
const CF_SM: &str = "sm";
const CF_MANIFESTS: &str = "manifests";
const CF_TAGS: &str = "tags";
const CF_LINKS: &str = "blob_links";
const CF_BLOBS: &str = "blobs";
const CF_REFERRERS: &str = "referrers";
const CF_REPOS: &str = "repos";
/// Recently applied request ids and their outcomes (see [`RequestId`]).
const CF_REQUESTS: &str = "requests";
/// The same ids keyed by the log index that applied them, oldest first, so
/// expiring them touches only what expires.
const CF_REQUEST_AGE: &str = "request_age";
/// Which manifests reference which blob or child manifest in a
/// repository: `repo \0 blob \0 manifest`. Derived from the manifests (rebuilt, never
/// sent in snapshots); garbage collection asks it whether a link is used.
const CF_BLOB_REFS: &str = "blob_refs";
/// Which repositories link a blob: `blob \0 repo`. Derived from the links.
const CF_BLOB_REPOS: &str = "blob_repos";
/// When each manifest and tag was last pushed (`repo \0 digest` or
/// `repo \0 tag`, a u64 of ms since the epoch, the proposer's clock):
/// what retention counts and ages by. Items pushed before it existed have
/// no time, and retention never removes them.
const CF_STAMPS: &str = "stamps";
/// Events for webhooks (`e`, then the [`EventKey`]), each a JSON
/// [`StoredEvent`], and each endpoint's delivery cursor (`c` + name).
const CF_EVENTS: &str = "events";

/// The largest command a Raft entry may carry, in bytes. Manifests travel
/// in commands, so `max_manifest_bytes` must stay below it (config
/// validation checks), and batches and AppendEntries are bounded by it.
pub const MAX_ENTRY_BYTES: usize = 16 << 20;

/// A stored manifest: the exact bytes the client pushed and their media type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// The cluster-wide blob index entry: size and which nodes hold a fsynced copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    pub holders: Vec<NodeId>,
}

/// Key layout. Repository names, tags and digests never contain NUL, so NUL
/// separates components and a repository's keys share one prefix.
mod keys {
    use crate::oci::{Digest, Name};

    pub fn repo_prefix(repo: &Name) -> Vec<u8> {
        let mut k = repo.as_str().as_bytes().to_vec();
        k.push(0);
        k
    }

    pub fn repo_item(repo: &Name, item: &str) -> Vec<u8> {
        let mut k = repo_prefix(repo);
        k.extend_from_slice(item.as_bytes());
        k
    }

    /// `repo \0 blob \0`: the prefix of the references to `blob` in `repo`.
    pub fn blob_refs_prefix(repo: &Name, blob: &str) -> Vec<u8> {
        let mut k = repo_item(repo, blob);
        k.push(0);
        k
    }

    pub fn blob_ref(repo: &Name, blob: &str, manifest: &str) -> Vec<u8> {
        let mut k = blob_refs_prefix(repo, blob);
        k.extend_from_slice(manifest.as_bytes());
        k
    }

    /// `blob \0`: the prefix of the repositories linking `blob`.
    pub fn blob_repos_prefix(blob: &str) -> Vec<u8> {
        let mut k = blob.as_bytes().to_vec();
        k.push(0);
        k
    }

    pub fn blob_repo(blob: &str, repo: &Name) -> Vec<u8> {
        let mut k = blob_repos_prefix(blob);
        k.extend_from_slice(repo.as_str().as_bytes());
        k
    }

    /// A link's value: the blob's size, then when it was linked (ms since
    /// the epoch; links written before GC existed carry no time: 0).
    pub fn link_value(size: u64, at_ms: u64) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&size.to_be_bytes());
        v[8..].copy_from_slice(&at_ms.to_be_bytes());
        v
    }

    /// (size, linked at) of a link value; None if malformed.
    pub fn parse_link(v: &[u8]) -> Option<(u64, u64)> {
        let size = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        let at = match v.get(8..16) {
            Some(t) => u64::from_be_bytes(t.try_into().ok()?),
            None => 0,
        };
        Some((size, at))
    }

    pub fn referrer(repo: &Name, subject: &Digest, digest: &Digest) -> Vec<u8> {
        let mut k = repo_item(repo, &subject.to_string());
        k.push(0);
        k.extend_from_slice(digest.to_string().as_bytes());
        k
    }
}

/// The write-ahead log RocksDB keeps at most, across column families.
const MAX_WAL_BYTES: u64 = 128 << 20;
/// Memtable memory of all column families together. RocksDB's default is a
/// bound per family (two 64 MiB memtables each): with 15 families, a node
/// rebuilding an index or catching up could hold gigabytes. Past this
/// budget RocksDB flushes the largest memtable.
const WRITE_BUFFER_BYTES: usize = 128 << 20;
/// The table block cache all column families share. RocksDB's default is a
/// 32 MiB cache per family (480 MiB for 15), which a node joining at a
/// million manifests filled, peaking at 326 MiB.
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Table block size: 16 KiB, four times RocksDB's default, so the index a
/// table keeps in memory is a quarter as large (about 2% of the data at 4
/// KiB with digest-sized keys) and LZ4 compresses larger runs.
const BLOCK_BYTES: usize = 16 << 10;
/// Memtables a column family may hold, the one written and those waiting
/// for their flush. RocksDB's default is two: when a family's full memtable
/// still waits for the one flush thread (behind the other families that
/// the write-ahead log bound flushes at the same moment) and the new one
/// fills too, RocksDB stops every write until the flush ends. At a million
/// manifests the Raft log's family did so every ~6 s, for 40-130 ms each
/// time. The memtable budget ([`WRITE_BUFFER_BYTES`]) still schedules the
/// flushes.
const MEMTABLES_PER_FAMILY: i32 = 4;
/// Level-0 tables that start a compaction into the level below (RocksDB's
/// default is four). Every such compaction rewrites the tables below that
/// the new keys overlap, which for digests is all of them in the range, so
/// gathering twice the tables halves those rewrites. At a million manifests
/// this cut each node's compaction input by a fifth (4.0-4.4 GB to 3.4-3.5
/// GB) in the scale bench; a point read looks at more level-0 tables, each
/// through its index. Sixteen (with RocksDB's slowdown and stop triggers
/// raised to 32 and 48) cut compaction little further and cost more in
/// reads: the rate at a million manifests fell to 0.68 of the first
/// 100,000's, and p99 rose to 49.8 ms.
const L0_FILES_PER_COMPACTION: i32 = 8;
/// Bloom filter bits per key in the request id family's tables: a point
/// read skips a table that lacks its key after one filter probe (1% false
/// positives at ten bits), instead of searching the table's index and
/// reading a data block. Every applied proposal looks up its request id,
/// which is new, so without a filter that read searched every level-0
/// table and one table per level, a cost that grows with the state. No
/// other family is read for an absent key on every write. Filters on every
/// family cost
/// each node 10-20 MiB more RSS at a million manifests (1.25 bytes per
/// key, beside each open table's index), and the scale bench showed no
/// gain from them within its run-to-run spread.
const FILTER_BITS_PER_KEY: f64 = 10.0;

/// Bytes a table file (a flush's, a compaction's) is written ahead of its
/// final sync: RocksDB asks the kernel to write each such run out as it
/// goes. Without it a table can reach its `fsync` with tens of megabytes
/// dirty, and on ext4 (one journal for the file system) the Raft log's
/// small synced appends waited behind that writeback: on this project's
/// test machine one 4 KiB `fdatasync` took up to 1.27 s while a 1.5 GB
/// file was synced at its end, 56 ms when it was written out as it went.
const BYTES_PER_SYNC: u64 = 1 << 20;

/// Manifests at least this large are kept apart from the keys, in RocksDB's
/// blob files (its integrated key-value separation): a flush writes each
/// one once, into a blob file, and compactions move only its key and a
/// reference to it. Manifest keys are digests, spread across their
/// repository's range, so every compaction of the manifest family would
/// otherwise rewrite the manifests of every table it overlaps, again at
/// each level.
const MIN_BLOB_BYTES: u64 = 512;
/// The oldest fraction of blob files whose live manifests a compaction
/// moves into new files, so that the old files (and the bytes of the
/// manifests deleted from them) can go. RocksDB's default, a quarter,
/// moved each manifest again every time the store grew by a third: in the
/// scale bench its blob files took 3.7 GB of writes for 1.9 GB of
/// manifests, as much in all as without blob files. Manifests are mostly
/// deleted oldest first (retention policies, untagged cleanup), which is
/// what the oldest files hold. The fraction counts files, rounded down: a
/// store of fewer than twenty blob files collects none yet.
const BLOB_GC_AGE_CUTOFF: f64 = 0.05;
/// The share of deleted manifests among those old files past which RocksDB
/// compacts them on purpose, so their space comes back without waiting for
/// a compaction that happens to reach them.
const BLOB_GC_FORCE_THRESHOLD: f64 = 0.5;

/// Open (or create) the node's metadata database.
pub fn open_db(path: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // All column families share one write-ahead log, and a log file goes
    // only once every family with data in it has flushed. A family written
    // rarely (repositories, the Raft vote) would otherwise keep gigabytes
    // of log alive until RocksDB's default bound (4x the write buffers of
    // all 15 families), costing disk and a long replay at every restart:
    // past this, RocksDB flushes the families holding the oldest file.
    opts.set_max_total_wal_size(MAX_WAL_BYTES);
    // Applied entries skip the write-ahead log (the Raft log holds them
    // already; see `StateMachine::apply`), so a crash loses what of them
    // was still in memtables, and the state on disk must then be the
    // state as of one applied entry, never one family ahead of another:
    // every flush takes the memtables of all families at one point.
    opts.set_atomic_flush(true);
    opts.set_db_write_buffer_size(WRITE_BUFFER_BYTES);
    opts.set_bytes_per_sync(BYTES_PER_SYNC);
    // Compactions and flushes run at the lowest CPU priority: what they
    // write is durable already (in tables, or in the Raft log and the
    // write-ahead log), so they can wait while requests need the cores.
    // Under load a compaction would otherwise take a whole core for
    // seconds, and a flush one for half a second on every node at once
    // (nodes apply the same entries into memtables of the same sizes), and
    // every request in flight would wait behind them. Starved for long, a
    // flush still gets the cores: once a family's memtables are all full
    // ([`MEMTABLES_PER_FAMILY`]) writes wait for it, and the request path
    // with them. docs/ARCHITECTURE.md (Storage) has the measurements.
    // `Env::new` is RocksDB's default environment, whose thread pools the
    // whole process shares, so this applies once whichever database opens.
    let mut env = rocksdb::Env::new()?;
    env.lower_thread_pool_cpu_priority();
    env.lower_high_priority_thread_pool_cpu_priority();
    opts.set_env(&env);
    let cfs = FAMILIES.into_iter().map(|n| ColumnFamilyDescriptor::new(n, table_options(n)));
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
}

/// Every column family of the metadata database.
const FAMILIES: [&str; 15] = [
    CF_LOGS,
    CF_RAFT,
    CF_SM,
    CF_MANIFESTS,
    CF_TAGS,
    CF_LINKS,
    CF_BLOBS,
    CF_REFERRERS,
    CF_REPOS,
    CF_REQUESTS,
    CF_REQUEST_AGE,
    CF_BLOB_REFS,
    CF_BLOB_REPOS,
    CF_STAMPS,
    CF_EVENTS,
];

/// Write every family's memtables to tables, all as of one point, and
/// wait: afterwards the state on disk is at least as new as what was
/// applied before the call, whatever a crash loses.
pub(crate) fn flush_all(db: &DB) -> Result<(), rocksdb::Error> {
    let families: Vec<_> = FAMILIES.iter().filter_map(|name| db.cf_handle(name)).collect();
    let mut opts = rocksdb::FlushOptions::default();
    opts.set_wait(true);
    db.flush_cfs_opt(&families, &opts)
}

/// How many bytes of tables each column family holds now, for `/metrics`
/// (what the Raft log takes beside the state).
fn family_bytes(db: &DB) -> Vec<(&'static str, u64)> {
    let read = |cf| db.property_int_value_cf(cf, "rocksdb.total-sst-files-size").ok().flatten().unwrap_or(0);
    FAMILIES.iter().filter_map(|name| Some((*name, read(db.cf_handle(name)?)))).collect()
}

/// How every column family's tables are written, and the SST files a
/// snapshot install ingests: LZ4-compressed, in [`BLOCK_BYTES`] blocks, read
/// through one block cache the whole process shares ([`BLOCK_CACHE_BYTES`]),
/// with a Bloom filter in `family`'s tables if its reads are of absent keys
/// ([`FILTER_BITS_PER_KEY`]).
/// RocksDB's default compression is Snappy, which this build does not link,
/// so without this nothing is compressed (manifests and log entries are JSON
/// and compress well). Tables already written stay readable as they are.
/// Also each family's memtables and level-0 batching
/// ([`MEMTABLES_PER_FAMILY`], [`L0_FILES_PER_COMPACTION`]) and the manifest
/// family's blob files ([`MIN_BLOB_BYTES`]), which only the open database
/// uses: `SstFileWriter` writes values inline whatever the options say.
pub(crate) fn table_options(family: &str) -> Options {
    static CACHE: std::sync::OnceLock<rocksdb::Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_block_size(BLOCK_BYTES);
    if family == CF_REQUESTS {
        table.set_bloom_filter(FILTER_BITS_PER_KEY, false);
    }
    let mut o = Options::default();
    o.set_max_write_buffer_number(MEMTABLES_PER_FAMILY);
    o.set_level_zero_file_num_compaction_trigger(L0_FILES_PER_COMPACTION);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_block_based_table_factory(&table);
    if family == CF_MANIFESTS {
        o.set_enable_blob_files(true);
        o.set_min_blob_size(MIN_BLOB_BYTES);
        o.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_enable_blob_gc(true);
        o.set_blob_gc_age_cutoff(BLOB_GC_AGE_CUTOFF);
        o.set_blob_gc_force_threshold(BLOB_GC_FORCE_THRESHOLD);
    }
    o
}

/// Open the node's metadata database at `path` in the current format,
/// converting a data dir written by an earlier release first (see
/// [`upgrade`]; `snap_dir` is the state machine's snapshot directory).
pub fn open_current(path: &Path, snap_dir: &Path) -> anyhow::Result<Arc<DB>> {
    let db = open_db(path)?;
    upgrade::ensure_current(&db, path, snap_dir)?;
    Ok(db)
}

/// Why the applied state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Db(#[from] rocksdb::Error),
    /// A snapshot install replaced the state during the read; the caller
    /// answers "try again" (the install ends within seconds).
    #[error(transparent)]
    Installing(#[from] Installing),
    /// A stored value that does not decode: never taken for "absent".
    #[error("stored value: {0}")]
    Corrupt(#[from] crate::codec::CodecError),
}

type ReadResult<T> = Result<T, ReadError>;

/// Read-only queries over the locally applied state. Cheap to clone. Callers
/// decide how fresh the state must be (see `cluster::Node::read_barrier`);
/// every query is fenced against a snapshot install (see [`InstallFence`]),
/// so what it returns comes from one state.
#[derive(Clone)]
pub struct MetaReader {
    db: Arc<DB>,
    fence: Arc<InstallFence>,
    lost: Arc<LostCopies>,
}

/// One page of a sorted listing, and whether more follow.
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

/// Garbage collection's rule for one link, the same for the mark and for
/// apply's second look: linked into `repo` no later than `cutoff_ms`, and
/// no manifest there references the blob `d`.
fn link_collectable(db: &DB, repo: &Name, d: &str, cutoff_ms: u64) -> Result<bool, rocksdb::Error> {
    let cf = |n| db.cf_handle(n).expect("column family exists");
    let Some(v) = db.get_pinned_cf(cf(CF_LINKS), keys::repo_item(repo, d))? else { return Ok(false) };
    if keys::parse_link(&v).is_none_or(|(_, at)| at > cutoff_ms) {
        return Ok(false);
    }
    Ok(!referenced(db, repo, d)?)
}

/// Whether a manifest of `repo` references `d` (a blob, or an index's
/// child manifest).
fn referenced(db: &DB, repo: &Name, d: &str) -> Result<bool, rocksdb::Error> {
    let rp = keys::blob_refs_prefix(repo, d);
    let refs = db.cf_handle(CF_BLOB_REFS).expect("column family exists");
    match db.prefix_iterator_cf(refs, &rp).next() {
        Some(r) => Ok(r?.0.starts_with(&rp)),
        None => Ok(false),
    }
}

/// A blob that garbage collection would unlink from some repositories,
/// and free if no other repository links it.
#[derive(Debug, Clone)]
pub struct GcCandidate {
    pub digest: Digest,
    pub size: u64,
    /// Copies recorded in the index.
    pub copies: usize,
    /// Repositories whose link to it no manifest references and that were
    /// linked before the cutoff.
    pub unlink: Vec<Name>,
    /// No other repository links it: with these links, the blob goes.
    pub freed: bool,
}

/// One page of [`MetaReader::gc_page`].
#[derive(Debug, Default)]
pub struct GcPage {
    pub candidates: Vec<GcCandidate>,
    /// Blobs looked at.
    pub scanned: usize,
    /// Where the next page starts (exclusive); None when this one is last.
    pub next: Option<Digest>,
}

/// Links of one blob looked at per GC pass: a base layer linked into more
/// repositories than this loses its unused links over several passes, and
/// a candidate stays small enough for one Raft entry.
const GC_LINKS_PER_BLOB: usize = 2048;

impl MetaReader {
    /// A reader of `db`; `fence` is the state machine's (see
    /// [`StateMachine::reader`]).
    pub(crate) fn new(db: Arc<DB>, fence: Arc<InstallFence>, lost: Arc<LostCopies>) -> MetaReader {
        MetaReader { db, fence, lost }
    }

    /// Bytes of tables per column family (`/metrics`).
    pub fn family_bytes(&self) -> Vec<(&'static str, u64)> {
        family_bytes(&self.db)
    }

    /// Blobs that may have fewer copies than they should, as this node's
    /// state machine and replicator learned (see [`LostCopies`]).
    pub fn lost_copies(&self) -> &LostCopies {
        &self.lost
    }

    /// Run `read` inside the install fence.
    fn fenced<T>(&self, read: impl FnOnce() -> Result<T, rocksdb::Error>) -> ReadResult<T> {
        let entered = self.fence.enter()?;
        let value = read()?;
        self.fence.check(entered)?;
        Ok(value)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family exists")
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error> {
        self.db.get_cf(self.cf(cf), key)
    }

    pub fn manifest(&self, repo: &Name, digest: &Digest) -> ReadResult<Option<ManifestRecord>> {
        let v = self.fenced(|| self.get(CF_MANIFESTS, &keys::repo_item(repo, &digest.to_string())))?;
        Ok(v.map(|v| crate::codec::decode(&v)).transpose()?)
    }

    pub fn tag(&self, repo: &Name, tag: &Tag) -> ReadResult<Option<Digest>> {
        self.fenced(|| {
            Ok(self
                .get(CF_TAGS, &keys::repo_item(repo, tag.as_str()))?
                .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
        })
    }

    /// Size of `digest` if it is linked into `repo`.
    pub fn blob_link(&self, repo: &Name, digest: &Digest) -> ReadResult<Option<u64>> {
        self.fenced(|| {
            Ok(self
                .get(CF_LINKS, &keys::repo_item(repo, &digest.to_string()))?
                .and_then(|v| keys::parse_link(&v).map(|(size, _)| size)))
        })
    }

    pub fn blob(&self, digest: &Digest) -> ReadResult<Option<BlobInfo>> {
        let v = self.fenced(|| self.get(CF_BLOBS, digest.to_string().as_bytes()))?;
        Ok(v.map(|v| crate::codec::decode(&v)).transpose()?)
    }

    pub fn repo_exists(&self, repo: &Name) -> ReadResult<bool> {
        self.fenced(|| Ok(self.db.get_pinned_cf(self.cf(CF_REPOS), repo.as_str())?.is_some()))
    }

    /// Keys under `prefix` in `cf`, with the prefix stripped, sorted, after
    /// `last` (exclusive), at most `n` (None: all).
    fn list(&self, cf: &str, prefix: &[u8], last: Option<&str>, n: Option<usize>) -> Result<Page, rocksdb::Error> {
        let mut start = prefix.to_vec();
        if let Some(l) = last {
            start.extend_from_slice(l.as_bytes());
            start.push(0);
        }
        let mut items = Vec::new();
        let mut more = false;
        let iter = self.db.iterator_cf(self.cf(cf), IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if n.is_some_and(|n| items.len() >= n) {
                more = true;
                break;
            }
            items.push(name);
        }
        Ok(Page { items, more })
    }

    pub fn tags(&self, repo: &Name, last: Option<&str>, n: Option<usize>) -> ReadResult<Page> {
        self.fenced(|| self.list(CF_TAGS, &keys::repo_prefix(repo), last, n))
    }

    /// Every blob in the index, in digest order (for repair and scrub).
    pub fn all_blobs(&self) -> ReadResult<Vec<(Digest, BlobInfo)>> {
        self.fenced(|| {
            let mut out = Vec::new();
            for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
                let (k, v) = item?;
                let Some(d) = std::str::from_utf8(&k).ok().and_then(|s| s.parse().ok()) else { continue };
                if let Ok(info) = crate::codec::decode(&v) {
                    out.push((d, info));
                }
            }
            Ok(out)
        })
    }

    /// Up to `n` blobs of the index after `after` (exclusive), in digest
    /// order: how repair and scrub walk the index without holding it.
    pub fn blobs_after(&self, after: Option<&Digest>, n: usize) -> ReadResult<Vec<(Digest, BlobInfo)>> {
        let mut start = after.map(|d| d.to_string().into_bytes()).unwrap_or_default();
        if after.is_some() {
            start.push(0);
        }
        self.fenced(|| {
            let mut out = Vec::new();
            let iter = self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::From(&start, rocksdb::Direction::Forward));
            for item in iter {
                let (k, v) = item?;
                if out.len() >= n {
                    break;
                }
                let Some(d) = std::str::from_utf8(&k).ok().and_then(|s| s.parse().ok()) else { continue };
                if let Ok(info) = crate::codec::decode(&v) {
                    out.push((d, info));
                }
            }
            Ok(out)
        })
    }

    /// Garbage collection's mark, a page at a time: blobs of the index after
    /// `after` (exclusive), up to `n` of them, each with the repositories
    /// whose link no manifest there references and that is no younger than
    /// `cutoff_ms`. Only blobs with something to collect are returned.
    pub fn gc_page(&self, after: Option<&Digest>, n: usize, cutoff_ms: u64) -> ReadResult<GcPage> {
        self.fenced(|| {
            let mut page = GcPage::default();
            let start = after.map(|d| d.to_string()).unwrap_or_default();
            let iter = self
                .db
                .iterator_cf(self.cf(CF_BLOBS), IteratorMode::From(start.as_bytes(), rocksdb::Direction::Forward));
            for item in iter {
                let (k, v) = item?;
                if after.is_some() && *k == *start.as_bytes() {
                    continue;
                }
                let Some(digest) = std::str::from_utf8(&k).ok().and_then(|s| s.parse::<Digest>().ok()) else {
                    continue;
                };
                if page.scanned >= n {
                    break;
                }
                page.scanned += 1;
                page.next = Some(digest.clone());
                let Ok(info) = crate::codec::decode::<BlobInfo>(&v) else { continue };
                let d = digest.to_string();
                let (mut unlink, mut kept) = (Vec::new(), false);
                let prefix = keys::blob_repos_prefix(&d);
                for (i, item) in self.db.prefix_iterator_cf(self.cf(CF_BLOB_REPOS), &prefix).enumerate() {
                    let (rk, _) = item?;
                    if !rk.starts_with(&prefix) {
                        break;
                    }
                    if i >= GC_LINKS_PER_BLOB {
                        kept = true;
                        break;
                    }
                    let Some(repo) = std::str::from_utf8(&rk[prefix.len()..]).ok().and_then(|r| r.parse::<Name>().ok())
                    else {
                        continue;
                    };
                    if link_collectable(&self.db, &repo, &d, cutoff_ms)? {
                        unlink.push(repo);
                    } else {
                        kept = true;
                    }
                }
                if !unlink.is_empty() || !kept {
                    page.candidates.push(GcCandidate {
                        digest,
                        size: info.size,
                        copies: info.holders.len(),
                        unlink,
                        freed: !kept,
                    });
                }
            }
            if page.scanned < n {
                page.next = None;
            }
            Ok(page)
        })
    }

    pub fn catalog(&self, last: Option<&str>, n: Option<usize>) -> ReadResult<Page> {
        self.fenced(|| self.list(CF_REPOS, b"", last, n))
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`, in
    /// digest order after `last` (exclusive), only those of `artifact_type`
    /// when given, at most `n`; `more` says whether any matching one follows.
    pub fn referrers(
        &self,
        repo: &Name,
        subject: &Digest,
        last: Option<&str>,
        n: usize,
        artifact_type: Option<&str>,
    ) -> ReadResult<(Vec<Descriptor>, bool)> {
        let mut prefix = keys::repo_item(repo, &subject.to_string());
        prefix.push(0);
        let mut start = prefix.clone();
        if let Some(l) = last {
            start.extend_from_slice(l.as_bytes());
            start.push(0);
        }
        self.fenced(|| {
            let mut out = Vec::new();
            let iter =
                self.db.iterator_cf(self.cf(CF_REFERRERS), IteratorMode::From(&start, rocksdb::Direction::Forward));
            for item in iter {
                let (k, v) = item?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let Ok(d) = serde_json::from_slice::<Descriptor>(&v) else { continue };
                if artifact_type.is_some_and(|t| d.artifact_type.as_deref() != Some(t)) {
                    continue;
                }
                if out.len() >= n {
                    return Ok((out, true));
                }
                out.push(d);
            }
            Ok((out, false))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "family" [`recorded_options`] files the database-wide settings under.
    const DB_OPTIONS: &str = "[DBOptions]";

    /// The settings of every column family (and the database's own, under
    /// [`DB_OPTIONS`]) as RocksDB recorded them in the newest OPTIONS file of
    /// the database at `dir`: (family, key, value).
    fn recorded_options(dir: &Path) -> Vec<(String, String, String)> {
        let newest = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("OPTIONS-"))
            .max_by_key(|n| n["OPTIONS-".len()..].parse::<u64>().unwrap_or(0))
            .expect("an OPTIONS file");
        let text = std::fs::read_to_string(dir.join(newest)).unwrap();
        let mut family = None;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("[CFOptions \"").and_then(|l| l.strip_suffix("\"]")) {
                family = Some(name.to_string());
            } else if line == DB_OPTIONS {
                family = Some(DB_OPTIONS.to_string());
            } else if line.starts_with('[') {
                family = None;
            } else if let (Some(f), Some((k, v))) = (&family, line.split_once('=')) {
                out.push((f.clone(), k.to_string(), v.to_string()));
            }
        }
        out
    }

    /// Every family may queue memtables for a flush without stopping writes,
    /// and gathers level-0 tables before compacting them down (see
    /// [`MEMTABLES_PER_FAMILY`] and [`L0_FILES_PER_COMPACTION`]).
    #[test]
    fn every_family_queues_memtables_and_batches_level_zero() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_db(dir.path()).unwrap());
        let options = recorded_options(dir.path());
        for family in FAMILIES {
            let value = |key: &str| {
                options.iter().find(|(f, k, _)| f == family && k == key).map(|(_, _, v)| v.clone()).unwrap_or_default()
            };
            assert_eq!(value("max_write_buffer_number"), MEMTABLES_PER_FAMILY.to_string(), "{family}");
            assert_eq!(value("level0_file_num_compaction_trigger"), L0_FILES_PER_COMPACTION.to_string(), "{family}");
            assert_eq!(value("compression"), "kLZ4Compression", "{family}");
        }
    }

    /// Tables are written out as they are built, not all at their final
    /// sync, which on a shared file system stalled the Raft log's syncs
    /// behind them (see [`BYTES_PER_SYNC`]).
    #[test]
    fn tables_are_written_out_as_they_are_built() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_db(dir.path()).unwrap());
        let options = recorded_options(dir.path());
        let value =
            options.iter().find(|(f, k, _)| f == DB_OPTIONS && k == "bytes_per_sync").map(|(_, _, v)| v.as_str());
        assert_eq!(value, Some(BYTES_PER_SYNC.to_string().as_str()));
    }

    /// Flush and compaction threads run at nice 19, behind requests (see
    /// `open_db`). A thread takes its pool's priority when it next runs
    /// a job, so this runs one of each first.
    #[test]
    fn flushes_and_compactions_run_at_the_lowest_cpu_priority() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let tags = db.cf_handle(CF_TAGS).unwrap();
        for round in 0..2u8 {
            db.put_cf(tags, [round], b"sha256:0").unwrap();
            flush_all(&db).unwrap();
        }
        db.compact_range_cf(tags, None::<&[u8]>, None::<&[u8]>);
        // (thread name, nice) of this process's threads: nice is the 19th
        // field of `stat`, the 17th after the name's closing parenthesis.
        let threads: Vec<(String, i64)> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                let (open, close) = (stat.find('(')?, stat.rfind(')')?);
                let nice = stat.get(close + 2..)?.split_whitespace().nth(16)?.parse().ok()?;
                Some((stat[open + 1..close].to_string(), nice))
            })
            .collect();
        for pool in ["rocksdb:high", "rocksdb:low"] {
            let found: Vec<_> = threads.iter().filter(|(name, _)| name.starts_with(pool)).collect();
            assert!(found.iter().any(|(_, nice)| *nice == 19), "no {pool} thread at nice 19: {found:?}");
        }
    }

    /// A flush RocksDB starts on its own (here, one family's memtable
    /// full) takes every family's memtable with it, so the state on disk
    /// is always as of one point: applied entries skip the write-ahead
    /// log, and a crash leaves only what was flushed.
    #[test]
    fn a_full_memtable_flushes_every_family_at_one_point() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let (tags, manifests) = (db.cf_handle(CF_TAGS).unwrap(), db.cf_handle(CF_MANIFESTS).unwrap());
        db.put_cf(tags, b"r\0t", b"sha256:0").unwrap();
        db.set_options_cf(manifests, &[("write_buffer_size", "65536")]).unwrap();
        for i in 0..200u64 {
            db.put_cf(manifests, i.to_be_bytes(), manifest_like(i)).unwrap();
        }
        let tables = |family: &str| db.live_files().unwrap().iter().filter(|f| f.column_family_name == family).count();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while tables(CF_MANIFESTS) == 0 {
            assert!(std::time::Instant::now() < deadline, "the full memtable was never flushed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(tables(CF_TAGS) > 0, "the manifests were flushed without the tag written before them");
    }

    /// An incompressible value of a typical manifest's size, the same for
    /// the same `i`.
    fn manifest_like(i: u64) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let mut v = i.to_be_bytes().to_vec();
        while v.len() < 2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// The numbers of the blob files in the database at `dir`, oldest first.
    pub(super) fn blob_files(dir: &Path) -> Vec<u64> {
        let mut out: Vec<u64> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".blob")?.parse().ok())
            .collect();
        out.sort();
        out
    }

    /// Manifests live in blob files, apart from their keys: the manifest
    /// family's tables hold keys and references, so a compaction of them
    /// rewrites a fraction of the bytes, and every manifest still reads
    /// back whole (see [`MIN_BLOB_BYTES`]).
    #[test]
    fn manifests_are_kept_apart_from_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let manifests = db.cf_handle(CF_MANIFESTS).unwrap();
        // Four overlapping level-0 tables, as digests land.
        let count = 4000u64;
        let mut written = 0u64;
        for table in 0..4u64 {
            for k in (table..count).step_by(4) {
                let v = manifest_like(k);
                written += v.len() as u64;
                db.put_cf(manifests, k.to_be_bytes(), &v).unwrap();
            }
            db.flush_cf(manifests).unwrap();
        }
        db.compact_range_cf(manifests, None::<&[u8]>, None::<&[u8]>);
        let property = |name| db.property_int_value_cf(manifests, name).unwrap().unwrap();
        let tables = property("rocksdb.total-sst-files-size");
        let blobs = property("rocksdb.live-blob-file-size");
        assert!(tables * 10 < written, "{tables} bytes of tables for {written} bytes of manifests");
        assert!(blobs >= written, "{blobs} bytes of blob files for {written} bytes of manifests");
        for k in [0, 1, count / 2, count - 1] {
            assert_eq!(db.get_cf(manifests, k.to_be_bytes()).unwrap(), Some(manifest_like(k)), "manifest {k}");
        }
    }

    /// The space of manifests deleted from the oldest blob files comes
    /// back: a compaction moves the manifests still live out of those files
    /// and removes them (see [`BLOB_GC_AGE_CUTOFF`]). Without it a blob
    /// file lives as long as one manifest in it does.
    #[test]
    fn deleted_manifests_give_their_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let manifests = db.cf_handle(CF_MANIFESTS).unwrap();
        // Forty flushes, each its own blob file; enough files that the
        // oldest twentieth holds two of them. Only the compaction below
        // runs, so the files are as written when it starts.
        db.set_options_cf(manifests, &[("disable_auto_compactions", "true")]).unwrap();
        let (files, per_file) = (40u64, 50u64);
        for file in 0..files {
            for i in 0..per_file {
                db.put_cf(manifests, (i * files + file).to_be_bytes(), manifest_like(i * files + file)).unwrap();
            }
            db.flush_cf(manifests).unwrap();
        }
        let before = blob_files(dir.path());
        assert_eq!(before.len() as u64, files);
        // Half the manifests of the four oldest files are deleted.
        for file in 0..4 {
            for i in (0..per_file).step_by(2) {
                db.delete_cf(manifests, (i * files + file).to_be_bytes()).unwrap();
            }
        }
        db.flush_cf(manifests).unwrap();
        db.compact_range_cf(manifests, None::<&[u8]>, None::<&[u8]>);
        let after = blob_files(dir.path());
        assert!(!after.contains(&before[0]), "the oldest blob file is still there: {after:?}");
        for k in [files, files + 1, files * per_file - 1] {
            assert_eq!(db.get_cf(manifests, k.to_be_bytes()).unwrap(), Some(manifest_like(k)), "manifest {k}");
        }
        assert_eq!(db.get_cf(manifests, 0u64.to_be_bytes()).unwrap(), None);
    }

    /// A point read of a key that no table holds reads no data block: each
    /// table's filter answers (see [`FILTER_BITS_PER_KEY`]). Request ids,
    /// looked up once for every applied proposal, are such keys.
    #[test]
    fn a_read_of_an_absent_key_is_answered_by_the_tables_filters() {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let requests = db.cf_handle(CF_REQUESTS).unwrap();
        // Four level-0 tables, each spanning the absent key.
        for table in 0..4u64 {
            for k in 0..1000u64 {
                db.put_cf(requests, (k * 8 + table * 2).to_be_bytes(), b"x").unwrap();
            }
            db.flush_cf(requests).unwrap();
        }
        let absent = 4001u64.to_be_bytes();
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut perf = PerfContext::default();
        perf.reset();
        assert!(db.get_pinned_cf(requests, absent).unwrap().is_none());
        let blocks = perf.metric(PerfMetric::BlockReadCount) + perf.metric(PerfMetric::BlockCacheHitCount);
        let filtered = perf.metric(PerfMetric::BloomSstMissCount);
        set_perf_stats(PerfStatsLevel::Disable);
        assert_eq!(blocks, 0, "data blocks read for an absent key");
        assert_eq!(filtered, 4, "tables skipped by their filter");
    }

    /// RocksDB was built with its SSE4.2/PCLMUL CRC32C (`.cargo/config.toml`
    /// turns those target features on; without them librocksdb-sys compiles
    /// the software checksum). RocksDB says which at every open in its LOG.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn rocksdb_checksums_in_hardware() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_db(dir.path()).unwrap());
        let log = std::fs::read_to_string(dir.path().join("LOG")).unwrap();
        let line = log.lines().find(|l| l.contains("Fast CRC32 supported:")).expect("RocksDB logs its CRC32C support");
        assert!(line.ends_with("Fast CRC32 supported: Supported on x86"), "{line}");
    }
}
