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

/// One Raft log entry: the commands proposed together. Batching many client
/// writes into one entry makes them share one log append and one fsync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

/// The outcome of each command of a [`Batch`], in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Outcomes(pub Vec<Outcome>);
