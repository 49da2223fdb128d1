//! PENDING to RUNNING: accept an attempt (supersede an older one, refuse a duplicate, hand
//! out its ports), wait for the previous attempt's end and a slot, prepare its environment
//! ([`super::prepare`]), hold it under the controller lease, start its supervisor and wait
//! for it to say the command runs; then [`super::watch`] takes over.

use std::sync::Arc;

use super::attempt::Attempt;
use super::kill::release_rootfs;
use super::state::TaskState;
use super::store::{self, TaskMeta};
use super::watch::watch_until_exit;
use super::{DEFAULT_GRACE_MS, Inner, TaskError, lock};
use crate::env::{Preparing, TaskSpec};
use crate::supervisor::handle::Ready;
use crate::taskdir;

/// Registers a new attempt and starts its driver.
pub(super) fn accept(inner: &Arc<Inner>, spec: TaskSpec) -> Result<TaskState, TaskError> {
    let mut tasks = lock(&inner.tasks);
    let previous = tasks.get(&spec.task_id).and_then(|a| a.last().cloned());
    // On the newest wire the controller names attempts by uid: the same task and attempt id
    // under a fresh uid is another attempt once the old one ended (the reconcile rules of
    // `rpc/newest` have already dropped a duplicate of a live attempt).
    let uid_after_end = spec.attempt_uid.is_some() && previous.as_ref().is_some_and(|p| p.state().is_terminal());
    if let Some(prev) = previous.as_ref().filter(|_| !uid_after_end) {
        let current = prev.meta.attempt_id;
        if spec.attempt_id == current {
            return Err(TaskError::AlreadyExists { task_id: spec.task_id, attempt_id: spec.attempt_id });
        }
        if spec.attempt_id < current {
            return Err(TaskError::StaleAttempt { task_id: spec.task_id, attempt_id: spec.attempt_id, current });
        }
    }
    let port_numbers = if spec.ports.is_empty() {
        Vec::new()
    } else {
        let (first, last) = inner.config.port_range;
        lock(&inner.ports).allocate(spec.ports.len()).ok_or(TaskError::PortsExhausted {
            wanted: spec.ports.len(),
            first,
            last,
        })?
    };
    let ports = spec.ports.iter().cloned().zip(port_numbers).collect();
    let key = store::attempt_key(&spec.task_id, spec.attempt_id, spec.attempt_uid.as_deref());
    let meta = TaskMeta {
        task_id: spec.task_id.clone(),
        job_id: spec.job_id.clone(),
        task_index: spec.task_index,
        num_tasks: spec.num_tasks,
        attempt_id: spec.attempt_id,
        ports,
        timeout_s: spec.timeout.map(|t| t.as_secs()),
        created_at_ms: inner.seams.clock.now_ms(),
        cgroup: inner.cgroups.as_ref().map(|(_, parent)| format!("{parent}/{key}")),
        bundle: spec.bundle_gcs_path.clone(),
        attempt_uid: spec.attempt_uid.clone(),
        tpu: spec.tpu,
    };
    // A request may lower the worker's cap of its log, never raise it.
    let log_cap = match (spec.max_log_bytes, inner.config.bounds.max_log_bytes) {
        (Some(asked), Some(cap)) => Some(asked.min(cap)),
        (asked, cap) => cap.or(asked),
    };
    let dir = match store::create(&inner.config.state_dir, &meta, &spec.raw_request, log_cap) {
        Ok(d) => d,
        Err(e) => {
            lock(&inner.ports).release(meta.ports.values().copied());
            return Err(match e {
                // The attempt's directory is still there (its record was removed, its files
                // could not be): the attempt exists, as far as this worker can tell.
                crate::taskdir::FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                    TaskError::AlreadyExists { task_id: spec.task_id, attempt_id: spec.attempt_id }
                }
                e => e.into(),
            });
        }
    };
    let attempt = Attempt::new(meta, dir, TaskState::Pending, inner.next_seq());
    // Its supervisor keeps the ports reserved while the task runs, whatever its worker does.
    attempt.uses(lock(&inner.ports).leases(attempt.meta.ports.values().copied()));
    tasks.entry(spec.task_id.clone()).or_default().push(attempt.clone());
    drop(tasks);
    if let Some(prev) = &previous {
        // A newer attempt replaces the old one: end it first.
        let _ended = prev.request_kill(inner, DEFAULT_GRACE_MS);
    }
    attempt.emit(inner);
    inner.background.spawn(drive(inner.clone(), attempt, spec, previous));
    Ok(TaskState::Pending)
}

