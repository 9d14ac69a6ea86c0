//! `GET /metrics`: what an operator scrapes with Prometheus. Request counts
//! and latencies by endpoint (never by repository name, which would make
//! the label set unbounded), and this node's view of Raft, read at scrape
//! time so the numbers are never stale.

use std::time::Duration;

use http::{Method, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::response::{builder, finish, full, ApiResult};
use super::Route;
use crate::blob::gc::GcReport;
use crate::blob::repair::RepairReport;
use crate::cluster::Cluster;

/// The registry and the instruments the request path updates.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    raft: RaftGauges,
    repair: RepairGauges,
    gc: Vec<GcGauge>,
    /// Bytes of RocksDB tables per column family.
    meta_bytes: IntGaugeVec,
}

/// A garbage collection gauge and how to read it from the report.
type GcGauge = (IntGauge, fn(&GcReport) -> u64);

struct RepairGauges {
    rounds: IntGauge,
    scans: IntGauge,
    queued: IntGauge,
    below_target: IntGauge,
    local_checks: IntGauge,
    scrubbed: IntGauge,
    scrub_corrupt: IntGauge,
    scrub_passes: IntGauge,
}

struct RaftGauges {
    term: IntGauge,
    leader: IntGauge,
    is_leader: IntGauge,
    last_log: IntGauge,
    committed: IntGauge,
    applied: IntGauge,
    snapshot: IntGauge,
    purged: IntGauge,
    log_bytes: IntGauge,
    voters: IntGauge,
    learners: IntGauge,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("registered once");
    g
}

impl Default for Metrics {
    fn default() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("berth_http_requests_total", "HTTP requests answered, by method, endpoint and status."),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "berth_http_request_duration_seconds",
                "Time to the response head (a blob body streams after it), by method and endpoint.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["method", "route"],
        )
        .expect("valid metric");
        registry.register(Box::new(requests.clone())).expect("registered once");
        registry.register(Box::new(latency.clone())).expect("registered once");
        let g = |name, help| gauge(&registry, name, help);
        let raft = RaftGauges {
            term: g("berth_raft_term", "Current Raft term."),
            leader: g("berth_raft_leader_id", "Id of the leader this node knows, 0 if none."),
            is_leader: g("berth_raft_is_leader", "1 if this node leads."),
            last_log: g("berth_raft_last_log_index", "Index of the last entry in this node's log."),
            committed: g("berth_raft_commit_index", "Highest index this node knows to be committed."),
            applied: g("berth_raft_applied_index", "Highest index applied to this node's state machine."),
            snapshot: g("berth_raft_snapshot_index", "Last index covered by this node's snapshot."),
            purged: g("berth_raft_purged_index", "Last index removed from this node's log."),
            log_bytes: g("berth_raft_log_bytes", "Bytes of this node's Raft log (its segment files)."),
            voters: g("berth_raft_voters", "Voters in the membership this node knows."),
            learners: g("berth_raft_learners", "Learners in the membership this node knows."),
        };
        let repair = RepairGauges {
            rounds: g("berth_repair_rounds", "Leader repair rounds this node completed since it started."),
            scans: g(
                "berth_repair_scans_total",
                "Repair rounds of this node that scanned the whole blob index (a membership or liveness change, \
                 a new leader, the sweep).",
            ),
            queued: g(
                "berth_repair_queued_total",
                "Blobs this node's repair looked at because their copies shrank, without a scan.",
            ),
            below_target: g(
                "berth_blobs_below_target",
                "Blobs with fewer copies on live members than their target after this node's last repair round; \
                 -1 unless this node leads repair.",
            ),
            local_checks: g(
                "berth_local_checks_total",
                "Checks that every local copy the index names exists, since start (the first right after start).",
            ),
            scrubbed: g("berth_scrub_blobs_checked_total", "Local copies the background scrub hashed since start."),
            scrub_corrupt: g(
                "berth_scrub_corrupt_total",
                "Local copies the scrub found not matching their digest (dropped, then repaired from another holder).",
            ),
            scrub_passes: g("berth_scrub_passes_total", "Scrub passes over every local copy finished since start."),
        };
        use std::sync::atomic::Ordering::Relaxed;
        let gc: Vec<GcGauge> = vec![
            (g("berth_gc_runs_total", "Garbage collections this node ran since it started."), |r| r.runs.load(Relaxed)),
            (g("berth_gc_blobs_freed_total", "Blobs this node's collections removed from the index."), |r| {
                r.blobs_freed.load(Relaxed)
            }),
            (
                g("berth_gc_bytes_freed_total", "Bytes of the blobs this node's collections removed (once per blob)."),
                |r| r.bytes_freed.load(Relaxed),
            ),
            (g("berth_gc_links_removed_total", "Unused repository links this node's collections removed."), |r| {
                r.links_removed.load(Relaxed)
            }),
            (g("berth_gc_last_duration_ms", "How long this node's last collection took."), |r| {
                r.last_run_ms.load(Relaxed)
            }),
            (g("berth_gc_files_swept_total", "Local copies no one claims that this node deleted."), |r| {
                r.files_swept.load(Relaxed)
            }),
            (g("berth_gc_bytes_swept_total", "Bytes of the local copies this node deleted."), |r| {
                r.bytes_swept.load(Relaxed)
            }),
        ];
        let meta_bytes = IntGaugeVec::new(
            Opts::new(
                "berth_meta_table_bytes",
                "Bytes of the metadata database's tables by column family; the write-ahead log, memtables \
                 and what snapshot checkpoints alone keep are not counted (the Raft log is apart: \
                 berth_raft_log_bytes).",
            ),
            &["family"],
        )
        .expect("valid metric");
        registry.register(Box::new(meta_bytes.clone())).expect("registered once");
        Metrics { registry, requests, latency, raft, repair, gc, meta_bytes }
    }
}

