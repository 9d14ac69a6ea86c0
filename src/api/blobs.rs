//! Blob and upload endpoints (end-2, end-4a/b, end-5, end-6, end-10, end-11,
//! end-13).

use http::{header, HeaderMap, Request, StatusCode};
use hyper::body::Incoming;

use super::response::{blob_error, builder, empty, finish, stream, ApiResult};
use super::{AppState, Origin, Query};
use crate::blob::UploadId;
use crate::meta::{Command, Outcome};
use crate::oci::{range, Digest, Error, ErrorCode, Name};
use crate::NodeId;

fn upload_location(name: &Name, id: &UploadId) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The spec's `Range` for an upload: inclusive end of the bytes received.
fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn upload_accepted(status: StatusCode, name: &Name, id: &UploadId, size: u64) -> ApiResult {
    finish(
        builder(status)
            .header(header::LOCATION, upload_location(name, id))
            .header(header::RANGE, upload_range(size))
            .header("Docker-Upload-UUID", id.to_string())
            .header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

fn blob_created(name: &Name, digest: &Digest) -> ApiResult {
    finish(
        builder(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{name}/blobs/{digest}"))
            .header("Docker-Content-Digest", digest.to_string())
            .header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

/// Whether this repository may see the blob, and its size, as of a read
/// barrier. Content is immutable but its presence in a repository is not: a
/// node that has not applied an acknowledged DELETE would otherwise go on
/// serving the blob, and through a load balancer every client sees that.
/// The barrier is one coalesced read-index round shared by every read
/// waiting, not one per request.
async fn linked_size(state: &AppState, name: &Name, digest: &Digest) -> Result<u64, Error> {
    state.cluster.read_barrier().await?;
    state.meta.blob_link(name, digest)?.ok_or_else(|| Error::new(ErrorCode::BlobUnknown, "blob unknown to registry"))
}

pub async fn get(
    state: &AppState,
    name: &Name,
    digest: &Digest,
    headers: &HeaderMap,
    head: bool,
    origin: &Origin,
) -> ApiResult {
    let size = linked_size(state, name, digest).await?;
    if !head && headers.get(header::RANGE).is_none() {
        state.pulled(origin, name, digest, "application/octet-stream", size, None);
    }
    let common = |status| {
        builder(status)
            .header("Docker-Content-Digest", digest.to_string())
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, format!("\"{digest}\""))
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size),
        Some(r) => match range::byte_range(r, size) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                let e = Error::new(ErrorCode::RangeInvalid, "requested range not satisfiable");
                let mut resp = super::response::error_response(&e, head);
                resp.headers_mut()
                    .insert(header::CONTENT_RANGE, format!("bytes */{size}").parse().expect("valid header"));
                return Ok(resp);
            }
        },
    };
    let mut b = common(status).header(header::CONTENT_LENGTH, end - start);
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(header::CONTENT_RANGE, format!("bytes {}-{}/{size}", start, end - 1));
    }
    // HEAD answers from the index: no bytes move.
    if head {
        return finish(b, empty());
    }
    let store = state.replicator.store();
    if let Some(reader) = store.open(digest).await? {
        if status == StatusCode::OK {
            return finish(b, stream(state.replicator.read_local(digest, reader).await?));
        }
        return finish(b, stream(reader.stream(start, end).await?));
    }
    if status == StatusCode::OK {
        return finish(b, stream(state.replicator.read_through(digest, size).await?));
    }
    // A range of a remote blob: copy it here whole (verified), then serve.
    state.replicator.fetch_local(digest).await?;
    let reader = store.open(digest).await?.ok_or_else(|| Error::new(ErrorCode::BlobUnknown, "blob unavailable"))?;
    finish(b, stream(reader.stream(start, end).await?))
}

pub async fn delete(state: &AppState, name: &Name, digest: &Digest, origin: &Origin) -> ApiResult {
    let cmd = Command::UnlinkBlob { repo: name.clone(), digest: digest.clone() };
    match state.cluster.propose(state.write(origin, name, cmd)).await? {
        Outcome(Ok(())) => finish(builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, 0), empty()),
        Outcome(Err(_)) => Err(Error::new(ErrorCode::BlobUnknown, "blob unknown to repository")),
    }
}

/// Link a blob into `name`, recording `holders` as having it fsynced (none:
/// a mount). The link is stamped with this node's clock: garbage
/// collection leaves it for its grace period, the time a client has to
/// push the manifest that uses it. False when a mount found the blob
/// collected in the meantime.
async fn link(
    state: &AppState,
    name: &Name,
    digest: &Digest,
    size: u64,
    holders: Vec<NodeId>,
    origin: &Origin,
) -> Result<bool, Error> {
    let at_ms = crate::clock_ms();
    let cmd = Command::LinkBlobAt { repo: name.clone(), digest: digest.clone(), size, holders, at_ms };
    match state.cluster.propose(state.write(origin, name, cmd)).await? {
        Outcome(Ok(())) => Ok(true),
        Outcome(Err(crate::meta::Rejection::BlobUnknown)) => Ok(false),
        Outcome(Err(r)) => Err(super::response::internal(format!("link rejected: {r:?}"))),
    }
}

/// A blob just stored here: copy it to enough nodes, then link it.
async fn replicate_and_link(
    state: &AppState,
    name: &Name,
    digest: &Digest,
    size: u64,
    origin: &Origin,
) -> Result<(), Error> {
    let holders = state.replicator.replicate(digest, size, &[state.cluster.id]).await?;
    match link(state, name, digest, size, holders, origin).await? {
        true => Ok(()),
        false => Err(super::response::internal("a link with holders was refused")),
    }
}

