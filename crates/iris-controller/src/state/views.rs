//! The wire's views of the state: task and job status messages.

use super::{State, task_id};
use crate::model::{Job, Task, task_terminal};
use iris_wire::proto::TaskState;
use iris_wire::proto::controller::{self as pc};

impl State {
    pub fn task_status(&self, t: &Task) -> iris_wire::proto::TaskStatus {
        let status_message = if t.state == TaskState::Pending && t.worker_id.is_empty() {
            self.jobs.get(&t.job_id).map(|j| j.rec.status_message.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        iris_wire::proto::TaskStatus {
            task_id: t.task_id.clone(),
            job_id: t.job_id.clone(),
            task_index: t.index,
            state: t.state.into(),
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
                .map(|a| iris_wire::proto::TaskAttempt {
                    attempt_id: a.attempt_id,
                    worker_id: a.worker_id.clone(),
                    state: a.state.into(),
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
        let count = |f: &dyn Fn(TaskState) -> bool| tasks.iter().filter(|t| f(t.state)).count() as i32;
        let mut ports = std::collections::HashMap::new();
        for t in &tasks {
            for (k, v) in &t.ports {
                ports.entry(k.clone()).or_insert(*v);
            }
        }
        pc::JobStatus {
            job_id: job.rec.job_id.clone(),
            state: job.rec.state.into(),
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
            tasks_pending: count(&|s| s == TaskState::Pending),
            tasks_running: count(&|s| s == TaskState::Running || s == TaskState::Building),
            tasks_succeeded: count(&|s| s == TaskState::Succeeded),
            tasks_failed: count(&|s| task_terminal(s) && s != TaskState::Succeeded),
            tasks: if with_tasks { tasks.iter().map(|t| self.task_status(t)).collect() } else { Vec::new() },
        }
    }
}
