//! The Raft node: proposing commands (forwarded to the leader from
//! followers), read barriers (read index through the leader), membership
//! administration, and the gRPC services between members. Does not parse
//! manifests.

mod admin;
mod batcher;
pub mod drain;
pub mod identity;
pub mod listener;
mod meta_service;
mod network;
pub(crate) mod pb;
mod peers;
mod read_index;
mod runtime;
mod service;
pub mod tls;

use std::time::{Duration, Instant};

pub use admin::{AdminService, ClusterAdmin, Collect, Evacuate, MemberStatus, Progress, Retain, DEFAULT_DRAIN};
pub use drain::Drain;
pub use identity::Identity;
pub use meta_service::MetaService;
pub use network::Network;
pub use pb::admin_server::AdminServer;
pub use pb::blobs_server::BlobsServer;
pub use pb::meta_server::MetaServer;
pub use pb::raft_rpc_server::RaftRpcServer;
pub use pb::{DrainRequest, Empty, JoinRequest, LeaveRequest, Member, NodeStatus, PullRequest, ReplaceRequest};
pub use peers::{Peers, KEEPALIVE, KEEPALIVE_TIMEOUT, MAX_MESSAGE, WINDOW};
pub use runtime::BerthRuntime;
pub use service::RaftService;

use crate::config::Consistency;
use crate::meta::{Command, Outcome, Proposal, RequestIds};
use crate::{NodeId, NodeInfo, Raft};

/// How long a write or read barrier may keep retrying (for example through
/// an election) before the client is told to come back later (503).
const DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is available, retry later")]
    NoLeader,
    #[error("timed out waiting for the cluster")]
    Timeout,
    #[error("too many writes are waiting on this node, retry later")]
    Busy,
    /// This node's data dir is not the member the cluster knows (see
    /// [`identity`]); the reason says what the operator does next.
    #[error("{0}")]
    Refused(String),
    #[error("raft: {0}")]
    Fatal(String),
}

/// Resolves once this node no longer sees `leader` as the leader (an
/// election started, or another node won one): a call to a leader that died
/// mid-call may hang on a connection nobody resets, and this ends the wait.
async fn leader_replaced(raft: &Raft, leader: NodeId) {
    let mut metrics = raft.metrics();
    if metrics.wait_for(|m| m.current_leader != Some(leader)).await.is_err() {
        // Raft shut down: nothing will change any more.
        std::future::pending::<()>().await;
    }
}

/// A handle on this node's Raft instance. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    pub peers: Peers,
    /// This data dir's incarnation and cluster id (see [`identity`]).
    pub identity: Identity,
    /// Set while this node is being drained before it leaves.
    pub drain: Drain,
    /// What this node knows to be committed and how large its log is (for
    /// `cluster status` and `/metrics`).
    pub log: crate::meta::LogStats,
    batcher: batcher::Batcher,
    ids: std::sync::Arc<RequestIds>,
    reads: read_index::ReadIndexer,
    /// See [`read_index::ReadFloor`].
    pub(crate) read_floor: read_index::ReadFloor,
    consistency: Consistency,
}

impl Cluster {
    pub fn new(
        identity: Identity,
        tls: Option<tls::ClusterTls>,
        raft: Raft,
        log: crate::meta::LogStats,
        log_at_start: (u64, u64),
        consistency: Consistency,
    ) -> Cluster {
        let id = identity.node();
        let batcher = batcher::Batcher::start(raft.clone());
        let peers = Peers::new(identity.clone(), tls);
        let floor = read_index::ReadFloor { index: log_at_start.0, term: log_at_start.1 };
        let reads = read_index::ReadIndexer::start(raft.clone(), peers.clone(), DEADLINE, floor);
        let ids = std::sync::Arc::new(RequestIds::new(id));
        Cluster {
            id,
            raft,
            peers,
            identity,
            drain: Drain::default(),
            log,
            batcher,
            ids,
            reads,
            read_floor: floor,
            consistency,
        }
    }

