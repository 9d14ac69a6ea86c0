//! The background scrub: every copy this node holds is hashed again once
//! per `scrub_interval_secs`, at a bounded rate (`scrub_mib_per_sec`), a
//! page of the blob index at a time, from a checkpoint saved in the blob
//! directory. A restart resumes the pass where it stopped instead of
//! re-hashing the whole store before anything else, and a node first
//! started over a store (a fresh one, or one upgraded from a release that
//! re-hashed at start) trusts what it finds: every copy was hashed,
//! fsynced and verified before it was renamed into place, and the first
//! pass comes one interval later. A copy found corrupt or missing is
//! dropped from the index, which queues it for the leader's repair
//! (`repair.rs`); that restores it from another holder.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Replicator;
use crate::meta::MetaReader;
use crate::oci::Digest;

/// Blobs read from the index at a time.
const PAGE: usize = 256;
/// How often the checkpoint is saved during a pass.
const SAVE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ScrubSettings {
    /// A pass starts this long after the previous one started.
    pub every: Duration,
    /// Bytes read per second at most (0: unbounded).
    pub bytes_per_sec: u64,
}

/// Where the scrub is: kept in `scrub.json` next to the blobs, so it
/// survives restarts (JSON: a later release reads it whatever it adds).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Checkpoint {
    /// When the current (or last) pass started, ms since the epoch.
    pass_started_ms: u64,
    /// The last digest checked in the current pass; None: from the start.
    #[serde(default)]
    after: Option<String>,
    /// The pass went through the whole index.
    done: bool,
}

/// What this node's scrub did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ScrubReport {
    pub checked: AtomicU64,
    pub corrupt: AtomicU64,
    pub passes: AtomicU64,
}

use crate::clock_ms as now_ms;

fn load(path: &std::path::Path) -> Option<Checkpoint> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable scrub checkpoint: starting the schedule again");
            None
        }
    }
}

/// Write the checkpoint next to its final name and rename it into place:
/// a crash leaves the old one or the new one, never half of one.
fn save(path: &std::path::Path, c: &Checkpoint) {
    let tmp = path.with_extension("json.tmp");
    let res =
        std::fs::write(&tmp, serde_json::to_vec(c).expect("JSON encodes")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "saving the scrub checkpoint");
    }
}

/// Run the scrub until `stop`. `path` is the checkpoint file.
pub async fn run(
    r: Replicator,
    meta: MetaReader,
    s: ScrubSettings,
    path: PathBuf,
    report: Arc<ScrubReport>,
    mut stop: watch::Receiver<bool>,
) {
    // Which copies this node holds is known once it has caught up.
    tokio::select! {
        _ = r.caught_up(Duration::from_secs(60)) => {}
        _ = stop.changed() => return,
    }
    let mut cp = load(&path).unwrap_or_else(|| {
        let c = Checkpoint { pass_started_ms: now_ms(), after: None, done: true };
        save(&path, &c);
        c
    });
    let every_ms = s.every.as_millis() as u64;
    loop {
        if cp.done {
            let due = cp.pass_started_ms.saturating_add(every_ms);
            let now = now_ms();
            if now < due {
                let wait = Duration::from_millis((due - now).min(60_000));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            cp = Checkpoint { pass_started_ms: now, after: None, done: false };
            save(&path, &cp);
            tracing::info!("scrub pass starting");
        }
        let after: Option<Digest> = cp.after.as_deref().and_then(|d| d.parse().ok());
        let page = match meta.blobs_after(after.as_ref(), PAGE) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "scrub: reading the index");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
        };
        let mut saved = std::time::Instant::now();
        for (digest, info) in &page {
            if *stop.borrow() {
                save(&path, &cp);
                return;
            }
            if info.holders.contains(&r.node_id()) {
                match r.store().check_at(digest, s.bytes_per_sec).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Not there, or not hashing to its name: either way
                        // the index must stop naming this copy, and the
                        // leader's repair restores it.
                        if r.store().contains(digest).await {
                            tracing::warn!(%digest, "scrub: a local copy does not match its digest; dropping it");
                            report.corrupt.fetch_add(1, Ordering::Relaxed);
                            r.drop_corrupt(digest).await;
                        } else {
                            r.forget_missing(digest).await;
                        }
                    }
                    Err(e) => tracing::warn!(%digest, error = %e, "scrub: reading a local copy"),
                }
                report.checked.fetch_add(1, Ordering::Relaxed);
            }
            cp.after = Some(digest.to_string());
            if saved.elapsed() >= SAVE_EVERY {
                save(&path, &cp);
                saved = std::time::Instant::now();
            }
        }
        if page.len() < PAGE {
            cp.done = true;
            cp.after = None;
            report.passes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(checked = report.checked.load(Ordering::Relaxed), "scrub pass done");
        }
        save(&path, &cp);
    }
}
