//! The state machine's unit tests: no workers, no network; effects are answered by hand.

use super::*;
use crate::store::Store;
use iris_wire::proto::controller::{self as pc, LaunchJobRequest};
use iris_wire::proto::{CommandEntrypoint, ResourceSpecProto, WorkerMetadata};
use iris_wire::proto::{JobState, TaskState};
use std::time::Duration;

fn knobs() -> Knobs {
    Knobs {
        worker_timeout: Duration::from_millis(50),
        suspect_for: Duration::from_secs(5),
        bundle_base: "http://ctl:1".into(),
    }
}

fn open(dir: &std::path::Path) -> State {
    State::open(Store::open(dir).unwrap(), knobs()).unwrap()
}

fn register(s: &mut State, id: &str) {
    s.register_worker(pc::RegisterWorkerRequest {
        worker_id: id.into(),
        address: format!("{id}:1"),
        metadata: Some(WorkerMetadata { cpu_count: 4, memory_bytes: 1 << 30, ..Default::default() }),
        running_task_ids: vec![],
        ..Default::default()
    })
    .unwrap();
}

fn job(name: &str, replicas: i32) -> LaunchJobRequest {
    LaunchJobRequest {
        name: name.into(),
        resources: Some(ResourceSpecProto { replicas, cpu_millicores: 1000, ..Default::default() }),
        command: Some(CommandEntrypoint { argv: vec!["true".into()], setup_commands: vec![] }),
        max_retries_failure: 1,
        max_retries_preemption: 1,
        ..Default::default()
    }
}

/// Accepts every dispatch the state asked for; returns (task, attempt, worker).
fn accept_all(s: &mut State) -> Vec<(String, i32, String)> {
    let mut out = Vec::new();
    for e in s.take_effects() {
        if let Effect::Dispatch { task_id, attempt_id, worker_id, .. } = e {
            s.dispatched(&task_id, attempt_id, &worker_id, DispatchOutcome::Accepted(TaskState::Running));
            out.push((task_id, attempt_id, worker_id));
        }
    }
    out
}

fn report(s: &mut State, (task, attempt, worker): &(String, i32, String), state: TaskState, exit: i32) {
    s.report(&pc::ReportTaskStateRequest {
        worker_id: worker.clone(),
        task_id: task.clone(),
        state: state as i32,
        exit_code: exit,
        attempt_id: *attempt,
        ..Default::default()
    });
}

#[test]
fn a_failure_is_retried_then_the_job_succeeds_and_frees_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    register(&mut s, "w");
    s.take_effects();
    let id = s.launch(job("j", 2)).unwrap();
    s.schedule();
    let runs = accept_all(&mut s);
    assert_eq!(runs.len(), 2);
    assert_eq!(s.jobs[&id].rec.state, JobState::Running);
    assert_eq!(s.workers["w"].used.cpu_millicores, 2000);
    report(&mut s, &runs[0], TaskState::Failed, 1);
    report(&mut s, &runs[1], TaskState::Succeeded, 0);
    s.schedule();
    let again = accept_all(&mut s);
    assert_eq!(again, vec![("j/task-0".to_string(), 1, "w".to_string())]);
    report(&mut s, &again[0], TaskState::Succeeded, 0);
    let j = &s.jobs[&id];
    assert_eq!((j.rec.state, j.rec.failure_count), (JobState::Succeeded, 1));
    assert_eq!(s.workers["w"].used.cpu_millicores, 0);
    assert!(s.workers["w"].tasks.is_empty());
    // A late report of the first attempt changes nothing.
    report(&mut s, &runs[0], TaskState::Failed, 1);
    assert_eq!(s.tasks["j/task-0"].state, TaskState::Succeeded);
}

#[test]
fn the_same_launch_again_is_the_same_job_and_another_spec_under_its_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    register(&mut s, "w");
    let id = s.launch(job("j", 2)).unwrap();
    assert_eq!(s.launch(job("j", 2)).unwrap(), id);
    assert_eq!(s.tasks.len(), 2, "no second set of tasks");
    assert!(matches!(s.launch(job("j", 3)), Err(ControllerError::AlreadyExists(_))));
    s.schedule();
    let runs = accept_all(&mut s);
    for r in &runs {
        report(&mut s, r, TaskState::Succeeded, 0);
    }
    // A retry that comes after the job ended gets it too, and nothing runs again.
    assert_eq!(s.launch(job("j", 2)).unwrap(), id);
    assert_eq!(s.jobs[&id].rec.state, JobState::Succeeded);
    s.schedule();
    assert!(s.take_effects().is_empty());
}

