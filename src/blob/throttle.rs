//! Per-peer bounds on background blob copies served by this node (see
//! [`super::transfer`]): at most
//! `max_per_peer` at once (the rest wait their turn) and, optionally, a
//! byte rate shared by all of one peer's copies.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::TransferSettings;

#[derive(Clone)]
pub struct Throttle {
    settings: TransferSettings,
    peers: Arc<Mutex<HashMap<IpAddr, Arc<PeerLimit>>>>,
}

struct PeerLimit {
    slots: Arc<Semaphore>,
    /// When the peer's byte budget next allows sending.
    next_free: Mutex<Instant>,
}

/// One admitted copy: holds its slot until dropped.
pub struct Admitted {
    limit: Arc<PeerLimit>,
    bytes_per_sec: u64,
    _slot: OwnedSemaphorePermit,
}

impl Throttle {
    pub fn new(settings: TransferSettings) -> Throttle {
        Throttle { settings, peers: Arc::default() }
    }

    /// Wait for a free slot for `peer`.
    pub async fn admit(&self, peer: IpAddr) -> Admitted {
        let limit = self
            .peers
            .lock()
            .unwrap()
            .entry(peer)
            .or_insert_with(|| {
                Arc::new(PeerLimit {
                    slots: Arc::new(Semaphore::new(self.settings.max_per_peer.max(1))),
                    next_free: Mutex::new(Instant::now()),
                })
            })
            .clone();
        let slot = limit.slots.clone().acquire_owned().await.expect("semaphore never closed");
        Admitted { limit, bytes_per_sec: self.settings.bandwidth_mib_per_peer << 20, _slot: slot }
    }
}

impl Admitted {
    /// Wait until `n` more bytes fit the peer's rate (no wait if unbounded).
    pub async fn pace(&self, n: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let start = {
            let mut next = self.limit.next_free.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn copies_beyond_the_limit_wait_and_bytes_are_paced() {
        let t = Throttle::new(TransferSettings { max_per_peer: 2, bandwidth_mib_per_peer: 1 });
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let a = t.admit(peer).await;
        let _b = t.admit(peer).await;
        let t2 = t.clone();
        let third = tokio::spawn(async move { t2.admit(peer).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!third.is_finished(), "a third copy to the same peer must wait");
        // Another peer has its own slots.
        let _other = t.admit("10.0.0.2".parse().unwrap()).await;
        drop(a);
        let c = third.await.unwrap();
        // 3 MiB at 1 MiB/s: the last MiB may start only after two seconds.
        let start = Instant::now();
        for _ in 0..3 {
            c.pace(1 << 20).await;
        }
        assert!(start.elapsed() >= Duration::from_secs(2));
    }
}
