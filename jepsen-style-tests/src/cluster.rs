//! The docker-compose cluster under test: its own project name, images and
//! port, node addresses on the compose network, leader lookup, and the
//! docker and iptables commands the faults are made of.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth::cluster::ClusterAdmin;
use tokio::process::Command;

pub const NODES: [&str; 3] = ["node1", "node2", "node3"];

/// Where clients send requests: each node's API on the compose network,
/// and the load balancer on the host port. Re-resolved after every fault,
/// since a restarted container may get another address.
#[derive(Clone, Default)]
pub struct Targets(Arc<RwLock<HashMap<String, String>>>);

impl Targets {
    pub fn url(&self, target: &str) -> Option<String> {
        self.0.read().unwrap().get(target).cloned()
    }
    fn set(&self, target: &str, base: String) {
        self.0.write().unwrap().insert(target.to_owned(), base);
    }
}

pub struct Cluster {
    pub project: String,
    pub root: PathBuf,
    pub port: u16,
    pub image: String,
    pub targets: Targets,
    /// Nodes 1-3's data dirs on power-loss filesystems, when the run cuts
    /// power.
    pub disks: Option<Disks>,
}

/// Each of nodes 1-3's `/data` on a power-loss filesystem (powerloss-fs)
/// served by this process and bind-mounted into its container, so a fault
/// can cut a node's power: what it had not fsynced is gone. (Node 3's blob
/// disk, a tmpfs for the disk-full fault, is not among them.)
pub struct Disks {
    dir: PathBuf,
    disks: HashMap<&'static str, powerloss_fs::PowerLossFs>,
    /// The compose override binding each mount as the node's `/data`.
    compose_file: PathBuf,
}

impl Disks {
    pub fn mount(project: &str) -> anyhow::Result<Disks> {
        powerloss_fs::PowerLossFs::available().map_err(anyhow::Error::msg)?;
        let dir = std::env::temp_dir().join(format!("{project}-disks"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut disks = HashMap::new();
        let mut yaml = String::from("version: \"3.9\"\nservices:\n");
        for node in NODES {
            let mnt = dir.join(node);
            std::fs::create_dir_all(&mnt)?;
            let fs = powerloss_fs::PowerLossFs::mount(&dir.join(format!("{node}-backing")), &mnt)
                .with_context(|| format!("mounting {node}'s power-loss disk"))?;
            disks.insert(node, fs);
            yaml.push_str(&format!("  {node}:\n    volumes:\n      - {}:/data\n", mnt.display()));
        }
        let compose_file = dir.join("power-loss-disks.yml");
        std::fs::write(&compose_file, yaml)?;
        Ok(Disks { dir, disks, compose_file })
    }

    pub fn get(&self, node: &str) -> anyhow::Result<&powerloss_fs::PowerLossFs> {
        self.disks.get(node).with_context(|| format!("{node} has no power-loss disk"))
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.disks.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().await.with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Cluster {
    fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(&self.root).args([
            "-p",
            &self.project,
            "-f",
            "docker-compose.yml",
            "-f",
            "jepsen-style-tests/compose/jepsen.yml",
        ]);
        if let Some(d) = &self.disks {
            c.arg("-f").arg(&d.compose_file);
        }
        c.args(["--profile", "join"]).env("BERTH_IMAGE", &self.image).env("BERTH_PORT", self.port.to_string());
        c
    }

    /// Build the images offline (docker/build-images.sh) and start the three
    /// nodes, the load balancer and the standby node 4.
    pub async fn up(&self, berth_bin: &str) -> anyhow::Result<()> {
        run(Command::new("bash")
            .current_dir(&self.root)
            .arg("docker/build-images.sh")
            .arg(berth_bin)
            .env("BERTH_IMAGE", &self.image))
        .await?;
        run(Command::new("bash").current_dir(&self.root).arg("docker/certs.sh").arg(berth_bin)).await?;
        run(self.compose().args(["up", "-d"])).await?;
        Ok(())
    }

    /// Remove everything the run made: containers, network, volumes, image.
    pub async fn down(&self) {
        let _ = run(self.compose().args(["down", "-v", "--remove-orphans"])).await;
        let _ = run(Command::new("docker").args(["rmi", "-f", &self.image])).await;
    }

    pub async fn container(&self, node: &str) -> anyhow::Result<String> {
        let id = run(self.compose().args(["ps", "-q", node])).await?;
        if id.is_empty() {
            bail!("no container for {node}");
        }
        Ok(id)
    }

    async fn ip(&self, node: &str) -> anyhow::Result<String> {
        let c = self.container(node).await?;
        let ip = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &c,
        ]))
        .await?;
        if ip.is_empty() {
            bail!("{node} has no address (is it running?)");
        }
        Ok(ip)
    }

    /// Refresh the client targets from the containers' current addresses.
    pub async fn resolve(&self) {
        self.targets.set("lb", format!("http://127.0.0.1:{}", self.port));
        for node in NODES.iter().chain(["node4"].iter()) {
            if let Ok(ip) = self.ip(node).await {
                self.targets.set(node, format!("http://{ip}:5000"));
            }
        }
    }

    /// The operator's certificate for the cluster port (docker/certs.sh).
    fn admin_tls(&self) -> Option<berth::cluster::tls::ClusterTls> {
        let files = berth::cluster::tls::TlsFiles::admin_in(&self.root.join("cluster-config/compose/tls"));
        berth::cluster::tls::ClusterTls::load(&files).ok()
    }

