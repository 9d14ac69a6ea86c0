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

/// Bounds on what clients of the API may hold, so slow or hostile ones
/// cannot stall the node for everyone else. Each is per node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Open API connections at most; more are closed as they are accepted.
    pub max_connections: usize,
    /// Open API connections at most from one client address. Behind a load
    /// balancer every client shares its address: set its own per-client
    /// limits there (the bundled haproxy config does).
    pub max_connections_per_client: usize,
    /// A connection waiting for a request head (a new one, or one kept
    /// alive between requests) is closed after this many seconds.
    pub header_timeout_secs: u64,
    /// A response the client stops reading is cut after this many seconds
    /// without progress.
    pub send_timeout_secs: u64,
    /// A request body must bring at least this many bytes per second,
    /// averaged over `body_window_secs`, or it is cut (an upload keeps the
    /// bytes that arrived and can be resumed). 0 turns the check off.
    pub body_min_bytes_per_sec: u64,
    pub body_window_secs: u64,
    /// Open upload sessions at most in one repository, and for one client.
    pub max_uploads_per_repo: usize,
    pub max_uploads_per_client: usize,
    /// Entries in a catalog or tag list page when the client gives no `n`,
    /// and the most it may ask for.
    pub default_page: usize,
    pub max_page: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_connections: 8192,
            max_connections_per_client: 1024,
            header_timeout_secs: 20,
            send_timeout_secs: 60,
            body_min_bytes_per_sec: 1024,
            body_window_secs: 20,
            max_uploads_per_repo: 1000,
            max_uploads_per_client: 500,
            default_page: 1000,
            max_page: 10_000,
        }
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

/// The registry API's certificate chain and key, PEM. Either file may be
/// replaced while the node runs: the new pair is served to new connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who may use the API. Without `[auth]` the registry is open: anyone who
/// reaches it may pull, push and delete (a warning at every start).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// An htpasswd file of `user:bcrypt-hash` lines (`htpasswd -B`), as
    /// Distribution reads them: `docker login` with these users. Re-read
    /// when it changes.
    pub htpasswd: Option<PathBuf>,
    /// The realm a Basic challenge names.
    pub realm: String,
    /// Groups of users the access rules may name as `group:<name>`.
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// Docker token authentication: clients get a JWT from an existing
    /// token service, berth verifies it and honours its scopes.
    pub token: Option<TokenSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings { htpasswd: None, realm: "berth".into(), groups: Default::default(), token: None }
    }
}

/// The token service berth trusts (Docker's token authentication spec).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// Where clients get tokens: the challenge's `realm`.
    pub realm: String,
    /// This registry's name at the token service: the challenge's
    /// `service`, and the audience a token must carry.
    pub service: String,
    /// The issuer a token must name.
    pub issuer: String,
    /// PEM public keys (`BEGIN PUBLIC KEY`) a token may be signed with.
    pub public_keys: Vec<PathBuf>,
}

/// One access rule: repositories matching `repos`, and who may do what
/// there. The first rule whose pattern matches a repository decides; a
/// repository no rule matches is refused to everyone. With `[auth]` and no
/// rules at all, every authenticated user may do everything (as an
/// htpasswd-only Distribution allows).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// `*` matches within one path component, `**` across components:
    /// `team-a/**`, `*/base`, `**`.
    pub repos: String,
    /// Users, `group:<name>`, `authenticated` (any user who logged in) or
    /// `anonymous` (anyone, logged in or not).
    #[serde(default)]
    pub pull: Vec<String>,
    #[serde(default)]
    pub push: Vec<String>,
    #[serde(default)]
    pub delete: Vec<String>,
}

/// Tags that never move or go once they exist (`[[immutable]]`): a
/// manifest PUT that would point such a tag elsewhere, or a DELETE of it or
/// of its manifest, answers DENIED naming the rule. Every rule whose
/// `repos` matches applies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImmutableRule {
    /// Named in the DENIED message (default: `immutable[i]`).
    #[serde(default)]
    pub name: Option<String>,
    /// Repository pattern, as in `[[access]]`.
    pub repos: String,
    /// Tag pattern: `*` any characters, `?` one (`v*`, `release-?.*`).
    pub tags: String,
}

