//! Repository policies: immutable tags and retention. One owner for the
//! rules (compiled from `[[immutable]]` and `[[retention]]` once, at
//! start) and for running retention.
//!
//! Both are decided by the node that proposes and enforced by apply:
//! immutability travels in each write's [`Context`] and apply refuses a
//! write that would move or remove a covered tag as of its place in the
//! log; retention proposes [`Command::Retire`] entries whose every removal
//! apply checks again (the tag still points where it did, with the same
//! push time; the manifest is still untagged and unreferenced), so a push
//! that races a retention run keeps what it pushed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use regex::Regex;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::config::{Config, RetentionRule};
use crate::meta::{glob_match, Command, Context, ImmutableTags, MetaReader};
use crate::oci::{Digest, Name, Tag};

/// Removals per [`Command::Retire`] entry at most.
const RETIRE_BATCH: usize = 256;
/// Tags and manifests read per page.
const PAGE: usize = 1000;

struct Immutable {
    repos: Regex,
    rule: ImmutableTags,
}

struct Retention {
    name: String,
    repos: Regex,
    rule: RetentionRule,
    max_age_ms: Option<u64>,
    untagged_after_ms: Option<u64>,
}

/// A duration setting (`30d`, `12h`) in ms, naming the key at fault.
fn duration_ms(key: &str, v: &Option<String>) -> Result<Option<u64>, String> {
    v.as_deref()
        .map(|v| {
            humantime::parse_duration(v)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| format!("{key}: {v:?} is not a duration like 30d or 12h ({e})"))
        })
        .transpose()
}

/// The compiled rules.
pub struct Policies {
    immutable: Vec<Immutable>,
    retention: Vec<Retention>,
}

fn validate_tag_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 128 {
        return Err("a tag pattern must have 1 to 128 characters".into());
    }
    if let Some(c) = p.chars().find(|c| !(c.is_ascii_alphanumeric() || "._-*?".contains(*c))) {
        return Err(format!("{c:?} cannot be in a tag (patterns use * and ?)"));
    }
    Ok(())
}

impl Policies {
    /// Compile the config's rules, naming the key at fault.
    pub fn compile(cfg: &Config) -> Result<Policies, String> {
        let mut immutable = Vec::new();
        for (i, r) in cfg.immutable.iter().enumerate() {
            let repos = crate::api::auth::pattern(&r.repos).map_err(|e| format!("immutable[{i}].repos: {e}"))?;
            validate_tag_pattern(&r.tags).map_err(|e| format!("immutable[{i}].tags: {e}"))?;
            let rule = r.name.clone().unwrap_or_else(|| format!("immutable[{i}]"));
            immutable.push(Immutable { repos, rule: ImmutableTags { rule, tags: r.tags.clone() } });
        }
        let mut retention = Vec::new();
        for (i, r) in cfg.retention.iter().enumerate() {
            let repos = crate::api::auth::pattern(&r.repos).map_err(|e| format!("retention[{i}].repos: {e}"))?;
            for p in &r.keep_tags {
                validate_tag_pattern(p).map_err(|e| format!("retention[{i}].keep_tags: {e}"))?;
            }
            if r.keep_last.is_none() && r.max_age.is_none() && r.untagged_after.is_none() {
                return Err(format!("retention[{i}] removes nothing: give keep_last, max_age or untagged_after"));
            }
            let max_age_ms = duration_ms(&format!("retention[{i}].max_age"), &r.max_age)?;
            let untagged_after_ms = duration_ms(&format!("retention[{i}].untagged_after"), &r.untagged_after)?;
            let name = r.name.clone().unwrap_or_else(|| format!("retention[{i}]"));
            retention.push(Retention { name, repos, rule: r.clone(), max_age_ms, untagged_after_ms });
        }
        Ok(Policies { immutable, retention })
    }

    /// The immutability rules covering `repo`, for a write's context.
    pub fn immutable_for(&self, repo: &Name) -> Vec<ImmutableTags> {
        self.immutable.iter().filter(|r| r.repos.is_match(repo.as_str())).map(|r| r.rule.clone()).collect()
    }

    fn retention_for(&self, repo: &Name) -> Option<&Retention> {
        self.retention.iter().find(|r| r.repos.is_match(repo.as_str()))
    }

    pub fn has_retention(&self) -> bool {
        !self.retention.is_empty()
    }
}

use crate::clock_ms as now_ms;

