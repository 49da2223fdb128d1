//! Tasks and their attempts: the waiting queue, resources held on workers, assignment and RunTask, the outcome of a dispatch, reports from workers, and status checks.

use std::collections::BTreeMap;

use super::{DispatchOutcome, Effect, State, Verified};
use crate::model::{Attempt, now_ms, task_state, task_terminal};
use crate::scheduler::Need;
use iris_wire::proto::controller::{self as pc};
use iris_wire::proto::{TaskState, worker};

impl State {
    pub(super) fn queue(&mut self, id: &str) {
        self.seq += 1;
        self.pending.insert((self.seq, id.to_string()));
        self.pending_seq.insert(id.to_string(), self.seq);
    }

    pub(super) fn unqueue(&mut self, id: &str) {
        if let Some(seq) = self.pending_seq.remove(id) {
            self.pending.remove(&(seq, id.to_string()));
        }
    }

    pub(super) fn need_of(&self, job_id: &str) -> Need {
        self.jobs.get(job_id).map(|j| Need::of(j.request.resources.as_ref())).unwrap_or_default()
    }

    /// Counts the task's resources on the worker.
    pub(super) fn hold(&mut self, id: &str, worker_id: &str) {
        let Some(t) = self.tasks.get(id) else { return };
        let need = self.need_of(&t.job_id).usage();
        if let Some(w) = self.workers.get_mut(worker_id)
            && w.tasks.insert(id.to_string())
        {
            w.used.cpu_millicores += need.cpu_millicores;
            w.used.memory_bytes += need.memory_bytes;
            w.used.gpus += need.gpus;
        }
    }

    /// Gives the task's resources back to its worker.
    pub(super) fn release(&mut self, id: &str) {
        let Some(t) = self.tasks.get(id) else { return };
        let need = self.need_of(&t.job_id).usage();
        if let Some(w) = self.workers.get_mut(&t.worker_id)
            && w.tasks.remove(id)
        {
            w.used.cpu_millicores -= need.cpu_millicores;
            w.used.memory_bytes -= need.memory_bytes;
            w.used.gpus -= need.gpus;
        }
    }

    /// A terminal state for the task (no more attempts).
    pub(super) fn finish_task(&mut self, id: &str, state: TaskState, exit_code: i32, error: String, now: i64) {
        self.release(id);
        self.unqueue(id);
        let Some(t) = self.tasks.get_mut(id) else { return };
        if let Some(a) = t.current_attempt()
            && !task_terminal(a.state)
        {
            a.state = state;
            a.exit_code = exit_code;
            a.error = error.clone();
            a.finished_ms = now;
        }
        t.state = state;
        t.exit_code = exit_code;
        t.error = error;
        t.finished_ms = now;
        self.dirty.tasks.insert(id.to_string());
    }

    /// The current attempt ended with `state` (from a report, a dead worker or a failed
    /// dispatch): the task succeeds, is retried, or fails; then its job is recomputed.
    pub(super) fn end_attempt(
        &mut self,
        id: &str,
        state: TaskState,
        exit_code: i32,
        error: String,
        worker_failure: bool,
        now: i64,
    ) {
        let Some(t) = self.tasks.get(id) else { return };
        let job_id = t.job_id.clone();
        let Some(job) = self.jobs.get(&job_id) else { return };
        let (max_fail, max_preempt) = (job.request.max_retries_failure, job.request.max_retries_preemption);
        if state == TaskState::Succeeded {
            self.finish_task(id, state, exit_code, error, now);
            self.update_job(&job_id, now);
            return;
        }
        self.release(id);
        let Some(t) = self.tasks.get_mut(id) else { return };
        if let Some(a) = t.current_attempt() {
            a.state = state;
            a.exit_code = exit_code;
            a.error = error.clone();
            a.finished_ms = now;
            a.is_worker_failure = worker_failure;
        }
        let retry = if worker_failure {
            t.preemptions += 1;
            t.preemptions <= max_preempt
        } else {
            t.failures += 1;
            t.failures <= max_fail
        };
        if let Some(job) = self.jobs.get_mut(&job_id) {
            if worker_failure {
                job.rec.preemption_count += 1;
            } else {
                job.rec.failure_count += 1;
            }
            self.dirty.jobs.insert(job_id.clone());
        }
        if retry {
            t.state = TaskState::Pending;
            t.exit_code = exit_code;
            t.error = error;
            t.worker_id.clear();
            t.worker_address.clear();
            t.dispatched = false;
            t.pending_since_ms = now;
            self.dirty.tasks.insert(id.to_string());
            self.queue(id);
        } else {
            self.finish_task(id, state, exit_code, error, now);
        }
        self.update_job(&job_id, now);
    }

