//! Read index, coalesced. A linearizable read needs a log index obtained
//! after the read arrived: on the leader by confirming leadership with a
//! quorum, on a follower by asking the leader. Every read waiting when a
//! round starts shares that round, so a burst of reads costs one quorum
//! round trip instead of one each.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::{mpsc, oneshot};

use super::{pb, Peers};
use crate::Raft;

/// The result of one round.
#[derive(Debug, Clone)]
pub enum Round {
    /// Reads may proceed once this index (if any) is applied locally.
    Index(Option<u64>),
    /// No leader could confirm right now; try again.
    Retry,
    Fatal(String),
}

/// The last log index and the vote's term on disk when this node started:
/// a leader restored in that term reads no earlier than that index.
///
/// openraft 0.9 restores a node that was leader before a restart as leader
/// at once, in the same term, and gives as its read index the larger of the
/// first entry of its term and the commit index it had saved. That saved
/// index may lag (it is written unsynced, and a power loss takes the tail),
/// so entries the cluster committed and acknowledged before the restart
/// could be missing from a read right after it. Every entry committed
/// before the restart is in the restored leader's log, and the leader
/// commits its own term's entries, so waiting for its whole log at start
/// is always enough. A leader elected in a later term needs no floor: its
/// first entry comes after everything committed before it.
#[derive(Debug, Clone, Copy)]
pub struct ReadFloor {
    pub index: u64,
    pub term: u64,
}

impl ReadFloor {
    /// The read index a leader in `term` answers with: `read` (openraft's),
    /// raised to the floor if the leader was restored in its term.
    pub fn apply(self, read: Option<u64>, term: u64) -> Option<u64> {
        if self.index == 0 || term != self.term {
            return read;
        }
        Some(read.unwrap_or(0).max(self.index))
    }
}

#[derive(Clone)]
pub struct ReadIndexer {
    tx: mpsc::UnboundedSender<oneshot::Sender<Round>>,
}

impl ReadIndexer {
    pub fn start(raft: Raft, peers: Peers, timeout: Duration, floor: ReadFloor) -> ReadIndexer {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Round>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Only readers that arrived before the round starts join it.
                let mut waiting = vec![first];
                waiting.extend(std::iter::from_fn(|| rx.try_recv().ok()));
                let round = one_round(&raft, &peers, timeout, floor).await;
                for w in waiting {
                    let _ = w.send(round.clone());
                }
            }
        });
        ReadIndexer { tx }
    }

    pub async fn next_round(&self) -> Round {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(tx).is_err() {
            return Round::Fatal("read index task stopped".into());
        }
        rx.await.unwrap_or(Round::Fatal("read index task stopped".into()))
    }
}

async fn one_round(raft: &Raft, peers: &Peers, timeout: Duration, floor: ReadFloor) -> Round {
    let leader = match raft.get_read_log_id().await {
        Ok((read, _)) => {
            let term = raft.metrics().borrow().current_term;
            return Round::Index(floor.apply(read.map(|l| l.index), term));
        }
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => f.leader_id.zip(f.leader_node),
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => None,
        Err(RaftError::Fatal(e)) => return Round::Fatal(e.to_string()),
    };
    let Some((leader_id, leader)) = leader else { return Round::Retry };
    let Ok(mut client) = peers.meta(&leader.grpc) else { return Round::Retry };
    let mut req = tonic::Request::new(pb::Empty {});
    req.set_timeout(timeout);
    // Every read on this node waits for this round: abandon a call to a
    // leader that this node has since seen replaced (it may never answer).
    tokio::select! {
        r = client.read_index(req) => match r {
            Ok(r) if !r.get_ref().not_leader => Round::Index(Some(r.get_ref().log_index)),
            Ok(_) => Round::Retry,
            Err(e) => {
                tracing::debug!(error = %e, "read index from leader failed");
                Round::Retry
            }
        },
        () = super::leader_replaced(raft, leader_id) => Round::Retry,
    }
}
