//! Repository policies on real clusters: immutable tags by pattern (the
//! same answer through every node, and under racing pushes) and retention
//! (keep the last N, drop by age, keep by pattern, untagged manifests,
//! never an index's child or a kept image's referrer; a dry run first).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

const IMMUTABLE: &str = "[[immutable]]\nname = \"releases\"\nrepos = \"prod/**\"\ntags = \"v*\"\n";

async fn put(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    m: &[u8],
) -> reqwest::Response {
    c.put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", media_type)
        .body(m.to_vec())
        .send()
        .await
        .unwrap()
}

/// Whatever `repo:tag` points at through node `base`.
async fn tag_digest(c: &reqwest::Client, base: &str, repo: &str, tag: &str) -> Option<String> {
    let r = c.head(format!("{base}/v2/{repo}/manifests/{tag}")).header("Accept", "*/*").send().await.unwrap();
    (r.status() == 200).then(|| r.headers()["docker-content-digest"].to_str().unwrap().to_owned())
}

/// A manifest over `repo`'s blobs made unique by `n`.
async fn variant(c: &reqwest::Client, base: &str, repo: &str, n: usize) -> Vec<u8> {
    let config = format!(r#"{{"n":{n}}}"#).into_bytes();
    let cd = push_blob(c, base, repo, &config).await;
    image_manifest((&cd, config.len()), &[], "")
}

/// A tag a rule covers never moves or goes, through any node; a tag no
/// rule covers (or in a repository no rule matches) moves freely. Of many
/// pushes racing to create the same immutable tag through three nodes,
/// exactly one wins and every node agrees which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_tags_never_move_and_racing_pushes_have_one_winner() {
    let cl = TestCluster::start_with(3, 100_000, |_| IMMUTABLE.to_owned()).await;
    let c = client();
    let (b0, b1, b2) = (cl.base(0), cl.base(1), cl.base(2));
    let a = variant(&c, &b0, "prod/app", 1).await;
    let b = variant(&c, &b0, "prod/app", 2).await;
    assert_eq!(put(&c, &b0, "prod/app", "v1", OCI_MANIFEST, &a).await.status(), 201);
    // Pushing the same manifest again is not a move.
    assert_eq!(put(&c, &b1, "prod/app", "v1", OCI_MANIFEST, &a).await.status(), 201);
    // Moving it is refused, naming the rule, through every node.
    for base in [&b0, &b1, &b2] {
        let r = put(&c, base, "prod/app", "v1", OCI_MANIFEST, &b).await;
        assert_eq!(r.status(), 403);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
        assert!(body["errors"][0]["message"].as_str().unwrap().contains("releases"), "{body}");
        // Nor can it, or the manifest it points at, be deleted.
        let r = c.delete(format!("{base}/v2/prod/app/manifests/v1")).send().await.unwrap();
        expect_error(r, 403, "DENIED").await;
        let r = c.delete(format!("{base}/v2/prod/app/manifests/{}", sha256(&a))).send().await.unwrap();
        expect_error(r, 403, "DENIED").await;
    }
    assert_eq!(tag_digest(&c, &b2, "prod/app", "v1").await, Some(sha256(&a)));
    // A refused PUT stored nothing: b is unknown by digest.
    assert_eq!(c.head(format!("{b0}/v2/prod/app/manifests/{}", sha256(&b))).send().await.unwrap().status(), 404);
    // Tags the pattern does not cover, and other repositories, move freely.
    assert_eq!(put(&c, &b0, "prod/app", "latest", OCI_MANIFEST, &a).await.status(), 201);
    assert_eq!(put(&c, &b1, "prod/app", "latest", OCI_MANIFEST, &b).await.status(), 201);
    let d = variant(&c, &b0, "dev/app", 1).await;
    let e = variant(&c, &b0, "dev/app", 2).await;
    assert_eq!(put(&c, &b0, "dev/app", "v1", OCI_MANIFEST, &d).await.status(), 201);
    assert_eq!(put(&c, &b2, "dev/app", "v1", OCI_MANIFEST, &e).await.status(), 201);
    assert_eq!(c.delete(format!("{b1}/v2/dev/app/manifests/v1")).send().await.unwrap().status(), 202);

    // Races: 6 different manifests pushed at once to each new tag, two
    // through each node.
    let mut manifests = Vec::new();
    for n in 0..6 {
        manifests.push(variant(&c, &b0, "prod/app", 100 + n).await);
    }
    for round in 0..5 {
        let tag = format!("v2.{round}");
        let mut tasks = Vec::new();
        for (n, m) in manifests.iter().enumerate() {
            let (c, base, tag, m) = (c.clone(), cl.base(n % 3), tag.clone(), m.clone());
            tasks.push(tokio::spawn(
                async move { (put(&c, &base, "prod/app", &tag, OCI_MANIFEST, &m).await.status(), m) },
            ));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (status, m) = t.await.unwrap();
            match status.as_u16() {
                201 => winners.push(sha256(&m)),
                403 => {}
                s => panic!("a racing push answered {s}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one push creates {tag}: {winners:?}");
        for i in 0..3 {
            assert_eq!(tag_digest(&c, &cl.base(i), "prod/app", &tag).await.as_ref(), Some(&winners[0]));
        }
    }
}

/// `berth retention` through member `i`: the lines it prints.
async fn retention(cl: &TestCluster, i: usize, dry_run: bool) -> Vec<String> {
    let mut lines = Vec::new();
    admin(&cl.grpc(i)).retention(dry_run, |l| lines.push(l)).await.unwrap();
    lines
}

async fn tags_of(c: &reqwest::Client, base: &str, repo: &str) -> BTreeSet<String> {
    let r: serde_json::Value = c.get(format!("{base}/v2/{repo}/tags/list")).send().await.unwrap().json().await.unwrap();
    r["tags"].as_array().map(|t| t.iter().map(|t| t.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

async fn has_manifest(c: &reqwest::Client, base: &str, repo: &str, digest: &str) -> bool {
    c.head(format!("{base}/v2/{repo}/manifests/{digest}")).header("Accept", "*/*").send().await.unwrap().status() == 200
}

/// keep_last counts by push time and skips kept patterns; untagged
/// manifests past their age go (those this run untags too), but never an
/// index's child, nor a referrer whose subject stays; a dry run names it
/// all and changes nothing; repositories no rule matches are untouched;
/// max_age removes what is older and keeps what is newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_the_kept_and_what_an_index_or_subject_needs() {
    let rules = "retention_interval_secs = 0\n\
        [[retention]]\nname = \"ci\"\nrepos = \"ci/**\"\nkeep_last = 2\nkeep_tags = [\"stable\", \"idx-*\"]\nuntagged_after = \"1s\"\n\
        [[retention]]\nname = \"aged\"\nrepos = \"old/**\"\nmax_age = \"8s\"\n"
        .to_owned();
    let cl = TestCluster::start_with(3, 100_000, move |_| rules.clone()).await;
    let c = client();
    let (b0, b1) = (cl.base(0), cl.base(1));
    let repo = "ci/app";
    // t1..t5 in push order, stable on m1.
    let mut m = Vec::new();
    for n in 1..=5 {
        let man = variant(&c, &b0, repo, n).await;
        assert_eq!(put(&c, &b1, repo, &format!("t{n}"), OCI_MANIFEST, &man).await.status(), 201);
        m.push(sha256(&man));
    }
    let m1 = variant(&c, &b0, repo, 1).await;
    assert_eq!(put(&c, &b0, repo, "stable", OCI_MANIFEST, &m1).await.status(), 201);
    // An index kept by pattern, over two children pushed by digest.
    let c1 = variant(&c, &b0, repo, 11).await;
    let c2 = variant(&c, &b0, repo, 12).await;
    for ch in [&c1, &c2] {
        assert_eq!(put(&c, &b0, repo, &sha256(ch), OCI_MANIFEST, ch).await.status(), 201);
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{}}}]}}"#,
        sha256(&c1),
        c1.len(),
        sha256(&c2),
        c2.len()
    )
    .into_bytes();
    assert_eq!(put(&c, &b0, repo, "idx-1", OCI_INDEX, &index).await.status(), 201);
    // An orphan pushed by digest, and a referrer of m5 (kept).
    let orphan = variant(&c, &b0, repo, 20).await;
    assert_eq!(put(&c, &b0, repo, &sha256(&orphan), OCI_MANIFEST, &orphan).await.status(), 201);
    let config = br#"{"sig":1}"#.to_vec();
    let cd = push_blob(&c, &b0, repo, &config).await;
    let subject = format!(r#","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}"#, m[4]);
    let referrer = image_manifest((&cd, config.len()), &[], &subject);
    assert_eq!(put(&c, &b0, repo, &sha256(&referrer), OCI_MANIFEST, &referrer).await.status(), 201);
    // A repository no rule matches.
    for n in 1..=4 {
        let man = variant(&c, &b0, "keep/app", n).await;
        assert_eq!(put(&c, &b0, "keep/app", &format!("t{n}"), OCI_MANIFEST, &man).await.status(), 201);
    }
    let mut aged = Vec::new();
    let old_a = variant(&c, &b0, "old/app", 1).await;
    assert_eq!(put(&c, &b0, "old/app", "a", OCI_MANIFEST, &old_a).await.status(), 201);
    aged.push(sha256(&old_a));

    // The dry run, once the untagged ones are past their second.
    let lines = std::sync::Mutex::new(Vec::new());
    wait_for("a dry run to name the orphan", Duration::from_secs(30), || async {
        let l = retention(&cl, 2, true).await;
        let found = l.iter().any(|l| l.contains(&sha256(&orphan)));
        *lines.lock().unwrap() = l;
        found
    })
    .await;
    let dry = lines.into_inner().unwrap().join("\n");
    for t in ["tag t1 ", "tag t2 ", "tag t3 "] {
        assert!(dry.contains(t), "{t} in {dry}");
    }
    for kept in ["tag t4 ", "tag t5 ", "tag stable", "tag idx-1"] {
        assert!(!dry.contains(kept), "{kept} not in {dry}");
    }
    for d in [&m[1], &m[2], &sha256(&orphan)] {
        assert!(dry.contains(&format!("manifest {d}")), "{d} in {dry}");
    }
    assert!(dry.contains("ci/app: would remove 3 tag(s) and 3 untagged manifest(s)"), "{dry}");
    assert_eq!(tags_of(&c, &b0, repo).await.len(), 7, "a dry run removes nothing");

    // Wait until old/app:a is past its 8 s, then push old/app:b and run.
    wait_for("old/app:a to age", Duration::from_secs(40), || async {
        retention(&cl, 0, true).await.iter().any(|l| l.starts_with("old/app:"))
    })
    .await;
    let old_b = variant(&c, &b0, "old/app", 2).await;
    assert_eq!(put(&c, &b0, "old/app", "b", OCI_MANIFEST, &old_b).await.status(), 201);
    let done = retention(&cl, 1, false).await.join("\n");
    assert!(done.contains("ci/app: removed 3 tag(s) and 3 untagged manifest(s)"), "{done}");

    for i in 0..3 {
        let base = cl.base(i);
        let want: BTreeSet<String> = ["t4", "t5", "stable", "idx-1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(tags_of(&c, &base, repo).await, want, "node {i}");
        for (d, present) in [
            (&m[0], true),
            (&m[1], false),
            (&m[2], false),
            (&m[3], true),
            (&m[4], true),
            (&sha256(&c1), true),
            (&sha256(&c2), true),
            (&sha256(&index), true),
            (&sha256(&orphan), false),
            (&sha256(&referrer), true),
        ] {
            assert_eq!(has_manifest(&c, &base, repo, d).await, present, "node {i}: {d}");
        }
        assert_eq!(tags_of(&c, &base, "keep/app").await.len(), 4);
        let old: BTreeSet<String> = ["b".to_owned()].into();
        assert_eq!(tags_of(&c, &base, "old/app").await, old, "node {i}");
    }
    // The referrer is still listed for its subject.
    let r: serde_json::Value =
        c.get(format!("{b0}/v2/{repo}/referrers/{}", m[4])).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["manifests"].as_array().unwrap().len(), 1, "{r}");
}
