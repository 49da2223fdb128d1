//! What an attempt shows: the task's status (TaskView, with live or final usage), the newest
//! wire's per-uid view.

use std::sync::Arc;

use super::attempt::Attempt;
use super::state::TaskState;
use super::store;
use super::{AttemptView, Inner, TaskView, Usage, lock};
use crate::taskdir;

/// Workdir files beyond this many entries are not counted for disk use.
const DISK_SCAN_LIMIT: usize = 10_000;
/// The sampler's interval in ms.
const SAMPLE_MS: i64 = super::history::SAMPLE_INTERVAL.as_millis() as i64;

impl Attempt {
    /// The attempt as the newest wire sees it, when it has an attempt uid.
    pub(crate) fn uid_view(&self) -> Option<super::UidAttempt> {
        let uid = self.meta.attempt_uid.clone()?;
        let st = lock(&self.status);
        Some(super::UidAttempt {
            attempt_uid: uid,
            task_id: self.meta.task_id.clone(),
            attempt_id: self.meta.attempt_id,
            state: st.state,
            status_message: st.status_message.clone(),
            exit_code: st.exit_code,
            error: st.error.clone(),
            started_at_ms: st.started_at_ms,
            finished_at_ms: st.finished_at_ms,
            container_id: self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            dir: self.dir.clone(),
        })
    }

    fn view(&self, inner: &Inner) -> (AttemptView, String, Option<Usage>, (i64, i64)) {
        let st = lock(&self.status);
        let usage = match (st.state, &self.meta.cgroup) {
            (TaskState::Running, Some(cg)) => inner.stats(cg, &self.stats_files).map(|s| {
                let cpu_ns = s.cpu_usage_ns.unwrap_or(0);
                // The sampler's figure over its last interval; the life average until it has one.
                let cpu_percent = match lock(&self.history).latest(inner.seams.clock.now_ms(), 3 * SAMPLE_MS) {
                    Some(sample) => sample.cpu_percent,
                    None => {
                        let life_ms = (inner.seams.clock.now_ms() - st.started_at_ms).max(1) as f64;
                        cpu_ns as f64 / (life_ms * 1e6) * 100.0
                    }
                };
                Usage {
                    memory_bytes: s.memory_bytes.unwrap_or(0),
                    memory_peak_bytes: s.memory_peak_bytes.unwrap_or(0),
                    cpu_percent,
                    cpu_usage_ns: cpu_ns,
                    processes: s.processes.unwrap_or(0),
                    disk_bytes: 0,
                    cpu_throttled_periods: s.cpu_throttled_periods.unwrap_or(0),
                }
            }),
            (state, _) if state.is_terminal() => st.final_stats.as_ref().map(|s| {
                let life_ms = (st.finished_at_ms - st.started_at_ms).max(1) as f64;
                // The cgroup also counts the container's setup, which a very short task's
                // life does not: never report more than the machine's CPUs could do.
                let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
                Usage {
                    memory_bytes: 0,
                    memory_peak_bytes: s.memory_peak_bytes.unwrap_or(0),
                    cpu_percent: (s.cpu_usage_ns.unwrap_or(0) as f64 / (life_ms * 1e6) * 100.0).min(cpus * 100.0),
                    cpu_usage_ns: s.cpu_usage_ns.unwrap_or(0),
                    processes: 0,
                    disk_bytes: 0,
                    cpu_throttled_periods: s.cpu_throttled_periods.unwrap_or(0),
                }
            }),
            _ => None,
        };
        let view = AttemptView {
            attempt_id: self.meta.attempt_id,
            state: st.state,
            exit_code: st.exit_code,
            error: st.error.clone(),
            started_at_ms: st.started_at_ms,
            finished_at_ms: st.finished_at_ms,
            is_worker_failure: st.state == TaskState::WorkerFailed,
        };
        let message = st.status_message.clone();
        let build = (st.build_started_ms, st.build_finished_ms);
        drop(st);
        let usage = usage.map(|mut u| {
            u.disk_bytes = store::disk_usage(&self.dir.join(taskdir::WORKDIR), DISK_SCAN_LIMIT);
            u
        });
        (view, message, usage, build)
    }
}

/// The view of a task from its attempts (the last is current); `None` for no attempts.
pub(super) fn view(inner: &Inner, attempts: &[Arc<Attempt>]) -> Option<TaskView> {
    let mut views: Vec<AttemptView> = Vec::with_capacity(attempts.len());
    let mut current = None;
    for (i, a) in attempts.iter().enumerate() {
        let (v, message, usage, build) = a.view(inner);
        if i + 1 == attempts.len() {
            current = Some((a, v.clone(), message, usage, build));
        }
        views.push(v);
    }
    let (a, v, status_message, usage, (build_started_ms, build_finished_ms)) = current?;
    Some(TaskView {
        task_id: a.meta.task_id.clone(),
        job_id: a.meta.job_id.clone(),
        task_index: a.meta.task_index,
        state: v.state,
        status_message,
        exit_code: v.exit_code,
        error: v.error,
        started_at_ms: v.started_at_ms,
        finished_at_ms: v.finished_at_ms,
        ports: a.meta.ports.clone(),
        usage,
        build_started_ms,
        build_finished_ms,
        build: a.build_info(),
        current_attempt_id: a.meta.attempt_id,
        attempts: views,
    })
}
