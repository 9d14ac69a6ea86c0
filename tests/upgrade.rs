//! Upgrading: a node of this release starts on a data dir written by the
//! release before format 1 (bincode, no versions), converts it once, serves
//! everything it held, takes writes, and brings a new node in through a
//! snapshot. The data dir is a fixture made by that release
//! (`tests/fixtures/make-format0.py`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// The ports the fixture's node ran on: its membership records them.
const HTTP: u16 = 19871;
const GRPC: u16 = 19872;

#[derive(serde::Deserialize)]
struct Expect {
    tags: BTreeMap<String, BTreeMap<String, String>>,
    manifests: BTreeMap<String, String>,
    blobs: BTreeMap<String, u64>,
    referrers: BTreeMap<String, Vec<String>>,
    gone: Vec<String>,
}

fn split(item: &str) -> (&str, &str) {
    item.split_once('@').expect("repo@digest")
}

/// Everything the fixture holds, read from the node at `base`.
async fn check_everything(c: &reqwest::Client, base: &str, expect: &Expect) {
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
    for (repo, tags) in &expect.tags {
        let listed: serde_json::Value =
            c.get(format!("{base}/v2/{repo}/tags/list?n=1000")).send().await.unwrap().json().await.unwrap();
        let mut listed: Vec<String> =
            listed["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        // Tags the test pushes after the upgrade are not the fixture's.
        listed.retain(|t| !t.starts_with("after-"));
        listed.sort();
        let mut want: Vec<String> = tags.keys().cloned().collect();
        want.sort();
        assert_eq!(listed, want, "{repo}: tags");
        for (tag, digest) in tags {
            let r = c.get(format!("{base}/v2/{repo}/manifests/{tag}")).header("Accept", accept).send().await.unwrap();
            assert_eq!(r.status(), 200, "{repo}:{tag}");
            assert_eq!(r.headers()["docker-content-digest"], digest.as_str(), "{repo}:{tag}");
        }
    }
    for (item, media_type) in &expect.manifests {
        let (repo, digest) = split(item);
        let r = c.get(format!("{base}/v2/{repo}/manifests/{digest}")).header("Accept", accept).send().await.unwrap();
        assert_eq!(r.status(), 200, "{item}");
        assert_eq!(r.headers()["content-type"], media_type.as_str(), "{item}");
        assert_eq!(sha256(&r.bytes().await.unwrap()), *digest, "{item}: bytes");
    }
    for (item, size) in &expect.blobs {
        let (repo, digest) = split(item);
        let r = c.get(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{item}");
        let body = r.bytes().await.unwrap();
        assert_eq!((body.len() as u64, sha256(&body)), (*size, digest.to_string()), "{item}");
    }
    for (item, want) in &expect.referrers {
        let (repo, digest) = split(item);
        let r: serde_json::Value =
            c.get(format!("{base}/v2/{repo}/referrers/{digest}")).send().await.unwrap().json().await.unwrap();
        let got: Vec<&str> = r["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
        assert_eq!(got, *want, "referrers of {item}");
    }
    for item in &expect.gone {
        let (repo, digest) = split(item);
        let r = c.get(format!("{base}/v2/{repo}/manifests/{digest}")).header("Accept", accept).send().await.unwrap();
        assert_eq!(r.status(), 404, "{item} was deleted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_of_the_release_before_format_1_is_converted_and_serves_everything() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let expect: Expect = serde_json::from_slice(&std::fs::read(fixtures.join("format0-expect.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(fixtures.join("format0-node1.tar.gz"))
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    let data = dir.path().join("node1");
    let members = format!("[[initial_members]]\nid = 1\nhttp = \"127.0.0.1:{HTTP}\"\ngrpc = \"127.0.0.1:{GRPC}\"\n");
    let args = write_config(
        &dir.path().join("n1.toml"),
        1,
        HTTP,
        GRPC,
        &data,
        &format!("[raft]\nsnapshot_logs = 20\nkeep_logs = 4\n{members}"),
    );
    let c = client();
    let base = format!("http://127.0.0.1:{HTTP}");

    let node = spawn_serve(&args, HTTP).await;
    wait_for("the converted node to lead", Duration::from_secs(60), || {
        let admin = admin(&format!("127.0.0.1:{GRPC}"));
        async move { admin.node_status().await.is_ok_and(|s| s.leader == 1) }
    })
    .await;
    assert!(data.join("meta-format-0").is_dir(), "the old database is kept beside the converted one");
    // That release kept the Raft log in the database: its entries after
    // the last snapshot (19) are now in segment files, which the node read
    // to serve what they hold.
    let segments: Vec<_> = std::fs::read_dir(data.join("raft-log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert!(!segments.is_empty(), "the log's entries are in segment files");
    let in_segments: u64 = segments.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(in_segments > 19 * 16, "19 entries moved: {in_segments} bytes");
    assert_eq!(
        metric(&c, &base, "berth_meta_table_bytes{family=\"logs\"}").await,
        Some(0),
        "nothing is left in the database's log family"
    );
    check_everything(&c, &base, &expect).await;

    // It takes writes, and a restart finds the data dir current.
    let (d, _) = push_image(&c, &base, "fixture/app", "after-upgrade", "after").await;
    drop(node);
    let node = spawn_serve(&args, HTTP).await;
    check_everything(&c, &base, &expect).await;
    let r = c.get(format!("{base}/v2/fixture/app/manifests/after-upgrade")).send().await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());

    // A new node joins: node 1's log is purged, so node 2 is sent a
    // snapshot (a checkpoint node 1 takes when it asks) and installs it.
    let (http2, grpc2) = (free_port(), free_port());
    let args2 = join_flags(2, http2, grpc2, &dir.path().join("node2"), &format!("127.0.0.1:{GRPC}"));
    let _node2 = spawn_serve(&args2, http2).await;
    let admin1 = admin(&format!("127.0.0.1:{GRPC}"));
    wait_for("node 2 to become a voter", Duration::from_secs(60), || {
        let admin = &admin1;
        async move {
            admin.status().await.is_ok_and(|rows| rows.iter().any(|r| r.id == 2 && r.role == "voter" && r.answers))
        }
    })
    .await;
    // Node 2 builds snapshots only every 10,000 entries: a snapshot index
    // on node 2 is of a snapshot node 1 sent and node 2 installed.
    let admin2 = admin(&format!("127.0.0.1:{grpc2}"));
    wait_for("node 2 to install a snapshot", Duration::from_secs(60), || {
        let admin = &admin2;
        async move { admin.node_status().await.is_ok_and(|s| s.snapshot_index > 0) }
    })
    .await;
    check_everything(&c, &format!("http://127.0.0.1:{http2}"), &expect).await;
    drop(node);
}
