//! RUNNING to the end: wait for the supervisor to exit, then read how the task ended from its
//! `exit.json` (or record that the supervisor died without saying); sample the running
//! task's cgroup for its history.

use std::sync::Arc;

use super::attempt::Attempt;
use super::kill::remove_leftovers;
use super::state::{TaskState, outcome};
use super::{Inner, lock};
use crate::supervisor::handle::Supervisor;
use crate::taskdir::{self, ExitRecord};

impl Attempt {
    pub(super) fn finish_from_exit(&self, inner: &Inner) {
        match taskdir::read_json::<ExitRecord>(&self.dir, taskdir::EXIT) {
            Ok(Some(exit)) => {
                let mut o = outcome(&exit, self.meta.timeout_s);
                // A later kill request may have replaced kill.json before the supervisor read it.
                if o.state == TaskState::Killed
                    && let Some(cause) = self.kill_cause()
                {
                    (o.state, o.error) = (TaskState::WorkerFailed, cause);
                }
                // A pickled entrypoint that raised left its exception's summary behind.
                let raised = self.dir.join(taskdir::WORKDIR).join(crate::env::entrypoint::ERROR);
                if o.state == TaskState::Failed
                    && let Ok(summary) = std::fs::read_to_string(&raised)
                {
                    o.error = format!("{}: {}", o.error, summary.trim());
                }
                if o.state == TaskState::Failed
                    && self.meta.tpu
                    && let Some(signature) = self.tpu_bad_node_signature()
                {
                    // As Iris's worker: the TPU host is bad, not the task; the controller may
                    // run it elsewhere.
                    o.state = TaskState::WorkerFailed;
                    o.error = format!("TPU bad-node signature {signature:?} in the task's stderr ({})", o.error);
                }
                self.finish(inner, o.state, o.exit_code, o.error, Some(&exit));
            }
            other => {
                let why = match other {
                    Err(e) => format!("the task's exit record is unreadable: {e}"),
                    _ => "the task's supervisor died without recording how the task ended".to_string(),
                };
                remove_leftovers(inner.seams.cgroups.as_ref(), &self.dir, self.meta.cgroup.as_deref());
                self.finish(inner, TaskState::WorkerFailed, -1, why, None);
            }
        }
    }

    /// The TPU initialisation failure in the last [`TPU_STDERR_TAIL`] stderr lines of the
    /// attempt (those among the log's last [`TPU_LOG_WINDOW`] lines: the stdout printed after
    /// the error does not hide it, and a huge log is not read whole), if any.
    fn tpu_bad_node_signature(&self) -> Option<&'static str> {
        let window = crate::logs::LogFilter {
            start_line: -TPU_LOG_WINDOW,
            source: Some(crate::logs::Source::Stderr),
            ..Default::default()
        };
        let lines = crate::logs::read(&self.dir.join(taskdir::LOGS), &window).ok()?;
        let tail = &lines[lines.len().saturating_sub(TPU_STDERR_TAIL)..];
        crate::devices::tpu_init_failure(tail.iter().map(|l| l.data.as_str()))
    }

    /// Takes one sample of a RUNNING attempt's cgroup into its history (the sampler's tick).
    pub(crate) fn sample(&self, inner: &Inner) {
        let started_at_ms = {
            let st = lock(&self.status);
            if st.state != TaskState::Running {
                return;
            }
            st.started_at_ms
        };
        let Some(stats) = self.meta.cgroup.as_deref().and_then(|cg| inner.stats(cg, &self.stats_files)) else { return };
        let clock = &inner.seams.clock;
        lock(&self.history).observe(&stats, clock.now(), clock.now_ms(), started_at_ms);
    }
}

/// How many of a TPU attempt's last stderr lines are searched for a bad-node signature (Iris's
/// 200)...
const TPU_STDERR_TAIL: usize = 200;
/// ... among the last lines of its log, stdout's and the build's included.
const TPU_LOG_WINDOW: i64 = 5000;

/// Waits for the supervisor's exit, ends the attempt as its exit record says, and gives the
/// slot back.
pub(super) async fn watch_until_exit(
    inner: Arc<Inner>,
    attempt: Arc<Attempt>,
    sup: Supervisor,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    if let Err(e) = inner.seams.spawner.wait_exit(sup).await {
        tracing::warn!(task_id = %attempt.meta.task_id, error = %e, "waiting for the supervisor");
    }
    attempt.finish_from_exit(&inner);
    drop(permit);
}
