//! One berth node: opens storage, starts Raft and its gRPC transport,
//! bootstraps the one-member cluster on first start, and serves the API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::api::{self, AppState};
use crate::blob::{gc, repair, scrub, BlobStore, Policy, Replicator, SessionLimits, Throttle, Transfer, Uploads};
use crate::cluster::identity::Guard;
use crate::cluster::listener;
use crate::cluster::tls::ClusterTls;
use crate::cluster::{
    AdminServer, AdminService, BlobsServer, Cluster, ClusterAdmin, Identity, JoinRequest, MetaServer, MetaService,
    Network, Peers, RaftRpcServer, RaftService, MAX_MESSAGE,
};
use crate::config::Config;
use crate::meta::{self, IdentityStore, LogStore, StateMachine};
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
        max_in_snapshot_log_to_keep: cfg.raft.keep_logs,
        ..Default::default()
    };
    Ok(Arc::new(c.validate().context("raft settings")?))
}

impl RunningNode {
    pub async fn start(cfg: Config) -> anyhow::Result<RunningNode> {
        cfg.validate()?;
        crate::durable::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let db = meta::open_current(&cfg.data_dir.join("meta"), &cfg.data_dir.join("snapshots"))
            .context("opening metadata database")?;
        // RocksDB makes the names inside its directory durable, not the
        // directory's own name, made just now on a first start.
        crate::durable::sync_dir(&cfg.data_dir).context("syncing the data dir")?;
        let content = cfg.blob_dir.as_ref().unwrap_or(&cfg.data_dir);
        let store = BlobStore::new(content.join("blobs"))?.with_reserve(cfg.min_free_mib.saturating_mul(1 << 20));
        let uploads = Uploads::new(
            cfg.node_id,
            content.join("uploads"),
            store,
            SessionLimits { per_repo: cfg.limits.max_uploads_per_repo, per_client: cfg.limits.max_uploads_per_client },
        )?;

        let http = TcpListener::bind(&cfg.http).await.with_context(|| format!("binding {}", cfg.http))?;
        let grpc = TcpListener::bind(&cfg.grpc).await.with_context(|| format!("binding {}", cfg.grpc))?;
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;

        let identity_store = IdentityStore::new(db.clone());
        let identity = Identity::new(identity_store.clone(), identity_store.load_or_create(cfg.node_id)?);
        let sm = StateMachine::new(db.clone(), cfg.data_dir.join("snapshots"))?;
        let meta = sm.reader();
        let log = LogStore::open(db.clone(), &cfg.data_dir.join("raft-log")).context("opening the Raft log")?;
        let log_stats = log.stats();
        let log_at_start = (log.last_index(), log.vote_term());
        let tls = cfg.cluster_tls.as_ref().map(ClusterTls::load).transpose().context("loading cluster_tls")?;
        if cfg.insecure_cluster {
            tracing::warn!(
                "insecure_cluster = true: cluster traffic is plain text and any process that can reach the \
                 cluster port can speak for a member"
            );
        }
        let append_deadline = std::time::Duration::from_millis(cfg.raft.election_min_ms);
        let network = Network::new(Peers::new(identity.clone(), tls.clone()), append_deadline);
        let raft = Raft::new(cfg.node_id, raft_config(&cfg)?, network, log, sm).await.context("starting raft")?;
        let cluster =
            Cluster::new(identity.clone(), tls.clone(), raft.clone(), log_stats, log_at_start, cfg.consistency);
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Every service refuses calls from another cluster.
        let guard = Guard(identity.clone());
        let raft_svc = RaftRpcServer::new(RaftService { raft: raft.clone(), identity: identity.clone() })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let raft_svc = InterceptedService::new(raft_svc, guard.clone());
        let meta_svc = MetaServer::new(MetaService { cluster: cluster.clone() })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let meta_svc = InterceptedService::new(meta_svc, guard.clone());
        let policy = Policy {
            replicas: cfg.replicas,
            min_copies: cfg.min_copies,
            min_regions: cfg.min_regions,
            cache_on_read: cfg.cache_on_read,
        };
        let transfer =
            Transfer::new(uploads.store().clone(), cluster.peers.clone(), Throttle::new(cfg.transfer.clone()));
        let replicator = Replicator::new(cluster.clone(), meta.clone(), transfer.clone(), policy);
        let gc_report = Arc::new(gc::GcReport::default());
        let collector = gc::Collector::new(
            replicator.clone(),
            meta.clone(),
            gc::GcSettings {
                grace: Duration::from_secs(cfg.gc_grace_secs),
                every: (cfg.gc_interval_secs > 0).then(|| Duration::from_secs(cfg.gc_interval_secs)),
            },
            gc_report.clone(),
        );
        let policies = Arc::new(crate::policy::Policies::compile(&cfg).map_err(|e| anyhow::anyhow!(e))?);
        let retainer = crate::policy::Retainer::new(
            policies.clone(),
            meta.clone(),
            cluster.clone(),
            (cfg.retention_interval_secs > 0).then(|| Duration::from_secs(cfg.retention_interval_secs)),
        );
        let admin_svc = AdminServer::new(AdminService {
            cluster: cluster.clone(),
            evacuator: Arc::new(replicator.clone()),
            collector: Arc::new(collector.clone()),
            retainer: Arc::new(retainer.clone()),
        });
        let admin_svc = InterceptedService::new(admin_svc, guard.clone());
        let blob_svc = InterceptedService::new(BlobsServer::new(transfer.clone()), guard);
        let mut grpc_stop = rx.clone();
        let server = tonic::transport::Server::builder();
        // One cluster port: gRPC and the blob byte stream, both behind the
        // same mutual TLS.
        // API requests members pass on (upload requests for sessions this
        // node owns) are served once the API state exists; until then a
        // forwarded connection is closed and the member answers its client
        // that the upload is unknown.
        let api_state: Arc<std::sync::OnceLock<Arc<AppState>>> = Default::default();
        let on_forward = {
            let api_state = api_state.clone();
            Arc::new(move |conn| match api_state.get() {
                Some(state) => api::serve_peer(state.clone(), conn),
                None => drop(conn),
            })
        };
        let incoming = listener::serve(grpc, tls.clone(), Arc::new(move |conn| transfer.serve(conn)), on_forward);
        tasks.push(tokio::spawn(async move {
            let res = server
                .initial_stream_window_size(crate::cluster::WINDOW)
                .initial_connection_window_size(crate::cluster::WINDOW * 2)
                .add_service(raft_svc)
                .add_service(meta_svc)
                .add_service(admin_svc)
                .add_service(blob_svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stop.changed().await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "grpc server failed");
            }
        }));

