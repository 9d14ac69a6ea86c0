//! Local blob storage: the content-addressed store and upload sessions.
//! Bytes are hashed as they arrive, fsynced, and renamed into place only
//! when their digest matches, so a partial or wrong blob is never visible.

mod evacuate;
pub mod gc;
pub mod placement;
pub mod repair;
mod replicate;
pub mod scrub;
mod store;
mod throttle;
pub mod transfer;
mod upload;
mod write;

pub use replicate::{Policy, ReplicationError, Replicator};
pub use store::{BlobReader, BlobStore};
pub use throttle::Throttle;
pub use transfer::{Transfer, TransferError};
pub use upload::{SessionLimits, UploadId, Uploads};

use crate::oci::{Error as OciError, ErrorCode};

/// Errors of the blob layer. Each maps to one spec code in `From`.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("upload unknown")]
    UploadUnknown,
    #[error("upload range: expected offset {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("digest mismatch: computed {computed}")]
    DigestMismatch { computed: String },
    #[error("size mismatch: {0}")]
    SizeMismatch(String),
    #[error("request body: {0}")]
    Body(std::io::Error),
    #[error("{0}")]
    TooManyUploads(String),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

impl From<BlobError> for OciError {
    fn from(e: BlobError) -> OciError {
        let code = match &e {
            BlobError::UploadUnknown => ErrorCode::BlobUploadUnknown,
            BlobError::OutOfOrder { .. } => ErrorCode::RangeInvalid,
            BlobError::DigestMismatch { .. } => ErrorCode::DigestInvalid,
            BlobError::SizeMismatch(_) => ErrorCode::SizeInvalid,
            BlobError::Body(_) => ErrorCode::BlobUploadInvalid,
            BlobError::TooManyUploads(_) => ErrorCode::TooManyRequests,
            BlobError::Io(_) => ErrorCode::Unknown,
        };
        OciError::new(code, e.to_string())
    }
}