#[test]
fn tolerated_failures_let_the_job_succeed_but_not_when_nothing_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    register(&mut s, "w");
    let mut req = job("tolerant", 2);
    req.max_retries_failure = 0;
    req.max_task_failures = 1;
    s.launch(req.clone()).unwrap();
    s.schedule();
    let runs = accept_all(&mut s);
    report(&mut s, &runs[0], TaskState::Failed, 2);
    assert_eq!(s.jobs["tolerant"].rec.state, JobState::Running);
    report(&mut s, &runs[1], TaskState::Succeeded, 0);
    assert_eq!(s.jobs["tolerant"].rec.state, JobState::Succeeded);

    req.name = "hopeless".into();
    req.resources = Some(ResourceSpecProto { replicas: 1, ..Default::default() });
    s.launch(req).unwrap();
    s.schedule();
    let runs = accept_all(&mut s);
    report(&mut s, &runs[0], TaskState::Failed, 2);
    let j = &s.jobs["hopeless"].rec;
    assert_eq!((j.state, j.exit_code), (JobState::Failed, 2));
    assert!(j.error.contains("hopeless/task-0"), "{}", j.error);
}

/// The bundle URLs of the RunTasks the state asked for.
fn dispatched_bundles(s: &mut State) -> Vec<(String, String)> {
    s.take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Dispatch { request, .. } => Some((request.bundle_gcs_path, request.bundle_sha256)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_inline_bundle_is_dispatched_under_the_controllers_url_of_the_moment() {
    let dir = tempfile::tempdir().unwrap();
    let sha = "ab".repeat(32);
    let mut s = open(dir.path());
    register(&mut s, "w");
    s.take_effects();
    s.launch_with_bundle(job("inline", 2), Some(sha.clone())).unwrap();
    s.schedule();
    let want = (format!("http://ctl:1/bundles/{sha}.zip"), sha.clone());
    assert_eq!(dispatched_bundles(&mut s), vec![want.clone(), want]);
    s.flush().unwrap();
    drop(s);
    // Restarted under another address: the job kept the sha, not a URL; its RunTasks (sent
    // again, never acknowledged) name the blob on the new address.
    let moved = Knobs { bundle_base: "http://10.0.0.7:9".into(), ..knobs() };
    let mut s = State::open(Store::open(dir.path()).unwrap(), moved).unwrap();
    assert_eq!(s.jobs["inline"].rec.inline_bundle, sha);
    let want = (format!("http://10.0.0.7:9/bundles/{sha}.zip"), sha.clone());
    assert_eq!(dispatched_bundles(&mut s), vec![want.clone(), want]);
}

#[test]
fn a_dead_workers_tasks_move_and_the_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    register(&mut s, "a");
    s.launch(job("j", 1)).unwrap();
    s.schedule();
    let first = accept_all(&mut s);
    s.flush().unwrap();
    register(&mut s, "b");
    std::thread::sleep(Duration::from_millis(80));
    register(&mut s, "b");
    s.tick();
    assert!(!s.workers["a"].rec.healthy);
    s.schedule();
    let second = accept_all(&mut s);
    assert_eq!(second[0].2, "b");
    let t = &s.tasks[&first[0].0];
    assert_eq!(t.preemptions, 1);
    assert!(t.attempts[0].is_worker_failure);
    s.flush().unwrap();
    drop(s);
    // Reopened: the task still runs on b, holding its resources; b's report completes it.
    let mut s = open(dir.path());
    assert_eq!(s.workers["b"].used.cpu_millicores, 1000);
    report(&mut s, &second[0], TaskState::Succeeded, 0);
    assert_eq!(s.jobs["j"].rec.state, JobState::Succeeded);
}

#[test]
fn a_dead_workers_tasks_move_only_once_its_lease_has_surely_lapsed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    // The worker's tasks are gone 300 ms after its last answered heartbeat: longer than
    // the 50 ms worker timeout.
    s.register_worker(pc::RegisterWorkerRequest {
        worker_id: "a".into(),
        address: "a:1".into(),
        metadata: Some(WorkerMetadata { cpu_count: 4, memory_bytes: 1 << 30, ..Default::default() }),
        fence_ms: 300,
        ..Default::default()
    })
    .unwrap();
    register(&mut s, "b");
    s.launch(job("j", 1)).unwrap();
    s.schedule();
    let first = accept_all(&mut s);
    assert_eq!(first[0].2, "a");
    let last_heard = std::time::Instant::now();
    // b keeps beating; a is silent.
    let mut moved_at = None;
    while moved_at.is_none() && last_heard.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        register(&mut s, "b");
        s.tick();
        if last_heard.elapsed() > Duration::from_millis(100) {
            assert!(!s.workers["a"].rec.healthy, "dead after the worker timeout");
        }
        if s.tasks["j/task-0"].worker_id != "a" {
            moved_at = Some(last_heard.elapsed());
        }
    }
    let moved_at = moved_at.expect("the task moved");
    assert!(moved_at >= Duration::from_millis(800), "not before the fence and its margin: {moved_at:?}");
    s.schedule();
    let second = accept_all(&mut s);
    assert_eq!((second[0].1, second[0].2.as_str()), (1, "b"));
    let t = &s.tasks["j/task-0"];
    assert!(t.attempts[0].is_worker_failure && t.attempts[0].error.contains("sent no heartbeat"), "{t:?}");
    assert_eq!(t.preemptions, 1);
}

