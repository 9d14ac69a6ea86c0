//! Listings that scale (issue 16): tags, the catalog and referrers are read
//! a page at a time, each page from whichever node a load balancer picks,
//! while items are being added; every item that existed before the listing
//! began comes exactly once, in order, and nothing comes twice.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::TestCluster;
use common::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Follow `Link` headers from `first` (a path and query), each page from
/// the next node in turn, collecting what `items` takes out of each body.
async fn walk(
    c: &reqwest::Client,
    bases: &[String],
    first: String,
    items: impl Fn(&serde_json::Value) -> Vec<String>,
) -> Vec<String> {
    let mut path = first;
    let mut seen = Vec::new();
    for page in 0.. {
        assert!(page < 10_000, "the listing never ends");
        let base = &bases[page % bases.len()];
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let link = r.headers().get("Link").map(|l| l.to_str().unwrap().to_owned());
        let body: serde_json::Value = r.json().await.unwrap();
        let got = items(&body);
        assert!(got.len() <= 7, "a page holds at most n items: {body}");
        seen.extend(got);
        match link {
            Some(l) => path = l.trim_start_matches('<').split('>').next().unwrap().to_owned(),
            None => return seen,
        }
    }
    unreachable!()
}

/// An artifact manifest whose subject is `subject`, told apart by `i`.
fn referrer(subject: &str, subject_size: usize, i: usize) -> Vec<u8> {
    let empty = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size},
        "annotations": {"n": i.to_string()},
    })
    .to_string()
    .into_bytes()
}

/// Exactly once, in order, with every item of `before`.
fn check(what: &str, seen: &[String], before: &BTreeSet<String>) {
    for w in seen.windows(2) {
        assert!(w[0] < w[1], "{what}: {} then {}: out of order or twice", w[0], w[1]);
    }
    let seen: BTreeSet<&String> = seen.iter().collect();
    let missing: Vec<&String> = before.iter().filter(|b| !seen.contains(b)).collect();
    assert!(missing.is_empty(), "{what}: items that existed before the listing are missing: {missing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_from_any_node_give_every_item_once_while_items_are_added() {
    let cl = TestCluster::start(3, 10_000).await;
    let bases: Vec<String> = (0..3).map(|i| cl.base(i)).collect();
    let c = client();

    // Before: tags, repositories and referrers, names spread so that the
    // ones added later fall between them.
    let (subject, m) = push_image(&c, &bases[0], "list/tags", "seed", "seed").await;
    let mut tags = BTreeSet::from(["seed".to_string()]);
    for i in 0..40 {
        let t = format!("t{:02}", i * 2);
        assert!(tag(&c, &bases[i % 3], "list/tags", &t, &m).await.is_success());
        tags.insert(t);
    }
    let mut repos = BTreeSet::from(["list/tags".to_string()]);
    for i in 0..30 {
        let repo = format!("list/r{:02}", i * 2);
        push_image(&c, &bases[i % 3], &repo, "x", "r").await;
        repos.insert(repo);
    }
    let subject_size = m.len();
    push_blob(&c, &bases[0], "list/tags", b"{}").await;
    let mut refs = BTreeSet::new();
    for i in 0..25 {
        let body = referrer(&subject, subject_size, i);
        let d = sha256(&body);
        put_manifest(&c, &bases[i % 3], "list/tags", &d, &body).await;
        refs.insert(d);
    }

    // Writers add items of every kind, through every node, while the
    // listings run.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, bases, stop, m, subject) = (c.clone(), bases.clone(), stop.clone(), m.clone(), subject.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let base = &bases[i % 3];
                assert!(tag(&c, base, "list/tags", &format!("t{:02}", i * 2 + 1), &m).await.is_success());
                push_image(&c, base, &format!("list/r{:02}", i * 2 + 1), "x", "r").await;
                let body = referrer(&subject, subject_size, 1000 + i);
                put_manifest(&c, base, "list/tags", &sha256(&body), &body).await;
                i += 1;
            }
            i
        })
    };
    // Let the writers get going, then list, twice each.
    wait_for("writes under way", Duration::from_secs(30), || {
        let (c, base) = (c.clone(), bases[1].clone());
        async move {
            let r = c.get(format!("{base}/v2/list/tags/manifests/t01")).send().await;
            r.is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    for _ in 0..2 {
        let seen = walk(&c, &bases, "/v2/list/tags/tags/list?n=7".into(), |b| {
            b["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect()
        })
        .await;
        check("tags", &seen, &tags);
        let seen = walk(&c, &bases, "/v2/_catalog?n=7".into(), |b| {
            b["repositories"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect()
        })
        .await;
        check("catalog", &seen, &repos);
        let seen = walk(&c, &bases, format!("/v2/list/tags/referrers/{subject}?n=7"), |b| {
            b["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap().to_owned()).collect()
        })
        .await;
        check("referrers", &seen, &refs);
    }
    stop.store(true, Ordering::SeqCst);
    let added = writer.await.unwrap();
    assert!(added > 0, "items were added while the listings ran");
}
