//! The HTTP V2 API. Each request is parsed once into a [`Route`], then one
//! `match` dispatches it to a handler that takes typed arguments. Never
//! touches RocksDB or blob files directly: it goes through `meta`, `blob`
//! and `cluster`.

pub mod auth;
mod blobs;
mod conn;
mod forward;
pub mod limits;
mod lists;
mod manifests;
mod metrics;
mod response;
mod route;
pub mod tls;

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::Instrument;

pub use metrics::Metrics;
pub use response::Body;
pub use route::Route;

use crate::blob::repair::RepairReport;
use crate::blob::{Replicator, Uploads};
use crate::cluster::Cluster;
use crate::meta::MetaReader;
use crate::oci::{Error, ErrorCode};
use response::{builder, error_response, full, ApiResult};

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub meta: MetaReader,
    pub cluster: Cluster,
    pub uploads: Uploads,
    pub replicator: Replicator,
    /// What this node's repair rounds found (for `/metrics`).
    pub repair: Arc<RepairReport>,
    /// What this node's scrub found (for `/metrics`).
    pub scrub: Arc<crate::blob::scrub::ScrubReport>,
    /// What this node's garbage collections did (for `/metrics`).
    pub gc: Arc<crate::blob::gc::GcReport>,
    pub max_manifest_bytes: usize,
    /// For streaming upload requests to the node that owns the session.
    pub http: forward::HttpClient,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<ApiLimits>,
    pub auth: auth::Auth,
    /// Immutable tags (and retention, which runs elsewhere).
    pub policies: Arc<crate::policy::Policies>,
    /// Where pull events go (push and delete events come from the log).
    pub notifier: crate::notify::Notifier,
}

/// Who and which request a write or a pull came from: the context its Raft
/// command carries and its events describe.
#[derive(Debug, Clone)]
pub struct Origin {
    actor: Option<String>,
    request: crate::meta::RequestInfo,
}

impl Origin {
    fn of<B>(req: &Request<B>, caller: &Caller, principal: &auth::Principal) -> Origin {
        use crate::meta::RequestInfo;
        let header = |h: http::header::HeaderName| {
            RequestInfo::bounded(req.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or(""))
        };
        let actor = principal
            .name()
            .map(str::to_owned)
            .or_else(|| caller.on_behalf_of.as_deref().and_then(|b| b.strip_prefix("user:")).map(str::to_owned));
        let host = req.uri().authority().map(|a| a.to_string()).unwrap_or_else(|| header(http::header::HOST));
        Origin {
            actor: actor.map(|a| RequestInfo::bounded(&a)),
            request: RequestInfo {
                id: format!("{:016x}", rand::random::<u64>()),
                addr: caller.addr.to_string(),
                host: RequestInfo::bounded(&host),
                method: req.method().as_str().chars().take(16).collect(),
                useragent: header(http::header::USER_AGENT),
            },
        }
    }
}

impl AppState {
    /// `cmd` as a client's write to `repo`: stamped with this node's clock
    /// and the request, under the immutability rules for `repo`.
    fn write(&self, origin: &Origin, repo: &crate::oci::Name, cmd: crate::meta::Command) -> crate::meta::Command {
        let ctx = crate::meta::Context { immutable: self.policies.immutable_for(repo), ..self.context(origin) };
        crate::meta::Command::With { ctx: Box::new(ctx), cmd: Box::new(cmd) }
    }

    /// What this node knows of `origin` now, without policies.
    fn context(&self, origin: &Origin) -> crate::meta::Context {
        crate::meta::Context {
            at_ms: crate::clock_ms(),
            actor: origin.actor.clone(),
            request: origin.request.clone(),
            source: self.cluster.id,
            immutable: Vec::new(),
        }
    }

