//! Python tasks: pickled Iris entrypoints run unchanged in the python rootfs with a venv
//! built by uv in a build container, cached and built once. The wheels come from the
//! `scripts/fixtures wheels` directory with uv offline: no network at test time.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use iris_worker::proto::{EnvironmentConfig, TaskStatus, worker};
use iris_worker::task::TaskState;

const BUILD: Duration = Duration::from_secs(180);

fn cache() -> PathBuf {
    PathBuf::from(std::env::var("IRIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/iris-worker".into()))
}

/// A worker whose Python tasks use the fixtures, with a cache of its own (so venvs start cold).
async fn python_worker(name: &str) -> (Worker, tempfile::TempDir) {
    let own_cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let python = cache().join("rootfs/python");
    let wheels = cache().join("wheels");
    let w = Worker::start(
        name,
        &[
            "--cache-dir",
            own_cache.path().to_str().unwrap(),
            "--python-rootfs",
            python.to_str().unwrap(),
            "--uv-find-links",
            wheels.to_str().unwrap(),
            "--uv-offline",
            "true",
        ],
    )
    .await;
    (w, own_cache)
}

/// `cloudpickle.dumps((fn, args, kwargs))` made by real cloudpickle from Python source that
/// defines `fn`, `args` and `kwargs`.
fn pickle(source: &str) -> Vec<u8> {
    let program =
        format!("import sys, cloudpickle\n{source}\nsys.stdout.buffer.write(cloudpickle.dumps((fn, args, kwargs)))\n");
    let out = Command::new("python3").arg("-c").arg(program).output().unwrap();
    assert!(out.status.success(), "making the pickle: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn entrypoint_task(task_id: &str, pickle: Vec<u8>) -> worker::RunTaskRequest {
    let mut req = task(task_id, &[]);
    req.command = None;
    req.serialized_entrypoint = pickle;
    req
}

fn build_lines(logs: &[worker::LogEntry]) -> Vec<&str> {
    logs.iter().filter(|l| l.source == "build").map(|l| l.data.as_str()).collect()
}

fn from_cache(s: &TaskStatus) -> bool {
    s.build_metrics.as_ref().expect("build metrics").from_cache
}

const RETURNS: &str = r#"
def fn(x, y=1):
    import os
    print("hello from index", os.environ["IRIS_TASK_INDEX"], "port", os.environ["IRIS_PORT_HTTP"])
    return {"sum": x + y}
args = (40,)
kwargs = {"y": 2}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_pickled_callable_runs_returns_its_result_and_the_second_task_reuses_the_venv() {
    let (w, _cache) = python_worker("entry").await;
    let mut c = w.client().await;
    let mut req = entrypoint_task("py/task-3", pickle(RETURNS));
    req.task_index = 3;
    req.num_tasks = 4;
    req.ports = vec!["http".into()];
    c.run_task(req).await.unwrap();
    let s = wait_end(&mut c, "py/task-3", BUILD).await;
    let logs = all_logs(&mut c, "py/task-3").await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}\n{}", w.logs());
    let port = s.ports["http"];
    let stdout: Vec<&str> = logs.iter().filter(|l| l.source == "stdout").map(|l| l.data.as_str()).collect();
    assert_eq!(stdout, [format!("hello from index 3 port {port}")]);
    assert!(build_lines(&logs).contains(&"environment ready"), "the build logged: {logs:#?}");
    assert!(!from_cache(&s), "the first task built the venv");
    let metrics = s.build_metrics.clone().unwrap();
    assert!(metrics.build_finished_ms >= metrics.build_started_ms && metrics.image_tag.starts_with("venv:"));

    let result = w.state_dir().join("tasks/py_2ftask-3.0/workdir/_result.pkl");
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sys, cloudpickle; print(cloudpickle.load(open(sys.argv[1], 'rb')))")
        .arg(&result)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{'sum': 42}", "{}", String::from_utf8_lossy(&out.stderr));

    // Same dependencies: no build, no build output.
    c.run_task(entrypoint_task("py/again", pickle(RETURNS))).await.map(|_| ()).unwrap_or_else(|e| panic!("{e}"));
    let again = wait_end(&mut c, "py/again", BUILD).await;
    assert!(from_cache(&again), "{again:?}");
    let again_logs = all_logs(&mut c, "py/again").await;
    assert!(build_lines(&again_logs).is_empty(), "no new build: {again_logs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_callable_that_raises_fails_with_its_exception() {
    let (w, _cache) = python_worker("raises").await;
    let mut c = w.client().await;
    let source = "def fn():\n    raise ValueError('boom from the task')\nargs = ()\nkwargs = {}\n";
    c.run_task(entrypoint_task("raise/task-0", pickle(source))).await.unwrap();
    let s = wait_end(&mut c, "raise/task-0", BUILD).await;
    assert_eq!((state_of(&s), s.exit_code), (TaskState::Failed, 1), "{s:?}");
    assert!(s.error.contains("ValueError: boom from the task"), "{}", s.error);
    let stderr: Vec<String> =
        all_logs(&mut c, "raise/task-0").await.into_iter().filter(|l| l.source == "stderr").map(|l| l.data).collect();
    assert!(stderr.iter().any(|l| l.starts_with("Traceback")), "{stderr:#?}");
    assert!(stderr.iter().any(|l| l.contains("ValueError: boom from the task")), "{stderr:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_failing_build_fails_the_task_with_uvs_error_and_the_worker_stays_healthy() {
    let (w, _cache) = python_worker("badbuild").await;
    let mut c = w.client().await;
    let mut req = entrypoint_task("bad/task-0", pickle(RETURNS));
    req.environment =
        Some(EnvironmentConfig { pip_packages: vec!["no-such-package-iris-test".into()], ..Default::default() });
    c.run_task(req).await.unwrap();
    let s = wait_end(&mut c, "bad/task-0", BUILD).await;
    assert_eq!(state_of(&s), TaskState::Failed, "{s:?}");
    assert!(s.error.contains("building the Python environment failed"), "{}", s.error);
    assert!(s.error.contains("no-such-package-iris-test"), "uv's complaint is in the error: {}", s.error);
    let logs = all_logs(&mut c, "bad/task-0").await;
    assert!(build_lines(&logs).iter().any(|l| l.contains("no-such-package-iris-test")), "{logs:#?}");
    assert!(c.health_check(iris_worker::proto::Empty {}).await.unwrap().into_inner().healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn concurrent_tasks_with_the_same_new_dependencies_build_once() {
    let (w, _cache) = python_worker("once").await;
    let mut c = w.client().await;
    let source = "def fn():\n    import six\n    print('six', six.__version__)\nargs = ()\nkwargs = {}\n";
    let p = pickle(source);
    for i in 0..5 {
        let mut req = entrypoint_task(&format!("once/task-{i}"), p.clone());
        req.environment = Some(EnvironmentConfig { pip_packages: vec!["six".into()], ..Default::default() });
        c.run_task(req).await.unwrap();
    }
    let mut built = 0;
    for i in 0..5 {
        let id = format!("once/task-{i}");
        let s = wait_end(&mut c, &id, BUILD).await;
        assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
        let logs = all_logs(&mut c, &id).await;
        assert!(logs.iter().any(|l| l.data == "six 1.16.0"), "{logs:#?}");
        if !from_cache(&s) {
            built += 1;
            assert!(!build_lines(&logs).is_empty());
        } else {
            assert!(build_lines(&logs).is_empty(), "{logs:#?}");
        }
    }
    assert_eq!(built, 1, "one build for five tasks");
}
