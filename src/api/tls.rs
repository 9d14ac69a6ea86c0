//! TLS on the registry API (rustls). The certificate and key are read from
//! the files `[tls]` names and read again when either file changes, so a
//! renewed certificate (certbot, cert-manager, a rotated secret) is served
//! to new connections without a restart. A file that fails to load while
//! the node runs leaves the last good pair in place, with a warning.
//! ALPN offers HTTP/2 and HTTP/1.1.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

pub use crate::config::ApiTlsFiles;

/// How often the files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The API's TLS acceptor and the certificate it serves.
#[derive(Clone)]
pub struct ApiTls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
}

/// The pair served now, and what its files looked like when it was read.
#[derive(Debug)]
struct Current {
    files: ApiTlsFiles,
    provider: Arc<CryptoProvider>,
    pair: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

/// Modification time and length of a file, to see that it changed
/// (the certificate and key here, the htpasswd file in `auth`).
pub(super) type FileStamp = (Option<SystemTime>, u64);

pub(super) fn file_stamp(p: &Path) -> FileStamp {
    std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0))
}

/// The stamps of the certificate and key files.
type Stamp = [FileStamp; 2];

fn stamp(files: &ApiTlsFiles) -> Stamp {
    [file_stamp(&files.cert), file_stamp(&files.key)]
}

fn invalid(p: &Path, what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}: {e}", p.display()))
}

/// Read the certificate chain and key and check that they belong together.
fn load_pair(files: &ApiTlsFiles, provider: &CryptoProvider) -> std::io::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| invalid(&files.cert, "reading certificates", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(&files.cert, "reading certificates", e))?;
    if chain.is_empty() {
        return Err(invalid(&files.cert, "reading certificates", "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| invalid(&files.key, "reading the key", e))?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| invalid(&files.key, "the key", e))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| invalid(&files.key, "does not match the certificate", e))?;
    Ok(Arc::new(pair))
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pair.read().unwrap().0.clone())
    }
}

impl ApiTls {
    /// Load the pair; an error names the file and what is wrong with it.
    pub fn load(files: &ApiTlsFiles) -> std::io::Result<ApiTls> {
        // AES-128-GCM first, and the server's order over the client's: a
        // layer is encrypted once per pull, and AES-128 costs less CPU per
        // byte than AES-256 (ten rounds, not fourteen) at a strength every
        // TLS 1.3 client must offer.
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.sort_by_key(|s| {
            !matches!(
                s.suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            )
        });
        let provider = Arc::new(provider);
        let before = stamp(files);
        let pair = load_pair(files, &provider)?;
        let current =
            Arc::new(Current { files: files.clone(), provider: provider.clone(), pair: RwLock::new((pair, before)) });
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| std::io::Error::other(format!("TLS versions: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.ignore_client_order = true;
        Ok(ApiTls { acceptor: TlsAcceptor::from(Arc::new(server)), current })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Read the files again if they changed since the pair was read.
    /// Returns whether a new pair is served.
    pub fn reload_if_changed(&self) -> bool {
        let c = &self.current;
        let now = stamp(&c.files);
        if c.pair.read().unwrap().1 == now {
            return false;
        }
        match load_pair(&c.files, &c.provider) {
            Ok(pair) => {
                *c.pair.write().unwrap() = (pair, now);
                tracing::info!(cert = %c.files.cert.display(), "API certificate reloaded");
                true
            }
            Err(e) => {
                // A half-written file is read again at the next change;
                // until then the last good pair is served.
                tracing::warn!(error = %e, "API certificate not reloaded; serving the previous one");
                c.pair.write().unwrap().1 = now;
                false
            }
        }
    }

    /// Check the files every [`RELOAD_EVERY`] until `shutdown` fires.
    pub async fn watch(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

/// A TLS client that trusts only the CA certificates in `ca` (PEM), for
/// `berth ping` against a node's own API: the health check of a node that
/// serves TLS verifies the certificate it serves, as a client would.
pub fn client_trusting(ca: &Path) -> std::io::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| invalid(ca, "reading certificates", e))? {
        roots.add(cert.map_err(|e| invalid(ca, "reading certificates", e))?).map_err(|e| invalid(ca, "a CA", e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(ca, "TLS versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
