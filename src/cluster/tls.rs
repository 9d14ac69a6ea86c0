//! Mutual TLS between members: every node presents a certificate signed by
//! the cluster's CA and accepts only peers that do the same, on the cluster
//! listener (Raft, write forwarding, read index, admin, blob transfer) and
//! on every call it makes. The CA is the trust root: a process without a
//! certificate it signed cannot join, vote, replicate, forward or read.
//!
//! Certificates name [`SERVER_NAME`] (peers are reached by whatever address
//! the membership records, so the name, not the address, is checked).
//! `berth certs` ([`generate`]) makes a development CA, one certificate per
//! node and one for the operator's command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use crate::config::TlsFiles;

/// The DNS name every node certificate carries and every client checks.
pub const SERVER_NAME: &str = "berth-node";

/// Loaded TLS settings for both sides of cluster connections: the gRPC
/// services and the blob byte stream share them, so there is one trust
/// root and one place that decides who may connect. TLS 1.3 only. Cheap to
/// clone.
#[derive(Clone)]
pub struct ClusterTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls")
    }
}

fn pem_error(p: &Path, what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}: {e}", p.display()))
}

fn certs(p: &Path) -> std::io::Result<Vec<CertificateDer<'static>>> {
    let found: Vec<_> = CertificateDer::pem_file_iter(p)
        .map_err(|e| pem_error(p, "reading certificates", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(p, "reading certificates", e))?;
    if found.is_empty() {
        return Err(pem_error(p, "reading certificates", "no certificate in the file"));
    }
    Ok(found)
}

impl ClusterTls {
    pub fn load(files: &TlsFiles) -> std::io::Result<ClusterTls> {
        let invalid =
            |what: &str, e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"));
        // AES-128-GCM first: blob bytes between members are encrypted once
        // per copy, and it costs less CPU per byte than AES-256 (ten rounds,
        // not fourteen) at a strength TLS 1.3 requires every peer to offer.
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&files.ca)? {
            roots.add(ca).map_err(|e| invalid(&format!("{}", files.ca.display()), e))?;
        }
        let roots = Arc::new(roots);
        let chain = certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, "reading the key", e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("cluster CA: {e}")))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("TLS versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid("node certificate", e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("TLS versions", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid("node certificate", e))?;
        Ok(ClusterTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Server side: accepts only clients whose certificate the cluster CA
    /// signed.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Client side: presents this node's certificate and accepts only a
    /// server whose certificate the cluster CA signed for [`SERVER_NAME`].
    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    /// The name every server certificate must carry.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
    }
}

/// Write a new CA, a certificate for each of `nodes` and one for the
/// operator (`admin`) into `dir`: `ca.pem`, `ca.key`, `node<N>.pem`,
/// `node<N>.key`, `admin.pem`, `admin.key`. Keys are readable by their
/// owner only. Existing files are not overwritten.
pub fn generate(dir: &Path, nodes: &[u64]) -> anyhow::Result<Vec<PathBuf>> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "berth cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: &str, secret: bool| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        written.push(path);
        Ok(())
    };
    write("ca.pem", &ca.pem(), false)?;
    write("ca.key", &ca_key.serialize_pem(), true)?;
    let names = nodes
        .iter()
        .map(|n| (format!("node{n}"), format!("berth node {n}")))
        .chain([("admin".to_string(), "berth operator".to_string())]);
    for (file, common_name) in names {
        let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        write(&format!("{file}.pem"), &cert.pem(), false)?;
        write(&format!("{file}.key"), &key.serialize_pem(), true)?;
    }
    Ok(written)
}
