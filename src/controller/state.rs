//! The controller's state machine: jobs → tasks → attempts on workers, retries, aggregation,
//! worker liveness and endpoints. Everything here is synchronous and runs under one lock;
//! calls to workers are returned as [`Effect`]s that [`super::dispatch`] makes after the lock
//! is released, and their outcomes come back through [`State::dispatched`] and
//! [`State::verified`]. Changed rows are written by [`State::flush`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

/// The most tasks one job may have.
pub const MAX_REPLICAS: i32 = 100_000;

/// Added to a worker's fence before its tasks move (see the lease module).
const FENCE_MARGIN_MS: i64 = crate::supervisor::lease::CONTROLLER_MARGIN.as_millis() as i64;

use super::ControllerError;
use super::model::{
    Attempt, EndpointRec, Job, JobRecord, Task, WorkerRec, WorkerRecord, job_terminal, now_ms, task_terminal,
};
use super::scheduler::{self, Need};
use super::store::{Batch, Store, StoreError};
use crate::proto::controller::{self as pc, LaunchJobRequest};
use crate::proto::{JobState, TaskState, worker};

/// A call to make to a worker once the lock is released.
#[derive(Debug, Clone)]
pub enum Effect {
    /// RunTask for the task's current attempt.
    Dispatch {
        task_id: String,
        attempt_id: i32,
        worker_id: String,
        address: String,
        request: Box<worker::RunTaskRequest>,
    },
    /// KillTask (5 s grace).
    Kill { worker_id: String, address: String, task_id: String },
    /// GetTaskStatus: the worker's heartbeat no longer lists a task we think it runs.
    Verify { task_id: String, attempt_id: i32, worker_id: String, address: String },
}

/// How a RunTask call ended.
#[derive(Debug, Clone)]
pub enum DispatchOutcome {
    Accepted(i32),
    /// The worker refused the request itself (e.g. INVALID_ARGUMENT): the attempt fails.
    Refused(String),
    /// The worker could not be reached (the request never left): it becomes suspect and the
    /// task waits for another worker.
    Unreachable(String),
    /// The call failed after the request may have reached the worker (no answer in time, a
    /// connection cut mid-call): the worker becomes suspect, but the task stays assigned
    /// until the worker's heartbeats or a status check tell whether it runs there (running it
    /// elsewhere now could run it twice).
    Unknown(String),
}

/// What a worker said about a task we asked about.
#[derive(Debug, Clone)]
pub enum Verified {
    /// The worker's current attempt and its state (with exit code and error when ended).
    Status {
        attempt_id: i32,
        state: i32,
        exit_code: i32,
        error: String,
        finished_ms: i64,
    },
    NotFound,
}

/// Tunables of the state machine.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub worker_timeout: Duration,
    /// How long a worker is left out of placement after a failed dispatch.
    pub suspect_for: Duration,
    /// The controller's URL as workers reach it now: a job's inline bundle is dispatched as
    /// `<bundle_base>/bundles/<sha256>.zip`.
    pub bundle_base: String,
}

#[derive(Default)]
struct Dirty {
    new_jobs: BTreeSet<String>,
    jobs: BTreeSet<String>,
    deleted_jobs: Vec<String>,
    tasks: BTreeSet<String>,
    workers: BTreeSet<String>,
    endpoints: BTreeSet<String>,
    deleted_endpoints: BTreeSet<String>,
}

/// All of the controller's state.
pub struct State {
    pub jobs: BTreeMap<String, Job>,
    pub tasks: BTreeMap<String, Task>,
    pub workers: BTreeMap<String, WorkerRec>,
    pub endpoints: BTreeMap<String, EndpointRec>,
    /// Tasks waiting for a worker, in arrival order.
    pending: BTreeSet<(u64, String)>,
    pending_seq: BTreeMap<String, u64>,
    seq: u64,
    next_id: u64,
    verifying: HashSet<String>,
    dirty: Dirty,
    effects: Vec<Effect>,
    store: Store,
    knobs: Knobs,
    /// Changes made so far (the group commit compares it with what is on disk).
    pub changes: u64,
    /// The time each placement decision took (ns per task), for the benchmark; bounded.
    pub placement_latencies_ns: Vec<u64>,
}

/// Placement timings kept at most (the benchmark reads them).
const MAX_LATENCIES: usize = 1 << 20;

fn invalid(field: &str, reason: impl Into<String>) -> ControllerError {
    ControllerError::Invalid { field: field.to_string(), reason: reason.into() }
}

pub fn task_id(job_id: &str, index: i32) -> String {
    format!("{job_id}/task-{index}")
}

