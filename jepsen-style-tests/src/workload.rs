//! Client workloads. Each process runs one operation at a time against a
//! target it picks (a node directly, or the load balancer) and records the
//! invocation, completion and outcome of every one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_jepsen::history::{Event, Op, Outcome, UNPARSEABLE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::cluster::Targets;
use crate::Clock;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const REG_REPO: &str = "jepsen/reg";
pub const SET_REPO: &str = "jepsen/set";
pub const PUSH_REPO: &str = "jepsen/push";
const TARGETS: [&str; 4] = ["node1", "node2", "node3", "lb"];
/// Longer than the server's own 10 s deadline for a write.
pub const TIMEOUT: Duration = Duration::from_secs(15);

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The shared config and layer every register and set manifest points at.
pub struct Base {
    pub config: (String, usize),
    pub layer: (String, usize),
}

pub fn manifest(base: &Base, layers: &[(String, usize)], value: &str) -> Vec<u8> {
    let layers: Vec<String> = layers
        .iter()
        .map(|(d, n)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{n}}}"#))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}],"annotations":{{"v":"{value}"}}}}"#,
        base.config.0,
        base.config.1,
        layers.join(",")
    )
    .into_bytes()
}

/// How a client classifies an answer: only what it knows for sure is a
/// failure; a timeout or server error may still take effect.
fn classify(res: &Result<reqwest::Response, reqwest::Error>, ok: u16) -> (Outcome, Option<String>) {
    match res {
        Ok(r) if r.status().as_u16() == ok => (Outcome::Ok, None),
        Ok(r) if r.status().is_client_error() => (Outcome::Fail, Some(r.status().to_string())),
        Ok(r) => (Outcome::Unknown, Some(r.status().to_string())),
        Err(e) if e.is_connect() => (Outcome::Fail, Some(format!("connect: {e}"))),
        Err(e) => (Outcome::Unknown, Some(e.to_string())),
    }
}

