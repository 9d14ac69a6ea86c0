//! Crash safety under power loss, not just SIGKILL: each node's data dir is
//! a power-loss filesystem (jepsen-style-tests/powerloss-fs) that keeps only
//! what was fsynced (bytes) and what a directory fsync made durable (names)
//! when the power is cut. A SIGKILL leaves the page cache to the kernel, so
//! it can never show a missing fsync; these tests can.
//!
//! Writers push blobs (monolithic and chunked, each chunk through another
//! node) and tag manifests through every node while the power is cut: one
//! node at a time (the leader, a follower, a follower again while it catches
//! up by snapshot), every node at once, and the node that received a push
//! right after its 201. Afterwards every node serves every acknowledged
//! blob, manifest and tag byte for byte, no blob file on any disk differs
//! from its name, and the cluster takes writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::*;
use sha2::{Digest as _, Sha256};

/// What the writers were told succeeded (a 201 received before a cut).
#[derive(Default)]
struct Acked {
    /// (repo, digest, bytes)
    blobs: Vec<(String, String, Vec<u8>)>,
    /// (repo, tag, digest, manifest bytes)
    manifests: Vec<(String, String, String, Vec<u8>)>,
}

fn fast_client() -> reqwest::Client {
    // A node whose disk just stopped answering may hold a request until it
    // is killed: a deadline keeps the writers going.
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// Deterministic bytes for writer `w`'s `k`th blob, 1 B to ~300 KiB.
fn layer_bytes(w: usize, k: usize) -> Vec<u8> {
    let len = 1 + (k * 7919 + w * 104_729) % 300_000;
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(format!("{w}/{k}").as_bytes()).to_vec();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

/// Push `data` in three chunks, each request through the next node of
/// `bases`; Ok(digest) only on 201.
async fn push_chunked(c: &reqwest::Client, bases: &[String], repo: &str, data: &[u8]) -> Result<String, String> {
    let err = |e: reqwest::Error| e.to_string();
    let d = sha256(data);
    let r = c.post(format!("{}/v2/{repo}/blobs/uploads/", bases[0])).send().await.map_err(err)?;
    if r.status() != 202 {
        return Err(format!("start upload: {}", r.status()));
    }
    let mut loc = r.headers()["Location"].to_str().unwrap().to_owned();
    let third = data.len().div_ceil(3).max(1);
    let mut from = 0;
    for (i, chunk) in data.chunks(third).enumerate() {
        if i == 2 {
            break;
        }
        let to = from + chunk.len();
        let r = c
            .patch(format!("{}{loc}", bases[(i + 1) % bases.len()]))
            .header("Content-Range", format!("{from}-{}", to - 1))
            .header("Content-Type", "application/octet-stream")
            .body(chunk.to_vec())
            .send()
            .await
            .map_err(err)?;
        if r.status() != 202 {
            return Err(format!("chunk: {}", r.status()));
        }
        loc = r.headers()["Location"].to_str().unwrap().to_owned();
        from = to;
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{}{loc}{sep}digest={d}", bases[bases.len() - 1]))
        .header("Content-Type", "application/octet-stream")
        .body(data[from..].to_vec())
        .send()
        .await
        .map_err(err)?;
    if r.status() == 201 {
        Ok(d)
    } else {
        Err(format!("finish upload: {}", r.status()))
    }
}

/// Writer `w`: a blob (every third one chunked), a config, then a manifest
/// under a tag of its own, round-robin over `bases`, until `stop`.
async fn writer(w: usize, bases: Vec<String>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let c = fast_client();
    let repo = format!("power/w{w}");
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let n = bases.len();
        let base = &bases[(w + k) % n];
        let layer = layer_bytes(w, k);
        let pushed = if k % 3 == 0 {
            let order: Vec<String> = (0..n).map(|j| bases[(w + k + j) % n].clone()).collect();
            push_chunked(&c, &order, &repo, &layer).await
        } else {
            try_push_blob(&c, base, &repo, &layer).await
        };
        let Ok(ld) = pushed else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        acked.lock().unwrap().blobs.push((repo.clone(), ld.clone(), layer.clone()));
        let config = format!(r#"{{"writer":{w},"k":{k}}}"#).into_bytes();
        let Ok(cd) = try_push_blob(&c, base, &repo, &config).await else { continue };
        acked.lock().unwrap().blobs.push((repo.clone(), cd.clone(), config.clone()));
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
        let tag = format!("t{k}");
        let r = c
            .put(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("Content-Type", OCI_MANIFEST)
            .body(m.clone())
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 201) {
            acked.lock().unwrap().manifests.push((repo.clone(), tag, sha256(&m), m));
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &TestCluster, writers: usize) -> Load {
        let bases: Vec<String> = (0..cluster.nodes.len()).map(|i| cluster.base(i)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Acked::default()));
        let tasks = (0..writers).map(|w| tokio::spawn(writer(w, bases.clone(), stop.clone(), acked.clone()))).collect();
        Load { stop, acked, tasks }
    }

    fn manifests(&self) -> usize {
        self.acked.lock().unwrap().manifests.len()
    }

    /// Wait until `more` manifests beyond the current count are acknowledged.
    async fn wait_more(&self, more: usize, what: &str) {
        let want = self.manifests() + more;
        wait_for(what, Duration::from_secs(120), || async move { self.manifests() >= want }).await;
    }

    async fn stop(self) -> Acked {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.acked).ok().unwrap().into_inner().unwrap()
    }
}

/// GET `url` until it answers 200 (a node still electing or catching up
/// answers 503) or a minute passes; the last status and body on failure.
async fn get_ok(c: &reqwest::Client, url: &str) -> Result<bytes::Bytes, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match c.get(url).header("Accept", OCI_MANIFEST).send().await {
            Ok(r) if r.status() == 200 => return r.bytes().await.map_err(|e| e.to_string()),
            Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node serves every acknowledged blob, manifest and tag byte for
/// byte; no blob file on any node's disk differs from its name; and every
/// node takes a write.
async fn check_everything_acknowledged(cluster: &TestCluster, acked: &Acked) {
    assert!(acked.manifests.len() >= 10, "too few writes acknowledged to show anything: {}", acked.manifests.len());
    eprintln!(
        "checking {} acknowledged blobs and {} manifests on every node",
        acked.blobs.len(),
        acked.manifests.len()
    );
    let c = fast_client();
    for i in cluster.alive() {
        let base = cluster.base(i);
        for (repo, digest, data) in &acked.blobs {
            let got = get_ok(&c, &format!("{base}/v2/{repo}/blobs/{digest}")).await;
            let got = got.unwrap_or_else(|e| panic!("node {i}: acknowledged blob {repo}@{digest}: {e}"));
            assert!(got == data[..], "node {i}: blob {repo}@{digest} differs from what was pushed");
        }
        for (repo, tag, digest, m) in &acked.manifests {
            for reference in [tag, digest] {
                let got = get_ok(&c, &format!("{base}/v2/{repo}/manifests/{reference}")).await;
                let got = got.unwrap_or_else(|e| panic!("node {i}: acknowledged manifest {repo}:{reference}: {e}"));
                assert!(got == m[..], "node {i}: manifest {repo}:{reference} differs from what was pushed");
            }
        }
    }
    for i in cluster.alive() {
        let blobs = cluster.data_dir(i).join("blobs/sha256");
        for f in files_under(&blobs) {
            let name = f.rsplit('/').next().unwrap();
            let bytes = std::fs::read(blobs.join(&f)).unwrap();
            assert_eq!(hex::encode(Sha256::digest(&bytes)), name, "node {i}: blob file {f} is not what its name says");
        }
    }
    for i in cluster.alive() {
        let base = cluster.base(i);
        let data = format!("after the cut, through node {i}").into_bytes();
        let r = push_retrying(&c, &base, &data).await;
        assert!(r, "node {i} takes no write after the power came back");
    }
}

/// Push a blob, retrying (a node still catching up may refuse) for a minute.
async fn push_retrying(c: &reqwest::Client, base: &str, data: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if try_push_blob(c, base, "power/after", data).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Small snapshots, so cuts land in snapshot builds and a node that was
/// away catches up by installing one.
const SNAPSHOT_LOGS: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_at_a_time_loses_power_mid_load_and_comes_back_with_everything() {
    let Some(mut cluster) = TestCluster::start_on_power_loss_disks(3, SNAPSHOT_LOGS, |_| String::new()).await else {
        return;
    };
    let load = Load::start(&cluster, 3);
    load.wait_more(10, "writes before the first cut").await;

    // A follower: cut, left away while the log moves past what the leader
    // keeps, back, and cut again while it catches up.
    let leader = cluster.wait_leader_everywhere().await;
    let follower = (leader + 1) % 3;
    cluster.power_cut(follower);
    load.wait_more(2 * SNAPSHOT_LOGS as usize / 3, "writes while a follower is away").await;
    cluster.start_node(follower).await;
    load.wait_more(2, "writes while the follower catches up").await;
    cluster.power_cut(follower);
    cluster.start_node(follower).await;
    load.wait_more(5, "writes after the follower is back").await;

    // The leader.
    let leader = cluster.wait_leader_everywhere().await;
    cluster.power_cut(leader);
    load.wait_more(5, "writes under a new leader").await;
    cluster.start_node(leader).await;
    load.wait_more(5, "writes with every node back").await;

    let acked = load.stop().await;
    cluster.wait_leader_everywhere().await;
    check_everything_acknowledged(&cluster, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_losing_power_at_once_loses_no_acknowledged_write() {
    let Some(mut cluster) = TestCluster::start_on_power_loss_disks(3, SNAPSHOT_LOGS, |_| String::new()).await else {
        return;
    };
    let load = Load::start(&cluster, 3);
    for round in 0..2 {
        load.wait_more(15, &format!("writes before cut {round}")).await;
        cluster.power_cut_all();
        for i in 0..3 {
            cluster.start_node(i).await;
        }
    }
    load.wait_more(5, "writes after the last cut").await;
    let acked = load.stop().await;
    cluster.wait_leader_everywhere().await;
    check_everything_acknowledged(&cluster, &acked).await;
}

/// `replicas = 2`: a push is acknowledged once both copies are fsynced, and
/// no third copy is made. The node that received it loses its power at
/// once and never returns; the other two lose theirs too and come back.
/// The blob must still be there: on the one other holder's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_acknowledged_with_two_copies_survives_the_receiving_node_losing_power() {
    let Some(mut cluster) = TestCluster::start_on_power_loss_disks(3, 10_000, |_| "replicas = 2\n".into()).await else {
        return;
    };
    let c = fast_client();
    for round in 0..3usize {
        let receiver = round;
        let base = cluster.base(receiver);
        let repo = format!("power/copies{round}");
        let layer = layer_bytes(9, round + 1);
        let config = format!(r#"{{"round":{round}}}"#).into_bytes();
        let ld = try_push_blob(&c, &base, &repo, &layer).await.unwrap();
        let cd = try_push_blob(&c, &base, &repo, &config).await.unwrap();
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
        put_manifest(&c, &base, &repo, "v1", &m).await;
        // Then a blob large enough that a copy begun only after its 201 (as
        // with min_copies = 1) is still on its way when the power goes.
        let big: Vec<u8> = layer_bytes(8, round + 1).repeat(256); // 13-17 MB
        let bd = try_push_blob(&c, &base, &repo, &big).await.unwrap();
        // The 201 is in: cut the receiver now, then the two others.
        cluster.power_cut(receiver);
        let others: Vec<usize> = (0..3).filter(|i| *i != receiver).collect();
        for &i in &others {
            cluster.power_cut(i);
        }
        for &i in &others {
            cluster.start_node(i).await;
        }
        for &i in &others {
            let b = cluster.base(i);
            for (digest, data) in [(&bd, &big), (&ld, &layer), (&cd, &config)] {
                let got = get_ok(&c, &format!("{b}/v2/{repo}/blobs/{digest}")).await;
                let got = got.unwrap_or_else(|e| panic!("round {round}, node {i}: acknowledged blob {digest}: {e}"));
                assert!(got == data[..], "round {round}, node {i}: blob {digest} differs");
            }
            let got = get_ok(&c, &format!("{b}/v2/{repo}/manifests/v1")).await.unwrap();
            assert!(got == m[..]);
        }
        cluster.start_node(receiver).await;
        cluster.wait_leader_everywhere().await;
    }
}

/// One writer per tag, writing a new value and deleting it in turn; every
/// node is cut at once mid-sequence. Afterwards each tag holds what its
/// last acknowledged operation left (or what the one in flight at the cut
/// would leave): an overwrite or a delete acknowledged before the cut is
/// never undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overwrites_and_deletes_acknowledged_before_a_power_cut_stay() {
    let Some(mut cluster) = TestCluster::start_on_power_loss_disks(3, SNAPSHOT_LOGS, |_| String::new()).await else {
        return;
    };
    let c = fast_client();
    let base0 = cluster.base(0);
    let config = b"{}".to_vec();
    let layer = b"register layer".to_vec();
    let cd = try_push_blob(&c, &base0, "power/reg", &config).await.unwrap();
    let ld = try_push_blob(&c, &base0, "power/reg", &layer).await.unwrap();
    let value = move |v: u64| {
        image_manifest((&cd, config.len()), &[(&ld, layer.len())], &format!(r#","annotations":{{"v":"{v}"}}"#))
    };
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..3usize {
            let (c, stop) = (c.clone(), stop.clone());
            let bases: Vec<String> = (0..3).map(|i| cluster.base(i)).collect();
            let value = value.clone();
            tasks.push(tokio::spawn(async move {
                // (state after the last acknowledged op, state the op in flight would leave)
                let tag = format!("r{w}");
                let (mut acked, mut pending): (Option<u64>, Option<Option<u64>>) = (None, None);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let base = &bases[(w + i as usize) % 3];
                    let next = if i % 2 == 1 { Some(round * 1_000_000 + i) } else { None };
                    pending = Some(next);
                    let url = format!("{base}/v2/power/reg/manifests/{tag}");
                    let ok = match next {
                        Some(v) => c.put(&url).header("Content-Type", OCI_MANIFEST).body(value(v)).send().await,
                        None => c.delete(&url).send().await,
                    }
                    .map(|r| r.status());
                    match ok {
                        Ok(s) if s == 201 || s == 202 => {
                            acked = next;
                            pending = None;
                        }
                        // A delete of a tag this writer just wrote must find it.
                        Ok(s) if s == 404 => panic!("{tag}: delete answered 404 after an acknowledged write"),
                        _ => break,
                    }
                }
                (tag, acked, pending)
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.power_cut_all();
        stop.store(true, Ordering::Relaxed);
        let mut expect = Vec::new();
        for t in tasks {
            expect.push(t.await.unwrap());
        }
        for i in 0..3 {
            cluster.start_node(i).await;
        }
        for i in 0..3 {
            let base = cluster.base(i);
            for (tag, acked, pending) in &expect {
                let url = format!("{base}/v2/power/reg/manifests/{tag}");
                let deadline = Instant::now() + Duration::from_secs(60);
                let seen = loop {
                    match c.get(&url).header("Accept", OCI_MANIFEST).send().await {
                        Ok(r) if r.status() == 200 => {
                            let v: serde_json::Value = r.json().await.unwrap();
                            break Some(v["annotations"]["v"].as_str().unwrap().parse::<u64>().unwrap());
                        }
                        Ok(r) if r.status() == 404 => break None,
                        _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                        other => panic!("node {i}: {tag}: {other:?}"),
                    }
                };
                assert!(
                    seen == *acked || Some(seen) == *pending,
                    "round {round}, node {i}: {tag} reads {seen:?}; last acknowledged {acked:?}, in flight {pending:?}"
                );
            }
        }
    }
}