/// Drives an attempt from PENDING to its end.
pub(super) async fn drive(inner: Arc<Inner>, attempt: Arc<Attempt>, spec: TaskSpec, previous: Option<Arc<Attempt>>) {
    if let Some(prev) = previous {
        prev.wait_done().await;
    }
    let permit = tokio::select! {
        p = inner.slots.clone().acquire_owned() => p.ok(),
        _ = attempt.kill.notify.notified() => None,
    };
    let killed_early = |a: &Attempt| a.kill_requested().is_some();
    if permit.is_none() || killed_early(&attempt) {
        attempt.finish_unstarted(&inner);
        return;
    }
    attempt.set(&inner, TaskState::Building, "preparing the environment");
    let workdir = attempt.dir.join(taskdir::WORKDIR);
    let prepared = match store::write_workdir_files(&workdir, &spec.workdir_files) {
        Ok(()) => inner.envs.prepare(&spec, &Preparation { inner: &inner, attempt: &attempt }).await,
        Err(e) => Err(crate::env::EnvError::WorkdirFiles(e)),
    };
    // Whatever the task fetched, built or pulled is in the caches now: the budget looks.
    inner.janitor.kick();
    let launch = match prepared {
        Ok(l) => l,
        Err(error) => {
            // An image rootfs may already be mounted when a later step failed.
            release_rootfs(&attempt.dir);
            if attempt.kill_requested().is_some() {
                // Killed while preparing (a setup step ended by the kill fails on its way out).
                attempt.finish_unstarted(&inner);
            } else {
                attempt.finish(&inner, TaskState::Failed, -1, error.to_string(), None);
            }
            return;
        }
    };
    if let Err(e) = taskdir::write_json(&attempt.dir, taskdir::SPEC, &launch) {
        release_rootfs(&attempt.dir);
        attempt.finish(&inner, TaskState::Failed, -1, format!("writing the launch spec: {e}"), None);
        return;
    }
    if let Some(lease) = &inner.lease {
        // A task runs only while the worker holds its controller lease, and its supervisor
        // ends it when the lease lapses.
        if let Err(error) = admit(&inner, &attempt, lease).await {
            release_rootfs(&attempt.dir);
            attempt.finish(&inner, TaskState::WorkerFailed, 0, error, None);
            return;
        }
        if let Err(e) = taskdir::write_json(&attempt.dir, crate::supervisor::lease::FENCE, &lease.fence_record()) {
            release_rootfs(&attempt.dir);
            attempt.finish(&inner, TaskState::Failed, -1, format!("writing the task's fence: {e}"), None);
            return;
        }
    }
    if killed_early(&attempt) {
        release_rootfs(&attempt.dir);
        attempt.finish_unstarted(&inner);
        return;
    }
    let (sup, ready) = match inner.seams.spawner.spawn(&inner.config.supervisor_exe, &attempt.dir) {
        Ok(s) => s,
        Err(e) => {
            release_rootfs(&attempt.dir);
            let exe = inner.config.supervisor_exe.display();
            attempt.finish(&inner, TaskState::Failed, -1, format!("starting the supervisor {exe}: {e}"), None);
            return;
        }
    };
    lock(&attempt.status).supervisor = Some(sup);
    attempt.set(&inner, TaskState::Building, "starting the container");
    if ready.await == Ready::Started {
        {
            let mut st = lock(&attempt.status);
            st.started = true;
        }
        attempt.set(&inner, TaskState::Running, "");
        // A kill that came while the supervisor was starting the task is delivered now.
        if let Some(grace) = attempt.kill_requested() {
            let request = taskdir::KillRequest { grace_ms: grace, worker_failure: attempt.kill_cause() };
            if taskdir::write_json(&attempt.dir, taskdir::KILL, &request).is_ok() {
                inner.seams.spawner.deliver_kill(&sup);
            }
        }
    }
    watch_until_exit(inner, attempt, sup, permit).await;
}

