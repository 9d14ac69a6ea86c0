//! Manifest bytes with any Content-Type: no panic; an accepted manifest has
//! a media type and every digest it names is a valid digest (they become
//! keys and paths).
#![no_main]
use berth::oci::{Digest, Manifest};
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 6] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("text/plain; charset=utf-8"),
];

fuzz_target!(|input: (u8, &[u8])| {
    let (t, bytes) = input;
    if let Ok(m) = Manifest::parse(TYPES[t as usize % TYPES.len()], bytes) {
        assert!(!m.media_type.is_empty());
        for d in m.blobs.iter().chain(&m.children).chain(m.subject.as_ref()) {
            assert_eq!(d.to_string().parse::<Digest>().ok().as_ref(), Some(d));
        }
    }
});
