//! Ending an attempt: kill requests (KillTask, a controller's reset, a lapsed lease), parked
//! until the supervisor can take them, and the cleanup of what a dead supervisor left.
//!
//! The escalation itself (SIGTERM to every process of the task, SIGKILL after the grace) is
//! the supervisor's (see `supervisor::run`): the manager writes the request into `kill.json`
//! and tells the supervisor through [`super::seams::Spawner::deliver_kill`].

use std::path::Path;

use super::attempt::Attempt;
use super::seams::Cgroups;
use super::state::TaskState;
use super::{Inner, lock};
use crate::taskdir;

impl Attempt {
    /// Ends the attempt: directly through its supervisor once the command runs, otherwise
    /// by parking the request for the driver (a PENDING or BUILDING attempt just stops).
    /// Asks for the attempt's end; `Err` with its state when it has ended already.
    /// The request is on disk before this returns (and so before KillTask is answered): a
    /// worker restarted after it finds an attempt that never started KILLED, and tells an
    /// adopted supervisor that had not started the command yet.
    pub(crate) fn request_kill(&self, inner: &Inner, grace_ms: u64) -> Result<(), TaskState> {
        self.request_kill_for(inner, grace_ms, None)
    }

    /// [`Self::request_kill`] for one of the worker's own reasons (`worker_failure`: a reset,
    /// a lapsed lease), which makes the attempt WORKER_FAILED. The first request's reason
    /// stays: a later KillTask does not turn a worker failure into a user's kill, nor the
    /// reverse.
    pub(crate) fn request_kill_for(
        &self,
        inner: &Inner,
        grace_ms: u64,
        worker_failure: Option<String>,
    ) -> Result<(), TaskState> {
        let st = lock(&self.status);
        if st.state.is_terminal() {
            return Err(st.state);
        }
        let cause = {
            let mut grace = lock(&self.kill.grace_ms);
            let mut cause = lock(&self.kill.worker_failure);
            if grace.is_none() {
                *cause = worker_failure;
            }
            *grace = Some(grace_ms);
            cause.clone()
        };
        let request = taskdir::KillRequest { grace_ms, worker_failure: cause };
        if let Err(e) = taskdir::write_json(&self.dir, taskdir::KILL, &request) {
            tracing::warn!(task_id = %self.meta.task_id, error = %e, "recording a kill request");
        }
        if let (Some(sup), true) = (st.supervisor, st.started) {
            inner.seams.spawner.deliver_kill(&sup);
        } else if !st.started {
            // The newest wire's setup step runs under a supervisor of its own: it ends now,
            // not when its commands are done (a venv build is left to finish: other tasks may
            // wait for the same venv).
            // The request is left in its directory even before its supervisor can be found
            // (it reads it once it runs); the signal goes to one that can.
            let setup = self.dir.join(taskdir::SETUP);
            if setup.is_dir()
                && taskdir::write_json(&setup, taskdir::KILL, &request).is_ok()
                && let Some(sup) = inner.seams.spawner.find(&setup)
            {
                inner.seams.spawner.deliver_kill(&sup);
            }
        }
        drop(st);
        self.kill.notify.notify_one();
        Ok(())
    }

    pub(super) fn kill_requested(&self) -> Option<u64> {
        *lock(&self.kill.grace_ms)
    }

    pub(super) fn kill_cause(&self) -> Option<String> {
        lock(&self.kill.worker_failure).clone()
    }

    /// Ends an attempt killed before its supervisor started the command.
    pub(super) fn finish_unstarted(&self, inner: &Inner) {
        match self.kill_cause() {
            Some(cause) => self.finish(inner, TaskState::WorkerFailed, 0, cause, None),
            None => self.finish(inner, TaskState::Killed, 0, "killed before it started".into(), None),
        }
    }
}

/// Unmounts the task's image rootfs, if it has one (before a supervisor exists to do it).
pub(super) fn release_rootfs(dir: &Path) {
    crate::runtime::rootfs::release(dir);
}

/// Removes what a dead supervisor could not: the task's processes, container state, cgroup,
/// and the overlay mount of its image.
pub(super) fn remove_leftovers(cgroups: &dyn Cgroups, dir: &Path, cgroup: Option<&str>) {
    if let Some(path) = cgroup {
        cgroups.kill_all(path);
    }
    #[cfg(feature = "container")]
    crate::runtime::container::remove_leftover(dir);
    release_rootfs(dir);
    if let Some(path) = cgroup {
        cgroups.remove(path);
    }
}
