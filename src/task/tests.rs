//! The task manager's state machine over the fakes of [`super::fake`]: no root, no process,
//! no cgroup, no sleeping. Each test plays the supervisor's part (start, exit record) and
//! checks what the manager does with it. The same paths run for real in tests/containers.rs
//! (concurrency limit, kill escalation, timeout, adoption) and the
//! kill -9 and restart tests of tests/shared_host.rs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fake::{self, CgroupCall, Fakes};
use super::*;
use crate::taskdir::{self, ExitRecord, KillReason, KillRequest};

/// A manager over `fakes` in `state`, running at most `slots` tasks at once.
async fn open(state: &Path, fakes: &Fakes, slots: usize) -> TaskManager {
    TaskManager::open_with(config(state, slots), fakes.seams()).await.unwrap()
}

fn config(state: &Path, slots: usize) -> ManagerConfig {
    let cache = state.join("cache");
    ManagerConfig {
        state_dir: state.join("state"),
        runtime: RuntimeKind::Process,
        profile: Profile::default(),
        rootfs: PathBuf::from("/"),
        default_task_image: None,
        max_concurrent_tasks: slots,
        port_range: (20000, 20009),
        port_lock_dir: state.join("ports"),
        env: WorkerEnv {
            worker_id: "w".into(),
            controller_address: None,
            bind_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
        },
        supervisor_exe: PathBuf::from("/nonexistent/iris-worker"),
        shm_bytes: 64 << 20,
        cache_dir: cache.clone(),
        python: PythonConfig {
            rootfs: PathBuf::from("/nonexistent/python"),
            find_links: None,
            offline: true,
            build_memory_bytes: 1 << 30,
            ca_bundle: None,
            build_env: vec![],
        },
        workdir_retention: None,
        buildkit: None,
        images: crate::env::image::ImageStoreConfig {
            dir: cache.join("images"),
            insecure_registries: vec![],
            auth_file: None,
            containerd: None,
            max_bytes: u64::MAX,
            devices: false,
            pull: Default::default(),
        },
        bundle_sources: Default::default(),
        cache: Default::default(),
        bounds: Bounds::default(),
        request_decoder: Some(decode),
        lease: None,
        isolation: None,
    }
}

/// The unit tests' "wire": a request is its spec's task id, attempt id and timeout.
fn decode(raw: &[u8]) -> Result<TaskSpec, TaskError> {
    let text = String::from_utf8_lossy(raw);
    let mut parts = text.split(' ');
    let task_id = parts.next().unwrap_or_default();
    let attempt_id = parts.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    Ok(spec(task_id, attempt_id))
}

fn spec(task_id: &str, attempt_id: i32) -> TaskSpec {
    TaskSpec {
        task_id: task_id.into(),
        job_id: "j".into(),
        attempt_id,
        command: Some(Command { argv: vec!["true".into()], setup_commands: vec![] }),
        raw_request: format!("{task_id} {attempt_id}").into_bytes(),
        ..Default::default()
    }
}

/// Polls the task's status until `check` holds (a 5 s deadline; the fakes answer at once).
async fn wait_until(m: &TaskManager, task_id: &str, what: &str, check: impl Fn(&TaskView) -> bool) -> TaskView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let view = m.status(task_id).unwrap();
        if check(&view) {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "{task_id} never got {what}: {view:?}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn wait_state(m: &TaskManager, task_id: &str, state: TaskState) -> TaskView {
    wait_until(m, task_id, state.name(), |v| v.state == state).await
}

/// Lets every task of the test's (single-threaded) runtime run until it waits on something
/// only the test can give: a driver that could start a supervisor has done so after this.
/// (The drivers' paths through the fakes never wait on I/O or a blocking thread.)
async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// An exit record as a supervisor writes it.
fn exited(code: i32) -> ExitRecord {
    ExitRecord {
        started_at_ms: Some(fake::EPOCH_MS),
        finished_at_ms: fake::EPOCH_MS + 1,
        exit_code: Some(code),
        ..Default::default()
    }
}

fn killed(reason: KillReason) -> ExitRecord {
    ExitRecord { exit_code: None, signal: Some(15), killed: Some(reason), ..exited(0) }
}

/// The task directory of each supervisor spawned so far, once `n` have been.
async fn running(m: &TaskManager, fakes: &Fakes, task_id: &str, n: usize) -> PathBuf {
    let dir = fakes.spawner.wait_spawned(n).await[n - 1].clone();
    fakes.spawner.start(&dir);
    wait_state(m, task_id, TaskState::Running).await;
    dir
}

fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("iris-worker-test-fsm-").tempdir().unwrap()
}

#[tokio::test]
async fn a_higher_attempt_supersedes_a_running_one() {
    let (tmp, fakes) = (state_dir(), Fakes::new());
    let m = open(tmp.path(), &fakes, 4).await;
    m.run(spec("t", 0)).unwrap();
    let old = running(&m, &fakes, "t", 1).await;

    assert_eq!(m.run(spec("t", 1)).unwrap(), TaskState::Pending);
    // The old attempt is asked to end, with the default grace; the new one waits for it.
    let kills = fakes.spawner.wait_kills(&old, 1).await;
    assert_eq!(kills, vec![Some(KillRequest { grace_ms: DEFAULT_GRACE_MS, worker_failure: None })]);
    settle().await;
    let view = m.status("t").unwrap();
    assert_eq!((view.current_attempt_id, view.state), (1, TaskState::Pending));
    assert_eq!(fakes.spawner.spawned().len(), 1, "the new attempt started before the old one ended");

    fakes.spawner.exit(&old, Some(killed(KillReason::Requested)));
    let new = running(&m, &fakes, "t", 2).await;
    assert_ne!(new, old);
    let view = m.status("t").unwrap();
    let states: Vec<(i32, TaskState)> = view.attempts.iter().map(|a| (a.attempt_id, a.state)).collect();
    assert_eq!(states, vec![(0, TaskState::Killed), (1, TaskState::Running)]);
    assert_eq!(view.attempts[0].error, "killed by request");
}

#[tokio::test]
async fn the_same_attempt_again_is_already_exists() {
    let (tmp, fakes) = (state_dir(), Fakes::new());
    let m = open(tmp.path(), &fakes, 4).await;
    m.run(spec("t", 2)).unwrap();
    let again = m.run(spec("t", 2)).unwrap_err();
    assert!(matches!(again, TaskError::AlreadyExists { attempt_id: 2, .. }), "{again:?}");
    assert!(matches!(m.run(spec("t", 1)), Err(TaskError::StaleAttempt { attempt_id: 1, current: 2, .. })));
    // Also once it has ended: an attempt runs once.
    let dir = running(&m, &fakes, "t", 1).await;
    fakes.spawner.exit(&dir, Some(exited(0)));
    wait_state(&m, "t", TaskState::Succeeded).await;
    assert!(matches!(m.run(spec("t", 2)), Err(TaskError::AlreadyExists { .. })));
    assert_eq!(fakes.spawner.spawned().len(), 1);
    assert_eq!(m.status("t").unwrap().attempts.len(), 1);
}

#[tokio::test]
async fn the_concurrency_limit_keeps_the_next_task_pending() {
    let (tmp, fakes) = (state_dir(), Fakes::new());
    let m = open(tmp.path(), &fakes, 2).await;
    for t in ["a", "b", "c"] {
        assert_eq!(m.run(spec(t, 0)).unwrap(), TaskState::Pending);
    }
    let first = running(&m, &fakes, "a", 1).await;
    running(&m, &fakes, "b", 2).await;
    // Two slots, both taken: the third is accepted and waits, PENDING, with no supervisor.
    settle().await;
    assert_eq!(m.status("c").unwrap().state, TaskState::Pending);
    assert_eq!(fakes.spawner.spawned().len(), 2);
    assert_eq!(m.health().running_tasks, 2);

    fakes.spawner.exit(&first, Some(exited(0)));
    wait_state(&m, "a", TaskState::Succeeded).await;
    running(&m, &fakes, "c", 3).await;
    assert_eq!(m.health().running_tasks, 2);
}

#[tokio::test]
async fn a_timeout_ends_the_task_failed_with_its_limit() {
    let (tmp, fakes) = (state_dir(), Fakes::new());
    let m = open(tmp.path(), &fakes, 4).await;
    m.run(TaskSpec { timeout: Some(Duration::from_secs(3)), ..spec("t", 0) }).unwrap();
    let dir = running(&m, &fakes, "t", 1).await;
    // The supervisor enforces the timeout: the manager hands it over in the launch spec.
    let launch: crate::runtime::LaunchSpec = taskdir::read_json(&dir, taskdir::SPEC).unwrap().unwrap();
    assert_eq!(launch.timeout_ms, Some(3000));

    fakes.spawner.exit(&dir, Some(killed(KillReason::Timeout)));
    let view = wait_state(&m, "t", TaskState::Failed).await;
    assert_eq!((view.exit_code, view.error.as_str()), (128 + 15, "timeout after 3 s"));
    assert_eq!(view.finished_at_ms, fake::EPOCH_MS + 1, "the end is the exit record's");
}

