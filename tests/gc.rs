//! Garbage collection on real clusters: what it frees, what it must never
//! take (racing pushes, mounts and chunked uploads across nodes), a node
//! that was down during a collection, and a node that joins after one.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

/// The grace period of these clusters, in seconds.
const GRACE: u64 = 4;

fn settings() -> String {
    settings_with(GRACE)
}

fn settings_with(grace: u64) -> String {
    format!("replicas = 3\nrepair_interval_secs = 1\ngc_grace_secs = {grace}\ngc_interval_secs = 0\n")
}

/// `berth gc` through member `i`: the lines it prints.
async fn gc(cl: &TestCluster, i: usize, dry_run: bool) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    admin(&cl.grpc(i)).gc(dry_run, |l| lines.push(l)).await.map_err(|e| e.message().to_owned())?;
    Ok(lines)
}

/// The blobs node `i` has on disk.
fn blob_files(cl: &TestCluster, i: usize) -> BTreeSet<String> {
    let root = cl.data_dir(i).join("blobs").join("sha256");
    let mut out = BTreeSet::new();
    for sub in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            out.insert(format!("sha256:{}", f.file_name().to_string_lossy()));
        }
    }
    out
}

async fn status_of(c: &reqwest::Client, url: String) -> u16 {
    c.head(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// A blob pushed for no manifest is left alone for the grace period, then
/// collected: unlinked, out of the index, its files deleted; a manifest
/// PUT over it afterwards is refused and a mount of it opens an upload
/// instead. A dry run frees nothing. A used blob is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_blobs_go_after_the_grace_period_and_a_late_manifest_over_them_is_refused() {
    let cl = TestCluster::start_with(1, 100_000, |_| settings()).await;
    let (c, base) = (client(), cl.base(0));
    let (kept_manifest, kept) = push_image(&c, &base, "keep", "v1", "kept").await;
    let config = br#"{"orphan":true}"#.to_vec();
    let layer = vec![7u8; 50_000];
    let cd = push_blob(&c, &base, "orphan", &config).await;
    let ld = push_blob(&c, &base, "orphan", &layer).await;

    // Younger than the grace period: nothing is taken.
    let report = gc(&cl, 0, false).await.unwrap().join("\n");
    assert!(report.contains("freed 0 blobs"), "{report}");
    assert_eq!(status_of(&c, format!("{base}/v2/orphan/blobs/{ld}")).await, 200);

    // Once they are older, a dry run names them and frees nothing.
    let dry = std::sync::Mutex::new(String::new());
    wait_for("a dry run to find the two unused blobs", Duration::from_secs(30), || async {
        let r = gc(&cl, 0, true).await.unwrap().join("\n");
        let found = r.contains("would free 2 blobs");
        *dry.lock().unwrap() = r;
        found
    })
    .await;
    let dry = dry.into_inner().unwrap();
    assert!(dry.contains("orphan: 2 unused blob links"), "{dry}");
    assert!(cl.blob_path(0, &ld).exists(), "a dry run deletes nothing");
    assert_eq!(status_of(&c, format!("{base}/v2/orphan/blobs/{ld}")).await, 200);

    let report = gc(&cl, 0, false).await.unwrap().join("\n");
    assert!(report.contains(&format!("freed 2 blobs, {} bytes", config.len() + layer.len())), "{report}");
    assert!(report.contains("node 1: deleted 2 unclaimed copies"), "{report}");
    for d in [&cd, &ld] {
        assert_eq!(status_of(&c, format!("{base}/v2/orphan/blobs/{d}")).await, 404);
        assert!(!cl.blob_path(0, d).exists(), "the file of {d} is deleted");
    }
    // Ordered after the collection, a manifest over the blobs is refused...
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
    let r = c
        .put(format!("{base}/v2/orphan/manifests/late"))
        .header("Content-Type", OCI_MANIFEST)
        .body(m)
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "MANIFEST_BLOB_UNKNOWN").await;
    // ...and a mount of one opens an upload session instead of linking it.
    let r = c.post(format!("{base}/v2/other/blobs/uploads/?mount={ld}&from=orphan")).send().await.unwrap();
    assert_eq!(r.status(), 202);

    // The image in use is whole.
    let r = c.get(format!("{base}/v2/keep/manifests/v1")).header("Accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), kept_manifest);
    let m: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    for d in [&m["config"]["digest"], &m["layers"][0]["digest"]] {
        let r = c.get(format!("{base}/v2/keep/blobs/{}", d.as_str().unwrap())).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), d.as_str().unwrap());
    }
}