    /// Tell webhooks about a pull this node served (best effort).
    fn pulled(
        &self,
        origin: &Origin,
        repo: &crate::oci::Name,
        digest: &crate::oci::Digest,
        media_type: &str,
        size: u64,
        tag: Option<&str>,
    ) {
        let ctx = self.context(origin);
        let mut e = crate::meta::StoredEvent::new(crate::meta::EventAction::Pull, repo, Some(&ctx))
            .digest(digest)
            .target(media_type, size);
        e.tag = tag.map(str::to_owned);
        self.notifier.pulled(e);
    }
}

/// The client bounds the API enforces (see [`limits`]), from `[limits]`.
pub struct ApiLimits {
    pub conns: limits::ConnLimiter,
    pub body_rate: Option<limits::MinRate>,
    pub header_timeout: std::time::Duration,
    pub send_timeout: std::time::Duration,
    pub default_page: usize,
    pub max_page: usize,
}

impl ApiLimits {
    pub fn new(l: &crate::config::LimitSettings) -> ApiLimits {
        use std::time::Duration;
        ApiLimits {
            conns: limits::ConnLimiter::new(l),
            body_rate: limits::MinRate::from_settings(l),
            header_timeout: Duration::from_secs(l.header_timeout_secs),
            send_timeout: Duration::from_secs(l.send_timeout_secs),
            default_page: l.default_page,
            max_page: l.max_page,
        }
    }
}

/// Who sent a request, as far as the limits on open sessions care.
#[derive(Debug, Clone)]
pub struct Caller {
    pub addr: std::net::SocketAddr,
    /// A member passed the request on (it came over the cluster port).
    pub via_peer: bool,
    /// The client a member passed the request on for, or the user this
    /// request authenticated as.
    pub on_behalf_of: Option<String>,
}

impl Caller {
    /// A client of the API port.
    pub fn client(addr: std::net::SocketAddr) -> Caller {
        Caller { addr, via_peer: false, on_behalf_of: None }
    }

    /// This request's caller: a member's word for whom it forwards is
    /// taken, a client's never.
    fn for_request<B>(&self, req: &Request<B>) -> Caller {
        let mut c = self.clone();
        if self.via_peer {
            c.on_behalf_of = req.headers().get(forward::CLIENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
        }
        c
    }

    /// The key open upload sessions are counted under.
    pub fn key(&self) -> String {
        self.on_behalf_of.clone().unwrap_or_else(|| self.addr.ip().to_string())
    }
}

impl AppState {
    /// The client for passing upload requests to other members, over
    /// their cluster port with the cluster's TLS.
    pub fn http_client(tls: Option<crate::cluster::tls::ClusterTls>) -> forward::HttpClient {
        forward::client(tls)
    }
}

/// A request body as a stream of bytes, cut when it falls below the
/// minimum rate (`[limits]`): every body a handler reads goes through it.
fn body_stream(
    state: &AppState,
    req: Request<Incoming>,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin {
    use futures::TryStreamExt;
    use http_body_util::BodyExt;
    let body = req.into_body().into_data_stream().map_err(std::io::Error::other);
    limits::RateChecked::new(body, state.limits.body_rate)
}

/// The most of a refused request's body read and dropped so the client
/// sees the answer on a connection that stays open (Go's net/http drains
/// the same 256 KiB).
const DRAIN_AT_MOST: u64 = 256 << 10;

/// And for at most this long, whatever the body rate setting (which may
/// be off).
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Read and drop a refused request's body when it is small. A client that
/// sends its first request without credentials (ORAS, curl) is still
/// writing the body when the 401 comes: closing the connection under it
/// loses the answer, and the client sees a reset instead of the challenge
/// it would retry with. A larger body, one slower than the body rate, or
/// one still arriving after [`DRAIN_WITHIN`] is not waited for: the
/// connection is closed after the answer.
async fn discard_small_body(state: &AppState, req: Request<Incoming>) {
    use futures::StreamExt;
    use http_body::Body as _;
    if req.body().is_end_stream() || req.body().size_hint().lower() > DRAIN_AT_MOST {
        return;
    }
    let mut body = body_stream(state, req);
    let drain = async {
        let mut read = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len() as u64;
            if read > DRAIN_AT_MOST {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_WITHIN, drain).await;
}

/// The decoded query string of a request.
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(uri: &http::Uri) -> Query {
        Query(form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Serve API requests a member passes on over the cluster port.
pub fn serve_peer(state: Arc<AppState>, conn: crate::cluster::listener::Conn) {
    let caller = Caller { addr: conn.remote(), via_peer: true, on_behalf_of: None };
    tokio::spawn(conn::serve(state, conn, caller));
}

/// Accept connections until `shutdown` fires. Each connection must first
/// get a place under the connection caps; a full node closes new ones at
/// once rather than letting them queue.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tls::ApiTls>,
    state: Arc<AppState>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, say: wait, not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let permit = match state.limits.conns.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection refused: at the connection limit");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let caller = Caller::client(peer);
            let Some(tls) = tls else {
                return conn::serve(state, stream, caller).await;
            };
            match tokio::time::timeout(state.limits.header_timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => conn::serve(state, stream, caller).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake not finished in time"),
            }
        });
    }
}

async fn handle(state: &AppState, req: Request<Incoming>, caller: &Caller) -> Response<Body> {
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), status = tracing::field::Empty);
    async move {
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let head = method == Method::HEAD;
        let (label, result) = match Route::parse(req.uri().path()) {
            Ok(route) => {
                let caller = caller.for_request(&req);
                (route.label(), dispatch(state, route, req, &caller).await)
            }
            Err(e) => ("invalid", Err(e)),
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, "request failed");
                } else {
                    tracing::debug!(error = %e, "request refused");
                }
                error_response(&e, head)
            }
        };
        tracing::Span::current().record("status", resp.status().as_u16());
        state.metrics.observe(&method, label, resp.status(), started.elapsed());
        resp
    }
    .instrument(span)
    .await
}

