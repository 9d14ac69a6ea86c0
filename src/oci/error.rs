use std::fmt;

use http::StatusCode;
use serde::Serialize;

/// The error codes of the distribution spec (plus Docker's UNAVAILABLE and
/// UNKNOWN for server-side conditions). Each maps to exactly one default
/// HTTP status in [`ErrorCode::status`]: the one place that mapping lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    TagInvalid,
    RangeInvalid,
    Unavailable,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BlobUnknown => "BLOB_UNKNOWN",
            BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            DigestInvalid => "DIGEST_INVALID",
            ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ManifestInvalid => "MANIFEST_INVALID",
            ManifestUnknown => "MANIFEST_UNKNOWN",
            NameInvalid => "NAME_INVALID",
            NameUnknown => "NAME_UNKNOWN",
            SizeInvalid => "SIZE_INVALID",
            Unauthorized => "UNAUTHORIZED",
            Denied => "DENIED",
            Unsupported => "UNSUPPORTED",
            TooManyRequests => "TOOMANYREQUESTS",
            TagInvalid => "TAG_INVALID",
            RangeInvalid => "RANGE_INVALID",
            Unavailable => "UNAVAILABLE",
            Unknown => "UNKNOWN",
        }
    }

    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            BlobUnknown | BlobUploadUnknown | ManifestUnknown | NameUnknown => StatusCode::NOT_FOUND,
            BlobUploadInvalid | DigestInvalid | ManifestBlobUnknown | ManifestInvalid | NameInvalid | SizeInvalid
            | TagInvalid => StatusCode::BAD_REQUEST,
            RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Denied => StatusCode::FORBIDDEN,
            Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A spec error: a code, a human message, and optionally a different status
/// where the spec asks for one (413 for oversized manifests, 416 for ranges).
#[derive(Debug, Clone)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    pub status: Option<StatusCode>,
    /// The `WWW-Authenticate` challenge a 401 carries: how to authenticate.
    pub challenge: Option<String>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error { code, message: message.into(), status: None, challenge: None }
    }

    /// An UNAUTHORIZED (401) error telling the client how to authenticate.
    pub fn unauthorized(message: impl Into<String>, challenge: String) -> Error {
        Error { code: ErrorCode::Unauthorized, message: message.into(), status: None, challenge: Some(challenge) }
    }

    pub fn with_status(mut self, status: StatusCode) -> Error {
        self.status = Some(status);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// The spec's JSON error body: `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Item<'a> {
            code: &'a str,
            message: &'a str,
            detail: serde_json::Value,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Item<'a>; 1],
        }
        serde_json::to_vec(&Body {
            errors: [Item { code: self.code.as_str(), message: &self.message, detail: serde_json::Value::Null }],
        })
        .expect("error body serializes")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Error {}
