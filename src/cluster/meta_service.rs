//! The leader's side of write forwarding and read index.

use openraft::error::{CheckIsLeaderError, RaftError};
use tonic::{Request, Response, Status};

use super::pb::{self, meta_server::Meta, Empty, ReadIndexReply, WriteReply, WriteRequest};
use super::Cluster;
use crate::meta::Proposal;

pub struct MetaService {
    pub cluster: Cluster,
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn client_write(&self, req: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let p: Proposal = pb::decode(&req.into_inner().proposal)?;
        match self.cluster.propose_as_leader(p).await {
            Ok(Some((outcome, log_index))) => {
                Ok(Response::new(WriteReply { not_leader: false, outcome: pb::encode(&outcome).into(), log_index }))
            }
            Ok(None) => Ok(Response::new(WriteReply { not_leader: true, ..Default::default() })),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn read_index(&self, _req: Request<Empty>) -> Result<Response<ReadIndexReply>, Status> {
        match self.cluster.raft.get_read_log_id().await {
            Ok((read, _)) => {
                let term = self.cluster.raft.metrics().borrow().current_term;
                let log_index = self.cluster.read_floor.apply(read.map(|l| l.index), term).unwrap_or(0);
                Ok(Response::new(ReadIndexReply { not_leader: false, log_index }))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Ok(Response::new(ReadIndexReply { not_leader: true, log_index: 0 }))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
