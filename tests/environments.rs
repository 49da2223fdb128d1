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
            // The tests' bundles are zips in temp dirs and on loopback http servers.
            "--allow-bundle-path",
            std::env::temp_dir().to_str().unwrap(),
            "--allow-private-bundle-hosts",
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

/// The repr of the object a task pickled, loaded with the host's cloudpickle.
fn unpickle(path: &std::path::Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sys, cloudpickle; print(cloudpickle.load(open(sys.argv[1], 'rb')))")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "unpickling {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
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

    assert_eq!(unpickle(&w.state_dir().join("tasks/py_2ftask-3.0/workdir/_result.pkl")), "{'sum': 42}");

    // Same dependencies: no build, no build output.
    c.run_task(entrypoint_task("py/again", pickle(RETURNS))).await.map(|_| ()).unwrap_or_else(|e| panic!("{e}"));
    let again = wait_end(&mut c, "py/again", BUILD).await;
    assert!(from_cache(&again), "{again:?}");
    let again_logs = all_logs(&mut c, "py/again").await;
    assert!(build_lines(&again_logs).is_empty(), "no new build: {again_logs:#?}");

    // The venv is read-only in its tasks: what they import from it must be bytecode already
    // (cloudpickle, at least, loaded the entrypoint), or every task compiles it again.
    c.run_task(entrypoint_task("py/bytecode", pickle(VENV_MODULES_WITHOUT_BYTECODE)))
        .await
        .map(|_| ())
        .unwrap_or_else(|e| panic!("{e}"));
    let s = wait_end(&mut c, "py/bytecode", BUILD).await;
    let logs = all_logs(&mut c, "py/bytecode").await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}");
    let result = unpickle(&w.state_dir().join("tasks/py_2fbytecode.0/workdir/_result.pkl"));
    let (checked, missing) = result.trim_matches(|c| c == '(' || c == ')').split_once(", ").unwrap();
    assert!(checked.parse::<u32>().unwrap() >= 1, "cloudpickle came from the venv: {result}");
    assert_eq!(missing, "[]", "modules imported from the venv without bytecode: {result}");
}

/// The venv's modules the task imported (cloudpickle among them, to load the entrypoint), and
/// those of them whose bytecode file does not exist.
const VENV_MODULES_WITHOUT_BYTECODE: &str = r#"
def fn():
    import os, sys
    from_venv = [m for m in list(sys.modules.values())
                 if (getattr(m, "__file__", None) or "").startswith("/app/.venv/")
                 and m.__file__.endswith(".py")]
    return (len(from_venv), sorted(m.__name__ for m in from_venv if not os.path.exists(m.__cached__)))
args = ()
kwargs = {}
"#;

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

