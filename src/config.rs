//! Node configuration: a TOML file, overridden by command-line flags.
//! Every setting has a default, so `berth serve` needs no file at all.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// How fresh tag and manifest reads must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Every read sees every write acknowledged before it (read index).
    #[default]
    Linearizable,
    /// Serve from the local state machine; may lag the leader.
    Local,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many applied entries.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, so briefly lagging followers
    /// catch up from the log instead of a whole snapshot.
    pub keep_logs: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_logs: 10_000,
            keep_logs: 1000,
        }
    }
}

/// Bounds on background copies (replication and repair) this node serves
/// to each peer, so they cannot starve client traffic. Reads a client is
/// waiting for (read-through) are not bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSettings {
    /// Background copies served to one peer at a time; more wait their turn.
    pub max_per_peer: usize,
    /// MiB/s served to one peer for background copies (0: unbounded).
    pub bandwidth_mib_per_peer: u64,
}

impl Default for TransferSettings {
    fn default() -> Self {
        TransferSettings { max_per_peer: 4, bandwidth_mib_per_peer: 0 }
    }
}

/// Paths of a CA certificate and of one certificate and its key, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate: peers must present one it signed.
    pub ca: PathBuf,
    /// This node's (or the operator's) certificate, signed by the CA.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The operator's files in a directory made by `berth certs`.
    pub fn admin_in(dir: &Path) -> TlsFiles {
        TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("admin.pem"), key: dir.join("admin.key") }
    }

    /// Node `id`'s files in a directory made by `berth certs`.
    pub fn node_in(dir: &Path, id: u64) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("node{id}.pem")),
            key: dir.join(format!("node{id}.key")),
        }
    }
}

/// A member of the initial cluster, as named in every node's config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: NodeId,
    pub http: String,
    pub grpc: String,
    #[serde(default)]
    pub region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node_id: NodeId,
    /// HTTP API listen address.
    pub http: String,
    /// Cluster gRPC listen address.
    pub grpc: String,
    /// Addresses other nodes and clients use to reach this node, when they
    /// differ from the listen addresses (containers, NAT).
    pub advertise_http: Option<String>,
    pub advertise_grpc: Option<String>,
    /// The first members of a new cluster. Exactly one of them (the lowest
    /// id) initializes it, once; the others wait to be contacted. Empty: a
    /// one-node cluster of this node.
    pub initial_members: Vec<MemberConfig>,
    /// Join an existing cluster through this member's gRPC address on
    /// first start, instead of initializing one.
    pub join: Option<String>,
    /// When joining, stay a learner (a non-voting replica).
    pub learner: bool,
    /// Start without a cluster and wait for an operator's
    /// `berth cluster join` to add this node.
    pub standby: bool,
    pub data_dir: PathBuf,
    /// Where blobs and upload sessions live, when not under `data_dir`: a
    /// large disk for content, a fast one for the Raft log and state.
    pub blob_dir: Option<PathBuf>,
    pub region: String,
    pub consistency: Consistency,
    /// Largest manifest accepted, in bytes (manifests live in the Raft state).
    pub max_manifest_bytes: usize,
    /// Upload sessions untouched this long are removed.
    pub upload_expiry_secs: u64,
    /// With less than this free on the blob disk (MiB), new uploads are
    /// started on another node instead of failing here.
    pub min_free_mib: u64,
    pub raft: RaftSettings,
    pub transfer: TransferSettings,
    /// Target copies of each blob (capped at the cluster size).
    pub replicas: usize,
    /// Copies fsynced before a push is acknowledged (default: min(2, voters)).
    pub min_copies: Option<usize>,
    /// Regions those copies must span before a push is acknowledged.
    pub min_regions: usize,
    /// Keep a local copy of blobs streamed from peers.
    pub cache_on_read: bool,
    /// How often the repair loop runs.
    pub repair_interval_secs: u64,
    /// How often every local copy is re-hashed.
    pub scrub_interval_secs: u64,
    /// A member unanswering this long no longer counts as holding copies.
    pub dead_after_secs: u64,
    /// Mutual TLS on the cluster listener and on every call to a peer.
    /// Required for a node with peers, unless `insecure_cluster`.
    pub cluster_tls: Option<TlsFiles>,
    /// Talk to peers in plain text, authenticating no one (a warning at
    /// every start). Only for networks nothing else can reach.
    pub insecure_cluster: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            http: "127.0.0.1:5000".into(),
            grpc: "127.0.0.1:5001".into(),
            advertise_http: None,
            advertise_grpc: None,
            initial_members: Vec::new(),
            join: None,
            learner: false,
            standby: false,
            data_dir: PathBuf::from("./berth-data"),
            blob_dir: None,
            region: "default".into(),
            consistency: Consistency::Linearizable,
            max_manifest_bytes: 4 << 20,
            upload_expiry_secs: 24 * 3600,
            min_free_mib: 256,
            raft: RaftSettings::default(),
            transfer: TransferSettings::default(),
            replicas: 3,
            min_copies: None,
            min_regions: 1,
            cache_on_read: true,
            repair_interval_secs: 10,
            scrub_interval_secs: 24 * 3600,
            dead_after_secs: 60,
            cluster_tls: None,
            insecure_cluster: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Config::from_file(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a config file without validating it, for callers that override
    /// settings first and validate after.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e))
    }

    /// Whether this node talks to other nodes: a one-node cluster (no
    /// initial members, no join, not on standby) never does.
    pub fn has_peers(&self) -> bool {
        !self.initial_members.is_empty() || self.join.is_some() || self.standby
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid("node_id must be at least 1".into()));
        }
        if self.raft.election_min_ms >= self.raft.election_max_ms || self.raft.heartbeat_ms >= self.raft.election_min_ms
        {
            return Err(ConfigError::Invalid("need heartbeat_ms < election_min_ms < election_max_ms".into()));
        }
        if !self.initial_members.is_empty() && !self.initial_members.iter().any(|m| m.id == self.node_id) {
            return Err(ConfigError::Invalid(format!("node_id {} is not in initial_members", self.node_id)));
        }
        if self.join.is_some() && !self.initial_members.is_empty() {
            return Err(ConfigError::Invalid("join and initial_members exclude each other".into()));
        }
        if self.transfer.max_per_peer == 0 {
            return Err(ConfigError::Invalid("transfer.max_per_peer must be at least 1".into()));
        }
        if self.cluster_tls.is_some() && self.insecure_cluster {
            return Err(ConfigError::Invalid("cluster_tls and insecure_cluster = true exclude each other".into()));
        }
        if self.has_peers() && self.cluster_tls.is_none() && !self.insecure_cluster {
            return Err(ConfigError::Invalid(
                "a node with peers (initial_members, join or standby) needs [cluster_tls] with ca, cert and key \
                 (`berth certs` makes a development set), or insecure_cluster = true"
                    .into(),
            ));
        }
        if self.max_manifest_bytes == 0 {
            return Err(ConfigError::Invalid("max_manifest_bytes must be positive".into()));
        }
        // A manifest travels in one Raft entry, which must stay replicable.
        let most = crate::meta::MAX_ENTRY_BYTES - (64 << 10);
        if self.max_manifest_bytes > most {
            return Err(ConfigError::Invalid(format!("max_manifest_bytes must be at most {most}")));
        }
        Ok(())
    }
}
