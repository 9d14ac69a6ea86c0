//! Faults, injected one at a time on a seeded schedule: each is started,
//! held, healed, and logged with its start and end; the cluster is then
//! given time to recover before the next one.

use std::time::Duration;

use anyhow::Context;
use berth_jepsen::history::FaultWindow;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::{Cluster, NODES};
use crate::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// kill -9 of a random node, restarted after the hold.
    Kill,
    /// kill -9 of the leader.
    KillLeader,
    /// kill -9 of a random node, kept down past `dead_after_secs`: its
    /// copies stop counting and repair runs without it; then it returns.
    LongKill,
    /// SIGSTOP of a whole node (docker pause), then resume.
    Pause,
    /// The leader cut off from the other nodes (clients still reach it).
    IsolateLeader,
    /// A random follower cut off from the majority.
    Split,
    /// Two nodes cut from each other, both still reaching the third.
    Bridge,
    /// Graceful restart of a random node.
    Restart,
    /// Node 4 joins as a voter under load, then leaves (drained).
    Membership,
    /// Node 3's blob disk filled to the last byte.
    DiskFull,
    /// A random node killed, its data dir and blobs wiped (a lost disk),
    /// started again empty; healed by `berth cluster replace`.
    Wipe,
    /// A random node's power cut: its data dir keeps only what was made
    /// durable (powerloss-fs), the process dies with it; restarted after
    /// the hold.
    PowerLoss,
    /// Every node's power cut at once (the failure only fsync survives);
    /// all restarted after the hold.
    PowerLossAll,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::KillLeader => "kill-leader",
            Kind::LongKill => "long-kill",
            Kind::Pause => "pause",
            Kind::IsolateLeader => "isolate-leader",
            Kind::Split => "split",
            Kind::Bridge => "bridge",
            Kind::Restart => "restart",
            Kind::Membership => "membership",
            Kind::DiskFull => "disk-full",
            Kind::Wipe => "wipe",
            Kind::PowerLoss => "power-loss",
            Kind::PowerLossAll => "power-loss-all",
        }
    }

    /// The default set.
    /// Whether the kind needs the nodes' data dirs on power-loss disks.
    pub fn cuts_power(self) -> bool {
        matches!(self, Kind::PowerLoss | Kind::PowerLossAll)
    }

    /// The set a run injects unless told otherwise: every kind.
    pub fn default_set() -> Vec<Kind> {
        Kind::ALL.to_vec()
    }

    pub const ALL: [Kind; 13] = [
        Kind::Kill,
        Kind::KillLeader,
        Kind::LongKill,
        Kind::Pause,
        Kind::IsolateLeader,
        Kind::Split,
        Kind::Bridge,
        Kind::Restart,
        Kind::Membership,
        Kind::DiskFull,
        Kind::Wipe,
        Kind::PowerLoss,
        Kind::PowerLossAll,
    ];
}

/// The compose nodes' `dead_after_secs` (cluster-config/compose): a
/// long-kill holds past it.
const DEAD_AFTER: Duration = Duration::from_secs(20);

/// What must be undone to heal a fault.
enum Undo {
    Start(String),
    StartAll,
    Unpause(String),
    Network,
    Leave,
    Unfill,
    /// `berth cluster replace` of the wiped node.
    Replace(String),
    Nothing,
}

pub struct Nemesis<'a> {
    pub cluster: &'a Cluster,
    pub clock: Clock,
    pub rng: StdRng,
    pub hold: (u64, u64),
}

