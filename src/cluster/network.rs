//! The Raft network: one lazily connected gRPC client per peer.

use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{EntryPayload, OptionalSend, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::pb::{self, raft_rpc_client::RaftRpcClient, RaftRequest};
use super::peers::{PeerChannel, Peers};
use super::runtime;
use crate::meta::SnapshotData;
use crate::{NodeId, NodeInfo, TypeConfig};

/// Creates a [`PeerClient`] for each peer openraft replicates to.
#[derive(Clone)]
pub struct Network {
    peers: Peers,
    append_deadline: Duration,
}

impl Network {
    /// Raft's peers, reached through `peers` (its TLS and cluster id). An
    /// AppendEntries carrying entries may take `append_deadline`, the
    /// shortest election timeout (see [`PeerClient::append_entries`]).
    pub fn new(peers: Peers, append_deadline: Duration) -> Network {
        Network { peers, append_deadline }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            target,
            addr: node.grpc.clone(),
            incarnation: node.incarnation,
            peers: self.peers.clone(),
            client: None,
            append_deadline: self.append_deadline,
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// The data dir the membership records for the target: a wiped or
    /// replaced node refuses messages meant for its predecessor.
    incarnation: u64,
    peers: Peers,
    client: Option<RaftRpcClient<PeerChannel>>,
    /// What an AppendEntries carrying entries may take in all.
    append_deadline: Duration,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerClient {
    fn client(&mut self) -> Result<RaftRpcClient<PeerChannel>, Unreachable> {
        if self.client.is_none() {
            self.client = Some(self.peers.raft(&self.addr).map_err(|e| Unreachable::new(&e))?);
        }
        Ok(self.client.clone().expect("client set above"))
    }

    async fn call<Req, Resp, E>(&mut self, rpc: Rpc, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        self.call_with(rpc, req, option, Duration::ZERO).await
    }

    /// [`Self::call`], granting `more` time beyond what the payload needs
    /// (for a reply that waits on work at the peer).
    async fn call_with<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
        more: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let data = pb::encode(req);
        // openraft's deadline is one heartbeat whatever the payload; a
        // large one gets the time its bytes need (see `runtime`).
        let extra = transfer_allowance(data.len()) + more;
        runtime::stretch_deadline(extra);
        let mut request = tonic::Request::new(RaftRequest { payload: data.into(), to_incarnation: self.incarnation });
        request.set_timeout(option.hard_ttl() + extra);
        let reply = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                match status.code() {
                    tonic::Code::Unavailable => self.client = None,
                    // The peer refuses to act as this member (its data dir
                    // was wiped, or it is of another cluster): openraft
                    // retries network errors at once, unreachable peers
                    // after a backoff, and this will not change soon.
                    tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied => {}
                    _ => return Err(RPCError::Network(NetworkError::new(&status))),
                }
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            pb::decode(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// AppendEntries carry at most this many bytes of entries, unless one
/// entry alone is larger (it still goes, alone): a burst of large manifests
/// is replicated a few at a time, never as one message of hundreds of MiB.
const MAX_APPEND_BYTES: usize = 8 << 20;

/// The slowest transfer rate a healthy peer link is allowed, for deadlines.
const MIN_RATE: usize = 8 << 20;

/// Time beyond openraft's deadline that `bytes` of payload may take: none
/// for heartbeats and small appends, so a dead peer is noticed as quickly.
fn transfer_allowance(bytes: usize) -> Duration {
    if bytes < 256 << 10 {
        return Duration::ZERO;
    }
    Duration::from_millis(500) + Duration::from_secs_f64(bytes as f64 / MIN_RATE as f64)
}

fn entry_bytes(e: &openraft::Entry<TypeConfig>) -> usize {
    match &e.payload {
        EntryPayload::Normal(batch) => batch.approx_bytes(),
        _ => 1024,
    }
}

/// How many leading entries fit in [`MAX_APPEND_BYTES`] (at least one), if
/// not all of them do.
fn entries_that_fit(entries: &[openraft::Entry<TypeConfig>]) -> Option<usize> {
    let mut total = 0;
    for (i, e) in entries.iter().enumerate() {
        total += entry_bytes(e);
        if total > MAX_APPEND_BYTES {
            return Some(i.max(1));
        }
    }
    None
}

/// Bytes of snapshot per chunk when openraft does not say (it always does).
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Largest snapshot chunk sent, whatever openraft's setting: well within a
/// gRPC message.
const MAX_SNAPSHOT_CHUNK: usize = 8 << 20;
/// Attempts at one snapshot chunk before the transfer is given up (openraft
/// starts a new one later).
const CHUNK_ATTEMPTS: u32 = 4;

/// Time the last chunk of a `total`-byte snapshot may take beyond its own
/// transfer: its reply comes once the peer has installed the whole
/// snapshot (written its tables, ingested them, rebuilt its indexes).
fn install_allowance(total: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs_f64(total as f64 / (16u64 << 20) as f64)
}

impl PeerClient {
    /// Send one snapshot chunk, again on a transient failure, at most
    /// [`CHUNK_ATTEMPTS`] times.
    async fn send_chunk(
        &mut self,
        req: &InstallSnapshotRequest<TypeConfig>,
        option: &RPCOption,
        more: Duration,
    ) -> Result<InstallSnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent: RpcResult<_, InstallSnapshotError> = self.call_with(Rpc::Snapshot, req, option, more).await;
            let err = match sent {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            tracing::warn!(peer = self.target, offset = req.offset, attempt, error = %err, "snapshot chunk failed");
            let err: StreamingError<TypeConfig, Fatal<NodeId>> = match err {
                RPCError::RemoteError(RemoteError { target, target_node, source: RaftError::Fatal(f) }) => {
                    return Err(RemoteError { target, target_node, source: f }.into())
                }
                // The peer lost the transfer's start (it restarted, or took
                // another snapshot meanwhile): this one cannot resume.
                RPCError::RemoteError(e) => return Err(NetworkError::new(&e).into()),
                RPCError::PayloadTooLarge(e) => return Err(NetworkError::new(&e).into()),
                RPCError::Timeout(e) => e.into(),
                RPCError::Unreachable(e) => e.into(),
                RPCError::Network(e) => e.into(),
            };
            if attempt >= CHUNK_ATTEMPTS {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    /// Stream the snapshot, a checkpoint, as it is read
    /// ([`crate::meta::Checkpoint::stream`]): nothing is copied to disk or
    /// held whole in memory, and the reading runs at most two chunks ahead
    /// of the wire. Each chunk has its deadline; the last one's reply waits
    /// for the peer's install.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let meta = snapshot.meta;
        let read_err = |e: std::io::Error| -> StreamingError<TypeConfig, Fatal<NodeId>> {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e)).into()
        };
        let SnapshotData::Checkpoint(checkpoint) = *snapshot.snapshot else {
            return Err(read_err(std::io::Error::other("only a checkpoint is sent")));
        };
        let chunk = option.snapshot_chunk_size().unwrap_or(SNAPSHOT_CHUNK).clamp(64 << 10, MAX_SNAPSHOT_CHUNK);
        let mut chunks = checkpoint.stream(chunk);
        let mut cancel = std::pin::pin!(cancel);
        let mut offset = 0u64;
        let mut next = chunks.recv().await;
        loop {
            let data = match next {
                Some(Ok(data)) => data,
                Some(Err(e)) => return Err(read_err(e)),
                None => return Err(read_err(std::io::Error::other("the snapshot stream ended before its header"))),
            };
            // One chunk of lookahead tells whether this one is the last.
            next = tokio::select! {
                closed = &mut cancel => return Err(closed.into()),
                n = chunks.recv() => n,
            };
            let done = next.is_none();
            let len = data.len() as u64;
            let more = if done { install_allowance(offset + len) } else { Duration::ZERO };
            let req = InstallSnapshotRequest { vote, meta: meta.clone(), offset, data, done };
            let resp = tokio::select! {
                closed = &mut cancel => return Err(closed.into()),
                r = self.send_chunk(&req, &option, more) => r?,
            };
            if resp.vote > vote || done {
                if done {
                    tracing::info!(peer = self.target, bytes = offset + len, snapshot = %meta.snapshot_id, "snapshot sent");
                }
                return Ok(SnapshotResponse::new(resp.vote));
            }
            offset += len;
        }
    }

    /// openraft gives every AppendEntries one heartbeat interval. One that
    /// carries entries is answered once the peer has them fsynced, and on a
    /// busy node (requests, flushes and compactions sharing the cores and
    /// the disk) that took longer than a heartbeat often: in one scale bench
    /// run 80 appends timed out at 50 ms within 90 s, each sent again in
    /// full, and a commit waited for the second round. Such
    /// an append may take up to the shortest election timeout, beyond which
    /// a peer is no better than one that is gone. That is still less than
    /// a follower waits before it campaigns (openraft's leader lease, the
    /// longest election timeout, plus an election timeout), so a slow
    /// append never starts an election. Heartbeats keep their deadline: a
    /// dead or cut-off peer is noticed as soon as before.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if let Some(fit) = entries_that_fit(&rpc.entries).filter(|n| *n < rpc.entries.len()) {
            // openraft resends with at most `fit` entries for a while.
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit as u64)));
        }
        let grace = if rpc.entries.is_empty() {
            Duration::ZERO
        } else {
            self.append_deadline.saturating_sub(option.hard_ttl())
        };
        self.call_with(Rpc::Append, &rpc, &option, grace).await
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

#[cfg(test)]
mod tests {
    use openraft::{AsyncRuntime, CommittedLeaderId, Entry, LogId};
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::cluster::pb::raft_rpc_server::{RaftRpc, RaftRpcServer};
    use crate::cluster::pb::RaftReply;
    use crate::cluster::{BerthRuntime, Identity};

    /// A peer whose appends succeed after `delay`: one busy fsyncing.
    struct SlowPeer {
        delay: Duration,
    }

    #[tonic::async_trait]
    impl RaftRpc for SlowPeer {
        async fn append_entries(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            tokio::time::sleep(self.delay).await;
            let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(AppendEntriesResponse::Success);
            Ok(Response::new(RaftReply { payload: pb::encode(&ok).into(), error: String::new() }))
        }

        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("vote"))
        }

        async fn install_snapshot(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("install_snapshot"))
        }
    }

    fn append(entries: Vec<Entry<TypeConfig>>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: Vote::new_committed(1, 1), prev_log_id: None, leader_commit: None, entries }
    }

    /// An append carrying entries to a peer that takes four heartbeats to
    /// answer succeeds under openraft's own deadline (one heartbeat, as its
    /// replication sets it) when the shortest election timeout is six
    /// heartbeats; a heartbeat to that peer still times out.
    #[tokio::test]
    async fn entries_outlast_a_heartbeat_and_heartbeats_do_not() {
        let heartbeat = Duration::from_millis(50);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(RaftRpcServer::new(SlowPeer { delay: heartbeat * 4 }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let node = NodeInfo { grpc: addr.to_string(), ..NodeInfo::default() };
        let mut network = Network::new(Peers::new(Identity::outsider(), None), heartbeat * 6);
        let mut client = network.new_client(2, &node).await;
        let entry = Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 1), payload: EntryPayload::Blank };

        let sent =
            BerthRuntime::timeout(heartbeat, client.append_entries(append(vec![entry]), RPCOption::new(heartbeat)));
        let reply = sent.await.expect("within the deadline").expect("the peer's answer");
        assert!(matches!(reply, AppendEntriesResponse::Success));

        let beat = BerthRuntime::timeout(heartbeat, client.append_entries(append(vec![]), RPCOption::new(heartbeat)));
        assert!(!matches!(beat.await, Ok(Ok(_))), "a heartbeat keeps its deadline");
        server.abort();
    }
}