#[tokio::test]
async fn a_kill_asks_the_supervisor_for_sigterm_then_sigkill_after_the_grace() {
    let (tmp, fakes) = (state_dir(), Fakes::new());
    let m = open(tmp.path(), &fakes, 1).await;

    // RUNNING: the request (grace 0 = Iris's default) goes to the supervisor at once.
    m.run(spec("run", 0)).unwrap();
    let dir = running(&m, &fakes, "run", 1).await;
    m.kill("run", 0).unwrap();
    let asked = Some(KillRequest { grace_ms: DEFAULT_GRACE_MS, worker_failure: None });
    assert_eq!(fakes.spawner.kills(&dir), vec![asked]);
    // A second KillTask with its own grace is passed on too (the supervisor takes the first).
    m.kill("run", 1500).unwrap();
    assert_eq!(fakes.spawner.kills(&dir)[1], Some(KillRequest { grace_ms: 1500, worker_failure: None }));
    fakes.clock.advance(Duration::from_millis(1500));
    fakes.spawner.exit(&dir, Some(ExitRecord { finished_at_ms: 0, ..killed(KillReason::Requested) }));
    let view = wait_state(&m, "run", TaskState::Killed).await;
    assert_eq!(view.error, "killed by request");
    // An exit record without a time ends at the manager's clock.
    assert_eq!(view.finished_at_ms, fake::EPOCH_MS + 1500);
    assert!(matches!(m.kill("run", 0), Err(TaskError::AlreadyCompleted { state: TaskState::Killed, .. })));

    // BUILDING (the supervisor is starting the command): parked, delivered once it runs.
    m.run(spec("starting", 0)).unwrap();
    let dir = fakes.spawner.wait_spawned(2).await[1].clone();
    wait_until(&m, "starting", "its supervisor", |v| v.status_message == "starting the container").await;
    m.kill("starting", 2000).unwrap();
    assert!(fakes.spawner.kills(&dir).is_empty(), "delivered before the supervisor could take it");
    fakes.spawner.start(&dir);
    let kills = fakes.spawner.wait_kills(&dir, 1).await;
    assert_eq!(kills, vec![Some(KillRequest { grace_ms: 2000, worker_failure: None })]);
    fakes.spawner.exit(&dir, Some(killed(KillReason::Requested)));
    wait_state(&m, "starting", TaskState::Killed).await;

    // PENDING (no slot yet): it just ends, no supervisor is started.
    m.run(spec("blocker", 0)).unwrap();
    let blocker = running(&m, &fakes, "blocker", 3).await;
    m.run(spec("waiting", 0)).unwrap();
    m.kill("waiting", 0).unwrap();
    let view = wait_state(&m, "waiting", TaskState::Killed).await;
    assert_eq!(view.error, "killed before it started");
    fakes.spawner.exit(&blocker, Some(exited(0)));
    wait_state(&m, "blocker", TaskState::Succeeded).await;
    assert_eq!(fakes.spawner.spawned().len(), 3, "a killed PENDING task was started");
}

#[tokio::test]
async fn a_supervisor_that_dies_without_a_record_is_a_worker_failure_and_its_cgroup_goes() {
    let (tmp, fakes) = (state_dir(), Fakes::new());
    let m = open(tmp.path(), &fakes, 4).await;
    m.run(spec("t", 0)).unwrap();
    let dir = running(&m, &fakes, "t", 1).await;
    let cgroup = format!("{}/{}", fake::PARENT, store::attempt_key("t", 0, None));
    fakes.cgroups.set_stats(&cgroup, CgroupStats { memory_bytes: Some(7 << 20), ..Default::default() });
    assert_eq!(m.status("t").unwrap().usage.map(|u| u.memory_bytes), Some(7 << 20));

    fakes.spawner.exit(&dir, None);
    let view = wait_state(&m, "t", TaskState::WorkerFailed).await;
    assert_eq!(view.error, "the task's supervisor died without recording how the task ended");
    assert_eq!(fakes.cgroups.calls(), vec![CgroupCall::Kill(cgroup.clone()), CgroupCall::Remove(cgroup)]);
}

