//! The replicated state machine on RocksDB column families. Each log entry is
//! applied in one write batch together with the applied log id, so apply is
//! atomic and replaying an entry after a crash is a no-op.
//!
//! Snapshots are checkpoints of the database (see `snapshot`). One received
//! from the leader is installed in bounded memory: its records become one
//! SST file per column family, and each column family is emptied and given
//! its file by ingestion. RocksDB cannot ingest into several column families
//! atomically, so the install is made atomic around it: a durable marker
//! names the received file before anything is replaced and is removed with
//! the final write of the applied id, a restart finds the marker and
//! installs again from the kept file, and the [`InstallFence`] keeps
//! readers and snapshot builds away from the state meanwhile.

use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::{IngestExternalFileOptions, IteratorMode, WriteBatch, DB};

use super::command::{Batch, Command, Context, EventKey, Outcome, Outcomes, Proposal, Rejection, RequestId};
use super::events::{cursor_key, stamp_value, EventAction, StoredEvent};
use super::fence::InstallFence;
use super::snapshot::{
    pending_install, write_ssts, SnapshotData, SnapshotStore, KEY_APPLIED, KEY_INSTALLING, KEY_MEMBERSHIP, STATE_CFS,
};
use super::{
    keys, BlobInfo, ManifestRecord, CF_BLOBS, CF_BLOB_REFS, CF_BLOB_REPOS, CF_EVENTS, CF_LINKS, CF_MANIFESTS,
    CF_REFERRERS, CF_REPOS, CF_REQUESTS, CF_REQUEST_AGE, CF_SM, CF_STAMPS, CF_TAGS,
};
use crate::oci::{Descriptor, Digest, Manifest, Name};
use crate::{NodeId, NodeInfo, TypeConfig};

type SResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, NodeInfo>;

/// Present once the derived column families ([`DERIVED_CFS`]) match the
/// state: written by [`rebuild_derived`].
const KEY_DERIVED: &[u8] = b"derived-v2";

/// Column families computed from the state (indexes for garbage
/// collection): never sent in snapshots, rebuilt after an install and on
/// the first start over a data dir written before they existed.
const DERIVED_CFS: [&str; 2] = [CF_BLOB_REFS, CF_BLOB_REPOS];

/// The media type blob events carry (Distribution's, for layers it does
/// not know the type of).
const BLOB_MEDIA_TYPE: &str = "application/octet-stream";

/// How many log entries a request id is remembered for. A retry reaches the
/// log within the proposer's deadline (10 s), a small fraction of this even
/// at thousands of entries a second.
const KEEP_REQUESTS: u64 = 100_000;
/// Expired ids removed per applied entry at most: more than an entry can
/// add, so the table stays bounded, and the work per entry stays small.
const PRUNE_PER_ENTRY: usize = 1024;

/// Longest snapshot id accepted from a peer (ours are three numbers).
const MAX_SNAPSHOT_ID: usize = 128;

pub struct StateMachine {
    db: Arc<DB>,
    snapshots: Arc<SnapshotStore>,
    receiving: Option<PathBuf>,
    fence: Arc<InstallFence>,
    lost: Arc<super::LostCopies>,
    /// Every request id applied below this log index is forgotten: where
    /// the next expiry starts reading. Deleted keys stay in the tables as
    /// tombstones until compaction drops them, so a read from the start of
    /// the age table would step over every id forgotten since, thousands
    /// per entry, more the longer the node runs. Local to this node and
    /// only a hint (0 after a start or an install): which ids expire
    /// depends on the state alone.
    requests_pruned_below: u64,
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column family exists")
}

/// A snapshot id of ours: term, index, and when it was taken.
fn snapshot_id(applied: Option<LogId<NodeId>>) -> String {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros();
    match applied {
        Some(l) => format!("{}-{}-{stamp}", l.leader_id.term, l.index),
        None => format!("0-0-{stamp}"),
    }
}

/// Install the received snapshot at `path` (marked by
/// [`SnapshotStore::begin_install`]) with `meta`, make it the newest
/// snapshot point and remove the file. The caller holds the install fence.
fn install_file(
    db: &DB,
    store: &SnapshotStore,
    path: &std::path::Path,
    meta: &SnapshotMeta<NodeId, NodeInfo>,
) -> std::io::Result<()> {
    let file = std::fs::File::open(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("the snapshot being installed ({}) is gone: {e}", path.display()))
    })?;
    load_snapshot(db, store, file, meta)?;
    store.mark(meta.clone());
    std::fs::remove_file(path)
}

impl StateMachine {
    /// Open the state machine over `db`, first finishing a snapshot install
    /// that a crash or power loss cut short (before anything can read the
    /// half-replaced state).
    pub fn new(db: Arc<DB>, snap_dir: PathBuf) -> std::io::Result<StateMachine> {
        let snapshots = Arc::new(SnapshotStore::open(snap_dir, &db)?);
        let sm = StateMachine {
            db,
            snapshots,
            receiving: None,
            fence: Arc::default(),
            lost: Arc::default(),
            requests_pruned_below: 0,
        };
        if let Some((meta, path)) = pending_install(&sm.db, &sm.snapshots)? {
            tracing::warn!(snapshot = %meta.snapshot_id, "finishing a snapshot install cut short by a restart");
            install_file(&sm.db, &sm.snapshots, &path, &meta)?;
        }
        if get_sm::<u8>(&sm.db, KEY_DERIVED).map_err(|e| std::io::Error::other(e.to_string()))?.is_none() {
            tracing::info!("building the garbage collection indexes from the stored manifests and links");
            rebuild_derived(&sm.db)?;
            let mut opts = rocksdb::WriteOptions::default();
            opts.set_sync(true);
            let marker = crate::codec::encode(&1u8);
            sm.db.put_cf_opt(cf(&sm.db, CF_SM), KEY_DERIVED, marker, &opts).map_err(std::io::Error::other)?;
        }
        Ok(sm)
    }

    /// A reader of the applied state, fenced against this machine's installs.
    pub fn reader(&self) -> super::MetaReader {
        super::MetaReader::new(self.db.clone(), self.fence.clone(), self.lost.clone())
    }

