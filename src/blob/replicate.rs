//! Replication: copying a blob to the nodes placement chooses until enough
//! of them hold it fsynced, and reading a blob this node lacks from a node
//! that has it (verifying every byte, caching by policy).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use super::placement::{rank, Candidate};
use super::transfer::{Transfer, TransferError};
use super::{BlobError, BlobStore};
use crate::cluster::Cluster;
use crate::meta::{Command, MetaReader};
use crate::oci::{Algorithm, Digest};
use crate::{NodeId, NodeInfo};

/// How long a copy that landed after a push was acknowledged waits for the
/// push's link before it is recorded (a proposal's deadline, with room).
const LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

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
    transfer: Transfer,
    pub(super) meta: MetaReader,
    policy: Arc<Policy>,
}

impl Replicator {
    pub fn new(cluster: Cluster, meta: MetaReader, transfer: Transfer, policy: Policy) -> Replicator {
        Replicator { cluster, transfer, meta, policy: Arc::new(policy) }
    }

    pub fn store(&self) -> &BlobStore {
        self.transfer.store()
    }

    /// Every member (voters and learners) with its address and region.
    pub(super) fn members(&self) -> Vec<(NodeId, NodeInfo, bool)> {
        let m = self.cluster.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        m.membership().nodes().map(|(id, n)| (*id, n.clone(), voters.contains(id))).collect()
    }

    /// Copies required before acknowledging, given the current membership.
    pub fn min_copies(&self) -> usize {
        self.min_copies_among(&self.members())
    }

    fn min_copies_among(&self, members: &[(NodeId, NodeInfo, bool)]) -> usize {
        let voters = members.iter().filter(|m| m.2).count().max(1);
        self.policy.min_copies.unwrap_or(2.min(voters)).clamp(1, members.len().max(1))
    }

    pub(super) fn satisfied(&self, holders: &[NodeId], members: &[(NodeId, NodeInfo, bool)]) -> bool {
        let live: Vec<&(NodeId, NodeInfo, bool)> = members.iter().filter(|m| holders.contains(&m.0)).collect();
        let regions: BTreeSet<&str> = live.iter().map(|m| m.1.region.as_str()).collect();
        let all_regions: BTreeSet<&str> = members.iter().map(|m| m.1.region.as_str()).collect();
        live.len() >= self.min_copies_among(members) && regions.len() >= self.policy.min_regions.min(all_regions.len())
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
        let members = self.members().len();
        let target = self.policy.replicas.max(self.min_copies()).min(members);
        self.copy(digest, size, holders, target).await
    }