/// What one retention run did (or would do) in one repository.
#[derive(Debug, Default, Clone)]
pub struct RepoRetention {
    pub repo: String,
    pub rule: String,
    pub tags: Vec<(Tag, Digest)>,
    pub manifests: Vec<Digest>,
}

/// Runs the retention policies; cheap to clone.
#[derive(Clone)]
pub struct Retainer {
    policies: std::sync::Arc<Policies>,
    meta: MetaReader,
    cluster: Cluster,
    every: Option<Duration>,
}

/// Why a retention run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("reading the state: {0}")]
    Read(#[from] crate::meta::ReadError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl Retainer {
    pub fn new(
        policies: std::sync::Arc<Policies>,
        meta: MetaReader,
        cluster: Cluster,
        every: Option<Duration>,
    ) -> Retainer {
        Retainer { policies, meta, cluster, every }
    }

    /// Apply every policy once (or, with `dry_run`, only say what would
    /// go). Reads the state after a barrier, a repository at a time and a
    /// page at a time; `say` hears each repository's result.
    pub async fn run_once(
        &self,
        dry_run: bool,
        say: &(dyn Fn(String) + Sync),
    ) -> Result<Vec<RepoRetention>, RetentionError> {
        self.cluster.caught_up_barrier().await?;
        let now = now_ms();
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.catalog(after.as_deref(), Some(PAGE))?;
            for repo in &page.items {
                let Ok(name) = repo.parse::<Name>() else { continue };
                let Some(policy) = self.policies.retention_for(&name) else { continue };
                let plan = self.plan(&name, policy, now)?;
                if plan.tags.is_empty() && plan.manifests.is_empty() {
                    continue;
                }
                if !dry_run {
                    self.retire(&name, &plan).await?;
                }
                say(format!(
                    "{}: {} {} tag(s) and {} untagged manifest(s) (rule {})",
                    plan.repo,
                    if dry_run { "would remove" } else { "removed" },
                    plan.tags.len(),
                    plan.manifests.len(),
                    plan.rule
                ));
                if dry_run {
                    for (t, d, _) in &plan.tags {
                        say(format!("  tag {t} -> {d}"));
                    }
                    for (d, _) in &plan.manifests {
                        say(format!("  manifest {d}"));
                    }
                }
                out.push(RepoRetention {
                    repo: plan.repo,
                    rule: plan.rule,
                    tags: plan.tags.into_iter().map(|(t, d, _)| (t, d)).collect(),
                    manifests: plan.manifests.into_iter().map(|(d, _)| d).collect(),
                });
            }
            if !page.more {
                break;
            }
            after = page.items.last().cloned();
        }
        Ok(out)
    }

    /// What `policy` removes from `repo` now.
    fn plan(&self, repo: &Name, policy: &Retention, now: u64) -> Result<Plan, RetentionError> {
        let rule = &policy.rule;
        let frozen = self.policies.immutable_for(repo);
        let kept_forever = |t: &str| {
            rule.keep_tags.iter().any(|p| glob_match(p.as_bytes(), t.as_bytes())) || frozen.iter().any(|r| r.covers(t))
        };
        // Pass 1: the push time of the keep_last-th newest tag that counts.
        let mut newest: BinaryHeap<Reverse<(u64, String)>> = BinaryHeap::new();
        if let Some(n) = rule.keep_last {
            self.each_tag(repo, |t| {
                if let Some(at) = t.at_ms.filter(|_| !kept_forever(&t.tag)) {
                    newest.push(Reverse((at, t.tag.clone())));
                    if newest.len() > n {
                        newest.pop();
                    }
                }
            })?;
        }
        let threshold = match rule.keep_last {
            Some(n) if newest.len() >= n => newest.peek().map(|Reverse(x)| x.clone()),
            Some(_) => None,
            None => None,
        };
        let too_old = policy.max_age_ms.map(|d| now.saturating_sub(d));
        // Pass 2: the tags to remove.
        let mut tags = Vec::new();
        let mut untagged_by_plan: std::collections::HashMap<Digest, usize> = Default::default();
        let mut tag_count: std::collections::HashMap<Digest, usize> = Default::default();
        self.each_tag(repo, |t| {
            *tag_count.entry(t.digest.clone()).or_default() += 1;
            let Some(at) = t.at_ms else { return };
            if kept_forever(&t.tag) {
                return;
            }
            let beyond_n = rule
                .keep_last
                .is_some_and(|n| n == 0 || threshold.as_ref().is_some_and(|th| (at, t.tag.clone()) < *th));
            let aged = too_old.is_some_and(|cut| at < cut);
            if beyond_n || aged {
                if let Ok(tag) = t.tag.parse::<Tag>() {
                    *untagged_by_plan.entry(t.digest.clone()).or_default() += 1;
                    tags.push((tag, t.digest.clone(), at));
                }
            }
        })?;
        // The manifests untagged (now, or once these tags go) long enough.
        let mut manifests = Vec::new();
        if let Some(after_ms) = policy.untagged_after_ms {
            let cut = now.saturating_sub(after_ms);
            let mut after: Option<Digest> = None;
            loop {
                let page = self.meta.manifests(repo, after.as_ref(), PAGE)?;
                for d in &page {
                    let left = tag_count.get(d).copied().unwrap_or(0) - untagged_by_plan.get(d).copied().unwrap_or(0);
                    if left > 0 || self.meta.referenced(repo, d)? {
                        continue;
                    }
                    let Some(at) = self.meta.manifest_stamp(repo, d)? else { continue };
                    if at >= cut {
                        continue;
                    }
                    let subject = self
                        .meta
                        .manifest(repo, d)?
                        .and_then(|rec| crate::oci::Manifest::parse(Some(&rec.media_type), &rec.bytes).ok())
                        .and_then(|m| m.subject);
                    if let Some(s) = subject {
                        if self.meta.manifest(repo, &s)?.is_some() {
                            continue;
                        }
                    }
                    manifests.push((d.clone(), at));
                }
                if page.len() < PAGE {
                    break;
                }
                after = page.last().cloned();
            }
        }
        Ok(Plan { repo: repo.to_string(), rule: policy.name.clone(), tags, manifests })
    }

    fn each_tag(&self, repo: &Name, mut f: impl FnMut(&crate::meta::TagStamp)) -> Result<(), RetentionError> {
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.tag_stamps(repo, after.as_deref(), PAGE)?;
            for t in &page {
                f(t);
            }
            if page.len() < PAGE {
                return Ok(());
            }
            after = page.last().map(|t| t.tag.clone());
        }
    }

    /// Propose the plan's removals, a bounded batch per entry.
    async fn retire(&self, repo: &Name, plan: &Plan) -> Result<(), RetentionError> {
        let ctx = Context {
            at_ms: now_ms(),
            actor: Some("berth-retention".into()),
            source: self.cluster.id,
            immutable: self.policies.immutable_for(repo),
            ..Default::default()
        };
        for chunk in plan.tags.chunks(RETIRE_BATCH) {
            let cmd = Command::Retire { repo: repo.clone(), tags: chunk.to_vec(), manifests: Vec::new() };
            self.cluster.propose(Command::With { ctx: Box::new(ctx.clone()), cmd: Box::new(cmd) }).await?;
        }
        for chunk in plan.manifests.chunks(RETIRE_BATCH) {
            let cmd = Command::Retire { repo: repo.clone(), tags: Vec::new(), manifests: chunk.to_vec() };
            self.cluster.propose(Command::With { ctx: Box::new(ctx.clone()), cmd: Box::new(cmd) }).await?;
        }
        Ok(())
    }

    /// The schedule: the leader applies the policies every interval.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some(every) = self.every.filter(|_| self.policies.has_retention()) else { return };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if !self.cluster.is_leader() {
                continue;
            }
            if let Err(e) = self.run_once(false, &|line| tracing::info!(%line, "retention")).await {
                tracing::warn!(error = %e, "scheduled retention");
            }
        }
    }
}

/// What retention removes from one repository, each with the push time
/// it was planned against.
struct Plan {
    repo: String,
    rule: String,
    tags: Vec<(Tag, Digest, u64)>,
    manifests: Vec<(Digest, u64)>,
}

#[tonic::async_trait]
impl crate::cluster::Retain for Retainer {
    async fn retain(&self, dry_run: bool, progress: &crate::cluster::Progress) -> Result<String, String> {
        let done = self.run_once(dry_run, &|line| progress.note(line)).await.map_err(|e| e.to_string())?;
        let tags: usize = done.iter().map(|r| r.tags.len()).sum();
        let manifests: usize = done.iter().map(|r| r.manifests.len()).sum();
        Ok(format!(
            "retention {}: {tags} tag(s) and {manifests} untagged manifest(s) in {} repositories{}",
            if dry_run { "(dry run) would remove" } else { "removed" },
            done.len(),
            if dry_run { "" } else { "; `berth gc` frees their blobs once the grace period has passed" }
        ))
    }
}
