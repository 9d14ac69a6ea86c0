#![allow(dead_code)]
//! Load shared by the metadata benchmarks: `conc` workers take operation
//! numbers from one counter until `total` are done, and every latency is
//! kept for percentiles. Closed loop ([`run`]: each worker starts its next
//! operation when the last one ends) or open loop ([`run_at_rate`]: each
//! operation has its start time on a fixed schedule).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Stats {
    ops: usize,
    elapsed: Duration,
    lat: Vec<Duration>,
}

impl Stats {
    /// Operations per second over the whole run.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// (operations per second, p50 ms, p99 ms).
    pub fn summary(&mut self) -> (f64, f64, f64) {
        self.lat.sort();
        let p = |q: f64| self.lat[((self.lat.len() as f64 * q) as usize).min(self.lat.len() - 1)];
        (self.rate(), p(0.50).as_secs_f64() * 1e3, p(0.99).as_secs_f64() * 1e3)
    }

    pub fn print(&mut self, what: &str) {
        let (rate, p50, p99) = self.summary();
        println!("{what:<34} {rate:>7.0} ops/s   p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   ({} ops)", self.ops);
    }
}

/// Run `total` operations, `conc` at a time; `op(i)` must succeed.
pub async fn run<F, Fut>(conc: usize, total: usize, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    drive(conc, total, None, op).await
}

/// Run `total` operations on a fixed schedule, operation `i` due at
/// `i / per_sec` seconds, with at most `conc` in flight; `op(i)` must
/// succeed. Each latency counts from when the operation was due, not from
/// when a worker got to it, so a server that stalls is charged for every
/// operation the stall delayed (what a closed loop hides: its clients
/// stop asking while the server stalls). At a rate the server sustains,
/// the percentiles are then its own tail, not the queue a saturating
/// closed loop builds (where the mean latency is `conc` over the rate).
pub async fn run_at_rate<F, Fut>(conc: usize, total: usize, per_sec: f64, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    drive(conc, total, Some(per_sec), op).await
}

/// `conc` workers taking operation numbers until `total`: each as soon as
/// it can (`per_sec` None), or not before it is due.
async fn drive<F, Fut>(conc: usize, total: usize, per_sec: Option<f64>, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..conc {
        let (op, next) = (op.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return lat;
                }
                let due = match per_sec {
                    None => Instant::now(),
                    Some(rate) => {
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                };
                assert!(op(i).await, "operation {i} failed");
                lat.push(due.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    Stats { ops: total, elapsed: start.elapsed(), lat }
}
