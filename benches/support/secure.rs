//! `--secure` for the one-node benchmarks: the node serves TLS (a test CA)
//! with htpasswd authentication and an access rule, and the client sends
//! Basic credentials with every request, so the cost of TLS plus auth can
//! be read against the plain run of the same build.

use std::path::Path;

/// Config lines for TLS and auth under `dir`, and the CA to trust.
pub fn node_settings(dir: &Path) -> (String, std::path::PathBuf) {
    let (ca, cert, key) = super::common::api_certs(&dir.join("tls"));
    let htpasswd = dir.join("htpasswd");
    // Distribution's htpasswd files are made with bcrypt cost 5 or more;
    // berth remembers a checked password, so the cost is paid once.
    std::fs::write(&htpasswd, format!("bench:{}\n", bcrypt::hash("bench-pw", bcrypt::DEFAULT_COST).unwrap())).unwrap();
    let rest = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nhtpasswd = \"{}\"\n[[access]]\nrepos = \"**\"\n\
         pull = [\"bench\"]\npush = [\"bench\"]\ndelete = [\"bench\"]\n",
        cert.display(),
        key.display(),
        htpasswd.display()
    );
    (rest, ca)
}

/// A client that trusts `ca` and sends the bench user's credentials.
pub fn client(ca: &Path, builder: reqwest::ClientBuilder) -> reqwest::Client {
    use base64::Engine;
    let mut headers = reqwest::header::HeaderMap::new();
    let token = base64::engine::general_purpose::STANDARD.encode("bench:bench-pw");
    headers.insert(reqwest::header::AUTHORIZATION, format!("Basic {token}").parse().unwrap());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    builder
        .default_headers(headers)
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .use_rustls_tls()
        .build()
        .unwrap()
}
