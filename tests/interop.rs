//! The interop tier: a client that behaves exactly like Iris's January-2026 client
//! (`tests/interop/driver.py`, with the workspace `tests/interop/workspace/` whose `iris`
//! member provides `iris.cluster.types.Entrypoint`) drives our controller and workers: jobs with
//! an inline bundle (`bundle_blob`) and `replicas = 0`, a bundle without uv.lock whose function
//! needs a dev-group dependency, an actor resolved through the controller's endpoint registry,
//! a WorkerPool-style fan-out over two worker processes sharing one cache directory; and a task
//! sent straight over the worker wire as Iris's controller sends it. The Python side asserts
//! every step; this side starts the cluster and checks what is on disk afterwards.

#[path = "common/cluster.rs"]
mod cluster_common;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_common::*;
use common::*;

fn cache() -> PathBuf {
    PathBuf::from(std::env::var("IRIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/iris-worker".into()))
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The Python stubs of cluster.proto; returns the temp dir and the path of cluster_pb2.py.
fn stubs() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", dir.path().display()))
        .arg(proto.join("iris/cluster.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {}", String::from_utf8_lossy(&out.stderr));
    let file = dir.path().join("iris/cluster_pb2.py");
    (dir, file)
}

/// Worker flags for Python tasks on `cache_dir`, offline, with the interop wheels.
fn python_flags(cache_dir: &Path) -> Vec<String> {
    let python = cache().join("rootfs/python");
    let wheels = cache().join("interop-wheels");
    assert!(wheels.is_dir(), "{} is missing: run scripts/fixtures interop-wheels", wheels.display());
    [
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--python-rootfs",
        python.to_str().unwrap(),
        "--uv-find-links",
        wheels.to_str().unwrap(),
        "--uv-offline",
        "true",
        // The direct test's bundles are zips in a temp dir.
        "--allow-bundle-path",
        std::env::temp_dir().to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs the driver; returns its stdout, or panics with everything it said.
async fn driver(args: &[&str], stubs: &Path, within: Duration, context: impl Fn() -> String) -> String {
    let child = tokio::process::Command::new("python3")
        .arg(interop_dir().join("driver.py"))
        .args(args)
        .env("IRIS_INTEROP_STUBS", stubs)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(within, child)
        .await
        .unwrap_or_else(|_| panic!("the driver took more than {within:?}\n{}", context()))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "driver {args:?} failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    stdout
}

/// Entries of a cache directory (not its dot-files: locks, temp dirs).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| !n.starts_with('.'));
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers (python rootfs and the interop wheels)"]
async fn an_iris_client_runs_jobs_actors_and_a_worker_pool_through_our_controller() {
    let ctl = ControllerProc::start(60.0).await;
    let shared = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let url = ctl.url();
    // Two worker processes on one cache directory, as operators share downloads; no
    // --advertise-host: each registers the address it listens on.
    let mut args: Vec<String> = ["--controller", &url, "--heartbeat-interval", "0.3"].map(String::from).to_vec();
    args.extend(python_flags(shared.path()));
    // One host: its workers share one port lock directory (the test's own, not the host's),
    // or both hand out the same port.
    let port_locks = shared.path().join("port-locks");
    args.extend(["--port-lock-dir".to_string(), port_locks.to_str().unwrap().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Worker::start("interop-a", &args).await;
    let b = Worker::start("interop-b", &args).await;
    ctl.wait_workers(&[&a.name, &b.name]).await;
    let (_stubs_dir, stubs) = stubs();
    let prefix = format!("{TEST_PREFIX}interop-{}", std::process::id());
    let context = || format!("controller:\n{}\nworker a:\n{}\nworker b:\n{}", ctl.logs(), a.logs(), b.logs());
    let out = driver(&["cluster", &url, &prefix], &stubs, Duration::from_secs(900), context).await;
    println!("{out}");
    assert_eq!(out.lines().last(), Some("ok cluster"), "{out}");

    // Both workers ran tasks on the one cache: one bundle, one venv, each made once (by
    // either worker: their misses add up to one; the entries alone would look the same after a
    // second fetch or build).
    assert_eq!(entries(&shared.path().join("bundles")).iter().filter(|n| n.ends_with(".json")).count(), 1);
    let venvs = entries(&shared.path().join("venvs"));
    assert_eq!(venvs.iter().filter(|n| !n.ends_with(".json")).count(), 1, "{venvs:?}");
    for cache in ["bundles", "venvs"] {
        let series = format!("iris_worker_cache_misses_total{{cache=\"{cache}\"}}");
        let (ma, mb) = (metric(&a.addr(), &series), metric(&b.addr(), &series));
        assert_eq!(ma + mb, 1.0, "{cache} made by worker a {ma} times, by worker b {mb} times");
        let hits = format!("iris_worker_cache_hits_total{{cache=\"{cache}\"}}");
        assert!(metric(&a.addr(), &hits) + metric(&b.addr(), &hits) >= 1.0, "{cache}: the other tasks found it");
    }
    // The inline bundle goes once no job needs it.
    let blobs = ctl.state.path().join("bundles");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !entries(&blobs).is_empty() {
        assert!(Instant::now() < deadline, "the bundle stayed: {:?}", entries(&blobs));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers (python rootfs and the interop wheels)"]
async fn an_iris_controllers_run_task_runs_the_workspace_on_a_worker() {
    let own = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let flags = python_flags(own.path());
    let w = Worker::start("interop-direct", &flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let (_stubs_dir, stubs) = stubs();
    let zips = tempfile::Builder::new().prefix("iris-worker-test-bundle-").tempdir().unwrap();
    let prefix = format!("{TEST_PREFIX}interop-{}", std::process::id());
    let out = driver(
        &["worker", &w.addr(), &prefix, zips.path().to_str().unwrap()],
        &stubs,
        Duration::from_secs(600),
        || w.logs(),
    )
    .await;
    println!("{out}");
    assert_eq!(out.lines().last(), Some("ok worker"), "{out}");
}
