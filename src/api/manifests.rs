//! Manifest endpoints (end-3, end-7, end-9).

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{header, Request, StatusCode};
use hyper::body::Incoming;

use super::response::{builder, empty, finish, full, ApiResult};
use super::{AppState, Origin, Query};
use crate::meta::{Command, ManifestRecord, Outcome};
use crate::oci::{manifest, Algorithm, Digest, Error, ErrorCode, Manifest, Name, Reference, Tag};

fn unknown() -> Error {
    Error::new(ErrorCode::ManifestUnknown, "manifest unknown")
}

/// Resolve a reference to a digest and the stored manifest as of a read
/// barrier, for digests as for tags: a manifest's bytes never change, but
/// a DELETE acknowledged on any node must be seen by every node after it.
async fn lookup(state: &AppState, name: &Name, r: &Reference) -> Result<(Digest, ManifestRecord), Error> {
    state.cluster.read_barrier().await?;
    let digest = match r {
        Reference::Tag(t) => state.meta.tag(name, t)?.ok_or_else(unknown)?,
        Reference::Digest(d) => d.clone(),
    };
    let rec = state.meta.manifest(name, &digest)?.ok_or_else(unknown)?;
    Ok((digest, rec))
}

/// Whether the client's Accept header admits `media_type`. No Accept header,
/// or a wildcard, admits everything.
fn accepts(req_headers: &http::HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in req_headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let t = item.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == media_type || t == "*/*" || t == "application/*" {
                return true;
            }
        }
    }
    !any
}

pub async fn get(
    state: &AppState,
    name: &Name,
    r: &Reference,
    req: &Request<Incoming>,
    head: bool,
    origin: &Origin,
) -> ApiResult {
    let (digest, rec) = lookup(state, name, r).await?;
    if matches!(r, Reference::Tag(_)) && !accepts(req.headers(), &rec.media_type) {
        return Err(Error::new(
            ErrorCode::ManifestUnknown,
            format!("manifest is {} which the client does not accept", rec.media_type),
        ));
    }
    let b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, rec.media_type.as_str())
        .header(header::CONTENT_LENGTH, rec.bytes.len())
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    if !head {
        let tag = match r {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        state.pulled(origin, name, &digest, &rec.media_type, rec.bytes.len() as u64, tag);
    }
    finish(b, if head { empty() } else { full(rec.bytes) })
}

/// The manifest body, at most `limit` bytes, read under the same minimum
/// rate as any body (a trickling client is cut, not waited for forever).
async fn read_limited(
    state: &AppState,
    req: Request<Incoming>,
    limit: usize,
) -> Result<(Option<String>, Bytes), Error> {
    let too_big = || {
        Error::new(ErrorCode::SizeInvalid, format!("manifest exceeds {limit} bytes"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = super::body_stream(state, req);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::new(ErrorCode::ManifestInvalid, format!("reading manifest: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((ct, buf.freeze()))
}

pub async fn put(
    state: &AppState,
    name: &Name,
    r: &Reference,
    query: &Query,
    req: Request<Incoming>,
    origin: &Origin,
) -> ApiResult {
    let (content_type, bytes) = read_limited(state, req, state.max_manifest_bytes).await?;
    let parsed = Manifest::parse(content_type.as_deref(), &bytes)?;
    let (digest, mut tags) = match r {
        Reference::Digest(want) => {
            let got = Digest::of(want.algorithm(), &bytes);
            if &got != want {
                return Err(Error::new(ErrorCode::DigestInvalid, format!("manifest digest is {got}, not {want}")));
            }
            (got, Vec::new())
        }
        Reference::Tag(t) => (Digest::of(Algorithm::Sha256, &bytes), vec![t.clone()]),
    };
    let param_tags = query.all("tag").map(str::parse::<Tag>).collect::<Result<Vec<_>, _>>()?;
    tags.extend(param_tags.iter().cloned());
    // Cheap pre-check so bad pushes do not even reach the Raft log; apply
    // re-checks, which settles races with concurrent deletes. A blob linked
    // through another node may not be applied here yet, so a miss takes the
    // read barrier once and looks again before refusing.
    if missing_reference(state, name, &parsed)?.is_some() {
        state.cluster.read_barrier().await?;
        if let Some(err) = missing_reference(state, name, &parsed)? {
            return Err(err);
        }
    }
    // Every referenced blob must be durable before the manifest is.
    for b in &parsed.blobs {
        if let Some(info) = state.meta.blob(b)? {
            if !state.replicator.durable(&info.holders) {
                let holders = state.replicator.replicate(b, info.size, &info.holders).await?;
                let cmd = Command::AddHolders { digest: b.clone(), size: info.size, holders };
                state.cluster.propose(cmd).await?;
            }
        }
    }
    let cmd = Command::PutManifest {
        repo: name.clone(),
        digest: digest.clone(),
        media_type: parsed.media_type.clone(),
        bytes: bytes.to_vec(),
        tags,
    };
    let Outcome(res) = state.cluster.propose(state.write(origin, name, cmd)).await?;
    res?;
    let mut b = builder(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/manifests/{digest}"))
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::CONTENT_LENGTH, 0);
    if let Some(s) = &parsed.subject {
        b = b.header("OCI-Subject", s.to_string());
    }
    for t in &param_tags {
        b = b.header("OCI-Tag", t.as_str());
    }
    finish(b, empty())
}

pub async fn delete(state: &AppState, name: &Name, r: &Reference, origin: &Origin) -> ApiResult {
    let cmd = match r {
        Reference::Digest(d) => Command::DeleteManifest { repo: name.clone(), digest: d.clone() },
        Reference::Tag(t) => Command::DeleteTag { repo: name.clone(), tag: t.clone() },
    };
    let Outcome(res) = state.cluster.propose(state.write(origin, name, cmd)).await?;
    res?;
    finish(builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, 0), empty())
}

/// The first blob or child manifest `parsed` references that this node's
/// state does not link to `name`, as the error to answer with.
fn missing_reference(state: &AppState, name: &Name, parsed: &Manifest) -> Result<Option<Error>, Error> {
    for b in &parsed.blobs {
        if state.meta.blob_link(name, b)?.is_none() {
            return Ok(Some(Error::new(ErrorCode::ManifestBlobUnknown, format!("blob {b} unknown to repository"))));
        }
    }
    for c in &parsed.children {
        if state.meta.manifest(name, c)?.is_none() {
            return Ok(Some(Error::new(ErrorCode::ManifestBlobUnknown, format!("manifest {c} unknown to repository"))));
        }
    }
    Ok(None)
}

/// The media type of the referrers response.
pub const INDEX: &str = manifest::OCI_INDEX;
