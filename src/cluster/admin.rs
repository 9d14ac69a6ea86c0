//! Membership administration: status, join and leave, on the server (any
//! member; followers forward to the leader) and for the command line.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::{
    admin_server::Admin, AdminReply, DrainRequest, Empty, GcRequest, JoinRequest, LeaveRequest, Member, NodeStatus,
    ReplaceRequest,
};
use super::Cluster;
use crate::{NodeId, NodeInfo};

/// How long a leaving node waits for its client requests by default.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(60);
/// How long a draining node must see no client request before it counts as
/// drained; also how long load balancers get to notice its failing health
/// check (haproxy here: two failed checks a second apart).
const QUIET: Duration = Duration::from_secs(3);

/// Moves the copies a leaving node holds onto the other members before it
/// goes. Implemented by the blob replicator: cluster/ knows nodes, not blobs.
#[tonic::async_trait]
pub trait Evacuate: Send + Sync + 'static {
    /// Copy what `node` holds until the remaining members alone meet the
    /// replication policy; an error says what would be left short.
    async fn evacuate(&self, node: NodeId, progress: &Progress) -> Result<(), String>;
}

/// Garbage collection, as the blob layer runs it (see `blob::gc`): cluster/
/// carries the command to every member, the collector does the work.
#[tonic::async_trait]
pub trait Collect: Send + Sync + 'static {
    /// Mark and (unless `dry_run`) sweep through Raft; the report.
    async fn collect(&self, dry_run: bool, progress: &Progress) -> Result<String, String>;
    /// Delete this node's copies no one claims; what was freed.
    async fn sweep(&self) -> Result<String, String>;
    /// Ask every member to sweep (this one included); a line per member.
    async fn sweep_everywhere(&self) -> Vec<String>;
}

/// Retention, as `policy` runs it: cluster/ carries the command.
#[tonic::async_trait]
pub trait Retain: Send + Sync + 'static {
    /// Apply the retention policies (or, with `dry_run`, say what they
    /// would remove); the summary.
    async fn retain(&self, dry_run: bool, progress: &Progress) -> Result<String, String>;
}

/// Where a long admin operation reports what it is doing, as it does it.
pub struct Progress(mpsc::Sender<Result<AdminReply, Status>>);

impl Progress {
    pub async fn say(&self, message: String) {
        tracing::info!(%message, "admin");
        let _ = self.0.send(Ok(AdminReply { message })).await;
    }

    /// [`Progress::say`] from code that cannot wait: dropped when the
    /// caller reads slower than the operation reports.
    pub fn note(&self, message: String) {
        tracing::info!(%message, "admin");
        let _ = self.0.try_send(Ok(AdminReply { message }));
    }
}

#[derive(Clone)]
pub struct AdminService {
    pub cluster: Cluster,
    pub evacuator: Arc<dyn Evacuate>,
    pub collector: Arc<dyn Collect>,
    pub retainer: Arc<dyn Retain>,
}

/// Stop taking clients and wait for the ones in flight; the answer says
/// how that went.
async fn drain_here(cluster: &Cluster, timeout: Duration) -> String {
    cluster.drain.set(true);
    if cluster.drain.wait_quiet(QUIET, timeout).await {
        format!("node {} drained: no client requests for {} s", cluster.id, QUIET.as_secs())
    } else {
        format!("node {} still had client requests after {} s; going on", cluster.id, timeout.as_secs())
    }
}

impl Cluster {
    /// This node's view of Raft and the membership, as `cluster status`
    /// and `/metrics` show it.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                api: n.api.clone(),
                grpc: n.grpc.clone(),
                region: n.region.clone(),
                voter: voters.contains(id),
                incarnation: n.incarnation,
            })
            .collect();
        let identity = &self.identity;
        NodeStatus {
            id: m.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            commit_index: self.log.committed(),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members,
            cluster_id: identity.cluster_label(),
            incarnation: identity.incarnation(),
            problem: identity.problem().unwrap_or_default(),
        }
    }
}

impl AdminService {
    /// The leader's address when this node is not the leader.
    fn forward_target(&self) -> Result<Option<String>, Status> {
        match self.cluster.leader() {
            Some((id, _)) if id == self.cluster.id => Ok(None),
            Some((_, n)) => Ok(Some(n.grpc)),
            None => Err(Status::unavailable("no leader is known; retry")),
        }
    }

