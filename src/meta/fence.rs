//! The fence between a snapshot install and everything that reads the
//! applied state.
//!
//! A snapshot is installed column family by column family, in bounded
//! memory (see `state.rs`), so for a while the database holds part of the
//! old state and part of the new. Nothing may read it then: a reader would
//! see a tag without its manifest, or nothing at all where the cluster
//! holds data, and a snapshot built from it would spread the mix. The fence
//! is a sequence number, odd while an install runs (a seqlock): a read that
//! starts or ends in a different sequence than it began is refused, and
//! the snapshot builder waits for the install to end.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// Shared by the state machine (the only writer), its snapshot builder
/// and every [`super::MetaReader`].
#[derive(Debug, Default)]
pub struct InstallFence {
    seq: AtomicU64,
    ended: Notify,
}

/// The state was being replaced while it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this node is installing a snapshot from the leader; try again")]
pub struct Installing;

impl InstallFence {
    /// Start reading: the sequence to hand to [`InstallFence::check`].
    pub fn enter(&self) -> Result<u64, Installing> {
        let s = self.seq.load(Ordering::SeqCst);
        if !s.is_multiple_of(2) {
            return Err(Installing);
        }
        Ok(s)
    }

    /// Whether what was read since [`InstallFence::enter`] returned `entered`
    /// came from one state.
    pub fn check(&self, entered: u64) -> Result<(), Installing> {
        if self.seq.load(Ordering::SeqCst) == entered {
            Ok(())
        } else {
            Err(Installing)
        }
    }

    /// Wait until no install runs, then return the sequence as
    /// [`InstallFence::enter`] does.
    pub async fn enter_when_idle(&self) -> u64 {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if let Ok(s) = self.enter() {
                return s;
            }
            ended.await;
        }
    }

    /// Mark an install as running until the guard is dropped (also when the
    /// install fails or panics: the state is then whatever it is, and a
    /// restart completes the install from its durable marker).
    pub(super) fn install(&self) -> InstallGuard<'_> {
        let before = self.seq.fetch_add(1, Ordering::SeqCst);
        debug_assert!(before.is_multiple_of(2), "one install at a time");
        InstallGuard(self)
    }
}

pub(super) struct InstallGuard<'a>(&'a InstallFence);

impl Drop for InstallGuard<'_> {
    fn drop(&mut self) {
        self.0.seq.fetch_add(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_across_an_install_is_refused_and_the_builder_waits_for_its_end() {
        let fence = std::sync::Arc::new(InstallFence::default());
        let before = fence.enter().unwrap();
        {
            let _guard = fence.install();
            assert_eq!(fence.enter(), Err(Installing), "no read starts during an install");
            assert_eq!(fence.check(before), Err(Installing), "a read that began before it is refused");
            let waiter = tokio::spawn({
                let fence = fence.clone();
                async move { fence.enter_when_idle().await }
            });
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            drop(_guard);
            let after = waiter.await.unwrap();
            assert_eq!(fence.check(after), Ok(()));
        }
        assert_eq!(fence.check(before), Err(Installing), "a read spanning a whole install is refused too");
    }
}
