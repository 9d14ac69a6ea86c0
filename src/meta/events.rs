//! Events and push times, as apply records them and as webhooks and
//! retention read them. Events are written in the same write batch as the
//! command that caused them, keyed by their place in the log, so every
//! node holds the same events under the same ids and a restart or a new
//! leader finds exactly what was committed.

use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};

use super::command::{Context, EventKey, RequestInfo};
use super::{keys, MetaReader, ReadResult, CF_EVENTS, CF_STAMPS, CF_TAGS};
use crate::oci::{Digest, Name};
use crate::NodeId;

/// What happened, in Distribution's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventAction {
    Push,
    Pull,
    Mount,
    Delete,
}

impl EventAction {
    pub fn as_str(self) -> &'static str {
        match self {
            EventAction::Push => "push",
            EventAction::Pull => "pull",
            EventAction::Mount => "mount",
            EventAction::Delete => "delete",
        }
    }
}

/// One event as stored: JSON, so a later release reads it whatever fields
/// it adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub action: EventAction,
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// When the write was proposed (ms since the epoch; 0 if unknown).
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestInfo>,
    /// The node that took the request (0 if unknown).
    #[serde(default)]
    pub source: NodeId,
}

impl StoredEvent {
    /// An event about `repo` with what `ctx` knows of the write.
    pub fn new(action: EventAction, repo: &Name, ctx: Option<&Context>) -> StoredEvent {
        StoredEvent {
            action,
            repository: repo.to_string(),
            digest: None,
            media_type: None,
            size: None,
            tag: None,
            at_ms: ctx.map_or(0, |c| c.at_ms),
            actor: ctx.and_then(|c| c.actor.clone()),
            request: ctx.map(|c| c.request.clone()),
            source: ctx.map_or(0, |c| c.source),
        }
    }

    pub fn digest(mut self, d: &Digest) -> Self {
        self.digest = Some(d.to_string());
        self
    }

    pub fn target(mut self, media_type: &str, size: u64) -> Self {
        self.media_type = Some(media_type.to_owned());
        self.size = Some(size);
        self
    }

    pub fn tag(mut self, t: &str) -> Self {
        self.tag = Some(t.to_owned());
        self
    }
}

/// The key of an endpoint's delivery cursor.
pub(super) fn cursor_key(endpoint: &str) -> Vec<u8> {
    let mut k = b"c".to_vec();
    k.extend_from_slice(endpoint.as_bytes());
    k
}

/// A push time's value.
pub(super) fn stamp_value(at_ms: u64) -> [u8; 8] {
    at_ms.to_be_bytes()
}

/// A tag with its digest and when it was last pushed (None: before times
/// were kept).
#[derive(Debug, Clone)]
pub struct TagStamp {
    pub tag: String,
    pub digest: Digest,
    pub at_ms: Option<u64>,
}

impl MetaReader {
    /// Up to `n` events from `from` (inclusive), oldest first.
    pub fn events_from(&self, from: EventKey, n: usize) -> ReadResult<Vec<(EventKey, StoredEvent)>> {
        self.fenced(|| {
            let start = from.to_bytes();
            let mut out = Vec::new();
            for item in self.db.iterator_cf(self.cf(CF_EVENTS), IteratorMode::From(&start, Direction::Forward)) {
                let (k, v) = item?;
                let Some(key) = EventKey::from_bytes(&k) else { break };
                if out.len() >= n {
                    break;
                }
                match serde_json::from_slice(&v) {
                    Ok(e) => out.push((key, e)),
                    Err(e) => tracing::warn!(event = %key.id(), error = %e, "skipping an unreadable event"),
                }
            }
            Ok(out)
        })
    }

    /// The oldest and the newest event kept, if any.
    pub fn event_bounds(&self) -> ReadResult<Option<(EventKey, EventKey)>> {
        self.fenced(|| {
            let cf = self.cf(CF_EVENTS);
            let first = self.db.iterator_cf(cf, IteratorMode::From(b"e", Direction::Forward)).next().transpose()?;
            let Some(first) = first.and_then(|(k, _)| EventKey::from_bytes(&k)) else { return Ok(None) };
            let last = self.db.iterator_cf(cf, IteratorMode::From(b"f", Direction::Reverse)).next().transpose()?;
            let last = last.and_then(|(k, _)| EventKey::from_bytes(&k)).unwrap_or(first);
            Ok(Some((first, last)))
        })
    }

