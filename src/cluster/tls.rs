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

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use crate::config::TlsFiles;

/// The DNS name every node certificate carries and every client checks.
pub const SERVER_NAME: &str = "berth-node";

/// Loaded TLS settings for both sides of cluster calls. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    server: ServerTlsConfig,
    client: ClientTlsConfig,
}

fn read(p: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))
}

impl ClusterTls {
    pub fn load(files: &TlsFiles) -> std::io::Result<ClusterTls> {
        let ca = Certificate::from_pem(read(&files.ca)?);
        let me = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
        Ok(ClusterTls {
            server: ServerTlsConfig::new().identity(me.clone()).client_ca_root(ca.clone()),
            client: ClientTlsConfig::new().ca_certificate(ca).identity(me).domain_name(SERVER_NAME),
        })
    }

    pub fn server(&self) -> ServerTlsConfig {
        self.server.clone()
    }

    pub fn client(&self) -> ClientTlsConfig {
        self.client.clone()
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
