//! `oci::Digest` from any string: no panic, and whatever parses prints back
//! to the same text and parses to the same digest (a digest names a file
//! path, so no second spelling may exist).
#![no_main]
use berth::oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(d) = s.parse::<Digest>() {
        let text = d.to_string();
        assert_eq!(text, s, "a digest has one spelling");
        assert!(!d.hex().contains(['/', '.', '\\']), "hex is a safe path component");
        assert_eq!(text.parse::<Digest>().unwrap(), d);
    }
});