    /// Apply one command's effects into `batch`, reading current state from
    /// the database. Deterministic: depends only on the state and the command.
    fn apply_command(
        &self,
        batch: &mut WriteBatch,
        cmd: Command,
        ctx: Option<&Context>,
        events: &mut Vec<StoredEvent>,
    ) -> SResult<Outcome> {
        let db = &self.db;
        let event = |action, repo: &Name| StoredEvent::new(action, repo, ctx);
        let stamp = |batch: &mut WriteBatch, repo: &Name, item: &str| {
            if let Some(c) = ctx.filter(|c| c.at_ms > 0) {
                batch.put_cf(cf(db, CF_STAMPS), keys::repo_item(repo, item), stamp_value(c.at_ms));
            }
        };
        let exists = |cf_name: &str, k: &[u8]| -> SResult<bool> {
            Ok(db.get_pinned_cf(cf(db, cf_name), k).map_err(io_err)?.is_some())
        };
        let result = match cmd {
            Command::PutManifest { repo, digest, media_type, bytes, tags } => {
                let m = match Manifest::parse(Some(&media_type), &bytes) {
                    Ok(m) => m,
                    Err(e) => return Ok(Outcome(Err(Rejection::ManifestInvalid(e.message)))),
                };
                for b in &m.blobs {
                    if !exists(CF_LINKS, &keys::repo_item(&repo, &b.to_string()))? {
                        return Ok(Outcome(Err(Rejection::MissingReference(b.clone()))));
                    }
                }
                for c in &m.children {
                    if !exists(CF_MANIFESTS, &keys::repo_item(&repo, &c.to_string()))? {
                        return Ok(Outcome(Err(Rejection::MissingReference(c.clone()))));
                    }
                }
                let record = ManifestRecord { media_type: media_type.clone(), bytes };
                let size = record.bytes.len() as u64;
                batch.put_cf(
                    cf(db, CF_MANIFESTS),
                    keys::repo_item(&repo, &digest.to_string()),
                    crate::codec::encode(&record),
                );
                let md = digest.to_string();
                stamp(batch, &repo, &md);
                for t in &tags {
                    batch.put_cf(cf(db, CF_TAGS), keys::repo_item(&repo, t.as_str()), &md);
                    stamp(batch, &repo, t.as_str());
                    events.push(
                        event(EventAction::Push, &repo).digest(&digest).target(&media_type, size).tag(t.as_str()),
                    );
                }
                if tags.is_empty() {
                    events.push(event(EventAction::Push, &repo).digest(&digest).target(&media_type, size));
                }
                for b in m.blobs.iter().chain(&m.children) {
                    batch.put_cf(cf(db, CF_BLOB_REFS), keys::blob_ref(&repo, &b.to_string(), &md), b"");
                }
                if let Some(subject) = &m.subject {
                    let desc = Descriptor {
                        media_type,
                        digest: digest.clone(),
                        size,
                        artifact_type: m.artifact_type.clone(),
                        annotations: m.annotations.clone(),
                        urls: None,
                    };
                    batch.put_cf(
                        cf(db, CF_REFERRERS),
                        keys::referrer(&repo, subject, &digest),
                        serde_json::to_vec(&desc).map_err(io_err)?,
                    );
                }
                batch.put_cf(cf(db, CF_REPOS), repo.as_str(), b"");
                Ok(())
            }
            Command::DeleteManifest { repo, digest } => {
                let k = keys::repo_item(&repo, &digest.to_string());
                match db.get_cf(cf(db, CF_MANIFESTS), &k).map_err(io_err)? {
                    None => Err(Rejection::ManifestUnknown),
                    Some(v) => {
                        let rec: ManifestRecord = crate::codec::decode(&v).map_err(io_err)?;
                        for tk in self.tags_at(&repo, &digest.to_string())? {
                            batch.delete_cf(cf(db, CF_TAGS), &tk);
                            batch.delete_cf(cf(db, CF_STAMPS), &tk);
                        }
                        let parsed = Manifest::parse(Some(&rec.media_type), &rec.bytes).ok();
                        self.remove_manifest(batch, &repo, &digest, parsed.as_ref());
                        events.push(
                            event(EventAction::Delete, &repo)
                                .digest(&digest)
                                .target(&rec.media_type, rec.bytes.len() as u64),
                        );
                        Ok(())
                    }
                }
            }
            Command::DeleteTag { repo, tag } => {
                let k = keys::repo_item(&repo, tag.as_str());
                match db.get_cf(cf(db, CF_TAGS), &k).map_err(io_err)? {
                    Some(v) => {
                        batch.delete_cf(cf(db, CF_TAGS), &k);
                        batch.delete_cf(cf(db, CF_STAMPS), &k);
                        let mut e = event(EventAction::Delete, &repo).tag(tag.as_str());
                        e.digest = String::from_utf8(v).ok();
                        events.push(e);
                        Ok(())
                    }
                    None => Err(Rejection::ManifestUnknown),
                }
            }
            Command::LinkBlob { repo, digest, size, holders } => self.link(batch, &repo, &digest, size, &holders, 0)?,
            Command::LinkBlobAt { repo, digest, size, holders, at_ms } => {
                let linked = self.link(batch, &repo, &digest, size, &holders, at_ms)?;
                if linked.is_ok() {
                    let action = if holders.is_empty() { EventAction::Mount } else { EventAction::Push };
                    events.push(event(action, &repo).digest(&digest).target(BLOB_MEDIA_TYPE, size));
                }
                linked
            }
            Command::AddHolders { digest, size, holders } => {
                // A copy that lands after its blob was collected records
                // nothing: the blob stays collected (and the file is swept).
                let d = digest.to_string();
                if exists(CF_BLOBS, d.as_bytes())? {
                    self.add_holders(batch, &d, size, &holders)?;
                }
                Ok(())
            }
            Command::Collect { cutoff_ms, blobs } => {
                self.collect(batch, cutoff_ms, blobs)?;
                Ok(())
            }
            Command::RemoveHolders { digest, holders } => {
                let d = digest.to_string();
                if let Some(v) = db.get_cf(cf(db, CF_BLOBS), &d).map_err(io_err)? {
                    let mut info: BlobInfo = crate::codec::decode(&v).map_err(io_err)?;
                    info.holders.retain(|h| !holders.contains(h));
                    batch.put_cf(cf(db, CF_BLOBS), &d, crate::codec::encode(&info));
                    // Fewer copies: the leader's repair restores them.
                    self.lost.push(digest);
                }
                Ok(())
            }
            Command::UnlinkBlob { repo, digest } => {
                let d = digest.to_string();
                let k = keys::repo_item(&repo, &d);
                if exists(CF_LINKS, &k)? {
                    batch.delete_cf(cf(db, CF_LINKS), k);
                    batch.delete_cf(cf(db, CF_BLOB_REPOS), keys::blob_repo(&d, &repo));
                    events.push(event(EventAction::Delete, &repo).digest(&digest));
                    Ok(())
                } else {
                    Err(Rejection::BlobUnknown)
                }
            }
            Command::With { ctx, cmd } => {
                if let Some(why) = self.immutable_violation(&ctx, &cmd)? {
                    return Ok(Outcome(Err(Rejection::Denied(why))));
                }
                return self.apply_command(batch, *cmd, Some(&ctx), events);
            }
            Command::Retire { repo, tags, manifests } => {
                self.retire(batch, &repo, tags, manifests, ctx, events)?;
                Ok(())
            }
            Command::Delivered { endpoint, next } => {
                // Cursors only move forward: a deposed leader's late report
                // must not send its successor back over delivered events.
                let key = cursor_key(&endpoint);
                let current = db.get_cf(cf(db, CF_EVENTS), &key).map_err(io_err)?;
                if current.and_then(|v| EventKey::from_bytes(&v)).is_none_or(|c| next > c) {
                    batch.put_cf(cf(db, CF_EVENTS), key, next.to_bytes());
                }
                Ok(())
            }
            Command::TrimEvents { below, forget } => {
                batch.delete_range_cf(cf(db, CF_EVENTS), &b"e"[..], &below.to_bytes()[..]);
                for name in forget {
                    batch.delete_cf(cf(db, CF_EVENTS), cursor_key(&name));
                }
                Ok(())
            }
        };
        Ok(Outcome(result))
    }

    /// Remove manifest `digest` of `repo` (its tags are the caller's): the
    /// record, its push time, its references and its referrer entry.
    fn remove_manifest(&self, batch: &mut WriteBatch, repo: &Name, digest: &Digest, parsed: Option<&Manifest>) {
        let db = &self.db;
        let d = digest.to_string();
        let k = keys::repo_item(repo, &d);
        batch.delete_cf(cf(db, CF_MANIFESTS), &k);
        batch.delete_cf(cf(db, CF_STAMPS), &k);
        if let Some(m) = parsed {
            for b in m.blobs.iter().chain(&m.children) {
                batch.delete_cf(cf(db, CF_BLOB_REFS), keys::blob_ref(repo, &b.to_string(), &d));
            }
            if let Some(subject) = &m.subject {
                batch.delete_cf(cf(db, CF_REFERRERS), keys::referrer(repo, subject, digest));
            }
        }
    }

    /// The keys (`repo \0 tag`) of the tags of `repo` pointing at `digest`.
    fn tags_at(&self, repo: &Name, digest: &str) -> SResult<Vec<Vec<u8>>> {
        let db = &self.db;
        let prefix = keys::repo_prefix(repo);
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(cf(db, CF_TAGS), &prefix) {
            let (tk, tv) = item.map_err(io_err)?;
            if !tk.starts_with(&prefix) {
                break;
            }
            if *tv == *digest.as_bytes() {
                out.push(tk.to_vec());
            }
        }
        Ok(out)
    }