    /// Ask the node at `addr` who it is: it must be node `id`, and belong
    /// to no cluster or to this one. Its answer, not the request, gives the
    /// incarnation the membership records for it.
    async fn identify(&self, addr: &str, id: NodeId) -> Result<NodeStatus, Status> {
        let st = self
            .cluster
            .peers
            .status(addr, Duration::from_secs(3))
            .await
            .map_err(|e| Status::unavailable(format!("the node at {addr} does not answer: {}", e.message())))?;
        if st.id != id {
            return Err(Status::invalid_argument(format!("the node at {addr} is node {}, not node {id}", st.id)));
        }
        let ours = self.cluster.identity.cluster_label();
        if !st.cluster_id.is_empty() && st.cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "the node at {addr} belongs to cluster {}, not this one ({ours})",
                st.cluster_id
            )));
        }
        Ok(st)
    }

    /// Count remaining voters that answer, to refuse a leave that would
    /// leave the cluster without a working majority.
    /// A voter counts only if it answers as the member the cluster knows:
    /// a node restarted on a wiped data dir answers, but cannot vote.
    async fn answering(&self, voters: &BTreeSet<u64>) -> usize {
        let m = self.cluster.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let mut alive = 0;
        for id in voters {
            if *id == self.cluster.id {
                alive += usize::from(self.cluster.identity.problem().is_none());
                continue;
            }
            let Some(node) = membership.get_node(id) else { continue };
            if let Ok(st) = self.cluster.peers.status(&node.grpc, Duration::from_secs(1)).await {
                alive += usize::from(st.problem.is_empty() && st.incarnation == node.incarnation);
            }
        }
        alive
    }

    /// Refuse a replace of `id` that no leader could commit: fewer than a
    /// majority of the other voters answer as themselves.
    async fn replace_needs_majority(&self, id: NodeId) -> Result<(), Status> {
        let membership = self.cluster.raft.metrics().borrow().membership_config.membership().clone();
        let remaining: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
        let alive = self.answering(&remaining).await;
        let majority = remaining.len() / 2 + 1;
        if alive < majority {
            return Err(Status::failed_precondition(format!(
                "only {alive} of the {} other voters answer as the members the cluster knows, and a majority \
                 needs {majority}: no membership change can be committed. Acknowledged writes may have been \
                 lost with the wiped voters; bring back a voter with its data dir first",
                remaining.len()
            )));
        }
        Ok(())
    }
}

