//! Faults, injected one at a time on a seeded schedule: each is started,
//! held, healed, and logged with its start and end; the cluster is then
//! given time to recover before the next one.

use std::time::Duration;

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
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::KillLeader => "kill-leader",
            Kind::Pause => "pause",
            Kind::IsolateLeader => "isolate-leader",
            Kind::Split => "split",
            Kind::Bridge => "bridge",
            Kind::Restart => "restart",
            Kind::Membership => "membership",
            Kind::DiskFull => "disk-full",
            Kind::Wipe => "wipe",
        }
    }

    /// The default set.
    pub const ALL: [Kind; 10] = [
        Kind::Kill,
        Kind::KillLeader,
        Kind::Pause,
        Kind::IsolateLeader,
        Kind::Split,
        Kind::Bridge,
        Kind::Restart,
        Kind::Membership,
        Kind::DiskFull,
        Kind::Wipe,
    ];
}

/// What must be undone to heal a fault.
enum Undo {
    Start(String),
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
            Kind::Kill | Kind::KillLeader => {
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
                c.docker(&["start", &container]).await?;
                (format!("{target} wiped"), Undo::Replace(target.to_owned()))
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
        if !matches!(undo, Undo::Nothing) {
            tokio::time::sleep(hold).await;
        }
        match undo {
            Undo::Start(node) => {
                c.docker(&["start", &c.container(&node).await?]).await?;
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
