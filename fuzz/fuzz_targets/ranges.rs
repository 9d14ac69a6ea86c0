//! `Range` (blob GET) and `Content-Range` (upload PATCH) from any header
//! text and blob size: no panic, and an accepted range always lies inside
//! the blob and is not empty.
#![no_main]
use berth::oci::range::{byte_range, content_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &str)| {
    let (size, text) = input;
    if let Some((start, end)) = byte_range(text, size) {
        assert!(start < end && end <= size, "{text:?} against {size}: {start}..{end}");
    }
    if let Some((a, b)) = content_range(text) {
        assert!(a <= b, "{text:?}: {a}-{b}");
    }
});