    /// Assigns the task's next attempt to a worker and makes its RunTask.
    pub(super) fn assign(&mut self, id: &str, worker_id: &str, now: i64) {
        let Some(address) = self.workers.get(worker_id).map(|w| w.rec.address.clone()) else { return };
        self.unqueue(id);
        let Some(t) = self.tasks.get_mut(id) else { return };
        t.attempt_id += 1;
        t.worker_id = worker_id.to_string();
        t.worker_address = address;
        t.dispatched = false;
        t.attempts.push(Attempt {
            attempt_id: t.attempt_id,
            worker_id: worker_id.to_string(),
            state: TaskState::Pending,
            started_ms: now,
            ..Default::default()
        });
        self.dirty.tasks.insert(id.to_string());
        self.hold(id, worker_id);
        if let Some(e) = self.dispatch_effect(id) {
            self.effects.push(e);
        }
    }

    pub(super) fn dispatch_effect(&self, id: &str) -> Option<Effect> {
        let t = self.tasks.get(id)?;
        let job = self.jobs.get(&t.job_id)?;
        let r = &job.request;
        let (bundle_gcs_path, bundle_sha256) = match job.rec.inline_bundle.as_str() {
            "" => (r.bundle_gcs_path.clone(), r.bundle_sha256.clone()),
            sha => (super::super::bundles::url(&self.knobs.bundle_base, sha), sha.to_string()),
        };
        let request = worker::RunTaskRequest {
            job_id: t.job_id.clone(),
            task_id: t.task_id.clone(),
            task_index: t.index,
            num_tasks: job.rec.num_tasks,
            serialized_entrypoint: r.serialized_entrypoint.clone(),
            environment: r.environment.clone(),
            bundle_gcs_path,
            resources: r.resources.clone(),
            timeout_seconds: r.timeout_seconds,
            ports: r.ports.clone(),
            attempt_id: t.attempt_id,
            command: r.command.clone(),
            image: r.image.clone(),
            bundle_sha256,
            workdir_files: Default::default(),
        };
        Some(Effect::Dispatch {
            task_id: t.task_id.clone(),
            attempt_id: t.attempt_id,
            worker_id: t.worker_id.clone(),
            address: t.worker_address.clone(),
            request: Box::new(request),
        })
    }

