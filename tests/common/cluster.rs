//! Multi-node clusters of real `berth serve` processes on loopback.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use berth::cluster::NodeStatus;

use super::gate::Gate;
use super::{free_port, spawn_serve, wait_for, write_config, Proc};

pub struct NodeSpec {
    pub id: u64,
    pub http: u16,
    pub grpc: u16,
    pub config: PathBuf,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeSpec>,
    pub procs: Vec<Option<Proc>>,
    /// With [`TestCluster::start_gated`]: the gate in front of each node's
    /// cluster port, which every other node sends its Raft traffic through.
    pub gates: Vec<Gate>,
}

impl TestCluster {
    /// Write configs for `n` nodes that bootstrap together, and start them.
    pub async fn start(n: u64, snapshot_logs: u64) -> TestCluster {
        Self::start_with(n, snapshot_logs, |_| String::new()).await
    }

    /// Like `start`, with `extra(id)` added to node `id`'s top-level settings.
    pub async fn start_with(n: u64, snapshot_logs: u64, extra: impl Fn(u64) -> String) -> TestCluster {
        Self::start_opts(n, snapshot_logs, extra, false).await
    }

    /// Like `start`, with every node's cluster port behind a [`Gate`] the
    /// test can close (see `gates`).
    pub async fn start_gated(n: u64) -> TestCluster {
        Self::start_opts(n, 10_000, |_| String::new(), true).await
    }

    async fn start_opts(n: u64, snapshot_logs: u64, extra: impl Fn(u64) -> String, gated: bool) -> TestCluster {
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
        let mut c = TestCluster { dir, nodes, procs: Vec::new(), gates };
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
