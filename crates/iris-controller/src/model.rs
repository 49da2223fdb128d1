//! The controller's records: jobs, tasks (with their attempts), workers and endpoints, as kept
//! in memory and persisted by [`super::store`]. States are the wire's enums
//! ([`iris_wire::proto::TaskState`], [`iris_wire::proto::JobState`]), stored as their numbers.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use iris_wire::proto::controller::LaunchJobRequest;
use iris_wire::proto::{JobState, TaskState, WorkerMetadata};

pub use iris_wire::clock::now_ms;

/// Whether a task state is final.
pub fn task_terminal(s: TaskState) -> bool {
    s.is_terminal()
}

/// Whether a job state is final.
pub fn job_terminal(s: JobState) -> bool {
    s.is_terminal()
}

/// A wire state from its number; one this controller does not know reads as unspecified
/// (it is never terminal, so nothing is ended on a number from a newer peer).
pub fn task_state(n: i32) -> TaskState {
    TaskState::try_from(n).unwrap_or(TaskState::Unspecified)
}

/// See [`task_state`].
pub fn job_state(n: i32) -> JobState {
    JobState::try_from(n).unwrap_or(JobState::Unspecified)
}

/// Serde for the wire's state enums: each is stored as its number, as rows were before the
/// states were typed, so a state file written by an older controller reads back unchanged.
mod as_number {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, E: Copy + Into<i32>>(state: &E, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32((*state).into())
    }

    pub fn deserialize<'de, D: Deserializer<'de>, E: TryFrom<i32> + Default>(d: D) -> Result<E, D::Error> {
        Ok(E::try_from(i32::deserialize(d)?).unwrap_or_default())
    }
}

/// A job: the request it was launched with and its aggregate state.
#[derive(Debug, Clone)]
pub struct Job {
    pub request: LaunchJobRequest,
    pub rec: JobRecord,
}

/// The part of a job that changes (persisted as JSON; the request is stored once, as protobuf).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    #[serde(with = "as_number")]
    pub state: JobState,
    pub exit_code: i32,
    pub error: String,
    pub submitted_ms: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub parent_job_id: String,
    pub num_tasks: i32,
    pub failure_count: i32,
    pub preemption_count: i32,
    /// Why the scheduler could not place the job's tasks last time (shown while pending).
    pub status_message: String,
    /// The sha256 of the inline bundle (`bundle_blob`) this controller keeps for the job, empty
    /// when it has none. The URL is made at each dispatch from the controller's advertised URL
    /// of the moment, so a restart under another address neither breaks the job nor lets the
    /// blob sweep drop its bundle.
    #[serde(default)]
    pub inline_bundle: String,
}

/// One attempt of a task on one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt_id: i32,
    pub worker_id: String,
    #[serde(with = "as_number")]
    pub state: TaskState,
    pub exit_code: i32,
    pub error: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub is_worker_failure: bool,
}

/// A task of a job: `{job_id}/task-{index}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Task {
    pub task_id: String,
    pub job_id: String,
    pub index: i32,
    #[serde(with = "as_number")]
    pub state: TaskState,
    /// The worker of the current attempt (empty while unassigned).
    pub worker_id: String,
    pub worker_address: String,
    /// The current attempt's id; -1 before the first.
    pub attempt_id: i32,
    /// True once the worker accepted the current attempt's RunTask.
    pub dispatched: bool,
    pub dispatched_ms: i64,
    pub attempts: Vec<Attempt>,
    /// Failed attempts (the task's own failures) and worker failures so far.
    pub failures: i32,
    pub preemptions: i32,
    pub exit_code: i32,
    pub error: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// Since when the task has waited for a worker (for the scheduling timeout).
    pub pending_since_ms: i64,
    pub ports: BTreeMap<String, i32>,
    /// The controller ended the task because its job ended while the attempt still ran on a
    /// worker: a late report that the attempt had in fact SUCCEEDED is still taken.
    #[serde(default)]
    pub ended_with_job: bool,
}

impl Task {
    /// Holds a worker: assigned and not ended.
    pub fn active(&self) -> bool {
        !self.worker_id.is_empty() && !task_terminal(self.state)
    }

    pub fn current_attempt(&mut self) -> Option<&mut Attempt> {
        let id = self.attempt_id;
        self.attempts.iter_mut().rev().find(|a| a.attempt_id == id)
    }
}

/// A registered worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerRec {
    pub rec: WorkerRecord,
    pub metadata: WorkerMetadata,
    /// Not persisted: recomputed from the tasks on load.
    pub used: Usage,
    pub tasks: BTreeSet<String>,
    /// A failed dispatch keeps the worker out of placement until then (ms).
    pub suspect_until_ms: i64,
    /// Why the last dispatch to it failed (the reason a waiting job shows while it is suspect).
    pub last_dispatch_error: String,
}

/// The persisted part of a worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub worker_id: String,
    pub address: String,
    pub registered_ms: i64,
    pub last_heartbeat_ms: i64,
    pub healthy: bool,
    pub consecutive_failures: i32,
    /// The worker's fence (ms): its tasks are surely gone this long after the send of its last
    /// answered heartbeat (0: it has no lease).
    #[serde(default)]
    pub fence_ms: i64,
}

/// Resources held on a worker by its active tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_millicores: i64,
    pub memory_bytes: i64,
    pub gpus: i64,
}

/// A registered endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointRec {
    pub endpoint_id: String,
    pub name: String,
    pub address: String,
    pub job_id: String,
    pub metadata: BTreeMap<String, String>,
}
