//! Blobs across nodes: copies made before acknowledgement, reads from any
//! node after the pushing node dies, uploads that hop between nodes,
//! corrupt copies caught and repaired, placement restored after a leave
//! and extended to a joining node, and copies spread across regions.

mod common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

/// A multi-layer image: (manifest digest, manifest, [(digest, bytes)]).
async fn push_layers(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
) -> (String, Vec<u8>, Vec<(String, Vec<u8>)>) {
    let config = format!(r#"{{"repo":"{repo}","tag":"{tag}"}}"#).into_bytes();
    let layers: Vec<Vec<u8>> = [5_000_000usize, 70_000, 10]
        .iter()
        .enumerate()
        .map(|(k, n)| (0..*n).map(|i| ((i * 31 + k * 7) % 251) as u8).collect())
        .collect();
    let mut blobs = vec![(push_blob(c, base, repo, &config).await, config.clone())];
    for l in &layers {
        blobs.push((push_blob(c, base, repo, l).await, l.clone()));
    }
    let refs: Vec<(&str, usize)> = blobs[1..].iter().map(|(d, b)| (d.as_str(), b.len())).collect();
    let m = image_manifest((&blobs[0].0, config.len()), &refs, "");
    put_manifest(c, base, repo, tag, &m).await;
    (sha256(&m), m, blobs)
}

async fn get_bytes(c: &reqwest::Client, url: &str) -> Option<Vec<u8>> {
    let r = c.get(url).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.bytes().await.ok().map(|b| b.to_vec())
}

#[tokio::test]
async fn every_blob_is_served_by_the_others_after_the_pushing_node_dies() {
    let mut cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let (md, m, blobs) = push_layers(&c, &cl.base(0), "img", "v1").await;
    cl.kill(0);
    cl.wait_leader_everywhere().await;
    for i in [1, 2] {
        let base = cl.base(i);
        assert_eq!(get_bytes(&c, &format!("{base}/v2/img/manifests/v1")).await.as_deref(), Some(&m[..]));
        assert_eq!(digest_of_manifest(&c, &base).await, md);
        for (d, bytes) in &blobs {
            let got = get_bytes(&c, &format!("{base}/v2/img/blobs/{d}")).await.expect("blob served");
            assert_eq!(&sha256(&got), d);
            assert_eq!(&got, bytes);
        }
    }
}

async fn digest_of_manifest(c: &reqwest::Client, base: &str) -> String {
    let r = c.head(format!("{base}/v2/img/manifests/v1")).send().await.unwrap();
    r.headers()["Docker-Content-Digest"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_upload_hops_between_nodes() {
    let cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let d = sha256(&data);
    let r = c.post(format!("{}/v2/hop/blobs/uploads/", cl.base(0))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    let r = c
        .patch(format!("{}{loc}", cl.base(1)))
        .header("Content-Range", "0-99999")
        .body(data[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["Range"], "0-99999");
    let loc2 = r.headers()["Location"].to_str().unwrap().to_owned();
    let r = c.get(format!("{}{loc2}", cl.base(2))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["Range"], "0-99999");
    let r = c.put(format!("{}{loc2}?digest={d}", cl.base(2))).body(data[100_000..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    for i in 0..3 {
        assert_eq!(get_bytes(&c, &format!("{}/v2/hop/blobs/{d}", cl.base(i))).await.as_deref(), Some(&data[..]));
    }
}

/// A push while one placement target is down (not yet counted dead) is
/// acknowledged with the copies it has; the copy the target missed is
/// queued, and retried round after round until the target is back: no
/// membership or liveness change ever comes to trigger a scan.
#[tokio::test]
async fn a_copy_missed_by_a_briefly_down_node_is_made_when_it_returns() {
    let settings = "replicas = 3\nmin_copies = 2\nrepair_interval_secs = 1\ndead_after_secs = 3600\n";
    let mut cl = TestCluster::start_with(3, 10_000, |_| settings.into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let down = (0..3).find(|i| *i != leader).unwrap();
    cl.kill(down);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 233) as u8).collect();
    let d = push_blob(&c, &cl.base(leader), "missed", &data).await;
    let scans = metric(&c, &cl.base(leader), "berth_repair_scans_total").await.unwrap_or(0);
    // A few rounds go by while it is down.
    let rounds = metric(&c, &cl.base(leader), "berth_repair_rounds").await.unwrap_or(0);
    wait_for("three repair rounds", Duration::from_secs(30), || {
        let (c, base) = (c.clone(), cl.base(leader));
        async move { metric(&c, &base, "berth_repair_rounds").await.unwrap_or(0) >= rounds + 3 }
    })
    .await;
    assert!(!cl.blob_path(down, &d).exists());
    cl.start_node(down).await;
    let path = cl.blob_path(down, &d);
    wait_for("the returned node to get its copy", Duration::from_secs(60), || {
        let (path, data) = (path.clone(), data.clone());
        async move { std::fs::read(&path).is_ok_and(|b| b == data) }
    })
    .await;
    assert_eq!(
        metric(&c, &cl.base(leader), "berth_repair_scans_total").await.unwrap_or(0),
        scans,
        "made from the queue, not by a scan"
    );
}

/// Repair is driven by what changed: with members steady, rounds go by
/// without scanning the blob index; a copy the scrub finds corrupt (or
/// gone) is queued, and repair restores that one, still without a scan.
#[tokio::test]
async fn a_corrupt_or_missing_copy_is_repaired_from_the_queue_without_a_scan() {
    let settings = "repair_interval_secs = 1\nscrub_interval_secs = 1\ndead_after_secs = 2\n";
    let cl = TestCluster::start_with(3, 10_000, |_| settings.into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 249) as u8).collect();
    let d = push_blob(&c, &cl.base(0), "rot", &data).await;
    let other: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d2 = push_blob(&c, &cl.base(0), "rot", &other).await;
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let (path, path2) = (cl.blob_path(victim, &d), cl.blob_path(victim, &d2));
    wait_for("the victim to hold both copies", Duration::from_secs(30), || {
        let ok = path.exists() && path2.exists();
        async move { ok }
    })
    .await;

    // Steady: three rounds pass and none of them scans.
    let lead = cl.base(leader);
    let m = |name: &'static str| {
        let (c, lead) = (c.clone(), lead.clone());
        async move { metric(&c, &lead, name).await.unwrap_or(0) }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut scans, mut since) = (m("berth_repair_scans_total").await, m("berth_repair_rounds").await);
    loop {
        let (s, r) = (m("berth_repair_scans_total").await, m("berth_repair_rounds").await);
        if s != scans {
            (scans, since) = (s, r);
        }
        if r >= since + 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no three repair rounds in a row without a scan");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let queued = m("berth_repair_queued_total").await;

    let mut bad = std::fs::read(&path).unwrap();
    bad[1234] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    std::fs::remove_file(&path2).unwrap();

    // The scrub finds both, drops them, and repair puts good copies back.
    wait_for("the corrupt and the missing copy to be repaired", Duration::from_secs(60), || {
        let (path, path2, data, other) = (path.clone(), path2.clone(), data.clone(), other.clone());
        async move { std::fs::read(&path).is_ok_and(|b| b == data) && std::fs::read(&path2).is_ok_and(|b| b == other) }
    })
    .await;
    for i in 0..3 {
        assert_eq!(get_bytes(&c, &format!("{}/v2/rot/blobs/{d}", cl.base(i))).await.as_deref(), Some(&data[..]));
        assert_eq!(get_bytes(&c, &format!("{}/v2/rot/blobs/{d2}", cl.base(i))).await.as_deref(), Some(&other[..]));
    }
    assert_eq!(m("berth_repair_scans_total").await, scans, "repaired from the queue, not by a scan");
    assert!(m("berth_repair_queued_total").await >= queued + 2, "both copies went through the queue");
}

#[tokio::test]
async fn a_restarted_node_never_serves_a_copy_that_rotted_while_it_was_down() {
    let mut cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 241) as u8).collect();
    let d = push_blob(&c, &cl.base(0), "rot2", &data).await;
    // Wait for all three copies, then corrupt node 3's while it is down.
    wait_for("three copies", Duration::from_secs(30), || {
        let paths: Vec<_> = (0..3).map(|i| cl.blob_path(i, &d)).collect();
        async move { paths.iter().all(|p| p.exists()) }
    })
    .await;
    cl.kill(2);
    let path = cl.blob_path(2, &d);
    let mut bad = std::fs::read(&path).unwrap();
    bad[77] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    cl.start_node(2).await;
    cl.wait_leader_everywhere().await;
    // The first read checks the copy: it fails rather than hand out bad bytes.
    let first = get_bytes(&c, &format!("{}/v2/rot2/blobs/{d}", cl.base(2))).await;
    assert!(first.as_deref().is_none_or(|b| b == &data[..]), "corrupt bytes were served");
    // Then the node reads through a good holder.
    wait_for("correct bytes from the restarted node", Duration::from_secs(30), || {
        let (c, url, data) = (c.clone(), format!("{}/v2/rot2/blobs/{d}", cl.base(2)), data.clone());
        async move { get_bytes(&c, &url).await.is_some_and(|b| b == data) }
    })
    .await;
}

#[tokio::test]
async fn copies_follow_membership_changes() {
    let cl = TestCluster::start_with(4, 10_000, |_| "replicas = 2\nrepair_interval_secs = 1\n".into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let mut digests = Vec::new();
    for k in 0..12u32 {
        let data: Vec<u8> = (0..20_000u32).map(|i| ((i + k * 13) % 247) as u8).collect();
        digests.push(push_blob(&c, &cl.base(leader), "move", &data).await);
    }
    let holders = |d: &str| (0..4).filter(|i| cl.blob_path(*i, d).exists()).collect::<Vec<_>>();
    wait_for("two copies of every blob", Duration::from_secs(30), || {
        let ok = digests.iter().all(|d| holders(d).len() >= 2);
        async move { ok }
    })
    .await;

    // Remove a non-leader node that holds copies; repair re-creates them.
    let leaver = (0..4).find(|i| *i != leader && digests.iter().any(|d| holders(d).contains(i))).unwrap();
    let out = berth()
        .args(["cluster", "leave", "--node", &cl.grpc(leader), "--id", &cl.nodes[leaver].id.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("two copies on the remaining members", Duration::from_secs(60), || {
        let ok = digests.iter().all(|d| holders(d).iter().filter(|h| **h != leaver).count() >= 2);
        async move { ok }
    })
    .await;

    // The leader's metrics say so too; other nodes do not lead repair.
    let gauge = |text: &str, name: &str| -> Option<i64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let metrics = |i: usize| {
        let c = c.clone();
        let url = format!("{}/metrics", cl.base(i));
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let first = gauge(&metrics(leader).await, "berth_repair_rounds").expect("berth_repair_rounds");
    wait_for("a repair round after the copies, with nothing below target", Duration::from_secs(30), || {
        let m = metrics(leader);
        async move {
            let text = m.await;
            gauge(&text, "berth_repair_rounds").is_some_and(|r| r > first)
                && gauge(&text, "berth_blobs_below_target") == Some(0)
        }
    })
    .await;
    let follower = (0..4).find(|i| *i != leader && *i != leaver).unwrap();
    assert_eq!(gauge(&metrics(follower).await, "berth_blobs_below_target"), Some(-1));
}

#[tokio::test]
async fn a_joining_node_receives_its_share() {
    let cl = TestCluster::start_with(2, 10_000, |_| "replicas = 2\nrepair_interval_secs = 1\n".into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let mut digests = Vec::new();
    for k in 0..12u32 {
        let data: Vec<u8> = (0..10_000u32).map(|i| ((i + k * 17) % 239) as u8).collect();
        digests.push(push_blob(&c, &cl.base(leader), "share", &data).await);
    }
    let (http, grpc) = (free_port(), free_port());
    let data3 = cl.dir.path().join("data-new");
    let rest = format!("join = \"{}\"\nreplicas = 2\nrepair_interval_secs = 1\n", cl.grpc(leader));
    let args = write_config(&cl.dir.path().join("new.toml"), 3, http, grpc, &data3, &rest);
    let _n3 = spawn_serve(&args, http).await;
    let path3 = |d: &str| {
        let (alg, hex) = d.split_once(':').unwrap();
        data3.join("blobs").join(alg).join(&hex[..2]).join(hex)
    };
    // With three members and two replicas, the new node is a placement
    // target for some blobs: repair copies exactly those to it.
    wait_for("the new node to hold some blobs", Duration::from_secs(60), || {
        let n = digests.iter().filter(|d| path3(d).exists()).count();
        async move { n >= 3 }
    })
    .await;
}

/// A node that dies and never returns (no `cluster leave`, no drain): once
/// it has been silent for `dead_after_secs`, the leader's repair rounds
/// copy every blob it held to the survivors, within a bounded number of
/// rounds; then a new node joins and receives exactly its share, the blobs
/// whose placement over the live members now names it.
#[tokio::test]
async fn copies_lost_with_a_dead_node_are_restored_and_a_new_node_gets_its_share() {
    let settings = "replicas = 3\nrepair_interval_secs = 1\ndead_after_secs = 3\n";
    let mut cl = TestCluster::start_with(4, 10_000, |_| settings.into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let mut digests = Vec::new();
    for k in 0..16u32 {
        let data: Vec<u8> = (0..30_000u32).map(|i| ((i + k * 29) % 241) as u8).collect();
        digests.push(push_blob(&c, &cl.base((leader + k as usize) % 4), "lost", &data).await);
    }
    let on = |cl: &TestCluster, i: usize, d: &str| cl.blob_path(i, d).exists();
    wait_for("three copies of every blob", Duration::from_secs(60), || {
        let ok = digests.iter().all(|d| (0..4).filter(|i| on(&cl, *i, d)).count() >= 3);
        async move { ok }
    })
    .await;

    let gauge = |text: &str, name: &str| -> Option<i64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let metrics_url = format!("{}/metrics", cl.base(leader));
    let metrics = || {
        let (c, url) = (c.clone(), metrics_url.clone());
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let dead = (0..4).find(|i| *i != leader && digests.iter().any(|d| on(&cl, *i, d))).unwrap();
    let lost = digests.iter().filter(|d| on(&cl, dead, d)).count();
    let rounds_at_death = gauge(&metrics().await, "berth_repair_rounds").unwrap();
    cl.kill(dead);
    let live: Vec<usize> = (0..4).filter(|i| *i != dead).collect();
    wait_for("every blob back at three copies on live nodes", Duration::from_secs(90), || {
        let ok = digests.iter().all(|d| live.iter().filter(|i| on(&cl, **i, d)).count() >= 3);
        async move { ok }
    })
    .await;
    let rounds = gauge(&metrics().await, "berth_repair_rounds").unwrap() - rounds_at_death;
    // dead_after_secs / repair_interval_secs rounds before the node counts
    // as dead, then one round restores everything (16 copies at once);
    // a little slack for a round that starts just before the deadline.
    assert!(rounds <= 3 + 3, "{lost} copies took {rounds} repair rounds to restore");
    wait_for("nothing below target", Duration::from_secs(30), || {
        let m = metrics();
        async move { gauge(&m.await, "berth_blobs_below_target") == Some(0) }
    })
    .await;

    // A new node joins: placement over the live members (the dead one is
    // still a member, but not alive) names it for some blobs.
    let (http, grpc) = (free_port(), free_port());
    let data5 = cl.dir.path().join("data-new");
    let rest = format!("join = \"{}\"\n{settings}", cl.grpc(leader));
    let args = write_config(&cl.dir.path().join("new.toml"), 5, http, grpc, &data5, &rest);
    let _n5 = spawn_serve(&args, http).await;
    let path5 = |d: &str| {
        let (alg, hex) = d.split_once(':').unwrap();
        data5.join("blobs").join(alg).join(&hex[..2]).join(hex)
    };
    // Placement counts regions as the membership records them.
    wait_for("node 5 in the membership", Duration::from_secs(60), || async {
        cl.status(leader).await.is_some_and(|s| s.members.iter().any(|m| m.id == 5))
    })
    .await;
    let members = cl.status(leader).await.unwrap().members;
    let live_ids: Vec<u64> = live.iter().map(|i| cl.nodes[*i].id).chain([5]).collect();
    let candidates: Vec<berth::blob::placement::Candidate> = members
        .iter()
        .filter(|m| live_ids.contains(&m.id))
        .map(|m| berth::blob::placement::Candidate { id: m.id, region: m.region.clone() })
        .collect();
    assert_eq!(candidates.len(), 4);
    let share: Vec<&String> = digests
        .iter()
        .filter(|d| {
            let digest: berth::oci::Digest = d.parse().unwrap();
            berth::blob::placement::rank(&digest, &candidates).iter().take(3).any(|c| c.id == 5)
        })
        .collect();
    assert!(!share.is_empty(), "placement names the new node for none of 16 blobs");
    wait_for("the new node to hold its share", Duration::from_secs(90), || {
        let ok = share.iter().all(|d| path5(d).exists());
        async move { ok }
    })
    .await;
    let extra: Vec<&String> = digests.iter().filter(|d| path5(d).exists() && !share.contains(d)).collect();
    assert!(extra.is_empty(), "the new node holds blobs placement does not name it for: {extra:?}");
}

/// A 201 means `min_copies` holders have the blob fsynced at that moment,
/// not eventually: the holders are counted on disk as soon as the answer
/// arrives, before a 16 MB copy started after the ack could have landed
/// (a build that acknowledged after its own copy alone fails here). Then
/// the receiving node dies at once, and the copy made before the ack
/// serves the blob.
#[tokio::test]
async fn min_copies_hold_the_blob_at_the_moment_of_the_ack() {
    let cfg = "replicas = 3\nmin_copies = 2\nrepair_interval_secs = 3600\n";
    let mut cl = TestCluster::start_with(3, 10_000, |_| cfg.to_owned()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let receiver = (leader + 1) % 3;
    let mut pushed = Vec::new();
    for k in 0..3u32 {
        let data: Vec<u8> = (0..16_000_000u32).map(|i| ((i * 7 + k) % 241) as u8).collect();
        let d = push_blob(&c, &cl.base(receiver), "acked", &data).await;
        let holders: Vec<usize> = (0..3).filter(|&i| cl.blob_path(i, &d).exists()).collect();
        assert!(holders.len() >= 2, "blob {k} acknowledged with holders {holders:?} only");
        assert!(holders.contains(&receiver), "the receiving node keeps its copy: {holders:?}");
        pushed.push((d, data));
    }
    cl.kill(receiver);
    cl.wait_leader_everywhere().await;
    for (d, data) in &pushed {
        let other = (0..3).find(|&i| i != receiver && cl.blob_path(i, d).exists()).expect("a second holder");
        let got = get_bytes(&c, &format!("{}/v2/acked/blobs/{d}", cl.base(other))).await.expect("blob served");
        assert_eq!(&got, data);
    }
}

#[tokio::test]
async fn with_min_regions_a_copy_lands_in_the_other_region_before_the_ack() {
    let regions = |id: u64| if id == 3 { "west" } else { "east" };
    let cl = TestCluster::start_with(3, 10_000, |id| format!("region = \"{}\"\nmin_regions = 2\n", regions(id))).await;
    let c = client();
    for k in 0..5u32 {
        let data: Vec<u8> = (0..50_000u32).map(|i| ((i + k) % 233) as u8).collect();
        let d = push_blob(&c, &cl.base(0), "geo", &data).await;
        // Acknowledged: the west node (index 2) already has it fsynced.
        assert!(cl.blob_path(2, &d).exists(), "blob {k} not in the second region at ack time");
    }
}

/// `berth cluster leave` drains the leaver first (its health check fails
/// while an upload it owns is still being written, and the leave waits for
/// it), then copies every blob only it holds to the others: with one
/// replica and repair idle, nothing else would.
#[tokio::test]
async fn leave_drains_clients_and_moves_blobs_only_the_leaver_holds() {
    let cfg = "replicas = 1\nmin_copies = 1\nrepair_interval_secs = 3600\n";
    let cl = TestCluster::start_with(3, 10_000, |_| cfg.into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let leaver = (0..3).find(|i| *i != leader).unwrap();
    let base = cl.base(leaver);
    let mut blobs = Vec::new();
    for k in 0..8u32 {
        let data: Vec<u8> = (0..30_000u32).map(|i| ((i + k * 11) % 241) as u8).collect();
        blobs.push((push_blob(&c, &base, "evac", &data).await, data));
    }
    assert!(blobs.iter().all(|(d, _)| cl.blob_path(leaver, d).exists()));

    // An upload session on the leaver, open when the leave starts.
    let r = c.post(format!("{base}/v2/evac/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let mut location = r.headers()["Location"].to_str().unwrap().to_owned();
    let url = |loc: &str| if loc.starts_with("http") { loc.to_owned() } else { format!("{base}{loc}") };

    let mut leave = berth()
        .args(["cluster", "leave", "--node", &cl.grpc(leader), "--id", &cl.nodes[leaver].id.to_string()])
        .args(["--drain-secs", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the leaver to fail its health check", Duration::from_secs(30), || {
        let (c, u) = (c.clone(), format!("{base}/v2/"));
        async move { c.get(u).send().await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    // The client keeps writing its upload; each chunk keeps the drain waiting.
    let late: Vec<u8> = (0..40_000u32).map(|i| (i % 199) as u8).collect();
    for (n, chunk) in late.chunks(10_000).enumerate() {
        let start = n * 10_000;
        let r = c
            .patch(url(&location))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{start}-{}", start + chunk.len() - 1))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "patch during drain");
        location = r.headers()["Location"].to_str().unwrap().to_owned();
        assert!(leave.try_wait().unwrap().is_none(), "the leave finished while an upload was still being written");
    }
    let d = sha256(&late);
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{}{sep}digest={d}", url(&location))).send().await.unwrap();
    assert_eq!(r.status(), 201, "upload completed during the drain");
    blobs.push((d, late));

    let out = tokio::task::spawn_blocking(move || leave.wait_with_output()).await.unwrap().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "leave: {said}");
    assert!(said.contains("drained") && said.contains("left the cluster"), "{said}");

    // Every blob, the late one included, is held and served by the others.
    for i in (0..3).filter(|i| *i != leaver) {
        for (d, data) in &blobs {
            let got = get_bytes(&c, &format!("{}/v2/evac/blobs/{d}", cl.base(i))).await;
            assert!(got.as_deref() == Some(&data[..]), "node {i} blob {d}");
        }
    }
    for (d, _) in &blobs {
        assert!((0..3).any(|i| i != leaver && cl.blob_path(i, d).exists()), "{d} only on the leaver");
    }
}

/// A node that comes back without some of its blob files (a disk swapped
/// while it was down) finds that out at once on start, not on its next
/// check hours later: it drops itself as their holder and the leader's
/// repair copies them back.
#[tokio::test]
async fn a_node_missing_files_at_start_reports_them_and_gets_them_back() {
    let mut cl = TestCluster::start_with(3, 10_000, |_| "repair_interval_secs = 1\n".into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let mut digests = Vec::new();
    for k in 0..6u32 {
        let data: Vec<u8> = (0..25_000u32).map(|i| ((i + k * 7) % 233) as u8).collect();
        digests.push(push_blob(&c, &cl.base(leader), "lost", &data).await);
    }
    let victim = (0..3).find(|i| *i != leader).unwrap();
    wait_for("every node to hold every blob", Duration::from_secs(30), || {
        let ok = digests.iter().all(|d| (0..3).all(|i| cl.blob_path(i, d).exists()));
        async move { ok }
    })
    .await;
    cl.kill(victim);
    for d in &digests {
        std::fs::remove_file(cl.blob_path(victim, d)).unwrap();
    }
    // From now on the victim's periodic check is an hour away: only its
    // check at start can notice the loss.
    let cfg = &cl.nodes[victim].config;
    let text = std::fs::read_to_string(cfg).unwrap().replace("repair_interval_secs = 1", "repair_interval_secs = 3600");
    std::fs::write(cfg, text).unwrap();
    cl.start_node(victim).await;
    wait_for("the lost files to be copied back", Duration::from_secs(60), || {
        let ok = digests.iter().all(|d| cl.blob_path(victim, d).exists());
        async move { ok }
    })
    .await;
}

/// A holder whose copy rotted (same size, wrong bytes) must not get a
/// reader's node to hand out a complete bad body, nor to keep a copy of it.
#[tokio::test]
async fn read_through_from_a_rotten_holder_serves_and_keeps_nothing_bad() {
    let cfg = "replicas = 1\nmin_copies = 1\nrepair_interval_secs = 3600\nscrub_interval_secs = 3600\n";
    let cl = TestCluster::start_with(3, 10_000, |_| cfg.into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = push_blob(&c, &cl.base(leader), "rot", &data).await;
    let holder = (0..3).find(|i| cl.blob_path(*i, &d).exists()).unwrap();
    let reader = (0..3).find(|i| *i != holder).unwrap();
    let mut bad = data.clone();
    bad[2_999_999] ^= 0xff;
    std::fs::write(cl.blob_path(holder, &d), &bad).unwrap();

    let got = get_bytes(&c, &format!("{}/v2/rot/blobs/{d}", cl.base(reader))).await;
    assert!(got.is_none(), "a body of bad bytes was served whole");
    // Whatever the reader cached on the way must have been thrown away.
    wait_for("the reader's temporary copy to be discarded", Duration::from_secs(10), || {
        let incoming = files_under(&cl.data_dir(reader).join("blobs/.incoming"));
        async move { incoming.is_empty() }
    })
    .await;
    assert!(!cl.blob_path(reader, &d).exists(), "the reader kept a copy of bad bytes");
}

/// Config that makes node 1 count its blob disk as full (a free-space
/// reserve larger than any disk), after `base`.
fn node1_full(id: u64, base: &str) -> String {
    let reserve = if id == 1 { "min_free_mib = 1099511627776\n" } else { "" };
    format!("{base}{reserve}")
}

/// A node whose blob disk is below its free-space reserve starts every new
/// upload (session or monolithic) on another node, so pushes that reach it
/// through a load balancer still succeed and store nothing on it.
#[tokio::test]
async fn uploads_reaching_a_full_node_start_on_another() {
    let cl = TestCluster::start_with(3, 10_000, |id| node1_full(id, "replicas = 1\nmin_copies = 1\n")).await;
    cl.wait_leader_everywhere().await;
    let c = client();
    let full = cl.base(0);
    let uploads = cl.data_dir(0).join("uploads");

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let d = sha256(&data);
    let r = c.post(format!("{full}/v2/spill/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    let id = loc.rsplit('/').next().unwrap();
    assert!(!id.starts_with("1-"), "the session must belong to another node: {loc}");
    assert!(files_under(&uploads).is_empty(), "no session stored on the full node");
    let r = c.patch(format!("{full}{loc}")).body(data[..50_000].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    let r = c.put(format!("{full}{loc}?digest={d}")).body(data[50_000..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201);

    let mono: Vec<u8> = (0..120_000u32).map(|i| (i % 241) as u8).collect();
    let m = sha256(&mono);
    let r = c.post(format!("{full}/v2/spill/blobs/uploads/?digest={m}")).body(mono.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);

    for (digest, bytes) in [(&d, &data), (&m, &mono)] {
        assert!(!cl.blob_path(0, digest).exists(), "nothing stored on the full node");
        for i in 0..3 {
            let got = get_bytes(&c, &format!("{}/v2/spill/blobs/{digest}", cl.base(i))).await;
            assert_eq!(got.as_deref(), Some(&bytes[..]), "node {i} serves {digest}");
        }
    }
}

/// A node short of space refuses new copies; a leave still moves every blob
/// the leaver held to the next nodes in placement order instead.
#[tokio::test]
async fn a_leave_places_copies_past_a_full_node() {
    let cl = TestCluster::start_with(4, 10_000, |id| node1_full(id, "replicas = 2\n")).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let mut digests = Vec::new();
    for k in 0..12u32 {
        let data: Vec<u8> = (0..20_000u32).map(|i| ((i + k * 31) % 239) as u8).collect();
        digests.push(push_blob(&c, &cl.base(leader), "past", &data).await);
    }
    let holders = |d: &str| (0..4).filter(|i| cl.blob_path(*i, d).exists()).collect::<Vec<_>>();
    assert!(digests.iter().all(|d| !holders(d).contains(&0)), "the full node took no copy");

    let leaver = (1..4).find(|i| *i != leader).unwrap();
    let out = berth()
        .args(["cluster", "leave", "--node", &cl.grpc(leader), "--id", &cl.nodes[leaver].id.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "leave refused: {}", String::from_utf8_lossy(&out.stderr));
    // Two nodes with space remain: each blob must be on both.
    for d in &digests {
        let h: Vec<usize> = holders(d).into_iter().filter(|h| *h != leaver && *h != 0).collect();
        assert_eq!(h.len(), 2, "{d} held by {h:?} after node {leaver} left");
    }
}

/// The blob byte stream on the cluster port (plain text here, so the
/// holder sends the file with sendfile): a member of the node's cluster
/// gets exactly the blob's bytes, from any offset; an unknown digest is
/// "not found"; the public port has no such route.
#[tokio::test]
async fn the_cluster_port_streams_blobs_to_members() {
    let node = start_node().await;
    let c = client();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = push_blob(&c, &node.base, "peer", &data).await;
    let r = c.get(format!("{}/_berth/blobs/{d}", node.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let scratch = tempfile::tempdir().unwrap();
    let store = berth::meta::IdentityStore::new(berth::meta::open_db(&scratch.path().join("db")).unwrap());
    let identity = berth::cluster::Identity::new(store.clone(), store.load_or_create(9).unwrap());
    identity.adopt(node.node.cluster.identity.cluster().unwrap()).unwrap();
    let blobs = berth::blob::BlobStore::new(scratch.path().join("blobs")).unwrap();
    let peers = berth::cluster::Peers::new(identity, None);
    let transfer = berth::blob::Transfer::new(blobs, peers, berth::blob::Throttle::new(Default::default()));
    let addr = node.node.grpc_addr.to_string();
    let digest: berth::oci::Digest = d.parse().unwrap();
    for (offset, background) in [(0usize, false), (1_234_567, true)] {
        let mut stream = transfer.read(&addr, &digest, offset as u64, background).await.unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert!(got == data[offset..], "offset {offset}: {} bytes, not the blob's", got.len());
    }
    let unknown: berth::oci::Digest = sha256(b"never pushed").parse().unwrap();
    let r = transfer.read(&addr, &unknown, 0, false).await;
    assert!(matches!(r, Err(berth::blob::TransferError::NotFound(_))), "{:?}", r.err());
}

/// SIGSTOP a node: its process stops answering, but the kernel keeps its
/// connections open, so nothing resets a call in flight to it. Dropping the
/// guard lets it run again.
struct Frozen(i32);

impl Frozen {
    fn new(cl: &TestCluster, i: usize) -> Frozen {
        let pid = cl.procs[i].as_ref().unwrap().0.id() as i32;
        // SAFETY: signalling a child process this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A frozen peer hangs neither a pull nor a push. The reader tries the
/// frozen holder of a blob first (lowest id) and must move on to the other
/// holder; pushes whose placement picks the frozen node must move on to
/// the next node. Without timeouts and keepalives on peer calls, each of
/// these waits for ever (the client's own 60 s timeout fails the test).
#[tokio::test]
async fn a_frozen_peer_hangs_neither_a_pull_nor_a_push() {
    let cfg = "replicas = 2\nmin_copies = 2\nrepair_interval_secs = 3600\n";
    let cl = TestCluster::start_with(3, 10_000, |_| cfg.into()).await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let leader = cl.wait_leader_everywhere().await;
    // A blob on two nodes, read from the third with the first holder frozen.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let d = push_blob(&c, &cl.base(leader), "frozen", &data).await;
    let holders: Vec<usize> = (0..3).filter(|i| cl.blob_path(*i, &d).exists()).collect();
    assert_eq!(holders.len(), 2);
    let reader = (0..3).find(|i| !holders.contains(i)).unwrap();
    {
        let _frozen = Frozen::new(&cl, holders[0]);
        let got = get_bytes(&c, &format!("{}/v2/frozen/blobs/{d}", cl.base(reader))).await;
        assert!(got.as_deref() == Some(&data[..]), "read through past a frozen holder");
    }
    cl.wait_leader_everywhere().await;

    // Pushes to the leader while a follower is frozen: every one lands.
    let leader = cl.wait_leader_everywhere().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    // An upload session the follower owns, continued through the leader
    // once the follower froze: the leader answers (the session is
    // unreachable) instead of waiting on its owner for ever.
    // A client of its own: the leader may close the connection after
    // answering without reading the body, and the pushes below must not
    // draw that connection from a shared pool.
    let lone = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let r = lone.post(format!("{}/v2/frozen/blobs/uploads/", cl.base(follower))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let path = location.strip_prefix(&cl.base(follower)).unwrap_or(&location).to_owned();
    let _frozen = Frozen::new(&cl, follower);
    let patch = lone
        .patch(format!("{}{path}", cl.base(leader)))
        .header("Content-Type", "application/octet-stream")
        .body(vec![7u8; 1 << 20])
        .send()
        .await
        .expect("a PATCH for a frozen owner's session is answered");
    assert!(!patch.status().is_success(), "PATCH to a frozen owner: {}", patch.status());
    let pushes: Vec<_> = (0..8u8)
        .map(|k| {
            let (c, base) = (c.clone(), cl.base(leader));
            tokio::spawn(async move {
                let blob: Vec<u8> = (0..100_000u32).map(|i| (i as u8).wrapping_mul(k + 1)).collect();
                let d = sha256(&blob);
                c.post(format!("{base}/v2/frozen/blobs/uploads/?digest={d}"))
                    .body(blob)
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    for (k, p) in pushes.into_iter().enumerate() {
        let status = p.await.unwrap().expect("the push answered");
        assert_eq!(status, 201, "push {k} with a frozen follower");
    }
}