/// An image pushed by one worker: manifest digest and its blobs' digests.
#[derive(Clone, Debug)]
struct Pushed {
    repo: String,
    manifest: String,
    blobs: Vec<String>,
}

/// What a worker saw of its pushes and deletes.
#[derive(Default)]
struct Seen {
    /// Acknowledged (201) and not deleted.
    live: Vec<Pushed>,
    /// Neither acknowledged nor refused (a timeout, a 5xx): decided at the
    /// end by asking the registry.
    unknown: Vec<Pushed>,
    acknowledged: usize,
    refused: usize,
    deleted: usize,
}

/// Upload `data` into `repo` the way a client crossing a load balancer
/// would: the session opened on one node, a chunk sent to the next, the
/// upload closed on the third. Ok only on 201.
async fn chunked_across(c: &reqwest::Client, bases: [&str; 3], repo: &str, data: &[u8]) -> Result<String, String> {
    let d = sha256(data);
    let r = c.post(format!("{}/v2/{repo}/blobs/uploads/", bases[0])).send().await.map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("open: {}", r.status()));
    }
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let half = data.len() / 2;
    let r = c
        .patch(format!("{}{loc}", bases[1]))
        .header("Content-Range", format!("0-{}", half - 1))
        .body(data[..half].to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("patch: {}", r.status()));
    }
    let r = c
        .put(format!("{}{loc}?digest={d}", bases[2]))
        .body(data[half..].to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 201 {
        return Err(format!("close: {}", r.status()));
    }
    Ok(d)
}

/// One worker: pushes images made of a shared base layer (reused by images
/// deleted before, and sometimes mounted from another repository), a
/// fresh layer uploaded in chunks across the nodes, and a fresh config;
/// deletes every third image it got acknowledged.
async fn worker(w: usize, bases: Vec<String>, rounds: usize) -> Seen {
    let c = client();
    let mut seen = Seen::default();
    for k in 0..rounds {
        let node = |o: usize| bases[(w + k + o) % bases.len()].as_str();
        let repo = format!("w{w}/r{}", k % 3);
        let base_layer = format!("base layer {}", k % 4).repeat(2000).into_bytes();
        let fresh = format!("fresh layer {w}-{k}").repeat(1500).into_bytes();
        let config = format!(r#"{{"worker":{w},"round":{k}}}"#).into_bytes();
        let bd = sha256(&base_layer);
        let mut ok = true;
        // The base layer: skipped when the repository has it (as docker
        // does after a HEAD), mounted from a sibling repository every other
        // round, uploaded otherwise.
        if status_of(&c, format!("{}/v2/{repo}/blobs/{bd}", node(0))).await != 200 {
            let from = format!("w{w}/r{}", (k + 1) % 3);
            let mounted = k % 2 == 0
                && c.post(format!("{}/v2/{repo}/blobs/uploads/?mount={bd}&from={from}", node(1)))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 201);
            if !mounted {
                ok &= try_push_blob(&c, node(1), &repo, &base_layer).await.is_ok();
            }
        }
        let fd = chunked_across(&c, [node(0), node(1), node(2)], &repo, &fresh).await;
        let cd = try_push_blob(&c, node(2), &repo, &config).await;
        let (Ok(fd), Ok(cd), true) = (fd, cd, ok) else {
            seen.refused += 1;
            continue;
        };
        let m = image_manifest((&cd, config.len()), &[(&bd, base_layer.len()), (&fd, fresh.len())], "");
        let pushed = Pushed { repo: repo.clone(), manifest: sha256(&m), blobs: vec![cd, bd, fd] };
        let r = c
            .put(format!("{}/v2/{repo}/manifests/t{k}", node(1)))
            .header("Content-Type", OCI_MANIFEST)
            .body(m)
            .send()
            .await;
        match r.map(|r| r.status().as_u16()) {
            Ok(201) => seen.acknowledged += 1,
            // A blob the repository had at the HEAD was collected before
            // the manifest came: refused, nothing acknowledged.
            Ok(400) => {
                seen.refused += 1;
                continue;
            }
            _ => {
                seen.unknown.push(pushed);
                continue;
            }
        }
        if k % 3 == 2 {
            let r = c.delete(format!("{}/v2/{repo}/manifests/{}", node(2), pushed.manifest)).send().await;
            match r.map(|r| r.status().as_u16()) {
                Ok(202) => seen.deleted += 1,
                _ => seen.unknown.push(pushed),
            }
        } else {
            seen.live.push(pushed);
        }
    }
    seen
}