impl State {
    /// The state in `store`, resumed: workers get a fresh heartbeat grace, resources held by
    /// active tasks are counted again, waiting tasks queue again, and attempts whose RunTask
    /// was never acknowledged are sent again (a worker that has it answers ALREADY_EXISTS).
    pub fn open(store: Store, knobs: Knobs) -> Result<State, StoreError> {
        let loaded = store.load()?;
        let mut s = State {
            jobs: BTreeMap::new(),
            tasks: BTreeMap::new(),
            workers: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            pending: BTreeSet::new(),
            pending_seq: BTreeMap::new(),
            seq: 0,
            next_id: 0,
            verifying: HashSet::new(),
            dirty: Dirty::default(),
            effects: Vec::new(),
            store,
            knobs,
            placement_latencies_ns: Vec::new(),
            changes: 0,
        };
        let now = now_ms();
        for mut w in loaded.workers {
            w.rec.last_heartbeat_ms = now;
            s.workers.insert(w.rec.worker_id.clone(), w);
        }
        for j in loaded.jobs {
            s.jobs.insert(j.rec.job_id.clone(), j);
        }
        for e in loaded.endpoints {
            if let Some(n) = e.endpoint_id.strip_prefix("ep-").and_then(|n| n.parse::<u64>().ok()) {
                s.next_id = s.next_id.max(n + 1);
            }
            s.endpoints.insert(e.endpoint_id.clone(), e);
        }
        let mut tasks = loaded.tasks;
        tasks.sort_by(|a, b| (a.pending_since_ms, &a.task_id).cmp(&(b.pending_since_ms, &b.task_id)));
        for t in tasks {
            let id = t.task_id.clone();
            let terminal = task_terminal(t.state);
            let job_ended = s.jobs.get(&t.job_id).is_none_or(|j| job_terminal(j.rec.state));
            s.tasks.insert(id.clone(), t);
            if terminal || job_ended {
                continue;
            }
            let (worker_id, dispatched) = match s.tasks.get(&id) {
                Some(t) => (t.worker_id.clone(), t.dispatched),
                None => continue,
            };
            if worker_id.is_empty() {
                s.queue(&id);
            } else if s.workers.contains_key(&worker_id) {
                s.hold(&id, &worker_id);
                if !dispatched && let Some(e) = s.dispatch_effect(&id) {
                    s.effects.push(e);
                }
            } else {
                s.end_attempt(&id, TaskState::WorkerFailed, 0, format!("worker {worker_id} is unknown"), true, now);
            }
        }
        Ok(s)
    }

