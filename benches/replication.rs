//! Blob replication on a three-node local cluster (real processes): push
//! throughput with min_copies 1, 2 and 3 for 1 MiB and 256 MiB blobs, and
//! a pull from a node that must stream the blob from a peer (time to first
//! byte and throughput) next to a pull from the node that holds it, one
//! stream alone and three at once (as docker pulls layers), with the
//! single-stream SHA-256 speed of this CPU: a read-through verifies every
//! byte, so it cannot go faster than that.
//!
//! `cargo bench --bench replication` (`BERTH_BENCH_READS_ONLY=1` skips the pushes)

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::*;
use futures::StreamExt;

fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

async fn push(c: &reqwest::Client, base: &str, data: Vec<u8>) -> (String, Duration) {
    let d = sha256(&data);
    let t = Instant::now();
    let r = c.post(format!("{base}/v2/bench/blobs/uploads/?digest={d}")).body(data).send().await.unwrap();
    assert_eq!(r.status(), 201);
    (d, t.elapsed())
}

/// (time to first byte, total time) of a full blob GET.
async fn pull(c: &reqwest::Client, url: &str) -> (Duration, Duration, u64) {
    let t = Instant::now();
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let mut ttfb = None;
    let mut n = 0u64;
    while let Some(chunk) = s.next().await {
        ttfb.get_or_insert_with(|| t.elapsed());
        n += chunk.unwrap().len() as u64;
    }
    (ttfb.unwrap_or_default(), t.elapsed(), n)
}

fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let c = reqwest::Client::new();
    let big = 256 << 20;
    let pushes = if std::env::var_os("BERTH_BENCH_READS_ONLY").is_some() { vec![] } else { vec![1, 2, 3] };
    for min_copies in pushes {
        let cl = TestCluster::start_with(3, 10_000, |_| format!("min_copies = {min_copies}\n")).await;
        let leader = cl.wait_leader_everywhere().await;
        let base = cl.base(leader);
        let mut small = Duration::ZERO;
        for k in 0..20 {
            small += push(&c, &base, blob(k + 100 * min_copies, 1 << 20)).await.1;
        }
        let mut large = Duration::ZERO;
        for k in 0..2 {
            large += push(&c, &base, blob(k + 1000 * min_copies, big)).await.1;
        }
        println!(
            "push min_copies={min_copies}: 1 MiB x20 {:>6.0} MiB/s   256 MiB x2 {:>6.0} MiB/s",
            mibs(20 << 20, small),
            mibs(2 * big as u64, large)
        );
    }

    // Read-through: one copy only, pulled from a node without it.
    let cl =
        TestCluster::start_with(3, 10_000, |_| "min_copies = 1\nreplicas = 1\ncache_on_read = false\n".into()).await;
    let leader = cl.wait_leader_everywhere().await;
    let (d, _) = push(&c, &cl.base(leader), blob(7, big)).await;
    let holder = (0..3).find(|i| cl.blob_path(*i, &d).exists()).unwrap();
    let other = (0..3).find(|i| *i != holder).unwrap();
    for (label, i) in [("local pull", holder), ("read-through pull", other)] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(pull(&c, &format!("{}/v2/bench/blobs/{d}", cl.base(i))).await);
        }
        runs.sort_by_key(|r| r.1);
        let (ttfb, total, n) = runs[1];
        println!(
            "{label:<18} 256 MiB: ttfb {:>6.2} ms, {:>6.0} MiB/s (median of 3)",
            ttfb.as_secs_f64() * 1e3,
            mibs(n, total)
        );
    }

    // Three blobs at once, each from a node that holds it, then each from
    // one that does not.
    let mut three = Vec::new();
    for k in 0..3 {
        let (d, _) = push(&c, &cl.base(leader), blob(70 + k, 96 << 20)).await;
        let holder = (0..3).find(|i| cl.blob_path(*i, &d).exists()).unwrap();
        three.push((d, holder, (holder + 1) % 3));
    }
    for (label, remote) in [("3 local pulls", false), ("3 read-throughs", true)] {
        let mut rates = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let urls =
                three.iter().map(|(d, h, o)| format!("{}/v2/bench/blobs/{d}", cl.base(if remote { *o } else { *h })));
            let got: u64 = futures::future::join_all(urls.map(|u| {
                let c = c.clone();
                async move { pull(&c, &u).await.2 }
            }))
            .await
            .into_iter()
            .sum();
            rates.push(mibs(got, t.elapsed()));
        }
        rates.sort_by(f64::total_cmp);
        println!("{label:<18} 3x96 MiB at once: {:>6.0} MiB/s in all (median of 3)", rates[1]);
    }

    let data = blob(9, big);
    let t = Instant::now();
    std::hint::black_box(sha256(&data));
    println!(
        "sha256 on one core  256 MiB: {:>6.0} MiB/s (the ceiling of one verified stream)",
        mibs(big as u64, t.elapsed())
    );
}
