//! The gRPC blob transfer service: serving local blobs to peers, and
//! pulling a blob from a peer on request.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::pb::{blobs_server::Blobs, BlobChunk, FetchRequest, PullReply, PullRequest};
use super::Peers;
use crate::blob::{peer, BlobStore};
use crate::oci::Digest;

pub struct BlobService {
    pub store: BlobStore,
    pub peers: Peers,
    pub throttle: super::Throttle,
}

fn parse(d: &str) -> Result<Digest, Status> {
    d.parse().map_err(|_| Status::invalid_argument("invalid digest"))
}

/// Stream `digest` from the peer at `addr`, from `offset`. `background`
/// copies are bounded by the serving peer; a client's read is not.
pub async fn fetch(
    peers: &Peers,
    addr: &str,
    digest: &Digest,
    offset: u64,
    background: bool,
) -> Result<impl Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin + 'static, Status> {
    let mut client = peers.blobs(addr).map_err(|e| Status::unavailable(e.to_string()))?;
    let req = FetchRequest { digest: digest.to_string(), offset, background };
    let stream = tokio::time::timeout(peer::ANSWER_WITHIN, client.fetch(req))
        .await
        .map_err(|_| Status::deadline_exceeded(format!("{addr} did not answer a blob read")))??
        .into_inner();
    Ok(peer::idle_limited(stream.map(|r| r.map(|c| c.data).map_err(std::io::Error::other))))
}

/// Copy `digest` into `store` from the first of `sources` that has it intact.
pub async fn pull_from(store: &BlobStore, peers: &Peers, digest: &Digest, sources: &[String]) -> Result<u64, Status> {
    if let Some(r) = store.open(digest).await.map_err(|e| Status::internal(e.to_string()))? {
        return Ok(r.size);
    }
    let mut last = Status::not_found("no source has the blob");
    for src in sources {
        match fetch(peers, src, digest, 0, true).await {
            Ok(stream) => match store.ingest(digest, stream).await {
                Ok(size) => return Ok(size),
                Err(e) => {
                    tracing::warn!(%digest, source = %src, error = %e, "copy from peer failed");
                    last = Status::unavailable(e.to_string());
                }
            },
            Err(e) => last = e,
        }
    }
    Err(last)
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Blobs for BlobService {
    type FetchStream = ChunkStream;

    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<ChunkStream>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let req = req.into_inner();
        let digest = parse(&req.digest)?;
        // A background copy waits for one of its peer's slots and keeps it
        // until the stream ends.
        let admitted = if req.background {
            let ip = peer.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            Some(Arc::new(self.throttle.admit(ip).await))
        } else {
            None
        };
        let reader = self
            .store
            .open(&digest)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found("blob not stored here"))?;
        let size = reader.size;
        let stream = reader.stream(req.offset.min(size), size).await.map_err(|e| Status::internal(e.to_string()))?;
        let chunks = stream.then(move |r| {
            let admitted = admitted.clone();
            async move {
                let b = r.map_err(|e| Status::internal(e.to_string()))?;
                if let Some(a) = &admitted {
                    a.pace(b.len()).await;
                }
                Ok(BlobChunk { data: b })
            }
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<PullReply>, Status> {
        let req = req.into_inner();
        let digest = parse(&req.digest)?;
        // A node short of space takes no new copies: the caller places the
        // copy on another node.
        if self.store.short_of_space() && !self.store.path(&digest).exists() {
            return Err(Status::resource_exhausted("blob disk below its free-space reserve"));
        }
        let size = pull_from(&self.store, &self.peers, &digest, &req.sources).await?;
        Ok(Response::new(PullReply { size }))
    }
}