        let me = NodeInfo {
            api: cfg.advertise_http.clone().unwrap_or_else(|| http_addr.to_string()),
            grpc: cfg.advertise_grpc.clone().unwrap_or_else(|| grpc_addr.to_string()),
            region: cfg.region.clone(),
            incarnation: identity.incarnation(),
        };
        if !raft.is_initialized().await? {
            bootstrap(&cfg, &cluster, me, &mut tasks).await?;
        }
        if cfg.join.is_none() && cfg.initial_members.is_empty() && !cfg.standby {
            // A one-node cluster elects itself at once; wait for it so the
            // first request does not have to.
            raft.wait(Some(Duration::from_secs(30)))
                .metrics(|m| m.current_leader.is_some(), "a leader is known")
                .await
                .context("waiting for leadership")?;
        }

        let repair = repair::RepairSettings {
            interval: Duration::from_secs(cfg.repair_interval_secs.max(1)),
            dead_after: Duration::from_secs(cfg.dead_after_secs.max(1)),
            sweep: Duration::from_secs(cfg.repair_sweep_secs.max(1)),
        };
        let repair_report = Arc::new(repair::RepairReport::default());
        let scrub_report = Arc::new(scrub::ScrubReport::default());
        tasks.push(tokio::spawn(scrub::run(
            replicator.clone(),
            meta.clone(),
            scrub::ScrubSettings {
                every: Duration::from_secs(cfg.scrub_interval_secs.max(1)),
                bytes_per_sec: cfg.scrub_mib_per_sec.saturating_mul(1 << 20),
            },
            cfg.blob_dir.as_ref().unwrap_or(&cfg.data_dir).join("scrub.json"),
            scrub_report.clone(),
            rx.clone(),
        )));
        tasks.push(tokio::spawn(repair::run(
            replicator.clone(),
            meta.clone(),
            repair,
            repair_report.clone(),
            rx.clone(),
        )));
        tasks.push(tokio::spawn(collector.run(rx.clone())));
        tasks.push(tokio::spawn(retainer.run(rx.clone())));
        let metrics = Arc::new(api::Metrics::default());
        let notifier = crate::notify::Notifier::new(
            &cfg.webhooks,
            cfg.webhook_queue_max,
            cfg.tls.is_some(),
            meta.clone(),
            cluster.clone(),
            metrics.registry(),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        tasks.push(tokio::spawn(notifier.clone().run(rx.clone())));
        let state = AppState {
            meta,
            repair: repair_report,
            scrub: scrub_report,
            gc: gc_report,
            replicator,
            cluster: cluster.clone(),
            uploads: uploads.clone(),
            max_manifest_bytes: cfg.max_manifest_bytes,
            http: AppState::http_client(tls.clone()),
            metrics,
            policies,
            notifier,
            limits: Arc::new(api::ApiLimits::new(&cfg.limits)),
            auth: api::auth::Auth::load(cfg.auth.as_ref(), &cfg.access).map_err(|e| anyhow::anyhow!(e))?,
        };
        tasks.push(tokio::spawn(state.auth.clone().watch(rx.clone())));
        let state = Arc::new(state);
        let _ = api_state.set(state.clone());
        let api_tls = cfg.tls.as_ref().map(api::tls::ApiTls::load).transpose().context("loading [tls]")?;
        if let Some(t) = &api_tls {
            tasks.push(tokio::spawn(t.clone().watch(rx.clone())));
        }
        tasks.push(tokio::spawn(api::serve(http, api_tls, state, rx.clone())));
        tasks.push(tokio::spawn(expire_uploads(uploads, Duration::from_secs(cfg.upload_expiry_secs), rx)));
        tracing::info!(node = cfg.node_id, %http_addr, %grpc_addr, "berth node serving");
        Ok(RunningNode { http_addr, grpc_addr, cluster, shutdown, tasks })
    }