#[derive(Clone)]
pub struct Recorder {
    pub clock: Clock,
    pub events: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    fn record(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
}

pub struct Ctx {
    pub http: reqwest::Client,
    pub targets: Targets,
    pub rec: Recorder,
    pub stop: watch::Receiver<bool>,
    pub base: Arc<Base>,
}

async fn pause(rng: &mut StdRng, ms: (u64, u64)) {
    tokio::time::sleep(Duration::from_millis(rng.gen_range(ms.0..=ms.1))).await;
}

/// Write one register tag (PUT a manifest carrying `value`), recording it.
pub async fn write(ctx: &Ctx, process: usize, target: &str, key: &str, value: u64) {
    let Some(url) = ctx.targets.url(target) else { return };
    let body = manifest(&ctx.base, std::slice::from_ref(&ctx.base.layer), &value.to_string());
    let invoke_ms = ctx.rec.clock.ms();
    let (outcome, error) = put_manifest(&ctx.http, &url, REG_REPO, key, body).await;
    let complete_ms = (outcome != Outcome::Unknown).then(|| ctx.rec.clock.ms());
    let op = Op::Write { key: key.to_owned(), value };
    ctx.rec.record(Event { process, target: target.to_owned(), op, invoke_ms, complete_ms, outcome, error });
}

/// Delete one register tag, recording it: 202 (it existed) and 404 (it did
/// not) both leave it absent.
pub async fn delete(ctx: &Ctx, process: usize, target: &str, key: &str) {
    let Some(url) = ctx.targets.url(target) else { return };
    let invoke_ms = ctx.rec.clock.ms();
    let res = ctx.http.delete(format!("{url}/v2/{REG_REPO}/manifests/{key}")).send().await;
    let (outcome, error) = match &res {
        Ok(r) if r.status() == 404 => (Outcome::Ok, None),
        _ => classify(&res, 202),
    };
    let complete_ms = (outcome != Outcome::Unknown).then(|| ctx.rec.clock.ms());
    let op = Op::Delete { key: key.to_owned() };
    ctx.rec.record(Event { process, target: target.to_owned(), op, invoke_ms, complete_ms, outcome, error });
}

/// Read one register tag, recording what was seen.
pub async fn read(ctx: &Ctx, process: usize, target: &str, key: &str) {
    let Some(url) = ctx.targets.url(target) else { return };
    let invoke_ms = ctx.rec.clock.ms();
    let res = ctx.http.get(format!("{url}/v2/{REG_REPO}/manifests/{key}")).header("Accept", OCI_MANIFEST).send().await;
    let (outcome, value, error) = match res {
        Ok(r) if r.status() == 200 => match r.json::<serde_json::Value>().await {
            Ok(v) => match v["annotations"]["v"].as_str().and_then(|s| s.parse().ok()) {
                Some(n) => (Outcome::Ok, Some(n), None),
                None => (Outcome::Fail, None, Some(format!("{UNPARSEABLE}: a manifest no client wrote: {v}"))),
            },
            Err(e) => (Outcome::Fail, None, Some(format!("{UNPARSEABLE}: {e}"))),
        },
        Ok(r) if r.status() == 404 => (Outcome::Ok, None, None),
        Ok(r) => (Outcome::Fail, None, Some(r.status().to_string())),
        Err(e) => (Outcome::Fail, None, Some(e.to_string())),
    };
    let complete_ms = Some(ctx.rec.clock.ms());
    let op = Op::Read { key: key.to_owned(), value };
    ctx.rec.record(Event { process, target: target.to_owned(), op, invoke_ms, complete_ms, outcome, error });
}

/// Register clients: reads, writes and deletes of a few tags, every value
/// unique.
pub async fn register(ctx: Ctx, process: usize, seed: u64, keys: usize, next_value: Arc<Mutex<u64>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !*ctx.stop.borrow() {
        let target = TARGETS[rng.gen_range(0..TARGETS.len())];
        let key = format!("t{}", rng.gen_range(0..keys));
        let dice: f64 = rng.gen();
        if dice < 0.1 {
            delete(&ctx, process, target, &key).await;
        } else if dice < 0.5 {
            let value = {
                let mut n = next_value.lock().unwrap();
                *n += 1;
                *n
            };
            write(&ctx, process, target, &key, value).await;
        } else {
            read(&ctx, process, target, &key).await;
        }
        pause(&mut rng, (20, 120)).await;
    }
}

/// Set client: adds new tags, each pointing at the same manifest.
pub async fn set(ctx: Ctx, process: usize, seed: u64, m: Arc<Vec<u8>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut k = 0u64;
    while !*ctx.stop.borrow() {
        k += 1;
        let target = TARGETS[rng.gen_range(0..TARGETS.len())];
        let Some(url) = ctx.targets.url(target) else { continue };
        let key = format!("s{k}");
        let invoke_ms = ctx.rec.clock.ms();
        let (outcome, error) = put_manifest(&ctx.http, &url, SET_REPO, &key, m.to_vec()).await;
        let complete_ms = (outcome != Outcome::Unknown).then(|| ctx.rec.clock.ms());
        let e = Event { process, target: target.into(), op: Op::Add { key }, invoke_ms, complete_ms, outcome, error };
        ctx.rec.record(e);
        pause(&mut rng, (100, 300)).await;
    }
}

/// One write through `url` after a fault was healed, outside the checked
/// histories (its own tag in the register repository): true when the
/// cluster acknowledged it.
pub async fn probe_write(http: &reqwest::Client, url: &str, base: &Base, n: usize) -> bool {
    let tag = format!("recovered-{n}");
    let m = manifest(base, std::slice::from_ref(&base.layer), &tag);
    put_manifest(http, url, REG_REPO, &tag, m).await.0 == Outcome::Ok
}

/// PUT an image manifest under `tag`; acknowledged by 201.
async fn put_manifest(
    http: &reqwest::Client,
    url: &str,
    repo: &str,
    tag: &str,
    body: Vec<u8>,
) -> (Outcome, Option<String>) {
    let res = http
        .put(format!("{url}/v2/{repo}/manifests/{tag}"))
        .header("Content-Type", OCI_MANIFEST)
        .body(body)
        .send()
        .await;
    classify(&res, 201)
}

async fn push_blob(http: &reqwest::Client, url: &str, repo: &str, data: Vec<u8>) -> (Outcome, Option<String>) {
    let d = sha256(&data);
    let res = http
        .post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .body(data)
        .send()
        .await;
    classify(&res, 201)
}

/// Push client: whole images (two fresh layers and a manifest) under new
/// tags; acknowledged when the manifest is.
pub async fn push(ctx: Ctx, process: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut k = 0u64;
    while !*ctx.stop.borrow() {
        k += 1;
        let target = TARGETS[rng.gen_range(0..TARGETS.len())];
        let Some(url) = ctx.targets.url(target) else { continue };
        let key = format!("p{k}");
        let layers: Vec<Vec<u8>> =
            (0..2).map(|_| (0..rng.gen_range(4_000..64_000)).map(|_| rng.gen::<u8>()).collect()).collect();
        let refs: Vec<(String, usize)> = layers.iter().map(|l| (sha256(l), l.len())).collect();
        let m = manifest(&ctx.base, &refs, &key);
        let op = Op::Push { key: key.clone(), manifest: sha256(&m), blobs: refs.iter().map(|r| r.0.clone()).collect() };
        let invoke_ms = ctx.rec.clock.ms();
        let mut result = (Outcome::Ok, None);
        for l in layers {
            result = push_blob(&ctx.http, &url, PUSH_REPO, l).await;
            if result.0 != Outcome::Ok {
                break;
            }
        }
        if result.0 == Outcome::Ok {
            result = put_manifest(&ctx.http, &url, PUSH_REPO, &key, m).await;
        } else {
            // No manifest was sent: the push (its tag) definitely did not happen.
            result.0 = Outcome::Fail;
        }
        let (outcome, error) = result;
        let complete_ms = (outcome != Outcome::Unknown).then(|| ctx.rec.clock.ms());
        ctx.rec.record(Event { process, target: target.into(), op, invoke_ms, complete_ms, outcome, error });
        pause(&mut rng, (150, 400)).await;
    }
}
