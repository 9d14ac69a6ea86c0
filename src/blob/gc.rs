//! Online garbage collection, cluster-wide, with no read-only window.
//!
//! **Mark** (any node, on its applied state after a barrier): every blob of
//! the index, with the repositories whose link to it no manifest there
//! references and that was linked before `now - grace`. Manifests are the
//! roots: every stored manifest, tagged or not (an untagged manifest is
//! something a client pushed by digest; dropping those is a retention
//! decision, not a collector's).
//!
//! **Sweep, through Raft:** a [`Command::Collect`] per page of candidates.
//! Apply checks each link again against the state as of that entry, which
//! is the fence: a manifest PUT ordered before it makes its blobs
//! referenced and keeps them; one ordered after it finds the link gone and
//! is refused with MANIFEST_BLOB_UNKNOWN (apply checks references); a link
//! made after the cutoff (a blob pushed for a manifest still to come) is
//! younger than the grace period and stays. A blob no repository links any
//! more leaves the index in the same write: repair never copies it again,
//! a joining node is never given it, a mount of it is refused, and a late
//! copy (`AddHolders`) records nothing.
//!
//! **Files:** every node deletes the copies the index does not name it as
//! holding ([`Collector::sweep_local`]): collected blobs, copies orphaned by
//! a crash between write and link, copies placement moved away. A copy is
//! deleted only if it was last written or claimed more than `grace` ago,
//! checked under the store's placing lock, so a copy being pushed or
//! replicated (written, then claimed through Raft) is never taken. A node
//! that was down during a collection sweeps when it is back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Replicator;
use crate::meta::{Command, GcCandidate, MetaReader};
use crate::oci::Digest;

/// Blobs per page of the mark (and at most per Raft entry of the sweep).
const PAGE: usize = 256;
/// How long a member gets to sweep its blob disk when asked.
const SWEEP_WITHIN: Duration = Duration::from_secs(600);

/// Links one Raft entry of the sweep names at most (about 260 bytes each,
/// well under an entry's bound).
const LINKS_PER_ENTRY: usize = 4096;

#[derive(Debug, Clone)]
pub struct GcSettings {
    /// Nothing younger than this is collected: links not yet used by a
    /// manifest, and files not yet recorded in the index.
    pub grace: Duration,
    /// How often the leader collects and every node sweeps its files; None:
    /// only by command (`berth gc`).
    pub every: Option<Duration>,
}

/// What garbage collection did on this node, for `/metrics`.
#[derive(Debug, Default)]
pub struct GcReport {
    pub runs: AtomicU64,
    pub blobs_freed: AtomicU64,
    pub bytes_freed: AtomicU64,
    pub links_removed: AtomicU64,
    pub files_swept: AtomicU64,
    pub bytes_swept: AtomicU64,
    pub last_run_ms: AtomicU64,
}

/// What one collection found (or, dry, would find), per repository.
#[derive(Debug, Default)]
pub struct Summary {
    pub scanned: usize,
    /// Repository: (links removed, bytes of their blobs).
    pub repos: BTreeMap<String, (u64, u64)>,
    pub blobs_freed: u64,
    /// Bytes of the blobs freed, once each.
    pub bytes_freed: u64,
    /// Copies of them on disk across the cluster.
    pub copies_freed: u64,
}

impl Summary {
    fn add(&mut self, c: &GcCandidate, gone: bool) {
        for r in &c.unlink {
            let e = self.repos.entry(r.to_string()).or_default();
            e.0 += 1;
            e.1 += c.size;
        }
        if gone {
            self.blobs_freed += 1;
            self.bytes_freed += c.size;
            self.copies_freed += c.copies as u64;
        }
    }

    /// The report `berth gc` prints.
    pub fn render(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would free" } else { "freed" };
        let mut out = String::new();
        for (repo, (links, bytes)) in &self.repos {
            out.push_str(&format!("{repo}: {links} unused blob links, {bytes} bytes\n"));
        }
        out.push_str(&format!(
            "scanned {} blobs; {verb} {} blobs, {} bytes ({} copies on disk)",
            self.scanned, self.blobs_freed, self.bytes_freed, self.copies_freed
        ));
        out
    }
}

