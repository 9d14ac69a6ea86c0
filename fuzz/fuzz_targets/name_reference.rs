//! Repository names, tags and references from any string: no panic, parsed
//! forms print back unchanged, and a name never makes a path that climbs.
#![no_main]
use berth::oci::{Name, Reference, Tag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(n) = s.parse::<Name>() {
        assert_eq!(n.as_str(), s);
        assert!(n.as_str().split('/').all(|c| !c.is_empty() && c != "." && c != ".."), "{s}");
    }
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.as_str(), s);
        assert!(s.len() <= 128 && !s.contains('/'), "{s}");
    }
    if let Ok(r) = s.parse::<Reference>() {
        match r {
            Reference::Tag(t) => assert_eq!(t.as_str(), s),
            Reference::Digest(d) => assert_eq!(d.to_string(), s),
        }
    }
});
