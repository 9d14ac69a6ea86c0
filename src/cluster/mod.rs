//! The Raft node: proposing commands, read barriers, and the gRPC transport
//! between members. Does not parse manifests.

mod network;
mod pb;
mod service;

use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};

pub use network::Network;
pub use pb::raft_rpc_server::RaftRpcServer;
pub use service::RaftService;

use crate::config::Consistency;
use crate::meta::{Command, Outcome};
use crate::{NodeId, Raft};

/// How long a write or read barrier may wait (for example through an
/// election) before the client is told to retry.
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is available, retry later")]
    NoLeader,
    #[error("timed out waiting for the cluster")]
    Timeout,
    #[error("raft: {0}")]
    Fatal(String),
}

/// A handle on this node's Raft instance. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    consistency: Consistency,
}

impl Cluster {
    pub fn new(id: NodeId, raft: Raft, consistency: Consistency) -> Cluster {
        Cluster { id, raft, consistency }
    }

    /// Propose a command and wait until it is committed and applied here.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ClusterError> {
        let fut = self.raft.client_write(cmd);
        match tokio::time::timeout(DEADLINE, fut).await {
            Err(_) => Err(ClusterError::Timeout),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(ClusterError::NoLeader),
            Ok(Err(e)) => Err(ClusterError::Fatal(e.to_string())),
        }
    }

    /// Wait until the local state machine reflects every write acknowledged
    /// before this call (unless the operator chose local, possibly stale reads).
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        if self.consistency == Consistency::Local {
            return Ok(());
        }
        match tokio::time::timeout(DEADLINE, self.raft.ensure_linearizable()).await {
            Err(_) => Err(ClusterError::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(_))) => Err(ClusterError::NoLeader),
            Ok(Err(e)) => Err(ClusterError::Fatal(e.to_string())),
        }
    }
}
