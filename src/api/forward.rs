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

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

fn unknown() -> Error {
    Error::new(ErrorCode::BlobUploadUnknown, "upload unknown (its node is not reachable)")
}

/// Whether this request must go to the upload's owner.
pub fn is_foreign(state: &AppState, id: &UploadId) -> bool {
    id.node != state.cluster.id
}

pub async fn to_owner(state: &AppState, id: &UploadId, req: Request<Incoming>) -> ApiResult {
    if req.headers().contains_key(FORWARDED) {
        return Err(unknown());
    }
    let owner = {
        let m = state.cluster.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id.node).map(|n| n.api.clone())
    };
    let owner = owner.filter(|a| !a.is_empty()).ok_or_else(unknown)?;
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = Uri::try_from(format!("http://{owner}{pq}")).map_err(|_| unknown())?;
    parts.headers.remove(header::HOST);
    parts.headers.insert(FORWARDED, http::HeaderValue::from_static("1"));
    let resp = state.http.request(Request::from_parts(parts, body)).await.map_err(|e| {
        tracing::debug!(error = %e, %owner, "forwarding upload request failed");
        unknown()
    })?;
    let (parts, body) = resp.into_parts();
    let body: Body = body.map_err(std::io::Error::other).boxed_unsync();
    Ok(http::Response::from_parts(parts, body))
}