#[test]
fn a_dead_worker_back_within_its_fence_keeps_its_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let beat = |s: &mut State| {
        s.register_worker(pc::RegisterWorkerRequest {
            worker_id: "a".into(),
            address: "a:1".into(),
            metadata: Some(WorkerMetadata { cpu_count: 4, memory_bytes: 1 << 30, ..Default::default() }),
            running_task_ids: vec!["j/task-0".into()],
            fence_ms: 10_000,
        })
        .unwrap()
    };
    beat(&mut s);
    s.launch(job("j", 1)).unwrap();
    s.schedule();
    let first = accept_all(&mut s);
    std::thread::sleep(Duration::from_millis(80));
    s.tick();
    assert!(!s.workers["a"].rec.healthy);
    assert_eq!(s.tasks["j/task-0"].worker_id, "a", "held until the fence");
    assert!(!beat(&mut s).should_reset);
    assert!(s.workers["a"].rec.healthy);
    report(&mut s, &first[0], TaskState::Succeeded, 0);
    assert_eq!(s.jobs["j"].rec.state, JobState::Succeeded);
    assert_eq!(s.tasks["j/task-0"].attempts.len(), 1);
}

#[test]
fn a_sibling_that_succeeded_stays_succeeded_when_the_job_fails_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    register(&mut s, "w");
    let mut req = job("j", 2);
    req.max_retries_failure = 0;
    s.launch(req).unwrap();
    s.schedule();
    let runs = accept_all(&mut s);
    // Task 1 succeeded on the worker, but task 0's failure is heard of first.
    report(&mut s, &runs[0], TaskState::Failed, 2);
    assert_eq!(s.jobs["j"].rec.state, JobState::Failed);
    assert_eq!(s.tasks["j/task-1"].state, TaskState::Killed);
    report(&mut s, &runs[1], TaskState::Succeeded, 0);
    let t = &s.tasks["j/task-1"];
    assert_eq!((t.state, t.attempts[0].state), (TaskState::Succeeded, TaskState::Succeeded));
    let j = &s.jobs["j"];
    assert_eq!(j.rec.state, JobState::Failed, "the job keeps its real cause");
    assert!(j.rec.error.contains("j/task-0"), "{}", j.rec.error);
    // A late KILLED (the kill the job's end sent) changes nothing.
    report(&mut s, &runs[1], TaskState::Killed, 0);
    assert_eq!(s.tasks["j/task-1"].state, TaskState::Succeeded);
}

#[test]
fn a_runtask_that_may_have_landed_is_not_sent_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    register(&mut s, "a");
    register(&mut s, "b");
    s.launch(job("j", 1)).unwrap();
    s.schedule();
    let Some(Effect::Dispatch { task_id, attempt_id, worker_id, .. }) = s.take_effects().pop() else {
        panic!("a dispatch")
    };
    s.dispatched(&task_id, attempt_id, &worker_id, DispatchOutcome::Unknown("no answer within 5s".into()));
    s.schedule();
    assert!(s.take_effects().is_empty(), "not dispatched again");
    let t = &s.tasks[&task_id];
    assert_eq!((t.worker_id.as_str(), t.attempt_id, t.dispatched), (worker_id.as_str(), 0, true));
    assert!(s.workers[&worker_id].suspect_until_ms > now_ms());
    // The worker had it after all: its report completes the task.
    report(&mut s, &(task_id, attempt_id, worker_id), TaskState::Succeeded, 0);
    assert_eq!(s.jobs["j"].rec.state, JobState::Succeeded);
}
