//! The V2 API of one in-process node, endpoint by endpoint, with every
//! error code the spec names.

mod common;

use common::*;

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let n = start_node().await;
    let r = client().get(format!("{}/v2/", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["Docker-Distribution-API-Version"], "registry/2.0");
    n.node.shutdown().await;
}

#[tokio::test]
async fn monolithic_blob_push_get_head_range() {
    let n = start_node().await;
    let c = client();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = push_blob(&c, &n.base, "lib/app", &data).await;
    let url = format!("{}/v2/lib/app/blobs/{d}", n.base);

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["Docker-Content-Digest"], d.as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["Content-Length"], "100000");

    let r = c.get(&url).header("Range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["Content-Range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);

    let r = c.get(&url).header("Range", "bytes=-5").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[data.len() - 5..]);

    let r = c.get(&url).header("Range", "bytes=200000-").send().await.unwrap();
    assert_eq!(r.status(), 416);

    // Not linked into another repository.
    let r = c.get(format!("{}/v2/other/blobs/{d}", n.base)).send().await.unwrap();
    expect_error(r, 404, "BLOB_UNKNOWN").await;
    n.node.shutdown().await;
}

#[tokio::test]
async fn chunked_upload_with_status_out_of_order_and_final_chunk() {
    let n = start_node().await;
    let c = client();
    let data = b"hello chunked world, in three parts".to_vec();
    let d = sha256(&data);

    let r = c.post(format!("{}/v2/repo/blobs/uploads/", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    assert!(r.headers().contains_key("Docker-Upload-UUID"));
    let url = format!("{}{loc}", n.base);

    let r = c.patch(&url).header("Content-Range", "0-9").body(data[..10].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["Range"], "0-9");

    // A chunk that does not start where the last one ended.
    let r = c.patch(&url).header("Content-Range", "15-19").body(data[15..20].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["Range"], "0-9");

    // A streamed chunk without Content-Range appends.
    let r = c.patch(&url).body(data[10..20].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["Range"], "0-19");

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["Range"], "0-19");

    let r = c.put(format!("{url}?digest={d}")).body(data[20..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["Location"], format!("/v2/repo/blobs/{d}").as_str());

    let got = c.get(format!("{}/v2/repo/blobs/{d}", n.base)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), &data[..]);
    // The session is gone once completed.
    expect_error(c.get(&url).send().await.unwrap(), 404, "BLOB_UPLOAD_UNKNOWN").await;
    n.node.shutdown().await;
}

#[tokio::test]
async fn wrong_digest_is_refused_and_nothing_is_stored() {
    let n = start_node().await;
    let c = client();
    let wrong = sha256(b"something else");
    let r = c
        .post(format!("{}/v2/repo/blobs/uploads/?digest={wrong}", n.base))
        .body(b"actual bytes".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID").await;
    let r = c.get(format!("{}/v2/repo/blobs/{wrong}", n.base)).send().await.unwrap();
    expect_error(r, 404, "BLOB_UNKNOWN").await;
    let r = c.get(format!("{}/v2/repo/blobs/{}", n.base, sha256(b"actual bytes"))).send().await.unwrap();
    expect_error(r, 404, "BLOB_UNKNOWN").await;
    assert!(files_under(&n.dir.path().join("blobs")).is_empty());
    assert!(files_under(&n.dir.path().join("uploads")).is_empty());

    // Malformed digests.
    for bad in ["sha256:abc", "sha256:../../etc/passwd", "md5:d41d8cd98f00b204e9800998ecf8427e"] {
        let r = c.post(format!("{}/v2/repo/blobs/uploads/?digest={bad}", n.base)).body("x").send().await.unwrap();
        expect_error(r, 400, "DIGEST_INVALID").await;
    }
    n.node.shutdown().await;
}

#[tokio::test]
async fn cancel_upload_and_unknown_upload() {
    let n = start_node().await;
    let c = client();
    let r = c.post(format!("{}/v2/repo/blobs/uploads/", n.base)).send().await.unwrap();
    let url = format!("{}{}", n.base, r.headers()["Location"].to_str().unwrap());
    c.patch(&url).body("partial").send().await.unwrap();
    assert_eq!(c.delete(&url).send().await.unwrap().status(), 204);
    expect_error(c.get(&url).send().await.unwrap(), 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(c.patch(&url).body("x").send().await.unwrap(), 404, "BLOB_UPLOAD_UNKNOWN").await;
    let r = c.get(format!("{}/v2/repo/blobs/uploads/1-{}", n.base, "0".repeat(32))).send().await.unwrap();
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let r = c.get(format!("{}/v2/repo/blobs/uploads/garbage", n.base)).send().await.unwrap();
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN").await;
    // An upload id of one repository is unknown in another.
    let r = c.post(format!("{}/v2/a/blobs/uploads/", n.base)).send().await.unwrap();
    let loc = r.headers()["Location"].to_str().unwrap().replace("/v2/a/", "/v2/b/");
    expect_error(c.get(format!("{}{loc}", n.base)).send().await.unwrap(), 404, "BLOB_UPLOAD_UNKNOWN").await;
    assert!(files_under(&n.dir.path().join("blobs")).is_empty());
    n.node.shutdown().await;
}

#[tokio::test]
async fn cross_repository_mount_with_and_without_from() {
    let n = start_node().await;
    let c = client();
    let d = push_blob(&c, &n.base, "src", b"shared layer").await;
    let r = c.post(format!("{}/v2/dst/blobs/uploads/?mount={d}&from=src", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["Location"], format!("/v2/dst/blobs/{d}").as_str());
    let r = c.post(format!("{}/v2/anon/blobs/uploads/?mount={d}", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(c.get(format!("{}/v2/anon/blobs/{d}", n.base)).send().await.unwrap().status(), 200);
    // Unknown blob: a normal upload session instead.
    let r =
        c.post(format!("{}/v2/dst/blobs/uploads/?mount={}&from=src", n.base, sha256(b"nope"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // A malformed mount is refused and opens no session.
    let sessions = files_under(&n.dir.path().join("uploads")).len();
    let r = c.post(format!("{}/v2/dst/blobs/uploads/?mount=sha256:zz&from=src", n.base)).send().await.unwrap();
    expect_error(r, 400, "DIGEST_INVALID").await;
    let r = c.post(format!("{}/v2/dst/blobs/uploads/?mount={d}&from=../src", n.base)).send().await.unwrap();
    expect_error(r, 400, "NAME_INVALID").await;
    assert_eq!(files_under(&n.dir.path().join("uploads")).len(), sessions);
    n.node.shutdown().await;
}

#[tokio::test]
async fn manifests_by_tag_and_digest_with_errors() {
    let n = start_node().await;
    let c = client();
    let (md, m) = push_image(&c, &n.base, "img", "v1", "a").await;

    for reference in ["v1", md.as_str()] {
        let r = c.get(format!("{}/v2/img/manifests/{reference}", n.base)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["Content-Type"], OCI_MANIFEST);
        assert_eq!(r.headers()["Docker-Content-Digest"], md.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    }
    let r = c.head(format!("{}/v2/img/manifests/v1", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["Content-Length"], m.len().to_string().as_str());

    // Accept negotiation: a client that only takes Docker manifests.
    let r = c
        .get(format!("{}/v2/img/manifests/v1", n.base))
        .header("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "MANIFEST_UNKNOWN").await;

    let r = c.get(format!("{}/v2/img/manifests/nope", n.base)).send().await.unwrap();
    expect_error(r, 404, "MANIFEST_UNKNOWN").await;

    // PUT by a digest that does not match the body.
    let r = c
        .put(format!("{}/v2/img/manifests/{}", n.base, sha256(b"x")))
        .header("Content-Type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID").await;

    // Unknown blob references.
    let missing = image_manifest((&sha256(b"no config"), 9), &[], "");
    let r = c
        .put(format!("{}/v2/img/manifests/broken", n.base))
        .header("Content-Type", OCI_MANIFEST)
        .body(missing)
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "MANIFEST_BLOB_UNKNOWN").await;

    // Garbage and wrong content types.
    for (ct, body) in [
        (OCI_MANIFEST, b"not json".to_vec()),
        (OCI_MANIFEST, br#"{"schemaVersion":2}"#.to_vec()),
        ("text/plain", m.clone()),
        (OCI_INDEX, m.clone()),
    ] {
        let r = c
            .put(format!("{}/v2/img/manifests/bad", n.base))
            .header("Content-Type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        expect_error(r, 400, "MANIFEST_INVALID").await;
    }

    // Oversized.
    let huge = vec![b' '; 5 << 20];
    let r = c
        .put(format!("{}/v2/img/manifests/huge", n.base))
        .header("Content-Type", OCI_MANIFEST)
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "SIZE_INVALID").await;

    // Invalid tag.
    let r = c
        .put(format!("{}/v2/img/manifests/.bad", n.base))
        .header("Content-Type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "TAG_INVALID").await;

    for bad in ["bad", "broken", "huge"] {
        let r = c.get(format!("{}/v2/img/manifests/{bad}", n.base)).send().await.unwrap();
        expect_error(r, 404, "MANIFEST_UNKNOWN").await;
    }
    n.node.shutdown().await;
}

#[tokio::test]
async fn index_needs_its_children_and_tag_params_answer_oci_tag() {
    let n = start_node().await;
    let c = client();
    let (child, _) = push_image(&c, &n.base, "multi", "child", "c").await;
    let index = |d: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":10}}]}}"#
        )
        .into_bytes()
    };
    let bad = index(&sha256(b"absent"));
    let r = c
        .put(format!("{}/v2/multi/manifests/idx", n.base))
        .header("Content-Type", OCI_INDEX)
        .body(bad)
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "MANIFEST_BLOB_UNKNOWN").await;

    let good = index(&child);
    let gd = sha256(&good);
    let r = c
        .put(format!("{}/v2/multi/manifests/{gd}?tag=one&tag=two", n.base))
        .header("Content-Type", OCI_INDEX)
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let tags: Vec<_> = r.headers().get_all("OCI-Tag").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(tags, ["one", "two"]);
    for t in ["one", "two"] {
        let r = c.get(format!("{}/v2/multi/manifests/{t}", n.base)).send().await.unwrap();
        assert_eq!(r.headers()["Docker-Content-Digest"], gd.as_str());
        assert_eq!(r.headers()["Content-Type"], OCI_INDEX);
    }
    n.node.shutdown().await;
}

#[tokio::test]
async fn tag_list_and_catalog_paginate_with_links() {
    let n = start_node().await;
    let c = client();
    let (md, m) = push_image(&c, &n.base, "pages", "t0", "p").await;
    for t in ["t1", "t2", "t3", "t4"] {
        let r = c
            .put(format!("{}/v2/pages/manifests/{t}", n.base))
            .header("Content-Type", OCI_MANIFEST)
            .body(m.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["Docker-Content-Digest"], md.as_str());
    }
    let r = c.get(format!("{}/v2/pages/tags/list", n.base)).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["t0", "t1", "t2", "t3", "t4"]));

    let r = c.get(format!("{}/v2/pages/tags/list?n=2", n.base)).send().await.unwrap();
    assert_eq!(r.headers()["Link"], "</v2/pages/tags/list?n=2&last=t1>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["t0", "t1"]));

    let r = c.get(format!("{}/v2/pages/tags/list?n=2&last=t3", n.base)).send().await.unwrap();
    assert!(r.headers().get("Link").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["t4"]));

    let r = c.get(format!("{}/v2/pages/tags/list?n=0", n.base)).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));

    push_blob(&c, &n.base, "another", b"x").await;
    let r = c.get(format!("{}/v2/_catalog?n=1", n.base)).send().await.unwrap();
    assert_eq!(r.headers()["Link"], "</v2/_catalog?n=1&last=another>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["another"]));
    let v: serde_json::Value = c.get(format!("{}/v2/_catalog", n.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["another", "pages"]));

    let r = c.get(format!("{}/v2/unknown/tags/list", n.base)).send().await.unwrap();
    expect_error(r, 404, "NAME_UNKNOWN").await;
    n.node.shutdown().await;
}

#[tokio::test]
async fn referrers_with_artifact_type_filter() {
    let n = start_node().await;
    let c = client();
    let (subject, m) = push_image(&c, &n.base, "ref", "base", "s").await;
    let empty = push_blob(&c, &n.base, "ref", b"{}").await;
    let mut artifacts = Vec::new();
    for (i, at) in ["application/vnd.example.sbom", "application/vnd.example.sig"].iter().enumerate() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{at}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{}}},"annotations":{{"n":"{i}"}}}}"#,
            m.len()
        );
        let d = sha256(body.as_bytes());
        let r = c
            .put(format!("{}/v2/ref/manifests/{d}", n.base))
            .header("Content-Type", OCI_MANIFEST)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["OCI-Subject"], subject.as_str());
        artifacts.push(d);
    }
    let r = c.get(format!("{}/v2/ref/referrers/{subject}", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["Content-Type"], OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);

    let r = c
        .get(format!("{}/v2/ref/referrers/{subject}?artifactType=application/vnd.example.sig", n.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["OCI-Filters-Applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    let ms = v["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0]["digest"], artifacts[1].as_str());
    assert_eq!(ms[0]["artifactType"], "application/vnd.example.sig");
    assert_eq!(ms[0]["annotations"]["n"], "1");

    // Paginated: one descriptor a page, the Link leading to the next, every
    // referrer exactly once.
    let mut url = format!("{}/v2/ref/referrers/{subject}?n=1", n.base);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let link = r.headers().get("Link").map(|l| l.to_str().unwrap().to_owned());
        let v: serde_json::Value = r.json().await.unwrap();
        let ms = v["manifests"].as_array().unwrap();
        assert_eq!(ms.len(), 1, "{v}");
        seen.push(ms[0]["digest"].as_str().unwrap().to_owned());
        match link {
            Some(l) => {
                let path = l.trim_start_matches('<').split('>').next().unwrap().to_owned();
                assert!(path.starts_with("/v2/ref/referrers/") && l.ends_with("rel=\"next\""), "{l}");
                url = format!("{}{path}", n.base);
            }
            None => break,
        }
    }
    let mut want = artifacts.clone();
    want.sort();
    assert_eq!(seen, want, "every referrer once, in digest order");

    // Deleting a referrer removes it from the list.
    let r = c.delete(format!("{}/v2/ref/manifests/{}", n.base, artifacts[0])).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value =
        c.get(format!("{}/v2/ref/referrers/{subject}", n.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);

    let r = c.get(format!("{}/v2/ref/referrers/sha256:nothex", n.base)).send().await.unwrap();
    expect_error(r, 400, "DIGEST_INVALID").await;
    n.node.shutdown().await;
}

#[tokio::test]
async fn deletes_of_tags_manifests_and_blobs() {
    let n = start_node().await;
    let c = client();
    let (md, m) = push_image(&c, &n.base, "del", "keep", "d").await;
    let r = c
        .put(format!("{}/v2/del/manifests/drop", n.base))
        .header("Content-Type", OCI_MANIFEST)
        .body(m)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    assert_eq!(c.delete(format!("{}/v2/del/manifests/drop", n.base)).send().await.unwrap().status(), 202);
    expect_error(c.get(format!("{}/v2/del/manifests/drop", n.base)).send().await.unwrap(), 404, "MANIFEST_UNKNOWN")
        .await;
    assert_eq!(c.get(format!("{}/v2/del/manifests/keep", n.base)).send().await.unwrap().status(), 200);

    assert_eq!(c.delete(format!("{}/v2/del/manifests/{md}", n.base)).send().await.unwrap().status(), 202);
    for r in ["keep", md.as_str()] {
        let resp = c.get(format!("{}/v2/del/manifests/{r}", n.base)).send().await.unwrap();
        expect_error(resp, 404, "MANIFEST_UNKNOWN").await;
    }
    let r = c.delete(format!("{}/v2/del/manifests/{md}", n.base)).send().await.unwrap();
    expect_error(r, 404, "MANIFEST_UNKNOWN").await;

    let d = push_blob(&c, &n.base, "del", b"blob to delete").await;
    assert_eq!(c.delete(format!("{}/v2/del/blobs/{d}", n.base)).send().await.unwrap().status(), 202);
    expect_error(c.get(format!("{}/v2/del/blobs/{d}", n.base)).send().await.unwrap(), 404, "BLOB_UNKNOWN").await;
    expect_error(c.delete(format!("{}/v2/del/blobs/{d}", n.base)).send().await.unwrap(), 404, "BLOB_UNKNOWN").await;
    n.node.shutdown().await;
}

#[tokio::test]
async fn invalid_names_and_methods() {
    let n = start_node().await;
    let c = client();
    for path in ["/v2/UPPER/tags/list", "/v2/a/../b/tags/list", "/v2/a//b/manifests/x", "/v2/-a/blobs/uploads/"] {
        let r = c.get(format!("{}{path}", n.base)).send().await.unwrap();
        // `..` may be normalized away by the client: then it is simply unknown.
        assert!(r.status() == 400 || r.status() == 404, "{path}: {}", r.status());
        if r.status() == 400 {
            expect_error(r, 400, "NAME_INVALID").await;
        }
    }
    let r = c.post(format!("{}/v2/UPPER/blobs/uploads/", n.base)).send().await.unwrap();
    expect_error(r, 400, "NAME_INVALID").await;
    let r = c.post(format!("{}/v2/ok/manifests/latest", n.base)).send().await.unwrap();
    expect_error(r, 405, "UNSUPPORTED").await;
    assert!(files_under(&n.dir.path().join("blobs")).is_empty());
    n.node.shutdown().await;
}

#[tokio::test]
async fn sha512_blobs_and_manifests() {
    use sha2::{Digest as _, Sha512};
    let n = start_node().await;
    let c = client();
    let data = b"sha512 content".to_vec();
    let d = format!("sha512:{}", hex::encode(Sha512::digest(&data)));
    let r = c.post(format!("{}/v2/s5/blobs/uploads/?digest={d}", n.base)).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(format!("{}/v2/s5/blobs/{d}", n.base)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), &data[..]);
    n.node.shutdown().await;
}

#[tokio::test]
async fn truncated_upload_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n = start_node().await;
    let c = client();
    let r = c.post(format!("{}/v2/trunc/blobs/uploads/", n.base)).send().await.unwrap();
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    let r = c.patch(format!("{}{loc}", n.base)).body("0123456789").send().await.unwrap();
    assert_eq!(r.headers()["Range"], "0-9");

    // Declare 1000 bytes, send 10, stop sending: the node answers the
    // half-closed connection with the spec's error for a broken body.
    let mut s = tokio::net::TcpStream::connect(n.node.http_addr).await.unwrap();
    let req = format!("PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabcdefghij");
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"BLOB_UPLOAD_INVALID\""), "{answer}");

    // The session still holds exactly the first chunk.
    let url = format!("{}{loc}", n.base);
    wait_for("truncated chunk rolled back", std::time::Duration::from_secs(10), || {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.get(&url).send().await.unwrap();
            r.headers().get("Range").map(|v| v == "0-9").unwrap_or(false)
        }
    })
    .await;
    let r = c.put(format!("{url}?digest={}", sha256(b"0123456789"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    n.node.shutdown().await;
}

/// Some clients send a whole request, then shut their write side while
/// they wait for the answer: the push must still happen and be answered.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n = start_node().await;
    let body = b"sent, then half-closed";
    let digest = sha256(body);
    let mut s = tokio::net::TcpStream::connect(n.node.http_addr).await.unwrap();
    let head = format!(
        "POST /v2/halfclose/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer:?}");
    let r = client().get(format!("{}/v2/halfclose/blobs/{digest}", n.base)).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), body);
    n.node.shutdown().await;
}