impl Nemesis<'_> {
    fn pick(&mut self, from: &[&'static str]) -> &'static str {
        from.choose(&mut self.rng).copied().unwrap_or("node1")
    }

    async fn leader_or_random(&mut self) -> String {
        match self.cluster.leader().await {
            Some(l) => l,
            None => self.pick(&NODES).to_owned(),
        }
    }

    /// Inject one fault of `kind`, hold it, heal it. Every choice comes from
    /// the seeded generator, so a seed replays the same schedule.
    pub async fn run(&mut self, kind: Kind) -> anyhow::Result<FaultWindow> {
        let hold = Duration::from_millis(self.rng.gen_range(self.hold.0..=self.hold.1));
        let target = self.pick(&NODES);
        let c = self.cluster;
        let begun = self.clock.ms();
        let (detail, undo) = match kind {
            Kind::Kill | Kind::KillLeader | Kind::LongKill => {
                let node = if kind == Kind::KillLeader { self.leader_or_random().await } else { target.to_owned() };
                c.docker(&["kill", "-s", "KILL", &c.container(&node).await?]).await?;
                (node.clone(), Undo::Start(node))
            }
            Kind::Pause => {
                c.docker(&["pause", &c.container(target).await?]).await?;
                (target.to_owned(), Undo::Unpause(target.to_owned()))
            }
            Kind::IsolateLeader => {
                let leader = self.leader_or_random().await;
                for other in NODES.iter().filter(|n| **n != leader) {
                    c.cut(&leader, other).await?;
                }
                (format!("{leader} | rest"), Undo::Network)
            }
            Kind::Split => {
                let leader = c.leader().await;
                let followers: Vec<&str> = NODES.iter().copied().filter(|n| Some(*n) != leader.as_deref()).collect();
                let minority = self.pick(&followers);
                for other in NODES.iter().filter(|n| **n != minority) {
                    c.cut(minority, other).await?;
                }
                (format!("{minority} | majority"), Undo::Network)
            }
            Kind::Bridge => {
                let mut nodes = NODES.to_vec();
                nodes.shuffle(&mut self.rng);
                c.cut(nodes[0], nodes[1]).await?;
                (format!("{} x {} (bridge {})", nodes[0], nodes[1], nodes[2]), Undo::Network)
            }
            Kind::Restart => {
                c.docker(&["restart", "-t", "5", &c.container(target).await?]).await?;
                (target.to_owned(), Undo::Nothing)
            }
            Kind::Membership => {
                c.berth_cli(&[
                    "cluster",
                    "join",
                    "--node",
                    "node1:5001",
                    "--id",
                    "4",
                    "--addr",
                    "node4:5001",
                    "--api",
                    "node4:5000",
                    "--region",
                    "west",
                ])
                .await?;
                ("node4 joins, then leaves".to_owned(), Undo::Leave)
            }
            Kind::Wipe => {
                let container = c.container(target).await?;
                c.docker(&["kill", "-s", "KILL", &container]).await?;
                // A helper container with the node's volumes empties them.
                c.docker(&[
                    "run",
                    "--rm",
                    "--user",
                    "0",
                    "--volumes-from",
                    &container,
                    "--entrypoint",
                    "sh",
                    &c.image,
                    "-c",
                    "rm -rf /data/* /blobdata/* 2>/dev/null; true",
                ])
                .await?;
                // A lost disk is replaced by an empty one: on a power-loss
                // disk the removals are made durable, as a new disk is.
                if let Some(disks) = &c.disks {
                    disks.get(target)?.sync();
                }
                c.docker(&["start", &container]).await?;
                (format!("{target} wiped"), Undo::Replace(target.to_owned()))
            }
            Kind::PowerLoss => {
                let disk = c.disks.as_ref().context("power-loss needs the nodes on power-loss disks")?.get(target)?;
                let container = c.container(target).await?;
                disk.power_off()?;
                let killed = c.kill_and_wait(&container).await;
                disk.power_on();
                killed?;
                (target.to_owned(), Undo::Start(target.to_owned()))
            }
            Kind::PowerLossAll => {
                let disks = c.disks.as_ref().context("power-loss-all needs the nodes on power-loss disks")?;
                let mut containers = Vec::new();
                for node in NODES {
                    containers.push(c.container(node).await?);
                }
                for node in NODES {
                    disks.get(node)?.power_off()?;
                }
                let mut killed = Ok(());
                for container in &containers {
                    let r = c.kill_and_wait(container).await;
                    if killed.is_ok() {
                        killed = r;
                    }
                }
                for node in NODES {
                    disks.get(node)?.power_on();
                }
                killed?;
                ("every node".to_owned(), Undo::StartAll)
            }
            Kind::DiskFull => {
                let node3 = c.container("node3").await?;
                // Fill all but nothing: the blob disk (a tmpfs) is then full.
                let _ = c.docker(&["exec", &node3, "sh", "-c", "cat /dev/zero > /blobdata/ballast"]).await;
                ("node3 blob disk full".to_owned(), Undo::Unfill)
            }
        };
        // The window opens once the fault is fully in effect (a restart is
        // in effect while it runs).
        let start_ms = if kind == Kind::Restart { begun } else { self.clock.ms() };
        let hold = if kind == Kind::LongKill { DEAD_AFTER + hold } else { hold };
        if !matches!(undo, Undo::Nothing) {
            tokio::time::sleep(hold).await;
        }
        match undo {
            Undo::Start(node) => {
                c.docker(&["start", &c.container(&node).await?]).await?;
            }
            Undo::StartAll => {
                for node in NODES {
                    c.docker(&["start", &c.container(node).await?]).await?;
                }
            }
            Undo::Unpause(node) => {
                c.docker(&["unpause", &c.container(&node).await?]).await?;
            }
            Undo::Network => c.heal_network().await,
            Undo::Leave => {
                c.berth_cli(&["cluster", "leave", "--node", "node1:5001", "--id", "4"]).await?;
            }
            Undo::Unfill => {
                c.docker(&["exec", &c.container("node3").await?, "rm", "-f", "/blobdata/ballast"]).await?;
            }
            Undo::Replace(node) => {
                c.replace(&node).await?;
                // A second disk lost before the first one's copies are
                // restored is beyond what min_copies promises: the next
                // fault waits for repair.
                c.wait_repaired(Duration::from_secs(240)).await?;
            }
            Undo::Nothing => {}
        }
        Ok(FaultWindow { kind: kind.name().to_owned(), detail, start_ms, end_ms: self.clock.ms() })
    }
}
