//! Task states and what a finished task's exit record means for its state.

use serde::{Deserialize, Serialize};

use crate::taskdir::{ExitRecord, KillReason};

/// The life of a task attempt: PENDING → BUILDING → RUNNING → one terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    /// Accepted, waiting for a slot (the concurrency limit).
    Pending,
    /// Its environment is being prepared (bundle, venv, image, setup).
    Building,
    /// Its command runs.
    Running,
    /// It exited 0.
    Succeeded,
    /// It exited non-zero, or could not be prepared or started.
    Failed,
    /// It was killed on request (or at its timeout).
    Killed,
    /// It ended by the worker's doing (a lost lease, a controller reset).
    WorkerFailed,
}

impl TaskState {
    /// Every state, in life order.
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Building,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Killed,
        TaskState::WorkerFailed,
    ];

    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Killed | TaskState::WorkerFailed)
    }

    /// The upper-case name used in logs, the CLI and the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Building => "BUILDING",
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::Killed => "KILLED",
            TaskState::WorkerFailed => "WORKER_FAILED",
        }
    }
}

/// The end of an attempt as reported: state, exit code and error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: TaskState,
    pub exit_code: i32,
    pub error: String,
}

/// Interprets a supervisor's exit record. `timeout_s` is for the error text.
pub fn outcome(exit: &ExitRecord, timeout_s: Option<u64>) -> Outcome {
    let exit_code = exit.exit_code.or(exit.signal.map(|s| 128 + s)).unwrap_or(-1);
    let failed = |error: String| Outcome { state: TaskState::Failed, exit_code, error };
    if let Some(error) = &exit.error {
        return failed(format!("the task could not be started: {error}"));
    }
    if let Some(error) = &exit.worker_failure {
        // Killed for the worker's reasons (lost contact with the controller, a reset): the
        // task did nothing wrong, and the controller may run it again.
        return Outcome { state: TaskState::WorkerFailed, exit_code, error: error.clone() };
    }
    match exit.killed {
        Some(KillReason::Timeout) => return failed(format!("timeout after {} s", timeout_s.unwrap_or(0))),
        Some(KillReason::Fenced) => {
            let error = "lost contact with the controller".to_string();
            return Outcome { state: TaskState::WorkerFailed, exit_code, error };
        }
        Some(KillReason::Requested) => {
            return Outcome { state: TaskState::Killed, exit_code, error: "killed by request".into() };
        }
        Some(KillReason::Disk) => {
            let (limit, used) = exit.disk.unwrap_or_default();
            return failed(format!(
                "disk limit of {} MiB exceeded: the workdir and /tmp held {} MiB",
                limit >> 20,
                used >> 20
            ));
        }
        None => {}
    }
    let limit = || {
        exit.stats
            .memory_limit_bytes
            .map(|l| format!("its memory limit of {} MiB", l >> 20))
            .unwrap_or_else(|| "its memory limit".into())
    };
    let victims = || match exit.oom_victims.as_slice() {
        [] => "a process of the task".to_string(),
        v => v.join(", "),
    };
    if exit.exit_code == Some(0) {
        // The state follows the exit code, but an OOM kill on the way (a worker process of
        // the task) is never silent.
        let error = if exit.stats.oom_kills > 0 {
            format!(
                "out of memory: {} OOM-killed after the task exceeded {}; the main process exited 0",
                victims(),
                limit()
            )
        } else {
            String::new()
        };
        return Outcome { state: TaskState::Succeeded, exit_code: 0, error };
    }
    if exit.stats.oom_kills > 0 {
        let who = if exit.oom_victims.is_empty() { String::new() } else { format!(" ({} killed)", victims()) };
        return failed(format!("out of memory: the task was OOM-killed after exceeding {}{who}", limit()));
    }
    match (exit.exit_code, exit.signal) {
        (Some(code), _) => failed(format!("exit code {code}")),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown signal");
            failed(format!("killed by signal {name} ({sig})"))
        }
        (None, None) => failed("the task ended without an exit status".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupStats;

    fn exit(code: Option<i32>, signal: Option<i32>) -> ExitRecord {
        ExitRecord { exit_code: code, signal, ..Default::default() }
    }

    #[test]
    fn exits_map_to_states_and_errors() {
        assert_eq!(outcome(&exit(Some(0), None), None).state, TaskState::Succeeded);
        let o = outcome(&exit(Some(3), None), None);
        assert_eq!((o.state, o.exit_code, o.error.as_str()), (TaskState::Failed, 3, "exit code 3"));
        let o = outcome(&exit(None, Some(9)), None);
        assert_eq!(o.exit_code, 137);
        assert!(o.error.contains("SIGKILL"), "{}", o.error);
    }

    #[test]
    fn an_oom_kill_behind_an_exit_0_is_reported_with_the_state_kept() {
        let mut e = exit(Some(0), None);
        e.stats = CgroupStats { oom_kills: 1, memory_limit_bytes: Some(64 << 20), ..Default::default() };
        e.oom_victims = vec!["python3 (pid 9)".into()];
        let o = outcome(&e, None);
        assert_eq!(o.state, TaskState::Succeeded);
        assert!(o.error.contains("python3 (pid 9)") && o.error.contains("64 MiB"), "{}", o.error);
    }

    #[test]
    fn oom_timeout_and_kill_win_over_the_signal() {
        let mut e = exit(None, Some(9));
        e.stats = CgroupStats { oom_kills: 1, memory_limit_bytes: Some(64 << 20), ..Default::default() };
        let o = outcome(&e, None);
        assert!(o.error.contains("out of memory") && o.error.contains("64 MiB"), "{}", o.error);
        e.oom_victims = vec!["python3 (pid 7)".into()];
        assert!(outcome(&e, None).error.ends_with("(python3 (pid 7) killed)"), "{}", outcome(&e, None).error);
        e.killed = Some(KillReason::Timeout);
        assert_eq!(outcome(&e, Some(3)).error, "timeout after 3 s");
        e.killed = Some(KillReason::Requested);
        assert_eq!(outcome(&e, None).state, TaskState::Killed);
    }

    #[test]
    fn kills_for_the_workers_reasons_are_worker_failures() {
        let mut e = exit(None, Some(15));
        e.killed = Some(KillReason::Fenced);
        e.worker_failure = Some("lost contact with the controller for 30 s".into());
        let o = outcome(&e, None);
        assert_eq!((o.state, o.error.as_str()), (TaskState::WorkerFailed, "lost contact with the controller for 30 s"));
        e.killed = Some(KillReason::Requested);
        e.worker_failure = Some("the controller reset this worker".into());
        assert_eq!(outcome(&e, None).state, TaskState::WorkerFailed);
    }
}