    /// The leader as every running node of 1-3 sees it, if they agree.
    pub async fn leader(&self) -> Option<String> {
        let mut seen = None;
        for node in NODES {
            let ip = self.ip(node).await.ok()?;
            let s = ClusterAdmin::new(&format!("{ip}:5001"), self.admin_tls()).node_status().await.ok()?;
            if s.leader == 0 || seen.is_some_and(|l| l != s.leader) {
                return None;
            }
            seen = Some(s.leader);
        }
        seen.map(|id| format!("node{id}"))
    }

    /// Whether every node of 1-3 has applied all that its leader had
    /// committed when asked (the leader is asked first, so a follower that
    /// keeps up under load still counts as caught up).
    pub async fn caught_up(&self) -> bool {
        let Some(leader) = self.leader().await else { return false };
        let status = |node: String| async move {
            let ip = self.ip(&node).await.ok()?;
            ClusterAdmin::new(&format!("{ip}:5001"), self.admin_tls()).node_status().await.ok()
        };
        let Some(commit) = status(leader.clone()).await.map(|s| s.commit_index) else { return false };
        for node in NODES {
            match status(node.to_owned()).await {
                Some(s) if s.applied_index >= commit => {}
                _ => return false,
            }
        }
        true
    }

    /// Wait until the leader's repair has restored every copy: two of its
    /// repair rounds completed (so one began after this call) and the last
    /// found no blob below its copy target (`berth_blobs_below_target` on
    /// its `/metrics`). A new leader starts the count again.
    pub async fn wait_repaired(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let gauge = |text: &str, name: &str| -> Option<i64> {
            text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        let mut first: Option<(String, i64)> = None;
        loop {
            if let Some(leader) = self.leader().await {
                let ip = self.ip(&leader).await?;
                let text = match http.get(format!("http://{ip}:5000/metrics")).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if let (Some(rounds), Some(below)) =
                    (gauge(&text, "berth_repair_rounds"), gauge(&text, "berth_blobs_below_target"))
                {
                    match &first {
                        Some((l, r0)) if *l == leader => {
                            if rounds >= r0 + 2 && below == 0 {
                                return Ok(start.elapsed());
                            }
                        }
                        _ => first = Some((leader, rounds)),
                    }
                }
            }
            if start.elapsed() > timeout {
                bail!("copies not all restored after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Wait until nodes 1-3 answer and agree on a leader, and the load
    /// balancer answers; returns how long that took.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            self.resolve().await;
            if self.leader().await.is_some() && self.caught_up().await {
                let lb = http.get(format!("http://127.0.0.1:{}/v2/", self.port)).send().await;
                if lb.is_ok_and(|r| r.status().is_success()) {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > timeout {
                bail!("cluster not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("docker").args(args)).await
    }

    /// kill -9 a container and wait until its processes are gone; one
    /// that already stopped (a node whose disk lost power exits by itself
    /// on the I/O error) counts as killed. A power cut must not give the
    /// power back before then: `docker kill` returns once the signal is
    /// sent, and a process still dying when the power returns could act on
    /// the disk with its memory of before the cut (unlink a log file that
    /// the cut made live again, say), which no real power loss allows.
    pub async fn kill_and_wait(&self, container: &str) -> anyhow::Result<()> {
        if let Err(e) = self.docker(&["kill", "-s", "KILL", container]).await {
            let running = self.docker(&["inspect", "-f", "{{.State.Running}}", container]).await?;
            if running != "false" {
                return Err(e);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), self.docker(&["wait", container])).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => bail!("container {container} still running 30 s after kill -9"),
        }
    }

    /// Run `berth` inside node 1's container (cluster join/leave).
    pub async fn berth_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let c = self.container("node1").await?;
        let mut full = vec!["exec", c.as_str(), "berth"];
        full.extend_from_slice(args);
        run(Command::new("docker").args(&full)).await
    }

    /// Bring a wiped `node` back with the documented procedure: `berth
    /// cluster replace`, asked of another member, retried while the
    /// cluster is busy (an election, the fresh node still starting).
    pub async fn replace(&self, node: &str) -> anyhow::Result<()> {
        let id = node.trim_start_matches("node");
        let via = NODES.iter().copied().find(|n| *n != node).unwrap_or("node1");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let c = self.container(via).await?;
            let addr = format!("{via}:5001");
            let r =
                run(Command::new("docker")
                    .args(["exec", &c, "berth", "cluster", "replace", "--node", &addr, "--id", id]))
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("replacing {node}"))),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Drop traffic between `a` and `b` in both directions (inside each
    /// container's network namespace; clients still reach both).
    pub async fn cut(&self, a: &str, b: &str) -> anyhow::Result<()> {
        let (ia, ib) = (self.ip(a).await?, self.ip(b).await?);
        for (node, peer) in [(a, &ib), (b, &ia)] {
            let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", &self.container(node).await?]).await?;
            for rule in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
                run(Command::new("nsenter")
                    .args(["-t", &pid, "-n", "iptables", "-A", rule[0], rule[1], peer, "-j", "DROP"]))
                .await?;
            }
        }
        Ok(())
    }

    /// Remove every partition rule (node 4's too: it may be a member, and
    /// the leader a partition cut off, when a partition starts).
    pub async fn heal_network(&self) {
        for node in NODES.iter().chain(["node4"].iter()) {
            let Ok(c) = self.container(node).await else { continue };
            let Ok(pid) = self.docker(&["inspect", "-f", "{{.State.Pid}}", &c]).await else { continue };
            if pid == "0" {
                continue;
            }
            for chain in ["INPUT", "OUTPUT"] {
                let _ = run(Command::new("nsenter").args(["-t", &pid, "-n", "iptables", "-F", chain])).await;
            }
        }
    }
}
