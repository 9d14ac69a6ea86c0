//! Upload sessions live on the node that started them: a request for
//! another node's session is streamed to that node and its answer streamed
//! back, so a client behind a round-robin load balancer can PATCH and PUT
//! through whichever node it reaches.

use http::{header, Request, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::response::{ApiResult, Body};
use super::AppState;
use crate::blob::UploadId;
use crate::oci::{Error, ErrorCode};

/// Marks a request already forwarded once, so a stale view of the
/// membership can never bounce a request between nodes.
const FORWARDED: &str = "x-berth-forwarded";

pub type HttpClient = Client<HttpConnector, Incoming>;

/// The client that passes requests to a session's owner. HTTP/2 (the
/// owner's API port speaks it without TLS when a client starts with its
/// preface) so every connection carries pings the owner's process must
/// answer: an owner that is down is told apart at once (connect timeout),
/// one that froze within seconds (no pong), while one that is merely slow
/// to answer (a finishing PUT waits for fsync and replica copies) is
/// waited for.
pub fn client() -> HttpClient {
    use std::time::Duration;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(crate::cluster::KEEPALIVE)
        .http2_keep_alive_timeout(crate::cluster::KEEPALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .http2_initial_stream_window_size(crate::cluster::WINDOW)
        .http2_initial_connection_window_size(crate::cluster::WINDOW * 2)
        .build(connector)
}

fn unknown() -> Error {
    Error::new(ErrorCode::BlobUploadUnknown, "upload unknown (its node is not reachable)")
}

/// Whether this request must go to the upload's owner.
pub fn is_foreign(state: &AppState, id: &UploadId) -> bool {
    id.node != state.cluster.id
}

pub async fn to_owner(state: &AppState, id: &UploadId, req: Request<Incoming>) -> ApiResult {
    if is_forwarded(&req) {
        return Err(unknown());
    }
    let owner = {
        let m = state.cluster.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id.node).map(|n| n.api.clone())
    };
    let owner = owner.filter(|a| !a.is_empty()).ok_or_else(unknown)?;
    to_node(state, &owner, req).await.map_err(|()| unknown())
}

/// Whether another node already sent this request here.
pub fn is_forwarded<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(FORWARDED)
}

/// Another member to start an upload on, when this node's blob disk is
/// nearly full: chosen at random, so such uploads spread over the others.
pub fn another_node(state: &AppState) -> Option<String> {
    use rand::seq::SliceRandom;
    let m = state.cluster.raft.metrics().borrow().membership_config.clone();
    let others: Vec<String> = m
        .membership()
        .nodes()
        .filter(|(id, n)| **id != state.cluster.id && !n.api.is_empty())
        .map(|(_, n)| n.api.clone())
        .collect();
    others.choose(&mut rand::thread_rng()).cloned()
}

/// Stream `req` to the node serving the API at `addr` and its answer back.
pub async fn to_node(state: &AppState, addr: &str, req: Request<Incoming>) -> Result<http::Response<Body>, ()> {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = Uri::try_from(format!("http://{addr}{pq}")).map_err(|_| ())?;
    parts.headers.remove(header::HOST);
    parts.headers.insert(FORWARDED, http::HeaderValue::from_static("1"));
    let resp = state.http.request(Request::from_parts(parts, body)).await.map_err(|e| {
        tracing::debug!(error = %e, %addr, "forwarding upload request failed");
    })?;
    let (parts, body) = resp.into_parts();
    let body: Body = body.map_err(std::io::Error::other).boxed_unsync();
    Ok(http::Response::from_parts(parts, body))
}