    /// Why `cmd` may not apply under the immutability rules in `ctx`: a
    /// tag they cover that exists would move or go. Checked against the
    /// state as of this entry, so of two racing pushes of a new immutable
    /// tag, the one ordered second is refused.
    fn immutable_violation(&self, ctx: &Context, cmd: &Command) -> SResult<Option<String>> {
        if ctx.immutable.is_empty() {
            return Ok(None);
        }
        let db = &self.db;
        let rule_for = |tag: &str| ctx.immutable.iter().find(|r| r.covers(tag));
        let denied = |tag: &str, rule: &str, what: &str| {
            Some(format!("tag {tag} is immutable (rule {rule:?}): it cannot be {what}"))
        };
        match cmd {
            Command::PutManifest { repo, digest, tags, .. } => {
                for t in tags {
                    let Some(rule) = rule_for(t.as_str()) else { continue };
                    let current = db.get_cf(cf(db, CF_TAGS), keys::repo_item(repo, t.as_str())).map_err(io_err)?;
                    if current.is_some_and(|v| *v != *digest.to_string().as_bytes()) {
                        return Ok(denied(t.as_str(), &rule.rule, "moved to another manifest"));
                    }
                }
            }
            Command::DeleteTag { repo, tag } => {
                if let Some(rule) = rule_for(tag.as_str()) {
                    if db.get_pinned_cf(cf(db, CF_TAGS), keys::repo_item(repo, tag.as_str())).map_err(io_err)?.is_some()
                    {
                        return Ok(denied(tag.as_str(), &rule.rule, "deleted"));
                    }
                }
            }
            Command::DeleteManifest { repo, digest } => {
                let prefix = keys::repo_prefix(repo);
                for tk in self.tags_at(repo, &digest.to_string())? {
                    let tag = String::from_utf8_lossy(&tk[prefix.len()..]).into_owned();
                    if let Some(rule) = rule_for(&tag) {
                        return Ok(denied(&tag, &rule.rule, "deleted (it points at this manifest)"));
                    }
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// Apply a [`Command::Retire`]: each removal checked again here.
    fn retire(
        &self,
        batch: &mut WriteBatch,
        repo: &Name,
        tags: Vec<(crate::oci::Tag, Digest, u64)>,
        manifests: Vec<(Digest, u64)>,
        ctx: Option<&Context>,
        events: &mut Vec<StoredEvent>,
    ) -> SResult<()> {
        let db = &self.db;
        let frozen = |tag: &str| ctx.is_some_and(|c| c.immutable.iter().any(|r| r.covers(tag)));
        let mut removed_tags = std::collections::HashSet::new();
        let stamped = |k: &[u8], at: u64| -> SResult<bool> {
            Ok(db.get_pinned_cf(cf(db, CF_STAMPS), k).map_err(io_err)?.is_some_and(|v| *v == stamp_value(at)))
        };
        for (tag, digest, at) in tags {
            let k = keys::repo_item(repo, tag.as_str());
            let current = db.get_cf(cf(db, CF_TAGS), &k).map_err(io_err)?;
            if frozen(tag.as_str()) || current.is_none_or(|v| *v != *digest.to_string().as_bytes()) || !stamped(&k, at)?
            {
                continue;
            }
            batch.delete_cf(cf(db, CF_TAGS), &k);
            batch.delete_cf(cf(db, CF_STAMPS), &k);
            events.push(StoredEvent::new(EventAction::Delete, repo, ctx).digest(&digest).tag(tag.as_str()));
            removed_tags.insert(k);
        }
        for (digest, at) in manifests {
            let d = digest.to_string();
            let k = keys::repo_item(repo, &d);
            let Some(v) = db.get_cf(cf(db, CF_MANIFESTS), &k).map_err(io_err)? else { continue };
            if !stamped(&k, at)? {
                continue;
            }
            if self.tags_at(repo, &d)?.iter().any(|t| !removed_tags.contains(t))
                || super::referenced(db, repo, &d).map_err(io_err)?
            {
                continue;
            }
            let rec: ManifestRecord = crate::codec::decode(&v).map_err(io_err)?;
            let parsed = Manifest::parse(Some(&rec.media_type), &rec.bytes).ok();
            let subject = parsed.as_ref().and_then(|m| m.subject.clone());
            if let Some(s) = &subject {
                if db
                    .get_pinned_cf(cf(db, CF_MANIFESTS), keys::repo_item(repo, &s.to_string()))
                    .map_err(io_err)?
                    .is_some()
                {
                    continue;
                }
            }
            self.remove_manifest(batch, repo, &digest, parsed.as_ref());
            events.push(
                StoredEvent::new(EventAction::Delete, repo, ctx)
                    .digest(&digest)
                    .target(&rec.media_type, rec.bytes.len() as u64),
            );
        }
        Ok(())
    }

    /// Link `digest` into `repo` at `at_ms`, recording `holders`. With no
    /// holders (a mount) the blob must still be in the index.
    fn link(
        &self,
        batch: &mut WriteBatch,
        repo: &Name,
        digest: &Digest,
        size: u64,
        holders: &[NodeId],
        at_ms: u64,
    ) -> SResult<Result<(), Rejection>> {
        let db = &self.db;
        let d = digest.to_string();
        if holders.is_empty() && db.get_pinned_cf(cf(db, CF_BLOBS), &d).map_err(io_err)?.is_none() {
            return Ok(Err(Rejection::BlobUnknown));
        }
        batch.put_cf(cf(db, CF_LINKS), keys::repo_item(repo, &d), keys::link_value(size, at_ms));
        batch.put_cf(cf(db, CF_BLOB_REPOS), keys::blob_repo(&d, repo), b"");
        self.add_holders(batch, &d, size, holders)?;
        batch.put_cf(cf(db, CF_REPOS), repo.as_str(), b"");
        Ok(Ok(()))
    }

    /// Apply a [`Command::Collect`]: every check made again here, against
    /// the state as of this entry.
    fn collect(&self, batch: &mut WriteBatch, cutoff_ms: u64, blobs: Vec<(Digest, Vec<Name>)>) -> SResult<()> {
        let db = &self.db;
        let mut unlinked: std::collections::HashSet<(String, Name)> = Default::default();
        for (digest, repos) in blobs {
            let d = digest.to_string();
            for repo in repos {
                if unlinked.contains(&(d.clone(), repo.clone())) {
                    continue;
                }
                if !super::link_collectable(db, &repo, &d, cutoff_ms).map_err(io_err)? {
                    continue;
                }
                let k = keys::repo_item(&repo, &d);
                batch.delete_cf(cf(db, CF_LINKS), k);
                batch.delete_cf(cf(db, CF_BLOB_REPOS), keys::blob_repo(&d, &repo));
                unlinked.insert((d.clone(), repo));
            }
            let prefix = keys::blob_repos_prefix(&d);
            let mut linked = false;
            for item in db.prefix_iterator_cf(cf(db, CF_BLOB_REPOS), &prefix) {
                let (k, _) = item.map_err(io_err)?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let still = std::str::from_utf8(&k[prefix.len()..])
                    .ok()
                    .and_then(|r| r.parse::<Name>().ok())
                    .is_none_or(|r| !unlinked.contains(&(d.clone(), r)));
                if still {
                    linked = true;
                    break;
                }
            }
            if !linked {
                batch.delete_cf(cf(db, CF_BLOBS), &d);
            }
        }
        Ok(())
    }

    /// Merge `holders` into the blob index entry of `d`.
    fn add_holders(&self, batch: &mut WriteBatch, d: &str, size: u64, holders: &[NodeId]) -> SResult<()> {
        let db = &self.db;
        let mut info: BlobInfo = match db.get_cf(cf(db, CF_BLOBS), d).map_err(io_err)? {
            Some(v) => crate::codec::decode(&v).map_err(io_err)?,
            None => BlobInfo { size, holders: Vec::new() },
        };
        for h in holders {
            if !info.holders.contains(h) {
                info.holders.push(*h);
            }
        }
        info.holders.sort_unstable();
        batch.put_cf(cf(db, CF_BLOBS), d, crate::codec::encode(&info));
        Ok(())
    }

    /// The outcome recorded for `id` if it was applied recently.
    fn applied_before(&self, id: &RequestId) -> SResult<Option<Outcome>> {
        let Some(v) = self.db.get_pinned_cf(cf(&self.db, CF_REQUESTS), id.key()).map_err(io_err)? else {
            return Ok(None);
        };
        let (_, outcome): (u64, Outcome) = crate::codec::decode(&v).map_err(io_err)?;
        Ok(Some(outcome))
    }

    /// Apply `p` unless its id was applied already; either way, its outcome.
    fn apply_once(&self, batch: &mut WriteBatch, p: Proposal, index: u64, pos: u32) -> SResult<Outcome> {
        if let Some(outcome) = self.applied_before(&p.id)? {
            return Ok(outcome);
        }
        let mut events = Vec::new();
        let outcome = self.apply_command(batch, p.cmd, None, &mut events)?;
        if outcome.0.is_ok() {
            for (sub, e) in events.iter().enumerate() {
                let key = EventKey { index, pos, sub: sub as u32 };
                batch.put_cf(cf(&self.db, CF_EVENTS), key.to_bytes(), serde_json::to_vec(e).map_err(io_err)?);
            }
        }
        let key = p.id.key();
        batch.put_cf(cf(&self.db, CF_REQUESTS), key, crate::codec::encode(&(index, &outcome)));
        let mut age = index.to_be_bytes().to_vec();
        age.extend_from_slice(&key);
        batch.put_cf(cf(&self.db, CF_REQUEST_AGE), age, b"");
        Ok(outcome)
    }

    /// Forget ids applied more than [`KEEP_REQUESTS`] entries before `index`.
    /// Depends only on the applied state, so every replica forgets the same.
    /// The caller writes `batch` before the next call.
    fn expire_requests(&mut self, batch: &mut WriteBatch, index: u64) -> SResult<()> {
        let Some(cutoff) = index.checked_sub(KEEP_REQUESTS) else { return Ok(()) };
        let age_cf = cf(&self.db, CF_REQUEST_AGE);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_lower_bound(self.requests_pruned_below.to_be_bytes());
        let mut all_gone = true;
        for (pruned, item) in self.db.iterator_cf_opt(age_cf, opts, IteratorMode::Start).enumerate() {
            let (k, _) = item.map_err(io_err)?;
            let at = u64::from_be_bytes(k[..8].try_into().map_err(io_err)?);
            if at >= cutoff {
                break;
            }
            if pruned == PRUNE_PER_ENTRY {
                all_gone = false;
                break;
            }
            batch.delete_cf(cf(&self.db, CF_REQUESTS), &k[8..]);
            batch.delete_cf(age_cf, &k);
        }
        if all_gone {
            self.requests_pruned_below = cutoff;
        }
        Ok(())
    }
}

/// Replace the whole state with a snapshot file's content, in bounded
/// memory. Not atomic by itself: callers hold the install fence and a
/// durable [`KEY_INSTALLING`] marker, which the final write removes.
fn load_snapshot(
    db: &DB,
    store: &SnapshotStore,
    file: std::fs::File,
    meta: &SnapshotMeta<NodeId, NodeInfo>,
) -> std::io::Result<()> {
    let result = write_ssts(store, file).and_then(|ssts| replace_state(db, &ssts, meta));
    store.remove_scratch_ssts();
    result
}

fn replace_state(db: &DB, ssts: &[Option<PathBuf>], meta: &SnapshotMeta<NodeId, NodeInfo>) -> std::io::Result<()> {
    let db_err = std::io::Error::other;
    let mut clear = WriteBatch::default();
    for name in STATE_CFS {
        clear.delete_range_cf(cf(db, name), &b""[..], &[0xffu8; 300][..]);
    }
    db.write(clear).map_err(db_err)?;
    let mut ingest = IngestExternalFileOptions::default();
    ingest.set_move_files(true);
    for (name, sst) in STATE_CFS.iter().zip(ssts) {
        // Flushing first puts the range deletion below the ingested file.
        db.flush_cf(cf(db, name)).map_err(db_err)?;
        if let Some(path) = sst {
            db.ingest_external_file_cf_opts(cf(db, name), &ingest, vec![path.as_path()]).map_err(db_err)?;
        }
    }
    rebuild_derived(db)?;
    let mut done = WriteBatch::default();
    done.put_cf(cf(db, CF_SM), KEY_DERIVED, crate::codec::encode(&1u8));
    done.put_cf(cf(db, CF_SM), KEY_APPLIED, crate::codec::encode(&meta.last_log_id));
    done.put_cf(cf(db, CF_SM), KEY_MEMBERSHIP, crate::codec::encode(&meta.last_membership));
    done.delete_cf(cf(db, CF_SM), KEY_INSTALLING);
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(done, &opts).map_err(db_err)
}

/// Compute the [`DERIVED_CFS`] from the state, streaming (memory holds one
/// bounded write batch). Deterministic: every replica at the same applied
/// state derives the same keys.
fn rebuild_derived(db: &DB) -> std::io::Result<()> {
    let db_err = std::io::Error::other;
    let mut clear = WriteBatch::default();
    for name in DERIVED_CFS {
        clear.delete_range_cf(cf(db, name), &b""[..], &[0xffu8; 300][..]);
    }
    db.write(clear).map_err(db_err)?;
    let mut batch = WriteBatch::default();
    let flush = |batch: &mut WriteBatch, force: bool| -> std::io::Result<()> {
        if force || batch.len() >= 4096 {
            db.write(std::mem::take(batch)).map_err(db_err)?;
        }
        Ok(())
    };
    // One pass over everything: keep the block cache for serving.
    let scan = || {
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro
    };
    for item in db.iterator_cf_opt(cf(db, CF_MANIFESTS), scan(), IteratorMode::Start) {
        let (k, v) = item.map_err(db_err)?;
        let Some(sep) = k.iter().position(|b| *b == 0) else { continue };
        let (Ok(repo), Ok(manifest)) =
            (std::str::from_utf8(&k[..sep]).map(str::parse::<Name>), std::str::from_utf8(&k[sep + 1..]))
        else {
            continue;
        };
        let Ok(repo) = repo else { continue };
        let Ok(rec) = crate::codec::decode::<ManifestRecord>(&v) else { continue };
        let Ok(m) = Manifest::parse(Some(&rec.media_type), &rec.bytes) else { continue };
        for b in m.blobs.iter().chain(&m.children) {
            batch.put_cf(cf(db, CF_BLOB_REFS), keys::blob_ref(&repo, &b.to_string(), manifest), b"");
        }
        flush(&mut batch, false)?;
    }
    for item in db.iterator_cf_opt(cf(db, CF_LINKS), scan(), IteratorMode::Start) {
        let (k, _) = item.map_err(db_err)?;
        let Some(sep) = k.iter().position(|b| *b == 0) else { continue };
        let (Ok(repo), Ok(blob)) = (std::str::from_utf8(&k[..sep]), std::str::from_utf8(&k[sep + 1..])) else {
            continue;
        };
        let Ok(repo) = repo.parse::<Name>() else { continue };
        batch.put_cf(cf(db, CF_BLOB_REPOS), keys::blob_repo(blob, &repo), b"");
        flush(&mut batch, false)?;
    }
    flush(&mut batch, true)
}

/// A value the state machine keeps about itself (applied id, membership,
/// current snapshot) in its own column family.
fn get_sm<T: serde::de::DeserializeOwned>(db: &DB, k: &[u8]) -> SResult<Option<T>> {
    super::snapshot::get_sm(db, k).map_err(io_err)
}

pub struct SnapshotBuilder {
    db: Arc<DB>,
    snapshots: Arc<SnapshotStore>,
    fence: Arc<InstallFence>,
}

impl SnapshotBuilder {
    /// The applied log id and membership as of now, read together, made
    /// durable. An install running meanwhile is waited for, never read
    /// from.
    async fn point(&self) -> SResult<SnapshotMeta<NodeId, NodeInfo>> {
        loop {
            let entered = self.fence.enter_when_idle().await;
            let (db, fence) = (self.db.clone(), self.fence.clone());
            let read = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                // Both keys as of one sequence number, and no RocksDB
                // snapshot (see `applied_of`).
                let (applied, membership) = super::snapshot::applied_of(&db)?;
                // openraft purges the log behind the point once this
                // returns. Applied entries are written to memtables only
                // (see `apply`), so they are flushed here: a crash must
                // never leave the state behind a purged log.
                super::flush_all(&db).map_err(std::io::Error::other)?;
                Ok(fence.check(entered).is_ok().then_some((applied, membership)))
            })
            .await
            .map_err(io_err)?
            .map_err(io_err)?;
            if let Some((applied, membership)) = read {
                return Ok(SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id: snapshot_id(applied),
                });
            }
        }
    }

    /// Take a checkpoint of the state as of now (entries go on being
    /// applied meanwhile) and serve it, unless one as new already serves.
    /// An install running meanwhile is waited for, never taken from.
    async fn checkpoint(&self) -> SResult<Arc<super::snapshot::Checkpoint>> {
        let started = std::time::Instant::now();
        let taken = loop {
            let entered = self.fence.enter_when_idle().await;
            let (db, store, fence) = (self.db.clone(), self.snapshots.clone(), self.fence.clone());
            let taken = tokio::task::spawn_blocking(move || store.take(&db, || fence.check(entered).is_ok()))
                .await
                .map_err(io_err)?
                .map_err(io_err)?;
            if let Some(taken) = taken {
                break taken;
            }
        };
        let meta = SnapshotMeta {
            last_log_id: taken.applied,
            last_membership: taken.membership.clone(),
            snapshot_id: snapshot_id(taken.applied),
        };
        let store = self.snapshots.clone();
        let serving =
            tokio::task::spawn_blocking(move || store.serve(taken, meta)).await.map_err(io_err)?.map_err(io_err)?;
        tracing::info!(
            index = serving.meta().last_log_id.map_or(0, |l| l.index),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot checkpoint taken"
        );
        Ok(serving)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// A snapshot point: the applied id and membership, made durable, and
    /// nothing else. openraft keeps only a built snapshot's meta (it purges
    /// the log behind it); the data a peer needs is taken when one asks
    /// ([`RaftStateMachine::get_current_snapshot`]). If a newer snapshot was
    /// installed meanwhile, that one's meta is returned.
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        let meta = self.snapshots.mark(self.point().await?);
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::Point) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> SResult<(Option<LogId<NodeId>>, Membership)> {
        let applied = get_sm::<Option<LogId<NodeId>>>(&self.db, KEY_APPLIED)?.flatten();
        let membership = get_sm::<Membership>(&self.db, KEY_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Outcomes>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let db = self.db.clone();
        // The applied state is not written to the write-ahead log: the
        // Raft log already holds every entry (synced before it committed),
        // and writing each manifest a second time there cost as much as
        // the first. A crash loses what was applied since the last flush
        // (all families flush together, so the state on disk is as of one
        // entry, with its applied id); openraft applies the committed log
        // after it again at start, and the log behind a snapshot point is
        // purged only once the state is flushed past it
        // ([`SnapshotBuilder::point`]).
        let mut unlogged = rocksdb::WriteOptions::default();
        unlogged.disable_wal(true);
        for entry in entries {
            let sm = cf(&db, CF_SM);
            let applied = crate::codec::encode(&Some(entry.log_id));
            let mut outcomes = Vec::new();
            match entry.payload {
                EntryPayload::Blank => {
                    let mut batch = WriteBatch::default();
                    batch.put_cf(sm, KEY_APPLIED, &applied);
                    self.db.write_opt(batch, &unlogged).map_err(io_err)?;
                }
                EntryPayload::Normal(Batch(proposals)) => {
                    // Each command commits on its own with its request id
                    // (later ones read what earlier ones wrote); the applied
                    // log id goes with the last, so a crash midway replays
                    // the entry and the ids already recorded are skipped.
                    let index = entry.log_id.index;
                    for (pos, p) in proposals.into_iter().enumerate() {
                        let mut batch = WriteBatch::default();
                        outcomes.push(self.apply_once(&mut batch, p, index, pos as u32)?);
                        self.db.write_opt(batch, &unlogged).map_err(io_err)?;
                    }
                    let mut batch = WriteBatch::default();
                    self.expire_requests(&mut batch, index)?;
                    batch.put_cf(sm, KEY_APPLIED, &applied);
                    self.db.write_opt(batch, &unlogged).map_err(io_err)?;
                }
                EntryPayload::Membership(m) => {
                    let stored = Membership::new(Some(entry.log_id), m);
                    let mut batch = WriteBatch::default();
                    batch.put_cf(sm, KEY_APPLIED, &applied);
                    batch.put_cf(sm, KEY_MEMBERSHIP, crate::codec::encode(&stored));
                    self.db.write_opt(batch, &unlogged).map_err(io_err)?;
                }
            }
            out.push(Outcomes(outcomes));
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), snapshots: self.snapshots.clone(), fence: self.fence.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<SnapshotData>> {
        // openraft starts over when the leader sends a newer snapshot.
        if let Some(abandoned) = self.receiving.take() {
            let _ = std::fs::remove_file(abandoned);
        }
        let path = self.snapshots.receiving();
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .await
            .map_err(io_err)?;
        self.receiving = Some(path);
        Ok(Box::new(SnapshotData::Receiving(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<SnapshotData>,
    ) -> SResult<()> {
        if meta.snapshot_id.len() > MAX_SNAPSHOT_ID {
            return Err(io_err(std::io::Error::other("snapshot id too long")));
        }
        let SnapshotData::Receiving(f) = *snapshot else {
            return Err(io_err(std::io::Error::other("only a received snapshot can be installed")));
        };
        let f = f.into_std().await;
        // A snapshot this release cannot read is refused before it replaces
        // the current one.
        tokio::task::spawn_blocking(move || {
            f.sync_all()?;
            let mut r = std::io::BufReader::new(&f);
            std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(0))?;
            super::snapshot::read_snapshot_header(&mut r)
        })
        .await
        .map_err(io_err)?
        .map_err(io_err)?;
        let received =
            self.receiving.take().ok_or_else(|| io_err(std::io::Error::other("no snapshot was received")))?;
        let (db, store, fence, meta) = (self.db.clone(), self.snapshots.clone(), self.fence.clone(), meta.clone());
        // The installed state forgot ids of its own.
        self.requests_pruned_below = 0;
        tokio::task::spawn_blocking(move || {
            let path = store.begin_install(&db, &received, &meta)?;
            let _installing = fence.install();
            install_file(&db, &store, &path, &meta)
        })
        .await
        .map_err(io_err)?
        .map_err(io_err)
    }

    /// The snapshot a peer behind the log is sent: a checkpoint at or after
    /// the newest snapshot point, taken now if none serves yet. None before
    /// the first point since the start: openraft then builds one if its log
    /// was purged (see `storage::helper`), and sends no snapshot before.
    /// openraft calls this on its state-machine worker, so applies wait
    /// for a checkpoint taken here (a memtable flush and links): once per
    /// point, and only when a peer is behind the purged log.
    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        if self.snapshots.point().is_none() {
            return Ok(None);
        }
        let checkpoint = match self.snapshots.serving() {
            Some(c) => c,
            None => self.get_snapshot_builder().await.checkpoint().await?,
        };
        Ok(Some(Snapshot { meta: checkpoint.meta().clone(), snapshot: Box::new(SnapshotData::Checkpoint(checkpoint)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry};

    use super::super::snapshot::SNAPSHOT_HEADER;
    use super::*;
    use crate::meta::{open_db, MetaReader, RequestId};
    use crate::oci::{Name, Tag};

    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    fn put_tag(seq: u64, tag: &str, annotation: &str) -> Proposal {
        let bytes = format!(
            r#"{{"schemaVersion":2,"mediaType":"{INDEX}","manifests":[],"annotations":{{"v":"{annotation}"}}}}"#
        )
        .into_bytes();
        let mut h = crate::oci::Algorithm::Sha256.hasher();
        h.update(&bytes);
        let digest = h.finish();
        let cmd = Command::PutManifest {
            repo: "r".parse().unwrap(),
            digest,
            media_type: INDEX.into(),
            bytes,
            tags: vec![tag.parse().unwrap()],
        };
        Proposal { id: RequestId { origin: 1, boot: 7, seq }, cmd }
    }

    fn entry(index: u64, proposals: Vec<Proposal>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Batch(proposals)),
        }
    }

    /// The annotation of the manifest `r:t` names, if the tag exists.
    fn tag_of(db: &Arc<DB>) -> Option<String> {
        let r = MetaReader::new(db.clone(), Arc::default(), Arc::default());
        let name: Name = "r".parse().unwrap();
        let tag: Tag = "t".parse().unwrap();
        let d = r.tag(&name, &tag).unwrap()?;
        let m = r.manifest(&name, &d).unwrap().unwrap();
        let v = serde_json::from_slice::<serde_json::Value>(&m.bytes).unwrap();
        Some(v["annotations"]["v"].as_str().unwrap().to_owned())
    }

    fn tag_value(db: &Arc<DB>) -> String {
        tag_of(db).expect("tag exists")
    }

    fn machine(dir: &std::path::Path) -> (Arc<DB>, StateMachine) {
        let db = open_db(&dir.join("db")).unwrap();
        let sm = StateMachine::new(db.clone(), dir.join("snap")).unwrap();
        (db, sm)
    }

    /// What a peer behind the log is sent now: openraft builds a snapshot
    /// (a point), and the peer gets the checkpoint taken when it asks.
    async fn snapshot_now(sm: &mut StateMachine) -> Snapshot<TypeConfig> {
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let served = sm.get_current_snapshot().await.unwrap().expect("a snapshot once a point is built");
        assert!(served.meta.last_log_id >= built.meta.last_log_id);
        served
    }

    /// The record stream a peer would receive for `snap`.
    fn records_of(snap: &Snapshot<TypeConfig>) -> Vec<u8> {
        let SnapshotData::Checkpoint(c) = &*snap.snapshot else { panic!("a served snapshot is a checkpoint") };
        let mut out = Vec::new();
        c.write_records(&mut out).unwrap();
        out
    }

    /// Receive `snap` the way openraft hands one over, and install it.
    async fn install(sm: &mut StateMachine, snap: Snapshot<TypeConfig>) {
        use tokio::io::AsyncWriteExt;
        let bytes = records_of(&snap);
        let mut f = sm.begin_receiving_snapshot().await.unwrap();
        f.write_all(&bytes).await.unwrap();
        f.shutdown().await.unwrap();
        sm.install_snapshot(&snap.meta, f).await.unwrap();
    }

    /// A key and value, and the column family holding them.
    type Row = (&'static str, Box<[u8]>, Box<[u8]>);

    /// Every key and value of the state and derived column families.
    fn dump(db: &DB) -> Vec<Row> {
        let mut out = Vec::new();
        for name in STATE_CFS.iter().chain(DERIVED_CFS.iter()) {
            for item in db.iterator_cf(cf(db, name), IteratorMode::Start) {
                let (k, v) = item.unwrap();
                out.push((*name, k, v));
            }
        }
        out
    }

    /// openraft builds snapshots in a task of their own while entries go on
    /// being applied. A snapshot taken so, installed on a fresh node, must
    /// give exactly the leader's state once the node has applied the
    /// entries after it: compared key by key, in every column family.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_taken_under_writes_installs_the_same_state_key_by_key() {
        const ENTRIES: u64 = 2000;
        // Manifests large enough to live in blob files (`MIN_BLOB_BYTES`),
        // which the checkpoints must carry too.
        let pad = "p".repeat(600);
        let entries: Vec<Entry<TypeConfig>> = (1..=ENTRIES)
            .map(|i| {
                let p =
                    (0..4).map(|j| put_tag(i * 4 + j, &format!("t{}", (i * 4 + j) % 97), &format!("v{i}-{j}-{pad}")));
                entry(i, p.collect())
            })
            .collect();
        let leader_dir = tempfile::tempdir().unwrap();
        let (leader_db, mut leader) = machine(leader_dir.path());
        let mut builder = leader.get_snapshot_builder().await;
        let to_apply = entries.clone();
        // Snapshots taken before the last entry was applied. The last
        // entries wait for the first (on a loaded machine the applies could
        // otherwise all finish before one build does).
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = taken.clone();
        let applier = tokio::spawn(async move {
            for e in to_apply {
                if e.log_id.index + 100 > ENTRIES {
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                    while seen.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                        assert!(std::time::Instant::now() < deadline, "no snapshot built in 120 s");
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                leader.apply([e]).await.unwrap();
                tokio::task::yield_now().await;
            }
            leader
        });
        // Builds (points) and the checkpoints a peer would be sent race the
        // applies, as openraft's do.
        let mut snaps = Vec::new();
        while !applier.is_finished() {
            let point = builder.build_snapshot().await.unwrap();
            let c = builder.checkpoint().await.unwrap();
            assert!(c.meta().last_log_id >= point.meta.last_log_id, "a checkpoint is never behind the point");
            if c.meta().last_log_id.is_some_and(|l| l.index < ENTRIES) && snaps.len() < 4 {
                snaps.push(Snapshot { meta: c.meta().clone(), snapshot: Box::new(SnapshotData::Checkpoint(c)) });
                taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _leader = applier.await.unwrap();
        assert!(!snaps.is_empty(), "no snapshot was taken while entries were applied");
        assert!(!super::super::tests::blob_files(&leader_dir.path().join("db")).is_empty(), "no blob files");
        let want = dump(&leader_db);
        for snap in snaps {
            let at = snap.meta.last_log_id.map_or(0, |l| l.index);
            let dir = tempfile::tempdir().unwrap();
            let (db, mut sm) = machine(dir.path());
            let sent = records_of(&snap);
            install(&mut sm, snap).await;
            // The installed state is the stream, key by key.
            let mut r = &sent[SNAPSHOT_HEADER.len()..];
            let mut records = Vec::new();
            while let Some((i, k, v)) = super::super::snapshot::read_record(&mut r).unwrap() {
                records.push((STATE_CFS[i], k.into_boxed_slice(), v.into_boxed_slice()));
            }
            let installed: Vec<_> = dump(&db).into_iter().filter(|(n, _, _)| STATE_CFS.contains(n)).collect();
            assert_eq!(installed, records, "snapshot at {at}");
            // Then the entries after it make it the leader's.
            for e in entries.iter().filter(|e| e.log_id.index > at) {
                sm.apply([e.clone()]).await.unwrap();
            }
            assert_eq!(dump(&db), want, "snapshot at {at}, then the log");
        }
    }

    /// openraft builds snapshots in a task of their own, so a follower can
    /// install a newer snapshot from its leader while building one of its
    /// own. The build finishing last must not fail (which stops Raft on
    /// the node) nor move the snapshot point back behind the installed one.
    #[tokio::test]
    async fn a_build_that_finishes_after_a_newer_install_keeps_the_installed_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        sm.apply([entry(1, vec![put_tag(1, "t", "old")])]).await.unwrap();
        let builder = sm.get_snapshot_builder().await;
        let read = builder.point().await.unwrap();
        assert_eq!(read.last_log_id.unwrap().index, 1);

        let leader_dir = tempfile::tempdir().unwrap();
        let (_, mut leader) = machine(leader_dir.path());
        leader.apply([entry(1, vec![put_tag(1, "t", "old")]), entry(2, vec![put_tag(2, "t", "new")])]).await.unwrap();
        let newer = snapshot_now(&mut leader).await;
        let newer_meta = newer.meta.clone();
        install(&mut sm, newer).await;

        let late = builder.snapshots.mark(read);
        assert_eq!(late, newer_meta, "the late build gives way to the installed snapshot");
        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot to serve");
        assert_eq!(current.meta.last_log_id, newer_meta.last_log_id);
        assert_eq!(tag_value(&db), "new");
        let files: Vec<_> = std::fs::read_dir(dir.path().join("snap")).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "only the checkpoint being served stays on disk: {files:?}");
    }

    /// A build takes nothing on disk, so in steady state (no peer behind
    /// the log) no checkpoint pins tables that compaction replaced. A
    /// checkpoint is taken when a peer asks, serves every peer until the
    /// next point, stays while a transfer still reads it after that, and
    /// goes when the transfer lets go. None outlives the process.
    #[tokio::test]
    async fn a_checkpoint_is_taken_when_a_peer_asks_and_lives_until_its_last_transfer_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = machine(dir.path());
        let count = || std::fs::read_dir(dir.path().join("snap")).unwrap().count();
        sm.apply([entry(1, vec![put_tag(1, "t", "one")])]).await.unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none(), "no point yet, so nothing to serve");
        let point = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert!(matches!(*point.snapshot, SnapshotData::Point));
        assert_eq!(count(), 0, "a build takes no checkpoint");

        let first = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(first.meta.last_log_id.unwrap().index, 1);
        assert_eq!(count(), 1, "a peer asked: a checkpoint");
        let again = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(again.meta, first.meta, "it serves the next peer too");
        assert_eq!(count(), 1);
        drop(again);

        sm.apply([entry(2, vec![put_tag(2, "t", "two")])]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(count(), 1, "retired by the new point, still held by a transfer");
        let held = records_of(&first);
        assert!(!held.is_empty());
        drop(first);
        assert_eq!(count(), 0, "released, the retired checkpoint is gone");

        let second = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(second.meta.last_log_id.unwrap().index, 2);
        assert_eq!(count(), 1);
        drop(second);
        assert_eq!(count(), 1, "the serving one stays until the next point");
        drop(sm);
        let (_, mut sm) = machine(dir.path());
        assert_eq!(count(), 0, "a restart removes checkpoints");
        assert!(sm.get_current_snapshot().await.unwrap().is_none(), "no point since the start");
    }

    /// Tables of the manifests family and the level each sits at, once no
    /// compaction is pending or running (within a deadline).
    fn settled_tables(db: &DB) -> Vec<(String, i32)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let manifests = cf(db, CF_MANIFESTS);
        loop {
            let pending = db.property_int_value_cf(manifests, "rocksdb.compaction-pending").unwrap();
            let running = db.property_int_value("rocksdb.num-running-compactions").unwrap();
            if pending == Some(0) && running == Some(0) {
                let files = db.live_files().unwrap().into_iter().filter(|f| f.column_family_name == CF_MANIFESTS);
                return files.map(|f| (f.name, f.level)).collect();
            }
            assert!(std::time::Instant::now() < deadline, "compactions still pending or running");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Building a snapshot point takes no RocksDB snapshot. Releasing one
    /// has RocksDB rewrite every bottommost table whose keys still carry
    /// sequence numbers (a table moved down whole, as one repository's
    /// keys are): a fifth of each node's compaction input in the scale
    /// bench, for nothing.
    #[tokio::test]
    async fn a_snapshot_point_leaves_bottommost_tables_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        sm.apply([entry(1, vec![put_tag(1, "t", "v")])]).await.unwrap();
        // A table moved to the bottommost level without a rewrite.
        let manifests = cf(&db, CF_MANIFESTS);
        db.flush_cf(manifests).unwrap();
        db.set_options_cf(manifests, &[("level0_file_num_compaction_trigger", "1")]).unwrap();
        let before = settled_tables(&db);
        assert!(!before.is_empty() && before.iter().all(|(_, level)| *level == 6), "{before:?}");

        // The point flushes entry 2 into a level-0 table of its own, which
        // stays there: only a released RocksDB snapshot could rewrite the
        // bottommost one.
        db.set_options_cf(manifests, &[("level0_file_num_compaction_trigger", "8")]).unwrap();
        sm.apply([entry(2, vec![put_tag(2, "u", "w")])]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let after = settled_tables(&db);
        assert!(before.iter().all(|t| after.contains(t)), "a bottommost table was rewritten: {before:?} -> {after:?}");
    }

    /// The bytes of the write-ahead log files in the database at `dir`.
    fn wal_bytes(dir: &std::path::Path) -> u64 {
        let logs = std::fs::read_dir(dir).unwrap().flatten();
        let logs = logs.filter(|e| e.file_name().to_string_lossy().ends_with(".log"));
        logs.map(|e| e.metadata().unwrap().len()).sum()
    }

    /// What a crash (a kill or a power cut) now would leave of the
    /// database at `from`, where a process can open it: every file as it
    /// is (the page cache is what a killed process leaves), copied to `to`
    /// while the database stays open and idle.
    fn crash_copy(from: &std::path::Path, to: &std::path::Path) -> Arc<DB> {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            if e.file_name() != "LOCK" {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
        open_db(to).unwrap()
    }

    /// Applied entries are written once, to memtables and then tables, not
    /// also to the write-ahead log (the Raft log holds them). So a crash
    /// may take the state back to an earlier entry, whole (every family
    /// flushes at one point), and a snapshot point, after which openraft
    /// purges the log it would be applied again from, must first put on
    /// disk everything applied up to it.
    #[tokio::test]
    async fn applied_entries_skip_the_write_ahead_log_and_a_snapshot_point_puts_them_on_disk() {
        const ENTRIES: u64 = 200;
        let dir = tempfile::tempdir().unwrap();
        let (_db, mut sm) = machine(dir.path());
        let pad = "p".repeat(2000);
        let db_dir = dir.path().join("db");
        let wal_before = wal_bytes(&db_dir);
        let entries: Vec<_> = (1..=ENTRIES).map(|i| entry(i, vec![put_tag(i, "t", &format!("{i}-{pad}"))])).collect();
        let applied_bytes = ENTRIES * pad.len() as u64;
        sm.apply(entries).await.unwrap();
        let wal = wal_bytes(&db_dir) - wal_before;
        assert!(wal < applied_bytes / 10, "{wal} bytes of write-ahead log for {applied_bytes} bytes of manifests");

        // A crash now: whatever entry the state on disk is as of, its
        // applied id says which, and its tag is that entry's.
        let crashed = crash_copy(&db_dir, &dir.path().join("crash1"));
        let applied = super::super::snapshot::applied_of(&crashed).unwrap().0;
        let tagged = tag_of(&crashed).map(|v| v.split('-').next().unwrap().to_owned());
        assert_eq!(tagged, applied.map(|id| id.index.to_string()));
        drop(crashed);

        // A snapshot point, then a crash: the state on disk is the point's.
        let point = sm.get_snapshot_builder().await.build_snapshot().await.unwrap().meta.last_log_id;
        assert_eq!(point.map(|l| l.index), Some(ENTRIES));
        let crashed = crash_copy(&db_dir, &dir.path().join("crash2"));
        assert_eq!(super::super::snapshot::applied_of(&crashed).unwrap().0, point);
        assert_eq!(tag_value(&crashed), format!("{ENTRIES}-{pad}"));
    }

    /// A snapshot id is whatever the sending peer wrote. One that names a
    /// path outside the snapshot folder must write nothing there, and the
    /// snapshot must still install.
    #[tokio::test]
    async fn a_hostile_snapshot_id_writes_nothing_outside_the_snapshot_folder() {
        let leader_dir = tempfile::tempdir().unwrap();
        let (_, mut leader) = machine(leader_dir.path());
        leader.apply([entry(1, vec![put_tag(1, "t", "v")])]).await.unwrap();
        let mut snap = snapshot_now(&mut leader).await;
        snap.meta.snapshot_id = "../../escaped".into();

        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        install(&mut sm, snap).await;
        assert_eq!(tag_value(&db), "v");
        for outside in [dir.path().join("escaped"), dir.path().parent().unwrap().join("escaped")] {
            assert!(!outside.exists(), "{} was written", outside.display());
        }
        let files: Vec<_> = std::fs::read_dir(dir.path().join("snap")).unwrap().flatten().collect();
        assert!(files.is_empty(), "the received file is gone: {files:?}");
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
        let files: Vec<_> = std::fs::read_dir(dir.path().join("snap")).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "the checkpoint served is in its folder: {files:?}");

        // An id too long to be ours is refused.
        let mut snap = snapshot_now(&mut leader).await;
        snap.meta.snapshot_id = "x".repeat(4096);
        let bytes = records_of(&snap);
        let mut f = sm.begin_receiving_snapshot().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut f, &bytes).await.unwrap();
        assert!(sm.install_snapshot(&snap.meta, f).await.is_err());
    }

    /// Every key of every state column family comes from the snapshot:
    /// what the follower held that the snapshot lacks is gone.
    #[tokio::test]
    async fn an_install_replaces_the_whole_state() {
        let leader_dir = tempfile::tempdir().unwrap();
        let (_, mut leader) = machine(leader_dir.path());
        leader.apply([entry(1, vec![put_tag(1, "t", "leader")])]).await.unwrap();
        let snap = snapshot_now(&mut leader).await;

        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        sm.apply([entry(1, vec![put_tag(5, "t", "mine"), put_tag(6, "other", "mine too")])]).await.unwrap();
        install(&mut sm, snap).await;
        assert_eq!(tag_value(&db), "leader");
        let reader = sm.reader();
        let repo: Name = "r".parse().unwrap();
        assert_eq!(reader.tags(&repo, None, None).unwrap().items, vec!["t".to_owned()]);
        assert_eq!(db.iterator_cf(cf(&db, CF_MANIFESTS), IteratorMode::Start).count(), 1);
        assert_eq!(db.iterator_cf(cf(&db, CF_REQUESTS), IteratorMode::Start).count(), 1, "the leader's one id");
        let files: Vec<_> = std::fs::read_dir(dir.path().join("snap")).unwrap().flatten().collect();
        assert!(files.is_empty(), "no scratch file stays: {files:?}");
        assert!(get_sm::<super::super::snapshot::StoredSnapshot>(&db, super::super::snapshot::KEY_INSTALLING)
            .unwrap()
            .is_none());
    }

    /// An install replaces column families one at a time. Cut short (a
    /// crash or power loss after some are replaced), the node must not come
    /// back with the mix: it finishes the install before anything reads.
    #[tokio::test]
    async fn an_install_cut_short_is_finished_when_the_node_restarts() {
        use tokio::io::AsyncWriteExt;
        let leader_dir = tempfile::tempdir().unwrap();
        let (_, mut leader) = machine(leader_dir.path());
        leader
            .apply([entry(1, vec![put_tag(1, "t", "old")]), entry(2, vec![put_tag(2, "t", "leader")])])
            .await
            .unwrap();
        let snap = snapshot_now(&mut leader).await;
        let snap_meta = snap.meta.clone();

        let dir = tempfile::tempdir().unwrap();
        {
            let (db, mut sm) = machine(dir.path());
            sm.apply([entry(1, vec![put_tag(1, "t", "old")])]).await.unwrap();
            // Received and marked, then the manifests replaced and the
            // tags not: the tag names a manifest this node no longer has.
            let mut f = sm.begin_receiving_snapshot().await.unwrap();
            f.write_all(&records_of(&snap)).await.unwrap();
            f.shutdown().await.unwrap();
            let received = sm.receiving.take().unwrap();
            sm.snapshots.begin_install(&db, &received, &snap_meta).unwrap();
            db.delete_range_cf(cf(&db, CF_MANIFESTS), &b""[..], &[0xffu8; 300][..]).unwrap();
        }
        let (db, mut sm) = machine(dir.path());
        assert_eq!(tag_value(&db), "leader");
        assert_eq!(sm.applied_state().await.unwrap().0, snap_meta.last_log_id);
        assert!(get_sm::<super::super::snapshot::StoredSnapshot>(&db, super::super::snapshot::KEY_INSTALLING)
            .unwrap()
            .is_none());
        let files: Vec<_> = std::fs::read_dir(dir.path().join("snap")).unwrap().flatten().collect();
        assert!(files.is_empty(), "the received file is gone: {files:?}");
        let served = sm.get_current_snapshot().await.unwrap().expect("the installed snapshot is a point");
        assert_eq!(served.meta.last_log_id, snap_meta.last_log_id);
    }

    /// A snapshot is a stream from a peer: records out of order are refused
    /// and leave the state as it was.
    #[tokio::test]
    async fn a_snapshot_out_of_order_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sm) = machine(dir.path());
        let path = dir.path().join("bad.snap");
        let mut bad = SNAPSHOT_HEADER.to_vec();
        for key in [&b"b"[..], &b"a"[..]] {
            bad.push(1u8);
            bad.extend_from_slice(&(key.len() as u32).to_be_bytes());
            bad.extend_from_slice(key);
            bad.extend_from_slice(&1u32.to_be_bytes());
            bad.push(b'x');
        }
        std::fs::write(&path, &bad).unwrap();
        let err = write_ssts(&sm.snapshots, std::fs::File::open(&path).unwrap()).unwrap_err();
        assert!(err.to_string().contains("corrupt snapshot"), "{err}");
        // Without the header (a release before format 1), or with a newer
        // format, it is refused before any record is read.
        std::fs::write(&path, &bad[SNAPSHOT_HEADER.len()..]).unwrap();
        let err = write_ssts(&sm.snapshots, std::fs::File::open(&path).unwrap()).unwrap_err();
        assert!(err.to_string().contains("before format 1"), "{err}");
        bad[SNAPSHOT_HEADER.len() - 1] += 1;
        std::fs::write(&path, &bad).unwrap();
        let err = write_ssts(&sm.snapshots, std::fs::File::open(&path).unwrap()).unwrap_err();
        assert!(err.to_string().contains("newer release"), "{err}");
    }

    /// Peak memory of installing a large snapshot, for the record (run by
    /// hand: `cargo test --release --lib -- --ignored --nocapture
    /// install_memory`). The whole state used to be one write batch.
    #[tokio::test]
    #[ignore]
    async fn install_memory() {
        let records: u64 = std::env::var("RECORDS").ok().and_then(|n| n.parse().ok()).unwrap_or(200_000);
        let leader_dir = tempfile::tempdir().unwrap();
        let (leader_db, mut leader) = machine(leader_dir.path());
        let value = vec![b'm'; 2000];
        for i in 0..records {
            leader_db.put_cf(cf(&leader_db, CF_MANIFESTS), format!("r\0sha256:{i:064}"), &value).unwrap();
        }
        leader.apply([entry(1, vec![put_tag(1, "t", "v")])]).await.unwrap();
        let snap = snapshot_now(&mut leader).await;

        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        let hwm = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_owned();
            l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
        };
        let rss = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_owned();
            l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
        };
        // Received the way the network does: chunk by chunk.
        use tokio::io::AsyncWriteExt;
        let SnapshotData::Checkpoint(c) = &*snap.snapshot else { panic!() };
        let mut chunks = c.clone().stream(1 << 20);
        let mut f = sm.begin_receiving_snapshot().await.unwrap();
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = rss();
        let t = std::time::Instant::now();
        let mut size = 0;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.unwrap();
            size += chunk.len();
            f.write_all(&chunk).await.unwrap();
        }
        f.shutdown().await.unwrap();
        sm.install_snapshot(&snap.meta, f).await.unwrap();
        println!(
            "streamed and installed a {} MiB snapshot ({records} records) in {:.1} s: RSS {before} MiB before, peak {} MiB",
            size >> 20,
            t.elapsed().as_secs_f64(),
            hwm()
        );
        assert_eq!(tag_value(&db), "v");
    }

    fn blob_digest(data: &[u8]) -> Digest {
        let mut h = crate::oci::Algorithm::Sha256.hasher();
        h.update(data);
        h.finish()
    }

    fn p(seq: u64, cmd: Command) -> Proposal {
        Proposal { id: RequestId { origin: 1, boot: 9, seq }, cmd }
    }

    fn link_at(repo: &str, d: &Digest, holders: Vec<NodeId>, at_ms: u64) -> Command {
        Command::LinkBlobAt { repo: repo.parse().unwrap(), digest: d.clone(), size: 3, holders, at_ms }
    }

    fn image_over(d: &Digest) -> (Digest, Command) {
        let bytes = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":3}},"layers":[]}}"#
        )
        .into_bytes();
        let md = blob_digest(&bytes);
        let cmd = Command::PutManifest {
            repo: "r".parse().unwrap(),
            digest: md.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
            tags: vec![],
        };
        (md, cmd)
    }

