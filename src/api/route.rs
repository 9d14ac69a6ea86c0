//! Parsing a request path into an [`Route`]: the endpoints of the
//! distribution spec, with every path parameter already validated.

use crate::blob::UploadId;
use crate::oci::{Digest, Error, ErrorCode, Name, Reference};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// end-1: `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// end-8: `/v2/<name>/tags/list`
    Tags(Name),
    /// end-3, end-7, end-9: `/v2/<name>/manifests/<reference>`
    Manifest(Name, Reference),
    /// end-2, end-10: `/v2/<name>/blobs/<digest>`
    Blob(Name, Digest),
    /// end-4a, end-4b, end-11: `/v2/<name>/blobs/uploads/`
    UploadStart(Name),
    /// end-5, end-6, end-13: `/v2/<name>/blobs/uploads/<id>`
    Upload(Name, UploadId),
    /// end-12: `/v2/<name>/referrers/<digest>`
    Referrers(Name, Digest),
    /// `/metrics`: Prometheus text exposition.
    Metrics,
    /// `/healthz`: the process answers.
    Healthz,
    /// `/readyz`: a member that knows a leader, has applied what it knows
    /// to be committed, and is not draining: send it clients.
    Readyz,
}

fn not_found() -> Error {
    Error::new(ErrorCode::Unsupported, "no such endpoint").with_status(http::StatusCode::NOT_FOUND)
}

impl Route {
    pub fn parse(path: &str) -> Result<Route, Error> {
        match path {
            "/metrics" => return Ok(Route::Metrics),
            "/healthz" => return Ok(Route::Healthz),
            "/readyz" => return Ok(Route::Readyz),
            _ => {}
        }
        let rest = path.strip_prefix("/v2").ok_or_else(not_found)?;
        if rest.is_empty() || rest == "/" {
            return Ok(Route::Base);
        }
        let rest = rest.strip_prefix('/').ok_or_else(not_found)?;
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route::Tags(name.parse()?));
        }
        if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
            return Ok(Route::UploadStart(name.parse()?));
        }
        let (head, last) = rest.rsplit_once('/').ok_or_else(not_found)?;
        let (name, kind) = head.rsplit_once('/').ok_or_else(not_found)?;
        match kind {
            "manifests" => Ok(Route::Manifest(name.parse()?, last.parse()?)),
            "blobs" => Ok(Route::Blob(name.parse()?, last.parse()?)),
            "referrers" => Ok(Route::Referrers(name.parse()?, last.parse()?)),
            "uploads" => {
                let name = name.strip_suffix("/blobs").ok_or_else(not_found)?;
                let name: Name = name.parse()?;
                let id = last.parse().map_err(|_| Error::new(ErrorCode::BlobUploadUnknown, "unknown upload"))?;
                Ok(Route::Upload(name, id))
            }
            _ => Err(not_found()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert_eq!(Route::parse("/metrics").unwrap(), Route::Metrics);
        assert_eq!(Route::parse("/healthz").unwrap(), Route::Healthz);
        assert_eq!(Route::parse("/readyz").unwrap(), Route::Readyz);
        assert!(Route::parse("/metrics/x").is_err());
        assert!(matches!(Route::parse("/v2/a/b/tags/list"), Ok(Route::Tags(n)) if n.as_str() == "a/b"));
        assert!(matches!(Route::parse("/v2/x/blobs/uploads/"), Ok(Route::UploadStart(_))));
        assert!(matches!(Route::parse(&format!("/v2/x/blobs/{d}")), Ok(Route::Blob(..))));
        assert!(
            matches!(Route::parse(&format!("/v2/x/blobs/blobs/{d}")), Ok(Route::Blob(n, _)) if n.as_str() == "x/blobs")
        );
        assert!(matches!(Route::parse("/v2/x/manifests/latest"), Ok(Route::Manifest(..))));
        assert!(matches!(Route::parse(&format!("/v2/x/referrers/{d}")), Ok(Route::Referrers(..))));
        let e = Route::parse("/v2/UP/manifests/latest").unwrap_err();
        assert_eq!(e.code, ErrorCode::NameInvalid);
        let e = Route::parse("/v2/x/blobs/sha256:..%2f..").unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        let e = Route::parse("/v2/x/blobs/uploads/nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::BlobUploadUnknown);
    }
}