/// Pickles `expr` (Python, after `source` ran) with the host's cloudpickle; `pythonpath` lets
/// the host import modules the task's venv does not have.
fn pickle_expr(source: &str, expr: &str, pythonpath: Option<&std::path::Path>) -> Vec<u8> {
    let program = format!("import sys, cloudpickle\n{source}\nsys.stdout.buffer.write(cloudpickle.dumps({expr}))\n");
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(program);
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "making the pickle: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// What Iris's client sends: an object with `callable`, `args` and `kwargs` attributes (here
/// a dataclass pickled by value, so the venv needs no `iris` package; the interop tier sends
/// the real `iris.cluster.types.Entrypoint`).
const ENTRYPOINT_OBJECT: &str = r#"
import dataclasses
@dataclasses.dataclass
class Entrypoint:
    callable: object
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
def fn(x, y=1):
    print("object form", x + y)
    return x * y
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn an_entrypoint_object_runs_like_the_tuple_and_loading_failures_name_their_exception() {
    let (w, _cache) = python_worker("entryobj").await;
    let mut c = w.client().await;
    let object = pickle_expr(ENTRYPOINT_OBJECT, "Entrypoint(fn, (6,), {'y': 7})", None);
    c.run_task(entrypoint_task("obj/task-0", object)).await.unwrap();
    let s = wait_end(&mut c, "obj/task-0", BUILD).await;
    let logs = all_logs(&mut c, "obj/task-0").await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}");
    assert!(logs.iter().any(|l| l.source == "stdout" && l.data == "object form 13"), "{logs:#?}");
    assert_eq!(unpickle(&w.state_dir().join("tasks/obj_2ftask-0.0/workdir/_result.pkl")), "42");

    // A pickle that references a module only the client has: the task's error names it.
    let host_only = tempfile::Builder::new().prefix("iris-worker-test-mod-").tempdir().unwrap();
    std::fs::write(host_only.path().join("iwtest_client_only.py"), "def work():\n    return 1\n").unwrap();
    let missing = pickle_expr("import iwtest_client_only", "(iwtest_client_only.work, (), {})", Some(host_only.path()));
    // Half a pickle, as a truncated upload would leave it.
    let whole = pickle(RETURNS);
    let truncated = whole[..whole.len() / 2].to_vec();
    // Neither form: a plain list.
    let wrong = pickle_expr("", "[1, 2]", None);
    let cases = [
        ("load/missing", missing, "ModuleNotFoundError: No module named 'iwtest_client_only'"),
        ("load/truncated", truncated, "loading the entrypoint: "),
        ("load/wrong", wrong, "TypeError: the entrypoint is neither"),
    ];
    for (id, bytes, _) in &cases {
        c.run_task(entrypoint_task(id, bytes.clone())).await.unwrap();
    }
    for (id, _, expected) in cases {
        let s = wait_end(&mut c, id, BUILD).await;
        assert_eq!((state_of(&s), s.exit_code), (TaskState::Failed, 1), "{id}: {s:?}");
        assert!(s.error.contains("loading the entrypoint: "), "{id}: {}", s.error);
        assert!(s.error.contains(expected), "{id}: {}", s.error);
        let stderr: Vec<String> =
            all_logs(&mut c, id).await.into_iter().filter(|l| l.source == "stderr").map(|l| l.data).collect();
        assert!(stderr.iter().any(|l| l.starts_with("Traceback")), "{id}: {stderr:#?}");
    }
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
        if from_cache(&s) {
            assert!(build_lines(&logs).is_empty(), "{logs:#?}");
        } else {
            built += 1;
            assert!(!build_lines(&logs).is_empty());
        }
    }
    assert_eq!(built, 1, "one build for five tasks");
}

/// A zip of a small uv project whose dependency (six) is among the fixture wheels.
fn project_zip(dir: &std::path::Path) -> PathBuf {
    zip_of(dir, "bundle.zip", &[])
}

/// [`project_zip`]'s project with more files.
fn zip_of(dir: &std::path::Path, name: &str, more: &[(&str, &str)]) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    let files = [
        (
            "pyproject.toml",
            "[project]\nname = \"demo\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\ndependencies = [\"six\"]\n",
        ),
        ("demo_pkg/__init__.py", "import six\n\ndef work(n):\n    return n * 2, six.__version__\n"),
    ];
    for (name, content) in files.iter().chain(more) {
        z.start_file(*name, opts).unwrap();
        z.write_all(content.as_bytes()).unwrap();
    }
    z.finish().unwrap();
    path
}

const USES_BUNDLE: &str = r#"
def fn(n):
    import os, demo_pkg
    print("cwd", os.getcwd(), "index", os.environ["IRIS_TASK_INDEX"], "of", os.environ["IRIS_NUM_TASKS"])
    return demo_pkg.work(n)
