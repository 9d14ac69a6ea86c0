//! Self-healing, driven by what changed. The leader restores blobs below
//! their replica target by copying them from a surviving holder to new
//! placements, recording holders through Raft. It learns which ones from:
//! - the queue of blobs whose copies shrank ([`crate::meta::LostCopies`]):
//!   every applied `RemoveHolders` (a copy the scrub found corrupt or
//!   missing, or a failed background copy) lands there, and only those
//!   blobs are looked at;
//! - a change of the members or of which of them answer (a node joined,
//!   left, died more than `dead_after` ago or came back), or of the leader:
//!   then it scans the whole index, a page at a time, since any blob may
//!   be placed differently;
//! - a sweep every `repair_sweep_secs`, the same scan, as a safety net.
//!
//! A round with nothing queued and nothing changed reads nothing. Every node
//! checks that the copies the index says it holds exist when it starts (a
//! swapped disk is reported before anyone reads it) and once per sweep;
//! between, the scrub (`scrub.rs`) finds copies missing or rotten as it
//! re-hashes them at its own pace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::Replicator;
use crate::meta::{BlobInfo, Command, MetaReader};
use crate::oci::Digest;
use crate::NodeId;

/// Blobs checked or repaired at once. A replaced disk or a lost node leaves
/// every blob it held to restore, and each restore waits on a copy and a
/// Raft write; one at a time, a few thousand blobs take longer than the
/// next failure may. Serving nodes still bound what they send to one peer
/// (`transfer.max_per_peer`), and concurrent Raft writes share entries.
const CONCURRENCY: usize = 16;

#[derive(Debug, Clone)]
pub struct RepairSettings {
    /// How often the loop wakes: probes members, works the queue.
    pub interval: Duration,
    pub dead_after: Duration,
    /// How often the whole index is scanned, and local copies checked,
    /// when nothing else asks for it.
    pub sweep: Duration,
}

/// What the repair rounds of this node found, for `/metrics`: how an
/// operator (or a fault test) tells that copies lost with a node or a disk
/// are all restored.
#[derive(Debug)]
pub struct RepairReport {
    rounds: AtomicU64,
    below_target: AtomicI64,
    local_checks: AtomicU64,
    scans: AtomicU64,
    queued: AtomicU64,
}

impl Default for RepairReport {
    fn default() -> Self {
        RepairReport {
            rounds: AtomicU64::new(0),
            below_target: AtomicI64::new(-1),
            local_checks: AtomicU64::new(0),
            scans: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        }
    }
}

impl RepairReport {
    /// Checks of this node's copies against the index since start.
    pub fn local_checks(&self) -> u64 {
        self.local_checks.load(Ordering::Relaxed)
    }

    /// Leader repair rounds completed by this node since it started.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Rounds of those that scanned the whole blob index.
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Blobs looked at because they were queued, not found by a scan.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Blobs that had fewer copies on live members than their target
    /// (`replicas`, or every live member if fewer) at the end of this
    /// node's last repair round; None unless this node leads repair.
    pub fn below_target(&self) -> Option<u64> {
        u64::try_from(self.below_target.load(Ordering::Relaxed)).ok()
    }
}

