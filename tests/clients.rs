//! Real clients against a real `berth serve` process: the Docker engine
//! pushes and pulls an image it built, skopeo copies a multi-layer image out
//! of berth and back in, buildah builds an image that podman pushes and
//! pulls, and ORAS pushes an artifact with a signature that the referrers API
//! finds. Skipped, loudly, where a client is missing.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn available(cmd: &str, probe: &[&str]) -> bool {
    Command::new(cmd).args(probe).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

async fn start_berth() -> (Proc, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (port, grpc) = (free_port(), free_port());
    let args: Vec<String> =
        ["--http", &format!("127.0.0.1:{port}"), "--grpc", &format!("127.0.0.1:{grpc}"), "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.path().display().to_string()])
            .collect();
    (spawn_serve(&args, port).await, format!("127.0.0.1:{port}"), dir)
}

/// Removes the test's images from the Docker engine even when the test fails.
struct DockerImages(Vec<String>);

impl Drop for DockerImages {
    fn drop(&mut self) {
        for i in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

#[tokio::test]
async fn docker_and_skopeo_round_trip() {
    let docker = available("docker", &["info"]);
    let skopeo = available("skopeo", &["--version"]);
    if !docker {
        skipped("docker push/pull: no Docker engine answers `docker info` here");
    }
    if !skopeo {
        skipped("skopeo copy: skopeo is not installed (scripts/setup.sh installs it)");
    }
    if !docker && !skopeo {
        return;
    }
    let (_node, addr, _dir) = start_berth().await;
    let unique = format!("{:x}", rand::random::<u32>());

    // Seed berth with a three-layer image, built by docker when present,
    // else pushed over the API.
    let image = format!("{addr}/clients/app:{unique}");
    let mut cleanup = DockerImages(vec![image.clone()]);
    if docker {
        let ctx = tempfile::tempdir().unwrap();
        for (name, size) in [("a", 300_000), ("b", 70_000), ("c", 5)] {
            let data: Vec<u8> = (0..size).map(|i| ((i * 31) % 251) as u8).collect();
            std::fs::write(ctx.path().join(name), data).unwrap();
        }
        std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY a /a\nCOPY b /b\nCOPY c /c\n").unwrap();
        let out = Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &image])
            .arg(ctx.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker build: {}", String::from_utf8_lossy(&out.stderr));
        let id_before = run("docker", &["inspect", "--format", "{{.Id}}", &image]).stdout;
        run("docker", &["push", &image]);
        run("docker", &["rmi", "-f", &image]);
        run("docker", &["pull", &image]);
        let id_after = run("docker", &["inspect", "--format", "{{.Id}}", &image]).stdout;
        assert_eq!(id_before, id_after, "image id changed through push and pull");
        let layers = run("docker", &["inspect", "--format", "{{len .RootFS.Layers}}", &image]).stdout;
        assert_eq!(String::from_utf8_lossy(&layers).trim(), "3");
    } else {
        let c = client();
        push_image(&c, &format!("http://{addr}"), "clients/app", &unique, "skopeo-seed").await;
    }

    if skopeo {
        let layout = tempfile::tempdir().unwrap();
        let oci = format!("oci:{}:copy", layout.path().display());
        let src = format!("docker://{image}");
        run("skopeo", &["copy", "--src-tls-verify=false", &src, &oci]);
        let back = format!("docker://{addr}/clients/copied:{unique}");
        run("skopeo", &["copy", "--dest-tls-verify=false", &oci, &back]);
        let a = run("skopeo", &["inspect", "--raw", "--tls-verify=false", &src]).stdout;
        let b = run("skopeo", &["inspect", "--raw", "--tls-verify=false", &back]).stdout;
        let layers = |raw: &[u8]| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_slice(raw).unwrap();
            v["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect()
        };
        assert_eq!(layers(&a), layers(&b), "layers differ after skopeo round trip");
        assert!(!layers(&a).is_empty());
        // And out again into a fresh layout, every blob verified by skopeo.
        let again = tempfile::tempdir().unwrap();
        run("skopeo", &["copy", "--src-tls-verify=false", &back, &format!("oci:{}:x", again.path().display())]);
    }
    cleanup.0.push(format!("{addr}/clients/copied:{unique}"));
}

#[tokio::test]
async fn buildah_and_podman_round_trip() {
    if !available("podman", &["--version"]) || !available("buildah", &["--version"]) {
        skipped("podman/buildah: not installed (scripts/setup.sh installs them)");
        return;
    }
    let (_node, addr, _dir) = start_berth().await;
    // Own image storage (vfs works without privileges or overlay support),
    // so the test neither sees nor leaves images in the machine's store.
    let store = tempfile::tempdir().unwrap();
    let root = store.path().join("root").display().to_string();
    let runroot = store.path().join("run").display().to_string();
    let global = ["--root", root.as_str(), "--runroot", runroot.as_str(), "--storage-driver", "vfs"];
    let with = |args: &[&str]| -> Vec<String> { global.iter().chain(args).map(|s| s.to_string()).collect() };
    let tool = |cmd: &str, args: &[&str]| {
        let args = with(args);
        run(cmd, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let ctx = tempfile::tempdir().unwrap();
    for (name, size) in [("a", 200_000), ("b", 3)] {
        let data: Vec<u8> = (0..size).map(|i| ((i * 7) % 253) as u8).collect();
        std::fs::write(ctx.path().join(name), data).unwrap();
    }
    std::fs::write(ctx.path().join("Containerfile"), "FROM scratch\nCOPY a /a\nCOPY b /b\n").unwrap();
    let image = format!("{addr}/clients/pod:{:x}", rand::random::<u32>());
    let ctx_path = ctx.path().display().to_string();
    tool("buildah", &["bud", "-q", "--layers", "-t", &image, &ctx_path]);
    let id = |out: Output| String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let before = id(tool("podman", &["image", "inspect", "--format", "{{.Id}}", &image]));
    tool("podman", &["push", "--tls-verify=false", &image]);
    tool("podman", &["rmi", "-f", &image]);
    tool("podman", &["pull", "-q", "--tls-verify=false", &image]);
    let after = id(tool("podman", &["image", "inspect", "--format", "{{.Id}}", &image]));
    assert_eq!(before, after, "image id changed through push and pull");
    let layers = id(tool("podman", &["image", "inspect", "--format", "{{len .RootFS.Layers}}", &image]));
    assert_eq!(layers, "2");
}

#[tokio::test]
async fn oras_artifact_with_a_referrer() {
    if !available(&python(), &["-c", "import oras.client"]) {
        skipped("oras: the oras Python SDK is not installed (scripts/setup.sh installs it)");
        return;
    }
    let (_node, addr, _dir) = start_berth().await;
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oras_round_trip.py");
    let out = run(&python(), &[script, &addr, &work.path().display().to_string()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

/// A node serving TLS (a CA of the test's own, for `localhost`) with one
/// htpasswd user, alice, who may pull, push and delete everywhere.
async fn start_secure_berth() -> (Proc, String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (rest, ca) = tls_auth_settings(dir.path(), "alice", "alice-pw");
    let (http, grpc) = (free_port(), free_port());
    let args = write_config(&dir.path().join("berth.toml"), 1, http, grpc, &dir.path().join("data"), &rest);
    let child = berth().arg("serve").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let node = Proc(child, None);
    let addr = format!("localhost:{http}");
    let c = tls_client(&ca);
    wait_for("the TLS node", std::time::Duration::from_secs(60), || {
        let (c, url) = (c.clone(), format!("https://{addr}/v2/"));
        async move { c.get(url).send().await.is_ok() }
    })
    .await;
    (node, addr, ca, dir)
}

/// podman (its own storage, the test CA in a cert dir) and ORAS (HTTPS,
/// the CA as requests' bundle) against a TLS node with users: refused
/// without credentials, every step done with them.
#[tokio::test]
async fn podman_and_oras_with_credentials_over_tls() {
    let podman = available("podman", &["--version"]) && available("buildah", &["--version"]);
    let oras = available(&python(), &["-c", "import oras.client"]);
    if !podman {
        skipped("podman with credentials: podman/buildah not installed (scripts/setup.sh installs them)");
    }
    if !oras {
        skipped("oras with credentials: the oras Python SDK is not installed (scripts/setup.sh installs it)");
    }
    if !podman && !oras {
        return;
    }
    let (_node, addr, ca, _dir) = start_secure_berth().await;
    if podman {
        let store = tempfile::tempdir().unwrap();
        let cert_dir = store.path().join("certs");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::copy(&ca, cert_dir.join("ca.crt")).unwrap();
        let cd = cert_dir.display().to_string();
        let root = store.path().join("root").display().to_string();
        let runroot = store.path().join("run").display().to_string();
        let auth_file = store.path().join("auth.json").display().to_string();
        let global = ["--root", root.as_str(), "--runroot", runroot.as_str(), "--storage-driver", "vfs"];
        let cmd = |tool: &str, args: &[&str]| {
            let mut c = Command::new(tool);
            c.env("REGISTRY_AUTH_FILE", &auth_file).args(global).args(args);
            c
        };
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("a"), b"podman with credentials").unwrap();
        std::fs::write(ctx.path().join("Containerfile"), "FROM scratch\nCOPY a /a\n").unwrap();
        let image = format!("{addr}/secure/pod:{:x}", rand::random::<u32>());
        let ok = |mut c: Command, what: &str| {
            let out = c.output().unwrap();
            assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            out
        };
        ok(cmd("buildah", &["bud", "-q", "-t", &image, &ctx.path().display().to_string()]), "buildah bud");
        let id = |out: Output| String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let before = id(ok(cmd("podman", &["image", "inspect", "--format", "{{.Id}}", &image]), "inspect"));
        let out = cmd("podman", &["push", "--cert-dir", &cd, &image]).output().unwrap();
        assert!(!out.status.success(), "podman push without credentials must be refused");
        let mut login = cmd("podman", &["login", "--cert-dir", &cd, "-u", "alice", "--password-stdin", &addr]);
        let mut child = login.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"alice-pw").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "podman login: {}", String::from_utf8_lossy(&out.stderr));
        ok(cmd("podman", &["push", "--cert-dir", &cd, &image]), "podman push");
        ok(cmd("podman", &["rmi", "-f", &image]), "podman rmi");
        ok(cmd("podman", &["pull", "-q", "--cert-dir", &cd, &image]), "podman pull");
        let after = id(ok(cmd("podman", &["image", "inspect", "--format", "{{.Id}}", &image]), "inspect"));
        assert_eq!(before, after, "image id changed through push and pull");
    }
    if oras {
        let work = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oras_round_trip.py");
        let out = Command::new(python())
            .args([script, &addr, &work.path().display().to_string()])
            .env("ORAS_USER", "alice")
            .env("ORAS_PASSWORD", "alice-pw")
            .env("REQUESTS_CA_BUNDLE", &ca)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "oras: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("logged in") && stdout.contains(": ok"), "{stdout}");
    }
}

/// Removes a directory (the Docker engine's trust of a test CA) on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `docker login`, push and pull on a TLS node with htpasswd users, the
/// engine trusting the test's own CA; skopeo with credentials and the CA.
#[tokio::test]
async fn docker_login_and_skopeo_with_credentials_over_tls() {
    let docker = available("docker", &["info"]);
    let skopeo = available("skopeo", &["--version"]);
    if !docker && !skopeo {
        skipped("docker login and skopeo over TLS: neither docker nor skopeo is here");
        return;
    }
    let (_node, addr, ca, _dir) = start_secure_berth().await;
    let unique = format!("{:x}", rand::random::<u32>());
    let image = format!("{addr}/secure/app:{unique}");

    if docker {
        // The engine trusts the CA for this registry only; logins go to a
        // config dir of the test's own.
        let certs_d = std::path::PathBuf::from(format!("/etc/docker/certs.d/{addr}"));
        std::fs::create_dir_all(&certs_d).unwrap();
        let _trust = RemoveDir(certs_d.clone());
        std::fs::copy(&ca, certs_d.join("ca.crt")).unwrap();
        let config = tempfile::tempdir().unwrap();
        let docker_cmd = |args: &[&str]| {
            let mut c = Command::new("docker");
            c.env("DOCKER_CONFIG", config.path()).args(args);
            c
        };
        let _cleanup = DockerImages(vec![image.clone()]);
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("f"), format!("secure {unique}")).unwrap();
        std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY f /f\n").unwrap();
        let out = docker_cmd(&["build", "-q", "-t", &image]).env("DOCKER_BUILDKIT", "0").arg(ctx.path()).output();
        assert!(out.unwrap().status.success(), "docker build");
        // Without a login the push is refused.
        let out = docker_cmd(&["push", &image]).output().unwrap();
        assert!(!out.status.success(), "push without login must fail");
        // A wrong password is refused by `docker login`.
        let mut wrong =
            docker_cmd(&["login", &addr, "-u", "alice", "--password-stdin"]).stdin(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        wrong.stdin.take().unwrap().write_all(b"not-the-password").unwrap();
        assert!(!wrong.wait().unwrap().success(), "login with a wrong password must fail");
        let mut login = docker_cmd(&["login", &addr, "-u", "alice", "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        login.stdin.take().unwrap().write_all(b"alice-pw").unwrap();
        let out = login.wait_with_output().unwrap();
        assert!(out.status.success(), "docker login: {}", String::from_utf8_lossy(&out.stderr));
        let id_before = docker_cmd(&["inspect", "--format", "{{.Id}}", &image]).output().unwrap().stdout;
        let out = docker_cmd(&["push", &image]).output().unwrap();
        assert!(out.status.success(), "docker push: {}", String::from_utf8_lossy(&out.stderr));
        assert!(docker_cmd(&["rmi", "-f", &image]).output().unwrap().status.success());
        let out = docker_cmd(&["pull", &image]).output().unwrap();
        assert!(out.status.success(), "docker pull: {}", String::from_utf8_lossy(&out.stderr));
        let id_after = docker_cmd(&["inspect", "--format", "{{.Id}}", &image]).output().unwrap().stdout;
        assert_eq!(id_before, id_after);
    } else {
        skipped("docker login: no Docker engine answers `docker info` here");
        let alice = tls_client_as(&ca, "alice", "alice-pw", reqwest::Client::builder());
        push_image(&alice, &format!("https://{addr}"), "secure/app", &unique, "no-docker").await;
    }

    if skopeo {
        let cert_dir = tempfile::tempdir().unwrap();
        std::fs::copy(&ca, cert_dir.path().join("ca.crt")).unwrap();
        let cd = cert_dir.path().display().to_string();
        let layout = tempfile::tempdir().unwrap();
        let oci = format!("oci:{}:copy", layout.path().display());
        let src = format!("docker://{image}");
        // No credentials: refused.
        let out = Command::new("skopeo").args(["copy", "--src-cert-dir", &cd, &src, &oci]).output().unwrap();
        assert!(!out.status.success(), "skopeo without credentials must be refused");
        run("skopeo", &["copy", "--src-cert-dir", &cd, "--src-creds", "alice:alice-pw", &src, &oci]);
        let back = format!("docker://{addr}/secure/copied:{unique}");
        run("skopeo", &["copy", "--dest-cert-dir", &cd, "--dest-creds", "alice:alice-pw", &oci, &back]);
        let raw = run("skopeo", &["inspect", "--raw", "--cert-dir", &cd, "--creds", "alice:alice-pw", &back]).stdout;
        assert!(!raw.is_empty());
    } else {
        skipped("skopeo with credentials: skopeo is not installed");
    }
}