    async fn copy(
        &self,
        digest: &Digest,
        size: u64,
        holders: &[NodeId],
        target: usize,
    ) -> Result<Vec<NodeId>, ReplicationError> {
        let members = self.members();
        let mut have: Vec<NodeId> = holders.iter().copied().filter(|h| members.iter().any(|m| m.0 == *h)).collect();
        if have.is_empty() {
            return Err(ReplicationError::NoHolder);
        }
        let candidates: Vec<Candidate> =
            members.iter().map(|(id, n, _)| Candidate { id: *id, region: n.region.clone() }).collect();
        let ranked = rank(digest, &candidates);
        let addr = |id: NodeId| members.iter().find(|m| m.0 == id).map(|m| m.1.grpc.clone());
        let sources: Vec<String> = ranked.iter().filter(|c| have.contains(&c.id)).filter_map(|c| addr(c.id)).collect();
        // Targets first, then the others as fallbacks for failed targets.
        let wanted: Vec<(NodeId, String)> =
            ranked.iter().filter(|c| !have.contains(&c.id)).filter_map(|c| Some((c.id, addr(c.id)?))).collect();
        let missing = target.saturating_sub(have.len());
        if missing == 0 || wanted.is_empty() {
            return self.checked(have, &members);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut launched = 0;
        let mut next = wanted.into_iter();
        let launch = |id: NodeId, addr: String| {
            let (transfer, tx, sources, d) = (self.transfer.clone(), tx.clone(), sources.clone(), digest.clone());
            tokio::spawn(async move {
                let res = transfer.ask_copy(&addr, &d, size, &sources).await;
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
        // Copies still on their way land in the background and are recorded
        // as they do; a blob left below its target (a target down or full)
        // is queued for the leader's repair, which retries it.
        let pending = launched - done;
        let short = have.len() < target;
        if pending > 0 || short {
            let (cluster, meta, d) = (self.cluster.clone(), self.meta.clone(), digest.clone());
            let mut holders = have.len();
            tokio::spawn(async move {
                // A push links the blob as `replicate` returns; what is
                // recorded before that finds no index entry and records
                // nothing (a collected blob stays collected).
                let indexed = || async {
                    let in_index = || meta.blob(&d).is_ok_and(|b| b.is_some());
                    let wait = cluster.raft.wait(Some(LINK_WAIT));
                    let ok = wait.metrics(|_| in_index(), "blob in the index").await.is_ok();
                    if !ok {
                        tracing::debug!(digest = %d, "blob never indexed; its copies are left to the sweep");
                    }
                    ok
                };
                for _ in 0..pending {
                    let Some((id, res)) = rx.recv().await else { break };
                    match res {
                        Ok(()) => {
                            holders += 1;
                            if !indexed().await {
                                return;
                            }
                            let cmd = Command::AddHolders { digest: d.clone(), size, holders: vec![id] };
                            if let Err(e) = cluster.propose(cmd).await {
                                tracing::warn!(digest = %d, error = %e, "recording a replica failed");
                            }
                        }
                        Err(e) => tracing::warn!(digest = %d, node = id, error = %e, "background replica copy failed"),
                    }
                }
                if holders < target && indexed().await {
                    // Every node applies it, so whichever leads queues it.
                    let cmd = Command::RemoveHolders { digest: d.clone(), holders: Vec::new() };
                    if let Err(e) = cluster.propose(cmd).await {
                        tracing::warn!(digest = %d, error = %e, "queueing a repair failed");
                    }
                }
            });
        }
        self.checked(have, &members)
    }

    fn checked(
        &self,
        have: Vec<NodeId>,
        members: &[(NodeId, NodeInfo, bool)],
    ) -> Result<Vec<NodeId>, ReplicationError> {
        if self.satisfied(&have, members) {
            Ok(have)
        } else {
            Err(ReplicationError::NotEnoughCopies { have: have.len(), need: self.min_copies() })
        }
    }

    /// Members for which `eligible` holds, in placement order for `digest`.
    fn ranked(&self, digest: &Digest, eligible: &(dyn Fn(&NodeId) -> bool + Sync)) -> Vec<NodeId> {
        let candidates: Vec<Candidate> = self
            .members()
            .into_iter()
            .filter(|m| eligible(&m.0))
            .map(|(id, n, _)| Candidate { id, region: n.region })
            .collect();
        rank(digest, &candidates).into_iter().map(|c| c.id).collect()
    }

    /// Copy `digest` from `sources` to its placement targets (the first
    /// `replicas` of `eligible` in rendezvous order) that `have` lacks; while fewer than `replicas` nodes would
    /// hold it, a target that cannot take its copy (its disk is short of
    /// space, or it failed) is replaced by the next node in placement order.
    /// Returns the nodes that received a copy.
    pub async fn place(
        &self,
        digest: &Digest,
        size: u64,
        sources: &[NodeId],
        have: &[NodeId],
        eligible: &(dyn Fn(&NodeId) -> bool + Sync),
    ) -> Vec<NodeId> {
        let ranked = self.ranked(digest, eligible);
        let want = self.policy.replicas.min(ranked.len());
        let (preferred, fallback) = ranked.split_at(want);
        let targets: Vec<NodeId> = preferred.iter().copied().filter(|n| !have.contains(n)).collect();
        if targets.is_empty() {
            return Vec::new();
        }
        if have.len() < want {
            tracing::info!(%digest, have = have.len(), ?targets, "placing copies");
        } else {
            // Enough copies already; this only moves the blob toward its
            // placement (a joined node's share), retried every round.
            tracing::debug!(%digest, have = have.len(), ?targets, "rebalancing copies");
        }
        let mut new = self.copy_to(digest, size, sources, &targets).await;
        let mut next = fallback.iter().filter(|n| !have.contains(n));
        while have.len() + new.len() < want {
            let Some(n) = next.next() else { break };
            new.extend(self.copy_to(digest, size, sources, &[*n]).await);
        }
        new
    }

    /// Ask each of `targets` to copy `digest` (`size` bytes) from
    /// `holders`; returns those that succeeded.
    pub async fn copy_to(&self, digest: &Digest, size: u64, holders: &[NodeId], targets: &[NodeId]) -> Vec<NodeId> {
        let members = self.members();
        let addr = |id: &NodeId| members.iter().find(|m| m.0 == *id).map(|m| m.1.grpc.clone());
        let sources: Vec<String> = holders.iter().filter_map(addr).collect();
        let pulls = targets.iter().filter_map(|t| Some((*t, addr(t)?))).map(|(id, a)| {
            let sources = sources.clone();
            async move { (id, self.transfer.ask_copy(&a, digest, size, &sources).await) }
        });
        let mut ok = Vec::new();
        for (id, res) in futures::future::join_all(pulls).await {
            match res {
                Ok(()) => ok.push(id),
                // A full disk refuses every round until space frees up; the
                // copy goes to the next node in placement order meanwhile.
                Err(TransferError::NoSpace) => tracing::debug!(%digest, node = id, "short of space; not copied there"),
                Err(e) => tracing::warn!(%digest, node = id, error = %e, "repair copy failed"),
            }
        }
        ok
    }

    pub fn node_id(&self) -> NodeId {
        self.cluster.id
    }

    pub fn replicas(&self) -> usize {
        self.policy.replicas
    }

    pub fn is_leader(&self) -> bool {
        self.cluster.raft.metrics().borrow().current_leader == Some(self.cluster.id)
    }

    /// Every member's id and gRPC address.
    pub fn member_addrs(&self) -> Vec<(NodeId, String)> {
        self.members().into_iter().map(|(id, n, _)| (id, n.grpc)).collect()
    }

    /// Whether the node at `addr` answers a status request within a second.
    pub async fn answers(&self, addr: &str) -> bool {
        self.cluster.peers.status(addr, std::time::Duration::from_secs(1)).await.is_ok()
    }

    /// Wait until this node has applied everything the cluster committed
    /// before now (a read barrier), retrying through elections; false if
    /// `within` passes first.
    pub async fn caught_up(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.cluster.read_barrier().await.is_ok() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        false
    }

    /// Clients of the other members (for garbage collection's sweeps).
    pub(super) fn peers(&self) -> &crate::cluster::Peers {
        &self.cluster.peers
    }

    /// Wait until this node has applied everything committed before now,
    /// whatever its read consistency (see [`Cluster::caught_up_barrier`]).
    pub async fn barrier(&self) -> Result<(), crate::cluster::ClusterError> {
        self.cluster.caught_up_barrier().await
    }

    pub async fn propose(&self, cmd: Command) -> Result<(), crate::cluster::ClusterError> {
        self.cluster.propose(cmd).await.map(|_| ())
    }

    /// Stream a local blob whole. A copy not yet verified by this process
    /// (written before a restart) is checked against its digest as it goes:
    /// one that rotted on disk ends the response with an error (the client
    /// retries), is deleted, and is dropped from the index so repair restores
    /// it and the next read goes to a good copy. The periodic scrub re-checks
    /// copies that were verified earlier.
    pub async fn read_local(
        &self,
        digest: &Digest,
        reader: super::BlobReader,
    ) -> std::io::Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let size = reader.size;
        let inner = Box::pin(reader.stream(0, size).await?);
        if self.store().is_verified(digest) {
            return Ok(futures::future::Either::Left(inner));
        }
        let me = self.clone();
        let d = digest.clone();
        let done = move |good: bool| {
            if good {
                me.store().mark_verified(&d);
            } else {
                tokio::spawn(async move { me.drop_corrupt(&d).await });
            }
        };
        Ok(futures::future::Either::Right(verified(inner, digest.clone(), size, None, Some(Box::new(done)))))
    }

    /// Forget, in the index, a local copy whose file is gone (the leader's
    /// repair then restores it from another holder).
    pub async fn forget_missing(&self, digest: &Digest) {
        tracing::warn!(%digest, "a local copy the index names is missing; forgetting it");
        let cmd = Command::RemoveHolders { digest: digest.clone(), holders: vec![self.cluster.id] };
        if let Err(e) = self.cluster.propose(cmd).await {
            tracing::warn!(%digest, error = %e, "recording the lost copy failed");
        }
    }

    /// Remove a local copy found corrupt and forget it in the index.
    pub async fn drop_corrupt(&self, digest: &Digest) {
        tracing::error!(%digest, "local copy is corrupt; removing it");
        if let Err(e) = self.store().remove(digest).await {
            tracing::warn!(%digest, error = %e, "removing corrupt copy");
        }
        let cmd = Command::RemoveHolders { digest: digest.clone(), holders: vec![self.cluster.id] };
        if let Err(e) = self.cluster.propose(cmd).await {
            tracing::warn!(%digest, error = %e, "recording the lost copy failed");
        }
    }

    /// Holders of `digest` other than this node, same region first.
    fn remote_holders(&self, digest: &Digest) -> Vec<String> {
        self.remote_holder_nodes(digest).into_iter().map(|n| n.grpc).collect()
    }

    /// Other members holding `digest`, nearest (same region) first.
    fn remote_holder_nodes(&self, digest: &Digest) -> Vec<NodeInfo> {
        let Ok(Some(info)) = self.meta.blob(digest) else {
            return Vec::new();
        };
        let members = self.members();
        let my_region = members.iter().find(|m| m.0 == self.cluster.id).map(|m| m.1.region.clone()).unwrap_or_default();
        let mut peers: Vec<&(NodeId, NodeInfo, bool)> =
            members.iter().filter(|m| m.0 != self.cluster.id && info.holders.contains(&m.0)).collect();
        peers.sort_by_key(|m| m.1.region != my_region);
        peers.into_iter().map(|m| m.1.clone()).collect()
    }

    /// Copy `digest` from a holder into the local store (verified), and
    /// record this node as a holder.
    pub async fn fetch_local(&self, digest: &Digest) -> Result<u64, ReplicationError> {
        let sources = self.remote_holders(digest);
        let size = self.transfer.copy_from(digest, &sources).await.map_err(|e| {
            tracing::debug!(%digest, error = %e, "no copy could be made here");
            ReplicationError::NoHolder
        })?;
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
        for node in self.remote_holder_nodes(digest) {
            let stream = match self.transfer.read(&node.grpc, digest, 0, false).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%digest, addr = %node.grpc, error = %e, "holder unavailable");
                    continue;
                }
            };
            if !self.policy.cache_on_read || self.store().short_of_space() {
                return Ok(verified(stream, digest.clone(), size, None, None));
            }
            // The copy kept here is written as the bytes pass and kept only
            // if the stream's own digest check passes: hashed once, not twice.
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
            let (verdict_tx, verdict) = tokio::sync::oneshot::channel();
            let (me, d) = (self.clone(), digest.clone());
            tokio::spawn(async move {
                let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) });
                match me.store().ingest_vouched(&d, Box::pin(body), verdict).await {
                    Ok(size) => me.record_local(&d, size).await,
                    Err(e) => tracing::debug!(digest = %d, error = %e, "read-through copy not kept"),
                }
            });
            let on_done: OnDone = Box::new(move |ok| {
                let _ = verdict_tx.send(ok);
            });
            return Ok(verified(stream, digest.clone(), size, Some(tx), Some(on_done)));
        }
        Err(ReplicationError::NoHolder)
    }
}

