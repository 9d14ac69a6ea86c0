//! Helpers shared by the integration tests: start nodes on ephemeral ports
//! and talk the registry protocol with a real HTTP client.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use berth::config::Config;
use berth::node::RunningNode;
use sha2::{Digest as _, Sha256};

/// Say loudly that part of a test did not run, and why. The test command
/// (scripts/test.sh) collects these through `BERTH_SKIP_LOG` and lists them
/// at the end, so a skip is never hidden in a passing test's captured output.
pub fn skipped(why: &str) {
    eprintln!("SKIPPED: {why}");
    if let Some(path) = std::env::var_os("BERTH_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{why}");
        }
    }
}

/// The Python that has the ORAS SDK: scripts/setup.sh's virtual
/// environment (`BERTH_VENV`, default ~/.cache/berth-venv) when present.
pub fn python() -> String {
    let venv = std::env::var_os("BERTH_VENV")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/berth-venv")));
    venv.map(|v| v.join("bin/python")).filter(|p| p.exists()).map_or("python3".into(), |p| p.display().to_string())
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        http: "127.0.0.1:0".into(),
        grpc: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.raft.heartbeat_ms = 50;
    c.raft.election_min_ms = 200;
    c.raft.election_max_ms = 400;
    c
}

pub struct TestNode {
    pub node: RunningNode,
    pub base: String,
    pub dir: tempfile::TempDir,
}

pub async fn start_node() -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let node = RunningNode::start(test_config(dir.path())).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    TestNode { node, base, dir }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Assert a spec error response: status and code.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) {
    assert_eq!(resp.status().as_u16(), status, "unexpected status for {}", resp.url());
    let body: serde_json::Value = resp.json().await.expect("error body is JSON");
    assert_eq!(body["errors"][0]["code"], code, "body: {body}");
}

/// Push a blob monolithically; returns its digest.
pub async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    try_push_blob(c, base, repo, data).await.expect("push blob")
}

/// Push a blob monolithically; Ok(digest) only on 201 (for tests where a
/// refusal or a dead node is expected now and then).
pub async fn try_push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> Result<String, String> {
    let d = sha256(data);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() == 201 {
        Ok(d)
    } else {
        Err(format!("push blob: {}", r.status()))
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An image manifest over `config` and `layers` (digest, size) pairs.
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)], extra: &str) -> Vec<u8> {
    let layers: Vec<String> = layers
        .iter()
        .map(|(d, s)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{s}}}"#))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]{extra}}}"#,
        config.0,
        config.1,
        layers.join(",")
    )
    .into_bytes()
}

/// Push a small image (config + one layer) and tag it; returns the manifest
/// digest and bytes.
pub async fn push_image(c: &reqwest::Client, base: &str, repo: &str, tag: &str, seed: &str) -> (String, Vec<u8>) {
    let config = format!(r#"{{"seed":"{seed}"}}"#).into_bytes();
    let layer = format!("layer-{seed}").repeat(100).into_bytes();
    let cd = push_blob(c, base, repo, &config).await;
    let ld = push_blob(c, base, repo, &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
    put_manifest(c, base, repo, tag, &m).await;
    (sha256(&m), m)
}

/// PUT an OCI image manifest and assert it is accepted.
pub async fn put_manifest(c: &reqwest::Client, base: &str, repo: &str, reference: &str, m: &[u8]) {
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", OCI_MANIFEST)
        .body(m.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "push manifest: {:?}", r.text().await);
}

/// Poll `f` until it returns true or the deadline passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Every file under `dir`, relative, sorted: to show nothing was stored.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// This test process's cluster CA with certificates for nodes 1 to 9 and
/// for the operator, made once (see `berth certs`).
pub fn certs() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        berth::cluster::tls::generate(dir.path(), &(1..=9).collect::<Vec<_>>()).unwrap();
        dir
    })
    .path()
}

