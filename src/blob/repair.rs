//! Self-healing. Every node checks that the copies the index says it holds
//! exist (and, on the scrub interval, that they still hash to their digest).
//! The leader additionally finds blobs below their replica target (a holder
//! left, died more than `dead_after` ago, or lost its copy) and copies them
//! from a surviving holder to new placements, recording holders through Raft.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Replicator;
use crate::meta::{Command, MetaReader};
use crate::NodeId;

#[derive(Debug, Clone)]
pub struct RepairSettings {
    pub interval: Duration,
    pub scrub_every: Duration,
    pub dead_after: Duration,
}

pub async fn run(r: Replicator, meta: MetaReader, s: RepairSettings, mut stop: watch::Receiver<bool>) {
    let mut last_seen: HashMap<NodeId, Instant> = HashMap::new();
    let mut last_scrub = Instant::now();
    let started = Instant::now();
    // The first round runs at once and re-hashes every copy: a node that
    // was down (or whose disk was swapped) reports what it lost or what
    // rotted before anyone reads it.
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
        let scrub = first || last_scrub.elapsed() >= s.scrub_every;
        if scrub {
            last_scrub = Instant::now();
        }
        match check_local(&r, &meta, scrub).await {
            Ok(c) if first || c.missing + c.corrupt > 0 => tracing::info!(
                held = c.held,
                missing = c.missing,
                corrupt = c.corrupt,
                hashed = scrub,
                "checked local copies against the index"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checking local copies"),
        }
        first = false;
        if r.is_leader() {
            probe(&r, &mut last_seen).await;
            // Right after start every peer looks unseen: give them time.
            let grace = started.elapsed() < s.dead_after;
            if let Err(e) = repair(&r, &meta, &last_seen, s.dead_after, grace).await {
                tracing::warn!(error = %e, "repair round");
            }
        }
    }
}

/// What a check of the local copies found.
#[derive(Debug, Default)]
struct LocalCheck {
    held: usize,
    missing: usize,
    corrupt: usize,
}

/// Copies this node is recorded as holding must exist (and with `scrub`,
/// hash correctly); a missing or corrupt one is dropped from the index, so
/// the leader's repair restores it from another holder.
async fn check_local(r: &Replicator, meta: &MetaReader, scrub: bool) -> anyhow::Result<LocalCheck> {
    let mut c = LocalCheck::default();
    for (digest, info) in meta.all_blobs()? {
        if !info.holders.contains(&r.node_id()) {
            continue;
        }
        c.held += 1;
        let present = r.store().contains(&digest).await;
        let ok = present && (!scrub || r.store().check(&digest).await?);
        if !ok {
            if present {
                c.corrupt += 1;
            } else {
                c.missing += 1;
            }
            r.drop_corrupt(&digest).await;
        }
    }
    Ok(c)
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
) -> anyhow::Result<()> {
    let members: Vec<NodeId> = r.member_addrs().into_iter().map(|m| m.0).collect();
    let alive = |id: &NodeId| grace || last_seen.get(id).is_some_and(|t| t.elapsed() < dead_after);
    for (digest, info) in meta.all_blobs()? {
        let gone: Vec<NodeId> = info.holders.iter().copied().filter(|h| !members.contains(h)).collect();
        if !gone.is_empty() {
            r.propose(Command::RemoveHolders { digest: digest.clone(), holders: gone }).await?;
        }
        let live: Vec<NodeId> = info.holders.iter().copied().filter(|h| members.contains(h) && alive(h)).collect();
        if live.is_empty() {
            continue;
        }
        // Where placement wants the blob now (a joining node gets its share,
        // a dead or departed holder is replaced).
        let new = r.place(&digest, info.size, &live, &live, &alive).await;
        if !new.is_empty() {
            r.propose(Command::AddHolders { digest: digest.clone(), size: info.size, holders: new }).await?;
        }
    }
    Ok(())
}
