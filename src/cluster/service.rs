//! The gRPC server side of the Raft transport.

use tonic::{Request, Response, Status};

use super::identity::{self, Identity};
use super::pb::{self, raft_rpc_server::RaftRpc, RaftReply, RaftRequest};
use crate::Raft;

pub struct RaftService {
    pub raft: Raft,
    pub identity: Identity,
}

impl RaftService {
    /// Only messages from this node's cluster, meant for this data dir.
    fn admit(&self, req: &Request<RaftRequest>) -> Result<(), Status> {
        let me = self.identity.node();
        let incarnation = self.identity.incarnation();
        let member_here = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().get_node(&me).is_some_and(|n| n.incarnation == incarnation)
        };
        self.identity.admit_raft(identity::cluster_of(req.metadata())?, req.get_ref().to_incarnation, member_here)
    }
}

fn reply<T: serde::Serialize>(v: T) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply { payload: pb::encode(&v).into(), error: String::new() }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.admit(&req)?;
        let r = pb::decode(&req.into_inner().payload)?;
        reply(self.raft.append_entries(r).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.admit(&req)?;
        let r = pb::decode(&req.into_inner().payload)?;
        reply(self.raft.vote(r).await)
    }

    async fn install_snapshot(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.admit(&req)?;
        let r = pb::decode(&req.into_inner().payload)?;
        reply(self.raft.install_snapshot(r).await)
    }
}
