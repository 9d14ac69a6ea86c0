//! htpasswd files of any content: no panic; every accepted entry has a
//! user without ':' or a newline and a bcrypt hash.
#![no_main]
use berth::api::auth::parse_htpasswd;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(users) = parse_htpasswd(text) {
        for (user, hash) in &users {
            assert!(!user.is_empty() && !user.contains([':', '\n', '\r']), "{user:?}");
            assert!(hash.starts_with("$2"), "{hash:?}");
        }
    }
});
