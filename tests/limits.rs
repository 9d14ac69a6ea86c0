//! Slow and hostile clients cannot stall a node: hundreds of uploads that
//! trickle bytes and a thousand connections that send their headers slowly
//! leave normal pushes and pulls on the same node answering, and are cut by
//! the node's timeouts; connection caps hold per client address; the
//! metrics do not grow with made-up methods.
//!
//! Each node is a real `berth serve` process. Loopback has every 127.x.y.z
//! address, so the hostile clients connect from their own addresses and the
//! normal client from 127.0.0.1, as they would from different machines.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn node(limits: &str) -> (Proc, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_port(), free_port());
    let args = write_config(
        &dir.path().join("berth.toml"),
        1,
        http,
        grpc,
        &dir.path().join("data"),
        &format!("[limits]\n{limits}\n"),
    );
    let p = spawn_serve(&args, http).await;
    (p, format!("http://127.0.0.1:{http}"), dir)
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().unwrap())?;
    s.connect(to).await
}

fn addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

/// Wait until the server closes `s` (EOF or reset), writing `tick` every
/// `every` until then. Returns when it was closed.
async fn until_closed(mut s: TcpStream, tick: &[u8], every: Duration) -> Instant {
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Instant::now(),
                // An error answer (the body was cut): read on to the close.
                Ok(_) => {}
            },
            _ = tokio::time::sleep(every) => {
                if s.write_all(tick).await.is_err() {
                    return Instant::now();
                }
            }
        }
    }
}

/// A normal client's round: push a 1 MiB blob and a manifest, pull both.
async fn normal_round(c: &reqwest::Client, base: &str, i: usize) {
    let layer: Vec<u8> = (0..1 << 20).map(|j| (j * 7 + i) as u8).collect();
    let config = format!(r#"{{"round":{i}}}"#).into_bytes();
    let ld = push_blob(c, base, "normal/app", &layer).await;
    let cd = push_blob(c, base, "normal/app", &config).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
    put_manifest(c, base, "normal/app", &format!("r{i}"), &m).await;
    let got = c.get(format!("{base}/v2/normal/app/blobs/{ld}")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), layer.len());
    let r = c.get(format!("{base}/v2/normal/app/manifests/r{i}")).header("Accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_uploads_and_slow_headers_do_not_stall_normal_clients_and_are_cut() {
    const UPLOADS: usize = 600;
    const HEADERS: usize = 1000;
    let (_p, base, _dir) = node(
        "header_timeout_secs = 15\nbody_window_secs = 15\nbody_min_bytes_per_sec = 64\n\
         max_connections_per_client = 4000\nmax_uploads_per_client = 1000",
    )
    .await;
    let c = client();
    let to = addr(&base);

    // Open the sessions first (from the slow clients' address, as they would).
    let mut sessions = Vec::new();
    for _ in 0..UPLOADS {
        let mut s = connect_from("127.0.0.2", to).await.unwrap();
        s.write_all(b"POST /v2/slow/up/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "session start answered");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 202"), "{head}");
        let loc = head
            .lines()
            .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
            .unwrap()
            .trim()
            .to_string();
        sessions.push(loc);
    }

    // 600 PATCHes trickling 3 bytes a second (chunked), each on its own
    // connection; 1000 connections sending one header line a second.
    let started = Arc::new(AtomicUsize::new(0));
    // How many slow connections have been closed so far.
    let cut = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for loc in &sessions {
        let (loc, started, cut) = (loc.clone(), started.clone(), cut.clone());
        slow.push(tokio::spawn(async move {
            let mut s = connect_from("127.0.0.2", to).await.unwrap();
            let head = format!(
                "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            started.fetch_add(1, Ordering::SeqCst);
            let closed = until_closed(s, b"3\r\nabc\r\n", Duration::from_secs(1)).await;
            cut.fetch_add(1, Ordering::SeqCst);
            closed
        }));
    }
    for i in 0..HEADERS {
        let (started, cut) = (started.clone(), cut.clone());
        slow.push(tokio::spawn(async move {
            let mut s = connect_from("127.0.0.3", to).await.unwrap();
            s.write_all(b"GET /v2/ HTTP/1.1\r\n").await.unwrap();
            started.fetch_add(1, Ordering::SeqCst);
            let line = format!("X-Slow-{i}: a\r\n");
            let closed = until_closed(s, line.as_bytes(), Duration::from_secs(1)).await;
            cut.fetch_add(1, Ordering::SeqCst);
            closed
        }));
    }
    wait_for("every slow client to start", Duration::from_secs(60), || {
        let n = started.load(Ordering::SeqCst);
        async move { n == UPLOADS + HEADERS }
    })
    .await;
    let load_began = Instant::now();

    // While they hold their connections, normal clients get answers: every
    // round completes before the node has cut a single slow client. A node
    // the slow clients stalled would answer only once it cut them (15 s
    // into each, `header_timeout_secs`, `body_window_secs`), so the test
    // asserts an order of events: its only bound is the node's own cut,
    // not a guess at how fast a loaded machine answers.
    for i in 0..3 {
        normal_round(&c, &base, i).await;
        let n = cut.load(Ordering::SeqCst);
        assert_eq!(
            n,
            0,
            "normal round {i} finished only after the node had cut {n} of its {} slow clients",
            UPLOADS + HEADERS
        );
    }

    // Then every slow connection is cut by the node, not left open.
    let mut cut_after = Duration::ZERO;
    for h in slow {
        let closed = tokio::time::timeout(Duration::from_secs(90), h)
            .await
            .expect("a slow client is still connected 90 s on")
            .unwrap();
        cut_after = cut_after.max(closed.saturating_duration_since(load_began));
    }
    assert!(cut_after < Duration::from_secs(60), "slow clients cut within a minute (last after {cut_after:?})");

    // A cut upload kept what arrived and can be resumed from there.
    let r = c.get(format!("{base}{}", sessions[0])).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let range = r.headers()["range"].to_str().unwrap().to_string();
    let end: u64 = range.trim_start_matches("0-").parse().unwrap();
    assert!(end >= 2, "bytes received before the cut are kept (range {range})");
    assert_eq!((end + 1) % 3, 0, "whole chunks kept: {range}");
    let rest = b"xyz";
    let r = c
        .patch(format!("{base}{}", sessions[0]))
        .header("Content-Range", format!("{}-{}", end + 1, end + 3))
        .header("Content-Length", "3")
        .body(rest.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the upload resumes where the cut left it");

    // And the node still serves.
    normal_round(&c, &base, 99).await;
}

#[tokio::test]
async fn connections_are_capped_per_client_address() {
    let (_p, base, _dir) = node("max_connections_per_client = 16").await;
    let to = addr(&base);
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = connect_from("127.0.0.4", to).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0, "admitted connections are answered");
        held.push(s);
    }
    // The 17th from the same address is closed without an answer.
    let mut extra = connect_from("127.0.0.4", to).await.unwrap();
    let _ = extra.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf)).await.expect("closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "over the cap: closed, not answered");
    // Another address is not affected.
    assert_eq!(client().get(format!("{base}/v2/")).send().await.unwrap().status(), 200);
    // A place freed is a place given again.
    drop(held.pop());
    wait_for("a freed place to be reused", Duration::from_secs(10), || async {
        let Ok(mut s) = connect_from("127.0.0.4", to).await else { return false };
        if s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 512];
        matches!(s.read(&mut buf).await, Ok(n) if n > 0)
    })
    .await;
}

