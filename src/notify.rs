//! Webhook notifications in Distribution's format, so its receivers work
//! unchanged. One owner: the endpoints, their delivery and their metrics.
//!
//! Push, mount and delete events are written by apply, with the command
//! that caused them, into the replicated state (see `meta::events`): they
//! exist exactly when their write committed, under an id that is their
//! place in the log. The leader delivers them, per endpoint from that
//! endpoint's cursor, and after the receiver answers 2xx commits the new
//! cursor through Raft ([`Command::Delivered`]). A new leader, or the same
//! node after a restart, starts from the committed cursor: every event is
//! delivered at least once, and a receiver de-duplicates by id. The leader
//! also trims what every endpoint has received, and bounds what is kept
//! for endpoints that do not answer ([`Command::TrimEvents`]).
//!
//! Pull events are not in the log (a read writes nothing): the node that
//! served the pull sends them, best effort, from a bounded in-memory queue,
//! once each; they can be lost.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use regex::Regex;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::cluster::Cluster;
use crate::config::WebhookSettings;
use crate::meta::{Command, EventAction, EventKey, MetaReader, StoredEvent};

/// The envelope's media type.
pub const EVENTS_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v2+json";
/// Pull events waiting to be sent from this node at most.
const PULL_QUEUE: usize = 1024;
/// How often the leader trims delivered events and updates the gauges.
const TRIM_EVERY: Duration = Duration::from_secs(5);
/// How long an idle delivery loop waits before looking for new events.
const POLL: Duration = Duration::from_millis(200);

type HttpsClient =
    Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Full<bytes::Bytes>>;

/// Check `[[webhooks]]`, naming the key at fault.
pub fn validate(hooks: &[WebhookSettings]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, h) in hooks.iter().enumerate() {
        Endpoint::new(h, false).map_err(|e| format!("webhooks[{i}]: {e}"))?;
        if !names.insert(&h.name) {
            return Err(format!("webhooks[{i}].name: {:?} is used twice", h.name));
        }
    }
    Ok(())
}

struct Endpoint {
    s: WebhookSettings,
    uri: http::Uri,
    headers: HeaderMap,
    actions: Vec<EventAction>,
    repos: Vec<Regex>,
    client: Option<HttpsClient>,
}

