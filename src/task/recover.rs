//! A restarted worker's view of the attempts the previous run left in the state directory:
//! live supervisors are watched again, recorded ends are kept, attempts accepted but never
//! started run after all (from their `request.pb`), and the rest become WORKER_FAILED.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::attempt::Attempt;
use super::kill::remove_leftovers;
use super::launch::drive;
use super::seams::Seams;
use super::state::TaskState;
use super::store;
use super::watch::watch_until_exit;
use super::{DEFAULT_GRACE_MS, Inner, lock};
use crate::supervisor::handle::Supervisor;
use crate::taskdir;

/// Takes over the attempts a previous run of the worker left in the state directory.
pub(super) fn adopt_all(inner: &Arc<Inner>) {
    // A supervisor started a moment before the stop may not have recorded itself yet: it is
    // found by its command line, and given a moment to (it does so first thing).
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    for (pid, dir) in inner.seams.spawner.running_under(&store::tasks_dir(&inner.config.state_dir)) {
        while !dir.join(taskdir::PID).exists()
            && Path::new(&format!("/proc/{pid}")).exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let mut again = Vec::new();
    for (dir, meta) in store::scan(&inner.config.state_dir) {
        let task_id = meta.task_id.clone();
        let attempt = Attempt::new(meta, dir, TaskState::Pending, inner.next_seq());
        let exit_recorded = attempt.dir.join(taskdir::EXIT).exists();
        let ended = if exit_recorded { None } else { store::recorded_end(&attempt.dir) };
        let live = if exit_recorded || ended.is_some() { None } else { inner.seams.spawner.find(&attempt.dir) };
        let kill_request: Option<taskdir::KillRequest> = taskdir::read_json(&attempt.dir, taskdir::KILL).ok().flatten();
        if let Some(k) = &kill_request {
            // The kill as it was asked for: its grace, and a worker failure's reason.
            *lock(&attempt.kill.grace_ms) = Some(k.grace_ms);
            *lock(&attempt.kill.worker_failure) = k.worker_failure.clone();
        }
        let kill_requested = kill_request.is_some() || attempt.dir.join(taskdir::KILL).exists();
        if kill_requested && kill_request.is_none() {
            *lock(&attempt.kill.grace_ms) = Some(DEFAULT_GRACE_MS);
        }
        lock(&inner.tasks).entry(task_id).or_default().push(attempt.clone());
        if exit_recorded {
            // Ended while we were away (or long ago): its real exit.
            attempt.finish_from_exit(inner);
        } else if let Some(record) = ended {
            // Ended before a supervisor ran it (killed while PENDING, a failed preparation):
            // as it was reported.
            attempt.finish_recorded(inner, record);
        } else if let Some(sup) = live {
            let started: Option<taskdir::Started> = taskdir::read_json(&attempt.dir, taskdir::STARTED).ok().flatten();
            {
                let mut st = lock(&attempt.status);
                st.supervisor = Some(sup);
                st.started = started.is_some();
                st.state = if started.is_some() { TaskState::Running } else { TaskState::Building };
                st.started_at_ms = started.map(|s| s.started_at_ms).unwrap_or(0);
            }
            for conflict in lock(&inner.ports).hold(attempt.meta.ports.values().copied(), Some(sup.id.pid)) {
                // Its supervisor did not hold the port (started by an older worker, or killed
                // with its worker before it took it), and another task has it now.
                tracing::warn!(task_id = %attempt.meta.task_id, %conflict, "a running task's port is not its own alone");
            }
            // Its supervisor holds the cache entries (and ports) it uses; they are marked used
            // when it ends.
            if let Ok(Some(spec)) = taskdir::read_json::<crate::runtime::LaunchSpec>(&attempt.dir, taskdir::SPEC) {
                attempt.uses(spec.leases);
            }
            let permit = inner.slots.clone().try_acquire_owned().ok();
            tracing::info!(task_id = %attempt.meta.task_id, pid = sup.id.pid, "adopted a running task");
            if kill_requested {
                // KillTask was answered: the kill may have come while the supervisor was still
                // starting the command, and never reached it. Once more (it ignores a second).
                inner.seams.spawner.deliver_kill(&sup);
            }
            if let Some(path) = attempt.meta.bundle.clone() {
                // The running task's bundle must not be evicted: hold it again.
                let (inner, attempt) = (inner.clone(), attempt.clone());
                inner.background.clone().spawn(async move {
                    match inner.envs.bundle_cache().await {
                        Ok(cache) => match cache.get(&path, None, |_| {}).await {
                            Ok(bundle) => {
                                let lease = inner.envs.bundle_lease(&bundle);
                                attempt.hold_bundle(bundle, lease);
                            }
                            Err(e) => tracing::warn!(%path, error = %e, "holding an adopted task's bundle"),
                        },
                        Err(e) => tracing::warn!(error = %e, "opening the bundle cache"),
                    }
                });
            }
            inner.background.spawn(watch_until_exit(inner.clone(), attempt, sup, permit));
        } else if !attempt.dir.join(taskdir::PID).exists() && kill_requested {
            // Killed while PENDING or BUILDING, before the end was recorded: KillTask was
            // answered, so it stays killed (or WORKER_FAILED, for the worker's own reasons).
            attempt.finish_unstarted(inner);
            inner.background.spawn(clear_unstarted(
                inner.seams.clone(),
                attempt.dir.clone(),
                attempt.meta.cgroup.clone(),
            ));
        } else if !attempt.dir.join(taskdir::PID).exists() {
            // Accepted, PENDING or BUILDING: no supervisor ever ran the task. Its request is
            // on disk: it runs after all.
            again.push(attempt);
        } else {
            remove_leftovers(inner.seams.cgroups.as_ref(), &attempt.dir, attempt.meta.cgroup.as_deref());
            attempt.finish(
                inner,
                TaskState::WorkerFailed,
                -1,
                "the worker restarted and the task's supervisor was gone".into(),
                None,
            );
        }
    }
    // Keep tasks in attempt order.
    for attempts in lock(&inner.tasks).values_mut() {
        attempts.sort_by_key(|a| a.meta.attempt_id);
    }
    for attempt in again {
        run_again(inner, attempt);
    }
}

/// Starts again an attempt the previous run of the worker accepted but never started: from
/// its `request.pb`, after removing what a half-done preparation left.
fn run_again(inner: &Arc<Inner>, attempt: Arc<Attempt>) {
    let attempts = lock(&inner.tasks).get(&attempt.meta.task_id).cloned().unwrap_or_default();
    let position = attempts.iter().position(|a| Arc::ptr_eq(a, &attempt));
    if position.is_some_and(|i| i + 1 < attempts.len()) {
        attempt.finish(inner, TaskState::Killed, 0, "replaced by a newer attempt before it started".into(), None);
        return;
    }
    let previous = position.and_then(|i| i.checked_sub(1)).map(|i| attempts[i].clone());
    let spec = match inner.config.request_decoder {
        Some(decode) => std::fs::read(attempt.dir.join(store::REQUEST))
            .map_err(|e| e.to_string())
            .and_then(|raw| decode(&raw).map_err(|e| e.to_string()))
            .and_then(|spec| super::validate::validate(&spec).map(|()| spec).map_err(|e| e.to_string())),
        None => Err("this worker cannot read requests back".into()),
    };
    let spec = match spec {
        Ok(spec) => spec,
        Err(e) => {
            remove_leftovers(inner.seams.cgroups.as_ref(), &attempt.dir, attempt.meta.cgroup.as_deref());
            let error = format!("the worker restarted before the task started, and its request cannot be run: {e}");
            attempt.finish(inner, TaskState::WorkerFailed, -1, error, None);
            return;
        }
    };
    let conflicts = lock(&inner.ports).hold(attempt.meta.ports.values().copied(), None);
    if !conflicts.is_empty() {
        // Its ports were given out while no worker held them: the task would share them.
        let taken: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
        lock(&inner.ports).release(attempt.meta.ports.values().copied());
        remove_leftovers(inner.seams.cgroups.as_ref(), &attempt.dir, attempt.meta.cgroup.as_deref());
        let error =
            format!("the worker restarted before the task started, and its ports were taken: {}", taken.join(", "));
        attempt.finish(inner, TaskState::WorkerFailed, -1, error, None);
        return;
    }
    attempt.uses(lock(&inner.ports).leases(attempt.meta.ports.values().copied()));
    tracing::info!(task_id = %attempt.meta.task_id, attempt = attempt.meta.attempt_id, "running a task accepted before the restart");
    let inner = inner.clone();
    inner.background.clone().spawn(async move {
        clear_unstarted(inner.seams.clone(), attempt.dir.clone(), attempt.meta.cgroup.clone()).await;
        drive(inner, attempt, spec, previous).await;
    });
}

/// Removes what the previous run of the worker left of an attempt it never started: a build
/// it started (its own supervisor, writing into this task's log), the task's processes,
/// container state and cgroup, and what the preparation wrote.
async fn clear_unstarted(seams: Seams, dir: PathBuf, cgroup: Option<String>) {
    for (pid, build_dir) in seams.spawner.running_under(&dir) {
        let sup = seams.spawner.find(&build_dir).unwrap_or(Supervisor {
            id: taskdir::ProcessId::of(pid).unwrap_or(taskdir::ProcessId { pid, start_time: 0 }),
        });
        let request = taskdir::KillRequest { grace_ms: 0, worker_failure: None };
        if taskdir::write_json(&build_dir, taskdir::KILL, &request).is_ok() {
            seams.spawner.deliver_kill(&sup);
        }
        let _ = seams.spawner.wait_exit(sup).await;
    }
    let cgroups = seams.cgroups;
    let _ = tokio::task::spawn_blocking(move || {
        remove_leftovers(cgroups.as_ref(), &dir, cgroup.as_deref());
        taskdir::clear_preparation(&dir);
    })
    .await;
}