pub async fn run(
    r: Replicator,
    meta: MetaReader,
    s: RepairSettings,
    report: Arc<RepairReport>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_seen: HashMap<NodeId, Instant> = HashMap::new();
    let started = Instant::now();
    // The index says which copies this node should hold only once it has
    // applied what was committed while it was down: catch up first.
    tokio::select! {
        ok = r.caught_up(s.dead_after.max(Duration::from_secs(30))) => {
            if !ok {
                tracing::warn!("not caught up with the cluster; checking local copies against a possibly stale index");
            }
        }
        _ = stop.changed() => return,
    }
    // When local copies were last checked; None: not since start.
    let mut checked: Option<Instant> = None;
    // What the last full scan saw; None: none since this node last led.
    let mut scanned: Option<Scanned> = None;
    loop {
        if checked.is_some() {
            tokio::select! {
                _ = tokio::time::sleep(s.interval) => {}
                _ = stop.changed() => return,
            }
        }
        // At start a node looks for its files (it does not hash them: that
        // is the scrub's, at its own pace, so a restart costs the same
        // whatever the store's size) and reports what it lost before
        // anyone reads it.
        if checked.is_none_or(|t| t.elapsed() >= s.sweep) {
            match check_local(&r, &meta).await {
                Ok(c) => tracing::info!(held = c.held, missing = c.missing, "checked local copies against the index"),
                Err(e) => tracing::warn!(error = %e, "checking local copies"),
            }
            report.local_checks.fetch_add(1, Ordering::Relaxed);
            checked = Some(Instant::now());
        }
        let lost = meta.lost_copies().take();
        if !r.is_leader() {
            // A node that becomes leader scans everything first.
            scanned = None;
            report.below_target.store(-1, Ordering::Relaxed);
            continue;
        }
        probe(&r, &mut last_seen).await;
        // Right after start every peer looks unseen: give them time.
        let grace = started.elapsed() < s.dead_after;
        let view = View::now(&r, &last_seen, s.dead_after, grace);
        let scan =
            lost.overflowed || scanned.as_ref().is_none_or(|last| last.view != view || last.at.elapsed() >= s.sweep);
        let result = if scan {
            report.scans.fetch_add(1, Ordering::Relaxed);
            let short = repair_all(&r, &meta, &view).await;
            if short.is_ok() {
                scanned = Some(Scanned { view, at: Instant::now() });
            }
            short
        } else if lost.digests.is_empty() {
            Ok(Short::default())
        } else {
            report.queued.fetch_add(lost.digests.len() as u64, Ordering::Relaxed);
            repair_some(&r, &meta, &view, lost.digests).await
        };
        // Blobs still short (a target down or full, no live holder) are
        // queued again: each round retries them until they are whole.
        let result = result.map(|short| {
            report.below_target.store(short.count as i64, Ordering::Relaxed);
            if short.count > short.digests.len() {
                // More than the queue keeps: the next round scans.
                scanned = None;
            }
            for d in short.digests {
                meta.lost_copies().push(d);
            }
        });
        match result {
            Ok(()) => {
                report.rounds.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                scanned = None;
                tracing::warn!(error = %e, "repair round");
            }
        }
    }
}

/// The members and which of them answer, as a repair round sees them.
#[derive(Debug, PartialEq, Eq)]
struct View {
    /// Sorted.
    members: Vec<NodeId>,
    /// Sorted; during the grace after start, every member.
    alive: Vec<NodeId>,
}

impl View {
    fn now(r: &Replicator, last_seen: &HashMap<NodeId, Instant>, dead_after: Duration, grace: bool) -> View {
        let mut members: Vec<NodeId> = r.member_addrs().into_iter().map(|m| m.0).collect();
        members.sort_unstable();
        let alive = members
            .iter()
            .copied()
            .filter(|id| grace || last_seen.get(id).is_some_and(|t| t.elapsed() < dead_after))
            .collect();
        View { members, alive }
    }

    fn alive(&self, id: &NodeId) -> bool {
        self.alive.binary_search(id).is_ok()
    }
}

/// The last full scan: what it saw, and when.
struct Scanned {
    view: View,
    at: Instant,
}

/// What a check of the local copies found.
#[derive(Debug, Default)]
struct LocalCheck {
    held: usize,
    missing: usize,
}

/// Blobs of the index read at a time by repair.
const PAGE: usize = 1024;

