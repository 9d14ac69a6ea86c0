//! One berth node: opens storage, starts Raft and its gRPC transport,
//! bootstraps the one-member cluster on first start, and serves the API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::blob::{BlobStore, Uploads};
use crate::cluster::{Cluster, Network, RaftRpcServer, RaftService};
use crate::config::Config;
use crate::meta::{self, LogStore, MetaReader, StateMachine};
use crate::{NodeInfo, Raft};

/// A started node. Dropping it without [`RunningNode::shutdown`] leaves its
/// tasks running until the runtime ends.
pub struct RunningNode {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub cluster: Cluster,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn raft_config(cfg: &Config) -> anyhow::Result<Arc<openraft::Config>> {
    let c = openraft::Config {
        cluster_name: "berth".into(),
        heartbeat_interval: cfg.raft.heartbeat_ms,
        election_timeout_min: cfg.raft.election_min_ms,
        election_timeout_max: cfg.raft.election_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_logs),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    Ok(Arc::new(c.validate().context("raft settings")?))
}

impl RunningNode {
    pub async fn start(cfg: Config) -> anyhow::Result<RunningNode> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let db = meta::open_db(&cfg.data_dir.join("meta")).context("opening metadata database")?;
        let store = BlobStore::new(cfg.data_dir.join("blobs"))?;
        let uploads = Uploads::new(cfg.node_id, cfg.data_dir.join("uploads"), store)?;

        let http = TcpListener::bind(&cfg.http)
            .await
            .with_context(|| format!("binding {}", cfg.http))?;
        let grpc = TcpListener::bind(&cfg.grpc)
            .await
            .with_context(|| format!("binding {}", cfg.grpc))?;
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;

        let sm = StateMachine::new(db.clone(), cfg.data_dir.join("snapshots"))?;
        let raft = Raft::new(cfg.node_id, raft_config(&cfg)?, Network, LogStore::new(db.clone()), sm)
            .await
            .context("starting raft")?;
        let cluster = Cluster::new(cfg.node_id, raft.clone(), cfg.consistency);
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let svc = RaftRpcServer::new(RaftService { raft: raft.clone() })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut grpc_stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream_from(grpc);
            let res = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stop.changed().await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "grpc server failed");
            }
        }));

        if !raft.is_initialized().await? {
            let me = NodeInfo {
                api: http_addr.to_string(),
                grpc: grpc_addr.to_string(),
                region: cfg.region.clone(),
            };
            tracing::info!(node = cfg.node_id, "initializing a new one-member cluster");
            raft.initialize(std::collections::BTreeMap::from([(cfg.node_id, me)]))
                .await?;
        }
        raft.wait(Some(Duration::from_secs(60)))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .context("waiting for a leader")?;

        let state = AppState {
            meta: MetaReader::new(db),
            cluster: cluster.clone(),
            uploads: uploads.clone(),
            max_manifest_bytes: cfg.max_manifest_bytes,
        };
        tasks.push(tokio::spawn(api::serve(http, state, rx.clone())));
        tasks.push(tokio::spawn(expire_uploads(
            uploads,
            Duration::from_secs(cfg.upload_expiry_secs),
            rx,
        )));
        tracing::info!(node = cfg.node_id, %http_addr, %grpc_addr, "berth node serving");
        Ok(RunningNode {
            http_addr,
            grpc_addr,
            cluster,
            shutdown,
            tasks,
        })
    }

    /// Stop accepting requests and stop Raft.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.cluster.raft.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

fn tokio_stream_from(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// Periodically remove abandoned upload sessions.
async fn expire_uploads(uploads: Uploads, max_age: Duration, mut stop: watch::Receiver<bool>) {
    let every = (max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        match uploads.expire(max_age).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired upload sessions"),
            Err(e) => tracing::warn!(error = %e, "expiring uploads"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