/// A membership change refused because leadership moved while it was asked
/// for is worth retrying (UNAVAILABLE); anything else is the operator's to
/// fix (FAILED_PRECONDITION).
fn raft_status(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable(format!("leadership moved during the change: {e}; retry"))
        }
        e => Status::failed_precondition(e.to_string()),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _req: Request<Empty>) -> Result<Response<NodeStatus>, Status> {
        Ok(Response::new(self.cluster.status()))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<AdminReply>, Status> {
        let req = req.into_inner();
        if let Some(leader) = self.forward_target()? {
            let mut c = self.cluster.peers.admin(&leader).map_err(|e| Status::unavailable(e.to_string()))?;
            return c.join(req).await;
        }
        if req.id == 0 || req.grpc.is_empty() {
            return Err(Status::invalid_argument("a joining node needs an id >= 1 and a gRPC address"));
        }
        let joiner = self.identify(&req.grpc, req.id).await?;
        let known = self.cluster.raft.metrics().borrow().membership_config.membership().get_node(&req.id).cloned();
        if let Some(known) = known.filter(|k| k.incarnation != joiner.incarnation) {
            return Err(Status::failed_precondition(format!(
                "node {id} is a member with another data dir ({:016x}; the node at {} has {:016x}): \
                 if its data was lost, run `berth cluster replace --id {id}`",
                known.incarnation,
                req.grpc,
                joiner.incarnation,
                id = req.id
            )));
        }
        let node = NodeInfo {
            api: req.api.clone(),
            grpc: req.grpc.clone(),
            region: req.region.clone(),
            incarnation: joiner.incarnation,
        };
        let raft = &self.cluster.raft;
        tracing::info!(id = req.id, grpc = %req.grpc, "adding learner");
        raft.add_learner(req.id, node, true).await.map_err(raft_status)?;
        // A node that left earlier may still be drained: it serves again.
        if let Ok(mut c) = self.cluster.peers.admin(&req.grpc) {
            let mut r = Request::new(DrainRequest { timeout_secs: 0, undo: true });
            r.set_timeout(Duration::from_secs(2));
            let _ = c.drain(r).await;
        }
        if req.learner {
            return Ok(Response::new(AdminReply { message: format!("node {} joined as a learner", req.id) }));
        }
        tracing::info!(id = req.id, "promoting to voter");
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])), false)
            .await
            .map_err(raft_status)?;
        Ok(Response::new(AdminReply { message: format!("node {} joined as a voter", req.id) }))
    }

    type LeaveStream = Pin<Box<dyn Stream<Item = Result<AdminReply, Status>> + Send>>;
    type GcStream = Pin<Box<dyn Stream<Item = Result<AdminReply, Status>> + Send>>;

    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<Self::GcStream>, Status> {
        let dry_run = req.into_inner().dry_run;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let progress = Progress(tx);
            let report = match this.collector.collect(dry_run, &progress).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = progress.0.send(Err(Status::unavailable(format!("garbage collection: {e}")))).await;
                    return;
                }
            };
            progress.say(report).await;
            if !dry_run {
                // Every member deletes its copies of what was collected.
                for line in this.collector.sweep_everywhere().await {
                    progress.say(line).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    type RetentionStream = Pin<Box<dyn Stream<Item = Result<AdminReply, Status>> + Send>>;

    async fn retention(&self, req: Request<GcRequest>) -> Result<Response<Self::RetentionStream>, Status> {
        let dry_run = req.into_inner().dry_run;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let progress = Progress(tx);
            match this.retainer.retain(dry_run, &progress).await {
                Ok(report) => progress.say(report).await,
                Err(e) => {
                    let _ = progress.0.send(Err(Status::unavailable(format!("retention: {e}")))).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn sweep(&self, _req: Request<Empty>) -> Result<Response<AdminReply>, Status> {
        let message = self.collector.sweep().await.map_err(Status::unavailable)?;
        Ok(Response::new(AdminReply { message }))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<Self::LeaveStream>, Status> {
        let req = req.into_inner();
        if let Some(leader) = self.forward_target()? {
            let mut c = self.cluster.peers.admin(&leader).map_err(|e| Status::unavailable(e.to_string()))?;
            let stream = c.leave(req).await?.into_inner();
            return Ok(Response::new(stream.boxed()));
        }
        let (node, change) = self.plan_leave(&req).await?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let progress = Progress(tx);
            if let Err(e) = this.run_leave(&req, &node, change, &progress).await {
                let _ = progress.0.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn replace(&self, req: Request<ReplaceRequest>) -> Result<Response<AdminReply>, Status> {
        let req = req.into_inner();
        let target = match self.forward_target() {
            Ok(target) => target,
            Err(no_leader) => {
                // Say so at once when no leader can come back by itself.
                self.replace_needs_majority(req.id).await?;
                return Err(no_leader);
            }
        };
        if let Some(leader) = target {
            let mut c = self.cluster.peers.admin(&leader).map_err(|e| Status::unavailable(e.to_string()))?;
            return c.replace(req).await;
        }
        let message = self.replace_member(req.id).await?;
        Ok(Response::new(AdminReply { message }))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<AdminReply>, Status> {
        let req = req.into_inner();
        if req.undo {
            self.cluster.drain.set(false);
            return Ok(Response::new(AdminReply { message: format!("node {} serves clients again", self.cluster.id) }));
        }
        let timeout = if req.timeout_secs == 0 { DEFAULT_DRAIN } else { Duration::from_secs(req.timeout_secs) };
        Ok(Response::new(AdminReply { message: drain_here(&self.cluster, timeout).await }))
    }
}

impl AdminService {
    /// Check that `req` may go ahead; the leaver and the membership change.
    async fn plan_leave(&self, req: &LeaveRequest) -> Result<(NodeInfo, ChangeMembers<NodeId, NodeInfo>), Status> {
        let m = self.cluster.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let Some(node) = membership.get_node(&req.id).cloned() else {
            return Err(Status::not_found(format!("node {} is not a member", req.id)));
        };
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if !voters.contains(&req.id) {
            return Ok((node, ChangeMembers::RemoveNodes(BTreeSet::from([req.id]))));
        }
        let remaining: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != req.id).collect();
        if remaining.is_empty() {
            return Err(Status::failed_precondition("refusing to remove the last voter"));
        }
        let alive = self.answering(&remaining).await;
        let majority = remaining.len() / 2 + 1;
        if alive < majority && !req.force {
            return Err(Status::failed_precondition(format!(
                "refusing: only {alive} of the {} remaining voters answer, a majority needs {majority} \
                 (bring nodes back, or use --force)",
                remaining.len()
            )));
        }
        Ok((node, ChangeMembers::RemoveVoters(BTreeSet::from([req.id]))))
    }

    /// Drain the leaver, move its copies, then change the membership. A
    /// refused evacuation calls the drain off again.
    async fn run_leave(
        &self,
        req: &LeaveRequest,
        node: &NodeInfo,
        change: ChangeMembers<NodeId, NodeInfo>,
        p: &Progress,
    ) -> Result<(), Status> {
        let timeout = if req.drain_secs == 0 { DEFAULT_DRAIN } else { Duration::from_secs(req.drain_secs) };
        p.say(format!("draining node {}: its health check fails, waiting for its client requests", req.id)).await;
        match self.remote_drain(req.id, node, DrainRequest { timeout_secs: timeout.as_secs(), undo: false }).await {
            Ok(msg) => p.say(msg).await,
            Err(e) => p.say(format!("node {} could not be drained ({}); going on", req.id, e.message())).await,
        }
        if let Err(e) = self.evacuator.evacuate(req.id, p).await {
            if !req.force {
                let _ = self.remote_drain(req.id, node, DrainRequest { timeout_secs: 0, undo: true }).await;
                return Err(Status::failed_precondition(format!(
                    "{e} (node {} stays; use --force to leave anyway)",
                    req.id
                )));
            }
            p.say(format!("{e}; leaving anyway (--force)")).await;
        }
        tracing::info!(id = req.id, "removing member");
        self.cluster.raft.change_membership(change, false).await.map_err(raft_status)?;
        p.say(format!("node {} left the cluster", req.id)).await;
        Ok(())
    }

    /// The leader's side of `berth cluster replace`: member `id` lost its
    /// data dir and a fresh node runs at its address. A node without its
    /// log and vote must not count as the voter it was, so the old member
    /// is removed (which needs a working majority of the other voters),
    /// the fresh node is added as a learner under its own incarnation and,
    /// once caught up, promoted. Its blobs come back through repair: the
    /// fresh node finds the copies the index says it holds missing.
    async fn replace_member(&self, id: NodeId) -> Result<String, Status> {
        let membership = self.cluster.raft.metrics().borrow().membership_config.membership().clone();
        let Some(old) = membership.get_node(&id).cloned() else {
            return Err(Status::not_found(format!("node {id} is not a member")));
        };
        if id == self.cluster.id {
            return Err(Status::failed_precondition(format!("node {id} is the leader, running with its data")));
        }
        let fresh = self.identify(&old.grpc, id).await?;
        if fresh.incarnation == old.incarnation {
            return Err(Status::failed_precondition(format!(
                "node {id} at {} still has the data dir the cluster knows: nothing to replace",
                old.grpc
            )));
        }
        let voter = membership.voter_ids().any(|v| v == id);
        let removal = if voter {
            self.replace_needs_majority(id).await?;
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let raft = &self.cluster.raft;
        tracing::info!(id, old = %format!("{:016x}", old.incarnation), new = %format!("{:016x}", fresh.incarnation), "replacing member");
        raft.change_membership(removal, false).await.map_err(raft_status)?;
        let node = NodeInfo { incarnation: fresh.incarnation, ..old };
        raft.add_learner(id, node, true).await.map_err(raft_status)?;
        if !voter {
            return Ok(format!("node {id} replaced: a fresh learner, caught up"));
        }
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await.map_err(raft_status)?;
        Ok(format!("node {id} replaced: a fresh voter, caught up"))
    }

    async fn remote_drain(&self, id: NodeId, node: &NodeInfo, req: DrainRequest) -> Result<String, Status> {
        if id == self.cluster.id {
            return self.drain(Request::new(req)).await.map(|r| r.into_inner().message);
        }
        let mut c = self.cluster.peers.admin(&node.grpc).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut r = Request::new(req);
        r.set_timeout(Duration::from_secs(r.get_ref().timeout_secs) + Duration::from_secs(10));
        Ok(c.drain(r).await?.into_inner().message)
    }
}

/// One row of `berth cluster status`.
#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub id: u64,
    pub api: String,
    pub grpc: String,
    pub region: String,
    pub role: &'static str,
    pub answers: bool,
    pub state: Option<String>,
    pub term: Option<u64>,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The data dir the membership records for this member.
    pub incarnation: String,
    /// Why the node refuses to act as this member, if it does.
    pub problem: Option<String>,
}

/// The operator's client: talks to any member's gRPC address.
pub struct ClusterAdmin {
    peers: super::Peers,
    node: String,
}

impl ClusterAdmin {
    /// A client of the member at `node` (its gRPC address), over mutual
    /// TLS with `tls` (the operator's certificate), plain text without.
    pub fn new(node: &str, tls: Option<super::tls::ClusterTls>) -> ClusterAdmin {
        ClusterAdmin { peers: super::Peers::new(super::Identity::outsider(), tls), node: node.to_owned() }
    }

    /// A client that calls through a member's own channels (its TLS and
    /// cluster id): what a node uses to ask its peers.
    pub fn with_peers(node: &str, peers: super::Peers) -> ClusterAdmin {
        ClusterAdmin { peers, node: node.to_owned() }
    }

    async fn status_at(&self, addr: &str) -> Result<NodeStatus, Status> {
        self.peers.status(addr, Duration::from_secs(2)).await
    }

    /// The contacted node's own status.
    pub async fn node_status(&self) -> Result<NodeStatus, Status> {
        self.status_at(&self.node).await
    }

    /// The contacted node's view of the membership, with each member asked
    /// for its own state.
    pub async fn status(&self) -> Result<Vec<MemberStatus>, Status> {
        let view = self.status_at(&self.node).await?;
        let mut rows = Vec::new();
        for m in view.members {
            let s = self.status_at(&m.grpc).await.ok();
            rows.push(MemberStatus {
                id: m.id,
                api: m.api,
                grpc: m.grpc,
                region: m.region,
                role: if m.voter { "voter" } else { "learner" },
                answers: s.is_some(),
                state: s.as_ref().map(|s| s.state.clone()),
                term: s.as_ref().map(|s| s.term),
                leader: s.as_ref().and_then(|s| (s.leader != 0).then_some(s.leader)),
                last_log_index: s.as_ref().map(|s| s.last_log_index),
                commit_index: s.as_ref().map(|s| s.commit_index),
                applied_index: s.as_ref().map(|s| s.applied_index),
                incarnation: format!("{:016x}", m.incarnation),
                problem: s.as_ref().map(|s| s.problem.clone()).filter(|p| !p.is_empty()),
            });
        }
        Ok(rows)
    }

    /// Join `req.id`; retried while the cluster has no settled leader
    /// (an election, or leadership moving mid-change), up to [`RETRY_FOR`].
    pub async fn join(&self, req: JoinRequest) -> Result<String, Status> {
        retry_unavailable(|| async {
            let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(c.join(req.clone()).await?.into_inner().message)
        })
        .await
    }

    /// Replace member `id`, whose data dir was lost, by the fresh node now
    /// at its address (see the server's `replace_member`).
    pub async fn replace(&self, id: NodeId) -> Result<String, Status> {
        retry_unavailable(|| async {
            let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(c.replace(ReplaceRequest { id }).await?.into_inner().message)
        })
        .await
    }

    /// Remove a node; `progress` sees each step as the leader reports it.
    /// Run garbage collection on the contacted member; `progress` hears each
    /// line of its report.
    pub async fn gc(&self, dry_run: bool, mut progress: impl FnMut(String)) -> Result<(), Status> {
        let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut lines = c.gc(GcRequest { dry_run }).await?.into_inner();
        while let Some(line) = lines.message().await? {
            progress(line.message);
        }
        Ok(())
    }

    /// Apply the retention policies on the contacted member; `progress`
    /// hears each repository's result.
    pub async fn retention(&self, dry_run: bool, mut progress: impl FnMut(String)) -> Result<(), Status> {
        let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut lines = c.retention(GcRequest { dry_run }).await?.into_inner();
        while let Some(line) = lines.message().await? {
            progress(line.message);
        }
        Ok(())
    }

    /// Ask the contacted member to delete its copies no one claims (what
    /// `gc` asks of every member after a collection); what it freed.
    pub async fn sweep(&self) -> Result<String, Status> {
        let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(c.sweep(Empty {}).await?.into_inner().message)
    }

    pub async fn leave(&self, req: LeaveRequest, mut progress: impl FnMut(String)) -> Result<(), Status> {
        let mut steps = retry_unavailable(|| async {
            let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(c.leave(req).await?.into_inner())
        })
        .await?;
        while let Some(step) = steps.message().await? {
            progress(step.message);
        }
        Ok(())
    }
}

/// How long the command line keeps asking while no leader can take a
/// membership change.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Run `call` again while it fails with UNAVAILABLE (no leader known, or
/// leadership moved), for at most [`RETRY_FOR`]; other errors return at once.
async fn retry_unavailable<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match call().await {
            Err(e) if e.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e.message(), "membership change not taken yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}
