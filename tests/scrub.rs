//! Restarts cost the same whatever the blob store holds: a restarted node
//! checks that its copies exist but hashes none of them, and serves; the
//! background scrub finds a corrupt copy later, at its own pace, and repair
//! restores it from another holder.

mod common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_hashes_nothing_and_the_scrub_finds_a_corrupt_copy_later() {
    let settings = "replicas = 3\nrepair_interval_secs = 1\nscrub_interval_secs = 3600\n";
    let mut cl = TestCluster::start_with(3, 100_000, |_| settings.to_owned()).await;
    let c = client();
    let mut blobs = Vec::new();
    for n in 0..30u8 {
        let data = vec![n; 64 << 10];
        blobs.push((push_blob(&c, &cl.base(0), "scrub/app", &data).await, data));
    }
    let (victim, data) = blobs[7].clone();
    let node = 1;
    wait_for("node 2 to hold every copy", Duration::from_secs(60), || async {
        blobs.iter().all(|(d, _)| cl.blob_path(node, d).exists())
    })
    .await;
    cl.kill(node);
    // Rot: same size, other bytes.
    let path = cl.blob_path(node, &victim);
    let mut rotten = data.clone();
    rotten[100] ^= 0xff;
    std::fs::write(&path, &rotten).unwrap();
    cl.start_node(node).await;
    let base = cl.base(node);
    wait_for("node 2 ready", Duration::from_secs(30), || async {
        c.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    wait_for("node 2's first check of its copies", Duration::from_secs(30), || async {
        metric(&c, &base, "berth_local_checks_total").await.is_some_and(|n| n >= 1)
    })
    .await;
    // It checked that its copies exist, and hashed none.
    assert_eq!(metric(&c, &base, "berth_scrub_blobs_checked_total").await, Some(0));
    assert_eq!(std::fs::read(&path).unwrap(), rotten, "no re-hash at start: the rot is still there");
    let (other, other_data) = &blobs[3];
    let r = c.get(format!("{base}/v2/scrub/app/blobs/{other}")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), other_data.as_slice());

    // With a pass due (the interval shortened), the scrub finds the rot,
    // drops the copy, and repair copies a good one back.
    let config = &cl.nodes[node].config;
    let text =
        std::fs::read_to_string(config).unwrap().replace("scrub_interval_secs = 3600", "scrub_interval_secs = 1");
    std::fs::write(config, text).unwrap();
    cl.kill(node);
    cl.start_node(node).await;
    let base = cl.base(node);
    wait_for("the scrub to find the corrupt copy", Duration::from_secs(60), || async {
        metric(&c, &base, "berth_scrub_corrupt_total").await.is_some_and(|n| n >= 1)
    })
    .await;
    wait_for("a good copy back on node 2", Duration::from_secs(60), || async {
        std::fs::read(&path).is_ok_and(|b| b == data)
    })
    .await;
    assert!(metric(&c, &base, "berth_scrub_blobs_checked_total").await.unwrap() >= 1);
    assert!(cl.data_dir(node).join("scrub.json").exists(), "the checkpoint is kept");
}
