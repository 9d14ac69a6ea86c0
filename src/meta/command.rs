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
    /// Forget copies that are gone (corrupt, or their node left). Applied,
    /// it queues the blob for the leader's repair ([`super::LostCopies`]);
    /// with no holders it does only that: "this blob is short of copies".
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
    /// A client's (or a policy's) write with what the proposer knew of it:
    /// when, who, which request, and the immutability rules of the
    /// repository. Apply enforces the rules against the state as of this
    /// entry (so two racing pushes cannot both move an immutable tag) and
    /// records the events webhooks deliver, with this context.
    With {
        ctx: Box<Context>,
        cmd: Box<Command>,
    },
    /// Retention's removal in one repository: each tag only if it still
    /// points at the digest the policy saw, each manifest only if no tag
    /// points at it, no manifest of the repository references it (an
    /// index's child) and its subject, if any, is gone.
    /// Each comes with the push time the policy saw: one pushed again
    /// since is kept.
    Retire {
        repo: Name,
        tags: Vec<(Tag, Digest, u64)>,
        manifests: Vec<(Digest, u64)>,
    },
    /// Webhook delivery's progress: `endpoint` received every event before
    /// `next`. Proposed by the delivering node after the receiver answered.
    Delivered {
        endpoint: String,
        next: EventKey,
    },
    /// Drop the events before `below` (every endpoint has them, or the
    /// queue's bound was reached) and the cursors of endpoints `forget`
    /// that no longer exist.
    TrimEvents {
        below: EventKey,
        forget: Vec<String>,
    },
}

/// Where an event sits in the log: the entry, the command's place in it,
/// and the event's place among the command's. The same on every node, so
/// it names the event across leader changes and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct EventKey {
    pub index: u64,
    pub pos: u32,
    pub sub: u32,
}

impl EventKey {
    /// The key in the events column family (sorts as the log does).
    pub fn to_bytes(self) -> [u8; 17] {
        let mut k = [0u8; 17];
        k[0] = b'e';
        k[1..9].copy_from_slice(&self.index.to_be_bytes());
        k[9..13].copy_from_slice(&self.pos.to_be_bytes());
        k[13..].copy_from_slice(&self.sub.to_be_bytes());
        k
    }

    pub fn from_bytes(k: &[u8]) -> Option<EventKey> {
        if k.len() != 17 || k[0] != b'e' {
            return None;
        }
        Some(EventKey {
            index: u64::from_be_bytes(k[1..9].try_into().ok()?),
            pos: u32::from_be_bytes(k[9..13].try_into().ok()?),
            sub: u32::from_be_bytes(k[13..].try_into().ok()?),
        })
    }

    /// The event id receivers de-duplicate by.
    pub fn id(self) -> String {
        format!("{:016x}-{:x}-{:x}", self.index, self.pos, self.sub)
    }

    /// The key right after this one.
    pub fn next(self) -> EventKey {
        EventKey { sub: self.sub + 1, ..self }
    }
}

/// What the proposer of a client write knew about it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Context {
    /// The proposer's clock, ms since the epoch: push times for retention.
    pub at_ms: u64,
    /// The authenticated user, if any.
    pub actor: Option<String>,
    pub request: RequestInfo,
    /// The node that took the request.
    pub source: NodeId,
    /// The immutability rules matching the repository, as the proposer's
    /// config has them.
    pub immutable: Vec<ImmutableTags>,
}

/// The request a write came from, as webhook events describe it. Each
/// string is cut to [`RequestInfo::MAX`] bytes.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub id: String,
    pub addr: String,
    pub host: String,
    pub method: String,
    pub useragent: String,
}

impl RequestInfo {
    pub const MAX: usize = 256;

    /// `s` cut to at most [`RequestInfo::MAX`] bytes on a char boundary.
    pub fn bounded(s: &str) -> String {
        let mut end = s.len().min(Self::MAX);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    }
}

/// Tags of a repository that, once they exist, never move or go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImmutableTags {
    /// The rule's name, for the DENIED message.
    pub rule: String,
    /// A tag pattern: `*` any characters, `?` one.
    pub tags: String,
}

impl ImmutableTags {
    pub fn covers(&self, tag: &str) -> bool {
        glob_match(self.tags.as_bytes(), tag.as_bytes())
    }
}

/// Whether `text` matches `pattern` (`*` any run, `?` one byte): the
/// classic two-pointer match, linear in practice, no regex to compile.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
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
            Command::With { ctx, cmd } => {
                SMALL
                    + 5 * RequestInfo::MAX
                    + ctx.immutable.iter().map(|r| r.rule.len() + r.tags.len()).sum::<usize>()
                    + cmd.approx_bytes()
            }
            Command::Retire { tags, manifests, .. } => SMALL + tags.len() * 216 + manifests.len() * 80,
            Command::TrimEvents { forget, .. } => SMALL + forget.iter().map(String::len).sum::<usize>(),
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
    /// A policy forbids it (an immutable tag): the message names the rule.
    Denied(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_patterns_match_whole_tags() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("v*", "v1.2") && m("v*", "v") && !m("v*", "latest"));
        assert!(m("release-?.*", "release-1.0") && !m("release-?.*", "release-10.0"));
        assert!(m("*", "") && m("**", "x") && m("a*b*c", "axxbyyc") && !m("a*b*c", "axxbyy"));
        assert!(m("latest", "latest") && !m("latest", "latest2") && !m("latest", "latess"));
    }

    #[test]
    fn event_keys_sort_as_the_log_and_round_trip() {
        let a = EventKey { index: 1, pos: 2, sub: 3 };
        let b = EventKey { index: 2, pos: 0, sub: 0 };
        assert!(a.to_bytes() < b.to_bytes() && a < b && a < a.next());
        assert_eq!(EventKey::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(EventKey::from_bytes(b"c-cursor-name"), None);
        assert_eq!(a.id(), "0000000000000001-2-3");
    }
}