/// Copies this node is recorded as holding must exist; a missing one is
/// dropped from the index, so the leader's repair restores it from another
/// holder. A page of the index at a time.
async fn check_local(r: &Replicator, meta: &MetaReader) -> anyhow::Result<LocalCheck> {
    let mut c = LocalCheck::default();
    let mut after = None;
    loop {
        let page = meta.blobs_after(after.as_ref(), PAGE)?;
        after = page.last().map(|(d, _)| d.clone());
        let full_page = page.len() == PAGE;
        let held: Vec<crate::oci::Digest> =
            page.into_iter().filter(|(_, info)| info.holders.contains(&r.node_id())).map(|(d, _)| d).collect();
        c.held += held.len();
        let mut checks = futures::stream::iter(held)
            .map(|digest| async move {
                let present = r.store().contains(&digest).await;
                if !present {
                    r.forget_missing(&digest).await;
                }
                present
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(present) = checks.next().await {
            c.missing += usize::from(!present);
        }
        if !full_page {
            return Ok(c);
        }
    }
}

async fn probe(r: &Replicator, last_seen: &mut HashMap<NodeId, Instant>) {
    for (id, addr) in r.member_addrs() {
        if id == r.node_id() || r.answers(&addr).await {
            last_seen.insert(id, Instant::now());
        }
    }
}

/// Blobs a round left below their target: how many, and the first
/// [`SHORT_KEPT`] of them, to retry.
#[derive(Default)]
struct Short {
    count: usize,
    digests: Vec<Digest>,
}

/// Short blobs retried by digest at most; past this the next round scans.
const SHORT_KEPT: usize = 10_000;

impl Short {
    fn done(short: &std::sync::Mutex<Short>) -> Short {
        std::mem::take(&mut *short.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn add(short: &std::sync::Mutex<Short>, digest: &Digest) {
        let mut s = short.lock().unwrap_or_else(|e| e.into_inner());
        s.count += 1;
        if s.digests.len() < SHORT_KEPT {
            s.digests.push(digest.clone());
        }
    }
}

/// Scan the whole index, a page at a time, repairing what is short.
async fn repair_all(r: &Replicator, meta: &MetaReader, view: &View) -> anyhow::Result<Short> {
    let short = std::sync::Mutex::new(Short::default());
    let short = &short;
    let mut after = None;
    loop {
        let page = meta.blobs_after(after.as_ref(), PAGE)?;
        after = page.last().map(|(d, _)| d.clone());
        let last_page = page.len() < PAGE;
        futures::stream::iter(page.into_iter().map(anyhow::Ok))
            .try_for_each_concurrent(CONCURRENCY, |(digest, info)| async move {
                if !repair_one(r, view, &digest, &info).await? {
                    Short::add(short, &digest);
                }
                Ok(())
            })
            .await?;
        if last_page {
            return Ok(Short::done(short));
        }
    }
}

/// Repair the queued `digests` (those still in the index).
async fn repair_some(r: &Replicator, meta: &MetaReader, view: &View, digests: Vec<Digest>) -> anyhow::Result<Short> {
    let short = std::sync::Mutex::new(Short::default());
    let short = &short;
    futures::stream::iter(digests.into_iter().map(anyhow::Ok))
        .try_for_each_concurrent(CONCURRENCY, |digest| async move {
            let Some(info) = meta.blob(&digest)? else { return Ok(()) };
            if !repair_one(r, view, &digest, &info).await? {
                Short::add(short, &digest);
            }
            Ok(())
        })
        .await?;
    Ok(Short::done(short))
}

/// Bring one blob to its target: forget holders that are no longer
/// members, copy it to where placement wants it now (a joining node gets
/// its share, a dead or departed holder is replaced). Returns whether it
/// is at its target (`replicas`, or every live member if fewer).
async fn repair_one(r: &Replicator, view: &View, digest: &Digest, info: &BlobInfo) -> anyhow::Result<bool> {
    let member = |h: &NodeId| view.members.binary_search(h).is_ok();
    let gone: Vec<NodeId> = info.holders.iter().copied().filter(|h| !member(h)).collect();
    if !gone.is_empty() {
        r.propose(Command::RemoveHolders { digest: digest.clone(), holders: gone }).await?;
    }
    let live: Vec<NodeId> = info.holders.iter().copied().filter(|h| member(h) && view.alive(h)).collect();
    if live.is_empty() {
        return Ok(false);
    }
    let want = r.replicas().min(view.alive.len());
    let new = r.place(digest, info.size, &live, &live, &|id: &NodeId| view.alive(id)).await;
    let at_target = live.len() + new.len() >= want;
    if !new.is_empty() {
        r.propose(Command::AddHolders { digest: digest.clone(), size: info.size, holders: new }).await?;
    }
    Ok(at_target)
}