impl Metrics {
    /// The registry, for the owners of other instruments (webhooks) to
    /// register theirs into the same `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Count one answered request.
    pub fn observe(&self, method: &Method, route: &str, status: StatusCode, took: Duration) {
        let method = method_label(method);
        self.requests.with_label_values(&[method, route, status.as_str()]).inc();
        self.latency.with_label_values(&[method, route]).observe(took.as_secs_f64());
    }

    /// The text exposition of every metric, Raft's read now.
    pub fn render(
        &self,
        cluster: &Cluster,
        meta: &crate::meta::MetaReader,
        repair: &RepairReport,
        scrub: &crate::blob::scrub::ScrubReport,
        gc: &GcReport,
    ) -> ApiResult {
        let s = cluster.status();
        let r = &self.raft;
        let voters = s.members.iter().filter(|m| m.voter).count();
        for (gauge, value) in [
            (&r.term, s.term),
            (&r.leader, s.leader),
            (&r.is_leader, u64::from(s.leader == s.id)),
            (&r.last_log, s.last_log_index),
            (&r.committed, s.commit_index),
            (&r.applied, s.applied_index),
            (&r.snapshot, s.snapshot_index),
            (&r.purged, s.purged_index),
            (&r.log_bytes, cluster.log.bytes()),
            (&r.voters, voters as u64),
            (&r.learners, (s.members.len() - voters) as u64),
        ] {
            gauge.set(value as i64);
        }
        self.repair.rounds.set(repair.rounds() as i64);
        self.repair.scans.set(repair.scans() as i64);
        self.repair.queued.set(repair.queued() as i64);
        self.repair.below_target.set(repair.below_target().map_or(-1, |b| b as i64));
        use std::sync::atomic::Ordering::Relaxed;
        self.repair.local_checks.set(repair.local_checks() as i64);
        self.repair.scrubbed.set(scrub.checked.load(Relaxed) as i64);
        self.repair.scrub_corrupt.set(scrub.corrupt.load(Relaxed) as i64);
        self.repair.scrub_passes.set(scrub.passes.load(Relaxed) as i64);
        for (gauge, read) in &self.gc {
            gauge.set(read(gc) as i64);
        }
        for (family, bytes) in meta.family_bytes() {
            self.meta_bytes.with_label_values(&[family]).set(bytes as i64);
        }
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        encoder.encode(&self.registry.gather(), &mut out).map_err(super::response::internal)?;
        finish(builder(StatusCode::OK).header(http::header::CONTENT_TYPE, encoder.format_type()), full(out))
    }
}

/// The method as a metric label, from a closed set: a client may send any
/// token as its method, and each new label value would be a new series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Route {
    /// The endpoint as a metric label: bounded, names and digests left out.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) => "upload_start",
            Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",

            Route::Metrics => "metrics",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
        }
    }
}
