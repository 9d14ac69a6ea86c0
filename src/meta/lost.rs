//! Blobs that may have fewer copies than they should, as this node learns
//! of them: the leader's repair works through these instead of scanning
//! the whole blob index every round (`blob::repair`).

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::oci::Digest;

/// Digests queued past this are forgotten, and the queue says so: the
/// next repair round scans the whole index instead (a node or disk lost
/// at once is a membership or liveness change, which scans anyway).
const CAP: usize = 100_000;

/// The queue. Fed by the state machine whenever an applied entry removes a
/// holder (a copy found corrupt or missing, a holder gone), and by the
/// replicator when a background copy fails; drained by the leader's repair.
/// Every node applies every entry, so a node that becomes leader has the
/// same news; a new leader scans everything first regardless.
#[derive(Debug, Default)]
pub struct LostCopies {
    inner: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    digests: BTreeSet<Digest>,
    overflowed: bool,
}

/// What [`LostCopies::take`] hands over.
#[derive(Debug, Default)]
pub struct Taken {
    pub digests: Vec<Digest>,
    /// Some digests were forgotten: repair must scan everything.
    pub overflowed: bool,
}

impl LostCopies {
    pub fn push(&self, digest: Digest) {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if q.digests.len() >= CAP {
            q.overflowed = true;
        } else {
            q.digests.insert(digest);
        }
    }

    /// Everything queued, emptying the queue.
    pub fn take(&self) -> Taken {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let overflowed = std::mem::take(&mut q.overflowed);
        Taken { digests: std::mem::take(&mut q.digests).into_iter().collect(), overflowed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_its_bound_the_queue_forgets_and_says_so() {
        let q = LostCopies::default();
        let d = |i: usize| -> Digest { format!("sha256:{i:064x}").parse().unwrap() };
        q.push(d(1));
        q.push(d(1));
        let t = q.take();
        assert_eq!((t.digests.len(), t.overflowed), (1, false), "a digest queued twice is repaired once");
        for i in 0..CAP + 5 {
            q.push(d(i));
        }
        let t = q.take();
        assert_eq!((t.digests.len(), t.overflowed), (CAP, true));
        let t = q.take();
        assert_eq!((t.digests.len(), t.overflowed), (0, false), "taking empties it");
    }
}
