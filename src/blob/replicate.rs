//! Replication: copying a blob to the nodes placement chooses until enough
//! of them hold it fsynced, and reading a blob this node lacks from a node
//! that has it (verifying every byte, caching by policy).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use super::placement::{rank, Candidate};
use super::{BlobError, BlobStore};
use crate::cluster::{blob_service, Cluster};
use crate::meta::{Command, MetaReader};
use crate::oci::{Digest, Hasher};
use crate::{NodeId, NodeInfo};

/// How many copies a blob gets and how many must exist before a push is
/// acknowledged.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Target number of copies (capped at the cluster size).
    pub replicas: usize,
    /// Copies fsynced before a push is acknowledged; None: min(2, voters).
    pub min_copies: Option<usize>,
    /// Regions those copies must span before the push is acknowledged.
    pub min_regions: usize,
    /// Keep a copy of blobs read through from peers.
    pub cache_on_read: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("only {have} of the {need} required copies could be made")]
    NotEnoughCopies { have: usize, need: usize },
    #[error("no node holds an intact copy")]
    NoHolder,
    #[error(transparent)]
    Blob(#[from] BlobError),
}

#[derive(Clone)]
pub struct Replicator {
    cluster: Cluster,
    meta: MetaReader,
    store: BlobStore,
    policy: Arc<Policy>,
}

impl Replicator {
    pub fn new(cluster: Cluster, meta: MetaReader, store: BlobStore, policy: Policy) -> Replicator {
        Replicator { cluster, meta, store, policy: Arc::new(policy) }
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Every member (voters and learners) with its address and region.
    fn members(&self) -> Vec<(NodeId, NodeInfo, bool)> {
        let m = self.cluster.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        m.membership().nodes().map(|(id, n)| (*id, n.clone(), voters.contains(id))).collect()
    }

    /// Copies required before acknowledging, given the current membership.
    pub fn min_copies(&self) -> usize {
        let members = self.members();
        let voters = members.iter().filter(|m| m.2).count().max(1);
        self.policy.min_copies.unwrap_or(2.min(voters)).clamp(1, members.len().max(1))
    }

    fn satisfied(&self, holders: &[NodeId], members: &[(NodeId, NodeInfo, bool)]) -> bool {
        let live: Vec<&(NodeId, NodeInfo, bool)> = members.iter().filter(|m| holders.contains(&m.0)).collect();
        let regions: BTreeSet<&str> = live.iter().map(|m| m.1.region.as_str()).collect();
        let all_regions: BTreeSet<&str> = members.iter().map(|m| m.1.region.as_str()).collect();
        live.len() >= self.min_copies() && regions.len() >= self.policy.min_regions.min(all_regions.len())
    }

    /// Whether `holders` meet the acknowledgement bar.
    pub fn durable(&self, holders: &[NodeId]) -> bool {
        self.satisfied(holders, &self.members())
    }

    /// Make `digest` durable: copy it from `holders` (which must include
    /// at least one node with an intact copy) to placement targets until the
    /// acknowledgement bar is met; return the holders at that point. The
    /// remaining copies up to the replica target continue in the background
    /// and are recorded through Raft as they land.
    pub async fn replicate(
        &self,
        digest: &Digest,
        size: u64,
        holders: &[NodeId],
    ) -> Result<Vec<NodeId>, ReplicationError> {
        let members = self.members();
        let mut have: Vec<NodeId> = holders.iter().copied().filter(|h| members.iter().any(|m| m.0 == *h)).collect();
        if have.is_empty() {
            return Err(ReplicationError::NoHolder);
        }
        let candidates: Vec<Candidate> =
            members.iter().map(|(id, n, _)| Candidate { id: *id, region: n.region.clone() }).collect();
        let ranked = rank(digest, &candidates);
        let target = self.policy.replicas.max(self.min_copies()).min(members.len());
        let sources: Vec<String> = ranked
            .iter()
            .filter(|c| have.contains(&c.id))
            .filter_map(|c| members.iter().find(|m| m.0 == c.id).map(|m| m.1.grpc.clone()))
            .collect();
        // Targets first, then the others as fallbacks for failed targets.
        let wanted: Vec<(NodeId, String)> = ranked
            .iter()
            .filter(|c| !have.contains(&c.id))
            .filter_map(|c| members.iter().find(|m| m.0 == c.id).map(|m| (m.0, m.1.grpc.clone())))
            .collect();
        let missing = target.saturating_sub(have.len());
        if missing == 0 || self.satisfied(&have, &members) && wanted.is_empty() {
            return Ok(have);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut launched = 0;
        let mut next = wanted.into_iter();
        let launch = |id: NodeId, addr: String| {
            let (peers, tx, sources, d) = (self.cluster.peers.clone(), tx.clone(), sources.clone(), digest.clone());
            tokio::spawn(async move {
                let res = pull(&peers, &addr, &d, &sources).await;
                let _ = tx.send((id, res));
            });
        };
        for (id, addr) in next.by_ref().take(missing) {
            launch(id, addr);
            launched += 1;
        }
        let mut done = 0;
        while done < launched {
            let Some((id, res)) = rx.recv().await else { break };
            done += 1;
            match res {
                Ok(()) => {
                    have.push(id);
                    if self.satisfied(&have, &members) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(%digest, node = id, error = %e, "replica copy failed");
                    if let Some((id, addr)) = next.next() {
                        launch(id, addr);
                        launched += 1;
                    }
                }
            }
        }
        if !self.satisfied(&have, &members) {
            return Err(ReplicationError::NotEnoughCopies { have: have.len(), need: self.min_copies() });
        }
        if done < launched {
            // The rest land in the background and are recorded as they do.
            let cluster = self.cluster.clone();
            let d = digest.clone();
            tokio::spawn(async move {
                for _ in done..launched {
                    let Some((id, res)) = rx.recv().await else { return };
                    if res.is_ok() {
                        let cmd = Command::AddHolders { digest: d.clone(), size, holders: vec![id] };
                        if let Err(e) = cluster.propose(cmd).await {
                            tracing::warn!(digest = %d, error = %e, "recording a replica failed");
                        }
                    }
                }
            });
        }
        Ok(have)
    }

    /// Holders of `digest` other than this node, same region first.
    fn remote_holders(&self, digest: &Digest) -> Vec<String> {
        let Ok(Some(info)) = self.meta.blob(digest) else {
            return Vec::new();
        };
        let members = self.members();
        let my_region = members.iter().find(|m| m.0 == self.cluster.id).map(|m| m.1.region.clone()).unwrap_or_default();
        let mut peers: Vec<&(NodeId, NodeInfo, bool)> =
            members.iter().filter(|m| m.0 != self.cluster.id && info.holders.contains(&m.0)).collect();
        peers.sort_by_key(|m| m.1.region != my_region);
        peers.into_iter().map(|m| m.1.grpc.clone()).collect()
    }

    /// Copy `digest` from a holder into the local store (verified), and
    /// record this node as a holder.
    pub async fn fetch_local(&self, digest: &Digest) -> Result<u64, ReplicationError> {
        let sources = self.remote_holders(digest);
        let size = blob_service::pull_from(&self.store, &self.cluster.peers, digest, &sources)
            .await
            .map_err(|_| ReplicationError::NoHolder)?;
        self.record_local(digest, size).await;
        Ok(size)
    }

    async fn record_local(&self, digest: &Digest, size: u64) {
        let cmd = Command::AddHolders { digest: digest.clone(), size, holders: vec![self.cluster.id] };
        if let Err(e) = self.cluster.propose(cmd).await {
            tracing::warn!(%digest, error = %e, "recording a cached copy failed");
        }
    }

    /// Stream a blob this node lacks from the nearest holder, verifying the
    /// digest as bytes pass (a mismatch ends the response with an error, so
    /// the client never accepts it) and, by policy, caching it locally.
    pub async fn read_through(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, ReplicationError> {
        for addr in self.remote_holders(digest) {
            let stream = match blob_service::fetch(&self.cluster.peers, &addr, digest, 0).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%digest, %addr, error = %e, "holder unavailable");
                    continue;
                }
            };
            let cache = if self.policy.cache_on_read {
                let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
                let (me, d) = (self.clone(), digest.clone());
                tokio::spawn(async move {
                    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) });
                    match me.store.ingest(&d, Box::pin(body)).await {
                        Ok(size) => me.record_local(&d, size).await,
                        Err(e) => tracing::debug!(digest = %d, error = %e, "read-through copy not kept"),
                    }
                });
                Some(tx)
            } else {
                None
            };
            return Ok(verified(stream, digest.clone(), size, cache));
        }
        Err(ReplicationError::NoHolder)
    }
}