/// A table of malformed requests, each answered with a 4xx (never a 5xx),
/// leaving no blob, no new upload session and no repository behind.
#[tokio::test]
async fn malformed_requests_get_4xx_and_store_nothing() {
    let n = start_node().await;
    let c = client();
    let r = c.post(format!("{}/v2/p/blobs/uploads/", n.base)).send().await.unwrap();
    let session = r.headers()["Location"].to_str().unwrap().to_owned();
    let stored = || [files_under(&n.dir.path().join("blobs")), files_under(&n.dir.path().join("uploads"))];
    let before = stored();
    let a64 = "a".repeat(64);
    let manifest = "application/vnd.oci.image.manifest.v1+json";
    let index = "application/vnd.oci.image.index.v1+json";
    // (method, path, headers, body)
    type Case = (&'static str, String, Vec<(&'static str, &'static str)>, Vec<u8>);
    let cases: Vec<Case> = vec![
        ("GET", "/v2/p/blobs/sha256:zz".into(), vec![], vec![]),
        ("GET", "/v2/p/blobs/md5:abc".into(), vec![], vec![]),
        ("GET", format!("/v2/p/blobs/sha256:{}", "A".repeat(64)), vec![], vec![]),
        ("GET", format!("/v2/p/blobs/sha512:{a64}"), vec![], vec![]),
        ("GET", format!("/v2/p/blobs/sha256:{a64}"), vec![("Range", "bytes=5-1")], vec![]),
        ("GET", format!("/v2/p/blobs/{}", "x".repeat(10_000)), vec![], vec![]),
        ("POST", "/v2/p/blobs/uploads/?digest=sha256:bad".into(), vec![], b"abc".to_vec()),
        ("POST", format!("/v2/p/blobs/uploads/?digest={}", sha256(b"abd")), vec![], b"abc".to_vec()),
        ("POST", "/v2/p/blobs/uploads/?digest=".into(), vec![], vec![]),
        ("POST", "/v2/p/blobs/uploads/?mount=sha256:bad&from=q".into(), vec![], vec![]),
        ("POST", format!("/v2/p/blobs/uploads/?mount={}&from=A/..", sha256(b"x")), vec![], vec![]),
        ("PATCH", session.clone(), vec![("Content-Range", "abc")], b"abc".to_vec()),
        ("PATCH", session.clone(), vec![("Content-Range", "5-2")], b"abc".to_vec()),
        ("PATCH", session.clone(), vec![("Content-Range", "0-99999999999999999999999")], b"abc".to_vec()),
        ("PATCH", session.clone(), vec![("Content-Range", "18446744073709551615-18446744073709551615")], b"a".to_vec()),
        ("PATCH", session.clone(), vec![("Content-Range", "0-1")], b"abc".to_vec()),
        ("PATCH", "/v2/p/blobs/uploads/%2e%2e".into(), vec![], b"x".to_vec()),
        ("PUT", format!("/v2/p/blobs/uploads/1-{}?digest={}", "0".repeat(32), sha256(b"")), vec![], vec![]),
        ("PUT", "/v2/p/manifests/latest".into(), vec![("Content-Type", manifest)], b"{not json".to_vec()),
        ("PUT", "/v2/p/manifests/latest".into(), vec![("Content-Type", manifest)], b"[]".to_vec()),
        ("PUT", "/v2/p/manifests/latest".into(), vec![("Content-Type", manifest)], br#"{"schemaVersion":2}"#.to_vec()),
        ("PUT", "/v2/p/manifests/latest".into(), vec![("Content-Type", manifest)], vec![0xff, 0xfe, 0xfd]),
        (
            "PUT",
            "/v2/p/manifests/latest".into(),
            vec![("Content-Type", manifest)],
            format!(r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"sha256:{a64}","size":18446744073709551616}},"layers":[]}}"#).into_bytes(),
        ),
        ("PUT", "/v2/p/manifests/latest".into(), vec![("Content-Type", index)], br#"{"schemaVersion":2,"manifests":{}}"#.to_vec()),
        ("PUT", "/v2/p/manifests/latest".into(), vec![("Content-Type", "text/plain")], b"hello".to_vec()),
        ("PUT", format!("/v2/p/manifests/{}", "t".repeat(200)), vec![("Content-Type", manifest)], b"{}".to_vec()),
        ("PUT", "/v2/p/manifests/sha256:zz".into(), vec![("Content-Type", manifest)], b"{}".to_vec()),
        ("GET", "/v2/p/tags/list?n=-1".into(), vec![], vec![]),
        ("GET", "/v2/p/tags/list?n=99999999999999999999".into(), vec![], vec![]),
        ("GET", "/v2/p/referrers/bad".into(), vec![], vec![]),
        ("DELETE", "/v2/p/manifests/sha256:zz".into(), vec![], vec![]),
        ("GET", "/v2/%ff/tags/list".into(), vec![], vec![]),
        ("GET", format!("/v2/a/{}tags/list", "b/".repeat(200)), vec![], vec![]),
        ("BREW", "/v2/p/manifests/x".into(), vec![], vec![]),
        ("GET", "/_berth/blobs/bad".into(), vec![], vec![]),
    ];
    for (method, path, headers, body) in cases {
        let mut req = c.request(method.parse().unwrap(), format!("{}{path}", n.base)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let status = req.send().await.unwrap().status();
        assert!(status.is_client_error(), "{method} {path}: {status}");
    }
    assert_eq!(stored(), before, "blob or upload files changed");
    let catalog: serde_json::Value =
        c.get(format!("{}/v2/_catalog", n.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!([]));
    n.node.shutdown().await;
}

/// `/metrics` counts requests by endpoint and status (not by repository)
/// and shows this node's Raft state, in Prometheus' text format.
#[tokio::test]
async fn metrics_count_requests_by_endpoint_and_show_raft() {
    let n = start_node().await;
    let c = client();
    push_image(&c, &n.base, "metrics/app", "v1", "m").await;
    assert_eq!(c.get(format!("{}/v2/metrics/app/manifests/v1", n.base)).send().await.unwrap().status(), 200);
    assert_eq!(c.get(format!("{}/v2/metrics/app/manifests/nope", n.base)).send().await.unwrap().status(), 404);
    assert_eq!(c.get(format!("{}/v2/Bad..Name/tags/list", n.base)).send().await.unwrap().status(), 400);

    let r = c.get(format!("{}/metrics", n.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["Content-Type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    let value = |series: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value(r#"berth_http_requests_total{method="PUT",route="manifest",status="201"}"#), 1.0);
    assert_eq!(value(r#"berth_http_requests_total{method="GET",route="manifest",status="200"}"#), 1.0);
    assert_eq!(value(r#"berth_http_requests_total{method="GET",route="manifest",status="404"}"#), 1.0);
    assert_eq!(value(r#"berth_http_requests_total{method="GET",route="invalid",status="400"}"#), 1.0);
    assert_eq!(value(r#"berth_http_request_duration_seconds_count{method="GET",route="manifest"}"#), 2.0);
    assert!(!text.contains("metrics/app"), "repository names are not labels");
    assert_eq!(value("berth_raft_is_leader"), 1.0);
    assert_eq!(value("berth_raft_voters"), 1.0);
    let applied = value("berth_raft_applied_index");
    assert!(applied >= 2.0, "the pushes went through Raft");
    assert!(value("berth_raft_commit_index") >= applied);
    assert!(value("berth_raft_term") >= 1.0);

    // Made-up methods are one label, "other": the exposition does not grow.
    let size = |c: reqwest::Client, base: String| async move {
        c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap().len()
    };
    let made_up = |i: usize| reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
    c.request(made_up(0), format!("{}/v2/", n.base)).send().await.unwrap();
    // The first scrape adds its own series; measure from the second.
    size(c.clone(), n.base.clone()).await;
    let before = size(c.clone(), n.base.clone()).await;
    for i in 1..200 {
        c.request(made_up(i), format!("{}/v2/", n.base)).send().await.unwrap();
    }
    let after = size(c.clone(), n.base.clone()).await;
    // Only counter and histogram digits may grow (a few bytes).
    assert!(after < before + 64, "metrics grew from {before} to {after} bytes");
    n.node.shutdown().await;
}