impl Endpoint {
    /// The endpoint of `s`; `connect` builds its client (validation
    /// does not).
    fn new(s: &WebhookSettings, connect: bool) -> Result<Endpoint, String> {
        if s.name.is_empty() || s.name.len() > 128 {
            return Err("name must have 1 to 128 characters".into());
        }
        let uri: http::Uri = s.url.parse().map_err(|e| format!("url: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("url must start with http:// or https://".into()),
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &s.headers {
            let name = HeaderName::try_from(k.as_str()).map_err(|e| format!("headers.{k}: {e}"))?;
            let value = HeaderValue::try_from(v.as_str()).map_err(|e| format!("headers.{k}: {e}"))?;
            headers.insert(name, value);
        }
        let actions = s
            .actions
            .iter()
            .map(|a| match a.as_str() {
                "push" => Ok(EventAction::Push),
                "pull" => Ok(EventAction::Pull),
                "mount" => Ok(EventAction::Mount),
                "delete" => Ok(EventAction::Delete),
                other => Err(format!("actions: {other:?} is not push, pull, mount or delete")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let repos = s
            .repos
            .iter()
            .map(|p| crate::api::auth::pattern(p).map_err(|e| format!("repos: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if s.timeout_ms == 0 || s.max_events == 0 || s.backoff_ms == 0 {
            return Err("timeout_ms, backoff_ms and max_events must be at least 1".into());
        }
        if s.ca.is_some() && !https {
            return Err("ca is for an https:// url".into());
        }
        let client = if connect { Some(client(s.ca.as_deref())?) } else { None };
        Ok(Endpoint { s: s.clone(), uri, headers, actions, repos, client })
    }

    /// Whether this endpoint wants `e`.
    fn wants(&self, e: &StoredEvent) -> bool {
        (self.actions.is_empty() || self.actions.contains(&e.action))
            && (self.repos.is_empty() || self.repos.iter().any(|r| r.is_match(&e.repository)))
            && !e.media_type.as_ref().is_some_and(|m| self.s.ignored_media_types.contains(m))
    }

    /// POST one envelope; Ok once the receiver answered 2xx.
    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let client = self.client.as_ref().expect("a running endpoint has a client");
        let mut req = Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, EVENTS_MEDIA_TYPE)
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        req.headers_mut().extend(self.headers.clone());
        let send = async {
            let resp = client.request(req).await.map_err(|e| format!("sending: {e}"))?;
            let status = resp.status();
            // Read (and drop) the answer so the connection can be reused.
            let _ = http_body_util::BodyExt::collect(http_body_util::Limited::new(resp.into_body(), 64 << 10)).await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the receiver answered {status}"))
            }
        };
        tokio::time::timeout(Duration::from_millis(self.s.timeout_ms), send)
            .await
            .map_err(|_| format!("no answer within {} ms", self.s.timeout_ms))?
    }
}

/// An HTTP(S) client; https receivers verified against `ca` when given,
/// else against the system's roots.
fn client(ca: Option<&std::path::Path>) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("ca {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("ca {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("ca {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector))
}

/// Webhook delivery counters and gauges, by endpoint name (a closed set:
/// the configured endpoints).
struct HookMetrics {
    sent: IntCounterVec,
    failed: IntCounterVec,
    depth: IntGaugeVec,
    lag: IntGaugeVec,
    dropped: prometheus::IntCounter,
    pulls_dropped: prometheus::IntCounter,
}

impl HookMetrics {
    fn new(registry: &Registry) -> HookMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["endpoint"]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["endpoint"]).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let plain = |name: &str, help: &str| {
            let c = prometheus::IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        HookMetrics {
            sent: counter("berth_webhook_events_sent_total", "Events this node delivered, by endpoint."),
            failed: counter("berth_webhook_failures_total", "Deliveries that failed (to be retried), by endpoint."),
            depth: gauge(
                "berth_webhook_queue_depth",
                "Events committed and not yet delivered, by endpoint (counted up to webhook_queue_max; on the leader).",
            ),
            lag: gauge(
                "berth_webhook_lag_seconds",
                "Age of the oldest event not yet delivered, by endpoint (on the leader).",
            ),
            dropped: plain(
                "berth_webhook_events_dropped_total",
                "Undelivered events this node (as leader) dropped at webhook_queue_max.",
            ),
            pulls_dropped: plain(
                "berth_webhook_pull_events_dropped_total",
                "Pull events lost: the queue was full or the receiver did not answer.",
            ),
        }
    }
}

/// The webhook notifier of one node; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<Arc<Endpoint>>,
    meta: MetaReader,
    cluster: Cluster,
    queue_max: usize,
    /// `http` or `https`: how clients reach the API (for target URLs).
    scheme: &'static str,
    pulls: mpsc::Sender<StoredEvent>,
    pulls_rx: std::sync::Mutex<Option<mpsc::Receiver<StoredEvent>>>,
    metrics: HookMetrics,
}

use crate::clock_ms as now_ms;

impl Notifier {
    pub fn new(
        hooks: &[WebhookSettings],
        queue_max: usize,
        tls: bool,
        meta: MetaReader,
        cluster: Cluster,
        registry: &Registry,
    ) -> Result<Notifier, String> {
        let endpoints = hooks
            .iter()
            .enumerate()
            .map(|(i, h)| Endpoint::new(h, true).map(Arc::new).map_err(|e| format!("webhooks[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let (pulls, rx) = mpsc::channel(PULL_QUEUE);
        Ok(Notifier {
            inner: Arc::new(Inner {
                endpoints,
                meta,
                cluster,
                queue_max,
                scheme: if tls { "https" } else { "http" },
                pulls,
                pulls_rx: std::sync::Mutex::new(Some(rx)),
                metrics: HookMetrics::new(registry),
            }),
        })
    }

    /// A pull this node served, sent best effort (dropped when the queue
    /// is full, and never retried from another node).
    pub fn pulled(&self, event: StoredEvent) {
        let inner = &self.inner;
        if !inner.endpoints.iter().any(|e| e.wants(&event)) {
            return;
        }
        if inner.pulls.try_send(event).is_err() {
            inner.metrics.pulls_dropped.inc();
        }
    }

    /// Distribution's JSON for one event.
    fn render(&self, id: String, e: &StoredEvent) -> serde_json::Value {
        let host = e.request.as_ref().map(|r| r.host.as_str()).filter(|h| !h.is_empty());
        let host = host.map(str::to_owned).unwrap_or_else(|| self.source_addr(e.source));
        let mut target = serde_json::Map::new();
        if let Some(m) = &e.media_type {
            target.insert("mediaType".into(), json!(m));
        }
        if let Some(d) = &e.digest {
            target.insert("digest".into(), json!(d));
        }
        if let Some(s) = e.size {
            target.insert("size".into(), json!(s));
            target.insert("length".into(), json!(s));
        }
        target.insert("repository".into(), json!(e.repository));
        if let Some(d) = &e.digest {
            let kind = if e.media_type.as_deref() == Some("application/octet-stream") { "blobs" } else { "manifests" };
            target
                .insert("url".into(), json!(format!("{}://{host}/v2/{}/{kind}/{d}", self.inner.scheme, e.repository)));
        }
        if let Some(t) = &e.tag {
            target.insert("tag".into(), json!(t));
        }
        let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms);
        let request = e.request.clone().unwrap_or_default();
        json!({
            "id": id,
            "timestamp": humantime::format_rfc3339_millis(at).to_string(),
            "action": e.action.as_str(),
            "target": target,
            "request": {
                "id": request.id,
                "addr": request.addr,
                "host": request.host,
                "method": request.method,
                "useragent": request.useragent,
            },
            "actor": { "name": e.actor.clone().unwrap_or_default() },
            "source": { "addr": self.source_addr(e.source), "instanceID": format!("berth-node-{}", e.source) },
        })
    }

    fn source_addr(&self, node: crate::NodeId) -> String {
        self.inner.cluster.member_api(node).unwrap_or_default()
    }

    fn envelope(&self, events: &[(String, &StoredEvent)]) -> Vec<u8> {
        let events: Vec<_> = events.iter().map(|(id, e)| self.render(id.clone(), e)).collect();
        serde_json::to_vec(&json!({ "events": events })).expect("JSON encodes")
    }

    /// Run every endpoint's delivery, the leader's trimming and the pull
    /// sender until `stop`.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let mut tasks = Vec::new();
        for ep in self.inner.endpoints.clone() {
            tasks.push(tokio::spawn(self.clone().deliver(ep, stop.clone())));
        }
        tasks.push(tokio::spawn(self.clone().trim(stop.clone())));
        let rx = self.inner.pulls_rx.lock().expect("not poisoned").take();
        if let Some(rx) = rx {
            tasks.push(tokio::spawn(self.clone().send_pulls(rx, stop.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// One endpoint's committed events, from its cursor, while this node
    /// leads.
    async fn deliver(self, ep: Arc<Endpoint>, mut stop: watch::Receiver<bool>) {
        let inner = &self.inner;
        let name = ep.s.name.clone();
        let mut backoff = Duration::from_millis(ep.s.backoff_ms);
        let pause = |d: Duration, stop: &mut watch::Receiver<bool>| {
            let mut stop = stop.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => false,
                    _ = stop.changed() => true,
                }
            }
        };
        loop {
            if *stop.borrow() {
                return;
            }
            if !inner.cluster.is_leader() {
                if pause(POLL * 5, &mut stop).await {
                    return;
                }
                continue;
            }
            let batch = match self.pending(&name, ep.s.max_events) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(endpoint = %name, error = %e, "reading events");
                    if pause(POLL * 5, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            let Some((last, _)) = batch.last() else {
                if pause(POLL, &mut stop).await {
                    return;
                }
                continue;
            };
            let next = last.next();
            let wanted: Vec<(String, &StoredEvent)> =
                batch.iter().filter(|(_, e)| ep.wants(e)).map(|(k, e)| (k.id(), e)).collect();
            if !wanted.is_empty() {
                let span = tracing::debug_span!("webhook", endpoint = %name, events = wanted.len());
                let _g = span.enter();
                if let Err(e) = ep.post(self.envelope(&wanted)).await {
                    inner.metrics.failed.with_label_values(&[&name]).inc();
                    tracing::warn!(endpoint = %name, error = %e, retry_in_ms = backoff.as_millis() as u64, "webhook delivery failed");
                    if pause(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(ep.s.max_backoff_ms.max(ep.s.backoff_ms)));
                    continue;
                }
                inner.metrics.sent.with_label_values(&[&name]).inc_by(wanted.len() as u64);
            }
            backoff = Duration::from_millis(ep.s.backoff_ms);
            // Delivered: commit the cursor. Lost (a leader change), the
            // next leader delivers these again: at least once.
            let cmd = Command::Delivered { endpoint: name.clone(), next };
            if let Err(e) = inner.cluster.propose(cmd).await {
                tracing::debug!(endpoint = %name, error = %e, "recording webhook progress");
                if pause(POLL, &mut stop).await {
                    return;
                }
            }
        }
    }

    /// Up to `n` events `endpoint` has not received, from the state.
    fn pending(&self, endpoint: &str, n: usize) -> Result<Vec<(EventKey, StoredEvent)>, crate::meta::ReadError> {
        let meta = &self.inner.meta;
        let from = meta.event_cursors()?.into_iter().find(|(e, _)| e == endpoint).map(|(_, k)| k).unwrap_or_default();
        meta.events_from(from, n)
    }

    /// The leader's upkeep: drop what every endpoint has, bound what is
    /// kept for those that do not answer, forget removed endpoints, and
    /// update the depth and lag gauges.
    async fn trim(self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TRIM_EVERY) => {}
                _ = stop.changed() => return,
            }
            if !self.inner.cluster.is_leader() {
                continue;
            }
            if let Err(e) = self.trim_once().await {
                tracing::debug!(error = %e, "trimming webhook events");
            }
        }
    }

    async fn trim_once(&self) -> Result<(), String> {
        let inner = &self.inner;
        let meta = &inner.meta;
        let cursors = meta.event_cursors().map_err(|e| e.to_string())?;
        let Some((first, last)) = meta.event_bounds().map_err(|e| e.to_string())? else {
            for ep in &inner.endpoints {
                inner.metrics.depth.with_label_values(&[&ep.s.name]).set(0);
                inner.metrics.lag.with_label_values(&[&ep.s.name]).set(0);
            }
            return Ok(());
        };
        let cursor_of = |name: &str| cursors.iter().find(|(n, _)| n == name).map(|(_, k)| *k).unwrap_or_default();
        let mut below = last.next();
        for ep in &inner.endpoints {
            let at = cursor_of(&ep.s.name);
            below = below.min(at);
            let pending = meta.events_from(at, 1).map_err(|e| e.to_string())?;
            let lag = pending.first().map_or(0, |(_, e)| now_ms().saturating_sub(e.at_ms) / 1000);
            let depth = meta.count_events_from(at, inner.queue_max).map_err(|e| e.to_string())?;
            inner.metrics.depth.with_label_values(&[&ep.s.name]).set(depth as i64);
            inner.metrics.lag.with_label_values(&[&ep.s.name]).set(lag as i64);
        }
        if let Some(oldest_kept) = meta.nth_newest_event(inner.queue_max).map_err(|e| e.to_string())? {
            if below < oldest_kept {
                let lost = meta.count_between(below.max(first), oldest_kept, usize::MAX).map_err(|e| e.to_string())?;
                tracing::warn!(
                    dropped = lost,
                    queue_max = inner.queue_max,
                    "webhook events not delivered within webhook_queue_max: dropping the oldest"
                );
                inner.metrics.dropped.inc_by(lost as u64);
                below = oldest_kept;
            }
        }
        let forget: Vec<String> = cursors
            .iter()
            .filter(|(n, _)| !inner.endpoints.iter().any(|e| &e.s.name == n))
            .map(|(n, _)| n.clone())
            .collect();
        if below > first || !forget.is_empty() {
            inner.cluster.propose(Command::TrimEvents { below, forget }).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Send pull events as they come, once each.
    async fn send_pulls(self, mut rx: mpsc::Receiver<StoredEvent>, mut stop: watch::Receiver<bool>) {
        loop {
            let e = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = stop.changed() => return,
            };
            let id = format!("pull-{}-{:016x}", e.source, rand::random::<u64>());
            for ep in &self.inner.endpoints {
                if !ep.wants(&e) {
                    continue;
                }
                match ep.post(self.envelope(&[(id.clone(), &e)])).await {
                    Ok(()) => self.inner.metrics.sent.with_label_values(&[&ep.s.name]).inc(),
                    Err(err) => {
                        self.inner.metrics.pulls_dropped.inc();
                        tracing::debug!(endpoint = %ep.s.name, error = %err, "pull event lost");
                    }
                }
            }
        }
    }
}