/// Hashes a stream's chunks on a blocking thread while the stream moves
/// on: the digest check then costs a core that would otherwise idle, not
/// time on the path to the client.
struct HashWorker {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    done: tokio::sync::oneshot::Receiver<Digest>,
}

impl HashWorker {
    fn start(alg: Algorithm) -> HashWorker {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut h = alg.hasher();
            while let Some(b) = rx.blocking_recv() {
                h.update(&b);
            }
            let _ = done_tx.send(h.finish());
        });
        HashWorker { tx: Some(tx), done }
    }

    async fn feed(&mut self, b: Bytes) {
        if let Some(tx) = &self.tx {
            if tx.send(b).await.is_err() {
                self.tx = None;
            }
        }
    }

    /// The digest of everything fed (None if the worker died).
    async fn finish(mut self) -> Option<Digest> {
        self.tx = None;
        self.done.await.ok()
    }
}

/// Called once at the end of a verified stream: true if the bytes matched.
type OnDone = Box<dyn FnOnce(bool) + Send>;

struct Verify<S> {
    inner: S,
    on_done: Option<OnDone>,
    hasher: Option<HashWorker>,
    expected: Digest,
    size: u64,
    seen: u64,
    cache: Option<tokio::sync::mpsc::Sender<std::io::Result<Bytes>>>,
    /// The newest chunk, released only when the next one (or a passing
    /// check at the end) arrives.
    pending: Option<Bytes>,
}