    /// Wait until this node has applied the log up to `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), ClusterError> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|_| ClusterError::Timeout)
    }

    /// Propose a command and wait until it is committed and applied here.
    /// On a follower the command is forwarded to the leader. Every attempt
    /// carries the same request id, so a retry after a lost answer (the
    /// first attempt may have been committed all the same) applies once.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ClusterError> {
        if let Some(why) = self.identity.problem() {
            return Err(ClusterError::Refused(why));
        }
        let deadline = Instant::now() + DEADLINE;
        let p = Proposal { id: self.ids.next(), cmd };
        loop {
            let leader_node = match self.batcher.submit(p.clone(), deadline).await {
                Ok((outcome, _)) => return Ok(outcome),
                Err(batcher::SubmitError::NotLeader(leader)) => leader,
                Err(batcher::SubmitError::Busy) => return Err(ClusterError::Busy),
                Err(batcher::SubmitError::Fatal(e)) => return Err(ClusterError::Fatal(e)),
            };
            if let Some((leader_id, leader)) = leader_node {
                // Give up on a leader this node sees replaced, and retry
                // (safely: the same request id).
                let answer = tokio::select! {
                    r = self.forward_write(&leader, &p) => Some(r),
                    () = leader_replaced(&self.raft, leader_id) => None,
                };
                match answer {
                    Some(Ok(Some((outcome, index)))) => {
                        self.wait_applied(index, deadline).await?;
                        return Ok(outcome);
                    }
                    Some(Ok(None)) => {}
                    Some(Err(e)) => tracing::debug!(error = %e, leader = %leader.grpc, "forwarding write failed"),
                    None => tracing::debug!(leader = %leader.grpc, "leader changed while forwarding; retrying"),
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ClusterError::NoLeader);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The leader's side of a forwarded write: propose through the batcher;
    /// `None` if this node is not the leader.
    pub async fn propose_as_leader(&self, p: Proposal) -> Result<Option<(Outcome, u64)>, ClusterError> {
        match self.batcher.submit(p, Instant::now() + DEADLINE).await {
            Ok(done) => Ok(Some(done)),
            Err(batcher::SubmitError::NotLeader(_)) => Ok(None),
            Err(batcher::SubmitError::Busy) => Err(ClusterError::Busy),
            Err(batcher::SubmitError::Fatal(e)) => Err(ClusterError::Fatal(e)),
        }
    }

    /// Send a command to the leader; `None` if it is not the leader any more.
    async fn forward_write(&self, leader: &NodeInfo, p: &Proposal) -> Result<Option<(Outcome, u64)>, tonic::Status> {
        let mut client = self.peers.meta(&leader.grpc).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(pb::WriteRequest { proposal: pb::encode(p).into() });
        req.set_timeout(DEADLINE);
        let reply = client.client_write(req).await?.into_inner();
        if reply.not_leader {
            return Ok(None);
        }
        Ok(Some((pb::decode(&reply.outcome)?, reply.log_index)))
    }

    /// Wait until the local state machine reflects every write acknowledged
    /// before this call (unless the operator chose local, possibly stale,
    /// reads). The leader confirms its leadership with a quorum; a follower
    /// asks the leader for that read index, then waits to apply it.
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        if let Some(why) = self.identity.problem() {
            return Err(ClusterError::Refused(why));
        }
        if self.consistency == Consistency::Local {
            return Ok(());
        }
        self.caught_up_barrier().await
    }

    /// Whether this node leads now (for work one node does for all).
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// [`Cluster::read_barrier`] whatever the read consistency: what must
    /// see every committed write (garbage collection deciding that no one
    /// claims a file) waits here even on a node that serves local reads.
    pub async fn caught_up_barrier(&self) -> Result<(), ClusterError> {
        if let Some(why) = self.identity.problem() {
            return Err(ClusterError::Refused(why));
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.reads.next_round().await {
                read_index::Round::Index(None) => return Ok(()),
                read_index::Round::Index(Some(index)) => return self.wait_applied(index, deadline).await,
                read_index::Round::Fatal(e) => return Err(ClusterError::Fatal(e)),
                read_index::Round::Retry => {}
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ClusterError::NoLeader);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Whether this node is a member that knows a leader and is not being
    /// drained: what a load balancer's health check needs to know before
    /// sending it clients.
    pub fn serving(&self) -> bool {
        if self.drain.is_draining() || self.identity.problem().is_some() {
            return false;
        }
        let m = self.raft.metrics().borrow().clone();
        m.current_leader.is_some() && m.membership_config.membership().get_node(&self.id).is_some()
    }

    /// The API address of member `id`, if it is one.
    pub fn member_api(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.api.clone())
    }

    /// This node's view of the leader, if it has one.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }
}
