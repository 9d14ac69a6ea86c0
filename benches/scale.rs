//! berth at a million manifests (issue 16): a three-node cluster on
//! loopback fed manifest PUTs (~1.9 KB, concurrency 64, through the
//! leader, a new repository every step), reporting per step the PUT rate
//! and latency, the data dir size (and of it, the Raft log's segment files
//! and RocksDB's write-ahead log), the Raft log kept behind a snapshot (its entries times
//! the mean size of the step's entries), RSS of every node, the
//! snapshots built meanwhile, and the CPU the three nodes spent per
//! 100,000 PUTs, split into the request path (with apply and everything
//! else), compaction, flushes and the Raft log's sync; then a follower
//! restart and a new node joining, each with its time to serve and its
//! peak RSS; then a restart of a node whose blob store holds
//! `SCALE_SPARSE_GIB` GiB of (sparse) blob files.
//!
//! `cargo bench --bench scale`; `SCALE_MANIFESTS` (default 1,000,000),
//! `SCALE_STEP` (100,000), `SCALE_SPARSE_GIB` (50), `SCALE_PAD` (bytes of
//! annotation added to each 426-byte manifest; default 1,500, the ~1.9 KB
//! of issue 16's measurements), `SCALE_PAD_RANDOM` (1, the default: each
//! manifest's annotation is its own pseudo-random hex, which LZ4 barely
//! compresses, as digests; 0: one repeated byte, which it compresses to
//! almost nothing), `SCALE_SNAPSHOT_LOGS` (10,000, the default
//! `snapshot_logs`), `SCALE_RATE` (0, the default: a closed loop, each
//! of the 64 connections sending its next PUT when the last is answered,
//! so the rate is the cluster's ceiling and the mean latency 64 over it;
//! N: an open loop, PUTs due at N per second with at most 64 in flight and
//! latency counted from when each was due, so the percentiles show the
//! cluster's own stalls at a load it sustains, not the queue of a
//! saturating client).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::*;
use load::{run, run_at_rate};
use sha2::Digest as _;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The bytes of the Raft log's segment files on the node at `base` (its
/// `berth_raft_log_bytes`).
async fn log_bytes(c: &reqwest::Client, base: &str) -> u64 {
    metric(c, base, "berth_raft_log_bytes").await.unwrap_or(0)
}

/// The bytes of the write-ahead log files of the node whose data dir is
/// `data`: RocksDB's `*.log` files beside its tables.
fn wal_bytes(data: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(data.join("meta")) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

/// How many entries the Raft log of the node at `base` holds now (after
/// its purged index, up to its last).
async fn log_entries(c: &reqwest::Client, base: &str) -> u64 {
    let last = metric(c, base, "berth_raft_last_log_index").await.unwrap_or(0);
    last.saturating_sub(metric(c, base, "berth_raft_purged_index").await.unwrap_or(0))
}

/// Bytes under `dir` as allocated on disk (sparse files count what they use).
fn du(dir: &Path) -> u64 {
    du_where(dir, |_| true)
}

/// The disk the files under `dir` take, each file once however many names
/// it has (a snapshot checkpoint hard-links the database's tables), among
/// those `count` accepts.
fn du_where(dir: &Path, count: impl Fn(&std::fs::Metadata) -> bool) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if seen.insert((m.dev(), m.ino())) && count(&m) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// (current, peak) resident set of a process, in MiB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time of process `pid` so far, in clock ticks, split by what its
/// threads do: `[request path and the rest, compaction, flush, Raft log
/// sync]`. RocksDB names its compaction threads `rocksdb:low` and its flush
/// threads `rocksdb:high`; the log store's flusher is `raft-log-flush`. The
/// first class is the process's total less the others, so threads that
/// have exited still count.
fn cpu_ticks(pid: u32) -> [u64; 4] {
    // utime and stime are fields 14 and 15 of `stat`, 12 and 13 after the
    // command name (which may hold spaces, hence the split at its `)`).
    let read = |path: String| -> Option<(String, u64)> {
        let stat = std::fs::read_to_string(path).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((stat[open + 1..close].to_string(), ticks))
    };
    let mut out = [0u64; 4];
    let total = read(format!("/proc/{pid}/stat")).map_or(0, |(_, t)| t);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Some((comm, ticks)) = read(format!("{}/stat", task.path().display())) else { continue };
        let class = match comm.as_str() {
            c if c.starts_with("rocksdb:low") => 1,
            c if c.starts_with("rocksdb:high") => 2,
            "raft-log-flush" => 3,
            _ => continue,
        };
        out[class] += ticks;
    }
    out[0] = total.saturating_sub(out[1] + out[2] + out[3]);
    out
}