/// What retention removes in the repositories `repos` matches
/// (`[[retention]]`, the first matching rule decides). Tags and manifests
/// pushed before push times were kept have none, and are never removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Repository pattern, as in `[[access]]`.
    pub repos: String,
    /// Keep this many most recently pushed tags (those `keep_tags` matches
    /// and immutable ones not counted); older ones are removed.
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Remove tags last pushed longer ago than this (`30d`, `12h`, `90s`).
    #[serde(default)]
    pub max_age: Option<String>,
    /// Tag patterns kept forever (`*` and `?`).
    #[serde(default)]
    pub keep_tags: Vec<String>,
    /// Remove manifests untagged (now, or once this run removes their
    /// tags) and pushed longer ago than this (`7d`), unless an index in
    /// the repository lists them or their subject is still there (a
    /// signature of a kept image).
    #[serde(default)]
    pub untagged_after: Option<String>,
}

/// A webhook endpoint (`[[webhooks]]`): events in Distribution's
/// envelope, POSTed as `application/vnd.docker.distribution.events.v2+json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Names the endpoint's delivery cursor (unique; renaming restarts it).
    pub name: String,
    /// `http://` or `https://` (verified against `ca`, else the system's roots).
    pub url: String,
    /// Extra request headers (`Authorization` for the receiver, say).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// One delivery attempt's deadline.
    #[serde(default = "webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// First retry delay after a failed delivery, doubled per failure up
    /// to `max_backoff_ms`.
    #[serde(default = "webhook_backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "webhook_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Events per request at most.
    #[serde(default = "webhook_batch")]
    pub max_events: usize,
    /// Only these actions (`push`, `pull`, `mount`, `delete`); empty: all.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Only repositories matching one of these patterns; empty: all.
    #[serde(default)]
    pub repos: Vec<String>,
    /// Leave out events whose target has one of these media types.
    #[serde(default)]
    pub ignored_media_types: Vec<String>,
    /// CA certificate (PEM) for an https receiver.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn webhook_timeout_ms() -> u64 {
    5000
}
fn webhook_backoff_ms() -> u64 {
    1000
}
fn webhook_max_backoff_ms() -> u64 {
    60_000
}
fn webhook_batch() -> usize {
    32
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
    pub limits: LimitSettings,
    /// Target copies of each blob (capped at the cluster size).
    pub replicas: usize,
    /// Copies fsynced before a push is acknowledged (default: min(2, voters)).
    pub min_copies: Option<usize>,
    /// Regions those copies must span before a push is acknowledged.
    pub min_regions: usize,
    /// Keep a local copy of blobs streamed from peers.
    pub cache_on_read: bool,
    /// How often the repair loop wakes: the leader probes members and
    /// repairs the blobs queued since (see `blob::repair`).
    pub repair_interval_secs: u64,
    /// How often, when nothing else asks for it, the leader scans the whole
    /// blob index and every node checks that its copies exist.
    pub repair_sweep_secs: u64,
    /// How often every local copy is re-hashed (a pass starts this long
    /// after the last one started; a restart resumes the pass).
    pub scrub_interval_secs: u64,
    /// The scrub's read rate at most, MiB/s (0: unbounded).
    pub scrub_mib_per_sec: u64,
    /// A member unanswering this long no longer counts as holding copies.
    pub dead_after_secs: u64,
    /// How often the leader collects garbage and every node deletes the
    /// copies no one claims (0: only by `berth gc`).
    pub gc_interval_secs: u64,
    /// Nothing younger than this is collected: blobs pushed for a manifest
    /// that has not come yet, copies not yet recorded. Longer than any push.
    pub gc_grace_secs: u64,
    /// Authentication (htpasswd users, token service).
    pub auth: Option<AuthSettings>,
    /// Per-repository access rules, in order (`[[access]]` tables).
    pub access: Vec<AccessRule>,
    /// TLS on the registry API. Without it the API speaks plain HTTP (for
    /// a node behind a load balancer that terminates TLS).
    pub tls: Option<ApiTlsFiles>,
    /// Tags that never move (`[[immutable]]`). Every node must carry the
    /// same rules (a site-wide config file laid over each node's): the
    /// node that takes a write decides which apply, apply enforces them.
    pub immutable: Vec<ImmutableRule>,
    /// Retention policies (`[[retention]]`), the first matching rule per
    /// repository; run by the leader every `retention_interval_secs` and
    /// by `berth retention`.
    pub retention: Vec<RetentionRule>,
    /// How often the leader applies the retention policies (0: only by
    /// `berth retention`).
    pub retention_interval_secs: u64,
    /// Webhook endpoints (`[[webhooks]]`).
    pub webhooks: Vec<WebhookSettings>,
    /// Events kept for webhooks not yet delivered, cluster-wide: past it
    /// the oldest are dropped (logged, counted) so a receiver down for
    /// days cannot fill the disk.
    pub webhook_queue_max: usize,
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
            limits: LimitSettings::default(),
            replicas: 3,
            min_copies: None,
            min_regions: 1,
            cache_on_read: true,
            repair_interval_secs: 10,
            repair_sweep_secs: 3600,
            scrub_interval_secs: 24 * 3600,
            scrub_mib_per_sec: 64,
            dead_after_secs: 60,
            gc_interval_secs: 24 * 3600,
            gc_grace_secs: 3600,
            auth: None,
            access: Vec::new(),
            immutable: Vec::new(),
            retention: Vec::new(),
            retention_interval_secs: 3600,
            webhooks: Vec::new(),
            webhook_queue_max: 100_000,
            tls: None,
            cluster_tls: None,
            insecure_cluster: false,
        }
    }
}