/// Files one node's sweep deleted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Swept {
    pub files: u64,
    pub bytes: u64,
    pub kept: u64,
}

impl Swept {
    fn render(&self) -> String {
        format!(
            "deleted {} unclaimed copies, {} bytes ({} unclaimed copies younger than the grace period kept)",
            self.files, self.bytes, self.kept
        )
    }
}

/// Owns garbage collection: the mark and sweep through Raft, and this
/// node's file sweep.
#[derive(Clone)]
pub struct Collector {
    r: Replicator,
    meta: MetaReader,
    settings: GcSettings,
    report: Arc<GcReport>,
    /// One collection at a time on this node (sweeps may overlap: each
    /// deletion is decided under the store's placing lock).
    running: Arc<tokio::sync::Mutex<()>>,
}

use crate::clock_ms as now_ms;

impl Collector {
    pub fn new(r: Replicator, meta: MetaReader, settings: GcSettings, report: Arc<GcReport>) -> Collector {
        Collector { r, meta, settings, report, running: Default::default() }
    }

    /// Mark and sweep the whole index; with `dry_run`, only mark. `say`
    /// hears progress on large stores.
    #[tracing::instrument(skip(self, say), fields(node = self.r.node_id()))]
    pub async fn collect(&self, dry_run: bool, say: &(dyn Fn(String) + Sync)) -> anyhow::Result<Summary> {
        let _one = self.running.lock().await;
        let started = Instant::now();
        self.r.barrier().await?;
        let cutoff = now_ms().saturating_sub(self.settings.grace.as_millis() as u64);
        let mut summary = Summary::default();
        let mut after: Option<Digest> = None;
        let mut last_said = Instant::now();
        loop {
            let page = self.meta.gc_page(after.as_ref(), PAGE, cutoff)?;
            summary.scanned += page.scanned;
            if !page.candidates.is_empty() {
                if dry_run {
                    for c in &page.candidates {
                        summary.add(c, c.freed);
                    }
                } else {
                    // Entries stay small whatever the fan-in: a base layer may
                    // be linked into thousands of repositories.
                    let mut blobs = Vec::new();
                    let mut links = 0;
                    for c in &page.candidates {
                        links += c.unlink.len() + 1;
                        blobs.push((c.digest.clone(), c.unlink.clone()));
                        if links >= LINKS_PER_ENTRY {
                            let batch = std::mem::take(&mut blobs);
                            self.r.propose(Command::Collect { cutoff_ms: cutoff, blobs: batch }).await?;
                            links = 0;
                        }
                    }
                    if !blobs.is_empty() {
                        self.r.propose(Command::Collect { cutoff_ms: cutoff, blobs }).await?;
                    }
                    // What the entry really did: apply checked everything again.
                    for c in &page.candidates {
                        let gone = self.meta.blob(&c.digest)?.is_none();
                        summary.add(c, gone);
                    }
                }
            }
            if last_said.elapsed() > Duration::from_secs(5) {
                last_said = Instant::now();
                say(format!("scanned {} blobs so far", summary.scanned));
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        if !dry_run {
            let rep = &self.report;
            rep.runs.fetch_add(1, Ordering::Relaxed);
            rep.blobs_freed.fetch_add(summary.blobs_freed, Ordering::Relaxed);
            rep.bytes_freed.fetch_add(summary.bytes_freed, Ordering::Relaxed);
            rep.links_removed.fetch_add(summary.repos.values().map(|v| v.0).sum(), Ordering::Relaxed);
            rep.last_run_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        tracing::info!(
            dry_run,
            scanned = summary.scanned,
            blobs = summary.blobs_freed,
            bytes = summary.bytes_freed,
            ms = started.elapsed().as_millis() as u64,
            "garbage collection"
        );
        Ok(summary)
    }

    /// Delete the local copies the index does not name this node as
    /// holding and that nothing wrote or claimed for `grace`. Walks the
    /// store a fan-out directory at a time, after a barrier (renewed every
    /// second), so a node that was away decides on what the cluster
    /// committed.
    #[tracing::instrument(skip(self), fields(node = self.r.node_id()))]
    pub async fn sweep_local(&self) -> anyhow::Result<Swept> {
        let me = self.r.node_id();
        let store = self.r.store().clone();
        let dirs = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.fan_out_dirs()).await??
        };
        let mut swept = Swept::default();
        let mut barrier_at: Option<Instant> = None;
        for dir in dirs {
            // Decide on what the cluster committed: a barrier first, and
            // again every second of a long walk.
            if barrier_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                self.r.barrier().await?;
                barrier_at = Some(Instant::now());
            }
            let blobs = {
                let (store, dir) = (store.clone(), dir.clone());
                tokio::task::spawn_blocking(move || store.blobs_in(&dir)).await??
            };
            for d in blobs {
                if self.meta.blob(&d)?.is_some_and(|info| info.holders.contains(&me)) {
                    continue;
                }
                match store.remove_unclaimed(&d, self.settings.grace).await? {
                    Some(bytes) => {
                        tracing::debug!(digest = %d, bytes, "swept a copy no one claims");
                        swept.files += 1;
                        swept.bytes += bytes;
                    }
                    None => swept.kept += 1,
                }
            }
        }
        self.report.files_swept.fetch_add(swept.files, Ordering::Relaxed);
        self.report.bytes_swept.fetch_add(swept.bytes, Ordering::Relaxed);
        if swept.files > 0 {
            tracing::info!(files = swept.files, bytes = swept.bytes, "swept unclaimed copies");
        }
        Ok(swept)
    }

