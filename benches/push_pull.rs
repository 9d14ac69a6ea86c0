//! Blob push and pull throughput of one node, and the node's peak memory.
//!
//! `cargo bench --bench push_pull -- [--size-mib N] [--registry HOST:PORT] [--secure [--http1]]`
//!
//! `--secure`: the node serves TLS with htpasswd auth and every request
//! carries credentials (`tests/common`: `tls_auth_settings`). The client
//! offers HTTP/2 by ALPN; with `--http1` it speaks HTTP/1.1 over TLS, as
//! the Docker engine does, one connection per concurrent request.
//!
//! Without `--registry` it starts `berth serve` on a temporary data dir and
//! reports the process's peak RSS (VmHWM) after the push and pull. With
//! `--registry` it measures any other registry the same way (for example
//! Debian's docker-registry, CNCF Distribution) for a same-session ratio;
//! with `--secure --ca FILE` over TLS as the user `bench`/`bench-pw`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};

const CHUNK: usize = 1 << 20;

/// Deterministic pseudo-random chunk `i` (xorshift), so the blob can be
/// generated twice (once to hash, once to send) without being held in memory.
fn chunk(seed: u64, i: u64) -> Bytes {
    let mut x = (i ^ (seed << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(CHUNK);
    for _ in 0..CHUNK / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let size_mib: u64 = arg("--size-mib").map(|s| s.parse().expect("--size-mib N")).unwrap_or(1024);

    let dir = tempfile::tempdir().unwrap();
    let secure = args.iter().any(|a| a == "--secure");
    let http1 = args.iter().any(|a| a == "--http1");
    let tls_builder = || {
        let b = reqwest::Client::builder();
        if http1 {
            b.http1_only()
        } else {
            b
        }
    };
    let (base, client, mut child) = match arg("--registry") {
        // Another registry serving TLS with a user: `--secure --ca FILE`,
        // the user `bench`, password `bench-pw` (as berth's --secure).
        Some(r) if secure => {
            let ca = std::path::PathBuf::from(arg("--ca").expect("--registry with --secure needs --ca FILE"));
            (format!("https://{r}"), common::tls_client_as(&ca, "bench", "bench-pw", tls_builder()), None)
        }
        Some(r) => (format!("http://{r}"), reqwest::Client::new(), None),
        None => {
            let port = common::free_port();
            let grpc = common::free_port();
            let (rest, ca) = if secure {
                common::tls_auth_settings(dir.path(), "bench", "bench-pw")
            } else {
                (String::new(), Default::default())
            };
            let args =
                common::write_config(&dir.path().join("berth.toml"), 1, port, grpc, &dir.path().join("data"), &rest);
            // This build's berth, or BERTH_BIN (a reference build).
            let c = common::berth().arg("serve").args(&args).stderr(Stdio::null()).spawn().unwrap();
            if secure {
                (
                    format!("https://localhost:{port}"),
                    common::tls_client_as(&ca, "bench", "bench-pw", tls_builder()),
                    Some(c),
                )
            } else {
                (format!("http://127.0.0.1:{port}"), reqwest::Client::new(), Some(c))
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/v2/")).send().await.is_err() {
        assert!(Instant::now() < deadline, "registry did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runs: u64 = arg("--runs").map(|s| s.parse().expect("--runs N")).unwrap_or(3);
    let (mut pushes, mut pulls) = (Vec::new(), Vec::new());
    for seed in 0..runs {
        let mut h = Sha256::new();
        for i in 0..size_mib {
            h.update(chunk(seed, i));
        }
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        let bytes = size_mib * CHUNK as u64;

        let body = reqwest::Body::wrap_stream(
            futures::stream::iter(0..size_mib).map(move |i| Ok::<_, std::io::Error>(chunk(seed, i))),
        );
        let t = Instant::now();
        let r = client
            .post(format!("{base}/v2/bench/blob/blobs/uploads/?digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", bytes)
            .body(body)
            .send()
            .await
            .unwrap();
        let push = t.elapsed();
        if r.status() == 202 {
            // Registries without monolithic POST: follow the Location with PUT.
            let loc = r.headers()["Location"].to_str().unwrap().to_owned();
            let url = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
            let sep = if url.contains('?') { '&' } else { '?' };
            let body = reqwest::Body::wrap_stream(
                futures::stream::iter(0..size_mib).map(move |i| Ok::<_, std::io::Error>(chunk(seed, i))),
            );
            let t = Instant::now();
            let r = client.put(format!("{url}{sep}digest={digest}")).body(body).send().await.unwrap();
            assert_eq!(r.status(), 201, "push failed");
            pushes.push(report("push (POST+PUT)", bytes, t.elapsed()));
        } else {
            assert_eq!(r.status(), 201, "push failed");
            pushes.push(report("push (monolithic)", bytes, push));
        }

        let t = Instant::now();
        let r = client.get(format!("{base}/v2/bench/blob/blobs/{digest}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut got = 0u64;
        let mut s = r.bytes_stream();
        while let Some(c) = s.next().await {
            got += c.unwrap().len() as u64;
        }
        assert_eq!(got, bytes);
        pulls.push(report("pull", bytes, t.elapsed()));
    }
    println!(
        "median push {:.0} MiB/s, median pull {:.0} MiB/s over {runs} runs",
        median(&mut pushes),
        median(&mut pulls)
    );
    if let Some(c) = child.as_mut() {
        if let Some(rss) = peak_rss_mib(c.id()) {
            println!("berth peak RSS: {rss:.1} MiB");
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn report(what: &str, bytes: u64, d: Duration) -> f64 {
    let mib = bytes as f64 / (1 << 20) as f64;
    let rate = mib / d.as_secs_f64();
    println!("{what:>18}: {mib:.0} MiB in {:.2} s = {rate:.0} MiB/s", d.as_secs_f64());
    rate
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
