//! The library's front door: `examples/embed.rs` runs a container task through
//! `Worker::builder(..).build().run(shutdown)` and leaves nothing behind, and the shutdown
//! future stops the server and every background loop while tasks keep running under their
//! supervisors (the next worker on the state directory adopts them).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TEST_PREFIX, cgroups_named, processes_with};
use iris_worker::runtime::RuntimeKind;
use iris_worker::task::{Command, TaskSpec, TaskState};
use iris_worker::{Worker, WorkerConfig};

/// The example's binary. Cargo gives integration tests the path of the package's binaries
/// (`CARGO_BIN_EXE_<name>`) but not of its examples; `cargo test` (and `cargo build
/// --examples`, `clippy --all-targets`) builds them into `examples/` of the profile's target
/// directory, which is the parent of this test's `deps/` directory.
fn example_exe() -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let profile_dir = me.parent().and_then(Path::parent).unwrap();
    let exe = profile_dir.join("examples/embed");
    assert!(
        exe.exists(),
        "{} is not built: `cargo test` builds examples; with a --test filter build it first \
         (cargo build --example embed)",
        exe.display()
    );
    exe
}

/// The example's scratch dirs (below the TMPDIR the test gave it) are cleaned up and removed
/// on drop, also when the example or the test failed half-way.
struct ExampleTmp(tempfile::TempDir);

impl Drop for ExampleTmp {
    fn drop(&mut self) {
        for e in std::fs::read_dir(self.0.path()).into_iter().flatten().flatten() {
            let state = e.path().join("state");
            if state.exists() {
                let _ = iris_worker::task::cleanup(&state, true);
            }
            common::unmount_below(&e.path());
        }
    }
}

#[test]
#[ignore = "root: runs a container task"]
fn the_embed_example_runs_a_container_task_and_leaves_nothing() {
    let tmp = ExampleTmp(tempfile::Builder::new().prefix("iris-worker-test-embed-").tempdir().unwrap());
    let worker_id = format!("{TEST_PREFIX}embed-example-{}", std::process::id());
    let out = std::process::Command::new(example_exe())
        .env("TMPDIR", tmp.0.path())
        .env("IRIS_WORKER_EXE", common::exe())
        .env("IRIS_TEST_ROOTFS", common::rootfs())
        .env("IRIS_EMBED_WORKER_ID", &worker_id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the example failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(stdout.contains("[stdout] hello from embed/task-0"), "the task's log was printed:\n{stdout}");
    assert!(stdout.contains("embed/task-0 ended SUCCEEDED"), "{stdout}");

    // Nothing left: no cgroup of its worker (below this test's own cgroup, where it put
    // them), no process started from its scratch directory, no file in it.
    let cgroups = cgroups_named(&worker_id);
    assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:#?}");
    let tmp_path = tmp.0.path().to_string_lossy().into_owned();
    let procs = processes_with(&tmp_path);
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");
    let files: Vec<_> = std::fs::read_dir(tmp.0.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(files.is_empty(), "files left behind: {files:#?}");
}

/// A standalone worker of this test: its state, caches and port locks in one temp dir, its
/// cgroups below this test's cgroup under an `iwtest-` name.
fn config(scratch: &Path, name: &str) -> WorkerConfig {
    let mut c = WorkerConfig::new(scratch.join("state"));
    c.worker_id = format!("{TEST_PREFIX}{name}-{}", std::process::id());
    c.runtime = RuntimeKind::Container;
    c.rootfs = common::rootfs();
    c.cache_dir = scratch.join("cache");
    c.images.dir = scratch.join("cache/images");
    c.port_lock_dir = scratch.join("port-locks");
    c.supervisor_exe = Some(common::exe().into());
    c
}

/// Removes what the workers of a test left (the task's processes, cgroups, state), also when
/// the test failed half-way.
struct Scratch(tempfile::TempDir);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = iris_worker::task::cleanup(&self.0.path().join("state"), true);
        common::unmount_below(self.0.path());
    }
}

async fn wait_for(manager: &iris_worker::task::TaskManager, task_id: &str, wanted: TaskState) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = manager.status(task_id).map(|v| v.state);
        if state.as_ref().is_ok_and(|s| *s == wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "{task_id} never reached {}: {state:?}", wanted.name());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
#[ignore = "root: runs a container task under its supervisor"]
fn the_shutdown_future_stops_the_server_and_every_loop_while_tasks_keep_running() {
    let scratch = Scratch(tempfile::Builder::new().prefix("iris-worker-test-embed-").tempdir().unwrap());
    // The runtime is dropped before the scratch dir, also when the test fails: the loops a
    // failed shutdown left hold the state directory's lock, which `cleanup` needs.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(shutdown_stops_the_server_and_every_loop(scratch.0.path()));
    drop(runtime);
    drop(scratch);
    let left = cgroups_named(&format!("{TEST_PREFIX}embed-shutdown-{}", std::process::id()));
    assert!(left.is_empty(), "cgroups left behind: {left:#?}");
}

async fn shutdown_stops_the_server_and_every_loop(scratch: &Path) {
    let worker = Worker::builder(config(scratch, "embed-shutdown")).build().await.unwrap();
    let addr = worker.local_addr();
    let manager = worker.manager().clone();
    let loops = manager.background().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    // Serving: the port answers.
    tokio::net::TcpStream::connect(addr).await.expect("the worker listens");

    let task_id = "embed-shutdown/task-0";
    manager
        .run(TaskSpec {
            task_id: task_id.into(),
            job_id: "embed-shutdown".into(),
            num_tasks: 1,
            command: Some(Command { argv: vec!["/bin/sleep".into(), "600".into()], setup_commands: vec![] }),
            ..Default::default()
        })
        .unwrap();
    wait_for(&manager, task_id, TaskState::Running).await;
    assert!(!loops.is_empty(), "the task's driver and the worker's loops run");

    let _ = stop.send(());
    let served = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("run returns soon after the shutdown future resolved");
    served.unwrap().unwrap();
    assert!(loops.is_empty(), "every loop was cancelled and awaited: {} left", loops.len());
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the port accepts no connection after run returned");

    // The task still runs under its supervisor: the next worker on the state directory
    // adopts it RUNNING. Then it is killed and everything removed.
    drop(manager);
    let again = Worker::builder(config(scratch, "embed-shutdown")).build().await.unwrap();
    let manager = again.manager().clone();
    assert_eq!(manager.status(task_id).unwrap().state, TaskState::Running, "adopted, still running");
    manager.kill(task_id, 0).unwrap();
    wait_for(&manager, task_id, TaskState::Killed).await;
    manager.shutdown().await;
}
