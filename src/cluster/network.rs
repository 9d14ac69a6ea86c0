//! The Raft network: one lazily connected gRPC client per peer.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::pb::{self, raft_rpc_client::RaftRpcClient, RaftRequest};
use crate::{NodeId, NodeInfo, TypeConfig};

/// Creates a [`PeerClient`] for each peer openraft replicates to.
#[derive(Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient { target, addr: node.grpc.clone(), client: None }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Option<RaftRpcClient<Channel>>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerClient {
    fn client(&mut self) -> Result<RaftRpcClient<Channel>, Unreachable> {
        if self.client.is_none() {
            let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
                .map_err(|e| Unreachable::new(&e))?
                .connect_timeout(std::time::Duration::from_secs(1))
                .tcp_nodelay(true)
                .initial_stream_window_size(super::peers::WINDOW)
                .initial_connection_window_size(super::peers::WINDOW * 2);
            self.client = Some(RaftRpcClient::new(ep.connect_lazy()).max_decoding_message_size(64 << 20));
        }
        Ok(self.client.clone().expect("client set above"))
    }

    async fn call<Req, Resp, E>(&mut self, rpc: Rpc, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let mut request = tonic::Request::new(RaftRequest { data: pb::encode(req).into() });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if status.code() == tonic::Code::Unavailable {
                    self.client = None;
                    return Err(RPCError::Unreachable(Unreachable::new(&status)));
                }
                return Err(RPCError::Network(NetworkError::new(&status)));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            pb::decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