/// Pushes per worker in the race.
const ROUNDS: usize = 60;

/// Collections run back to back through every node while three workers
/// push (shared layers of deleted images, mounts, chunked uploads across
/// nodes) and delete. No acknowledged image loses a blob, on any node; and
/// once the pushes stop and the grace period passes, every node's disk
/// holds exactly the blobs of the images that are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collections_racing_pushes_never_take_an_acknowledged_blob_and_leave_exactly_what_is_used() {
    // A grace period short beside the run: blobs of deleted images become
    // collectable while they are being pushed again.
    let cl = TestCluster::start_with(3, 100_000, |_| settings_with(2)).await;
    let bases: Vec<String> = (0..3).map(|i| cl.base(i)).collect();
    // Images already deleted, whose base layers the workers push again:
    // garbage from the first collection on.
    let c = client();
    for w in 0..3 {
        for b in 0..4 {
            let layer = format!("base layer {b}").repeat(2000).into_bytes();
            let config = format!(r#"{{"deleted":{w}{b}}}"#).into_bytes();
            let repo = format!("w{w}/r2");
            let ld = push_blob(&c, &bases[0], &repo, &layer).await;
            let cd = push_blob(&c, &bases[0], &repo, &config).await;
            let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
            put_manifest(&c, &bases[1], &repo, "old", &m).await;
            let r = c.delete(format!("{}/v2/{repo}/manifests/{}", bases[2], sha256(&m))).send().await.unwrap();
            assert_eq!(r.status(), 202);
        }
    }
    wait_for("the deleted images to pass the grace period", Duration::from_secs(30), || async {
        gc(&cl, 0, true).await.is_ok_and(|r| !r.join("\n").contains("would free 0 blobs"))
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicUsize::new(0));
    let freed = Arc::new(AtomicUsize::new(0));
    let collecting = {
        let grpcs: Vec<String> = (0..3).map(|i| cl.grpc(i)).collect();
        let (stop, runs, freed) = (stop.clone(), runs.clone(), freed.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut report = String::new();
                if admin(&grpcs[i % 3]).gc(false, |l| report.push_str(&l)).await.is_ok() {
                    runs.fetch_add(1, Ordering::Relaxed);
                    let n = report.split("; freed ").nth(1).and_then(|r| r.split(' ').next()?.parse::<usize>().ok());
                    freed.fetch_add(n.unwrap_or(0), Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    // And every node sweeps its disk over and over: a copy written but not
    // yet recorded must survive any number of sweeps.
    let sweeping: Vec<_> = (0..3)
        .map(|i| {
            let (grpc, stop) = (cl.grpc(i), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += usize::from(admin(&grpc).sweep().await.is_ok());
                }
                n
            })
        })
        .collect();
    let workers: Vec<_> = (0..3).map(|w| tokio::spawn(worker(w, bases.clone(), ROUNDS))).collect();
    let mut seen = Vec::new();
    for w in workers {
        seen.push(w.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    collecting.await.unwrap();
    let mut sweeps = 0;
    for s in sweeping {
        sweeps += s.await.unwrap();
    }
    let runs = runs.load(Ordering::Relaxed);
    let freed = freed.load(Ordering::Relaxed);
    assert!(runs >= 2, "only {runs} collections ran during the pushes");
    assert!(freed > 0, "no collection during the pushes freed anything: no race was run");
    let acked: usize = seen.iter().map(|s| s.acknowledged).sum();
    let refused: usize = seen.iter().map(|s| s.refused).sum();
    let deleted: usize = seen.iter().map(|s| s.deleted).sum();
    eprintln!(
        "{runs} collections freeing {freed} blobs and {sweeps} sweeps during {acked} acknowledged pushes \
         ({refused} refused, {deleted} deleted)"
    );
    assert!(
        acked * 3 >= ROUNDS * 3 * 2,
        "{acked} of {} pushes acknowledged ({refused} refused): the race needs pushes that land",
        ROUNDS * 3
    );

    // Pushes and deletes whose answer was lost: the registry says.
    let c = client();
    let mut live: Vec<Pushed> = seen.iter().flat_map(|s| s.live.clone()).collect();
    for p in seen.iter().flat_map(|s| s.unknown.clone()) {
        if status_of(&c, format!("{}/v2/{}/manifests/{}", bases[0], p.repo, p.manifest)).await == 200 {
            live.push(p);
        }
    }
    // Every image acknowledged and not deleted is whole, through every node.
    for p in &live {
        for base in &bases {
            let r = c.get(format!("{base}/v2/{}/manifests/{}", p.repo, p.manifest)).send().await.unwrap();
            assert_eq!(r.status(), 200, "manifest {} of {}", p.manifest, p.repo);
            for d in &p.blobs {
                let r = c.get(format!("{base}/v2/{}/blobs/{d}", p.repo)).send().await.unwrap();
                assert_eq!(r.status(), 200, "blob {d} of {} through {base}", p.repo);
                assert_eq!(&sha256(&r.bytes().await.unwrap()), d);
            }
        }
    }
    // After the grace period a collection leaves exactly the used blobs on
    // every node (replicas = 3 on three nodes: each holds them all).
    let expected: BTreeSet<String> = live.iter().flat_map(|p| p.blobs.clone()).collect();
    let before: BTreeMap<usize, usize> = (0..3).map(|i| (i, blob_files(&cl, i).len())).collect();
    wait_for("every node to hold exactly the used blobs", Duration::from_secs(90), || async {
        let _ = gc(&cl, 0, false).await;
        (0..3).all(|i| blob_files(&cl, i) == expected)
    })
    .await;
    for i in 0..3 {
        assert!(
            before[&i] > expected.len(),
            "node {i} had {} files, {} used: nothing to free?",
            before[&i],
            expected.len()
        );
    }
    // Still whole after the last collection.
    for p in &live {
        for d in &p.blobs {
            let r = c.get(format!("{}/v2/{}/blobs/{d}", bases[1], p.repo)).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }
}

/// A node down during a collection deletes its copies of what was
/// collected once it is back; a node that joins afterwards gets its share
/// of the blobs in use and never one that was collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_during_a_collection_deletes_its_copies_when_back_and_a_new_node_never_gets_them() {
    let mut cl = TestCluster::start_with(3, 100_000, |_| settings()).await;
    let c = client();
    let base = cl.base(0);
    let mut gone = Vec::new();
    let mut kept = Vec::new();
    for k in 0..8 {
        let (md, m) = push_image(&c, &base, &format!("app{}", k % 2), &format!("t{k}"), &format!("seed-{k}")).await;
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        let blobs =
            [v["config"]["digest"].as_str().unwrap().to_owned(), v["layers"][0]["digest"].as_str().unwrap().to_owned()];
        if k % 2 == 0 {
            let r = c.delete(format!("{base}/v2/app0/manifests/{md}")).send().await.unwrap();
            assert_eq!(r.status(), 202);
            gone.extend(blobs);
        } else {
            kept.extend(blobs);
        }
    }
    wait_for("every node to hold every blob", Duration::from_secs(60), || async {
        (0..3).all(|i| gone.iter().chain(&kept).all(|d| cl.blob_path(i, d).exists()))
    })
    .await;

    cl.kill(2);
    wait_for("the deleted images' blobs to pass the grace period", Duration::from_secs(60), || async {
        gc(&cl, 0, true).await.is_ok_and(|r| r.join("\n").contains(&format!("would free {} blobs", gone.len())))
    })
    .await;
    let report = gc(&cl, 1, false).await.unwrap().join("\n");
    assert!(report.contains(&format!("freed {} blobs", gone.len())), "{report}");
    assert!(report.contains("node 3: not swept now"), "{report}");
    for d in &gone {
        assert!(!cl.blob_path(0, d).exists() && !cl.blob_path(1, d).exists(), "{d} deleted on the live nodes");
        assert!(cl.blob_path(2, d).exists(), "the node away still has {d}");
    }

    cl.start_node(2).await;
    wait_for("the node that was away to delete its copies", Duration::from_secs(60), || async {
        gone.iter().all(|d| !cl.blob_path(2, d).exists())
    })
    .await;
    for i in 0..3 {
        for d in &kept {
            assert!(cl.blob_path(i, d).exists(), "node {i} keeps {d}");
        }
    }

    // A fourth node joins: repair gives it copies of blobs in use.
    let leader = cl.wait_leader_everywhere().await;
    let (http, grpc) = (free_port(), free_port());
    let data4 = cl.dir.path().join("data-new");
    let rest = format!("join = \"{}\"\n{}", cl.grpc(leader), settings());
    let args = write_config(&cl.dir.path().join("new.toml"), 4, http, grpc, &data4, &rest);
    let _n4 = spawn_serve(&args, http).await;
    let path4 = |d: &str| {
        let (alg, hex) = d.split_once(':').unwrap();
        data4.join("blobs").join(alg).join(&hex[..2]).join(hex)
    };
    wait_for("the new node to get copies of blobs in use", Duration::from_secs(60), || async {
        kept.iter().any(|d| path4(d).exists())
    })
    .await;
    // Several repair rounds later it still has none of the collected ones.
    let rounds = || async {
        let m = c.get(format!("{}/metrics", cl.base(leader))).send().await.unwrap().text().await.unwrap();
        m.lines()
            .find(|l| l.starts_with("berth_repair_rounds "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let from = rounds().await;
    wait_for("three more repair rounds", Duration::from_secs(60), || async { rounds().await >= from + 3 }).await;
    for d in &gone {
        assert!(!path4(d).exists(), "the new node was given collected blob {d}");
    }
}

/// Pushes (blob, then a manifest over it) back to back through every node
/// until `stop` is set; their latencies in ms.
async fn push_latencies(bases: &[String], tag: &str, stop: Arc<AtomicBool>) -> Vec<f64> {
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (bases, tag, stop) = (bases.to_vec(), tag.to_owned(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut out = Vec::new();
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let base = &bases[(t + k) % bases.len()];
                    let started = std::time::Instant::now();
                    let config = format!(r#"{{"{tag}":{t},"k":{k}}}"#).into_bytes();
                    let cd = push_blob(&c, base, "bench/live", &config).await;
                    let m = image_manifest((&cd, config.len()), &[], "");
                    put_manifest(&c, base, "bench/live", &format!("{tag}-{t}-{k}"), &m).await;
                    out.push(started.elapsed().as_secs_f64() * 1000.0);
                    k += 1;
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    all
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The figure for the record (run by hand: `cargo test --release --test gc
/// -- --ignored --nocapture ten_thousand`): a collection over 10,000
/// unused blobs on three nodes, its duration, and the p99 of pushes with
/// and without it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn ten_thousand_blobs() {
    let cl = TestCluster::start_with(3, 100_000, |_| settings_with(1)).await;
    let bases: Vec<String> = (0..3).map(|i| cl.base(i)).collect();
    let started = std::time::Instant::now();
    let loaders: Vec<_> = (0..16)
        .map(|t| {
            let bases = bases.clone();
            tokio::spawn(async move {
                let c = client();
                for k in 0..625 {
                    let data = format!("unused blob {t}-{k}").repeat(50).into_bytes();
                    push_blob(&c, &bases[k % 3], &format!("bench/junk{}", t % 4), &data).await;
                }
            })
        })
        .collect();
    for l in loaders {
        l.await.unwrap();
    }
    eprintln!("loaded 10,000 unused blobs in {:.1} s", started.elapsed().as_secs_f64());
    wait_for("the blobs to pass the grace period", Duration::from_secs(60), || async {
        gc(&cl, 0, true).await.is_ok_and(|r| r.join("\n").contains("would free 10000 blobs"))
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(15)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let quiet = push_latencies(&bases, "quiet", stop).await;
    timer.await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let collecting = {
        let (grpc, stop) = (cl.grpc(0), stop.clone());
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let mut lines = Vec::new();
            admin(&grpc).gc(false, |l| lines.push(l)).await.unwrap();
            stop.store(true, Ordering::Relaxed);
            (t.elapsed().as_secs_f64(), lines)
        })
    };
    let busy = push_latencies(&bases, "busy", stop).await;
    let (took, lines) = collecting.await.unwrap();
    eprintln!("{}", lines.join("\n"));
    eprintln!("collection of 10,000 blobs on 3 nodes (mark, sweep through Raft, 3 file sweeps): {took:.1} s");
    for (what, l) in [("without a collection", &quiet), ("during the collection", &busy)] {
        eprintln!("pushes {what}: {}, p50 {:.1} ms, p99 {:.1} ms", l.len(), pct(l, 0.5), pct(l, 0.99));
    }
    assert!(lines.iter().any(|l| l.contains("freed 10000 blobs")), "{lines:?}");
}

/// On a schedule, with no command: the leader collects and every member
/// deletes its copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_collects_and_every_node_deletes_its_copies() {
    let cl =
        TestCluster::start_with(3, 100_000, |_| settings().replace("gc_interval_secs = 0", "gc_interval_secs = 1"))
            .await;
    let c = client();
    let base = cl.base(0);
    let (md, m) = push_image(&c, &base, "sched", "v1", "scheduled").await;
    let (_, kept) = push_image(&c, &base, "sched", "v2", "kept").await;
    let digests = |m: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(m).unwrap();
        [v["config"]["digest"].as_str().unwrap().to_owned(), v["layers"][0]["digest"].as_str().unwrap().to_owned()]
    };
    wait_for("every node to hold both images", Duration::from_secs(60), || async {
        (0..3).all(|i| digests(&m).iter().chain(&digests(&kept)).all(|d| cl.blob_path(i, d).exists()))
    })
    .await;
    let r = c.delete(format!("{base}/v2/sched/manifests/{md}")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    wait_for("the schedule to free the deleted image on every node", Duration::from_secs(60), || async {
        (0..3).all(|i| digests(&m).iter().all(|d| !cl.blob_path(i, d).exists()))
    })
    .await;
    for i in 0..3 {
        for d in digests(&kept) {
            assert!(cl.blob_path(i, &d).exists(), "node {i} keeps {d}");
        }
    }
    let metrics = c.get(format!("{}/metrics", cl.base(0))).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("berth_gc_files_swept_total"), "GC metrics exported");
}