    /// How many events there are from `from` on, counting up to `max`.
    pub fn count_events_from(&self, from: EventKey, max: usize) -> ReadResult<usize> {
        self.count_between(from, EventKey { index: u64::MAX, pos: u32::MAX, sub: u32::MAX }, max)
    }

    /// How many events lie in `[from, to)`, counting up to `max`.
    pub fn count_between(&self, from: EventKey, to: EventKey, max: usize) -> ReadResult<usize> {
        self.fenced(|| {
            let start = from.to_bytes();
            let mut n = 0;
            for item in self.db.iterator_cf(self.cf(CF_EVENTS), IteratorMode::From(&start, Direction::Forward)) {
                let (k, _) = item?;
                match EventKey::from_bytes(&k) {
                    Some(key) if key < to && n < max => n += 1,
                    _ => break,
                }
            }
            Ok(n)
        })
    }

    /// The key of the `n`-th newest event (1: the newest), if there are
    /// that many: what a queue bounded to `n` events keeps from.
    pub fn nth_newest_event(&self, n: usize) -> ReadResult<Option<EventKey>> {
        self.fenced(|| {
            let mut seen = 0;
            for item in self.db.iterator_cf(self.cf(CF_EVENTS), IteratorMode::From(b"f", Direction::Reverse)) {
                let (k, _) = item?;
                let Some(key) = EventKey::from_bytes(&k) else { break };
                seen += 1;
                if seen == n {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        })
    }

    /// Every endpoint's cursor: where its next delivery starts.
    pub fn event_cursors(&self) -> ReadResult<Vec<(String, EventKey)>> {
        self.fenced(|| {
            let mut out = Vec::new();
            for item in self.db.prefix_iterator_cf(self.cf(CF_EVENTS), b"c") {
                let (k, v) = item?;
                if !k.starts_with(b"c") {
                    break;
                }
                let (Ok(name), Some(key)) = (String::from_utf8(k[1..].to_vec()), EventKey::from_bytes(&v)) else {
                    continue;
                };
                out.push((name, key));
            }
            Ok(out)
        })
    }

    /// The tags of `repo` with their digests and push times, in tag order
    /// after `after`, at most `n`.
    pub fn tag_stamps(&self, repo: &Name, after: Option<&str>, n: usize) -> ReadResult<Vec<TagStamp>> {
        let prefix = keys::repo_prefix(repo);
        let mut start = prefix.clone();
        if let Some(a) = after {
            start.extend_from_slice(a.as_bytes());
            start.push(0);
        }
        self.fenced(|| {
            let mut out = Vec::new();
            for item in self.db.iterator_cf(self.cf(CF_TAGS), IteratorMode::From(&start, Direction::Forward)) {
                let (k, v) = item?;
                if !k.starts_with(&prefix) || out.len() >= n {
                    break;
                }
                let tag = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let Some(digest) = std::str::from_utf8(&v).ok().and_then(|v| v.parse().ok()) else { continue };
                let at_ms =
                    self.get(CF_STAMPS, &k)?.and_then(|v| Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?)));
                out.push(TagStamp { tag, digest, at_ms });
            }
            Ok(out)
        })
    }

    /// When `digest` was last pushed into `repo` (None: unknown).
    pub fn manifest_stamp(&self, repo: &Name, digest: &Digest) -> ReadResult<Option<u64>> {
        self.fenced(|| {
            Ok(self
                .get(CF_STAMPS, &keys::repo_item(repo, &digest.to_string()))?
                .and_then(|v| Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))))
        })
    }

    /// The manifests of `repo` in digest order after `after`, at most `n`.
    pub fn manifests(&self, repo: &Name, after: Option<&Digest>, n: usize) -> ReadResult<Vec<Digest>> {
        let after = after.map(|d| d.to_string());
        self.fenced(|| {
            let page = self.list(super::CF_MANIFESTS, &keys::repo_prefix(repo), after.as_deref(), Some(n))?;
            Ok(page.items.iter().filter_map(|d| d.parse().ok()).collect())
        })
    }

    /// Whether some manifest of `repo` references `digest` (an index's
    /// child, or a blob).
    pub fn referenced(&self, repo: &Name, digest: &Digest) -> ReadResult<bool> {
        self.fenced(|| super::referenced(&self.db, repo, &digest.to_string()))
    }
}
