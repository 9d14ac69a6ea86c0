//! Evacuation before a node leaves: every blob it holds gets its copies on
//! the remaining members first, so removing it never leaves a blob short
//! (or, with one copy configured, gone).

use std::time::{Duration, Instant};

use super::Replicator;
use crate::cluster::{Evacuate, Progress};
use crate::meta::Command;
use crate::NodeId;

/// How often a long evacuation reports how far it got.
const REPORT_EVERY: Duration = Duration::from_secs(2);

#[tonic::async_trait]
impl Evacuate for Replicator {
    async fn evacuate(&self, leaver: NodeId, p: &Progress) -> Result<(), String> {
        let all = self.meta.all_blobs().map_err(|e| format!("reading the blob index: {e}"))?;
        let held: Vec<_> = all.into_iter().filter(|(_, info)| info.holders.contains(&leaver)).collect();
        let remaining: Vec<_> = self.members().into_iter().filter(|m| m.0 != leaver).collect();
        p.say(format!("node {leaver} holds {} blobs; making sure the other members hold them", held.len())).await;
        let (mut copied, mut short) = (0usize, Vec::new());
        let mut last_report = Instant::now();
        for (i, (digest, info)) in held.iter().enumerate() {
            let mut rest: Vec<NodeId> =
                info.holders.iter().copied().filter(|h| *h != leaver && remaining.iter().any(|m| m.0 == *h)).collect();
            let new = self.place(digest, info.size, &info.holders, &rest, &|n| *n != leaver).await;
            if !new.is_empty() {
                copied += new.len();
                let cmd = Command::AddHolders { digest: digest.clone(), size: info.size, holders: new.clone() };
                self.propose(cmd).await.map_err(|e| format!("recording copies of {digest}: {e}"))?;
                rest.extend(new);
            }
            if !self.satisfied(&rest, &remaining) {
                short.push(digest.to_string());
            }
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                p.say(format!("blobs: {}/{} checked, {copied} copies made", i + 1, held.len())).await;
            }
        }
        if let Some(first) = short.first() {
            return Err(format!(
                "{} of node {leaver}'s blobs would have too few copies without it (first: {first})",
                short.len()
            ));
        }
        p.say(format!("blobs: {} checked, {copied} copies made; none depends on node {leaver}", held.len())).await;
        Ok(())
    }
}
