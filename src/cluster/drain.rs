//! Draining a node before it leaves: it stops answering the load
//! balancer's health check (so no new client is sent to it) and the leave
//! waits until the client requests it already has are done, instead of
//! cutting off uploads whose sessions live on it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

/// Shared between the API (which reports its requests) and the admin
/// service (which drains). Cheap to clone.
#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                last_active: Mutex::new(Instant::now()),
                idle: Notify::new(),
            }),
        }
    }
}

/// Held while a client request is being handled.
pub struct Active {
    drain: Drain,
}

impl Drop for Active {
    fn drop(&mut self) {
        *self.drain.inner.last_active.lock().unwrap() = Instant::now();
        if self.drain.inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.inner.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Count a client request until the returned guard drops.
    pub fn track(&self) -> Active {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        *self.inner.last_active.lock().unwrap() = Instant::now();
        Active { drain: self.clone() }
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Start (or, with `false`, call off) draining.
    pub fn set(&self, draining: bool) {
        self.inner.draining.store(draining, Ordering::Release);
    }

    /// Wait until no request is in flight and none ended for `quiet`, but at
    /// least `quiet` from now (load balancers need that long to notice the
    /// failing health check). Returns whether it got quiet before `timeout`.
    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) -> bool {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let idle_since = *self.inner.last_active.lock().unwrap();
            let busy = self.inner.in_flight.load(Ordering::Acquire) > 0;
            let now = Instant::now();
            if !busy && now >= start + quiet && now >= idle_since + quiet {
                return true;
            }
            if now >= deadline {
                return false;
            }
            let wake = if busy { deadline } else { (start + quiet).max(idle_since + quiet).min(deadline) };
            let notified = self.inner.idle.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_for_requests_in_flight_and_the_quiet_period() {
        let d = Drain::default();
        let guard = d.track();
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.wait_quiet(Duration::from_secs(3), Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "a request is still in flight");
        drop(guard);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "quiet period not over");
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_gives_up_at_the_timeout() {
        let d = Drain::default();
        let _guard = d.track();
        assert!(!d.wait_quiet(Duration::from_secs(3), Duration::from_secs(20)).await);
    }
}
