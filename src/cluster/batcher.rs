//! Group commit for proposals. openraft 0.9 appends and fsyncs each client
//! write on its own before taking the next, so one write per fsync is its
//! ceiling; the batcher packs every command waiting into one log entry
//! ([`Batch`]), with at most [`IN_FLIGHT`] entries proposed at a time, so
//! concurrent writers share appends and fsyncs.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::meta::{Batch, Outcome, Proposal};
use crate::{NodeId, NodeInfo, Raft};

/// Commands in one entry at most.
const MAX_BATCH: usize = 256;
/// Bytes of commands in one entry at most, unless one command alone is
/// larger (a manifest near `max_manifest_bytes`: it goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Entries proposed concurrently.
const IN_FLIGHT: usize = 2;
/// Bytes of commands waiting for or in proposal on this node at most. A
/// writer past it waits for room (within its deadline), so a burst of
/// large manifests queues here instead of in memory without bound.
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// The unit of the queue's byte budget.
const KIB: usize = 1024;

#[derive(Debug)]
pub enum SubmitError {
    /// This node is not the leader; the leader if known.
    NotLeader(Option<(NodeId, NodeInfo)>),
    /// The queue stayed full until the deadline.
    Busy,
    Fatal(String),
}

type Reply = oneshot::Sender<Result<(Outcome, u64), SubmitError>>;

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<(Proposal, Reply)>,
    room: Arc<Semaphore>,
}

impl Batcher {
    pub fn start(raft: Raft) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Batcher { tx, room: Arc::new(Semaphore::new(MAX_QUEUED_BYTES / KIB)) }
    }

    /// Propose `p` on this node; answers once it is committed and applied
    /// here, with its outcome and the log index of its entry. Waits until
    /// `deadline` for room in the queue.
    pub async fn submit(&self, p: Proposal, deadline: std::time::Instant) -> Result<(Outcome, u64), SubmitError> {
        let units = p.cmd.approx_bytes().div_ceil(KIB).min(MAX_QUEUED_BYTES / KIB) as u32;
        let room = tokio::time::timeout_at(deadline.into(), self.room.clone().acquire_many_owned(units))
            .await
            .map_err(|_| SubmitError::Busy)?
            .expect("semaphore never closes");
        let (reply, rx) = oneshot::channel();
        self.tx.send((p, reply)).map_err(|_| SubmitError::Fatal("batcher stopped".into()))?;
        let res = rx.await.map_err(|_| SubmitError::Fatal("batcher stopped".into()))?;
        drop(room);
        res
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<(Proposal, Reply)>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // A command that did not fit in the previous entry starts the next.
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let permit = slots.clone().acquire_owned().await.expect("semaphore never closes");
        // Everything that arrived while the previous entries were in flight,
        // up to the entry's bounds.
        let mut bytes = first.0.cmd.approx_bytes();
        let mut pending = vec![first];
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) if bytes + p.0.cmd.approx_bytes() > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.0.cmd.approx_bytes();
                    pending.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (cmds, replies): (Vec<Proposal>, Vec<Reply>) = pending.into_iter().unzip();
            match raft.client_write(Batch(cmds)).await {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    for (reply, outcome) in replies.into_iter().zip(resp.data.0) {
                        let _ = reply.send(Ok((outcome, index)));
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    let leader = f.leader_id.zip(f.leader_node);
                    for reply in replies {
                        let _ = reply.send(Err(SubmitError::NotLeader(leader.clone())));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(SubmitError::Fatal(e.to_string())));
                    }
                }
            }
            drop(permit);
        });
    }
}
