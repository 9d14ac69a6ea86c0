//! Response bodies and the single place where every lower-layer error
//! becomes a spec error.

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};

use crate::blob::{BlobError, ReplicationError};
use crate::cluster::ClusterError;
use crate::meta::{ReadError, Rejection};
use crate::oci::{Error, ErrorCode};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;
pub type ApiResult = Result<Response<Body>, Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn stream<S>(s: S) -> Body
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    StreamBody::new(s.map_ok(http_body::Frame::data)).boxed_unsync()
}

/// A response builder with the headers every berth response carries.
pub fn builder(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header("Docker-Distribution-API-Version", HeaderValue::from_static("registry/2.0"))
}

pub fn error_response(e: &Error, head: bool) -> Response<Body> {
    let body = e.body();
    let b =
        builder(e.status()).header(header::CONTENT_TYPE, "application/json").header(header::CONTENT_LENGTH, body.len());
    let b = if e.status() == StatusCode::SERVICE_UNAVAILABLE { b.header(header::RETRY_AFTER, "1") } else { b };
    let b = match &e.challenge {
        Some(c) => b.header(header::WWW_AUTHENTICATE, c.as_str()),
        None => b,
    };
    b.body(if head { empty() } else { full(body) }).expect("valid error response")
}

/// Build a response; header values here are always valid, so a failure is
/// a bug reported as a 500 rather than a panic.
pub fn finish(b: http::response::Builder, body: Body) -> ApiResult {
    b.body(body).map_err(|e| Error::new(ErrorCode::Unknown, e.to_string()))
}

pub fn internal(e: impl std::fmt::Display) -> Error {
    tracing::error!(error = %e, "internal error");
    Error::new(ErrorCode::Unknown, "internal error")
}

impl From<ClusterError> for Error {
    fn from(e: ClusterError) -> Error {
        match e {
            ClusterError::Fatal(_) => internal(e),
            _ => Error::new(ErrorCode::Unavailable, e.to_string()),
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Error {
        internal(e)
    }
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Error {
        match e {
            ReadError::Db(db) => internal(db),
            ReadError::Corrupt(e) => internal(e),
            ReadError::Installing(i) => Error::new(ErrorCode::Unavailable, i.to_string()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        internal(e)
    }
}

impl From<ReplicationError> for Error {
    fn from(e: ReplicationError) -> Error {
        match e {
            ReplicationError::NotEnoughCopies { .. } => Error::new(ErrorCode::Unavailable, e.to_string()),
            ReplicationError::NoHolder => Error::new(ErrorCode::BlobUnknown, e.to_string()),
            ReplicationError::Blob(b) => blob_error(b),
        }
    }
}

/// Blob errors keep their spec code; storage failures are logged as internal.
pub fn blob_error(e: BlobError) -> Error {
    match e {
        BlobError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            tracing::warn!("blob disk full");
            Error::new(ErrorCode::Unavailable, "this node's blob disk is full; start the upload again")
        }
        BlobError::Io(io) => internal(io),
        other => other.into(),
    }
}

impl From<Rejection> for Error {
    fn from(r: Rejection) -> Error {
        match r {
            Rejection::MissingReference(d) => {
                Error::new(ErrorCode::ManifestBlobUnknown, format!("manifest references unknown {d}"))
            }
            Rejection::ManifestInvalid(m) => Error::new(ErrorCode::ManifestInvalid, m),
            Rejection::ManifestUnknown => Error::new(ErrorCode::ManifestUnknown, "manifest unknown"),
            Rejection::BlobUnknown => Error::new(ErrorCode::BlobUnknown, "blob unknown"),
            Rejection::Denied(why) => Error::new(ErrorCode::Denied, why),
        }
    }
}
