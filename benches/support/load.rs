#![allow(dead_code)]
//! Closed-loop load shared by the metadata benchmarks: `conc` workers take
//! operation numbers from one counter until `total` are done, and every
//! latency is kept for percentiles.

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
                let t = Instant::now();
                assert!(op(i).await, "operation {i} failed");
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    Stats { ops: total, elapsed: start.elapsed(), lat }
}