/// Pass `inner` through, hashing it; at its end, check digest and size and
/// turn a mismatch into an error (for the client and for the cache copy).
/// The last chunk is held back until the check passes, so a client that
/// relies on Content-Length never receives a complete body of bad bytes.
fn verified<S>(
    inner: S,
    expected: Digest,
    size: u64,
    cache: Option<tokio::sync::mpsc::Sender<std::io::Result<Bytes>>>,
    on_done: Option<OnDone>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
{
    use futures::StreamExt;
    let hasher = Some(HashWorker::start(expected.algorithm()));
    let state = Verify { inner, on_done, hasher, expected, size, seen: 0, cache, pending: None };
    futures::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        loop {
            match st.inner.next().await {
                Some(Ok(b)) => {
                    if b.is_empty() {
                        continue;
                    }
                    if let Some(h) = st.hasher.as_mut() {
                        h.feed(b.clone()).await;
                    }
                    st.seen += b.len() as u64;
                    if let Some(tx) = &st.cache {
                        if tx.send(Ok(b.clone())).await.is_err() {
                            st.cache = None;
                        }
                    }
                    if let Some(prev) = st.pending.replace(b) {
                        return Some((Ok(prev), Some(st)));
                    }
                }
                Some(Err(e)) => {
                    if let Some(tx) = &st.cache {
                        let _ = tx.send(Err(std::io::Error::other("source stream failed"))).await;
                    }
                    return Some((Err(e), None));
                }
                None => {
                    let got = match st.hasher.take() {
                        Some(h) => h.finish().await,
                        None => None,
                    };
                    if got.as_ref() == Some(&st.expected) && st.seen == st.size {
                        if let Some(f) = st.on_done.take() {
                            f(true);
                        }
                        return st.pending.take().map(|b| (Ok(b), None));
                    }
                    let msg = format!("bytes of {} do not match its digest", st.expected);
                    tracing::warn!("{msg}");
                    if let Some(f) = st.on_done.take() {
                        f(false);
                    }
                    if let Some(tx) = &st.cache {
                        let _ = tx.send(Err(std::io::Error::other(msg.clone()))).await;
                    }
                    return Some((Err(std::io::Error::other(msg)), None));
                }
            }
        }
    })
}