/// One task left in each state by a worker that stopped, as the next worker finds it.
#[test]
fn a_restarted_worker_recovers_each_state() {
    let tmp = state_dir();
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cgroup_of = |task: &str| format!("{}/{}", fake::PARENT, store::attempt_key(task, 0, None));

    // The first worker, three slots; it stops (its runtime goes) with tasks in every state.
    let first = Fakes::new();
    let dirs = runtime().block_on(async {
        let m = open(tmp.path(), &first, 3).await;
        m.run(spec("succeeded", 0)).unwrap();
        let dir = running(&m, &first, "succeeded", 1).await;
        first.spawner.exit(&dir, Some(exited(0)));
        wait_state(&m, "succeeded", TaskState::Succeeded).await;
        m.run(spec("failed", 0)).unwrap();
        let dir = running(&m, &first, "failed", 2).await;
        first.spawner.exit(&dir, Some(exited(3)));
        wait_state(&m, "failed", TaskState::Failed).await;
        // Supervisors that outlive the worker: one runs its command, one is starting it.
        m.run(spec("running", 0)).unwrap();
        let running_dir = running(&m, &first, "running", 3).await;
        m.run(spec("building", 0)).unwrap();
        let building_dir = first.spawner.wait_spawned(4).await[3].clone();
        wait_until(&m, "building", "its supervisor", |v| v.status_message == "starting the container").await;
        // One whose supervisor dies with the worker.
        m.run(spec("gone", 0)).unwrap();
        running(&m, &first, "gone", 5).await;
        // No slot left: these wait. One is killed (its end recorded), one has a kill request
        // on disk whose end the worker did not record before it stopped, one just waits.
        m.run(spec("killed", 0)).unwrap();
        m.kill("killed", 0).unwrap();
        wait_state(&m, "killed", TaskState::Killed).await;
        m.run(spec("kill-asked", 0)).unwrap();
        let kill_asked = m.inner.tasks.lock().unwrap()["kill-asked"][0].dir.clone();
        taskdir::write_json(&kill_asked, taskdir::KILL, &KillRequest { grace_ms: 100, worker_failure: None }).unwrap();
        m.run(spec("pending", 0)).unwrap();
        assert_eq!(m.status("pending").unwrap().state, TaskState::Pending);
        (running_dir, building_dir)
    });
    let (running_dir, building_dir) = dirs;

    // The next worker: the two live supervisors are still there.
    let again = Fakes::new();
    again.spawner.adopt(&running_dir);
    again.spawner.adopt(&building_dir);
    runtime().block_on(async {
        let m = open(tmp.path(), &again, 3).await;
        let view = |t: &str| m.status(t).unwrap();
        let ended = |t: &str| (view(t).state, view(t).error);
        assert_eq!(ended("succeeded"), (TaskState::Succeeded, String::new()));
        assert_eq!(view("succeeded").finished_at_ms, fake::EPOCH_MS + 1, "not the exit record's end");
        assert_eq!(ended("failed"), (TaskState::Failed, "exit code 3".into()));
        assert_eq!(ended("killed"), (TaskState::Killed, "killed before it started".into()));
        assert_eq!(ended("kill-asked"), (TaskState::Killed, "killed before it started".into()));
        let gone = "the worker restarted and the task's supervisor was gone";
        assert_eq!(ended("gone"), (TaskState::WorkerFailed, gone.into()));
        let calls = again.cgroups.calls();
        assert!(calls.contains(&CgroupCall::Kill(cgroup_of("gone"))), "{calls:?}");
        assert!(calls.contains(&CgroupCall::Remove(cgroup_of("gone"))), "{calls:?}");
        // Adopted: RUNNING since the time its supervisor recorded, and BUILDING.
        assert_eq!((view("running").state, view("running").started_at_ms), (TaskState::Running, fake::EPOCH_MS));
        assert_eq!(view("building").state, TaskState::Building);
        // Accepted but never started: it runs after all, from its request.
        let dir = again.spawner.wait_spawned(1).await[0].clone();
        again.spawner.start(&dir);
        wait_state(&m, "pending", TaskState::Running).await;
        // The adopted supervisors are watched: their exits end the attempts.
        again.spawner.exit(&running_dir, Some(exited(0)));
        wait_state(&m, "running", TaskState::Succeeded).await;
        again.spawner.start(&building_dir);
        again.spawner.exit(&building_dir, Some(exited(1)));
        wait_state(&m, "building", TaskState::Failed).await;
    });
}
