//! Upload sessions live on the node that started them: a request for
//! another node's session is streamed to that node and its answer streamed
//! back, so a client behind a round-robin load balancer can PATCH and PUT
//! through whichever node it reaches. Requests travel over the owner's
//! cluster port, behind the cluster's mutual TLS (`cluster::listener`), so
//! the owner knows a member sent them: it trusts the client key the member
//! names, and never forwards them again.

use http::{header, Request, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::response::{ApiResult, Body};
use super::{AppState, Caller};
use crate::blob::UploadId;
use crate::cluster::listener::ForwardConnector;
use crate::cluster::tls::ClusterTls;
use crate::oci::{Error, ErrorCode};

/// The client a forwarded request is on behalf of (its session-limit key),
/// trusted only from a member.
pub const CLIENT: &str = "x-berth-client";

/// The forwarding member's cluster id: a certificate from the same CA is
/// not enough, the member must belong to this cluster.
const CLUSTER: &str = "x-berth-cluster";

/// Whether a request a member passed on comes from this node's cluster.
pub fn from_this_cluster<B>(state: &AppState, req: &Request<B>) -> bool {
    let mine = state.cluster.identity.cluster_label();
    !mine.is_empty() && req.headers().get(CLUSTER).is_some_and(|v| v.as_bytes() == mine.as_bytes())
}

pub type HttpClient = Client<ForwardConnector, Incoming>;

/// The client that passes requests to a session's owner. HTTP/2, so every
/// connection carries pings the owner's process must answer: an owner that
/// is down is told apart at once (connect timeout), one that froze within
/// seconds (no pong), while one that is merely slow to answer (a finishing
/// PUT waits for fsync and replica copies) is waited for.
pub fn client(tls: Option<ClusterTls>) -> HttpClient {
    use std::time::Duration;
    let connector = ForwardConnector { tls, timeout: Duration::from_secs(2) };
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

pub async fn to_owner(state: &AppState, id: &UploadId, req: Request<Incoming>, caller: &Caller) -> ApiResult {
    // A stale view of the membership must never bounce a request on.
    if caller.via_peer {
        return Err(unknown());
    }
    let owner = {
        let m = state.cluster.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id.node).map(|n| n.grpc.clone())
    };
    let owner = owner.filter(|a| !a.is_empty()).ok_or_else(unknown)?;
    to_node(state, &owner, req, caller).await.map_err(|()| unknown())
}

/// Another member to start an upload on, when this node's blob disk is
/// nearly full: chosen at random, so such uploads spread over the others.
pub fn another_node(state: &AppState) -> Option<String> {
    use rand::seq::SliceRandom;
    let m = state.cluster.raft.metrics().borrow().membership_config.clone();
    let others: Vec<String> = m
        .membership()
        .nodes()
        .filter(|(id, n)| **id != state.cluster.id && !n.grpc.is_empty())
        .map(|(_, n)| n.grpc.clone())
        .collect();
    others.choose(&mut rand::thread_rng()).cloned()
}

/// Stream `req` to the member whose cluster port is `addr` and its answer
/// back.
pub async fn to_node(
    state: &AppState,
    addr: &str,
    req: Request<Incoming>,
    caller: &Caller,
) -> Result<http::Response<Body>, ()> {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = Uri::try_from(format!("http://{addr}{pq}")).map_err(|_| ())?;
    parts.headers.remove(header::HOST);
    parts.headers.insert(CLIENT, http::HeaderValue::from_str(&caller.key()).map_err(|_| ())?);
    parts
        .headers
        .insert(CLUSTER, http::HeaderValue::from_str(&state.cluster.identity.cluster_label()).map_err(|_| ())?);
    let resp = state.http.request(Request::from_parts(parts, body)).await.map_err(|e| {
        tracing::debug!(error = %e, %addr, "forwarding upload request failed");
    })?;
    let (parts, body) = resp.into_parts();
    let body: Body = body.map_err(std::io::Error::other).boxed_unsync();
    Ok(http::Response::from_parts(parts, body))
}