/// Holds an attempt until it may start under the lease: the worker must hold it, and the
/// controller must say it still means the attempt here. A RunTask sent before a partition can
/// be delivered when the partition heals — before or after the lease is renewed — once the
/// controller has run the task elsewhere: run then, it would be a second live copy. `Err`: the
/// controller does not mean it. Returns at once when a kill is requested (the caller ends it).
async fn admit(inner: &Inner, attempt: &Attempt, lease: &super::lease::Lease) -> Result<(), String> {
    let mut checked = false;
    loop {
        if attempt.kill_requested().is_some() {
            return Ok(());
        }
        if !lease.valid() {
            attempt.set(inner, TaskState::Building, "waiting for contact with the controller");
            tokio::select! {
                _ = lease.wait_valid() => {}
                _ = attempt.kill.notify.notified() => {}
            }
            continue;
        }
        if checked {
            return Ok(());
        }
        let Some(check) = lease.check.get() else { return Ok(()) };
        attempt.set(inner, TaskState::Building, "checking with the controller");
        let asked = super::lease::AttemptOf {
            job_id: attempt.meta.job_id.clone(),
            task_index: attempt.meta.task_index,
            task_id: attempt.meta.task_id.clone(),
            attempt_id: attempt.meta.attempt_id,
        };
        match check(asked).await {
            Some(true) => checked = true,
            Some(false) => {
                return Err("the controller does not run this attempt here (a RunTask that arrived late, or \
                            not from it)"
                    .into());
            }
            None => {
                tokio::select! {
                    _ = inner.seams.clock.sleep(std::time::Duration::from_secs(1)) => {}
                    _ = attempt.kill.notify.notified() => {}
                }
            }
        }
    }
}

/// The attempt as [`crate::env::Environments::prepare`] sees it: its progress shows in its
/// status, and what it is given is held until it ends.
struct Preparation<'a> {
    inner: &'a Inner,
    attempt: &'a Attempt,
}

impl Preparing for Preparation<'_> {
    fn dir(&self) -> &std::path::Path {
        &self.attempt.dir
    }

    fn id(&self) -> String {
        let meta = &self.attempt.meta;
        store::attempt_key(&meta.task_id, meta.attempt_id, meta.attempt_uid.as_deref())
    }

    fn venv_key(&self) -> String {
        store::task_key(&self.attempt.meta.task_id, self.attempt.meta.attempt_id)
    }

    fn ports(&self) -> &std::collections::BTreeMap<String, u16> {
        &self.attempt.meta.ports
    }

    fn cgroup(&self) -> Option<&str> {
        self.attempt.meta.cgroup.as_deref()
    }

    fn progress(&self, message: &str) {
        self.attempt.set(self.inner, TaskState::Building, message);
    }

    fn killed(&self) -> bool {
        self.attempt.kill_requested().is_some()
    }

    fn used(&self, kind: crate::cache::Kind, from_cache: bool) {
        self.inner.janitor.counters().used(kind, from_cache);
    }

    fn hold_bundle(&self, bundle: crate::bundle::Bundle, lease: crate::cachelock::Lease) {
        self.attempt.hold_bundle(bundle, lease);
    }

    fn hold_image(&self, image: &crate::env::image::Image) {
        self.attempt.hold_image(image);
    }

    fn hold_venv(&self, venv: &crate::env::PythonEnv, lease: crate::cachelock::Lease) {
        self.attempt.set_build(venv, lease);
    }

    fn built_image(&self, from_cache: bool, tag: String) {
        self.attempt.set_image_build(from_cache, tag);
    }

    fn leases(&self) -> Vec<crate::cachelock::Lease> {
        self.attempt.leases()
    }
}
