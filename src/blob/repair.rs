//! Self-healing. Every node checks that the copies the index says it holds
//! exist (that they still hash to their digest is the scrub's, `scrub.rs`).
//! The leader additionally finds blobs below their replica target (a holder
//! left, died more than `dead_after` ago, or lost its copy) and copies them
//! from a surviving holder to new placements, recording holders through Raft.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::Replicator;
use crate::meta::{Command, MetaReader};
use crate::NodeId;

/// Blobs checked or repaired at once. A replaced disk or a lost node leaves
/// every blob it held to restore, and each restore waits on a copy and a
/// Raft write; one at a time, a few thousand blobs take longer than the
/// next failure may. Serving nodes still bound what they send to one peer
/// (`transfer.max_per_peer`), and concurrent Raft writes share entries.
const CONCURRENCY: usize = 16;

#[derive(Debug, Clone)]
pub struct RepairSettings {
    pub interval: Duration,
    pub dead_after: Duration,
}

/// What the repair rounds of this node found, for `/metrics`: how an
/// operator (or a fault test) tells that copies lost with a node or a disk
/// are all restored.
#[derive(Debug)]
pub struct RepairReport {
    rounds: AtomicU64,
    below_target: AtomicI64,
    local_checks: AtomicU64,
}

impl Default for RepairReport {
    fn default() -> Self {
        RepairReport { rounds: AtomicU64::new(0), below_target: AtomicI64::new(-1), local_checks: AtomicU64::new(0) }
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
    // The first round runs at once: a node that was down (or whose disk
    // was swapped) reports what it lost before anyone reads it. It looks
    // for the files, it does not hash them: that is the scrub's, at its
    // own pace, so a restart costs the same whatever the store's size.
    let mut first = true;
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
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(s.interval) => {}
                _ = stop.changed() => return,
            }
        }
        match check_local(&r, &meta).await {
            Ok(c) if first || c.missing > 0 => {
                tracing::info!(held = c.held, missing = c.missing, "checked local copies against the index")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checking local copies"),
        }
        report.local_checks.fetch_add(1, Ordering::Relaxed);
        first = false;
        if r.is_leader() {
            probe(&r, &mut last_seen).await;
            // Right after start every peer looks unseen: give them time.
            let grace = started.elapsed() < s.dead_after;
            match repair(&r, &meta, &last_seen, s.dead_after, grace).await {
                Ok(below) => {
                    report.below_target.store(below as i64, Ordering::Relaxed);
                    report.rounds.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "repair round"),
            }
        } else {
            report.below_target.store(-1, Ordering::Relaxed);
        }
    }
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
                    r.drop_corrupt(&digest).await;
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

async fn repair(
    r: &Replicator,
    meta: &MetaReader,
    last_seen: &HashMap<NodeId, Instant>,
    dead_after: Duration,
    grace: bool,
) -> anyhow::Result<usize> {
    let members: Vec<NodeId> = r.member_addrs().into_iter().map(|m| m.0).collect();
    let alive = |id: &NodeId| grace || last_seen.get(id).is_some_and(|t| t.elapsed() < dead_after);
    let alive = &alive;
    let members = &members;
    let want = r.replicas().min(members.iter().filter(|m| alive(m)).count());
    let below = &AtomicUsize::new(0);
    let mut after = None;
    loop {
        let page = meta.blobs_after(after.as_ref(), PAGE)?;
        after = page.last().map(|(d, _)| d.clone());
        let last_page = page.len() < PAGE;
        futures::stream::iter(page.into_iter().map(anyhow::Ok))
            .try_for_each_concurrent(CONCURRENCY, |(digest, info)| async move {
                let gone: Vec<NodeId> = info.holders.iter().copied().filter(|h| !members.contains(h)).collect();
                if !gone.is_empty() {
                    r.propose(Command::RemoveHolders { digest: digest.clone(), holders: gone }).await?;
                }
                let live: Vec<NodeId> =
                    info.holders.iter().copied().filter(|h| members.contains(h) && alive(h)).collect();
                if live.is_empty() {
                    below.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // Where placement wants the blob now (a joining node gets its
                // share, a dead or departed holder is replaced).
                let new = r.place(&digest, info.size, &live, &live, alive).await;
                if live.len() + new.len() < want {
                    below.fetch_add(1, Ordering::Relaxed);
                }
                if !new.is_empty() {
                    r.propose(Command::AddHolders { digest: digest.clone(), size: info.size, holders: new }).await?;
                }
                Ok(())
            })
            .await?;
        if last_page {
            return Ok(below.load(Ordering::Relaxed));
        }
    }
}
