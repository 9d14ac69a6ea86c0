//! The OCI distribution and image specs as types. Everything a client sends is
//! parsed here exactly once; the rest of berth only ever sees the parsed forms,
//! so a raw string can never reach storage. This module does no I/O.

mod digest;
mod error;
pub mod manifest;
mod name;
pub mod range;

pub use digest::{Algorithm, Digest, Hasher};
pub use error::{Error, ErrorCode};
pub use manifest::{Descriptor, Manifest};
pub use name::{Name, Reference, Tag};
