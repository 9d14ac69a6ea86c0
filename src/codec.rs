//! The one encoding of everything berth stores in RocksDB as a structure
//! (log entries, votes, manifest records, blob holders, request outcomes,
//! membership) and of the Raft payloads it sends between nodes.
//!
//! Every value is one format byte, then postcard (a documented, stable
//! wire format: <https://postcard.jamesmunns.com/wire-format>). The byte
//! is what makes an upgrade possible: a release reads every format up to
//! its own, so a node of the next release reads what this one wrote, and a
//! value from a newer release is refused with a message saying so instead
//! of being misread. Values that are plain bytes by design (tag targets,
//! link sizes, push times, the JSON of webhook events) are not wrapped; the
//! data dir's format marker (see `meta::upgrade`) versions those.
//!
//! postcard replaced bincode 1, which is unmaintained (RUSTSEC-2025-0141);
//! [`legacy`] reads bincode 1's layout, only to convert data dirs written
//! before format 1.

pub mod legacy;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format this release writes, and the newest it reads.
pub const FORMAT: u8 = 1;

/// Why a stored or received value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("an empty value (a peer of a release before format {FORMAT}?)")]
    Empty,
    #[error("format {0} was written by a newer release of berth; this one reads formats up to {FORMAT}")]
    Newer(u8),
    #[error("format {0} is not one berth ever wrote")]
    Unknown(u8),
    #[error("malformed value: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("malformed value: {0} bytes after its end")]
    Trailing(usize),
}

/// Encode `v` in the current format.
///
/// # Panics
/// Only if `v`'s `Serialize` asks for something postcard cannot write (a
/// sequence of unknown length): berth's stored and sent types never do,
/// and the round-trip tests cover each of them.
pub fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    postcard::to_extend(v, vec![FORMAT]).expect("berth's types encode with postcard")
}

/// Decode a value written by [`encode`] of this release or an earlier one.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&FORMAT, body)) => {
            let (v, rest) = postcard::take_from_bytes(body)?;
            if !rest.is_empty() {
                return Err(CodecError::Trailing(rest.len()));
            }
            Ok(v)
        }
        Some((&f, _)) if f > FORMAT => Err(CodecError::Newer(f)),
        Some((&f, _)) => Err(CodecError::Unknown(f)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_cannot_read() {
        let v = (7u64, Some("x".to_string()), vec![1u8, 2]);
        let b = encode(&v);
        assert_eq!(b[0], FORMAT);
        assert_eq!(decode::<(u64, Option<String>, Vec<u8>)>(&b).unwrap(), v);
        assert!(matches!(decode::<u8>(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode::<u8>(&[FORMAT + 1, 0]), Err(CodecError::Newer(_))));
        assert!(matches!(decode::<u8>(&[0, 0]), Err(CodecError::Unknown(0))));
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(decode::<(u64, Option<String>, Vec<u8>)>(&long), Err(CodecError::Trailing(1))));
        assert!(decode::<(u64, Option<String>, Vec<u8>)>(&b[..b.len() - 1]).is_err());
    }
}