/// The three nodes' CPU ticks by class ([`cpu_ticks`]), summed.
fn cluster_ticks(cl: &TestCluster) -> [u64; 4] {
    let mut sum = [0u64; 4];
    for p in cl.procs.iter().take(3).flatten() {
        for (s, t) in sum.iter_mut().zip(cpu_ticks(p.0.id())) {
            *s += t;
        }
    }
    sum
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// The disk node `i`'s snapshots take beyond its database: files of its
/// snapshot directory that no longer share their data with a live table
/// (a checkpoint hard-links the tables; compaction unlinks them there).
fn snapshot_own_bytes(cl: &TestCluster, i: usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    du_where(&cl.data_dir(i).join("snapshots"), |m| m.nlink() == 1)
}

/// The snapshots node `i` built since its log was last read: (count, the
/// longest build in ms, the disk its snapshots take beyond its database).
fn snapshots_built(cl: &TestCluster, i: usize, seen: &mut usize) -> (usize, u64, u64) {
    let Some(log) = cl.procs[i].as_ref().and_then(|p| p.1.clone()) else { return (0, 0, 0) };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("snapshot built")).collect();
    let new = &lines[(*seen).min(lines.len())..];
    *seen = lines.len();
    let field = |l: &str, k: &str| {
        l.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let longest = new.iter().map(|l| field(l, "elapsed_ms=")).max().unwrap_or(0);
    (new.len(), longest, snapshot_own_bytes(cl, i))
}

/// Wait until the node at `base` answers a read of `repo:tag` with 200.
async fn wait_serving(c: &reqwest::Client, base: &str, repo: &str, tag: &str) {
    let url = format!("{base}/v2/{repo}/manifests/{tag}");
    wait_for("the node to serve", Duration::from_secs(600), || {
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(&url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
}

/// `len` pseudo-random hex digits, a function of `seed` (splitmix64).
fn hex_pad(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    out.truncate(len);
    out
}

#[tokio::main]
async fn main() {
    let total = env("SCALE_MANIFESTS", 1_000_000) as usize;
    let step = env("SCALE_STEP", 100_000) as usize;
    let sparse_gib = env("SCALE_SPARSE_GIB", 50);
    let pad_len = env("SCALE_PAD", 1500) as usize;
    let random_pad = env("SCALE_PAD_RANDOM", 1) == 1;
    let per_sec = env("SCALE_RATE", 0);
    let mut cl = TestCluster::start(3, env("SCALE_SNAPSHOT_LOGS", 10_000)).await;
    let c = reqwest::Client::builder().pool_max_idle_per_host(128).build().unwrap();
    let leader = cl.wait_leader_everywhere().await;
    let base = cl.base(leader);
    let config = push_blob(&c, &base, "scale/base", b"{\"scale\":1}!!").await;
    let layer = push_blob(&c, &base, "scale/base", &[7u8; 2000]).await;
    let annotations = move |i: usize| {
        let pad = if random_pad { hex_pad(i as u64, pad_len) } else { "p".repeat(pad_len) };
        format!(r#","annotations":{{"n":"{i:07}","pad":"{pad}"}}"#)
    };
    let sample = image_manifest((&config, 13), &[(&layer, 2000)], &annotations(0));
    let load = match per_sec {
        0 => "closed loop".to_string(),
        n => format!("open loop at {n} PUT/s, latency from when each PUT was due"),
    };
    println!("manifest size {} bytes; {total} manifests in steps of {step}, c=64 via the leader, {load}", sample.len());
    println!(
        "{:>9} | {:>7} | {:>8} | {:>8} | {:>26} | {:>26} | {:>26} | {:>26} | {:>22} | {:>22} | {:>30}",
        "after",
        "PUT/s",
        "p50",
        "p99",
        "data dir per node",
        "of it, the Raft log",
        "of it, write-ahead log",
        "Raft log kept (~)",
        "RSS per node (MiB)",
        "snapshots (n, max ms, own disk)",
        "CPU-s per 100k: req/compact/flush/log"
    );
    // Where the nodes' CPU goes, per step: what grows with the state shows
    // here (on two cores shared by three nodes and the client, the rate
    // follows the CPU a PUT costs the cluster).
    // SAFETY: sysconf only reads a constant of the system.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut last_ticks = cluster_ticks(&cl);
    let mut seen = [0usize; 3];
    let mut done = 0usize;
    let mut manifest_bytes = 0u64;
    // Every step's rate, for a ratio less at the mercy of one step's luck.
    let mut rates = Vec::new();
    let mut last_repo = String::new();
    // The disk target: data dir / manifest bytes, without the Raft log
    // kept behind a snapshot; the highest over nodes and steps.
    let mut worst = (0.0f64, 0usize);
    let mut last_index = metric(&c, &base, "berth_raft_last_log_index").await.unwrap_or(0);
    while done < total {
        let n = step.min(total - done);
        let repo = format!("scale/r{}", done / step);
        // The layers, linked into this step's repository.
        for d in [&config, &layer] {
            let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/?mount={d}&from=scale/base")).send().await.unwrap();
            assert_eq!(r.status(), 201);
        }
        let annotations2 = annotations;
        let (c2, base2, config2, layer2, repo2) =
            (c.clone(), base.clone(), config.clone(), layer.clone(), repo.clone());
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bytes2 = bytes.clone();
        let put = move |i: usize| {
            let (c, base, repo) = (c2.clone(), base2.clone(), repo2.clone());
            let body = image_manifest((&config2, 13), &[(&layer2, 2000)], &annotations2(i));
            bytes2.fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
            async move {
                let r = c
                    .put(format!("{base}/v2/{repo}/manifests/t{i}"))
                    .header("Content-Type", OCI_MANIFEST)
                    .body(body)
                    .send()
                    .await;
                r.map(|r| r.status() == 201).unwrap_or(false)
            }
        };
        let mut s = match per_sec {
            0 => run(64, n, put).await,
            rate => run_at_rate(64, n, rate as f64, put).await,
        };
        done += n;
        manifest_bytes += bytes.load(std::sync::atomic::Ordering::Relaxed);
        last_repo = repo;
        let (rate, p50, p99) = s.summary();
        rates.push(rate);
        let step_bytes = bytes.load(std::sync::atomic::Ordering::Relaxed);
        let disk: Vec<u64> = (0..3).map(|i| du(&cl.data_dir(i))).collect();
        let sizes: Vec<String> = disk.iter().map(|b| gib(*b)).collect();
        let mut logs = Vec::new();
        for i in 0..3 {
            logs.push(gib(log_bytes(&c, &cl.base(i)).await));
        }
        // The log kept, in bytes: its entries, each the mean size of this
        // step's entries (the leader's log grew by this step's manifests).
        let index = metric(&c, &base, "berth_raft_last_log_index").await.unwrap_or(0);
        let mean = step_bytes as f64 / index.saturating_sub(last_index).max(1) as f64;
        last_index = index;
        let mut kept = Vec::new();
        for (i, d) in disk.iter().enumerate() {
            let k = (log_entries(&c, &cl.base(i)).await as f64 * mean) as u64;
            let ratio = d.saturating_sub(k) as f64 / manifest_bytes as f64;
            if ratio > worst.0 {
                worst = (ratio, done);
            }
            kept.push(gib(k));
        }
        let wals: Vec<String> = (0..3).map(|i| gib(wal_bytes(&cl.data_dir(i)))).collect();
        let rss: Vec<String> =
            (0..3).map(|i| cl.procs[i].as_ref().map_or(0, |p| rss(p.0.id()).0).to_string()).collect();
        let ticks = cluster_ticks(&cl);
        let per_100k: Vec<String> = ticks
            .iter()
            .zip(last_ticks)
            .map(|(t, l)| format!("{:.1}", t.saturating_sub(l) as f64 / tick * 100_000.0 / n as f64))
            .collect();
        last_ticks = ticks;
        let snaps = snapshots_built(&cl, leader, &mut seen[leader]);
        for (i, s) in seen.iter_mut().enumerate() {
            if i != leader {
                snapshots_built(&cl, i, s);
            }
        }
        println!(
            "{:>9} | {:>7.0} | {:>5.1} ms | {:>5.1} ms | {:>26} | {:>26} | {:>26} | {:>26} | {:>22} | {:>3}, {:>6}, {:>9} | {:>30}",
            done,
            rate,
            p50,
            p99,
            sizes.join(" "),
            logs.join(" "),
            wals.join(" "),
            kept.join(" "),
            rss.join(" "),
            snaps.0,
            snaps.1,
            gib(snaps.2),
            per_100k.join(" / ")
        );
    }
    println!(
        "highest (data dir - Raft log kept) / manifest bytes so far, over nodes and steps: {:.2}x (after {})",
        worst.0, worst.1
    );
    println!("manifest bytes pushed: {}; data dir per node / manifest bytes:", gib(manifest_bytes));
    for i in 0..3 {
        let (all, log) = (du(&cl.data_dir(i)), log_bytes(&c, &cl.base(i)).await);
        println!(
            "  node {}: {:.2}x; without the Raft log ({}): {:.2}x",
            i + 1,
            all as f64 / manifest_bytes as f64,
            gib(log),
            all.saturating_sub(log) as f64 / manifest_bytes as f64
        );
    }
    // Where node 1's bytes are: RocksDB's write-ahead log and tables, the
    // snapshot files, the rest.
    let meta = cl.data_dir(0).join("meta");
    let by_ext = |ext: &str| -> u64 {
        std::fs::read_dir(&meta)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(ext))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    };
    println!(
        "  node 1: WAL {}, SST {}, snapshots beyond the database {}",
        gib(by_ext(".log")),
        gib(by_ext(".sst")),
        gib(snapshot_own_bytes(&cl, 0))
    );

    // A follower restarts: time until it serves the newest tag.
    let follower = (0..3).find(|i| *i != leader).unwrap();
    cl.kill(follower);
    let t = Instant::now();
    cl.start_node(follower).await;
    wait_serving(&c, &cl.base(follower), &last_repo, "t0").await;
    let restart = t.elapsed();
    let (_, peak) = rss(cl.procs[follower].as_ref().unwrap().0.id());
    println!("follower restart: serving after {:.1} s, peak RSS {peak} MiB", restart.as_secs_f64());

    // A new node joins: time until it is a voter and serves the newest tag.
    let (http, grpc) = (free_port(), free_port());
    let data4 = cl.dir.path().join("data4");
    let args = join_flags(4, http, grpc, &data4, &cl.grpc(leader));
    let t = Instant::now();
    let node4 = spawn_serve(&args, http).await;
    let base4 = format!("http://127.0.0.1:{http}");
    wait_serving(&c, &base4, &last_repo, "t0").await;
    let joined = t.elapsed();
    let (_, peak4) = rss(node4.0.id());
    println!(
        "new node: serving after {:.1} s, peak RSS {peak4} MiB, data dir {}",
        joined.as_secs_f64(),
        gib(du(&data4))
    );
    drop(node4);

    // A node restarts over a big blob store: sparse files of zeros of
    // distinct lengths (distinct digests, as the store names them).
    if sparse_gib > 0 {
        let blobs = cl.data_dir(follower).join("blobs/sha256");
        let mut h = sha2::Sha256::new();
        let gib_zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            h.update(&gib_zeros);
        }
        for i in 0..sparse_gib {
            let mut hi = h.clone();
            hi.update(&gib_zeros[..i as usize]);
            let hex = format!("{:x}", hi.finalize());
            let dir = blobs.join(&hex[..2]);
            std::fs::create_dir_all(&dir).unwrap();
            let f = std::fs::File::create(dir.join(&hex)).unwrap();
            f.set_len((1u64 << 30) + i).unwrap();
        }
        cl.kill(follower);
        let t = Instant::now();
        cl.start_node(follower).await;
        wait_serving(&c, &cl.base(follower), &last_repo, "t0").await;
        println!("restart over {sparse_gib} GiB of blob files: serving after {:.1} s", t.elapsed().as_secs_f64());
    }
    println!("PUT rate of the last step / the first: {:.2}", rates[rates.len() - 1] / rates[0]);
    // One step's rate swings by a fifth from run to run on a shared
    // two-core machine; three steps at each end swing less.
    if rates.len() >= 6 {
        let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
        let (head, tail) = (mean(&rates[..3]), mean(&rates[rates.len() - 3..]));
        println!("PUT rate of the last three steps / the first three: {:.2}", tail / head);
    }
}
