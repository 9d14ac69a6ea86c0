//! Lazily connected gRPC channels to other members, one per address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::identity::{Identity, Stamp};
use super::listener::Connector;
use super::pb::admin_client::AdminClient;
use super::pb::blobs_client::BlobsClient;
use super::pb::meta_client::MetaClient;
use super::pb::raft_rpc_client::RaftRpcClient;
use super::pb::{Empty, NodeStatus};
use super::tls::ClusterTls;

/// A channel to a peer whose every call carries this node's cluster id.
pub type PeerChannel = InterceptedService<Channel, Stamp>;

#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    stamp: Stamp,
    tls: Option<ClusterTls>,
}

/// HTTP/2 flow-control window: the 64 KiB default would cap a blob
/// transfer at one window per round trip.
pub const WINDOW: u32 = 8 << 20;

/// Largest gRPC message: manifests (4 MiB by default) travel in commands.
pub const MAX_MESSAGE: usize = 64 << 20;

/// HTTP/2 pings on every peer connection, answered by the peer's process
/// itself: a peer that is frozen (stopped, swapped out, wedged) keeps its
/// TCP connections open but stops answering them, and every call on such
/// a connection then fails within about `KEEPALIVE + KEEPALIVE_TIMEOUT`
/// instead of hanging a push or a pull.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The transport settings of every channel to a peer.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    // The connector makes the connection (TCP, then mutual TLS when the
    // cluster has it): the URI only names the address.
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW * 2))
}

impl Peers {
    /// Channels whose calls carry `identity`'s cluster id, over mutual TLS
    /// when `tls` is set.
    pub fn new(identity: Identity, tls: Option<ClusterTls>) -> Peers {
        Peers { channels: Arc::default(), stamp: Stamp(identity), tls }
    }

    /// A channel to `addr` that connects on first use (and again after
    /// a failure) through the cluster's [`Connector`].
    fn connect_lazy(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(endpoint(addr)?.connect_with_connector_lazy(Connector(self.tls.clone())))
    }

    /// This node's TLS settings for cluster connections (None: plain text).
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    /// Whose calls these are.
    pub fn identity(&self) -> &Identity {
        &self.stamp.0
    }

    fn channel(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        Ok(InterceptedService::new(self.raw_channel(addr)?, self.stamp.clone()))
    }

    fn raw_channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap();
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = self.connect_lazy(addr)?;
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    pub fn meta(&self, addr: &str) -> Result<MetaClient<PeerChannel>, tonic::transport::Error> {
        Ok(MetaClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// A Raft client of `addr` on a connection of its own, so replication
    /// never queues behind blob streams to the same peer.
    pub fn raft(&self, addr: &str) -> Result<RaftRpcClient<PeerChannel>, tonic::transport::Error> {
        let channel = InterceptedService::new(self.connect_lazy(addr)?, self.stamp.clone());
        Ok(RaftRpcClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
    }

    /// Ask the node at `addr` who it is and how it sees the cluster, within
    /// `within`.
    pub async fn status(&self, addr: &str, within: Duration) -> Result<NodeStatus, tonic::Status> {
        let mut client = self.admin(addr).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(Empty {});
        req.set_timeout(within);
        Ok(client.status(req).await?.into_inner())
    }

    pub fn admin(&self, addr: &str) -> Result<AdminClient<PeerChannel>, tonic::transport::Error> {
        Ok(AdminClient::new(self.channel(addr)?))
    }

    pub fn blobs(&self, addr: &str) -> Result<BlobsClient<PeerChannel>, tonic::transport::Error> {
        Ok(BlobsClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }
}