async fn pull(peers: &crate::cluster::Peers, addr: &str, digest: &Digest, sources: &[String]) -> Result<(), String> {
    let mut client = peers.blobs(addr).map_err(|e| e.to_string())?;
    let req = crate::cluster::PullRequest { digest: digest.to_string(), sources: sources.to_vec() };
    client.pull(req).await.map(|_| ()).map_err(|e| e.message().to_owned())
}

struct Verify<S> {
    inner: S,
    hasher: Option<Hasher>,
    expected: Digest,
    size: u64,
    seen: u64,
    cache: Option<tokio::sync::mpsc::Sender<std::io::Result<Bytes>>>,
}

/// Pass `inner` through, hashing it; at its end, check digest and size and
/// turn a mismatch into an error (for the client and for the cache copy).
fn verified<S>(
    inner: S,
    expected: Digest,
    size: u64,
    cache: Option<tokio::sync::mpsc::Sender<std::io::Result<Bytes>>>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
{
    use futures::StreamExt;
    let hasher = Some(expected.algorithm().hasher());
    let state = Verify { inner, hasher, expected, size, seen: 0, cache };
    futures::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        match st.inner.next().await {
            Some(Ok(b)) => {
                if let Some(h) = st.hasher.as_mut() {
                    h.update(&b);
                }
                st.seen += b.len() as u64;
                if let Some(tx) = &st.cache {
                    if tx.send(Ok(b.clone())).await.is_err() {
                        st.cache = None;
                    }
                }
                Some((Ok(b), Some(st)))
            }
            Some(Err(e)) => {
                if let Some(tx) = &st.cache {
                    let _ = tx.send(Err(std::io::Error::other("peer stream failed"))).await;
                }
                Some((Err(e), None))
            }
            None => {
                let got = st.hasher.take().map(|h| h.finish());
                if got.as_ref() == Some(&st.expected) && st.seen == st.size {
                    None
                } else {
                    let msg = format!("peer sent bad bytes for {}", st.expected);
                    tracing::warn!("{msg}");
                    if let Some(tx) = &st.cache {
                        let _ = tx.send(Err(std::io::Error::other(msg.clone()))).await;
                    }
                    Some((Err(std::io::Error::other(msg)), None))
                }
            }
        }
    })
}
