//! The HTTP V2 API. Each request is parsed once into a [`Route`], then one
//! `match` dispatches it to a handler that takes typed arguments. Never
//! touches RocksDB or blob files directly: it goes through `meta`, `blob`
//! and `cluster`.

mod blobs;
mod forward;
mod lists;
mod manifests;
mod metrics;
mod response;
mod route;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
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
    pub max_manifest_bytes: usize,
    /// For streaming upload requests to the node that owns the session.
    pub http: forward::HttpClient,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn http_client() -> forward::HttpClient {
        forward::client()
    }
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

/// Accept connections until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let state = Arc::new(state);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let mut conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client may send its whole request, then shut its write side
            // while it waits: it still gets the answer (hyper would drop the
            // request in flight otherwise).
            conn.http1().half_close(true);
            // Uploads a peer passes on to this node (their owner) come over
            // HTTP/2: a window of one round trip's worth would slow them.
            conn.http2()
                .initial_stream_window_size(crate::cluster::WINDOW)
                .initial_connection_window_size(crate::cluster::WINDOW * 2);
            if let Err(e) = conn.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

async fn handle(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), status = tracing::field::Empty);
    async move {
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let head = method == Method::HEAD;
        let (label, result) = match Route::parse(req.uri().path()) {
            Ok(route) => (route.label(), dispatch(state, route, req).await),
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

async fn dispatch(state: &AppState, route: Route, req: Request<Incoming>) -> ApiResult {
    let query = Query::parse(req.uri());
    let method = req.method().clone();
    let head = method == Method::HEAD;
    // A drain waits for client work, not for load-balancer health checks.
    let _active = (!matches!(route, Route::Base | Route::Metrics)).then(|| state.cluster.drain.track());
    if let Route::Upload(_, id) = &route {
        if forward::is_foreign(state, id) {
            return forward::to_owner(state, id, req).await;
        }
    }
    match (method, route) {
        (Method::GET | Method::HEAD, Route::Base) if !state.cluster.serving() => Err(Error::new(
            ErrorCode::Unavailable,
            state.cluster.identity.problem().unwrap_or_else(|| {
                "this node is not serving: it has no leader, is not a cluster member, or is leaving".into()
            }),
        )),
        (Method::GET | Method::HEAD, Route::Base) => Ok(builder(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(if head { response::empty() } else { full("{}") })
            .expect("static response")),
        (Method::GET, Route::Metrics) => state.metrics.render(&state.cluster, &state.repair),
        (Method::GET, Route::Catalog) => lists::catalog(state, &query).await,
        (Method::GET, Route::Tags(name)) => lists::tags(state, &name, &query).await,
        (Method::GET, Route::Referrers(name, digest)) => lists::referrers(state, &name, &digest, &query).await,
        (Method::GET | Method::HEAD, Route::Manifest(name, r)) => manifests::get(state, &name, &r, &req, head).await,
        (Method::PUT, Route::Manifest(name, r)) => manifests::put(state, &name, &r, &query, req).await,
        (Method::DELETE, Route::Manifest(name, r)) => manifests::delete(state, &name, &r).await,
        (Method::GET | Method::HEAD, Route::Blob(name, digest)) => {
            blobs::get(state, &name, &digest, req.headers(), head).await
        }
        (Method::DELETE, Route::Blob(name, digest)) => blobs::delete(state, &name, &digest).await,
        (Method::POST, Route::UploadStart(name)) => blobs::start_upload(state, &name, &query, req).await,
        (Method::GET, Route::Upload(name, id)) => blobs::upload_status(state, &name, &id).await,
        (Method::PATCH, Route::Upload(name, id)) => blobs::patch_upload(state, &name, &id, req).await,
        (Method::PUT, Route::Upload(name, id)) => blobs::finish_upload(state, &name, &id, &query, req).await,
        (Method::DELETE, Route::Upload(name, id)) => blobs::cancel_upload(state, &name, &id).await,
        (m, r) => Err(Error::new(ErrorCode::Unsupported, format!("{m} is not supported on {r:?}"))),
    }
}