/// How test nodes talk to each other, from `BERTH_TEST_CLUSTER_TLS`: `on`
/// (the default: mutual TLS with [`certs`]), `insecure` (plain text,
/// `insecure_cluster = true`), or `off` (neither key written: for a
/// benchmark against a build that predates them).
fn cluster_tls_mode() -> String {
    std::env::var("BERTH_TEST_CLUSTER_TLS").unwrap_or_else(|_| "on".into())
}

/// The operator's TLS settings for talking to test nodes (None when the
/// nodes talk plain text).
pub fn admin_tls() -> Option<berth::cluster::tls::ClusterTls> {
    let files = berth::cluster::tls::TlsFiles::admin_in(certs());
    (cluster_tls_mode() == "on").then(|| berth::cluster::tls::ClusterTls::load(&files).unwrap())
}

/// `berth serve` flags for a node configured by flags alone, in the
/// harness's cluster TLS mode.
pub fn cluster_tls_flags() -> Vec<String> {
    match cluster_tls_mode().as_str() {
        "on" => vec!["--cluster-tls-dir".into(), certs().display().to_string()],
        "insecure" => vec!["--insecure-cluster".into()],
        _ => Vec::new(),
    }
}

/// `berth serve` flags for a fresh node `id` on loopback ports `http` and
/// `grpc`, data in `data`, joining the cluster through the member at
/// `via` (flags alone, in the harness's cluster TLS mode).
pub fn join_flags(id: u64, http: u16, grpc: u16, data: &Path, via: &str) -> Vec<String> {
    let mut args = cluster_tls_flags();
    args.extend(
        [
            "--node-id",
            &id.to_string(),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--grpc",
            &format!("127.0.0.1:{grpc}"),
            "--data-dir",
            &data.display().to_string(),
            "--join",
            via,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

/// A command-line client of the test node at `grpc`.
pub fn admin(grpc: &str) -> berth::cluster::ClusterAdmin {
    berth::cluster::ClusterAdmin::new(grpc, admin_tls())
}

/// Write a node's TOML config at `path` (its id, loopback addresses and
/// data dir, then `rest`: more settings and tables, and the cluster TLS
/// table) and return the `berth serve` arguments that start it.
pub fn write_config(path: &Path, id: u64, http: u16, grpc: u16, data: &Path, rest: &str) -> Vec<String> {
    let tls = match cluster_tls_mode().as_str() {
        "on" => {
            let f = berth::cluster::tls::TlsFiles::node_in(certs(), id);
            format!(
                "\n[cluster_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        }
        _ => String::new(),
    };
    let insecure = if cluster_tls_mode() == "insecure" { "insecure_cluster = true\n" } else { "" };
    let cfg = format!(
        "node_id = {id}\nhttp = \"127.0.0.1:{http}\"\ngrpc = \"127.0.0.1:{grpc}\"\ndata_dir = \"{}\"\n{insecure}{rest}{tls}",
        data.display()
    );
    std::fs::write(path, cfg).unwrap();
    vec!["--config".to_string(), path.display().to_string()]
}

/// PUT manifest `m` as `repo:tag`; a connection that fails counts as 503.
pub async fn tag(c: &reqwest::Client, base: &str, repo: &str, tag: &str, m: &[u8]) -> reqwest::StatusCode {
    c.put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("Content-Type", OCI_MANIFEST)
        .body(m.to_vec())
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(reqwest::StatusCode::SERVICE_UNAVAILABLE)
}

/// A `berth serve` child process, killed (SIGKILL) when dropped. Its log
/// goes to a file, and if the test is failing when the node is dropped,
/// the node's last warnings and errors are printed with the failure.
pub struct Proc(pub std::process::Child, pub Option<std::path::PathBuf>);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let Some(log) = self.1.take() else { return };
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // Peers being down is what most tests do on purpose: skip that.
            let noise = |l: &str| l.contains("Unreachable node") || l.contains("Timeout expired");
            let notable: Vec<&str> =
                text.lines().filter(|l| (l.contains(" WARN ") || l.contains("ERROR")) && !noise(l)).collect();
            eprintln!("--- last warnings and errors of berth pid {} ({} in all):", self.0.id(), notable.len());
            for l in &notable[notable.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_file(&log);
    }
}

/// A free port below the kernel's ephemeral range (32768 and up), so an
/// outgoing connection cannot take it between this check and the node's
/// bind. Distinct within the process; spread across processes by pid.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 60) as u16 * 200;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 200;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The `berth` binary: this build's, or `BERTH_BIN` (a benchmark against
/// another build). Its `berth cluster` commands use the test CA.
pub fn berth() -> std::process::Command {
    let bin = std::env::var_os("BERTH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_berth").into());
    let mut cmd = std::process::Command::new(bin);
    if cluster_tls_mode() == "on" {
        cmd.env("BERTH_CLUSTER_TLS_DIR", certs());
    }
    cmd
}

/// Start `berth serve` with `args` and wait until its API answers.
pub async fn spawn_serve(args: &[String], http: u16) -> Proc {
    // BERTH_TEST_LOGS=1 shows every node's log as it runs.
    let (stderr, log) = if std::env::var("BERTH_TEST_LOGS").is_ok() {
        (std::process::Stdio::inherit(), None)
    } else {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("berth-test-{}-{seq}.log", std::process::id()));
        (std::fs::File::create(&path).expect("node log file").into(), Some(path))
    };
    let child = berth()
        .arg("serve")
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start berth");
    let proc = Proc(child, log);
    let url = format!("http://127.0.0.1:{http}/v2/");
    wait_for("node to answer", Duration::from_secs(60), || {
        let url = url.clone();
        async move { reqwest::get(&url).await.is_ok() }
    })
    .await;
    proc
}
pub mod cluster;
pub mod gate;

/// A CA and a server certificate for `localhost` and 127.0.0.1, signed by
/// it, written into `dir` as `ca.pem`, `api.pem`, `api.key`.
pub fn api_certs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "berth test API CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let (c, a, k) = (dir.join("ca.pem"), dir.join("api.pem"), dir.join("api.key"));
    std::fs::write(&c, ca.pem()).unwrap();
    // Written under other names and renamed, so a node reloading them
    // never reads half a file.
    std::fs::write(dir.join(".api.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join(".api.key"), key.serialize_pem()).unwrap();
    std::fs::rename(dir.join(".api.key"), &k).unwrap();
    std::fs::rename(dir.join(".api.pem"), &a).unwrap();
    (c, a, k)
}

/// An HTTP client that trusts only the CA at `ca`.
pub fn tls_client(ca: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .use_rustls_tls()
        .build()
        .unwrap()
}

/// Config lines for a node serving TLS (certificates made under `dir`) with
/// one htpasswd user, `user`, who may pull, push and delete everywhere; and
/// the CA a client must trust.
pub fn tls_auth_settings(dir: &Path, user: &str, password: &str) -> (String, std::path::PathBuf) {
    let (ca, cert, key) = api_certs(&dir.join("tls"));
    let htpasswd = dir.join("htpasswd");
    // The default cost, as a real htpasswd file has: berth remembers a
    // checked password, so it is paid once.
    std::fs::write(&htpasswd, format!("{user}:{}\n", bcrypt::hash(password, bcrypt::DEFAULT_COST).unwrap())).unwrap();
    let rest = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nhtpasswd = \"{}\"\n[[access]]\nrepos = \"**\"\n\
         pull = [\"{user}\"]\npush = [\"{user}\"]\ndelete = [\"{user}\"]\n",
        cert.display(),
        key.display(),
        htpasswd.display()
    );
    (rest, ca)
}

/// A client that trusts only `ca` and sends `user`'s credentials with
/// every request.
pub fn tls_client_as(ca: &Path, user: &str, password: &str, builder: reqwest::ClientBuilder) -> reqwest::Client {
    use base64::Engine;
    let mut headers = reqwest::header::HeaderMap::new();
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
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

/// The value of an unlabelled metric on node `base`.
pub async fn metric(c: &reqwest::Client, base: &str, name: &str) -> Option<u64> {
    let text = c.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}