    /// The outcome of a RunTask.
    pub fn dispatched(&mut self, id: &str, attempt_id: i32, worker_id: &str, outcome: DispatchOutcome) {
        let now = now_ms();
        let Some(t) = self.tasks.get_mut(id) else { return };
        if t.attempt_id != attempt_id || t.worker_id != worker_id || task_terminal(t.state) {
            return;
        }
        match outcome {
            DispatchOutcome::Accepted(state) => {
                // Not written on its own: a resumed controller that finds it unset sends the
                // RunTask again, and the worker answers ALREADY_EXISTS.
                if !t.dispatched {
                    t.dispatched = true;
                    t.dispatched_ms = now;
                }
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.rec.consecutive_failures = 0;
                }
                if matches!(state, TaskState::Running | TaskState::Building) {
                    self.set_running(id, state, now);
                }
            }
            DispatchOutcome::Refused(error) => {
                self.end_attempt(
                    id,
                    TaskState::Failed,
                    0,
                    format!("worker {worker_id} refused the task: {error}"),
                    false,
                    now,
                );
            }
            DispatchOutcome::Unknown(error) => {
                tracing::warn!(task_id = %id, %worker_id, %error, "RunTask may have landed: checking with the worker");
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.rec.consecutive_failures += 1;
                    w.suspect_until_ms = now + self.knobs.suspect_for.as_millis() as i64;
                    self.dirty.workers.insert(worker_id.to_string());
                }
                // Counted as sent: a heartbeat that does not list it soon has it checked
                // (GetTaskStatus), and a worker that died has it moved after its fence.
                if let Some(t) = self.tasks.get_mut(id)
                    && !t.dispatched
                {
                    t.dispatched = true;
                    t.dispatched_ms = now;
                    self.dirty.tasks.insert(id.to_string());
                }
            }
            DispatchOutcome::Unreachable(error) => {
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.rec.consecutive_failures += 1;
                    w.suspect_until_ms = now + self.knobs.suspect_for.as_millis() as i64;
                    w.last_dispatch_error = error.clone();
                    self.dirty.workers.insert(worker_id.to_string());
                }
                // Not the task's fault and it never ran: back in the queue, keeping its
                // place in time (the scheduling timeout still bounds the wait).
                self.release(id);
                let Some(t) = self.tasks.get_mut(id) else { return };
                if let Some(a) = t.current_attempt() {
                    a.state = TaskState::WorkerFailed;
                    a.error = format!("dispatch to worker {worker_id} failed: {error}");
                    a.finished_ms = now;
                    a.is_worker_failure = true;
                }
                t.state = TaskState::Pending;
                t.worker_id.clear();
                t.worker_address.clear();
                self.dirty.tasks.insert(id.to_string());
                self.queue(id);
            }
        }
    }

    pub(super) fn set_running(&mut self, id: &str, state: TaskState, now: i64) {
        let Some(t) = self.tasks.get_mut(id) else { return };
        if t.state != state {
            t.state = state;
            if t.started_ms == 0 {
                t.started_ms = now;
            }
            if let Some(a) = t.current_attempt() {
                a.state = state;
            }
            self.dirty.tasks.insert(id.to_string());
            let job_id = t.job_id.clone();
            self.update_job(&job_id, now);
        }
    }

    /// ReportTaskState from a worker. Reports of older attempts, of other workers or of
    /// ended tasks are ignored.
    pub fn report(&mut self, r: &pc::ReportTaskStateRequest) {
        let now = now_ms();
        let Some(t) = self.tasks.get_mut(&r.task_id) else { return };
        if t.attempt_id != r.attempt_id || t.worker_id != r.worker_id {
            return;
        }
        let state = task_state(r.state);
        if task_terminal(t.state) {
            // Its job ended (a sibling failed, or a terminate) before this attempt's success
            // was heard of: what succeeded stays SUCCEEDED.
            if t.ended_with_job && state == TaskState::Succeeded {
                t.ended_with_job = false;
                t.state = TaskState::Succeeded;
                t.exit_code = 0;
                t.error.clear();
                if let Some(a) = t.current_attempt() {
                    a.state = TaskState::Succeeded;
                    a.exit_code = 0;
                    a.error.clear();
                }
                self.dirty.tasks.insert(r.task_id.clone());
            }
            return;
        }
        if !t.dispatched {
            t.dispatched = true;
            t.dispatched_ms = now;
            self.dirty.tasks.insert(r.task_id.clone());
        }
        match state {
            TaskState::Building | TaskState::Running => self.set_running(&r.task_id, state, now),
            TaskState::Succeeded | TaskState::Failed | TaskState::Killed => {
                self.end_attempt(&r.task_id, state, r.exit_code, r.error.clone(), false, now);
            }
            TaskState::WorkerFailed => self.end_attempt(&r.task_id, state, r.exit_code, r.error.clone(), true, now),
            _ => {}
        }
    }

    /// The answer to a [`Effect::Verify`].
    pub fn verified(&mut self, id: &str, attempt_id: i32, worker_id: &str, v: Verified) {
        self.verifying.remove(id);
        let now = now_ms();
        let Some(t) = self.tasks.get(id) else { return };
        if t.attempt_id != attempt_id || t.worker_id != worker_id || task_terminal(t.state) {
            return;
        }
        match v {
            Verified::NotFound => {
                self.end_attempt(
                    id,
                    TaskState::WorkerFailed,
                    0,
                    format!("worker {worker_id} lost the task"),
                    true,
                    now,
                );
            }
            Verified::Status { attempt_id: theirs, .. } if theirs < attempt_id => self.end_attempt(
                id,
                TaskState::WorkerFailed,
                0,
                format!("worker {worker_id} lost the attempt"),
                true,
                now,
            ),
            Verified::Status { state, exit_code, error, .. } => {
                let report = pc::ReportTaskStateRequest {
                    worker_id: worker_id.to_string(),
                    task_id: id.to_string(),
                    state: state.into(),
                    exit_code,
                    error,
                    attempt_id,
                    ..Default::default()
                };
                self.report(&report);
            }
        }
    }

    /// Records a task's ports as the worker allocated them.
    pub fn set_ports(&mut self, id: &str, attempt_id: i32, ports: BTreeMap<String, i32>) {
        if let Some(t) = self.tasks.get_mut(id)
            && t.attempt_id == attempt_id
        {
            t.ports = ports;
            self.dirty.tasks.insert(id.to_string());
        }
    }
}
