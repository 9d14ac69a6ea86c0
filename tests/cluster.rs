//! Three- and five-node clusters of real `berth serve` processes: writes
//! through followers, linearizable reads on other followers, leader
//! failure, restart and catch-up, join and leave, snapshot install.

mod common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

/// Tag `tag` in `repo` to the manifest `m` (whose blobs are in `repo`).
/// `tag`, retried while the node answers 503: a write racing an election
/// may be told to come back, but must never be lost or fail otherwise.
async fn tag_retrying(c: &reqwest::Client, base: &str, repo: &str, t: &str, m: &[u8]) -> reqwest::StatusCode {
    let mut status = tag(c, base, repo, t, m).await;
    while status == 503 {
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
    let v: serde_json::Value =
        c.get(format!("{}/v2/app/tags/list", cl.base(leader))).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), acked.len());

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
        let v: serde_json::Value =
            c.get(format!("{}/v2/five/tags/list", cl.base(i))).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["tags"].as_array().unwrap().len(), 11, "node {i}");
    }
}

#[tokio::test]
async fn a_node_joins_under_load_and_another_leaves() {
    let cl = TestCluster::start(3, 10_000).await;
    let c = client();
    let leader = cl.wait_leader_everywhere().await;
    let (_, m) = push_image(&c, &cl.base(leader), "grow", "base", "grow").await;

    // Writes keep going while node 4 joins.
    let writer = {
        let c = c.clone();
        let base = cl.base(leader);
        let m = m.clone();
        tokio::spawn(async move {
            let mut n = 0;
            for i in 0..60 {
                if tag(&c, &base, "grow", &format!("load{i}"), &m).await == 201 {
                    n += 1;
                }
            }
            n
        })
    };
    let (http, grpc) = (free_port(), free_port());
    let data = cl.dir.path().join("data4");
    let args: Vec<String> = [
        "--node-id",
        "4",
        "--http",
        &format!("127.0.0.1:{http}"),
        "--grpc",
        &format!("127.0.0.1:{grpc}"),
        "--data-dir",
        &data.display().to_string(),
        "--join",
        &cl.grpc(leader),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _node4 = spawn_serve(&args, http).await;
    let written = writer.await.unwrap();
    assert_eq!(written, 60, "every write during the join succeeds");

    let admin = berth::cluster::ClusterAdmin::new(&cl.grpc(leader));
    wait_for("node 4 to become a voter", Duration::from_secs(60), || {
        let admin = &admin;
        async move {
            admin.status().await.is_ok_and(|rows| rows.iter().any(|r| r.id == 4 && r.role == "voter" && r.answers))
        }
    })
    .await;
    let base4 = format!("http://127.0.0.1:{http}");
    let v: serde_json::Value = c.get(format!("{base4}/v2/grow/tags/list")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 61);

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

    // Refused: removing voters until no majority would answer.
    let out = berth().args(["cluster", "status", "--node", &cl.grpc(leader)]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("voter"));
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
    let v: serde_json::Value =
        c.get(format!("{}/v2/snap/tags/list", cl.base(lagger))).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 10_001);
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
