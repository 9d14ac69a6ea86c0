//! Three- and five-node clusters of real `berth serve` processes: writes
//! through followers, linearizable reads on other followers, leader
//! failure, restart and catch-up, join and leave, snapshot install.

mod common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

/// Tag `tag` in `repo` to the manifest `m` (whose blobs are in `repo`).
/// `tag`, retried while the node answers 503: a write racing an election
/// may be told to come back, but must never be lost or fail otherwise, and
/// the cluster must take it within a minute.
async fn tag_retrying(c: &reqwest::Client, base: &str, repo: &str, t: &str, m: &[u8]) -> reqwest::StatusCode {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut status = tag(c, base, repo, t, m).await;
    while status == 503 {
        assert!(tokio::time::Instant::now() < deadline, "{base}: tag {t} still answered 503 after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = tag(c, base, repo, t, m).await;
    }
    status
}

async fn digest_of(c: &reqwest::Client, base: &str, repo: &str, tag: &str) -> Option<String> {
    let r = c.get(format!("{base}/v2/{repo}/manifests/{tag}")).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    Some(r.headers()["Docker-Content-Digest"].to_str().unwrap().to_owned())
}

/// How many tags `repo` has, as the node at `base` lists them.
/// Tags in `repo`, every page of the listing followed.
async fn tag_count(c: &reqwest::Client, base: &str, repo: &str) -> usize {
    let mut url = format!("{base}/v2/{repo}/tags/list");
    let mut n = 0;
    loop {
        let r = c.get(&url).send().await.unwrap();
        let next = r.headers().get("link").map(|l| l.to_str().unwrap().to_string());
        let v: serde_json::Value = r.json().await.unwrap();
        n += v["tags"].as_array().map_or(0, Vec::len);
        match next.as_deref().and_then(|l| l.strip_prefix('<')).and_then(|l| l.split_once('>')) {
            Some((path, _)) => url = format!("{base}{path}"),
            None => return n,
        }
    }
}

fn followers(c: &TestCluster, leader: usize) -> Vec<usize> {
    c.alive().into_iter().filter(|i| *i != leader).collect()
}

#[tokio::test]
async fn follower_writes_are_read_on_other_followers_and_survive_leader_loss() {
    let mut cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let f = followers(&cl, leader);

    // Push through one follower, read at once through the other.
    let (d, m) = push_image(&c, &cl.base(f[0]), "app", "v1", "one").await;
    assert_eq!(digest_of(&c, &cl.base(f[1]), "app", "v1").await.as_deref(), Some(d.as_str()));
    let mut acked = vec![("v1".to_string(), d.clone())];
    for i in 0..20 {
        let t = format!("f{i}");
        assert_eq!(tag(&c, &cl.base(f[i % 2]), "app", &t, &m).await, 201);
        // Read-your-write on the other follower, immediately.
        assert_eq!(digest_of(&c, &cl.base(f[(i + 1) % 2]), "app", &t).await.as_deref(), Some(d.as_str()));
        acked.push((t, d.clone()));
    }

    // Kill the leader without warning; a new one takes over.
    cl.kill(leader);
    let new_leader = cl.wait_leader_everywhere().await;
    assert_ne!(new_leader, leader);
    for i in 0..10 {
        let t = format!("after{i}");
        let base = cl.base(cl.alive()[i % 2]);
        assert_eq!(tag_retrying(&c, &base, "app", &t, &m).await, 201);
        acked.push((t, d.clone()));
    }
    for i in cl.alive() {
        for (t, d) in &acked {
            assert_eq!(digest_of(&c, &cl.base(i), "app", t).await.as_deref(), Some(d.as_str()), "node {i} tag {t}");
        }
    }

    // The old leader comes back, catches up, and serves everything.
    cl.start_node(leader).await;
    cl.wait_leader_everywhere().await;
    for (t, d) in &acked {
        assert_eq!(digest_of(&c, &cl.base(leader), "app", t).await.as_deref(), Some(d.as_str()), "restarted {t}");
    }
    assert_eq!(tag_count(&c, &cl.base(leader), "app").await, acked.len());

    // And the whole cluster restarts with everything in place.
    for i in 0..3 {
        cl.kill(i);
    }
    for i in 0..3 {
        cl.start_node(i).await;
    }
    cl.wait_leader_everywhere().await;
    for i in 0..3 {
        for (t, d) in &acked {
            assert_eq!(digest_of(&c, &cl.base(i), "app", t).await.as_deref(), Some(d.as_str()));
        }
    }
}

/// A client that pushes layers through one node and the manifest through
/// another (what a round-robin load balancer does) must never be told the
/// layers are unknown: the manifest's node may not have applied their links
/// yet, so it has to catch up before refusing.
#[tokio::test]
async fn manifest_put_on_a_follower_sees_blobs_just_pushed_through_the_leader() {
    let cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let f = followers(&cl, leader);
    for i in 0..30 {
        let repo = format!("lb/app{i}");
        let config = format!(r#"{{"n":{i}}}"#).into_bytes();
        let layer = format!("layer {i}").repeat(50).into_bytes();
        let cd = push_blob(&c, &cl.base(leader), &repo, &config).await;
        let ld = push_blob(&c, &cl.base(leader), &repo, &layer).await;
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
        put_manifest(&c, &cl.base(f[i % 2]), &repo, "v1", &m).await;
    }
}

#[tokio::test]
async fn five_nodes_keep_writing_with_two_down() {
    let mut cl = TestCluster::start(5, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let (_, m) = push_image(&c, &cl.base(leader), "five", "base", "five").await;
    let other = followers(&cl, leader)[0];
    cl.kill(leader);
    cl.kill(other);
    cl.wait_leader_everywhere().await;
    for i in 0..10 {
        let base = cl.base(cl.alive()[i % 3]);
        let t = format!("t{i}");
        assert_eq!(tag_retrying(&c, &base, "five", &t, &m).await, 201);
    }
    for i in cl.alive() {
        assert_eq!(tag_count(&c, &cl.base(i), "five").await, 11, "node {i}");
    }
}

#[tokio::test]
async fn a_node_joins_under_load_and_another_leaves() {
    let mut cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let (_, m) = push_image(&c, &cl.base(leader), "grow", "base", "grow").await;

    // Writes keep going, back to back, from before node 4 starts until it
    // is a voter; every one must succeed, and some must have been made
    // while the join was under way (phase 1).
    use std::sync::atomic::{AtomicU8, Ordering};
    let phase = std::sync::Arc::new(AtomicU8::new(0));
    let writer = {
        let (c, base, m, phase) = (c.clone(), cl.base(leader), m.clone(), phase.clone());
        tokio::spawn(async move {
            let (mut ok, mut during_join, mut failed) = (0u32, 0u32, Vec::new());
            let mut i = 0;
            while phase.load(Ordering::SeqCst) < 2 || i < 5 {
                let started_in = phase.load(Ordering::SeqCst);
                let status = tag(&c, &base, "grow", &format!("load{i}"), &m).await;
                if status == 201 {
                    ok += 1;
                    during_join += u32::from(started_in == 1);
                } else {
                    failed.push((i, status));
                }
                i += 1;
            }
            (ok, during_join, failed)
        })
    };
    // A few writes land before the join starts.
    wait_for("writes before the join", Duration::from_secs(30), || {
        let (c, base) = (c.clone(), cl.base(leader));
        async move { tag_count(&c, &base, "grow").await >= 4 }
    })
    .await;
    let (http, grpc) = (free_port(), free_port());
    let data = cl.dir.path().join("data4");
    // Flags alone, the certificate from the `berth certs` directory.
    let args = join_flags(4, http, grpc, &data, &cl.grpc(leader));
    phase.store(1, Ordering::SeqCst);
    let _node4 = spawn_serve(&args, http).await;
    let admin = admin(&cl.grpc(leader));
    wait_for("node 4 to become a voter", Duration::from_secs(60), || {
        let admin = &admin;
        async move {
            admin.status().await.is_ok_and(|rows| rows.iter().any(|r| r.id == 4 && r.role == "voter" && r.answers))
        }
    })
    .await;
    phase.store(2, Ordering::SeqCst);
    let (written, during_join, failed) = writer.await.unwrap();
    assert!(failed.is_empty(), "every write around the join succeeds: {failed:?}");
    assert!(during_join > 0, "no write was made while node 4 joined");
    let base4 = format!("http://127.0.0.1:{http}");
    assert_eq!(tag_count(&c, &base4, "grow").await, written as usize + 1);

    // A follower leaves through the command line; the cluster goes on.
    let leaver = followers(&cl, leader)[0];
    let out = berth()
        .args(["cluster", "leave", "--node", &cl.grpc(leader), "--id", &cl.nodes[leaver].id.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "leave: {}", String::from_utf8_lossy(&out.stderr));
    let out = berth().args(["cluster", "status", "--json", "--node", &cl.grpc(leader)]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = rows.as_array().unwrap().iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(!ids.contains(&cl.nodes[leaver].id), "{ids:?}");
    assert_eq!(ids.len(), 3);
    for r in rows.as_array().unwrap() {
        // Every member answers with its commit index: past the writes above,
        // never behind what it applied.
        let (commit, applied) = (r["commit_index"].as_u64().unwrap(), r["applied_index"].as_u64().unwrap());
        assert!(commit >= applied && applied > 0, "{r}");
    }
    assert_eq!(tag(&c, &base4, "grow", "after-leave", &m).await, 201);

    // Refused: a leave that would leave no answering majority. The other
    // follower is killed; node 4 leaving would leave the leader alone of
    // two voters.
    let other = followers(&cl, leader).into_iter().find(|&f| f != leaver).unwrap();
    cl.kill(other);
    let out = berth().args(["cluster", "leave", "--node", &cl.grpc(leader), "--id", "4"]).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a leave without an answering majority must be refused: {said}");
    assert!(said.contains("majority"), "{said}");
    let rows = admin.status().await.unwrap();
    assert!(rows.iter().any(|r| r.id == 4 && r.role == "voter"), "node 4 is still a voter");
}

#[tokio::test]
async fn a_node_that_missed_many_writes_catches_up_from_a_snapshot() {
    let mut cl = TestCluster::start(3, 50).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let (_, m) = push_image(&c, &cl.base(leader), "snap", "base", "snap").await;
    let lagger = followers(&cl, leader)[0];
    let before = cl.status(lagger).await.unwrap().last_log_index;
    cl.kill(lagger);

    // 10,000 tag writes while it is down, 32 at a time.
    let base = cl.base(leader);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..10_000 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (c, base, m) = (c.clone(), base.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            let s = tag(&c, &base, "snap", &format!("t{i:05}"), &m).await;
            drop(permit);
            s
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    // The leader compacted its log past where the lagging node stopped,
    // so only a snapshot can bring it back.
    let ls = cl.status(leader).await.unwrap();
    assert!(ls.purged_index > before, "leader purged {} <= {before}", ls.purged_index);

    cl.start_node(lagger).await;
    cl.wait_applied(lagger, ls.last_log_index).await;
    let st = cl.status(lagger).await.unwrap();
    assert!(st.snapshot_index > before, "installed a snapshot: {st:?}");
    assert_eq!(tag_count(&c, &cl.base(lagger), "snap").await, 10_001);
}

#[tokio::test]
async fn without_a_majority_writes_are_refused_with_retry_after() {
    let mut cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let (_, m) = push_image(&c, &cl.base(leader), "quorum", "before", "q").await;
    let survivor = followers(&cl, leader)[0];
    for i in 0..3 {
        if i != survivor {
            cl.kill(i);
        }
    }
    // The survivor retries within its deadline, then says so: never a 201
    // it cannot keep, never a 5xx other than "come back later".
    let r = c
        .put(format!("{}/v2/quorum/manifests/lost", cl.base(survivor)))
        .header("Content-Type", OCI_MANIFEST)
        .body(m)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["Retry-After"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    // Once a majority is back, the refused write is absent and writes work.
    cl.start_node((survivor + 1) % 3).await;
    cl.wait_leader_everywhere().await;
    assert_eq!(digest_of(&c, &cl.base(survivor), "quorum", "lost").await, None);
    assert!(digest_of(&c, &cl.base(survivor), "quorum", "before").await.is_some());
}

/// Writes that followers forwarded to a leader which then froze (SIGSTOP:
/// its connections stay open and nothing resets them) are given up on when
/// the followers see the election, and land on the new leader within the
/// write deadline: every one acknowledged, none lost. Without the give-up
/// each hangs for the whole deadline and is answered 503.
#[tokio::test]
async fn writes_in_flight_to_a_frozen_leader_move_to_the_new_one() {
    let cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let f = followers(&cl, leader);
    let mut manifests = Vec::new();
    for i in 0..8 {
        let config = format!(r#"{{"frozen":{i}}}"#).into_bytes();
        let cd = push_blob(&c, &cl.base(leader), "frozen", &config).await;
        manifests.push(image_manifest((&cd, config.len()), &[], ""));
    }
    // Both followers have applied the blob links (a linearizable read).
    for &i in &f {
        let r = c.get(format!("{}/v2/frozen/tags/list", cl.base(i))).send().await.unwrap();
        assert!(r.status() == 200 || r.status() == 404, "read barrier on node {i}");
    }

    let pid = cl.procs[leader].as_ref().unwrap().0.id() as libc::pid_t;
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let puts = manifests.iter().enumerate().map(|(i, m)| {
        let (c, base) = (c.clone(), cl.base(f[i % 2]));
        async move { tag(&c, &base, "frozen", &format!("t{i}"), m).await }
    });
    let statuses = futures::future::join_all(puts).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for (i, s) in statuses.iter().enumerate() {
        assert_eq!(*s, 201, "write t{i} through node {} while the leader was frozen", f[i % 2]);
    }
    for (i, m) in manifests.iter().enumerate() {
        for &n in &f {
            assert_eq!(
                digest_of(&c, &cl.base(n), "frozen", &format!("t{i}")).await,
                Some(sha256(m)),
                "t{i} on node {n}"
            );
        }
    }
}

#[tokio::test]
async fn a_join_asked_while_the_leader_is_down_waits_for_the_new_one() {
    let mut cl = TestCluster::start(3, 10_000).await;
    let leader = cl.wait_leader_everywhere().await;
    let survivor = followers(&cl, leader)[0];
    let (http, grpc) = (free_port(), free_port());
    let (config, data) = (cl.dir.path().join("node4.toml"), cl.dir.path().join("data4"));
    let _node4 = spawn_serve(&write_config(&config, 4, http, grpc, &data, "standby = true\n"), http).await;

    // Asked through a survivor while nobody leads yet: the command waits for
    // the election instead of failing with "no leader".
    cl.kill(leader);
    let out = berth()
        .args(["cluster", "join", "--node", &cl.grpc(survivor), "--id", "4"])
        .args(["--addr", &format!("127.0.0.1:{grpc}"), "--api", &format!("127.0.0.1:{http}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
    let status = cl.status(survivor).await.expect("survivor answers");
    assert!(status.members.iter().any(|m| m.id == 4 && m.voter), "{:?}", status.members);
}

/// A DELETE acknowledged anywhere is seen by every node after it, for
/// blobs, manifests by digest and tags alike. The test holds back the
/// leader's traffic to one follower, so that follower has provably not
/// applied the deletes when it is asked: a node answering from its local
/// state (as digest reads once did when the object was present locally)
/// serves the deleted object with 200.
#[tokio::test]
async fn deletes_are_seen_at_once_by_every_node() {
    let cl = TestCluster::start_gated(3).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let f = followers(&cl, leader);
    let lb = cl.base(leader);
    let config = br#"{"del":1}"#.to_vec();
    let layer = b"a layer to delete".repeat(64);
    let cd = push_blob(&c, &lb, "del", &config).await;
    let ld = push_blob(&c, &lb, "del", &layer).await;
    let a = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
    let b = image_manifest((&cd, config.len()), &[(&ld, layer.len())], r#","annotations":{"b":"1"}"#);
    put_manifest(&c, &lb, "del", "a", &a).await;
    put_manifest(&c, &lb, "del", "b", &b).await;
    let target = cl.status(leader).await.unwrap().last_log_index;
    for i in 0..3 {
        cl.wait_applied(i, target).await;
    }
    let reads =
        [format!("/v2/del/blobs/{ld}"), format!("/v2/del/manifests/{}", sha256(&b)), "/v2/del/manifests/a".to_string()];
    for (i, p) in reads.iter().enumerate() {
        for n in 0..3 {
            let r = c.head(format!("{}{p}", cl.base(n))).header("Accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 200, "read {i} on node {n} before the deletes");
        }
    }

    // The lagging follower hears nothing from the others from here on.
    let lagging = f[0];
    cl.gates[lagging].close();
    let deletes =
        [format!("/v2/del/blobs/{ld}"), format!("/v2/del/manifests/{}", sha256(&b)), "/v2/del/manifests/a".into()];
    for p in &deletes {
        let r = c.delete(format!("{lb}{p}")).send().await.unwrap();
        assert_eq!(r.status(), 202, "DELETE {p}");
    }
    for n in [leader, f[1]] {
        for p in &reads {
            let r = c.head(format!("{}{p}", cl.base(n))).header("Accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 404, "{p} on node {n} after its DELETE");
        }
    }
    let pending: Vec<_> = reads
        .iter()
        .map(|p| {
            let (c, url) = (c.clone(), format!("{}{p}", cl.base(lagging)));
            tokio::spawn(async move { c.head(url).header("Accept", OCI_MANIFEST).send().await.unwrap().status() })
        })
        .collect();
    // Give the reads time to arrive while the follower still lags, so a
    // node that answers without a barrier is caught answering 200. (Only
    // the detection of that bug depends on this pause, not the assertion.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.gates[lagging].open();
    for (p, r) in reads.iter().zip(pending) {
        assert_eq!(r.await.unwrap(), 404, "{p} on the lagging node after its DELETE");
    }
}

/// No node may ever answer an acknowledged tag of `wipe` with anything but
/// its digest `d`; a node that cannot answer says 503. Asked all at once: a
/// node without a leader takes the write deadline to say so.
async fn never_forked(c: &reqwest::Client, cl: &TestCluster, acked: &[String], d: &str) {
    let mut reads = Vec::new();
    for n in 0..cl.nodes.len() {
        for t in acked {
            let (c, url) = (c.clone(), format!("{}/v2/wipe/manifests/{t}", cl.base(n)));
            reads.push(tokio::spawn(async move {
                let r = c.get(&url).header("Accept", OCI_MANIFEST).send().await.ok()?;
                let digest = r.headers().get("Docker-Content-Digest").map(|v| v.to_str().unwrap().to_owned());
                Some((url, r.status().as_u16(), digest))
            }));
        }
    }
    for r in reads {
        let Some((url, status, digest)) = r.await.unwrap() else { continue };
        match status {
            200 => assert_eq!(digest.as_deref(), Some(d), "{url}"),
            503 => {}
            s => panic!("{url} answered {s} for an acknowledged tag"),
        }
    }
}

/// A node whose data dir is lost has forgotten its vote and its log, so it
/// must never act as the member it was: not initialize a second cluster
/// (the bootstrapping node), not vote, not serve. Wiping two of three nodes
/// once forked the cluster: the wiped pair formed a new one and answered
/// 404 for every acknowledged tag. Here no node ever answers differently
/// for an acknowledged tag, a wiped member says what to do, and `berth
/// cluster replace` brings each one back, one at a time, with everything.
#[tokio::test]
async fn wiped_data_dirs_never_fork_the_cluster_and_replace_brings_them_back() {
    // Repair every second: a replaced node gets its copies back quickly.
    let mut cl = TestCluster::start_with(3, 10_000, |_| "repair_interval_secs = 1\n".into()).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let config = br#"{"wipe":1}"#.to_vec();
    let layer = b"a layer that must survive every wipe".repeat(100);
    let blobs =
        [push_blob(&c, &cl.base(leader), "wipe", &config).await, push_blob(&c, &cl.base(leader), "wipe", &layer).await];
    let m = image_manifest((&blobs[0], config.len()), &[(&blobs[1], layer.len())], "");
    put_manifest(&c, &cl.base(leader), "wipe", "base", &m).await;
    let d = sha256(&m);
    let mut acked = vec!["base".to_string()];
    for i in 0..30 {
        let t = format!("t{i}");
        assert_eq!(tag_retrying(&c, &cl.base(i % 3), "wipe", &t, &m).await, 201);
        acked.push(t);
    }
    let problem = |cl: &TestCluster, i: usize| {
        let admin = admin(&cl.grpc(i));
        async move { admin.node_status().await.map(|s| s.problem).unwrap_or_default() }
    };

    // One at a time, each node (the bootstrapping node 1 first) loses its
    // data dir, refuses to act as its old self, and is replaced.
    for wiped in 0..3 {
        let target = cl.status(cl.wait_leader_everywhere().await).await.unwrap().last_log_index;
        for i in 0..3 {
            cl.wait_applied(i, target).await;
        }
        cl.kill(wiped);
        std::fs::remove_dir_all(cl.data_dir(wiped)).unwrap();
        cl.start_node(wiped).await;
        wait_for("the wiped node to say what is wrong", Duration::from_secs(30), || async {
            problem(&cl, wiped).await.contains("berth cluster replace")
        })
        .await;
        never_forked(&c, &cl, &acked, &d).await;
        let r = c.get(format!("{}/v2/", cl.base(wiped))).send().await.unwrap();
        assert_eq!(r.status(), 503, "a wiped node does not serve as its old self");

        let other = (wiped + 1) % 3;
        let out = berth()
            .args(["cluster", "replace", "--node", &cl.grpc(other), "--id", &cl.nodes[wiped].id.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "replace: {}", String::from_utf8_lossy(&out.stderr));
        cl.wait_leader_everywhere().await;
        wait_for("the replaced node to serve", Duration::from_secs(60), || async {
            c.get(format!("{}/v2/", cl.base(wiped))).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        for t in &acked {
            assert_eq!(digest_of(&c, &cl.base(wiped), "wipe", t).await.as_deref(), Some(d.as_str()), "replaced {t}");
        }
        let st = cl.status(wiped).await.unwrap();
        assert!(st.problem.is_empty(), "{}", st.problem);
        let voters = st.members.iter().filter(|m| m.voter).count();
        assert_eq!(voters, 3, "three voters again: {:?}", st.members);
        let t = format!("after-wipe-{wiped}");
        assert_eq!(tag_retrying(&c, &cl.base(wiped), "wipe", &t, &m).await, 201);
        acked.push(t);
        // Repair gives the fresh node its copies back before the next node
        // may lose its disk: losing every holder of a blob loses the blob.
        wait_for("repair to restore the replaced node's copies", Duration::from_secs(60), || async {
            blobs.iter().all(|b| (0..3).all(|i| cl.blob_path(i, b).exists()))
        })
        .await;
    }

    // Two of three (including the bootstrapping node) at once: a majority
    // of the voters has lost its log. Nothing may answer differently, and
    // replace refuses rather than guess.
    for wiped in [0, 1] {
        cl.kill(wiped);
        std::fs::remove_dir_all(cl.data_dir(wiped)).unwrap();
    }
    for wiped in [0, 1] {
        cl.start_node(wiped).await;
    }
    for wiped in [0, 1] {
        wait_for("the wiped node to say what is wrong", Duration::from_secs(30), || async {
            problem(&cl, wiped).await.contains("berth cluster replace")
        })
        .await;
    }
    never_forked(&c, &cl, &acked, &d).await;
    let out = berth().args(["cluster", "replace", "--node", &cl.grpc(2), "--id", "1"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("majority"), "{err}");
    never_forked(&c, &cl, &acked, &d).await;
}

/// A burst of manifests at the size limit once halted every write: batched
/// into one entry of ~100 MB, it could never be replicated within the
/// heartbeat-long AppendEntries timeout. Now every one is acknowledged,
/// and small writes go on.
#[tokio::test]
async fn a_burst_of_manifests_at_the_size_limit_never_stops_writes() {
    let cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let config = br#"{"big":1}"#.to_vec();
    let layer = b"big layer".repeat(100);
    let cd = push_blob(&c, &cl.base(leader), "big", &config).await;
    let ld = push_blob(&c, &cl.base(leader), "big", &layer).await;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let pad = format!(r#","annotations":{{"pad":"{i}{}"}}"#, "x".repeat(4_000_000));
            let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], &pad);
            assert!(m.len() <= 4 << 20);
            let (c, base) = (c.clone(), cl.base(i % 3));
            tokio::spawn(async move { tag(&c, &base, "big", &format!("b{i}"), &m).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), 201, "big manifest {i}");
    }
    let (_, small) = push_image(&c, &cl.base(leader), "small", "s", "small").await;
    for i in 0..6 {
        assert_eq!(tag(&c, &cl.base(i % 3), "small", &format!("after{i}"), &small).await, 201, "small write {i}");
    }
    for n in 0..3 {
        assert_eq!(tag_count(&c, &cl.base(n), "big").await, 24, "node {n}");
    }
}

/// The cluster port speaks only to holders of a certificate signed by the
/// cluster CA: a client without one, or with another CA's, is refused, and
/// a node with another CA's certificate cannot be joined.
#[tokio::test]
async fn without_a_certificate_from_the_cluster_ca_nothing_gets_in() {
    use berth::cluster::tls::{ClusterTls, TlsFiles};
    use berth::cluster::ClusterAdmin;
    let cl = TestCluster::start(3, 10_000).await;
    let leader = cl.wait_leader_everywhere().await;
    assert!(admin(&cl.grpc(leader)).node_status().await.is_ok(), "the operator's certificate works");
    let plain = ClusterAdmin::new(&cl.grpc(leader), None).node_status().await;
    assert!(plain.is_err(), "a plain-text client was answered");
    let other = tempfile::tempdir().unwrap();
    berth::cluster::tls::generate(other.path(), &[4]).unwrap();
    let foreign = ClusterTls::load(&TlsFiles::admin_in(other.path())).unwrap();
    let r = ClusterAdmin::new(&cl.grpc(leader), Some(foreign)).node_status().await;
    assert!(r.is_err(), "a client of another CA was answered");

    // A standby node whose certificate another CA signed: the join fails.
    let (http, grpc) = (free_port(), free_port());
    let f = TlsFiles::node_in(other.path(), 4);
    let config = cl.dir.path().join("foreign.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 4\nhttp = \"127.0.0.1:{http}\"\ngrpc = \"127.0.0.1:{grpc}\"\ndata_dir = \"{}\"\nstandby = true\n\
             [cluster_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            cl.dir.path().join("data-foreign").display(),
            f.ca.display(),
            f.cert.display(),
            f.key.display()
        ),
    )
    .unwrap();
    let _foreign_node = spawn_serve(&["--config".into(), config.display().to_string()], http).await;
    let out = berth()
        .args(["cluster", "join", "--node", &cl.grpc(leader), "--id", "4"])
        .args(["--addr", &format!("127.0.0.1:{grpc}"), "--api", &format!("127.0.0.1:{http}")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "joined: {}", String::from_utf8_lossy(&out.stdout));
    let members = cl.status(leader).await.unwrap().members;
    assert_eq!(members.len(), 3, "{members:?}");

    // Blob bytes: only on the cluster port, only to the cluster's members.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = push_blob(&client(), &cl.base(leader), "guarded", &data).await;
    let public = client().get(format!("{}/_berth/blobs/{d}", cl.base(leader))).send().await.unwrap();
    assert_eq!(public.status(), 404, "the public port serves blobs to peers");
    let cluster_id = u64::from_str_radix(&cl.status(leader).await.unwrap().cluster_id, 16).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let reader = |tls: Option<ClusterTls>, cluster: Option<u64>, dir: &str| {
        let db = berth::meta::open_db(&scratch.path().join(dir)).unwrap();
        let store = berth::meta::IdentityStore::new(db);
        let identity = berth::cluster::Identity::new(store.clone(), store.load_or_create(7).unwrap());
        if let Some(c) = cluster {
            identity.adopt(c).unwrap();
        }
        let blobs = berth::blob::BlobStore::new(scratch.path().join(format!("{dir}-blobs"))).unwrap();
        let peers = berth::cluster::Peers::new(identity, tls);
        berth::blob::Transfer::new(blobs, peers, berth::blob::Throttle::new(Default::default()))
    };
    let digest: berth::oci::Digest = d.parse().unwrap();
    let holder = cl.grpc(leader);
    let ours = berth::cluster::tls::ClusterTls::load(&TlsFiles::admin_in(common::certs())).ok();
    if common::admin_tls().is_some() {
        // Control: a process with the cluster's certificate and id reads it.
        let member = reader(ours.clone(), Some(cluster_id), "member");
        assert_eq!(member.copy_from(&digest, std::slice::from_ref(&holder)).await.unwrap(), data.len() as u64);
        let wrong_ca =
            reader(Some(ClusterTls::load(&TlsFiles::admin_in(other.path())).unwrap()), Some(cluster_id), "a");
        assert!(wrong_ca.read(&holder, &digest, 0, false).await.is_err(), "a certificate of another CA read a blob");
        let plain = reader(None, Some(cluster_id), "b");
        assert!(plain.read(&holder, &digest, 0, false).await.is_err(), "a plain-text client read a blob");
    }
    for (cluster, dir) in [(None, "c"), (Some(cluster_id ^ 1), "d")] {
        let outsider = reader(ours.clone(), cluster, dir);
        let r = outsider.read(&holder, &digest, 0, false).await;
        assert!(matches!(r, Err(berth::blob::TransferError::Refused(_))), "{cluster:?}: {:?}", r.err());
    }
}
