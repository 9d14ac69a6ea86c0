//! The docker-compose cluster end to end (docker/e2e.sh): images built
//! offline, compose up, docker and skopeo through the load balancer, node
//! and leader kills, join and leave under a push, down and up again.
//! Runs whenever a Docker engine and docker-compose are present, and says
//! loudly when it is skipped.

mod common;

use std::process::Command;

#[test]
fn compose_cluster_end_to_end() {
    let docker = Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
    let compose = Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success());
    if !docker || !compose {
        eprintln!(
            "SKIPPED: compose end-to-end test: docker engine answers: {docker}, docker-compose present: {compose}"
        );
        return;
    }
    let port = common::free_port();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/e2e.sh"))
        .env("BERTH_BIN", env!("CARGO_BIN_EXE_berth"))
        .env("BERTH_PORT", port.to_string())
        .output()
        .expect("run docker/e2e.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "e2e failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("e2e: 1 passed, 0 failed"));
}
