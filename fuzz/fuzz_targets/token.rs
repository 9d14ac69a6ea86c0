//! Docker bearer tokens: arbitrary token text, and arbitrary claims signed
//! with the trusted key. No panic; a forged or unsigned token never grants
//! anything; a signed one grants only what its `access` claim lists, and
//! only with the right audience and issuer and within its times.
#![no_main]
use std::sync::OnceLock;

use berth::api::auth::TokenVerifier;
use berth::config::TokenSettings;
use libfuzzer_sys::fuzz_target;

struct Keys {
    verifier: TokenVerifier,
    signing: jsonwebtoken::EncodingKey,
    _dir: tempfile::TempDir,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("token.pem");
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let settings = TokenSettings {
            realm: "https://auth.example/token".into(),
            service: "registry.example".into(),
            issuer: "auth.example".into(),
            public_keys: vec![public],
        };
        Keys {
            verifier: TokenVerifier::new(&settings).unwrap(),
            signing: jsonwebtoken::EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            _dir: dir,
        }
    })
}

fn listed(claims: &serde_json::Value, repo: &str, action: &str) -> bool {
    claims["access"].as_array().is_some_and(|list| {
        list.iter().any(|a| {
            a["type"] == "repository"
                && a["name"] == repo
                && a["actions"].as_array().is_some_and(|x| x.iter().any(|x| x == action || x == "*"))
        })
    })
}

fuzz_target!(|input: (bool, &str)| {
    let (sign, text) = input;
    let k = keys();
    if !sign {
        // Text as a client sends it: nothing it can forge verifies.
        assert!(!k.verifier.grants(text, "any/repo", "pull"));
        return;
    }
    let Ok(claims) = serde_json::from_str::<serde_json::Value>(text) else { return };
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    let Ok(token) = jsonwebtoken::encode(&header, &claims, &k.signing) else { return };
    for (repo, action) in [("any/repo", "pull"), ("any/repo", "push"), ("a", "delete")] {
        if k.verifier.grants(&token, repo, action) {
            assert!(listed(&claims, repo, action), "granted {action} on {repo} not in {claims}");
            let aud = &claims["aud"];
            assert!(
                aud == "registry.example" || aud.as_array().is_some_and(|a| a.iter().any(|x| x == "registry.example")),
                "{claims}"
            );
            assert_eq!(claims["iss"], "auth.example", "{claims}");
        }
    }
});