    /// Writes every changed row in one transaction.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let d = std::mem::take(&mut self.dirty);
        let batch = Batch {
            new_jobs: d.new_jobs.iter().filter_map(|id| self.jobs.get(id)).collect(),
            jobs: d
                .jobs
                .iter()
                .filter(|id| !d.new_jobs.contains(*id))
                .filter_map(|id| self.jobs.get(id).map(|j| &j.rec))
                .collect(),
            deleted_jobs: d.deleted_jobs.iter().map(String::as_str).collect(),
            tasks: d.tasks.iter().filter_map(|id| self.tasks.get(id)).collect(),
            workers: d.workers.iter().filter_map(|id| self.workers.get(id)).collect(),
            endpoints: d.endpoints.iter().filter_map(|id| self.endpoints.get(id)).collect(),
            deleted_endpoints: d.deleted_endpoints.iter().map(String::as_str).collect(),
        };
        let written = self.store.write(&batch);
        drop(batch);
        if written.is_err() {
            // Keep the rows for the next try: nothing changed on disk.
            self.dirty = d;
        }
        written
    }

    /// Rows and transactions written so far.
    pub fn store_counts(&self) -> (u64, u64) {
        (self.store.rows_written, self.store.transactions)
    }

    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    // ----- jobs -----

    /// LaunchJob: validates, records the job and its tasks, queues them.
    pub fn launch(&mut self, req: LaunchJobRequest) -> Result<String, ControllerError> {
        self.launch_with_bundle(req, None)
    }

    /// LaunchJob of a request whose inline bundle the controller stored as `inline_bundle` (its
    /// sha256, see [`super::bundles`]): the job keeps the sha, each dispatch names the blob.
    pub fn launch_with_bundle(
        &mut self,
        req: LaunchJobRequest,
        inline_bundle: Option<String>,
    ) -> Result<String, ControllerError> {
        let has_command = req.command.as_ref().is_some_and(|c| !c.argv.is_empty());
        if req.serialized_entrypoint.is_empty() && !has_command {
            return Err(invalid(
                "serialized_entrypoint",
                "a job needs an entrypoint: serialized_entrypoint or command.argv",
            ));
        }
        if req.command.is_some() && !has_command {
            return Err(invalid("command.argv", "must not be empty"));
        }
        let replicas = match &req.resources {
            None => 1,
            // Iris's ResourceSpec.replicas defaults to 0 and its client always sends resources:
            // 0 means one task, as Iris's controller reads it.
            Some(r) if r.replicas == 0 => 1,
            Some(r) if r.replicas < 0 => {
                return Err(invalid("resources.replicas", format!("must be at least 1, not {}", r.replicas)));
            }
            // Each replica is a task row and a scheduling decision: a bound keeps one request
            // from exhausting the controller's memory.
            Some(r) if r.replicas > MAX_REPLICAS => {
                return Err(invalid("resources.replicas", format!("at most {MAX_REPLICAS}, not {}", r.replicas)));
            }
            Some(r) => r.replicas,
        };
        if let Some(r) = &req.resources {
            for (field, v) in [
                ("resources.cpu", i64::from(r.cpu)),
                ("resources.cpu_millicores", i64::from(r.cpu_millicores)),
                ("resources.memory_bytes", r.memory_bytes),
                ("resources.disk_bytes", r.disk_bytes),
            ] {
                if v < 0 {
                    return Err(invalid(field, "must not be negative"));
                }
            }
        }
        for (field, v) in [
            ("scheduling_timeout_seconds", req.scheduling_timeout_seconds),
            ("max_task_failures", req.max_task_failures),
            ("max_retries_failure", req.max_retries_failure),
            ("max_retries_preemption", req.max_retries_preemption),
            ("timeout_seconds", req.timeout_seconds),
        ] {
            if v < 0 {
                return Err(invalid(field, "must not be negative"));
            }
        }
        if !req.bundle_blob.is_empty() {
            // The service stores a blob and clears it before the request gets here.
            return Err(invalid("bundle_blob", "an inline bundle must be stored before the job is recorded"));
        }
        for (i, c) in req.constraints.iter().enumerate() {
            scheduler::validate_constraint(i, c).map_err(|(f, r)| invalid(&f, r))?;
        }
        if !req.parent_job_id.is_empty() && !self.jobs.contains_key(&req.parent_job_id) {
            return Err(ControllerError::NotFound { what: "parent_job_id", id: req.parent_job_id.clone() });
        }
        let now = now_ms();
        let job_id = if req.name.is_empty() {
            self.next_id += 1;
            format!("job-{now}-{}", self.next_id)
        } else {
            if req.name.len() > 200
                || !req.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@/".contains(c))
                || req.name.starts_with('/')
                || req.name.ends_with('/')
            {
                return Err(invalid("name", "use up to 200 of A-Z a-z 0-9 - _ . : @ /, not starting or ending with /"));
            }
            req.name.clone()
        };
        // A job's name is its id for good, as in Iris: running or finished, it is taken. Only the
        // same request again gets it: a client's retry of a launch whose answer it never got,
        // answered with the job that launch made, whatever its state.
        if let Some(old) = self.jobs.get(&job_id) {
            if old.request == req {
                return Ok(job_id);
            }
            return Err(ControllerError::AlreadyExists(job_id));
        }
        // A job no registered worker could hold waits (an autoscaler may bring a bigger
        // worker) until its scheduling timeout, if it has one; it shows why meanwhile.
        let need = Need::of(req.resources.as_ref());
        let impossible = scheduler::never_fits(&need, &req.constraints, self.workers.values());
        let job = Job {
            rec: JobRecord {
                job_id: job_id.clone(),
                state: JobState::Pending as i32,
                submitted_ms: now,
                parent_job_id: req.parent_job_id.clone(),
                num_tasks: replicas,
                status_message: impossible.unwrap_or_default(),
                inline_bundle: inline_bundle.unwrap_or_default(),
                ..Default::default()
            },
            request: req,
        };
        self.jobs.insert(job_id.clone(), job);
        self.dirty.new_jobs.insert(job_id.clone());
        for i in 0..replicas {
            let id = task_id(&job_id, i);
            self.tasks.insert(
                id.clone(),
                Task {
                    task_id: id.clone(),
                    job_id: job_id.clone(),
                    index: i,
                    state: TaskState::Pending as i32,
                    attempt_id: -1,
                    pending_since_ms: now,
                    ..Default::default()
                },
            );
            self.dirty.tasks.insert(id.clone());
            self.queue(&id);
        }
        Ok(job_id)
    }

    /// TerminateJob: kills every task, marks the job KILLED, terminates its children.
    pub fn terminate(&mut self, job_id: &str) -> Result<(), ControllerError> {
        let Some(job) = self.jobs.get(job_id) else {
            return Err(ControllerError::NotFound { what: "job_id", id: job_id.to_string() });
        };
        let now = now_ms();
        if job_terminal(job.rec.state) {
            self.terminate_children(job_id, now);
            return Ok(());
        }
        self.end_job(job_id, JobState::Killed, 0, "terminated by request".into(), now);
        Ok(())
    }

    fn terminate_children(&mut self, job_id: &str, now: i64) {
        let children: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.rec.parent_job_id == job_id && !job_terminal(j.rec.state))
            .map(|j| j.rec.job_id.clone())
            .collect();
        for c in children {
            self.end_job(&c, JobState::Killed, 0, format!("parent job {job_id} ended"), now);
        }
    }

    /// Ends a job: its active tasks are killed, its endpoints removed and, unless it
    /// succeeded, its children terminated.
    fn end_job(&mut self, job_id: &str, state: JobState, exit_code: i32, error: String, now: i64) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if job_terminal(job.rec.state) {
            return;
        }
        job.rec.state = state as i32;
        job.rec.exit_code = exit_code;
        job.rec.error = error;
        job.rec.finished_ms = now;
        job.rec.status_message.clear();
        let n = job.rec.num_tasks;
        self.dirty.jobs.insert(job_id.to_string());
        for i in 0..n {
            let id = task_id(job_id, i);
            let Some(t) = self.tasks.get(&id) else { continue };
            if task_terminal(t.state) {
                continue;
            }
            if t.active() {
                self.effects.push(Effect::Kill {
                    worker_id: t.worker_id.clone(),
                    address: t.worker_address.clone(),
                    task_id: id.clone(),
                });
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.ended_with_job = true;
                }
            }
            let why = if state == JobState::Killed { "the job was terminated" } else { "the job ended" };
            self.finish_task(&id, TaskState::Killed, 0, why.into(), now);
        }
        let gone: Vec<String> =
            self.endpoints.values().filter(|e| e.job_id == job_id).map(|e| e.endpoint_id.clone()).collect();
        for id in gone {
            self.endpoints.remove(&id);
            self.dirty.endpoints.remove(&id);
            self.dirty.deleted_endpoints.insert(id);
        }
        if state != JobState::Succeeded {
            self.terminate_children(job_id, now);
        }
    }

    /// Recomputes a job's state from its tasks.
    fn update_job(&mut self, job_id: &str, now: i64) {
        let Some(job) = self.jobs.get(job_id) else { return };
        if job_terminal(job.rec.state) {
            return;
        }
        let (mut running, mut succeeded, mut ended) = (0, 0, 0);
        let mut failed: Vec<&Task> = Vec::new();
        for i in 0..job.rec.num_tasks {
            let Some(t) = self.tasks.get(&task_id(job_id, i)) else { continue };
            match TaskState::try_from(t.state) {
                Ok(TaskState::Running | TaskState::Building) => running += 1,
                Ok(TaskState::Succeeded) => succeeded += 1,
                _ => {}
            }
            if task_terminal(t.state) {
                ended += 1;
                if t.state != TaskState::Succeeded as i32 {
                    failed.push(t);
                }
            }
        }
        // More failures than tolerated fail the job; so does ending with no task succeeded.
        let nothing_succeeded = ended == job.rec.num_tasks && succeeded == 0 && !failed.is_empty();
        if failed.len() as i32 > job.request.max_task_failures || nothing_succeeded {
            failed.sort_by_key(|t| (t.finished_ms, t.index));
            let first = failed[0];
            let state = match TaskState::try_from(first.state) {
                Ok(TaskState::WorkerFailed) => JobState::WorkerFailed,
                Ok(TaskState::Unschedulable) => JobState::Unschedulable,
                Ok(TaskState::Killed) => JobState::Killed,
                _ => JobState::Failed,
            };
            let error = if first.error.is_empty() {
                format!("task {} ended with exit code {}", first.task_id, first.exit_code)
            } else {
                format!("task {}: {}", first.task_id, first.error)
            };
            let exit = first.exit_code;
            self.end_job(job_id, state, exit, error, now);
            return;
        }
        if ended == job.rec.num_tasks {
            self.end_job(job_id, JobState::Succeeded, 0, String::new(), now);
            return;
        }
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let want = if running > 0 || job.rec.started_ms > 0 { JobState::Running } else { JobState::Pending };
        if running > 0 && job.rec.started_ms == 0 {
            job.rec.started_ms = now;
            self.dirty.jobs.insert(job_id.to_string());
        }
        if job.rec.state != want as i32 {
            job.rec.state = want as i32;
            self.dirty.jobs.insert(job_id.to_string());
        }
    }

    // ----- tasks -----

    fn queue(&mut self, id: &str) {
        self.seq += 1;
        self.pending.insert((self.seq, id.to_string()));
        self.pending_seq.insert(id.to_string(), self.seq);
    }

    fn unqueue(&mut self, id: &str) {
        if let Some(seq) = self.pending_seq.remove(id) {
            self.pending.remove(&(seq, id.to_string()));
        }
    }

    fn need_of(&self, job_id: &str) -> Need {
        self.jobs.get(job_id).map(|j| Need::of(j.request.resources.as_ref())).unwrap_or_default()
    }

    /// Counts the task's resources on the worker.
    fn hold(&mut self, id: &str, worker_id: &str) {
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
    fn release(&mut self, id: &str) {
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
    fn finish_task(&mut self, id: &str, state: TaskState, exit_code: i32, error: String, now: i64) {
        self.release(id);
        self.unqueue(id);
        let Some(t) = self.tasks.get_mut(id) else { return };
        if let Some(a) = t.current_attempt()
            && !task_terminal(a.state)
        {
            a.state = state as i32;
            a.exit_code = exit_code;
            a.error = error.clone();
            a.finished_ms = now;
        }
        t.state = state as i32;
        t.exit_code = exit_code;
        t.error = error;
        t.finished_ms = now;
        self.dirty.tasks.insert(id.to_string());
    }

    /// The current attempt ended with `state` (from a report, a dead worker or a failed
    /// dispatch): the task succeeds, is retried, or fails; then its job is recomputed.
    fn end_attempt(
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
            a.state = state as i32;
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
            t.state = TaskState::Pending as i32;
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
    fn assign(&mut self, id: &str, worker_id: &str, now: i64) {
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
            state: TaskState::Pending as i32,
            started_ms: now,
            ..Default::default()
        });
        self.dirty.tasks.insert(id.to_string());
        self.hold(id, worker_id);
        if let Some(e) = self.dispatch_effect(id) {
            self.effects.push(e);
        }
    }

    fn dispatch_effect(&self, id: &str) -> Option<Effect> {
        let t = self.tasks.get(id)?;
        let job = self.jobs.get(&t.job_id)?;
        let r = &job.request;
        let (bundle_gcs_path, bundle_sha256) = match job.rec.inline_bundle.as_str() {
            "" => (r.bundle_gcs_path.clone(), r.bundle_sha256.clone()),
            sha => (super::bundles::url(&self.knobs.bundle_base, sha), sha.to_string()),
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
                if matches!(TaskState::try_from(state), Ok(TaskState::Running | TaskState::Building)) {
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
                    a.state = TaskState::WorkerFailed as i32;
                    a.error = format!("dispatch to worker {worker_id} failed: {error}");
                    a.finished_ms = now;
                    a.is_worker_failure = true;
                }
                t.state = TaskState::Pending as i32;
                t.worker_id.clear();
                t.worker_address.clear();
                self.dirty.tasks.insert(id.to_string());
                self.queue(id);
            }
        }
    }

    fn set_running(&mut self, id: &str, state: i32, now: i64) {
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
        if task_terminal(t.state) {
            // Its job ended (a sibling failed, or a terminate) before this attempt's success
            // was heard of: what succeeded stays SUCCEEDED.
            if t.ended_with_job && r.state == TaskState::Succeeded as i32 {
                t.ended_with_job = false;
                t.state = TaskState::Succeeded as i32;
                t.exit_code = 0;
                t.error.clear();
                if let Some(a) = t.current_attempt() {
                    a.state = TaskState::Succeeded as i32;
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
        let state = TaskState::try_from(r.state).unwrap_or(TaskState::Unspecified);
        match state {
            TaskState::Building | TaskState::Running => self.set_running(&r.task_id, r.state, now),
            TaskState::Succeeded | TaskState::Failed | TaskState::Killed => {
                self.end_attempt(&r.task_id, state, r.exit_code, r.error.clone(), false, now)
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
                self.end_attempt(id, TaskState::WorkerFailed, 0, format!("worker {worker_id} lost the task"), true, now)
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
                    state,
                    exit_code,
                    error,
                    attempt_id,
                    ..Default::default()
                };
                self.report(&report);
            }
        }
    }

    // ----- workers -----

    /// RegisterWorker (the heartbeat).
    pub fn register_worker(
        &mut self,
        r: pc::RegisterWorkerRequest,
    ) -> Result<pc::RegisterWorkerResponse, ControllerError> {
        if r.worker_id.is_empty() {
            return Err(invalid("worker_id", "must not be empty"));
        }
        if r.address.is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        let now = now_ms();
        let metadata = r.metadata.unwrap_or_default();
        let known = self.workers.contains_key(&r.worker_id);
        let timeout_ms = self.knobs.worker_timeout.as_millis() as i64;
        let w = self.workers.entry(r.worker_id.clone()).or_insert_with(|| WorkerRec {
            rec: WorkerRecord { worker_id: r.worker_id.clone(), registered_ms: now, ..Default::default() },
            ..Default::default()
        });
        if !known || !w.rec.healthy || w.rec.address != r.address || w.metadata != metadata {
            if known && !w.rec.healthy {
                tracing::info!(worker_id = %r.worker_id, "worker is back");
            }
            let moved = known && w.rec.address != r.address;
            w.rec.address = r.address.clone();
            w.metadata = metadata;
            w.rec.healthy = true;
            self.dirty.workers.insert(r.worker_id.clone());
            if moved {
                // A worker restarted on another port: its tasks (and their logs) are there now.
                let held: Vec<String> = w.tasks.iter().cloned().collect();
                for id in held {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.worker_address = r.address.clone();
                        self.dirty.tasks.insert(id);
                    }
                }
            }
        }
        w.rec.last_heartbeat_ms = now;
        let fence_ms = r.fence_ms.max(0);
        if w.rec.fence_ms != fence_ms {
            if fence_ms + FENCE_MARGIN_MS > timeout_ms {
                tracing::warn!(
                    worker_id = %r.worker_id,
                    "the worker's lease and its kill take {fence_ms} ms, more than the worker timeout of \
                     {timeout_ms} ms: its tasks move only once the lease has lapsed (lower its --lease)"
                );
            }
            w.rec.fence_ms = fence_ms;
            self.dirty.workers.insert(r.worker_id.clone());
        }
        if !known {
            tracing::info!(worker_id = %r.worker_id, address = %r.address, "worker registered");
            return Ok(pc::RegisterWorkerResponse {
                accepted: true,
                controller_address: String::new(),
                should_reset: true,
            });
        }
        let address = w.rec.address.clone();
        let running: HashSet<&str> = r.running_task_ids.iter().map(String::as_str).collect();
        for id in &r.running_task_ids {
            let ours = self.tasks.get(id).is_some_and(|t| t.worker_id == r.worker_id && !task_terminal(t.state));
            if !ours {
                self.effects.push(Effect::Kill {
                    worker_id: r.worker_id.clone(),
                    address: address.clone(),
                    task_id: id.clone(),
                });
            }
        }
        let held: Vec<String> =
            self.workers.get(&r.worker_id).map(|w| w.tasks.iter().cloned().collect()).unwrap_or_default();
        for id in held {
            if running.contains(id.as_str()) || self.verifying.contains(&id) {
                continue;
            }
            let Some(t) = self.tasks.get(&id) else { continue };
            // Only attempts the worker acknowledged a while ago: a RunTask may be in flight.
            if t.dispatched && now - t.dispatched_ms > 3000 {
                self.verifying.insert(id.clone());
                self.effects.push(Effect::Verify {
                    task_id: id.clone(),
                    attempt_id: t.attempt_id,
                    worker_id: r.worker_id.clone(),
                    address: address.clone(),
                });
            }
        }
        Ok(pc::RegisterWorkerResponse { accepted: true, controller_address: String::new(), should_reset: false })
    }

    /// Periodic work: dead workers, their tasks once their lease has lapsed, and scheduling
    /// timeouts.
    pub fn tick(&mut self) {
        let now = now_ms();
        let timeout = self.knobs.worker_timeout.as_millis() as i64;
        let dead: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.rec.healthy && now - w.rec.last_heartbeat_ms > timeout)
            .map(|w| w.rec.worker_id.clone())
            .collect();
        for id in dead {
            tracing::warn!(worker_id = %id, "no heartbeat for {:?}: the worker is dead", self.knobs.worker_timeout);
            if let Some(w) = self.workers.get_mut(&id) {
                w.rec.healthy = false;
                self.dirty.workers.insert(id.clone());
            }
        }
        // A dead worker's tasks may still run there until its lease has lapsed and its
        // supervisors have killed them (its fence): only then do they move.
        let lapsed: Vec<(String, i64)> = self
            .workers
            .values()
            .filter(|w| !w.rec.healthy && !w.tasks.is_empty())
            .filter(|w| {
                let fence = if w.rec.fence_ms > 0 { w.rec.fence_ms + FENCE_MARGIN_MS } else { 0 };
                now - w.rec.last_heartbeat_ms > timeout.max(fence)
            })
            .map(|w| (w.rec.worker_id.clone(), now - w.rec.last_heartbeat_ms))
            .collect();
        for (id, silent_ms) in lapsed {
            let tasks: Vec<String> =
                self.workers.get(&id).map(|w| w.tasks.iter().cloned().collect()).unwrap_or_default();
            let error = format!("worker {id} sent no heartbeat for {:.1} s", silent_ms as f64 / 1000.0);
            for t in tasks {
                self.end_attempt(&t, TaskState::WorkerFailed, 0, error.clone(), true, now);
            }
        }
        let expired: Vec<(String, String)> = self
            .pending
            .iter()
            .filter_map(|(_, id)| {
                let t = self.tasks.get(id)?;
                let job = self.jobs.get(&t.job_id)?;
                let limit = i64::from(job.request.scheduling_timeout_seconds) * 1000;
                (limit > 0 && now - t.pending_since_ms > limit).then(|| {
                    let why = if job.rec.status_message.is_empty() {
                        "no worker was free".to_string()
                    } else {
                        job.rec.status_message.clone()
                    };
                    (
                        id.clone(),
                        format!(
                            "not placed within scheduling_timeout_seconds={}: {why}",
                            job.request.scheduling_timeout_seconds
                        ),
                    )
                })
            })
            .collect();
        for (id, why) in expired {
            let job_id = self.tasks.get(&id).map(|t| t.job_id.clone()).unwrap_or_default();
            self.finish_task(&id, TaskState::Unschedulable, 0, why, now);
            self.update_job(&job_id, now);
        }
    }

    /// One scheduling pass over the waiting tasks, in arrival order.
    pub fn schedule(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = now_ms();
        let queue: Vec<String> = self.pending.iter().map(|(_, id)| id.clone()).collect();
        let mut blocked: HashSet<String> = HashSet::new();
        for id in queue {
            let started = std::time::Instant::now();
            let Some(t) = self.tasks.get(&id) else { continue };
            if !self.pending_seq.contains_key(&id) {
                continue;
            }
            let job_id = t.job_id.clone();
            if blocked.contains(&job_id) {
                continue;
            }
            let Some(job) = self.jobs.get(&job_id) else { continue };
            if job_terminal(job.rec.state) {
                self.unqueue(&id);
                continue;
            }
            let group_by = job.request.coscheduling.as_ref().map(|c| c.group_by.clone()).unwrap_or_default();
            let need = Need::of(job.request.resources.as_ref());
            let placed = if group_by.is_empty() {
                scheduler::place(&need, &job.request.constraints, self.workers.values(), &BTreeMap::new(), now)
                    .map(|w| vec![(id.clone(), w)])
            } else {
                blocked.insert(job_id.clone());
                self.place_group(&job_id, &group_by, &need, now)
            };
            match placed {
                Ok(placements) => {
                    let n = placements.len().max(1) as u64;
                    for (tid, w) in placements {
                        self.assign(&tid, &w, now);
                    }
                    if self.placement_latencies_ns.len() < MAX_LATENCIES {
                        let each = started.elapsed().as_nanos() as u64 / n;
                        self.placement_latencies_ns.extend(std::iter::repeat_n(each, n as usize));
                    }
                    if let Some(job) = self.jobs.get_mut(&job_id)
                        && !job.rec.status_message.is_empty()
                    {
                        job.rec.status_message.clear();
                        self.dirty.jobs.insert(job_id.clone());
                    }
                }
                Err(reason) => {
                    blocked.insert(job_id.clone());
                    if let Some(job) = self.jobs.get_mut(&job_id)
                        && job.rec.status_message != reason
                    {
                        job.rec.status_message = reason;
                        self.dirty.jobs.insert(job_id.clone());
                    }
                }
            }
        }
    }

    /// Coscheduling: every waiting task of the job at once, on workers sharing one value of
    /// `group_by` (the value its running tasks already use, if any), or none of them.
    fn place_group(
        &self,
        job_id: &str,
        group_by: &str,
        need: &Need,
        now: i64,
    ) -> Result<Vec<(String, String)>, String> {
        let Some(job) = self.jobs.get(job_id) else { return Err("the job is gone".into()) };
        let mut waiting = Vec::new();
        let mut fixed: Option<String> = None;
        for i in 0..job.rec.num_tasks {
            let id = task_id(job_id, i);
            let Some(t) = self.tasks.get(&id) else { continue };
            if self.pending_seq.contains_key(&id) {
                waiting.push(id);
            } else if t.active()
                && let Some(v) = self.workers.get(&t.worker_id).and_then(|w| w.metadata.attributes.get(group_by))
            {
                fixed = Some(format!("{v:?}"));
            }
        }
        let mut groups: BTreeMap<String, Vec<&WorkerRec>> = BTreeMap::new();
        for w in self.workers.values() {
            if let Some(v) = w.metadata.attributes.get(group_by) {
                groups.entry(format!("{v:?}")).or_default().push(w);
            }
        }
        let mut reason = format!("no workers have the attribute {group_by:?} to coschedule by");
        for (value, members) in groups {
            if fixed.as_ref().is_some_and(|f| *f != value) {
                continue;
            }
            let mut extra: BTreeMap<String, (super::model::Usage, usize)> = BTreeMap::new();
            let mut out = Vec::new();
            let mut ok = true;
            for id in &waiting {
                match scheduler::place(need, &job.request.constraints, members.iter().copied(), &extra, now) {
                    Ok(w) => {
                        let e = extra.entry(w.clone()).or_default();
                        let u = need.usage();
                        e.0.cpu_millicores += u.cpu_millicores;
                        e.0.memory_bytes += u.memory_bytes;
                        e.0.gpus += u.gpus;
                        e.1 += 1;
                        out.push((id.clone(), w));
                    }
                    Err(why) => {
                        reason =
                            format!("waiting for room for all {} tasks in one {group_by} group: {why}", waiting.len());
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                return Ok(out);
            }
        }
        Err(reason)
    }

    // ----- endpoints -----

    pub fn register_endpoint(&mut self, r: pc::RegisterEndpointRequest) -> Result<String, ControllerError> {
        if r.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if r.address.is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        let Some(job) = self.jobs.get(&r.job_id) else {
            return Err(ControllerError::NotFound { what: "job_id", id: r.job_id });
        };
        if job_terminal(job.rec.state) {
            return Err(ControllerError::FailedPrecondition(format!("job {} has ended", r.job_id)));
        }
        self.next_id += 1;
        let endpoint_id = format!("ep-{}", self.next_id);
        let rec = EndpointRec {
            endpoint_id: endpoint_id.clone(),
            name: r.name,
            address: r.address,
            job_id: r.job_id,
            metadata: r.metadata.into_iter().collect(),
        };
        self.endpoints.insert(endpoint_id.clone(), rec);
        self.dirty.endpoints.insert(endpoint_id.clone());
        Ok(endpoint_id)
    }

    pub fn unregister_endpoint(&mut self, id: &str) -> Result<(), ControllerError> {
        if self.endpoints.remove(id).is_none() {
            return Err(ControllerError::NotFound { what: "endpoint_id", id: id.to_string() });
        }
        self.dirty.endpoints.remove(id);
        self.dirty.deleted_endpoints.insert(id.to_string());
        Ok(())
    }

    // ----- views -----

    pub fn task_status(&self, t: &Task) -> crate::proto::TaskStatus {
        let status_message = if t.state == TaskState::Pending as i32 && t.worker_id.is_empty() {
            self.jobs.get(&t.job_id).map(|j| j.rec.status_message.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        crate::proto::TaskStatus {
            task_id: t.task_id.clone(),
            job_id: t.job_id.clone(),
            task_index: t.index,
            state: t.state,
            worker_id: t.worker_id.clone(),
            worker_address: t.worker_address.clone(),
            exit_code: t.exit_code,
            error: t.error.clone(),
            started_at_ms: t.started_ms,
            finished_at_ms: t.finished_ms,
            ports: t.ports.clone().into_iter().collect(),
            resource_usage: None,
            build_metrics: None,
            current_attempt_id: t.attempt_id.max(0),
            attempts: t
                .attempts
                .iter()
                .map(|a| crate::proto::TaskAttempt {
                    attempt_id: a.attempt_id,
                    worker_id: a.worker_id.clone(),
                    state: a.state,
                    exit_code: a.exit_code,
                    error: a.error.clone(),
                    started_at_ms: a.started_ms,
                    finished_at_ms: a.finished_ms,
                    is_worker_failure: a.is_worker_failure,
                })
                .collect(),
            status_message,
        }
    }

    pub fn job_tasks(&self, job_id: &str) -> Vec<&Task> {
        let n = self.jobs.get(job_id).map(|j| j.rec.num_tasks).unwrap_or(0);
        (0..n).filter_map(|i| self.tasks.get(&task_id(job_id, i))).collect()
    }

    pub fn job_status(&self, job: &Job, with_tasks: bool) -> pc::JobStatus {
        let tasks = self.job_tasks(&job.rec.job_id);
        let count = |f: &dyn Fn(i32) -> bool| tasks.iter().filter(|t| f(t.state)).count() as i32;
        let mut ports = std::collections::HashMap::new();
        for t in &tasks {
            for (k, v) in &t.ports {
                ports.entry(k.clone()).or_insert(*v);
            }
        }
        pc::JobStatus {
            job_id: job.rec.job_id.clone(),
            state: job.rec.state,
            exit_code: job.rec.exit_code,
            error: job.rec.error.clone(),
            started_at_ms: job.rec.started_ms,
            finished_at_ms: job.rec.finished_ms,
            ports,
            resource_usage: None,
            status_message: job.rec.status_message.clone(),
            build_metrics: None,
            serialized_result: Vec::new(),
            parent_job_id: job.rec.parent_job_id.clone(),
            failure_count: job.rec.failure_count,
            preemption_count: job.rec.preemption_count,
            num_tasks: job.rec.num_tasks,
            tasks_pending: count(&|s| s == TaskState::Pending as i32),
            tasks_running: count(&|s| s == TaskState::Running as i32 || s == TaskState::Building as i32),
            tasks_succeeded: count(&|s| s == TaskState::Succeeded as i32),
            tasks_failed: count(&|s| task_terminal(s) && s != TaskState::Succeeded as i32),
            tasks: if with_tasks { tasks.iter().map(|t| self.task_status(t)).collect() } else { Vec::new() },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CommandEntrypoint, ResourceSpecProto, WorkerMetadata};

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
                s.dispatched(&task_id, attempt_id, &worker_id, DispatchOutcome::Accepted(TaskState::Running as i32));
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
        assert_eq!(s.jobs[&id].rec.state, JobState::Running as i32);
        assert_eq!(s.workers["w"].used.cpu_millicores, 2000);
        report(&mut s, &runs[0], TaskState::Failed, 1);
        report(&mut s, &runs[1], TaskState::Succeeded, 0);
        s.schedule();
        let again = accept_all(&mut s);
        assert_eq!(again, vec![("j/task-0".to_string(), 1, "w".to_string())]);
        report(&mut s, &again[0], TaskState::Succeeded, 0);
        let j = &s.jobs[&id];
        assert_eq!((j.rec.state, j.rec.failure_count), (JobState::Succeeded as i32, 1));
        assert_eq!(s.workers["w"].used.cpu_millicores, 0);
        assert!(s.workers["w"].tasks.is_empty());
        // A late report of the first attempt changes nothing.
        report(&mut s, &runs[0], TaskState::Failed, 1);
        assert_eq!(s.tasks["j/task-0"].state, TaskState::Succeeded as i32);
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
        assert_eq!(s.jobs[&id].rec.state, JobState::Succeeded as i32);
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
        assert_eq!(s.jobs["tolerant"].rec.state, JobState::Running as i32);
        report(&mut s, &runs[1], TaskState::Succeeded, 0);
        assert_eq!(s.jobs["tolerant"].rec.state, JobState::Succeeded as i32);

        req.name = "hopeless".into();
        req.resources = Some(ResourceSpecProto { replicas: 1, ..Default::default() });
        s.launch(req).unwrap();
        s.schedule();
        let runs = accept_all(&mut s);
        report(&mut s, &runs[0], TaskState::Failed, 2);
        let j = &s.jobs["hopeless"].rec;
        assert_eq!((j.state, j.exit_code), (JobState::Failed as i32, 2));
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
        assert_eq!(s.jobs["j"].rec.state, JobState::Succeeded as i32);
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
        assert_eq!(s.jobs["j"].rec.state, JobState::Succeeded as i32);
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
        assert_eq!(s.jobs["j"].rec.state, JobState::Failed as i32);
        assert_eq!(s.tasks["j/task-1"].state, TaskState::Killed as i32);
        report(&mut s, &runs[1], TaskState::Succeeded, 0);
        let t = &s.tasks["j/task-1"];
        assert_eq!((t.state, t.attempts[0].state), (TaskState::Succeeded as i32, TaskState::Succeeded as i32));
        let j = &s.jobs["j"];
        assert_eq!(j.rec.state, JobState::Failed as i32, "the job keeps its real cause");
        assert!(j.rec.error.contains("j/task-0"), "{}", j.rec.error);
        // A late KILLED (the kill the job's end sent) changes nothing.
        report(&mut s, &runs[1], TaskState::Killed, 0);
        assert_eq!(s.tasks["j/task-1"].state, TaskState::Succeeded as i32);
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
        assert_eq!(s.jobs["j"].rec.state, JobState::Succeeded as i32);
    }
}
