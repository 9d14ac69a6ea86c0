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

/// Commands in one entry at most (bounds an entry's size).
const MAX_BATCH: usize = 256;
/// Entries proposed concurrently.
const IN_FLIGHT: usize = 2;

#[derive(Debug)]
pub enum SubmitError {
    /// This node is not the leader; the leader if known.
    NotLeader(Option<(NodeId, NodeInfo)>),
    Fatal(String),
}

type Reply = oneshot::Sender<Result<(Outcome, u64), SubmitError>>;

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<(Proposal, Reply)>,
}

impl Batcher {
    pub fn start(raft: Raft) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Batcher { tx }
    }

    /// Propose `p` on this node; answers once it is committed and applied
    /// here, with its outcome and the log index of its entry.
    pub async fn submit(&self, p: Proposal) -> Result<(Outcome, u64), SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((p, reply)).map_err(|_| SubmitError::Fatal("batcher stopped".into()))?;
        rx.await.map_err(|_| SubmitError::Fatal("batcher stopped".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<(Proposal, Reply)>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let permit = slots.clone().acquire_owned().await.expect("semaphore never closes");
        // Everything that arrived while the previous entries were in flight.
        let mut pending = vec![first];
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => pending.push(p),
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