    /// The collector's fence is the log order: apply checks every
    /// candidate again. A manifest ordered before the sweep keeps its blob;
    /// one ordered after it is refused; a link younger than the cutoff
    /// stays; a blob no repository links leaves the index, and neither a
    /// late copy nor a mount brings it back.
    #[tokio::test]
    async fn a_collection_decides_against_the_state_of_its_own_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        let r = sm.reader();
        let repo: Name = "r".parse().unwrap();
        let (used, unused, young) = (blob_digest(b"one"), blob_digest(b"two"), blob_digest(b"new"));
        sm.apply([entry(
            1,
            vec![p(1, link_at("r", &used, vec![1], 100)), p(2, link_at("r", &unused, vec![1, 2], 100))],
        )])
        .await
        .unwrap();
        sm.apply([entry(2, vec![p(3, link_at("r", &young, vec![1], 5_000))])]).await.unwrap();
        // The mark (as a collector would see it at cutoff 1000): all but
        // the young link are unused.
        let page = r.gc_page(None, 100, 1_000).unwrap();
        let marked: Vec<_> = page.candidates.iter().map(|c| c.digest.clone()).collect();
        assert_eq!(marked.len(), 2, "{marked:?}");
        assert!(page.candidates.iter().all(|c| c.freed && c.unlink == vec![repo.clone()]));
        // A manifest using `used` is ordered between the mark and the sweep.
        let (m1, put_used) = image_over(&used);
        sm.apply([entry(3, vec![p(4, put_used)])]).await.unwrap();
        let everything = vec![
            (used.clone(), vec![repo.clone()]),
            (unused.clone(), vec![repo.clone()]),
            (young.clone(), vec![repo.clone()]),
        ];
        let out =
            sm.apply([entry(4, vec![p(5, Command::Collect { cutoff_ms: 1_000, blobs: everything })])]).await.unwrap();
        assert_eq!(out[0].0, vec![Outcome(Ok(()))]);
        assert_eq!(r.blob_link(&repo, &used).unwrap(), Some(3), "referenced before the sweep: kept");
        assert!(r.blob(&used).unwrap().is_some());
        assert_eq!(r.blob_link(&repo, &young).unwrap(), Some(3), "younger than the cutoff: kept");
        assert_eq!(r.blob_link(&repo, &unused).unwrap(), None);
        assert!(r.blob(&unused).unwrap().is_none(), "no link left: out of the index");
        // Ordered after the sweep: a manifest over the collected blob is
        // refused, a late copy records nothing, a mount is refused.
        let (_, put_unused) = image_over(&unused);
        let late = Command::AddHolders { digest: unused.clone(), size: 3, holders: vec![3] };
        let out = sm
            .apply([entry(5, vec![p(6, put_unused), p(7, late), p(8, link_at("other", &unused, vec![], 9_000))])])
            .await
            .unwrap();
        assert_eq!(out[0].0[0], Outcome(Err(Rejection::MissingReference(unused.clone()))));
        assert_eq!(out[0].0[2], Outcome(Err(Rejection::BlobUnknown)));
        assert!(r.blob(&unused).unwrap().is_none());
        // Deleting the manifest makes `used` collectable; the indexes are
        // derived, so a rebuild (what an install or an upgrade does) gives
        // the same answer as the live ones.
        sm.apply([entry(6, vec![p(9, Command::DeleteManifest { repo: repo.clone(), digest: m1 })])]).await.unwrap();
        let live: Vec<_> = r.gc_page(None, 100, 1_000).unwrap().candidates.into_iter().map(|c| c.digest).collect();
        assert_eq!(live, vec![used.clone()]);
        rebuild_derived(&db).unwrap();
        let rebuilt: Vec<_> = r.gc_page(None, 100, 1_000).unwrap().candidates.into_iter().map(|c| c.digest).collect();
        assert_eq!(rebuilt, live);
    }

    fn with(at_ms: u64, immutable: bool, cmd: Command) -> Command {
        let rules =
            if immutable { vec![crate::meta::ImmutableTags { rule: "rel".into(), tags: "v*".into() }] } else { vec![] };
        Command::With {
            ctx: Box::new(crate::meta::Context { at_ms, immutable: rules, source: 1, ..Default::default() }),
            cmd: Box::new(cmd),
        }
    }

    fn put_index(tag: &str, annotation: &str) -> (Digest, Command) {
        let p = put_tag(0, tag, annotation);
        match p.cmd {
            Command::PutManifest { ref digest, .. } => (digest.clone(), p.cmd.clone()),
            _ => unreachable!(),
        }
    }

    /// Immutability is decided at apply, against the state as of the
    /// entry: of two writes creating the same covered tag, the later one
    /// is refused; a delete of the tag or its manifest is refused; every
    /// committed write leaves its events under keys from its log place,
    /// and a trim removes exactly those before its bound. Retire removes a
    /// tag only if it still has the push time the policy saw.
    #[tokio::test]
    async fn apply_enforces_immutable_tags_records_events_and_retires_only_what_was_planned() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, mut sm) = machine(dir.path());
        let r = sm.reader();
        let repo: Name = "r".parse().unwrap();
        let (a, put_a) = put_index("v1", "a");
        let (_b, put_b) = put_index("v1", "b");
        let out = sm
            .apply([entry(1, vec![p(1, with(10, true, put_a.clone())), p(2, with(11, true, put_b.clone()))])])
            .await
            .unwrap();
        assert_eq!(out[0].0[0], Outcome(Ok(())));
        assert!(matches!(&out[0].0[1], Outcome(Err(Rejection::Denied(m))) if m.contains("rel")), "{:?}", out[0].0[1]);
        assert_eq!(r.tag(&repo, &"v1".parse().unwrap()).unwrap(), Some(a.clone()));
        // The same manifest again is fine; without the rule, it moves.
        let out = sm.apply([entry(2, vec![p(3, with(12, true, put_a.clone()))])]).await.unwrap();
        assert_eq!(out[0].0[0], Outcome(Ok(())));
        let del_tag = Command::DeleteTag { repo: repo.clone(), tag: "v1".parse().unwrap() };
        let del_man = Command::DeleteManifest { repo: repo.clone(), digest: a.clone() };
        let out =
            sm.apply([entry(3, vec![p(4, with(13, true, del_tag)), p(5, with(13, true, del_man))])]).await.unwrap();
        assert!(out[0].0.iter().all(|o| matches!(o, Outcome(Err(Rejection::Denied(_))))), "{:?}", out[0].0);
        // Events: one push for each accepted write, none for refusals.
        let events = r.events_from(EventKey::default(), 100).unwrap();
        let keys: Vec<_> = events.iter().map(|(k, _)| (k.index, k.pos, k.sub)).collect();
        assert_eq!(keys, vec![(1, 0, 0), (2, 0, 0)]);
        assert!(events.iter().all(|(_, e)| e.action == EventAction::Push && e.tag.as_deref() == Some("v1")));
        assert_eq!(events[0].1.at_ms, 10);
        // Retire: a tag whose push time changed since the plan stays.
        let (x, put_x) = put_index("x", "x");
        sm.apply([entry(4, vec![p(6, with(20, false, put_x.clone()))])]).await.unwrap();
        let stale = Command::Retire {
            repo: repo.clone(),
            tags: vec![("x".parse().unwrap(), x.clone(), 19)],
            manifests: vec![],
        };
        sm.apply([entry(5, vec![p(7, with(21, false, stale))])]).await.unwrap();
        assert_eq!(r.tag(&repo, &"x".parse().unwrap()).unwrap(), Some(x.clone()), "pushed again since: kept");
        let planned = Command::Retire {
            repo: repo.clone(),
            tags: vec![("x".parse().unwrap(), x.clone(), 20)],
            manifests: vec![(x.clone(), 20)],
        };
        sm.apply([entry(6, vec![p(8, with(22, false, planned))])]).await.unwrap();
        assert_eq!(r.tag(&repo, &"x".parse().unwrap()).unwrap(), None);
        assert!(r.manifest(&repo, &x).unwrap().is_none(), "untagged by the same entry: removed");
        // A delivery cursor only moves forward.
        let ahead = EventKey { index: 6, pos: 0, sub: 0 };
        let behind = EventKey { index: 2, pos: 0, sub: 0 };
        sm.apply([entry(
            8,
            vec![
                p(10, Command::Delivered { endpoint: "e".into(), next: ahead }),
                p(11, Command::Delivered { endpoint: "e".into(), next: behind }),
            ],
        )])
        .await
        .unwrap();
        assert_eq!(r.event_cursors().unwrap(), vec![("e".to_owned(), ahead)]);
        // A trim drops the events before its bound, nothing after.
        let before = r.events_from(EventKey::default(), 100).unwrap().len();
        let bound = EventKey { index: 4, pos: 0, sub: 0 };
        sm.apply([entry(9, vec![p(12, Command::TrimEvents { below: bound, forget: vec![] })])]).await.unwrap();
        let after = r.events_from(EventKey::default(), 100).unwrap();
        assert_eq!(after.len(), before - 2);
        assert!(after.iter().all(|(k, _)| *k >= bound));
    }

    /// A write that reaches the log twice (a forward whose answer was lost,
    /// retried after a newer write to the same tag) must not bring the old
    /// value back, on this replica or on one restored from a snapshot.
    #[tokio::test]
    async fn a_retried_write_applies_once_even_after_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        let first = put_tag(1, "t", "old");
        sm.apply([entry(1, vec![first.clone()])]).await.unwrap();
        sm.apply([entry(2, vec![put_tag(2, "t", "new")])]).await.unwrap();
        let out = sm.apply([entry(3, vec![first.clone()])]).await.unwrap();
        assert_eq!(out[0].0, vec![Outcome(Ok(()))], "the retry gets the first attempt's outcome");
        assert_eq!(tag_value(&db), "new");

        // The memory of applied ids travels in snapshots.
        let snap = snapshot_now(&mut sm).await;
        let other = tempfile::tempdir().unwrap();
        let (db2, mut sm2) = machine(other.path());
        install(&mut sm2, snap).await;
        sm2.apply([entry(4, vec![first.clone()])]).await.unwrap();
        assert_eq!(tag_value(&db2), "new");

        // Ids are forgotten after KEEP_REQUESTS entries, deterministically.
        let count = |db: &DB| db.iterator_cf(cf(db, CF_REQUESTS), IteratorMode::Start).count();
        assert_eq!(count(&db), 2);
        sm.apply([entry(3 + KEEP_REQUESTS, vec![])]).await.unwrap();
        assert_eq!(count(&db), 0);
        assert_eq!(db.iterator_cf(cf(&db, CF_REQUEST_AGE), IteratorMode::Start).count(), 0);
    }

    /// Expiry reads only what is left to forget. Forgotten ids stay in the
    /// tables as tombstones until compaction drops them; an expiry that
    /// read the age table from its start would step over all of them at
    /// every entry, more the longer a node runs. RocksDB counts the
    /// tombstones a read steps over, per thread.
    #[tokio::test]
    async fn expiring_request_ids_does_not_step_over_those_already_forgotten() {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        let dir = tempfile::tempdir().unwrap();
        let (db, mut sm) = machine(dir.path());
        let ids = 3 * PRUNE_PER_ENTRY as u64;
        for seq in 1..=ids {
            sm.apply([entry(seq, vec![put_tag(seq, "t", &seq.to_string())])]).await.unwrap();
        }
        // Each entry past KEEP_REQUESTS forgets at most PRUNE_PER_ENTRY ids.
        let count = |db: &DB| db.iterator_cf(cf(db, CF_REQUESTS), IteratorMode::Start).count() as u64;
        for i in 1..=3 {
            sm.apply([entry(ids + KEEP_REQUESTS + i, vec![])]).await.unwrap();
            assert_eq!(count(&db), ids - (i * PRUNE_PER_ENTRY as u64).min(ids));
        }
        assert_eq!(count(&db), 0);
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut perf = PerfContext::default();
        perf.reset();
        sm.apply([entry(ids + KEEP_REQUESTS + 4, vec![])]).await.unwrap();
        let skipped = perf.metric(PerfMetric::InternalDeleteSkippedCount);
        set_perf_stats(PerfStatsLevel::Disable);
        assert!(skipped < 16, "expiry stepped over {skipped} forgotten ids");
    }
}
