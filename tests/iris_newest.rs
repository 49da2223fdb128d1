//! The newest-Iris interop harness (tests/iris_newest/harness.py) against Iris's own newest
//! worker, the behavioural reference: Iris's controller with its embedded log server on
//! loopback, Iris's worker with its process runtime, driven by Iris's client. This keeps the
//! harness honest before iris-worker is tested with it: every check passes with the reference
//! except the two the reference cannot pass (an exec in the task's environment, an attempt
//! that survives a restart of the worker), which proves those two can fail.
//!
//! The same harness against iris-worker (`harness_checks_against_iris_worker`): the checks it
//! passes are named in SERVED, those it does not serve yet in NOT_YET, with why.
//!
//! The reference needs no root; iris-worker does (containers). The venv scripts/setup builds is
//! needed (the test says so when it is missing).

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::path::PathBuf;
use std::process::Command;

use common::listening_ports; // the registry helper finds its port with it
use registry::{ImageStore, Registry};

/// A port free now, above the default task port range (30000-39999): a worker refuses a
/// --port-range holding its own port.
fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port >= 40_000 {
            return port;
        }
    }
}

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

/// What one `harness.py run` printed: each check's result (name → ok, detail), the summary's
/// failed list, and the whole output for failure messages.
struct HarnessRun {
    checks: Vec<(String, bool, String)>,
    failed: Vec<String>,
    report: String,
}

