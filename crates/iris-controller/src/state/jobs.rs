//! Jobs: LaunchJob's checks and records, TerminateJob, and a job's state recomputed from its tasks.

use super::{Effect, MAX_REPLICAS, State, invalid, task_id};
use crate::ControllerError;
use crate::model::{Job, JobRecord, Task, job_terminal, now_ms, task_terminal};
use crate::scheduler::{self, Need};
use iris_wire::proto::controller::LaunchJobRequest;
use iris_wire::proto::{JobState, TaskState};

impl State {
    /// LaunchJob without an inline bundle (the unit tests' shorthand).
    #[cfg(test)]
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
                state: JobState::Pending,
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
                    state: TaskState::Pending,
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

    pub(super) fn terminate_children(&mut self, job_id: &str, now: i64) {
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
    pub(super) fn end_job(&mut self, job_id: &str, state: JobState, exit_code: i32, error: String, now: i64) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if job_terminal(job.rec.state) {
            return;
        }
        job.rec.state = state;
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
    pub(super) fn update_job(&mut self, job_id: &str, now: i64) {
        let Some(job) = self.jobs.get(job_id) else { return };
        if job_terminal(job.rec.state) {
            return;
        }
        let (mut running, mut succeeded, mut ended) = (0, 0, 0);
        let mut failed: Vec<&Task> = Vec::new();
        for i in 0..job.rec.num_tasks {
            let Some(t) = self.tasks.get(&task_id(job_id, i)) else { continue };
            match t.state {
                TaskState::Running | TaskState::Building => running += 1,
                TaskState::Succeeded => succeeded += 1,
                _ => {}
            }
            if task_terminal(t.state) {
                ended += 1;
                if t.state != TaskState::Succeeded {
                    failed.push(t);
                }
            }
        }
        // More failures than tolerated fail the job; so does ending with no task succeeded.
        let nothing_succeeded = ended == job.rec.num_tasks && succeeded == 0 && !failed.is_empty();
        if failed.len() as i32 > job.request.max_task_failures || nothing_succeeded {
            failed.sort_by_key(|t| (t.finished_ms, t.index));
            let first = failed[0];
            let state = match first.state {
                TaskState::WorkerFailed => JobState::WorkerFailed,
                TaskState::Unschedulable => JobState::Unschedulable,
                TaskState::Killed => JobState::Killed,
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
        if job.rec.state != want {
            job.rec.state = want;
            self.dirty.jobs.insert(job_id.to_string());
        }
    }
}