    /// Ask every member to sweep its files (this node directly), one after
    /// the other; a line per member saying what it freed, or why not (a
    /// member that is down sweeps once it is back).
    pub async fn sweep_everywhere(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (id, addr) in self.r.member_addrs() {
            let swept = if id == self.r.node_id() {
                self.sweep_local().await.map(|s| s.render()).map_err(|e| e.to_string())
            } else {
                let asked = async {
                    let mut c = self.r.peers().admin(&addr).map_err(|e| e.to_string())?;
                    let mut req = tonic::Request::new(crate::cluster::pb::Empty {});
                    req.set_timeout(SWEEP_WITHIN);
                    c.sweep(req).await.map(|r| r.into_inner().message).map_err(|s| s.message().to_owned())
                };
                asked.await
            };
            lines.push(match swept {
                Ok(l) => format!("node {id}: {l}"),
                Err(e) => format!("node {id}: not swept now ({e}); it sweeps on its own schedule and at start"),
            });
        }
        lines
    }

    /// The schedule: every node sweeps its files once it has caught up
    /// after a start (what it held of blobs collected while it was away),
    /// then on every interval; the leader collects on every interval.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            _ = self.r.caught_up(Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = self.sweep_local().await {
            tracing::warn!(error = %e, "sweeping unclaimed copies");
        }
        let Some(every) = self.settings.every else { return };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if self.r.is_leader() {
                match self.collect(false, &|_| {}).await {
                    // Every member deletes what was collected now, not at its
                    // own next interval.
                    Ok(_) => {
                        for line in self.sweep_everywhere().await {
                            tracing::info!(%line, "scheduled sweep");
                        }
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "scheduled garbage collection"),
                }
            }
            if let Err(e) = self.sweep_local().await {
                tracing::warn!(error = %e, "sweeping unclaimed copies");
            }
        }
    }
}

#[tonic::async_trait]
impl crate::cluster::Collect for Collector {
    async fn collect(&self, dry_run: bool, progress: &crate::cluster::Progress) -> Result<String, String> {
        let summary =
            Collector::collect(self, dry_run, &|line| progress.note(line)).await.map_err(|e| e.to_string())?;
        Ok(summary.render(dry_run))
    }

    async fn sweep(&self) -> Result<String, String> {
        Ok(self.sweep_local().await.map_err(|e| e.to_string())?.render())
    }

    async fn sweep_everywhere(&self) -> Vec<String> {
        Collector::sweep_everywhere(self).await
    }
}
