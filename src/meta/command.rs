//! The Raft log entry and its result. Commands are validated by the proposer
//! and re-checked deterministically by `apply`, which never fails on a
//! well-formed command: a broken precondition is an applied no-op whose
//! [`Outcome`] the proposer turns into an API error.

use serde::{Deserialize, Serialize};

use crate::oci::{Digest, Name, Tag};
use crate::NodeId;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Store a manifest in `repo` and point `tags` at it. The referenced blobs
    /// and child manifests must already be in the repository.
    PutManifest {
        repo: Name,
        digest: Digest,
        media_type: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        tags: Vec<Tag>,
    },
    /// Remove a manifest, every tag pointing at it, and its referrer entry.
    DeleteManifest {
        repo: Name,
        digest: Digest,
    },
    DeleteTag {
        repo: Name,
        tag: Tag,
    },
    /// Make a blob visible in `repo`, and record `holders` as having it
    /// fsynced. A cross-repository mount links with no new holders.
    LinkBlob {
        repo: Name,
        digest: Digest,
        size: u64,
        holders: Vec<NodeId>,
    },
    /// Record more nodes holding a fsynced, verified copy (replication, repair).
    AddHolders {
        digest: Digest,
        size: u64,
        holders: Vec<NodeId>,
    },
    /// Forget copies that are gone (corrupt, or their node left).
    RemoveHolders {
        digest: Digest,
        holders: Vec<NodeId>,
    },
    UnlinkBlob {
        repo: Name,
        digest: Digest,
    },
    /// [`Command::LinkBlob`] stamped with the proposer's clock (ms since
    /// the Unix epoch): garbage collection never takes a link younger than
    /// its grace period, so a blob pushed for a manifest not yet written
    /// stays. Empty `holders` (a cross-repository mount) links only a blob
    /// the index still has: a mount of a collected blob is refused.
    LinkBlobAt {
        repo: Name,
        digest: Digest,
        size: u64,
        holders: Vec<NodeId>,
        at_ms: u64,
    },
    /// Garbage collection's sweep of a batch of blobs: for each, the
    /// repositories whose link to it the collector found unreferenced and
    /// older than `cutoff_ms`. Apply checks each again against the state
    /// as of this entry (the fence: a manifest ordered before it keeps its
    /// blobs, one ordered after it finds them gone), removes the links that
    /// still qualify, and drops the blob from the index once no repository
    /// links it. Holders then delete their files (see `blob::gc`).
    Collect {
        cutoff_ms: u64,
        blobs: Vec<(Digest, Vec<Name>)>,
    },
}

impl Command {
    /// About how many bytes the command takes in a log entry: what bounds
    /// batches and AppendEntries. Exact for the manifest bytes, which are
    /// all that can be large; a generous allowance for the rest.
    pub fn approx_bytes(&self) -> usize {
        const SMALL: usize = 512;
        match self {
            Command::PutManifest { bytes, tags, .. } => SMALL + bytes.len() + tags.len() * 136,
            Command::Collect { blobs, .. } => SMALL + blobs.iter().map(|(_, r)| 80 + r.len() * 260).sum::<usize>(),
            _ => SMALL,
        }
    }
}

/// Why an applied command changed nothing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Rejection {
    /// A referenced blob or child manifest is not in the repository.
    MissingReference(Digest),
    ManifestInvalid(String),
    ManifestUnknown,
    BlobUnknown,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome(pub Result<(), Rejection>);

/// Names one write across its retries. A forwarded write whose answer was
/// lost (the leader died or was deposed mid-call) may still be committed, so
/// the proposer sends it again under the same id and the state machine,
/// which remembers recent ids with their outcomes, applies it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The node that first proposed it.
    pub origin: NodeId,
    /// Random per process start, so ids never repeat across restarts.
    pub boot: u64,
    pub seq: u64,
}

impl RequestId {
    /// The key under which the state machine remembers it.
    pub fn key(&self) -> [u8; 24] {
        let mut k = [0u8; 24];
        k[..8].copy_from_slice(&self.origin.to_be_bytes());
        k[8..16].copy_from_slice(&self.boot.to_be_bytes());
        k[16..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }
}

/// Hands out this process's request ids.
#[derive(Debug)]
pub struct RequestIds {
    origin: NodeId,
    boot: u64,
    next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    pub fn new(origin: NodeId) -> RequestIds {
        RequestIds { origin, boot: rand::random(), next: std::sync::atomic::AtomicU64::new(0) }
    }

    pub fn next(&self) -> RequestId {
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RequestId { origin: self.origin, boot: self.boot, seq }
    }
}

/// A command and the id that makes its retries harmless.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    pub id: RequestId,
    pub cmd: Command,
}

/// One Raft log entry: the commands proposed together. Batching many client
/// writes into one entry makes them share one log append and one fsync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch(pub Vec<Proposal>);

impl Batch {
    /// See [`Command::approx_bytes`].
    pub fn approx_bytes(&self) -> usize {
        self.0.iter().map(|p| p.cmd.approx_bytes()).sum()
    }
}

/// The outcome of each command of a [`Batch`], in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Outcomes(pub Vec<Outcome>);