fn run_harness(extra: &[&str]) -> HarnessRun {
    // The harness keeps the controller's and worker's logs when a check fails; here they go
    // with the temp dir (the failure message carries the harness's report).
    let base = tempfile::tempdir().unwrap();
    let out = Command::new(newest_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/iris_newest/harness.py"))
        .arg("run")
        .arg("--base-dir")
        .arg(base.path())
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!("harness output:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let summary =
        lines.iter().rev().find(|v| v.get("passed").is_some()).unwrap_or_else(|| panic!("no summary line; {report}"));
    let failed = summary["failed"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let checks = lines
        .iter()
        .filter_map(|v| {
            Some((v["check"].as_str()?.to_string(), v["ok"].as_bool()?, v["detail"].as_str().unwrap_or("").to_string()))
        })
        .collect();
    HarnessRun { checks, failed, report }
}

#[test]
fn harness_checks_against_iris_own_worker() {
    let run = run_harness(&[]);
    assert_eq!(run.failed, ["exec_env", "worker_restart"], "{}", run.report);
    assert_eq!(run.checks.iter().filter(|c| c.1).count(), 10, "{}", run.report);
}

/// The checks iris-worker passes against Iris's newest controller, started with nothing but
/// `serve --controller --worker-id --listen --state-dir` (it finds the wire generation itself)
/// and, as a cluster configures its workers, a default task image: the client's Python (3.12)
/// with cloudpickle, as Iris's task image has them (the `python312` test image), pulled from a
/// registry.
const SERVED: [&str; 12] = [
    "callable",
    "echo_logs",
    "exit_code",
    "cancel",
    "replicas",
    "workspace_bundle",
    "large_workdir_file",
    "worker_restart",
    "process_status",
    "exec",
    "exec_env",
    "worker_log",
];
/// Not served yet, each for a reason (docs/ARCHITECTURE.md, "Wire generations"): none.
const NOT_YET: [&str; 0] = [];

#[test]
#[ignore = "root: iris-worker runs the harness's tasks in containers with cgroups"]
fn harness_checks_against_iris_worker() {
    let exe = env!("CARGO_BIN_EXE_iris-worker");
    // The port: above the default task port range, which a worker refuses to overlap.
    let port = free_port();
    let reg = Registry::start();
    let image = reg.push("python312", "iris-task");
    let store = ImageStore::new("harness-images");
    let worker = format!(
        "{exe} serve --controller {{controller}} --worker-id {{worker_id}} --listen 127.0.0.1:{port} \
         --state-dir {{state_dir}} --default-task-image {image} --insecure-registry {} --image-dir {}",
        reg.host(),
        store.0.display()
    );
    // Whatever the checks leave (a task a failed check did not end) goes with the worker;
    // its directories go with the temp dir.
    let cleanup = format!("{exe} cleanup --state-dir {{state_dir}}");
    // The suite's leftover check looks for the iwtest- prefix (cgroups are named by worker id).
    let worker_id = format!("iwtest-harness-{}", std::process::id());
    let run = run_harness(&["--worker-id", &worker_id, "--worker-cmd", &worker, "--worker-cleanup-cmd", &cleanup]);
    for name in SERVED {
        let check = run.checks.iter().find(|c| c.0 == name);
        assert!(
            matches!(check, Some((_, true, _))),
            "check {name} should pass against iris-worker: {check:?}\n{}",
            run.report
        );
    }
    assert_eq!(
        run.failed, NOT_YET,
        "the checks not served yet (a newly passing one belongs in SERVED)\n{}",
        run.report
    );
}

/// Iris's controller (the harness's, null-auth on loopback, its embedded log server) as a child
/// process, killed by its pid when dropped.
struct IrisController {
    child: std::process::Child,
    url: String,
    _state: tempfile::TempDir,
}

impl IrisController {
    fn start() -> IrisController {
        use std::io::BufRead;
        let state = tempfile::Builder::new().prefix("iris-worker-test-controller-").tempdir().unwrap();
        let mut child = Command::new(newest_python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/iris_newest/harness.py"))
            .arg("controller")
            .arg("--state-dir")
            .arg(state.path().join("controller"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(state.path().join("controller.log")).unwrap())
            .spawn()
            .unwrap();
        // Its first line says where it listens (EOF: it died; its log says why).
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["controller"].as_str().map(String::from))
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(state.path().join("controller.log")).unwrap_or_default();
                panic!("Iris's controller did not start: {line:?}\n{log}")
            });
        IrisController { child, url, _state: state }
    }
}

impl Drop for IrisController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JWT of the shape Iris's controller mints for workers, expiring at `exp` (its signature is
/// not the controller's: a null-auth controller on loopback does not check it).
fn worker_jwt(exp: u64) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let claims =
        format!(r#"{{"sub":"system:worker","role":"worker","iss":"iris-newest-harness","aud":"iris","exp":{exp}}}"#);
    format!("{}.{}.bm90LXNpZ25lZA", b64(r#"{"alg":"EdDSA","typ":"JWT"}"#), b64(&claims))
}

fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[test]
#[ignore = "root: iris-worker serves with a cgroup of its own"]
fn a_worker_token_near_its_expiry_is_renewed_through_irises_controller_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let controller = IrisController::start();
    let dir = tempfile::Builder::new().prefix("iris-worker-test-token-").tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // An hour left: inside Iris's one-day margin, so the worker renews at once.
    let given = worker_jwt(now + 3600);
    std::fs::write(&token_file, &given).unwrap();
    let worker_id = format!("iwtest-token-{}", std::process::id());
    let mut worker = Command::new(env!("CARGO_BIN_EXE_iris-worker"))
        .args(["serve", "--controller", &controller.url, "--worker-id", &worker_id])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--state-dir")
        .arg(&state)
        .arg("--auth-token-file")
        .arg(&token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let kept = state.join("credentials/worker.jwt");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !kept.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = Command::new(env!("CARGO_BIN_EXE_iris-worker")).arg("cleanup").arg("--state-dir").arg(&state).status();
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert!(kept.exists(), "no renewed token kept\n{log}");
    let renewed = std::fs::read_to_string(&kept).unwrap();
    assert_ne!(renewed, given);
    let claims = jwt_claims(&renewed);
    // Iris's controller mints 30-day worker tokens, signed by its own key.
    assert_eq!(claims["iss"], "iris-newest-harness", "{claims}");
    assert_eq!(claims["sub"], "system:worker", "{claims}");
    assert!(claims["exp"].as_u64().unwrap() > now + 29 * 86_400, "{claims}");
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(log.contains("renewed the worker token"), "{log}");
    assert!(!log.contains(&renewed) && !log.contains(&given), "a token in the worker's log");
}

// ---------------------------------------------------------------------------------------------
// Reconcile's rules against a real worker (`serve --iris-wire newest`, no controller), over
// Connect as Iris's controller calls it. The rules themselves are unit-tested without root in
// src/rpc/newest/reconcile.rs; this checks them end to end, with real attempts and a restart.

mod reconcile {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use iris_worker::proto::newest::iris::cluster::worker::{
        AttemptObservation, AttemptSpec, DesiredAttempt, HealthResponse, ReconcileRequest, ReconcileResponse,
        StopReason, desired_attempt::Intent,
    };
    use iris_worker::proto::newest::iris::job::{
        CommandEntrypoint, Empty, EnvironmentConfig, RunTaskRequest, RuntimeEntrypoint, TaskState,
    };
    use iris_worker::rpc::connect::ConnectClient;

    const SERVICE: &str = "iris.cluster.WorkerService";

    /// `iris-worker serve --iris-wire newest` on a state directory of its own; killed and
    /// cleaned up when dropped.
    struct NewestWorker {
        id: String,
        state: tempfile::TempDir,
        child: Option<Child>,
        client: ConnectClient,
        /// More flags of `serve`.
        extra: Vec<String>,
        /// More environment of `serve` (and so of its supervisors).
        envs: Vec<(String, String)>,
    }

    impl NewestWorker {
        async fn start() -> NewestWorker {
            NewestWorker::start_as("newest").await
        }

        /// A worker whose id has `name` in it: tests of this binary run at once, and a worker's
        /// id names its cgroups.
        async fn start_as(name: &str) -> NewestWorker {
            NewestWorker::start_with(name, &[]).await
        }

        async fn start_with(name: &str, extra: &[&str]) -> NewestWorker {
            NewestWorker::start_with_env(name, extra, &[]).await
        }

        async fn start_with_env(name: &str, extra: &[&str], envs: &[(&str, &str)]) -> NewestWorker {
            let mut w = NewestWorker {
                // The leftover check of the suite looks for this prefix.
                id: format!("iwtest-{name}-{}", std::process::id()),
                state: tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap(),
                child: None,
                client: ConnectClient::new("http://127.0.0.1:1"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            };
            w.spawn().await;
            w
        }

        async fn spawn(&mut self) {
            let port = super::free_port();
            let log = std::fs::File::create(self.state.path().join(format!("worker-{port}.log"))).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_iris-worker"))
                .args(["serve", "--iris-wire", "newest", "--worker-id", &self.id])
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--state-dir")
                .arg(self.state.path())
                .args(&self.extra)
                .envs(self.envs.iter().cloned())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            self.child = Some(child);
            self.client = ConnectClient::new(&format!("http://127.0.0.1:{port}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let health: Result<HealthResponse, _> =
                    self.client.call(SERVICE, "HealthCheck", &Empty {}, Duration::from_secs(2)).await;
                if health.is_ok_and(|h| h.healthy) {
                    return;
                }
                assert!(Instant::now() < deadline, "the worker did not start: {}", self.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        /// The raw HTTP/1.1 answer to `GET path` (the connection closed after it).
        fn get(&self, path: &str) -> String {
            use std::io::{Read, Write};
            let addr = self.client.base().trim_start_matches("http://").to_string();
            let mut conn = std::net::TcpStream::connect(&addr).unwrap();
            write!(conn, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
            let mut out = String::new();
            conn.read_to_string(&mut out).unwrap();
            out
        }

        fn kill9(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        fn logs(&self) -> String {
            let mut out = String::new();
            for e in std::fs::read_dir(self.state.path()).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("worker-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
            out
        }

        async fn reconcile(&self, worker_id: &str, desired: Vec<DesiredAttempt>) -> ReconcileResponse {
            let req = ReconcileRequest { worker_id: worker_id.to_string(), desired };
            self.client.call(SERVICE, "Reconcile", &req, Duration::from_secs(3)).await.unwrap()
        }

        /// Reconciles `desired` until `uid` is observed in a state `want` accepts.
        async fn until(
            &self,
            desired: &[DesiredAttempt],
            uid: &str,
            want: impl Fn(TaskState) -> bool,
        ) -> AttemptObservation {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let resp = self.reconcile(&self.id, desired.to_vec()).await;
                if let Some(o) = resp.observed.iter().find(|o| o.attempt_uid == uid)
                    && want(o.state())
                {
                    return o.clone();
                }
                assert!(Instant::now() < deadline, "{uid} never reached the state wanted: {resp:?}\n{}", self.logs());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    impl Drop for NewestWorker {
        fn drop(&mut self) {
            self.kill9();
            let _ = Command::new(env!("CARGO_BIN_EXE_iris-worker"))
                .arg("cleanup")
                .arg("--state-dir")
                .arg(self.state.path())
                .stdout(Stdio::null())
                .status();
        }
    }

    fn spec(task: &str, attempt: i32, uid: &str, script: &str) -> RunTaskRequest {
        RunTaskRequest {
            task_id: task.into(),
            attempt_id: attempt,
            attempt_uid: uid.into(),
            num_tasks: 1,
            entrypoint: Some(RuntimeEntrypoint {
                run_command: Some(CommandEntrypoint { argv: vec!["bash".into(), "-c".into(), script.into()] }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn run(uid: &str, spec: Option<RunTaskRequest>) -> DesiredAttempt {
        DesiredAttempt { attempt_uid: uid.into(), intent: Some(Intent::Run(AttemptSpec { request: spec })) }
    }

    fn stop(uid: &str) -> DesiredAttempt {
        DesiredAttempt { attempt_uid: uid.into(), intent: Some(Intent::Stop(StopReason::Cancelled as i32)) }
    }

    fn state_of(resp: &ReconcileResponse, uid: &str) -> Option<TaskState> {
        resp.observed.iter().find(|o| o.attempt_uid == uid).map(AttemptObservation::state)
    }

    #[tokio::test]
    #[ignore = "root: the attempts run in containers with cgroups"]
    async fn reconcile_rules_on_a_real_worker() {
        let mut w = NewestWorker::start().await;

        // Identity guard: another worker's desired set is not acted on.
        let other = w.reconcile("someone-else", vec![run("g1", Some(spec("/t/guard/0", 0, "g1", "true")))]).await;
        assert_eq!(other.worker_id, w.id);
        assert!(other.observed.is_empty(), "{other:?}");
        assert!(other.health.as_ref().is_some_and(|h| h.healthy));

        // An unknown uid with its spec starts (BUILDING at once), runs, and ends SUCCEEDED
        // with its finish time; the spec re-sent meanwhile does not start it twice.
        let ok = spec("/t/ok/0", 0, "ok0", "echo hi");
        let first = w.reconcile(&w.id, vec![run("ok0", Some(ok.clone()))]).await;
        assert_eq!(state_of(&first, "ok0"), Some(TaskState::Building), "{first:?}");
        let done = w.until(&[run("ok0", Some(ok))], "ok0", |s| s == TaskState::Succeeded).await;
        assert!(done.finished_at.is_some_and(|t| t.epoch_ms > 0), "{done:?}");
        let ok_dirs = std::fs::read_dir(w.state.path().join("tasks")).unwrap().count();
        assert_eq!(ok_dirs, 1, "one attempt, however often its spec came");

        // A failing command: FAILED with its exit code.
        let fail = vec![run("f0", Some(spec("/t/fail/0", 0, "f0", "exit 3")))];
        let failed = w.until(&fail, "f0", |s| s == TaskState::Failed).await;
        assert_eq!(failed.exit_code, 3, "{failed:?}");

        // Unknown uids without a spec, or to stop: MISSING.
        let resp = w.reconcile(&w.id, vec![run("nobody", None), stop("nobody-either")]).await;
        assert_eq!(state_of(&resp, "nobody"), Some(TaskState::Missing));
        assert_eq!(state_of(&resp, "nobody-either"), Some(TaskState::Missing));

        // stop → KILLED.
        let long = |uid: &str, task: &str, attempt: i32| spec(task, attempt, uid, "exec sleep 600");
        w.until(&[run("s0", Some(long("s0", "/t/stop/0", 0)))], "s0", |s| s == TaskState::Running).await;
        w.until(&[stop("s0")], "s0", |s| s == TaskState::Killed).await;

        // A newer attempt of a live task supersedes it; a duplicate of the live one is MISSING.
        w.until(&[run("a0", Some(long("a0", "/t/sup/0", 0)))], "a0", |s| s == TaskState::Running).await;
        let resp = w.reconcile(&w.id, vec![run("a0", None), run("a1", Some(long("a1", "/t/sup/0", 1)))]).await;
        assert_eq!(state_of(&resp, "a1"), Some(TaskState::Building), "{resp:?}");
        w.until(&[run("a0", None), run("a1", None)], "a0", |s| s == TaskState::Killed).await;
        w.until(&[run("a1", None)], "a1", |s| s == TaskState::Running).await;
        let dup = w.reconcile(&w.id, vec![run("a1", None), run("dup", Some(long("dup", "/t/sup/0", 1)))]).await;
        assert_eq!(state_of(&dup, "dup"), Some(TaskState::Missing), "{dup:?}");

        // A worker restart adopts the running attempt under the same uid: never MISSING.
        w.kill9();
        w.spawn().await;
        let adopted = w.reconcile(&w.id, vec![run("a1", None)]).await;
        assert_eq!(state_of(&adopted, "a1"), Some(TaskState::Running), "{adopted:?}\n{}", w.logs());

        // Not desired any more: a zombie, killed and reported in that tick.
        let zombie = w.reconcile(&w.id, vec![]).await;
        assert_eq!(state_of(&zombie, "a1"), Some(TaskState::Running), "{zombie:?}");
        w.until(&[stop("a1")], "a1", |s| s == TaskState::Killed).await;

        // Terminal history not asked about is not reported.
        let quiet = w.reconcile(&w.id, vec![]).await;
        assert!(quiet.observed.is_empty(), "{quiet:?}");

        // GET /health as Iris's worker answers it.
        let health = w.get("/health");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.ends_with(r#"{"status":"healthy"}"#), "{health}");
    }

    /// The stdout lines of the one task directory whose name ends with `.<uid>`.
    fn stdout_of(w: &NewestWorker, uid: &str) -> Vec<String> {
        let dir = std::fs::read_dir(w.state.path().join("tasks"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&format!(".{uid}")))
            .unwrap_or_else(|| panic!("no task directory of {uid}"));
        let lines = iris_worker::logs::read(&dir.join("logs"), &Default::default()).unwrap();
        lines.into_iter().filter(|l| l.source.as_str() == "stdout").map(|l| l.data).collect()
    }

    #[tokio::test]
    #[ignore = "root: the attempts run in containers with image overlays and cgroups"]
    async fn task_image_or_the_default_task_image_is_the_attempts_root_filesystem() {
        let reg = super::Registry::start();
        let default = reg.push("python312", "iris-task");
        let python = reg.push("python", "other");
        let store = super::ImageStore::new("newest-images");
        let insecure = reg.host();
        let flags = store.args(&["--insecure-registry", &insecure, "--default-task-image", &default]);
        let w = NewestWorker::start_with("images", &flags).await;
        let finished = |s| matches!(s, TaskState::Succeeded | TaskState::Failed);

        // No task_image: the worker's default image, its variables, Iris's IRIS_PYTHON.
        let script = "cat /etc/image-marker; echo \"$IMAGE_VAR $IRIS_PYTHON\"; \
                      $IRIS_PYTHON -c 'import sys, cloudpickle; print(sys.version_info >= (3, 12))'";
        let d = spec("/t/img/0", 0, "im0", script);
        let done = w.until(&[run("im0", Some(d))], "im0", finished).await;
        assert_eq!(done.state(), TaskState::Succeeded, "{done:?}\n{}", w.logs());
        let out = stdout_of(&w, "im0");
        assert!(out[0].starts_with("python3."), "not the default image: {out:?}");
        assert_eq!(out[1..], ["from-python312 python", "True"], "{out:?}");

        // The request's task_image wins over the default.
        let mut own = spec("/t/img/1", 0, "im1", "cat /etc/image-marker");
        own.task_image = python;
        let done = w.until(&[run("im1", Some(own))], "im1", finished).await;
        assert_eq!(done.state(), TaskState::Succeeded, "{done:?}\n{}", w.logs());
        assert_eq!(stdout_of(&w, "im1"), ["python"]);

        // An image the registry does not have: FAILED, naming the image, no host path.
        let mut gone = spec("/t/img/2", 0, "im2", "true");
        gone.task_image = format!("{insecure}/nothing:here");
        let failed = w.until(&[run("im2", Some(gone))], "im2", finished).await;
        assert_eq!(failed.state(), TaskState::Failed, "{failed:?}");
        assert!(failed.error.contains("nothing:here"), "{failed:?}");
        assert!(!failed.error.contains(&*store.0.to_string_lossy()), "a host path in {failed:?}");
    }

    #[tokio::test]
    #[ignore = "root: the attempt runs in a container; ProfileTask runs memray (and its gdb) inside it"]
    async fn profile_task_memory_attaches_memray_inside_the_task() {
        use iris_worker::proto::newest::iris::job::{
            MemoryProfile, ProfileTaskRequest, ProfileTaskResponse, ProfileType, memory_profile, profile_type::Profiler,
        };
        // The python312-lldb test image has what this takes: memray in the task's Python, and
        // a debugger for `memray attach` to drive (lldb: gdb 13 cannot call into a process on
        // this host's kernel).
        let reg = super::Registry::start();
        let image = reg.push("python312-lldb", "iris-task");
        let store = super::ImageStore::new("newest-memray");
        let insecure = reg.host();
        let w = NewestWorker::start_with("memray", &store.args(&["--insecure-registry", &insecure])).await;
        let script = "import time\nkeep = []\ndef allocating_function():\n    while True:\n        \
                      keep.append(bytearray(100000))\n        del keep[:-50]\n        time.sleep(0.005)\n\
                      allocating_function()\n";
        let mut s = spec("/t/memray/0", 0, "mr0", "");
        s.task_image = image;
        if let Some(e) = s.entrypoint.as_mut() {
            e.run_command = Some(CommandEntrypoint { argv: vec!["python".into(), "-c".into(), script.into()] });
        }
        w.until(&[run("mr0", Some(s))], "mr0", |st| st == TaskState::Running).await;
        let ask = async |format: memory_profile::Format| -> ProfileTaskResponse {
            let req = ProfileTaskRequest {
                target: "/t/memray/0".into(),
                duration_seconds: 2,
                profile_type: Some(ProfileType {
                    profiler: Some(Profiler::Memory(MemoryProfile { format: format as i32, leaks: false })),
                }),
            };
            w.client.call(SERVICE, "ProfileTask", &req, Duration::from_secs(120)).await.unwrap()
        };
        let stats = ask(memory_profile::Format::Stats).await;
        assert_eq!(stats.error, "", "{}", w.logs());
        let json: serde_json::Value = serde_json::from_slice(&stats.profile_data).expect("memray stats JSON");
        assert!(json.to_string().contains("allocating_function"), "{json}");
        let flame = ask(memory_profile::Format::Flamegraph).await;
        assert_eq!(flame.error, "");
        let html = String::from_utf8_lossy(&flame.profile_data);
        assert!(html.contains("<html") && html.contains("allocating_function"), "not a flamegraph of the task");
    }

    #[tokio::test]
    #[ignore = "root: the attempt runs in a container with cgroups"]
    async fn a_tpu_held_by_another_process_makes_the_worker_unhealthy_naming_it() {
        // No TPU here: a file stands in for /dev/vfio/0 (`--tpu-device`); who holds it open
        // is read from the real /proc of a real process.
        let dir = tempfile::Builder::new().prefix("iris-worker-test-tpu-").tempdir().unwrap();
        let device = dir.path().join("0");
        std::fs::write(&device, "").unwrap();
        let w = NewestWorker::start_with("tpu", &["--tpu-device", device.to_str().unwrap()]).await;
        let health = |r: &ReconcileResponse| r.health.clone().unwrap_or_default();
        let first = w.reconcile(&w.id, vec![]).await;
        assert!(health(&first).healthy, "{first:?}");

        // The device is its stdin, held from its exec on (spawn returns after it).
        let mut holder = Command::new("sleep").arg("600").stdin(std::fs::File::open(&device).unwrap()).spawn().unwrap();
        let pid = holder.id();
        let deadline = Instant::now() + Duration::from_secs(40);
        let unhealthy = loop {
            let r = w.reconcile(&w.id, vec![]).await;
            if !health(&r).healthy {
                break health(&r);
            }
            assert!(Instant::now() < deadline, "still healthy while pid {pid} holds the TPU: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(unhealthy.health_error.contains(&format!("held by pid {pid} (sleep)")), "{unhealthy:?}");
        assert!(!unhealthy.health_error.contains(&*dir.path().to_string_lossy()), "a host path: {unhealthy:?}");
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let r = w.reconcile(&w.id, vec![]).await;
            if health(&r).healthy {
                break;
            }
            assert!(Instant::now() < deadline, "still unhealthy with the holder gone: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    #[ignore = "root: the attempts run in containers with cgroups"]
    async fn a_tpu_attempt_runs_privileged_and_a_bad_node_failure_is_the_workers() {
        use iris_worker::proto::newest::iris::job::{DeviceConfig, ResourceSpecProto, TpuDevice, device_config};
        let w = NewestWorker::start_as("tpu-run").await;
        let with_tpu = |uid: &str, task: &str, script: &str| {
            let mut s = spec(task, 0, uid, script);
            s.resources = Some(ResourceSpecProto {
                memory_bytes: 512 << 20,
                device: Some(DeviceConfig {
                    device: Some(device_config::Device::Tpu(TpuDevice {
                        variant: "v5litepod-8".into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            });
            s
        };
        let finished = |s| matches!(s, TaskState::Succeeded | TaskState::Failed | TaskState::WorkerFailed);
        // Privileged, /dev/shm its memory limit, JAX's TPU platform.
        let probe = "grep CapEff /proc/self/status; df -k /dev/shm | tail -1; echo \"$PJRT_DEVICE\"";
        let done = w.until(&[run("tp0", Some(with_tpu("tp0", "/t/tpu/0", probe)))], "tp0", finished).await;
        assert_eq!(done.state(), TaskState::Succeeded, "{done:?}\n{}", w.logs());
        let out = stdout_of(&w, "tp0");
        // Every capability the host can grant: this host's bounding set (it may withhold some).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let bounding = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim();
        assert_eq!(out[0], format!("CapEff:\t{bounding}"), "not privileged: {out:?}");
        assert_eq!(out[1].split_whitespace().nth(1), Some("524288"), "/dev/shm is not its memory: {out:?}");
        assert_eq!(out[2], "TPU", "{out:?}");

        // A TPU that cannot be opened: the host's failure (WORKER_FAILED), not the task's.
        let bad = "echo \"E1207 Couldn't open iommu group /dev/vfio/0: Device or resource busy\" >&2; exit 1";
        let failed = w.until(&[run("tp1", Some(with_tpu("tp1", "/t/tpu/1", bad)))], "tp1", finished).await;
        assert_eq!(failed.state(), TaskState::WorkerFailed, "{failed:?}");
        assert!(failed.error.contains("Couldn't open iommu group"), "{failed:?}");
        // The same exit without a TPU, or without the signature, is the task's own failure.
        let plain = w.until(&[run("tp2", Some(spec("/t/tpu/2", 0, "tp2", bad)))], "tp2", finished).await;
        assert_eq!(plain.state(), TaskState::Failed, "{plain:?}");
    }

    #[tokio::test]
    #[ignore = "root: the attempt runs in a container with cgroups"]
    async fn secrets_reach_the_task_as_root_only_files_and_nowhere_else() {
        use std::os::unix::fs::PermissionsExt;
        const VALUE: &str = "s3cr3t-v4lue-9f1c";
        let w = NewestWorker::start_as("secrets").await;
        // The task reads the secret where Iris puts it, and cannot change it.
        let script = r#"test "$RIGGING_SECRETS_DIR" = /run/rigging/secrets || exit 10
            cat "$RIGGING_SECRETS_DIR/hf-token" > /app/seen || exit 11
            if echo x > "$RIGGING_SECRETS_DIR/hf-token"; then exit 12; fi"#;
        let mut with_secret = spec("/t/secret/0", 0, "sec0", script);
        with_secret.environment = Some(EnvironmentConfig {
            secrets: [("hf-token".to_string(), VALUE.to_string())].into(),
            ..Default::default()
        });
        let done = w
            .until(&[run("sec0", Some(with_secret))], "sec0", |s| matches!(s, TaskState::Succeeded | TaskState::Failed))
            .await;
        assert_eq!(done.state(), TaskState::Succeeded, "{done:?}\n{}", w.logs());
        let dirs: Vec<_> =
            std::fs::read_dir(w.state.path().join("tasks")).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        let dir = &dirs[0];
        assert_eq!(std::fs::read_to_string(dir.join("workdir/seen")).unwrap(), VALUE);
        // On the host: root's only.
        let mode = |p: std::path::PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.join("run/rigging/secrets/hf-token")), 0o600);
        assert_eq!(mode(dir.join("run/rigging/secrets")), 0o700);
        // Never in the clear in what the worker and the supervisor write about the task.
        for (what, text) in [
            ("the worker's log", w.logs()),
            ("spec.json", std::fs::read_to_string(dir.join("spec.json")).unwrap_or_default()),
            ("supervisor.log", std::fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default()),
            ("task.json", std::fs::read_to_string(dir.join("task.json")).unwrap_or_default()),
        ] {
            assert!(!text.contains(VALUE), "the secret is in {what}: {text}");
        }
        // A name that is a path is refused, naming the field.
        let mut bad = spec("/t/secret/1", 0, "sec1", "true");
        bad.environment = Some(EnvironmentConfig {
            secrets: [("../escape".to_string(), VALUE.to_string())].into(),
            ..Default::default()
        });
        let refused = w.until(&[run("sec1", Some(bad))], "sec1", |s| s == TaskState::Failed).await;
        assert!(refused.error.contains("environment.secrets"), "{refused:?}");
        assert!(!refused.error.contains(VALUE), "{refused:?}");
    }

    #[tokio::test]
    #[ignore = "root: the attempt runs in a container with cgroups"]
    async fn a_newest_worker_hands_out_irises_own_port_range() {
        let w = NewestWorker::start_as("ports").await;
        let mut with_port =
            spec("/t/port/0", 0, "p0", r#"[ "$IRIS_PORT_HTTP" -ge 12000 ] && [ "$IRIS_PORT_HTTP" -le 13999 ]"#);
        with_port.ports = vec!["http".into()];
        let done = w
            .until(&[run("p0", Some(with_port))], "p0", |s| matches!(s, TaskState::Succeeded | TaskState::Failed))
            .await;
        assert_eq!(done.state(), TaskState::Succeeded, "IRIS_PORT_HTTP outside 12000-13999: {done:?}");
    }

    #[tokio::test]
    #[ignore = "root: the attempt and its setup step run in containers with cgroups"]
    async fn a_stop_before_the_setup_steps_supervisor_can_be_found_still_ends_it() {
        // The test seam holds each supervisor 3 s before it records its pid: a stop in that
        // window finds no supervisor to signal.
        let w = NewestWorker::start_with_env("setup-race", &[], &[("IRIS_TEST_SUPERVISOR_PID_DELAY_MS", "3000")]).await;
        let mut slow = spec("/t/race/0", 0, "rc0", "true");
        if let Some(e) = slow.entrypoint.as_mut() {
            e.setup_commands = vec!["exec sleep 600".into()];
        }
        w.until(&[run("rc0", Some(slow))], "rc0", |s| s == TaskState::Building).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let step = loop {
            let found = std::fs::read_dir(w.state.path().join("tasks"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("setup"))
                .find(|s| s.join("spec.json").exists());
            if let Some(step) = found {
                break step;
            }
            assert!(Instant::now() < deadline, "the setup step never began");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(!step.join("supervisor.pid").exists(), "the window closed before the stop: the seam did not hold");
        // One stop (a Reconcile repeating it would reach the supervisor once it is known),
        // then the task's status read without asking again.
        let asked = Instant::now();
        w.reconcile(&w.id, vec![stop("rc0")]).await;
        // The stop was taken (the Reconcile returns after it) before the supervisor was known.
        assert!(!step.join("supervisor.pid").exists(), "the window closed during the stop: the seam did not hold");
        let req =
            iris_worker::proto::newest::iris::cluster::worker::GetTaskStatusRequest { task_id: "/t/race/0".into() };
        loop {
            let status: iris_worker::proto::newest::iris::job::TaskStatus =
                w.client.call(SERVICE, "GetTaskStatus", &req, Duration::from_secs(3)).await.unwrap();
            if status.state() == TaskState::Killed {
                break;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(30),
                "the stop did not reach the setup step: {status:?}\n{}",
                w.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    #[ignore = "root: the attempts and their setup steps run in containers with cgroups"]
    async fn setup_commands_run_first_in_a_step_of_their_own_logged_as_build() {
        let w = NewestWorker::start_as("setup").await;
        let with_setup = |uid: &str, task: &str, setup: &[&str], script: &str| {
            let mut s = spec(task, 0, uid, script);
            if let Some(e) = s.entrypoint.as_mut() {
                e.setup_commands = setup.iter().map(|c| c.to_string()).collect();
            }
            s
        };
        // The steps run in order in the workdir, before the command, which sees what they left.
        let ok = with_setup(
            "st0",
            "/t/setup/0",
            &["echo first > /app/order", "echo second >> /app/order"],
            "cat /app/order",
        );
        let done =
            w.until(&[run("st0", Some(ok))], "st0", |s| matches!(s, TaskState::Succeeded | TaskState::Failed)).await;
        assert_eq!(done.state(), TaskState::Succeeded, "{done:?}\n{}", w.logs());
        let dirs: Vec<_> =
            std::fs::read_dir(w.state.path().join("tasks")).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        let lines = iris_worker::logs::read(&dirs[0].join("logs"), &Default::default()).unwrap();
        let text: Vec<(String, String)> =
            lines.iter().map(|l| (l.source.as_str().to_string(), l.data.clone())).collect();
        let build: Vec<&str> = text.iter().filter(|(s, _)| s == "build").map(|(_, d)| d.as_str()).collect();
        assert_eq!(build, ["[iris setup] step 1/2", "[iris setup] step 2/2"], "{text:?}");
        let out: Vec<&str> = text.iter().filter(|(s, _)| s == "stdout").map(|(_, d)| d.as_str()).collect();
        assert_eq!(out, ["first", "second"], "{text:?}");

        // A failing step fails the task with its last lines, and the command never runs.
        let bad = with_setup("st1", "/t/setup/1", &["echo about-to-fail; exit 4"], "touch /app/ran");
        let failed =
            w.until(&[run("st1", Some(bad))], "st1", |s| matches!(s, TaskState::Succeeded | TaskState::Failed)).await;
        assert_eq!(failed.state(), TaskState::Failed, "{failed:?}");
        assert!(failed.error.contains("exit code 4") && failed.error.contains("about-to-fail"), "{failed:?}");
        let dir = std::fs::read_dir(w.state.path().join("tasks"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p != &dirs[0])
            .unwrap();
        assert!(!dir.join("workdir/ran").exists(), "the command ran after a failed setup");

        // A stop while the setup step runs ends it at once: KILLED, not after its sleep.
        let slow = with_setup("st2", "/t/setup/2", &["echo setting-up; exec sleep 600"], "true");
        w.until(&[run("st2", Some(slow))], "st2", |s| s == TaskState::Building).await;
        let dir = std::fs::read_dir(w.state.path().join("tasks"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".st2"))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !iris_worker::logs::read(&dir.join("logs"), &Default::default())
            .unwrap_or_default()
            .iter()
            .any(|l| l.data == "setting-up")
        {
            assert!(Instant::now() < deadline, "the setup step never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let asked = Instant::now();
        let killed = w.until(&[stop("st2")], "st2", |s| matches!(s, TaskState::Killed | TaskState::Failed)).await;
        assert_eq!(killed.state(), TaskState::Killed, "{killed:?}");
        assert!(asked.elapsed() < Duration::from_secs(30), "the stop waited for the setup step: {:?}", asked.elapsed());
    }
}