#[tokio::test]
async fn metrics_stay_the_same_size_under_made_up_methods() {
    let (_p, base, _dir) = node("").await;
    let c = client();
    let to = addr(&base);
    let send = |method: String| async move {
        let mut s = TcpStream::connect(to).await.unwrap();
        let req = format!("{method} /v2/any/manifests/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
    };
    // One made-up method first, so its label exists before measuring.
    send("BREW".into()).await;
    let size = || async { c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap().len() };
    // The scrape itself is counted: one scrape first, so its labels exist.
    size().await;
    let before = size().await;
    for i in 0..3000 {
        send(format!("M{i:05}X")).await;
    }
    let after = size().await;
    // Counter values grow by a few digits; label sets must not.
    assert!(after < before + 200, "metrics grew from {before} to {after} bytes");
}

#[tokio::test]
async fn a_trickling_manifest_body_is_cut_and_stores_nothing() {
    let (_p, base, _dir) = node("body_window_secs = 3\nbody_min_bytes_per_sec = 64").await;
    let mut s = TcpStream::connect(addr(&base)).await.unwrap();
    let head = format!(
        "PUT /v2/slow/manifest/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\n\
         Content-Length: 1000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let began = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(30), until_closed(s, b"{  ", Duration::from_secs(1)))
        .await
        .expect("a trickling manifest body is cut");
    assert!(closed.duration_since(began) >= Duration::from_secs(2), "cut by the rate check, not at once");
    let r = client().get(format!("{base}/v2/slow/manifest/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 404, "nothing stored");
}
