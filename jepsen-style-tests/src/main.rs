//! `berth-jepsen`: run workloads against a docker-compose berth cluster
//! while injecting faults, then check the history. See the README section
//! "Jepsen-style tests".

mod cluster;
mod nemesis;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_jepsen::checker::{self, PushSeen};
use berth_jepsen::history::{History, Op, Outcome};
use berth_jepsen::report;
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use cluster::{Cluster, Targets, NODES};
use nemesis::{Kind, Nemesis};
use workload::{Base, Ctx, Recorder};

/// Milliseconds since the run started: the one clock of the history.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

#[derive(Parser, Debug)]
#[command(about = "Fault injection against a berth docker-compose cluster, with a linearizability checker")]
struct Args {
    /// How long workloads run under faults.
    #[arg(long, default_value_t = 180)]
    duration_secs: u64,
    /// Replays the same fault schedule and workload choices (random if absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Fault kinds to inject (comma-separated; default: every kind).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Kind>,
    /// Shortest and longest time a fault is held, in milliseconds.
    #[arg(long, default_value_t = 4000)]
    hold_min_ms: u64,
    #[arg(long, default_value_t = 9000)]
    hold_max_ms: u64,
    /// Register tags (independent registers).
    #[arg(long, default_value_t = 4)]
    keys: usize,
    /// Concurrent register clients.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// The berth binary the image is built from.
    #[arg(long, default_value = "target/release/berth")]
    berth_bin: String,
    /// Host port of the load balancer.
    #[arg(long, default_value_t = 5070)]
    port: u16,
    /// Where the history, summary and timeline go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Leave the cluster running afterwards (for a look at its logs).
    #[arg(long)]
    keep: bool,
    /// The run fails unless each workload had at least this many
    /// acknowledged operations (a cluster refusing every write would
    /// otherwise pass: refused operations prove nothing).
    #[arg(long, default_value_t = 20)]
    min_ok: usize,
    /// The run fails unless at least this share of the operations invoked
    /// outside fault windows succeeded.
    #[arg(long, default_value_t = 0.8)]
    min_available_outside: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = args.out.clone().unwrap_or_else(|| root.join("jepsen-style-tests/runs").join(format!("seed-{seed}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let project = format!("berth-jepsen-{}", std::process::id());
    let kinds = if args.faults.is_empty() { Kind::default_set() } else { args.faults.clone() };
    // A power cut needs the nodes' data dirs on power-loss disks, served by
    // this process for the whole run.
    let disks = if kinds.iter().any(|k| k.cuts_power()) {
        Some(cluster::Disks::mount(&project).context("power-loss disks (or run without the power-loss kinds)")?)
    } else {
        None
    };
    let cluster = Cluster {
        project,
        root: root.clone(),
        port: args.port,
        image: format!("berth:jepsen-{}", std::process::id()),
        targets: Targets::default(),
        disks,
    };
    println!("jepsen: seed {seed}, {} s, output in {}", args.duration_secs, out.display());
    // Interrupted or not, the cluster is torn down.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = run(&args, seed, &cluster, &out) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    if !args.keep {
        cluster.down().await;
    }
    // Unmount the power-loss disks (exit skips destructors); with --keep
    // the nodes then lose their data dirs.
    drop(cluster);
    let clean = result?;
    std::process::exit(if clean { 0 } else { 1 });
}

async fn run(args: &Args, seed: u64, cluster: &Cluster, out: &std::path::Path) -> anyhow::Result<bool> {
    let t = Instant::now();
    cluster.up(&args.berth_bin).await?;
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    println!("jepsen: cluster up and healthy in {:.1} s", t.elapsed().as_secs_f64());

    // A dead node refuses or drops connections: fail fast (a connect error
    // is a definite failure), so clients move on to the next operation.
    let http = reqwest::Client::builder().timeout(workload::TIMEOUT).connect_timeout(Duration::from_secs(1)).build()?;
    let base = Arc::new(setup(&http, &cluster.targets).await?);
    let set_manifest = Arc::new(workload::manifest(&base, std::slice::from_ref(&base.layer), "set"));

    let clock = Clock(Instant::now());
    let rec = Recorder { clock, events: Arc::new(Mutex::new(Vec::new())) };
    let (stop_tx, stop) = watch::channel(false);
    let ctx = || Ctx {
        http: http.clone(),
        targets: cluster.targets.clone(),
        rec: rec.clone(),
        stop: stop.clone(),
        base: base.clone(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let next_value = Arc::new(Mutex::new(0u64));
    let mut clients = Vec::new();
    for p in 0..args.clients {
        clients.push(tokio::spawn(workload::register(ctx(), p, rng.gen(), args.keys, next_value.clone())));
    }
    clients.push(tokio::spawn(workload::set(ctx(), 100, rng.gen(), set_manifest.clone())));
    clients.push(tokio::spawn(workload::push(ctx(), 200, rng.gen())));

    // Faults, one at a time, each kind in a seeded order, until time is up.
    let kinds = if args.faults.is_empty() { Kind::default_set() } else { args.faults.clone() };
    let mut nemesis =
        Nemesis { cluster, clock, rng: StdRng::seed_from_u64(rng.gen()), hold: (args.hold_min_ms, args.hold_max_ms) };
    let mut faults = Vec::new();
    let (mut worst_recovery, mut unrecovered, mut not_injected) = (0f64, 0usize, Vec::new());
    let lb = format!("http://127.0.0.1:{}", args.port);
    let end = Duration::from_secs(args.duration_secs);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The first round always completes, so every kind is injected at least
    // once however short the run; later rounds stop when time is up.
    'schedule: for round_no in 0.. {
        let mut round = kinds.clone();
        round.shuffle(&mut nemesis.rng);
        for kind in round {
            if round_no > 0 && clock.0.elapsed() >= end {
                break 'schedule;
            }
            match nemesis.run(kind).await {
                Ok(w) => {
                    println!(
                        "jepsen [{:>6.1}s] {} ({}) for {:.1} s",
                        w.start_ms / 1000.0,
                        w.kind,
                        w.detail,
                        (w.end_ms - w.start_ms) / 1000.0
                    );
                    faults.push(w);
                }
                Err(e) => {
                    println!("jepsen: fault {} could not be injected: {e:#}", kind.name());
                    not_injected.push(format!("{}: {e:#}", kind.name()));
                }
            }
            // Recovered: one leader that every node agrees on, every node
            // applied what it committed, the balancer answers, and a write
            // is acknowledged.
            let healed = async {
                let d = cluster.wait_healthy(Duration::from_secs(120)).await?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !workload::probe_write(&http, &lb, &base, faults.len()).await {
                    anyhow::ensure!(Instant::now() < deadline, "no write acknowledged within 60 s of healing");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                anyhow::Ok(d)
            };
            match healed.await {
                Ok(d) => worst_recovery = worst_recovery.max(d.as_secs_f64()),
                Err(e) => {
                    unrecovered += 1;
                    println!("jepsen: not recovered: {e:#}");
                }
            }
            let quiet = nemesis.rng.gen_range(1500..4000);
            tokio::time::sleep(Duration::from_millis(quiet)).await;
        }
    }
    let duration_s = clock.ms() / 1000.0;
    stop_tx.send(true)?;
    for c in clients {
        let _ = c.await;
    }

    // Healed: final reads on every node, then what each node holds.
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    let final_ctx = ctx();
    for node in NODES {
        for k in 0..args.keys {
            workload::read(&final_ctx, 1000, node, &format!("t{k}")).await;
        }
    }
    let mut history = History { seed, events: rec.events.lock().unwrap().clone(), faults };
    history.events.sort_by(|a, b| a.invoke_ms.total_cmp(&b.invoke_ms));
    let listed = list_sets(&http, &cluster.targets).await?;
    let seen = check_pushes(&http, &cluster.targets, &history).await;

    let t_check = Instant::now();
    let mut violations = checker::check_register(&history.events);
    violations.extend(checker::check_set(&history.events, &listed));
    violations.extend(checker::check_pushes(&history.events, &seen));
    let check_seconds = t_check.elapsed().as_secs_f64();

    let summary = report::summarize(&history, duration_s, violations, check_seconds);
    std::fs::write(out.join("history.json"), serde_json::to_vec(&history)?)?;
    std::fs::write(out.join("timeline.svg"), report::timeline_svg(&history, duration_s * 1000.0))?;
    let mut json = serde_json::to_value(&summary)?;
    json["worst_recovery_s"] = worst_recovery.into();
    json["unrecovered"] = unrecovered.into();
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&json)?)?;
    print!("{summary}");
    println!(
        "slowest recovery to a healthy cluster after a fault: {worst_recovery:.1} s; not recovered: {unrecovered}"
    );
    // A run that injected nothing, or that the cluster answered with
    // refusals, proves nothing: both fail it.
    let mut failures = not_injected.iter().map(|e| format!("fault not injected: {e}")).collect::<Vec<_>>();
    for kind in &kinds {
        if !summary.faults.contains_key(kind.name()) {
            failures.push(format!("fault kind {} was never injected", kind.name()));
        }
    }
    for workload in ["register", "set", "no-lost-push"] {
        let ok = summary.ops.get(workload).map_or(0, |c| c.ok);
        if ok < args.min_ok {
            failures.push(format!("{workload}: {ok} acknowledged operations, below the floor of {}", args.min_ok));
        }
    }
    // Reads of a tag never written succeed (404); the writes must too.
    let writes_ok =
        history.events.iter().filter(|e| matches!(e.op, Op::Write { .. }) && e.outcome == Outcome::Ok).count();
    if writes_ok < args.min_ok {
        failures.push(format!("register: {writes_ok} acknowledged writes, below the floor of {}", args.min_ok));
    }
    if summary.availability_outside_faults < args.min_available_outside {
        failures.push(format!(
            "{:.1}% of operations outside faults succeeded, below the floor of {:.1}%",
            summary.availability_outside_faults * 100.0,
            args.min_available_outside * 100.0
        ));
    }
    for f in &failures {
        println!("jepsen: FAILED: {f}");
    }
    println!("jepsen: history, summary and timeline in {}", out.display());
    Ok(summary.violations.is_empty() && unrecovered == 0 && failures.is_empty())
}

/// Retry `f` through transient errors for up to a minute.
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.context(what.to_owned())),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Push the config and layer the register and set manifests share.
async fn setup(http: &reqwest::Client, targets: &Targets) -> anyhow::Result<Base> {
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = b"berth jepsen shared layer".repeat(100);
    let lb = targets.url("lb").context("no load balancer")?;
    for repo in [workload::REG_REPO, workload::SET_REPO, workload::PUSH_REPO] {
        for data in [&config, &layer] {
            retrying("pushing a base blob", || async {
                let d = workload::sha256(data);
                let r =
                    http.post(format!("{lb}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.clone()).send().await?;
                anyhow::ensure!(r.status() == 201, "status {}", r.status());
                Ok(())
            })
            .await?;
        }
    }
    Ok(Base { config: (workload::sha256(&config), config.len()), layer: (workload::sha256(&layer), layer.len()) })
}

/// Every node's tags/list of the set repository.
async fn list_sets(http: &reqwest::Client, targets: &Targets) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut listed = BTreeMap::new();
    for node in NODES {
        let url = targets.url(node).context("no address")?;
        // Every page: the listing is paginated (Link: rel="next").
        let tags = retrying("listing tags", || async {
            let mut tags: Vec<String> = Vec::new();
            let mut next = format!("{url}/v2/{}/tags/list", workload::SET_REPO);
            loop {
                let r = http.get(&next).send().await?;
                anyhow::ensure!(r.status() == 200, "status {}", r.status());
                let link = r.headers().get("link").and_then(|l| l.to_str().ok()).map(str::to_owned);
                let v: serde_json::Value = r.json().await?;
                tags.extend(v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(String::from)));
                match link.as_deref().and_then(|l| l.strip_prefix('<')).and_then(|l| l.split_once('>')) {
                    Some((path, _)) => next = format!("{url}{path}"),
                    None => return Ok(tags),
                }
            }
        })
        .await?;
        listed.insert(node.to_owned(), tags);
    }
    Ok(listed)
}

/// For each acknowledged push and each node: what the tag resolves to, and
/// which of its blobs are not served intact. Missing means missing after a
/// minute of retries through transient errors.
async fn check_pushes(http: &reqwest::Client, targets: &Targets, h: &History) -> Vec<PushSeen> {
    let mut seen = Vec::new();
    for e in h.events.iter().filter(|e| e.outcome == Outcome::Ok) {
        let Op::Push { key, blobs, .. } = &e.op else { continue };
        for node in NODES {
            let Some(url) = targets.url(node) else { continue };
            let manifest = retrying("reading a pushed manifest", || async {
                let r = http
                    .get(format!("{url}/v2/{}/manifests/{key}", workload::PUSH_REPO))
                    .header("Accept", workload::OCI_MANIFEST)
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 200, "status {}", r.status());
                Ok(workload::sha256(&r.bytes().await?))
            })
            .await
            .ok();
            let mut bad = Vec::new();
            for b in blobs {
                let intact = retrying("reading a pushed blob", || async {
                    let r = http.get(format!("{url}/v2/{}/blobs/{b}", workload::PUSH_REPO)).send().await?;
                    anyhow::ensure!(r.status() == 200, "status {}", r.status());
                    let got = workload::sha256(&r.bytes().await?);
                    anyhow::ensure!(&got == b, "bytes hash to {got}");
                    Ok(())
                })
                .await;
                if intact.is_err() {
                    bad.push(b.clone());
                }
            }
            seen.push(PushSeen { node: node.to_owned(), key: key.clone(), manifest, bad_blobs: bad });
        }
    }
    seen
}
