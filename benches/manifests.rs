//! Manifest operations of one registry: PUT by tag (each a distinct manifest)
//! and GET by tag, at concurrency 1 and 64.
//!
//! `cargo bench --bench manifests -- [--registry HOST:PORT] [--secure [--http1]]`
//!
//! `--secure`: the node serves TLS with htpasswd auth and every request
//! carries credentials (`tests/common`: `tls_auth_settings`). The client
//! offers HTTP/2 by ALPN; with `--http1` it speaks HTTP/1.1 over TLS, as
//! the Docker engine does, one connection per concurrent request.
//!
//! Without `--registry` it starts a one-node `berth serve` on a temporary data
//! dir. `--registry HOST:PORT --secure --ca FILE` measures another registry
//! that serves TLS (trusting FILE) with the user `bench`/`bench-pw`. With it, it measures any other registry the same way (CNCF
//! Distribution, trow) for a same-session ratio. Blobs are pushed with POST
//! then PUT, which every registry supports.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, image_manifest, sha256, wait_for, OCI_MANIFEST};
use load::run;

const REPO: &str = "bench/manifests";

async fn push_blob(c: &reqwest::Client, base: &str, data: &[u8]) -> String {
    let digest = sha256(data);
    let r = c.post(format!("{base}/v2/{REPO}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202, "upload start");
    let loc = r.headers()["Location"].to_str().unwrap().to_owned();
    let url = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{url}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "upload close");
    digest
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let dir = tempfile::tempdir().unwrap();
    // A berth started here is killed when `_node` drops, at the end.
    let secure = args.iter().any(|a| a == "--secure");
    let http1 = args.iter().any(|a| a == "--http1");
    let builder = || {
        let b = reqwest::Client::builder().pool_max_idle_per_host(128);
        if http1 {
            b.http1_only()
        } else {
            b
        }
    };
    // A berth started here is killed when `_node` drops, at the end.
    let (base, c, _node) = match arg("--registry") {
        // Another registry serving TLS with a user: `--secure --ca FILE`,
        // the user `bench`, password `bench-pw` (as berth's --secure).
        Some(r) if secure => {
            let ca = std::path::PathBuf::from(arg("--ca").expect("--registry with --secure needs --ca FILE"));
            (format!("https://{r}"), common::tls_client_as(&ca, "bench", "bench-pw", builder()), None)
        }
        Some(r) => (format!("http://{r}"), builder().build().unwrap(), None),
        None => {
            let (http, grpc) = (free_port(), free_port());
            let (rest, ca) = if secure {
                common::tls_auth_settings(dir.path(), "bench", "bench-pw")
            } else {
                (String::new(), Default::default())
            };
            let args =
                common::write_config(&dir.path().join("berth.toml"), 1, http, grpc, &dir.path().join("data"), &rest);
            let node = common::Proc(
                common::berth().arg("serve").args(&args).stderr(std::process::Stdio::null()).spawn().unwrap(),
                None,
            );
            if secure {
                (
                    format!("https://localhost:{http}"),
                    common::tls_client_as(&ca, "bench", "bench-pw", builder()),
                    Some(node),
                )
            } else {
                (format!("http://127.0.0.1:{http}"), builder().build().unwrap(), Some(node))
            }
        }
    };
    wait_for("the registry to answer", Duration::from_secs(60), || {
        let (c, url) = (c.clone(), format!("{base}/v2/"));
        async move { c.get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;

    let config = push_blob(&c, &base, b"{\"bench\":1}!!").await;
    let layer = push_blob(&c, &base, &[7u8; 2000]).await;
    let counter = Arc::new(AtomicUsize::new(0));
    for (conc, total) in [(1, 300), (64, 6000)] {
        let (c, base, config, layer, counter) =
            (c.clone(), base.clone(), config.clone(), layer.clone(), counter.clone());
        let mut s = run(conc, total, move |_| {
            let (c, base) = (c.clone(), base.clone());
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let body = image_manifest((&config, 13), &[(&layer, 2000)], &format!(r#","annotations":{{"n":"{n}"}}"#));
            async move {
                let r = c
                    .put(format!("{base}/v2/{REPO}/manifests/t{n}"))
                    .header("Content-Type", OCI_MANIFEST)
                    .body(body)
                    .send()
                    .await;
                r.is_ok_and(|r| r.status() == 201)
            }
        })
        .await;
        s.print(&format!("manifest PUT by tag c={conc}"));
    }
    for (conc, total) in [(1, 1000), (64, 20000)] {
        let (c, base) = (c.clone(), base.clone());
        let mut s = run(conc, total, move |i| {
            let (c, base) = (c.clone(), base.clone());
            async move {
                let r = c
                    .get(format!("{base}/v2/{REPO}/manifests/t{}", i % 300))
                    .header("Accept", OCI_MANIFEST)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        })
        .await;
        s.print(&format!("manifest GET by tag c={conc}"));
    }
}
