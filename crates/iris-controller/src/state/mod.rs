//! The controller's state machine: jobs → tasks → attempts on workers, retries, aggregation,
//! worker liveness and endpoints. Everything here is synchronous and runs under one lock;
//! calls to workers are returned as [`Effect`]s that [`super::dispatch`] makes after the lock
//! is released, and their outcomes come back through [`State::dispatched`] and
//! [`State::verified`]. Changed rows are written by [`State::flush`].
//!
//! One file per concern, each an `impl State` block: [`jobs`] (launch, terminate, a job's
//! state from its tasks), [`tasks`] (the queue, attempts, dispatch outcomes, reports),
//! [`workers`] (heartbeats, dead workers, timeouts), [`placement`] (the scheduling pass and
//! coscheduling), [`endpoints`], and [`views`] (the wire's status messages).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

/// The most tasks one job may have.
pub const MAX_REPLICAS: i32 = 100_000;

/// Added to a worker's fence before its tasks move (see the lease module).
const FENCE_MARGIN_MS: i64 = iris_wire::cluster::CONTROLLER_MARGIN.as_millis() as i64;

mod endpoints;
mod jobs;
mod placement;
mod tasks;
#[cfg(test)]
mod tests;
mod views;
mod workers;

use super::ControllerError;
use super::model::{EndpointRec, Job, Task, WorkerRec, job_terminal, now_ms, task_terminal};
use super::store::{Batch, Store, StoreError};
use iris_wire::proto::{TaskState, worker};

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
    Accepted(TaskState),
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
        state: TaskState,
        exit_code: i32,
        error: String,
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
}
