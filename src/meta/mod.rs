//! The replicated metadata: the Raft log entry ([`Command`]), the RocksDB
//! state machine that applies it, the Raft log store, and read-only queries
//! over the applied state. Knows nothing of HTTP or gRPC.

mod command;
mod fence;
mod identity;
mod log;
mod state;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, DB};
use serde::{Deserialize, Serialize};

pub use command::{Batch, Command, Outcome, Outcomes, Proposal, Rejection, RequestId, RequestIds};
pub use fence::{InstallFence, Installing};
pub use identity::{IdentityError, IdentityStore, StoredIdentity};
pub use log::{CommitIndex, LogStore};
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

    pub fn referrer(repo: &Name, subject: &Digest, digest: &Digest) -> Vec<u8> {
        let mut k = repo_item(repo, &subject.to_string());
        k.push(0);
        k.extend_from_slice(digest.to_string().as_bytes());
        k
    }
}

/// Open (or create) the node's metadata database.
pub fn open_db(path: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = [
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
    ]
    .into_iter()
    .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
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
}

/// One page of a sorted listing, and whether more follow.
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

impl MetaReader {
    /// A reader of `db`; `fence` is the state machine's (see
    /// [`StateMachine::reader`]).
    pub(crate) fn new(db: Arc<DB>, fence: Arc<InstallFence>) -> MetaReader {
        MetaReader { db, fence }
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
        self.fenced(|| {
            Ok(self
                .get(CF_MANIFESTS, &keys::repo_item(repo, &digest.to_string()))?
                .and_then(|v| bincode::deserialize(&v).ok()))
        })
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
                .and_then(|v| Some(u64::from_be_bytes(v.as_slice().try_into().ok()?))))
        })
    }

    pub fn blob(&self, digest: &Digest) -> ReadResult<Option<BlobInfo>> {
        self.fenced(|| {
            Ok(self.get(CF_BLOBS, digest.to_string().as_bytes())?.and_then(|v| bincode::deserialize(&v).ok()))
        })
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
                if let Ok(info) = bincode::deserialize(&v) {
                    out.push((d, info));
                }
            }
            Ok(out)
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
