//! Crash safety: a node killed with SIGKILL (no clean shutdown) and started
//! again on the same data dir serves every acknowledged blob, manifest and
//! tag byte for byte, and resumes an upload session it had open.

mod common;

use common::*;

async fn spawn(dir: &std::path::Path, http: u16, grpc: u16) -> Proc {
    let args: Vec<String> =
        ["--http", &format!("127.0.0.1:{http}"), "--grpc", &format!("127.0.0.1:{grpc}"), "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.display().to_string()])
            .collect();
    spawn_serve(&args, http).await
}

#[tokio::test]
async fn sigkill_and_restart_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{http}");
    let c = client();

    let mut node = spawn(dir.path(), http, grpc).await;
    let mut images = Vec::new();
    for i in 0..20 {
        let (d, m) = push_image(&c, &base, &format!("crash/r{}", i % 3), &format!("t{i}"), &format!("s{i}")).await;
        images.push((i, d, m));
    }
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let big_digest = push_blob(&c, &base, "crash/big", &big).await;
    // An upload in progress at the time of the crash.
    let r = c.post(format!("{base}/v2/crash/open/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    c.patch(format!("{base}{loc}")).body("first half,").send().await.unwrap();

    node.0.kill().unwrap(); // SIGKILL
    node.0.wait().unwrap();
    drop(node);

    let _node = spawn(dir.path(), http, grpc).await;
    for (i, d, m) in &images {
        let repo = format!("crash/r{}", i % 3);
        for reference in [format!("t{i}"), d.clone()] {
            let r = c.get(format!("{base}/v2/{repo}/manifests/{reference}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{repo}:{reference}");
            assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
        }
    }
    let got = c.get(format!("{base}/v2/crash/big/blobs/{big_digest}")).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &big[..]);
    let v: serde_json::Value =
        c.get(format!("{base}/v2/crash/r0/tags/list")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 7);

    // The open upload resumes where it was.
    let r = c.get(format!("{base}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["Range"], "0-10");
    let r = c
        .put(format!("{base}{loc}?digest={}", sha256(b"first half,second half")))
        .body("second half")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Writes continue after the restart.
    push_image(&c, &base, "crash/after", "latest", "after").await;
}

/// A node whose Raft stops on a storage error cannot write or serve
/// consistent reads any more: it exits (so its supervisor restarts it)
/// instead of answering 500 to everything, and a restart brings it back
/// with every acknowledged write. The error is a disk that fails every
/// call with EIO (and keeps only what was synced), under a node that goes
/// on taking writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_stops_the_node_and_a_restart_recovers() {
    let Some(mut cl) = cluster::TestCluster::start_on_power_loss_disks(1, 20, |_| String::new()).await else {
        return;
    };
    let base = cl.base(0);
    let c = client();
    let (_, m) = push_image(&c, &base, "fail/r", "base", "f").await;

    cl.disks[0].power_off().unwrap();
    let mut acknowledged = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = cl.procs[0].as_mut().unwrap().0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the node did not exit");
        let t = format!("t{}", acknowledged.len());
        if tag(&c, &base, "fail/r", &t, &m).await == 201 {
            acknowledged.push(t);
        }
    };
    assert!(!status.success(), "{status}");
    cl.kill(0);
    cl.disks[0].power_on();

    cl.start_node(0).await;
    for t in std::iter::once("base".to_string()).chain(acknowledged) {
        let r = c.get(format!("{base}/v2/fail/r/manifests/{t}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{t}");
    }
}
