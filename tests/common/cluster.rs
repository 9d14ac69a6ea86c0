//! Multi-node clusters of real `berth serve` processes on loopback.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use berth::cluster::NodeStatus;

use powerloss_fs::PowerLossFs;

use super::gate::Gate;
use super::{free_port, spawn_serve, wait_for, write_config, Proc};

pub struct NodeSpec {
    pub id: u64,
    pub http: u16,
    pub grpc: u16,
    pub config: PathBuf,
}

/// Fields drop in order: processes first, then the filesystems they used,
/// then the directory holding it all.
pub struct TestCluster {
    pub procs: Vec<Option<Proc>>,
    /// With [`TestCluster::start_gated`]: the gate in front of each node's
    /// cluster port, which every other node sends its Raft traffic through.
    pub gates: Vec<Gate>,
    /// With [`TestCluster::start_on_power_loss_disks`]: each node's data dir
    /// is the mount of its own power-loss filesystem.
    pub disks: Vec<PowerLossFs>,
    pub nodes: Vec<NodeSpec>,
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    /// Write configs for `n` nodes that bootstrap together, and start them.
    pub async fn start(n: u64, snapshot_logs: u64) -> TestCluster {
        Self::start_with(n, snapshot_logs, |_| String::new()).await
    }

    /// Like `start`, with `extra(id)` added to node `id`'s top-level settings.
    pub async fn start_with(n: u64, snapshot_logs: u64, extra: impl Fn(u64) -> String) -> TestCluster {
        Self::start_opts(n, snapshot_logs, extra, false, false).await
    }

    /// Like `start_with`, with each node's data dir on a power-loss
    /// filesystem (see [`TestCluster::power_cut`]). None, said as skipped,
    /// where this machine cannot mount one.
    pub async fn start_on_power_loss_disks(
        n: u64,
        snapshot_logs: u64,
        extra: impl Fn(u64) -> String,
    ) -> Option<TestCluster> {
        if let Err(why) = PowerLossFs::available() {
            super::skipped(&format!("power-loss crash tests: {why}"));
            return None;
        }
        Some(Self::start_opts(n, snapshot_logs, extra, false, true).await)
    }

    /// Like `start`, with every node's cluster port behind a [`Gate`] the
    /// test can close (see `gates`).
    pub async fn start_gated(n: u64) -> TestCluster {
        Self::start_opts(n, 10_000, |_| String::new(), true, false).await
    }

    async fn start_opts(
        n: u64,
        snapshot_logs: u64,
        extra: impl Fn(u64) -> String,
        gated: bool,
        power_loss_disks: bool,
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<NodeSpec> = (1..=n)
            .map(|id| NodeSpec {
                id,
                http: free_port(),
                grpc: free_port(),
                config: dir.path().join(format!("n{id}.toml")),
            })
            .collect();
        let mut gates = Vec::new();
        if gated {
            for s in &nodes {
                gates.push(Gate::start(s.grpc).await);
            }
        }
        let members: String = nodes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let grpc = gates.get(i).map_or(s.grpc, |g| g.port);
                // A node's `region` setting is recorded in the membership
                // through its initial_members entry.
                let region = extra(s.id).lines().find(|l| l.starts_with("region =")).map(|l| format!("{l}\n"));
                format!(
                    "[[initial_members]]\nid = {}\nhttp = \"127.0.0.1:{}\"\ngrpc = \"127.0.0.1:{grpc}\"\n{}",
                    s.id,
                    s.http,
                    region.unwrap_or_default()
                )
            })
            .collect();
        for s in &nodes {
            let rest = format!(
                "{}\n[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\nsnapshot_logs = {snapshot_logs}\nkeep_logs = {}\n\n{members}",
                extra(s.id),
                (snapshot_logs / 5).max(1)
            );
            write_config(&s.config, s.id, s.http, s.grpc, &dir.path().join(format!("data{}", s.id)), &rest);
        }
        let mut disks = Vec::new();
        if power_loss_disks {
            for s in &nodes {
                let mnt = dir.path().join(format!("data{}", s.id));
                std::fs::create_dir_all(&mnt).unwrap();
                disks.push(PowerLossFs::mount(&dir.path().join(format!("backing{}", s.id)), &mnt).unwrap());
            }
        }
        let mut c = TestCluster { procs: Vec::new(), gates, disks, nodes, dir };
        for i in 0..c.nodes.len() {
            c.procs.push(None);
            c.start_node(i).await;
        }
        c.wait_leader_everywhere().await;
        c
    }

    pub async fn start_node(&mut self, i: usize) {
        let s = &self.nodes[i];
        let args = vec!["--config".to_string(), s.config.display().to_string()];
        self.procs[i] = Some(spawn_serve(&args, s.http).await);
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.0.kill().unwrap();
            p.0.wait().unwrap();
        }
    }

    /// Cut node `i`'s power: its disk keeps only what was made durable, and
    /// the process dies at once (it is killed as its disk stops answering).
    /// Start it again with [`TestCluster::start_node`].
    pub fn power_cut(&mut self, i: usize) {
        self.disks[i].power_off().unwrap();
        self.kill(i);
        self.disks[i].power_on();
    }

    /// Cut every node's power at once (each disk first, then the processes):
    /// the failure in which only fsync protects anything.
    pub fn power_cut_all(&mut self) {
        for d in &self.disks {
            d.power_off().unwrap();
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for d in &self.disks {
            d.power_on();
        }
    }

    pub fn base(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].http)
    }

    pub fn grpc(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].grpc)
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("data{}", self.nodes[i].id))
    }

    /// Where node `i` keeps blob `digest` ("sha256:..").
    pub fn blob_path(&self, i: usize, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap();
        self.data_dir(i).join("blobs").join(alg).join(&hex[..2]).join(hex)
    }

    pub fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.procs[*i].is_some()).collect()
    }

    pub async fn status(&self, i: usize) -> Option<NodeStatus> {
        let admin = super::admin(&self.grpc(i));
        admin.node_status().await.ok()
    }

    /// Wait until every running node names the same leader, which is
    /// running; returns its index.
    pub async fn wait_leader_everywhere(&self) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(i) = self.agreed_leader().await {
                return i;
            }
            assert!(std::time::Instant::now() < deadline, "no leader agreed by every running node");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn agreed_leader(&self) -> Option<usize> {
        let alive = self.alive();
        let mut seen = None;
        for i in &alive {
            let s = self.status(*i).await?;
            if s.leader == 0 || seen.is_some_and(|l| l != s.leader) {
                return None;
            }
            seen = Some(s.leader);
        }
        alive.iter().copied().find(|i| Some(self.nodes[*i].id) == seen)
    }

    /// Wait until node `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64) {
        wait_for("node to apply", Duration::from_secs(60), || async move {
            self.status(i).await.is_some_and(|s| s.applied_index >= index)
        })
        .await;
    }
}
