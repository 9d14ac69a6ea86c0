//! The `berth` command line: parsing only; the work is in the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use berth::cluster::tls::{ClusterTls, TlsFiles};
use berth::cluster::{ClusterAdmin, JoinRequest, LeaveRequest, MemberStatus};
use berth::config::Config;
use berth::node::RunningNode;

/// mimalloc instead of glibc's malloc. On a node under a manifest PUT load,
/// glibc's malloc and free (with its arena consolidation) took a tenth of
/// the request threads' CPU: requests allocate and free many small buffers
/// across tokio's worker threads, which per-thread free lists serve better.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "berth", version, about = "A replicated, highly available OCI registry")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a registry node (with no flags: one node on 127.0.0.1:5000, data in ./berth-data).
    Serve {
        /// TOML configuration file; flags below override it. Repeat it to lay files over each
        /// other (a site-wide file with TLS, users and rules over each node's own): a later
        /// file's keys win, tables merge, arrays are replaced. BERTH_CONFIG takes a
        /// colon-separated list.
        #[arg(long, env = "BERTH_CONFIG", value_delimiter = ':')]
        config: Vec<PathBuf>,
        /// This node's id (>= 1, unique in the cluster).
        #[arg(long)]
        node_id: Option<u64>,
        /// HTTP API listen address.
        #[arg(long, env = "BERTH_HTTP")]
        http: Option<String>,
        /// Cluster gRPC listen address.
        #[arg(long, env = "BERTH_GRPC")]
        grpc: Option<String>,
        /// Data directory.
        #[arg(long, env = "BERTH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// On first start, join the cluster through this member's gRPC address.
        #[arg(long)]
        join: Option<String>,
        /// With --join: stay a learner (non-voting replica).
        #[arg(long)]
        learner: bool,
        /// Directory made by `berth certs`: this node talks to its peers over mutual TLS with
        /// its ca.pem and node<ID>.pem/.key (the config's [cluster_tls] otherwise).
        #[arg(long, env = "BERTH_NODE_TLS_DIR")]
        cluster_tls_dir: Option<PathBuf>,
        /// Talk to peers in plain text, authenticating no one (insecure_cluster = true).
        #[arg(long, env = "BERTH_INSECURE_CLUSTER")]
        insecure_cluster: bool,
    },
    /// Exit 0 if the node's HTTP API answers `GET /v2/` with 200, or 401 when it needs
    /// credentials (for health checks).
    Ping {
        #[arg(long, default_value = "127.0.0.1:5000")]
        http: String,
        /// The API serves TLS: verify its certificate against this CA (PEM), for the host
        /// named in --http.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
    },
    /// Inspect and change cluster membership.
    Cluster {
        /// Directory made by `berth certs`: its ca.pem, admin.pem and admin.key authenticate
        /// this command to the cluster (mutual TLS). Without it, plain text (insecure_cluster).
        #[arg(long, env = "BERTH_CLUSTER_TLS_DIR", global = true)]
        tls_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Collect garbage across the cluster: blobs no manifest uses (older than gc_grace_secs) are
    /// unlinked and removed from the index through Raft, then every member deletes the copies no
    /// one claims. Prints what was (or, with --dry-run, would be) freed, per repository.
    Gc(Maintenance),
    /// Apply the retention policies (`[[retention]]` in the contacted member's config): remove
    /// the tags and untagged manifests they name, through Raft. Prints, per repository, what was
    /// (or, with --dry-run, would be) removed; `berth gc` then frees the blobs.
    Retention(Maintenance),
    /// Print an htpasswd line (bcrypt) for `[auth] htpasswd`. The password
    /// is read from standard input when not given.
    Htpasswd {
        user: String,
        password: Option<String>,
        /// bcrypt cost (4 to 31).
        #[arg(long, default_value_t = bcrypt::DEFAULT_COST)]
        cost: u32,
    },
    /// Make a development CA and certificates for mutual TLS between nodes: ca.pem/ca.key,
    /// node<N>.pem/.key for each node, admin.pem/.key for `berth cluster` (keys are 0600).
    Certs {
        /// Directory to write to (existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Node ids to make certificates for.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<u64>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term, log and applied index of each node, and whether it answers.
    Status {
        /// gRPC address of any member.
        #[arg(long)]
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a running node (started without --join) to the cluster.
    Join {
        /// gRPC address of any member.
        #[arg(long)]
        node: String,
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's gRPC address.
        #[arg(long)]
        addr: String,
        /// The new node's HTTP API address.
        #[arg(long, default_value = "")]
        api: String,
        #[arg(long, default_value = "")]
        region: String,
        /// Stay a learner instead of becoming a voter.
        #[arg(long)]
        learner: bool,
        #[arg(long)]
        json: bool,
    },
    /// Bring back a member whose data dir was lost (wiped, a replaced disk), as the fresh node now
    /// running at its address: the old member is removed, the fresh node added as a learner and,
    /// once caught up, promoted. Needs a working majority of the other voters.
    Replace {
        /// gRPC address of any member.
        #[arg(long)]
        node: String,
        /// The id of the member whose data was lost.
        #[arg(long)]
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the cluster: drain its clients, copy its blobs to the others, then remove it.
    /// Refused if the remaining voters would lack a working majority or blobs would be left short.
    Leave {
        /// gRPC address of any member.
        #[arg(long)]
        node: String,
        /// The leaving node's id.
        #[arg(long)]
        id: u64,
        /// Remove even if too few remaining voters answer or some blobs could not be copied elsewhere.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the leaving node's client requests to finish.
        #[arg(long, default_value_t = berth::cluster::DEFAULT_DRAIN.as_secs())]
        drain_secs: u64,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Cmd::Serve { config, node_id, http, grpc, data_dir, join, learner, cluster_tls_dir, insecure_cluster } => {
            // Validated once the flags are applied (RunningNode::start).
            let cfg = if config.is_empty() { Config::default() } else { Config::from_files(&config)? };
            // BERTH_<KEY> variables over the files, flags over both.
            let mut cfg = cfg.with_env(std::env::vars())?;
            cfg.node_id = node_id.unwrap_or(cfg.node_id);
            cfg.http = http.unwrap_or(cfg.http);
            cfg.grpc = grpc.unwrap_or(cfg.grpc);
            cfg.data_dir = data_dir.unwrap_or(cfg.data_dir);
            cfg.join = join.or(cfg.join);
            cfg.learner |= learner;
            if let Some(dir) = cluster_tls_dir {
                cfg.cluster_tls = Some(TlsFiles::node_in(&dir, cfg.node_id));
            }
            cfg.insecure_cluster |= insecure_cluster;
            rt.block_on(async move {
                let node = RunningNode::start(cfg).await?;
                tokio::select! {
                    () = shutdown_signal() => {
                        tracing::info!("shutting down");
                        node.shutdown().await;
                        anyhow::Ok(())
                    }
                    reason = node.raft_failed() => {
                        tracing::error!(%reason, "Raft stopped on a fatal error; exiting so the node restarts from disk");
                        anyhow::bail!("Raft stopped: {reason}")
                    }
                }
            })
        }
        Cmd::Cluster { tls_dir, command } => {
            let tls = tls_dir.map(|d| ClusterTls::load(&TlsFiles::admin_in(&d))).transpose()?;
            rt.block_on(cluster(command, tls))
        }
        Cmd::Gc(m) => rt.block_on(maintain(m, Job::Gc)),
        Cmd::Retention(m) => rt.block_on(maintain(m, Job::Retention)),
        Cmd::Certs { out, nodes } => {
            for path in berth::cluster::tls::generate(&out, &nodes)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Cmd::Ping { http, tls_ca } => rt.block_on(ping(&http, tls_ca.as_deref())),
        Cmd::Htpasswd { user, password, cost } => {
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            println!("{user}:{}", bcrypt::hash(password, cost)?);
            Ok(())
        }
    }
}

async fn ping(addr: &str, tls_ca: Option<&std::path::Path>) -> anyhow::Result<()> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn ask(mut s: impl AsyncRead + AsyncWrite + Unpin, addr: &str) -> anyhow::Result<String> {
        s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        match tls_ca {
            None => ask(tcp, addr).await,
            Some(ca) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
                let tls = berth::api::tls::client_trusting(ca)?.connect(name, tcp).await?;
                ask(tls, addr).await
            }
        }
    };
    let line = tokio::time::timeout(std::time::Duration::from_secs(2), attempt).await??;
    // 401: a serving node whose API needs credentials.
    let healthy = ["200", "401"]
        .iter()
        .any(|c| line.starts_with(&format!("HTTP/1.0 {c}")) || line.starts_with(&format!("HTTP/1.1 {c}")));
    anyhow::ensure!(healthy, "unhealthy: {line:?}");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn cluster(cmd: ClusterCmd, tls: Option<ClusterTls>) -> anyhow::Result<()> {
    let admin = |node: &str| ClusterAdmin::new(node, tls.clone());
    let report = |json: bool, msg: String| {
        if json {
            println!("{}", serde_json::json!({ "ok": true, "message": msg }));
        } else {
            println!("{msg}");
        }
    };
    match cmd {
        ClusterCmd::Status { node, json } => {
            let rows = admin(&node).status().await.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_status(&rows);
            }
        }
        ClusterCmd::Join { node, id, addr, api, region, learner, json } => {
            let req = JoinRequest { id, api, grpc: addr, region, learner };
            let msg = admin(&node).join(req).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            report(json, msg);
        }
        ClusterCmd::Replace { node, id, json } => {
            let msg = admin(&node).replace(id).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            report(json, msg);
        }
        ClusterCmd::Leave { node, id, force, drain_secs, json } => {
            let req = LeaveRequest { id, force, drain_secs };
            admin(&node).leave(req, |step| report(json, step)).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        }
    }
    Ok(())
}

fn print_status(rows: &[MemberStatus]) {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "{:<4} {:<8} {:<10} {:<8} {:<6} {:<7} {:<9} {:<9} {:<9} {:<22} {:<22} REGION",
        "ID", "ROLE", "STATE", "ANSWERS", "TERM", "LEADER", "LAST_LOG", "COMMIT", "APPLIED", "GRPC", "API"
    );
    for r in rows {
        println!(
            "{:<4} {:<8} {:<10} {:<8} {:<6} {:<7} {:<9} {:<9} {:<9} {:<22} {:<22} {}",
            r.id,
            r.role,
            r.state.as_deref().unwrap_or("down"),
            if r.answers { "yes" } else { "NO" },
            opt(r.term),
            opt(r.leader),
            opt(r.last_log_index),
            opt(r.commit_index),
            opt(r.applied_index),
            r.grpc,
            r.api,
            r.region
        );
    }
    for r in rows {
        if let Some(p) = &r.problem {
            println!("\nnode {}: {p}", r.id);
        }
    }
}

/// The flags of `berth gc` and `berth retention`: both ask one member to
/// run a cluster-wide job and print what it reports.
#[derive(clap::Args, Debug)]
struct Maintenance {
    /// gRPC address of any member (it runs the job).
    #[arg(long)]
    node: String,
    /// Only report what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Directory made by `berth certs` (its ca.pem, admin.pem, admin.key), as for `berth cluster`.
    #[arg(long, env = "BERTH_CLUSTER_TLS_DIR")]
    tls_dir: Option<PathBuf>,
}

enum Job {
    Gc,
    Retention,
}

/// Run `job` on the member `m` names, printing each line it reports.
async fn maintain(m: Maintenance, job: Job) -> anyhow::Result<()> {
    let tls = m.tls_dir.map(|d| ClusterTls::load(&TlsFiles::admin_in(&d))).transpose()?;
    let admin = ClusterAdmin::new(&m.node, tls);
    let print = |line: String| println!("{line}");
    let done = match job {
        Job::Gc => admin.gc(m.dry_run, print).await,
        Job::Retention => admin.retention(m.dry_run, print).await,
    };
    done.map_err(|e| anyhow::anyhow!("{}", e.message()))
}
