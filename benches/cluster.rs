//! Metadata path of a three-node local cluster (real processes on loopback):
//! manifest PUT throughput and latency at concurrency 1, 16 and 64 (through
//! the leader and through a follower), linearizable tag GET throughput on a
//! follower, and the time from killing the leader to the first successful
//! write.
//!
//! `cargo bench --bench cluster`

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::*;
use load::run;

fn manifest(config: &str, layer: &str, n: usize) -> Vec<u8> {
    image_manifest((config, 13), &[(layer, 2000)], &format!(r#","annotations":{{"n":"{n}"}}"#))
}

#[tokio::main]
async fn main() {
    let nodes: u64 = std::env::var("BENCH_NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(3);
    let mut cl = TestCluster::start(nodes, 10_000).await;
    let c = reqwest::Client::builder().pool_max_idle_per_host(128).build().unwrap();
    let leader = cl.wait_leader_everywhere().await;
    let follower = cl.alive().into_iter().find(|i| *i != leader).unwrap_or(leader);
    let config = push_blob(&c, &cl.base(leader), "bench", b"{\"bench\":1}!!").await;
    let layer = push_blob(&c, &cl.base(leader), "bench", &[7u8; 2000]).await;
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let mut c1 = None;
    for (conc, total, node, label) in [
        (1, 300, leader, "leader"),
        (16, 3000, leader, "leader"),
        (64, 6000, leader, "leader"),
        (64, 6000, follower, "follower"),
    ] {
        let (c, base, config, layer, counter) =
            (c.clone(), cl.base(node), config.clone(), layer.clone(), counter.clone());
        let mut s = run(conc, total, move |_| {
            let (c, base) = (c.clone(), base.clone());
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = manifest(&config, &layer, n);
            async move {
                let r = c
                    .put(format!("{base}/v2/bench/manifests/t{n}"))
                    .header("Content-Type", OCI_MANIFEST)
                    .body(body)
                    .send()
                    .await;
                r.map(|r| r.status() == 201).unwrap_or(false)
            }
        })
        .await;
        s.print(&format!("manifest PUT c={conc} via {label}"));
        let rate = s.rate();
        if conc == 1 {
            c1 = Some(rate);
        } else if node == leader {
            println!("{:>34} {:.1}x concurrency 1", "", rate / c1.unwrap());
        }
    }

    for conc in [1, 64] {
        let (c, base) = (c.clone(), cl.base(follower));
        let total = if conc == 1 { 1000 } else { 20000 };
        let mut s = run(conc, total, move |i| {
            let (c, base) = (c.clone(), base.clone());
            async move {
                let r = c.get(format!("{base}/v2/bench/manifests/t{}", i % 1000)).send().await;
                match r {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        })
        .await;
        s.print(&format!("linearizable tag GET c={conc} follower"));
    }

    // Reads by digest on a follower: content never changes, but whether a
    // repository still has it does, so these take the read barrier too.
    let digest = sha256(&manifest(&config, &layer, 0));
    for (what, url, head) in [
        ("manifest GET by digest", format!("{}/v2/bench/manifests/{digest}", cl.base(follower)), false),
        ("blob HEAD", format!("{}/v2/bench/blobs/{layer}", cl.base(follower)), true),
        ("blob GET (2 KB)", format!("{}/v2/bench/blobs/{layer}", cl.base(follower)), false),
    ] {
        for conc in [1, 64] {
            let (c, url) = (c.clone(), url.clone());
            let total = if conc == 1 { 1000 } else { 20000 };
            let mut s = run(conc, total, move |_| {
                let (c, url) = (c.clone(), url.clone());
                async move {
                    let r = if head { c.head(url).send().await } else { c.get(url).send().await };
                    match r {
                        Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                        _ => false,
                    }
                }
            })
            .await;
            s.print(&format!("{what} c={conc} follower"));
        }
    }

    // Failover: kill the leader, then write through a survivor until it works.
    let survivor = cl.base(follower);
    let body = manifest(&config, &layer, 999_999);
    let killed = Instant::now();
    cl.kill(leader);
    loop {
        let r = c
            .put(format!("{survivor}/v2/bench/manifests/after-failover"))
            .header("Content-Type", OCI_MANIFEST)
            .body(body.clone())
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 201) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "leader killed -> first acknowledged write: {:.0} ms (election timeout 300-600 ms in this config)",
        killed.elapsed().as_secs_f64() * 1e3
    );
}
