//! The gRPC server side of the Raft transport.

use tonic::{Request, Response, Status};

use super::pb::{self, raft_rpc_server::RaftRpc, RaftReply, RaftRequest};
use crate::Raft;

pub struct RaftService {
    pub raft: Raft,
}

fn reply<T: serde::Serialize>(v: T) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply { data: pb::encode(&v).into(), error: String::new() }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = pb::decode(&req.into_inner().data)?;
        reply(self.raft.append_entries(r).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = pb::decode(&req.into_inner().data)?;
        reply(self.raft.vote(r).await)
    }

    async fn install_snapshot(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = pb::decode(&req.into_inner().data)?;
        reply(self.raft.install_snapshot(r).await)
    }
}