/// `/readyz`: 200 when this node should get clients, else 503 saying why.
fn ready(state: &AppState, head: bool) -> ApiResult {
    let s = state.cluster.status();
    let why = if !state.cluster.serving() {
        Some(state.cluster.identity.problem().unwrap_or_else(|| {
            "not serving: no leader known, not a cluster member, or draining before it leaves".into()
        }))
    } else if s.applied_index < s.commit_index {
        Some(format!("catching up: applied {} of {} committed entries", s.applied_index, s.commit_index))
    } else {
        None
    };
    let (status, text) = match why {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(w) => (StatusCode::SERVICE_UNAVAILABLE, format!("{w}\n")),
    };
    Ok(builder(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(if head { response::empty() } else { full(text) })
        .expect("static response"))
}

/// What an endpoint needs of its caller: the one table of who may do what.
fn needs(method: &Method, route: &Route, query: &Query) -> auth::Needs {
    use auth::{Action, Needs};
    let one = |n: &crate::oci::Name, a| Needs::Repo(vec![(n.clone(), a)]);
    match (method, route) {
        (_, Route::Metrics | Route::Healthz | Route::Readyz) => Needs::Nothing,
        (_, Route::Base) => Needs::Login,
        (_, Route::Catalog) => Needs::Catalog,
        (&Method::DELETE, Route::Manifest(n, _) | Route::Blob(n, _)) => one(n, Action::Delete),
        (&Method::GET | &Method::HEAD, Route::Manifest(n, _)) => one(n, Action::Pull),
        (_, Route::Manifest(n, _) | Route::UploadStart(n) | Route::Upload(n, _)) => {
            let mut list = vec![(n.clone(), Action::Push)];
            // A mount reads the source repository.
            if let (Route::UploadStart(_), Some(_), Some(Ok(from))) =
                (route, query.get("mount"), query.get("from").map(str::parse))
            {
                list.push((from, Action::Pull));
            }
            Needs::Repo(list)
        }
        (_, Route::Tags(n) | Route::Referrers(n, _) | Route::Blob(n, _)) => one(n, Action::Pull),
    }
}

async fn dispatch(state: &AppState, route: Route, req: Request<Incoming>, caller: &Caller) -> ApiResult {
    let query = Query::parse(req.uri());
    let method = req.method().clone();
    let head = method == Method::HEAD;
    // A node that is not serving says so to anyone first: load balancers
    // health-check `/v2/` without credentials, and must see a draining
    // node's 503, not the 401 every serving node gives them.
    if matches!(route, Route::Base) && !state.cluster.serving() {
        return Err(Error::new(
            ErrorCode::Unavailable,
            state.cluster.identity.problem().unwrap_or_else(|| {
                "this node is not serving: it has no leader, is not a cluster member, or is leaving".into()
            }),
        ));
    }
    // Before anything is read, stored or passed on. A member passing a
    // request on has authorized it already.
    let principal = if caller.via_peer {
        auth::Principal::Anonymous
    } else {
        match state.auth.authorize(req.headers(), &needs(&method, &route, &query)).await {
            Ok(p) => p,
            Err(e) => {
                discard_small_body(state, req).await;
                return Err(e);
            }
        }
    };
    let origin = Origin::of(&req, caller, &principal);
    let caller = &match principal.name() {
        Some(name) => Caller { on_behalf_of: Some(format!("user:{name}")), ..caller.clone() },
        None => caller.clone(),
    };
    let origin = &origin;
    // A drain waits for client work, not for load-balancer health checks.
    let _active = (!matches!(route, Route::Base | Route::Metrics | Route::Healthz | Route::Readyz))
        .then(|| state.cluster.drain.track());
    if caller.via_peer && !forward::from_this_cluster(state, &req) {
        return Err(Error::new(ErrorCode::Denied, "a request passed on by a member of another cluster"));
    }
    if let Route::Upload(_, id) = &route {
        if forward::is_foreign(state, id) {
            return forward::to_owner(state, id, req, caller).await;
        }
    }
    match (method, route) {
        (Method::GET | Method::HEAD, Route::Base) => Ok(builder(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(if head { response::empty() } else { full("{}") })
            .expect("static response")),
        (Method::GET, Route::Metrics) => {
            state.metrics.render(&state.cluster, &state.meta, &state.repair, &state.scrub, &state.gc)
        }
        (Method::GET | Method::HEAD, Route::Healthz) => Ok(builder(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(if head { response::empty() } else { full("ok\n") })
            .expect("static response")),
        (Method::GET | Method::HEAD, Route::Readyz) => ready(state, head),
        (Method::GET, Route::Catalog) => lists::catalog(state, &query, &principal).await,
        (Method::GET, Route::Tags(name)) => lists::tags(state, &name, &query).await,
        (Method::GET, Route::Referrers(name, digest)) => lists::referrers(state, &name, &digest, &query).await,
        (Method::GET | Method::HEAD, Route::Manifest(name, r)) => {
            manifests::get(state, &name, &r, &req, head, origin).await
        }
        (Method::PUT, Route::Manifest(name, r)) => manifests::put(state, &name, &r, &query, req, origin).await,
        (Method::DELETE, Route::Manifest(name, r)) => manifests::delete(state, &name, &r, origin).await,
        (Method::GET | Method::HEAD, Route::Blob(name, digest)) => {
            blobs::get(state, &name, &digest, req.headers(), head, origin).await
        }
        (Method::DELETE, Route::Blob(name, digest)) => blobs::delete(state, &name, &digest, origin).await,
        (Method::POST, Route::UploadStart(name)) => {
            blobs::start_upload(state, &name, &query, req, caller, origin).await
        }
        (Method::GET, Route::Upload(name, id)) => blobs::upload_status(state, &name, &id).await,
        (Method::PATCH, Route::Upload(name, id)) => blobs::patch_upload(state, &name, &id, req).await,
        (Method::PUT, Route::Upload(name, id)) => blobs::finish_upload(state, &name, &id, &query, req, origin).await,
        (Method::DELETE, Route::Upload(name, id)) => blobs::cancel_upload(state, &name, &id).await,
        (m, r) => Err(Error::new(ErrorCode::Unsupported, format!("{m} is not supported on {r:?}"))),
    }
}
