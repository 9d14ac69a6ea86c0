//! The docker-compose cluster end to end (docker/e2e.sh): images built
//! offline, compose up, docker and skopeo through the load balancer, node
//! and leader kills, join and leave under a push, down and up again.
//! docker/e2e-tls.sh: the same cluster with TLS and users, both ways.
//! Runs whenever a Docker engine and docker-compose are present, and says
//! loudly when it is skipped.

mod common;

use std::process::Command;

/// One compose cluster at a time: two at once on a small machine would
/// only race each other's health deadlines.
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs a compose end-to-end script with the berth binary under test and a
/// free host port; `Some(stdout)` when it ran, `None` when skipped.
fn run_script(script: &str, args: &[&str], passed: &str) -> Option<String> {
    let docker = Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
    let compose = Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success());
    if !docker || !compose {
        common::skipped(&format!("{script}: docker engine answers: {docker}, docker-compose present: {compose}"));
        return None;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let port = common::free_port();
    let out = Command::new("bash")
        .arg(format!("{}/docker/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .env("BERTH_BIN", env!("CARGO_BIN_EXE_berth"))
        .env("BERTH_PORT", port.to_string())
        .env("BERTH_PYTHON", common::python())
        .output()
        .unwrap_or_else(|e| panic!("run docker/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");
    for line in stdout.lines().filter_map(|l| l.split_once("SKIPPED ").map(|(_, why)| why)) {
        common::skipped(&format!("{script}: {line}"));
    }
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(passed), "{script} did not report success");
    Some(stdout)
}

#[test]
fn compose_cluster_end_to_end() {
    run_script("e2e.sh", &[], "e2e: 1 passed, 0 failed");
}

/// docker/e2e-tls.sh: TLS ending at haproxy and TLS ending at the nodes,
/// each with htpasswd users, docker login, skopeo, podman and ORAS with
/// credentials, and a node killed.
#[test]
fn compose_cluster_with_tls_at_the_balancer_and_at_the_nodes() {
    if let Some(out) = run_script("e2e-tls.sh", &["lb", "nodes"], "e2e-tls: 1 passed, 0 failed") {
        for mode in ["[lb] docker login, push, pull: ok", "[nodes] docker login, push, pull: ok"] {
            assert!(out.contains(mode), "missing: {mode}");
        }
    }
}