    /// Resolves, with the reason, once Raft on this node has stopped on a
    /// fatal error (a storage failure, say). Such a node can no longer take
    /// writes or serve linearizable reads, and every request would get a
    /// 500; exiting lets its supervisor restart it from its durable state.
    pub async fn raft_failed(&self) -> String {
        let mut metrics = self.cluster.raft.metrics();
        loop {
            if let Err(e) = &metrics.borrow_and_update().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "Raft stopped".into();
            }
        }
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

/// First start of a node: initialize a new cluster, join an existing one,
/// or wait to be contacted by the member that initializes.
async fn bootstrap(
    cfg: &Config,
    cluster: &Cluster,
    me: NodeInfo,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<()> {
    if let Some(via) = cfg.join.clone() {
        let req = JoinRequest { id: cfg.node_id, api: me.api, grpc: me.grpc, region: me.region, learner: cfg.learner };
        tracing::info!(%via, "joining an existing cluster");
        let peers = cluster.peers.clone();
        tasks.push(tokio::spawn(async move {
            let admin = ClusterAdmin::with_peers(&via, peers);
            loop {
                match admin.join(req.clone()).await {
                    Ok(msg) => {
                        tracing::info!("{msg}");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e.message(), "join failed; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
        return Ok(());
    }
    if cfg.standby {
        tracing::info!(node = cfg.node_id, "standby: waiting for `berth cluster join` to add this node");
        return Ok(());
    }
    if cfg.initial_members.is_empty() {
        cluster.identity.found_cluster()?;
        tracing::info!(node = cfg.node_id, "initializing a one-node cluster");
        cluster.raft.initialize(BTreeMap::from([(cfg.node_id, me)])).await?;
        return Ok(());
    }
    let first = cfg.initial_members.iter().map(|m| m.id).min().expect("at least one member");
    if first != cfg.node_id {
        tracing::info!(node = cfg.node_id, initializer = first, "waiting for node {first} to initialize the cluster");
        return Ok(());
    }
    // The others may not be up yet: ask them in the background, so this
    // node serves its API (and answers their questions) meanwhile.
    let (members, cluster) = (cfg.initial_members.clone(), cluster.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = initialize_when_all_answer(&members, &cluster).await {
            tracing::error!(error = %e, "initializing the cluster failed");
        }
    }));
    Ok(())
}

/// Initialize a new cluster of `members` once every one of them has said it
/// belongs to none: a node whose data dir was wiped must never start a
/// second cluster beside the one its peers still run (two answers for one
/// tag). The membership records each member's incarnation as the member
/// itself reports it.
async fn initialize_when_all_answer(members: &[crate::config::MemberConfig], cluster: &Cluster) -> anyhow::Result<()> {
    let my_id = cluster.id;
    let mut rounds = 0u64;
    loop {
        let mut infos = BTreeMap::new();
        let mut silent = Vec::new();
        for m in members {
            let info = NodeInfo { api: m.http.clone(), grpc: m.grpc.clone(), region: m.region.clone(), incarnation: 0 };
            if m.id == my_id {
                infos.insert(m.id, NodeInfo { incarnation: cluster.identity.incarnation(), ..info });
                continue;
            }
            match cluster.peers.status(&m.grpc, Duration::from_secs(2)).await {
                Ok(st) if !st.cluster_id.is_empty() => {
                    let known = st.members.iter().find(|x| x.id == my_id).map(|x| x.incarnation);
                    cluster.identity.refuse(format!(
                        "node {my_id}'s data dir is new (incarnation {:016x}), but node {} already belongs to \
                         cluster {}{}: this node will not initialize a second cluster, vote or serve as node \
                         {my_id}. To bring it back as a fresh copy of node {my_id}, run \
                         `berth cluster replace --node {} --id {my_id}` once a majority of voters is up",
                        cluster.identity.incarnation(),
                        m.id,
                        st.cluster_id,
                        known
                            .map(|k| format!(", which knows node {my_id} as incarnation {k:016x}"))
                            .unwrap_or_default(),
                        m.grpc,
                    ));
                    return Ok(());
                }
                Ok(st) if st.id != m.id => {
                    anyhow::bail!(
                        "the node at {} says it is node {}, but the config names node {}",
                        m.grpc,
                        st.id,
                        m.id
                    )
                }
                Ok(st) => {
                    infos.insert(m.id, NodeInfo { incarnation: st.incarnation, ..info });
                }
                Err(_) => silent.push(m.id),
            }
        }
        if silent.is_empty() {
            cluster.identity.found_cluster()?;
            tracing::info!(node = my_id, members = infos.len(), "every member answered; initializing a new cluster");
            cluster.raft.initialize(infos).await?;
            return Ok(());
        }
        if rounds.is_multiple_of(10) {
            tracing::info!(?silent, "waiting for every initial member to answer before initializing the cluster");
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
