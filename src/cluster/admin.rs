//! Membership administration: status, join and leave, on the server (any
//! member; followers forward to the leader) and for the command line.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::pb::{admin_server::Admin, AdminReply, Empty, JoinRequest, LeaveRequest, Member, NodeStatus};
use super::Cluster;
use crate::NodeInfo;

pub struct AdminService {
    pub cluster: Cluster,
}

fn status_of(cluster: &Cluster) -> NodeStatus {
    let m = cluster.raft.metrics().borrow().clone();
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
        })
        .collect();
    NodeStatus {
        id: m.id,
        state: format!("{:?}", m.state),
        term: m.current_term,
        leader: m.current_leader.unwrap_or(0),
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        members,
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

    /// Count remaining voters that answer, to refuse a leave that would
    /// leave the cluster without a working majority.
    async fn answering(&self, voters: &BTreeSet<u64>) -> usize {
        let m = self.cluster.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let mut alive = 0;
        for id in voters {
            if *id == self.cluster.id {
                alive += 1;
                continue;
            }
            let Some(node) = membership.get_node(id) else { continue };
            let Ok(mut c) = self.cluster.peers.admin(&node.grpc) else {
                continue;
            };
            let mut req = Request::new(Empty {});
            req.set_timeout(Duration::from_secs(1));
            if c.status(req).await.is_ok() {
                alive += 1;
            }
        }
        alive
    }
}

fn raft_status(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(e.to_string())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _req: Request<Empty>) -> Result<Response<NodeStatus>, Status> {
        Ok(Response::new(status_of(&self.cluster)))
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
        let node = NodeInfo { api: req.api.clone(), grpc: req.grpc.clone(), region: req.region.clone() };
        let raft = &self.cluster.raft;
        tracing::info!(id = req.id, grpc = %req.grpc, "adding learner");
        raft.add_learner(req.id, node, true).await.map_err(raft_status)?;
        if req.learner {
            return Ok(Response::new(AdminReply { message: format!("node {} joined as a learner", req.id) }));
        }
        tracing::info!(id = req.id, "promoting to voter");
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])), false)
            .await
            .map_err(raft_status)?;
        Ok(Response::new(AdminReply { message: format!("node {} joined as a voter", req.id) }))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<AdminReply>, Status> {
        let req = req.into_inner();
        if let Some(leader) = self.forward_target()? {
            let mut c = self.cluster.peers.admin(&leader).map_err(|e| Status::unavailable(e.to_string()))?;
            return c.leave(req).await;
        }
        let m = self.cluster.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.get_node(&req.id).is_none() {
            return Err(Status::not_found(format!("node {} is not a member", req.id)));
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let change = if voters.contains(&req.id) {
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
            ChangeMembers::RemoveVoters(BTreeSet::from([req.id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([req.id]))
        };
        tracing::info!(id = req.id, "removing member");
        self.cluster.raft.change_membership(change, false).await.map_err(raft_status)?;
        Ok(Response::new(AdminReply { message: format!("node {} left the cluster", req.id) }))
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
    pub applied_index: Option<u64>,
}

/// The operator's client: talks to any member's gRPC address.
pub struct ClusterAdmin {
    peers: super::Peers,
    node: String,
}

impl ClusterAdmin {
    pub fn new(node: &str) -> ClusterAdmin {
        ClusterAdmin { peers: super::Peers::default(), node: node.to_owned() }
    }

    async fn status_at(&self, addr: &str) -> Result<NodeStatus, Status> {
        let mut c = self.peers.admin(addr).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut req = Request::new(Empty {});
        req.set_timeout(Duration::from_secs(2));
        Ok(c.status(req).await?.into_inner())
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
                applied_index: s.as_ref().map(|s| s.applied_index),
            });
        }
        Ok(rows)
    }

    pub async fn join(&self, req: JoinRequest) -> Result<String, Status> {
        let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(c.join(req).await?.into_inner().message)
    }

    pub async fn leave(&self, id: u64, force: bool) -> Result<String, Status> {
        let mut c = self.peers.admin(&self.node).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(c.leave(LeaveRequest { id, force }).await?.into_inner().message)
    }
}