args = (21,)
kwargs = {}
"#;

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn an_iris_request_over_connect_runs_a_callable_from_a_file_bundle() {
    let (w, _cache) = python_worker("bundle").await;
    let files = tempfile::Builder::new().prefix("iris-worker-test-bundle-").tempdir().unwrap();
    let zip = project_zip(files.path());
    // Exactly the fields an Iris controller sends, over Connect with application/proto.
    let req = worker::RunTaskRequest {
        job_id: "iris-job".into(),
        task_id: "iris-job/task-1".into(),
        task_index: 1,
        num_tasks: 2,
        serialized_entrypoint: pickle(USES_BUNDLE),
        environment: Some(EnvironmentConfig {
            source: Some(iris_worker::proto::environment_config::Source::Workspace("/ignored".into())),
            env_vars: [("GREETING".to_string(), "hi".to_string())].into(),
            ..Default::default()
        }),
        bundle_gcs_path: format!("file://{}", zip.display()),
        resources: Some(iris_worker::proto::ResourceSpecProto { cpu: 1, memory_bytes: 1 << 30, ..Default::default() }),
        ports: vec!["actor".into()],
        attempt_id: 0,
        ..Default::default()
    };
    let connect = iris_worker::rpc::connect::ConnectClient::new(&w.addr());
    let resp: worker::RunTaskResponse =
        connect.call("iris.cluster.WorkerService", "RunTask", &req, Duration::from_secs(5)).await.unwrap();
    assert_eq!(resp.task_id, "iris-job/task-1");
    let mut c = w.client().await;
    let s = wait_end(&mut c, "iris-job/task-1", BUILD).await;
    let logs = all_logs(&mut c, "iris-job/task-1").await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}");
    assert!(logs.iter().any(|l| l.source == "stdout" && l.data == "cwd /app index 1 of 2"), "{logs:#?}");
    assert_eq!(unpickle(&w.state_dir().join("tasks/iris-job_2ftask-1.0/workdir/_result.pkl")), "(42, '1.16.0')");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_bundle_over_http_works_and_a_wrong_sha256_fails_without_caching() {
    use axum::routing::get;
    let (w, cache) = python_worker("http").await;
    let files = tempfile::Builder::new().prefix("iris-worker-test-bundle-").tempdir().unwrap();
    let zip = project_zip(files.path());
    let bytes = std::fs::read(&zip).unwrap();
    let app = axum::Router::new().route("/b/bundle.zip", get(move || async move { bytes.clone() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://127.0.0.1:{port}/b/bundle.zip");
    let mut c = w.client().await;

    let mut bad = entrypoint_task("http/bad", pickle(USES_BUNDLE));
    bad.bundle_gcs_path = url.clone();
    bad.bundle_sha256 = "0".repeat(64);
    c.run_task(bad).await.unwrap();
    let s = wait_end(&mut c, "http/bad", BUILD).await;
    assert_eq!(state_of(&s), TaskState::Failed, "{s:?}");
    assert!(s.error.contains("sha256") && s.error.contains("expected"), "{}", s.error);
    let cached: Vec<_> = std::fs::read_dir(cache.path().join("bundles"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).filter(|n| !n.to_string_lossy().starts_with('.')).collect())
        .unwrap_or_default();
    assert!(cached.is_empty(), "nothing cached: {cached:?}");

    let mut good = entrypoint_task("http/good", pickle(USES_BUNDLE));
    good.bundle_gcs_path = url;
    good.bundle_sha256 = sha256_hex(&zip);
    c.run_task(good).await.unwrap();
    let s = wait_end(&mut c, "http/good", BUILD).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_command_runs_in_its_bundles_environment_and_survives_a_worker_restart() {
    let (mut w, _cache) = python_worker("bundlecmd").await;
    let files = tempfile::Builder::new().prefix("iris-worker-test-bundle-").tempdir().unwrap();
    let zip = project_zip(files.path());
    let mut req =
        task("cmd/task-0", &["python", "-c", "import time, demo_pkg; time.sleep(1.5); print(demo_pkg.work(1))"]);
    req.bundle_gcs_path = format!("file://{}", zip.display());
    let mut c = w.client().await;
    c.run_task(req).await.unwrap();
    wait_for(&mut c, "cmd/task-0", BUILD, |s| state_of(s) == TaskState::Running).await;
    w.kill9();
    w.spawn().await;
    let mut c = w.client().await;
    let s = wait_end(&mut c, "cmd/task-0", BUILD).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    let stdout: Vec<String> =
        all_logs(&mut c, "cmd/task-0").await.into_iter().filter(|l| l.source == "stdout").map(|l| l.data).collect();
    assert_eq!(stdout, ["(2, '1.16.0')"]);
    assert!(!w.logs().contains("holding an adopted task's bundle"), "the adopted task's bundle is held again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_bundles_own_venv_and_git_stay_out_of_the_venv_it_builds() {
    let (w, _cache) = python_worker("dotvenv").await;
    let files = tempfile::Builder::new().prefix("iris-worker-test-bundle-").tempdir().unwrap();
    // A bundle zipped with the client's own venv in it (Iris's client leaves it out, others
    // may not): the build copies the bundle but not that, so the venv has none of it.
    let zip = zip_of(
        files.path(),
        "dotvenv.zip",
        &[(".venv/poison.txt", "from the client's venv"), (".git/HEAD", "ref: refs/heads/main\n")],
    );
    let mut req = task("dotvenv/task-0", &["sh", "-c", "ls -a /app/.venv; python -c 'import demo_pkg'"]);
    req.bundle_gcs_path = format!("file://{}", zip.display());
    let mut c = w.client().await;
    c.run_task(req).await.unwrap();
    let s = wait_end(&mut c, "dotvenv/task-0", BUILD).await;
    let logs = all_logs(&mut c, "dotvenv/task-0").await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}");
    let venv: Vec<&str> = logs.iter().filter(|l| l.source == "stdout").map(|l| l.data.as_str()).collect();
    assert!(venv.contains(&"pyvenv.cfg"), "the task lists its venv: {venv:?}");
    assert!(!venv.contains(&"poison.txt"), "the bundle's .venv stayed out of the venv: {venv:?}");
}

/// A zip of `files` (path in the bundle, content).
fn zip_files(path: &std::path::Path, files: &[(&str, &str)]) -> PathBuf {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, content) in files {
        z.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(content.as_bytes()).unwrap();
    }
    z.finish().unwrap();
    path.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_venv_built_from_a_bundles_code_serves_only_that_bundle_and_registry_venvs_are_shared() {
    // The interop fixture's wheels have a build backend (flit_core) and small packages.
    let wheels = cache().join("interop-wheels");
    assert!(wheels.is_dir(), "{} is missing: run scripts/fixtures interop-wheels", wheels.display());
    let own_cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let python = cache().join("rootfs/python");
    let (cache_dir, python, wheels) =
        (own_cache.path().to_str().unwrap(), python.to_str().unwrap(), wheels.to_str().unwrap());
    let tmp = std::env::temp_dir();
    let w = Worker::start(
        "frombundle",
        &[
            "--cache-dir",
            cache_dir,
            "--python-rootfs",
            python,
            "--uv-find-links",
            wheels,
            "--uv-offline",
            "true",
            // The bundles are zips in a temp dir.
            "--allow-bundle-path",
            tmp.to_str().unwrap(),
        ],
    )
    .await;
    let mut c = w.client().await;
    let files = tempfile::Builder::new().prefix("iris-worker-test-bundle-").tempdir().unwrap();
    let run = async |c: &mut iris_worker::proto::worker_service_client::WorkerServiceClient<_>,
                     id: &str,
                     zip: PathBuf,
                     code: &str| {
        let mut req = task(id, &["python", "-c", code]);
        req.bundle_gcs_path = format!("file://{}", zip.display());
        c.run_task(req).await.unwrap();
        let s = wait_end(c, id, BUILD).await;
        let logs = all_logs(c, id).await;
        assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}");
        let stdout: Vec<String> = logs.into_iter().filter(|l| l.source == "stdout").map(|l| l.data).collect();
        (stdout, from_cache(&s))
    };

    // Two bundles with the same project files: a non-editable path dependency, built by its
    // build backend from code that differs. Each task gets its own bundle's code.
    let root = "[project]\nname = \"app\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\n\
                dependencies = [\"dep\"]\n[tool.uv.sources]\ndep = { path = \"dep\", editable = false }\n";
    let dep = "[build-system]\nrequires = [\"flit_core>=3.2,<5\"]\nbuild-backend = \"flit_core.buildapi\"\n\
               [project]\nname = \"dep\"\nversion = \"0.1.0\"\ndescription = \"d\"\n";
    for who in ["a", "b"] {
        let code = format!("WHO = {who:?}\n");
        let zip = zip_files(
            &files.path().join(format!("{who}.zip")),
            &[("pyproject.toml", root), ("dep/pyproject.toml", dep), ("dep/dep/__init__.py", &code)],
        );
        let (stdout, cached) = run(&mut c, &format!("frombundle/{who}"), zip, "import dep; print(dep.WHO)").await;
        assert_eq!(stdout, [who], "the venv holds this bundle's dep, not another's");
        assert!(!cached, "{who}: a venv built from the bundle is the bundle's own");
    }
    // Registry packages only: bundles that differ elsewhere share one venv.
    let registry = "[project]\nname = \"reg\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\n\
                    dependencies = [\"iniconfig\"]\n";
    let mut cached = Vec::new();
    for n in ["1", "2"] {
        let zip = zip_files(&files.path().join(format!("r{n}.zip")), &[("pyproject.toml", registry), ("n.txt", n)]);
        let (stdout, hit) = run(&mut c, &format!("registry/{n}"), zip, "import iniconfig; print('ok')").await;
        assert_eq!(stdout, ["ok"]);
        cached.push(hit);
    }
    assert_eq!(cached, [false, true], "the second bundle used the first one's venv");
}

/// A child process killed (by its pid) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(args: &[&str], dir: &std::path::Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const HTTPS_INDEX: &str = r#"
import functools, http.server, ssl, sys
root, cert, key, log = sys.argv[1:5]
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        with open(log, "a") as f:
            f.write(self.path + "\n")
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn builds_trust_the_ca_bundle_and_use_the_index_the_operator_gives() {
    use std::io::BufRead;
    // A private package index over https whose certificate comes from a CA of this test's own
    // (as behind a TLS-inspecting proxy): uv in the build container verifies it only when the
    // worker is given that CA (--ca-bundle), and finds it only through --build-env. The proxy
    // the build is given is dead: the index is reached only if the whole NO_PROXY list (a
    // comma-separated value, its index host second) arrives.
    let dir = tempfile::Builder::new().prefix("iris-worker-test-index-").tempdir().unwrap();
    let d = dir.path();
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=iwtest CA",
            "-days",
            "2",
        ],
        d,
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=index"],
        d,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        d,
    );
    // The index: PEP 503 pages for the fixture wheels (six, cloudpickle).
    let files = d.join("root/files");
    std::fs::create_dir_all(&files).unwrap();
    for wheel in std::fs::read_dir(cache().join("wheels")).unwrap().flatten() {
        let name = wheel.file_name().to_string_lossy().into_owned();
        std::fs::copy(wheel.path(), files.join(&name)).unwrap();
        let project = name.split('-').next().unwrap().to_ascii_lowercase().replace('_', "-");
        let page = d.join("root/simple").join(&project);
        std::fs::create_dir_all(&page).unwrap();
        std::fs::write(
            page.join("index.html"),
            format!("<html><body><a href=\"../../files/{name}\">{name}</a></body></html>\n"),
        )
        .unwrap();
    }
    let log = d.join("requests.log");
    let mut server = KillOnDrop(
        Command::new("python3")
            .arg("-c")
            .arg(HTTPS_INDEX)
            .arg(d.join("root"))
            .arg(d.join("srv.pem"))
            .arg(d.join("srv.key"))
            .arg(&log)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut port = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut port).unwrap();
    let index = format!("UV_INDEX_URL=https://127.0.0.1:{}/simple", port.trim());

    let own_cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let python = cache().join("rootfs/python");
    let ca = d.join("ca.pem");
    let w = Worker::start(
        "ca",
        &[
            "--cache-dir",
            own_cache.path().to_str().unwrap(),
            "--python-rootfs",
            python.to_str().unwrap(),
            "--ca-bundle",
            ca.to_str().unwrap(),
            "--build-env",
            &index,
            "--build-env",
            "UV_HTTP_TIMEOUT=60",
            "--build-env",
            &format!("HTTPS_PROXY=http://127.0.0.1:{}", free_port()),
            "--build-env",
            "NO_PROXY=localhost,127.0.0.1",
        ],
    )
    .await;
    let mut c = w.client().await;
    let mut req = entrypoint_task(
        "ca/task-0",
        pickle("def fn():\n    import six\n    print('six', six.__version__)\nargs = ()\nkwargs = {}\n"),
    );
    req.environment = Some(EnvironmentConfig { pip_packages: vec!["six".into()], ..Default::default() });
    c.run_task(req).await.unwrap();
    let s = wait_end(&mut c, "ca/task-0", BUILD).await;
    let logs = all_logs(&mut c, "ca/task-0").await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{logs:#?}\n{}", w.logs());
    assert!(logs.iter().any(|l| l.data == "six 1.16.0"), "{logs:#?}");
    let asked = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(asked.contains("/simple/six/") && asked.contains("/files/six-"), "the build used our index: {asked}");
}

#[test]
fn the_build_env_variable_takes_one_entry_per_line_and_refuses_what_the_worker_sets() {
    // IRIS_WORKER_BUILD_ENV holds one entry per line; a comma stays inside its value. The
    // worker refuses the second entry (it sets UV_OFFLINE itself) before it does anything.
    let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
    let out = Command::new(exe())
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state.path())
        .env("IRIS_WORKER_BUILD_ENV", "NO_PROXY=localhost,10.0.0.0/8\nUV_OFFLINE=1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--build-env UV_OFFLINE: the worker sets it for builds itself (--uv-offline)"), "{stderr}");
}