/// Cross-repository mount: with `from`, the blob must be linked there; without,
/// any repository's copy will do. Returns the size when the mount can happen.
async fn mountable(state: &AppState, digest: &Digest, from: Option<&Name>) -> Result<Option<u64>, Error> {
    state.cluster.read_barrier().await?;
    let size = match from {
        Some(from) => state.meta.blob_link(from, digest)?,
        None => state.meta.blob(digest)?.map(|b| b.size),
    };
    let held = state.meta.blob(digest)?.is_some_and(|b| !b.holders.is_empty());
    Ok(size.filter(|_| held))
}

pub async fn start_upload(
    state: &AppState,
    name: &Name,
    query: &Query,
    req: Request<Incoming>,
    caller: &super::Caller,
    origin: &Origin,
) -> ApiResult {
    if let Some(m) = query.get("mount") {
        // A malformed mount is a bad request, not a reason to open a session.
        let digest: Digest = m.parse()?;
        let from = query.get("from").map(str::parse::<Name>).transpose()?;
        // Without `from`, a mount would look in every repository: only an
        // open registry may, or a blob in a repository the caller cannot
        // read could be taken by its digest.
        let allowed = from.is_some() || state.auth.mount_anywhere();
        if let Some(size) = if allowed { mountable(state, &digest, from.as_ref()).await? } else { None } {
            // Refused when the blob was collected since it was looked up.
            if link(state, name, &digest, size, Vec::new(), origin).await? {
                return blob_created(name, &digest);
            }
        }
        // Not mountable: fall back to a normal upload session, as the spec says.
    }
    if !caller.via_peer && state.replicator.store().short_of_space() {
        if let Some(other) = super::forward::another_node(state) {
            tracing::info!(node = %other, "blob disk nearly full; starting the upload on another node");
            return super::forward::to_node(state, &other, req, caller).await.map_err(|()| {
                Error::new(ErrorCode::Unavailable, "this node's blob disk is full and no other node answered")
            });
        }
    }
    if let Some(d) = query.get("digest") {
        let digest: Digest = d.parse()?;
        let id = state.uploads.start(name, &caller.key()).await.map_err(blob_error)?;
        let size = match state.uploads.finish(&id, name, &digest, super::body_stream(state, req)).await {
            Ok(size) => size,
            Err(e) => {
                let _ = state.uploads.cancel(&id, name).await;
                return Err(blob_error(e));
            }
        };
        replicate_and_link(state, name, &digest, size, origin).await?;
        return blob_created(name, &digest);
    }
    let id = state.uploads.start(name, &caller.key()).await.map_err(blob_error)?;
    upload_accepted(StatusCode::ACCEPTED, name, &id, 0)
}

pub async fn upload_status(state: &AppState, name: &Name, id: &UploadId) -> ApiResult {
    let size = state.uploads.status(id, name).await.map_err(blob_error)?;
    upload_accepted(StatusCode::NO_CONTENT, name, id, size)
}

/// The upload's `Content-Range`, if the request has one.
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>, Error> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || Error::new(ErrorCode::RangeInvalid, "invalid Content-Range");
    v.to_str().ok().and_then(range::content_range).map(Some).ok_or_else(bad)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

pub async fn patch_upload(state: &AppState, name: &Name, id: &UploadId, req: Request<Incoming>) -> ApiResult {
    let range = content_range(req.headers())?;
    if let (Some((a, b)), Some(len)) = (range, content_length(req.headers())) {
        if b - a + 1 != len {
            return Err(Error::new(ErrorCode::RangeInvalid, "Content-Range does not match Content-Length"));
        }
    }
    let offset = range.map(|(a, _)| a);
    match state.uploads.append(id, name, offset, super::body_stream(state, req)).await {
        Ok(size) => upload_accepted(StatusCode::ACCEPTED, name, id, size),
        Err(crate::blob::BlobError::OutOfOrder { expected, .. }) => {
            let e = Error::new(ErrorCode::RangeInvalid, "chunk out of order");
            let mut resp = super::response::error_response(&e, false);
            let h = resp.headers_mut();
            h.insert(header::LOCATION, upload_location(name, id).parse().expect("valid header"));
            h.insert(header::RANGE, upload_range(expected).parse().expect("valid header"));
            Ok(resp)
        }
        Err(e) => Err(blob_error(e)),
    }
}

pub async fn finish_upload(
    state: &AppState,
    name: &Name,
    id: &UploadId,
    query: &Query,
    req: Request<Incoming>,
    origin: &Origin,
) -> ApiResult {
    let digest: Digest = query
        .get("digest")
        .ok_or_else(|| Error::new(ErrorCode::DigestInvalid, "digest parameter is required"))?
        .parse()?;
    if let Some((a, _)) = content_range(req.headers())? {
        let size = state.uploads.status(id, name).await.map_err(blob_error)?;
        if a != size {
            return Err(Error::new(ErrorCode::RangeInvalid, "chunk out of order"));
        }
    }
    let size = state.uploads.finish(id, name, &digest, super::body_stream(state, req)).await.map_err(blob_error)?;
    replicate_and_link(state, name, &digest, size, origin).await?;
    blob_created(name, &digest)
}

pub async fn cancel_upload(state: &AppState, name: &Name, id: &UploadId) -> ApiResult {
    state.uploads.cancel(id, name).await.map_err(blob_error)?;
    finish(builder(StatusCode::NO_CONTENT), empty())
}
