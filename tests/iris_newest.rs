//! The newest-Iris interop harness (tests/iris_newest/harness.py) against Iris's own newest
//! worker, the behavioural reference: Iris's controller with its embedded log server on
//! loopback, Iris's worker with its process runtime, driven by Iris's client. This keeps the
//! harness honest before iris-worker is tested with it: every check passes with the reference
//! except the two the reference cannot pass (an exec in the task's environment, an attempt
//! that survives a restart of the worker), which proves those two can fail.
//!
//! No root needed; the venv scripts/setup builds is (the test says so when it is missing).

use std::path::PathBuf;
use std::process::Command;

fn newest_python() -> PathBuf {
    let cache =
        std::env::var_os("IRIS_CACHE_DIR").map_or_else(|| PathBuf::from("/var/cache/iris-worker"), PathBuf::from);
    let python = cache.join("iris-newest-venv/bin/python");
    assert!(
        python.exists(),
        "no newest-Iris venv at {}: run scripts/setup, which installs tests/iris_newest/requirements.txt \
         (marin-iris 0.2.227, finelog 0.2.71) into a Python 3.12 venv there",
        python.display()
    );
    python
}

#[test]
fn harness_checks_against_iris_own_worker() {
    // The harness keeps the controller's and worker's logs when a check fails; here they go
    // with the temp dir (the failure message carries the harness's report).
    let base = tempfile::tempdir().unwrap();
    let out = Command::new(newest_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/iris_newest/harness.py"))
        .arg("run")
        .arg("--base-dir")
        .arg(base.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = || format!("harness output:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v.get("passed").is_some()))
        .unwrap_or_else(|| panic!("no summary line; {}", report()));
    let failed: Vec<&str> = summary["failed"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(failed, ["exec_env", "worker_restart"], "{}", report());
    assert_eq!(summary["passed"], 8, "{}", report());
}
