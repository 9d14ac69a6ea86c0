//! The short fault-injection run CI does (about four minutes, every fault
//! kind at least once, power cuts included) against a fresh docker-compose cluster: it must end
//! with zero violations and a cluster that recovered after every fault.
//! Runs whenever a Docker engine and docker-compose are present, and says
//! loudly when it is skipped.

use std::path::Path;
use std::process::Command;

#[test]
fn short_run_has_no_violations() {
    let docker = Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
    let compose = Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success());
    let iptables =
        Command::new("nsenter").arg("--version").output().is_ok() && Path::new("/usr/sbin/iptables").exists();
    if !docker || !compose || !iptables {
        let why = format!(
            "jepsen-style short run: docker engine answers: {docker}, docker-compose present: {compose}, \
             nsenter and iptables present: {iptables}"
        );
        skipped(&why);
        return;
    }
    let harness = Path::new(env!("CARGO_BIN_EXE_berth-jepsen"));
    let berth = harness.with_file_name("berth");
    assert!(berth.exists(), "build the server first (cargo build --release): no {}", berth.display());
    let out = tempfile_dir();
    let port = 20_000 + std::process::id() % 10_000;
    let mut faults = Vec::new();
    if let Err(why) = powerloss_fs::PowerLossFs::available() {
        skipped(&format!("jepsen-style short run: the power-loss faults ({why})"));
        faults = vec!["--faults".to_string(), NOT_POWER.join(",")];
    }
    let run = Command::new(harness)
        .args(&faults)
        .args(["--duration-secs", "180", "--hold-min-ms", "2000", "--hold-max-ms", "4000"])
        // A fixed seed, so a failure replays; BERTH_JEPSEN_SEED runs another.
        .args(["--seed", &std::env::var("BERTH_JEPSEN_SEED").unwrap_or_else(|_| "1".into())])
        .args(["--port", &port.to_string(), "--berth-bin", &berth.display().to_string()])
        .args(["--out", &out.display().to_string()])
        .output()
        .expect("run berth-jepsen");
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "the short run found violations or did not recover");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json")).unwrap();
    assert_eq!(summary["violations"].as_array().map(Vec::len), Some(0));
    assert_eq!(summary["unrecovered"], 0);
    let faults = summary["faults"].as_object().expect("faults");
    assert!(faults.len() >= 8, "too few fault kinds were injected: {faults:?}");
    assert!(out.join("timeline.svg").exists() && out.join("history.json").exists());
    let _ = std::fs::remove_dir_all(&out);
}

/// Every fault kind but the power cuts.
const NOT_POWER: [&str; 11] = [
    "kill",
    "kill-leader",
    "long-kill",
    "pause",
    "isolate-leader",
    "split",
    "bridge",
    "restart",
    "membership",
    "disk-full",
    "wipe",
];

/// Say loudly that part of the run did not happen; the test command
/// (scripts/test.sh) lists these at the end.
fn skipped(why: &str) {
    eprintln!("SKIPPED: {why}");
    if let Some(path) = std::env::var_os("BERTH_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{why}");
        }
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-jepsen-short-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