/// Lays `top` over `base`: tables merge key by key, anything else replaces.
fn lay_over(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => lay_over(b, t),
            (_, value) => {
                base.insert(key, value);
            }
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
        Config::from_files(std::slice::from_ref(&path.to_path_buf()))
    }

    /// Read config files in order, each laid over the ones before it, without
    /// validating: a later file's key replaces an earlier one's, a table is
    /// merged key by key, and an array (`[[access]]`, `initial_members`) is
    /// replaced whole. So a site-wide file (TLS, users, rules) can sit over
    /// each node's own without copying it into every node's file.
    pub fn from_files(paths: &[PathBuf]) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.clone(), e))?;
            // Each file alone must be a valid config, so an unknown key or a
            // wrong type is blamed on the file that holds it.
            toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse(path.clone(), e))?;
            let layer: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.clone(), e))?;
            lay_over(&mut merged, layer);
        }
        let named = paths.last().cloned().unwrap_or_default();
        merged.try_into().map_err(|e| ConfigError::Parse(named, e))
    }

    /// Lay environment variables over this config: `BERTH_<KEY>` sets a
    /// top-level key (`BERTH_GC_GRACE_SECS=60`), `BERTH_<TABLE>__<KEY>` a
    /// key of a table (`BERTH_RAFT__SNAPSHOT_LOGS=50000`). A value is read
    /// as TOML (a number, a boolean, an array) and otherwise as a string.
    /// Variables that name no key (BERTH_CONFIG, tools' own) are left
    /// alone; one that names a key with a value of the wrong type is an
    /// error naming the variable.
    pub fn with_env(self, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let invalid = |e: String| ConfigError::Invalid(e);
        let mut merged = toml::Table::try_from(&self).map_err(|e| invalid(format!("config: {e}")))?;
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("BERTH_") else { continue };
            let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(|p| p.is_empty()) {
                continue;
            }
            let layer = |v: toml::Value| {
                let mut t = toml::Table::new();
                let mut v = v;
                for k in path.iter().skip(1).rev() {
                    let mut inner = toml::Table::new();
                    inner.insert(k.clone(), v);
                    v = toml::Value::Table(inner);
                }
                t.insert(path[0].clone(), v);
                t
            };
            let typed = toml::from_str::<toml::Table>(&format!("v = {value}")).ok().and_then(|mut t| t.remove("v"));
            let mut tried = Vec::new();
            for v in typed.into_iter().chain([toml::Value::String(value.clone())]) {
                let mut candidate = merged.clone();
                lay_over(&mut candidate, layer(v));
                match candidate.clone().try_into::<Config>() {
                    Ok(_) => {
                        merged = candidate;
                        tried.clear();
                        break;
                    }
                    Err(e) => tried.push(e.to_string()),
                }
            }
            if let Some(e) = tried.last() {
                if e.contains("unknown field") {
                    continue;
                }
                return Err(invalid(format!("{name}: {}", e.trim())));
            }
        }
        merged.try_into().map_err(|e: toml::de::Error| invalid(format!("environment: {e}")))
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
        // Regions in the membership come from initial_members: a member
        // without one would make every copy count as the same region.
        if self.min_regions > 1 {
            if let Some(m) = self.initial_members.iter().find(|m| m.region.is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "min_regions = {} needs a region on every initial_members entry (node {} has none): \
                     the membership records each member's region from them",
                    self.min_regions, m.id
                )));
            }
        }
        if self.join.is_some() && !self.initial_members.is_empty() {
            return Err(ConfigError::Invalid("join and initial_members exclude each other".into()));
        }
        if self.transfer.max_per_peer == 0 {
            return Err(ConfigError::Invalid("transfer.max_per_peer must be at least 1".into()));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_client", l.max_connections_per_client),
            ("limits.max_uploads_per_repo", l.max_uploads_per_repo),
            ("limits.max_uploads_per_client", l.max_uploads_per_client),
            ("limits.default_page", l.default_page),
            ("limits.header_timeout_secs", l.header_timeout_secs as usize),
            ("limits.send_timeout_secs", l.send_timeout_secs as usize),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
            }
        }
        if l.default_page > l.max_page {
            return Err(ConfigError::Invalid("limits.default_page must not exceed limits.max_page".into()));
        }
        if l.body_min_bytes_per_sec > 0 && l.body_window_secs == 0 {
            return Err(ConfigError::Invalid("limits.body_window_secs must be at least 1".into()));
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
        crate::api::auth::Access::validate(self.auth.as_ref(), &self.access).map_err(ConfigError::Invalid)?;
        crate::policy::Policies::compile(self).map_err(ConfigError::Invalid)?;
        crate::notify::validate(&self.webhooks).map_err(ConfigError::Invalid)?;
        if self.webhook_queue_max == 0 {
            return Err(ConfigError::Invalid("webhook_queue_max must be at least 1".into()));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key can come from the environment, nested ones too; other
    /// BERTH_ variables are not keys and are left alone; a wrong type names
    /// the variable.
    #[test]
    fn environment_variables_set_keys() {
        let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let c = Config::default()
            .with_env([
                var("BERTH_GC_GRACE_SECS", "60"),
                var("BERTH_RAFT__SNAPSHOT_LOGS", "5000"),
                var("BERTH_REGION", "west"),
                var("BERTH_MIN_COPIES", "2"),
                var("BERTH_BLOB_DIR", "/big/blobs"),
                var("BERTH_CACHE_ON_READ", "false"),
                var("BERTH_CONFIG", "/a.toml:/b.toml"),
                var("BERTH_PORT", "5000"),
                var("PATH", "/bin"),
            ])
            .unwrap();
        assert_eq!(c.gc_grace_secs, 60);
        assert_eq!(c.raft.snapshot_logs, 5000);
        assert_eq!(c.region, "west");
        assert_eq!(c.min_copies, Some(2));
        assert_eq!(c.blob_dir, Some(PathBuf::from("/big/blobs")));
        assert!(!c.cache_on_read);
        let e = Config::default().with_env([var("BERTH_REPLICAS", "many")]).unwrap_err().to_string();
        assert!(e.contains("BERTH_REPLICAS"), "{e}");
    }

    #[test]
    fn min_regions_needs_regions_on_initial_members() {
        let member = |id, region: &str| MemberConfig {
            id,
            http: format!("h{id}:5000"),
            grpc: format!("h{id}:5001"),
            region: region.into(),
        };
        let mut c = Config {
            min_regions: 2,
            insecure_cluster: true,
            initial_members: vec![member(1, "east"), member(2, "")],
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("node 2") && e.contains("min_regions"), "{e}");
        c.initial_members[1].region = "west".into();
        c.validate().unwrap();
    }

    #[test]
    fn later_files_lay_over_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.toml");
        let site = dir.path().join("site.toml");
        std::fs::write(
            &node,
            "node_id = 2\nregion = \"east\"\n[limits]\nmax_connections = 10\nmax_page = 7\n\
             [[access]]\nrepos = \"a/**\"\npull = [\"anonymous\"]\n",
        )
        .unwrap();
        std::fs::write(
            &site,
            "region = \"west\"\n[limits]\nmax_page = 9\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [[access]]\nrepos = \"**\"\npush = [\"alice\"]\n",
        )
        .unwrap();
        let c = Config::from_files(&[node.clone(), site.clone()]).unwrap();
        assert_eq!((c.node_id, c.region.as_str()), (2, "west"));
        // Tables merge key by key; arrays are replaced whole.
        assert_eq!((c.limits.max_connections, c.limits.max_page), (10, 9));
        assert_eq!(c.tls.unwrap().cert, PathBuf::from("c.pem"));
        assert_eq!(c.access.len(), 1);
        assert_eq!(c.access[0].repos, "**");
        // An unknown key in any layer is still refused, naming that layer.
        std::fs::write(&node, "[limits]\nmax_pages = 9\n").unwrap();
        let e = Config::from_files(&[node, site]).unwrap_err().to_string();
        assert!(e.contains("max_pages") && e.contains("node.toml"), "{e}");
    }
}
