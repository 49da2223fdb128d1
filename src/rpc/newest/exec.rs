//! ExecInContainer with the semantics of Iris's newest worker (`service.py`, `worker.py`):
//! an empty command is INVALID_ARGUMENT; a timeout of 0 means 60 s and a negative one none;
//! the target is the task's current attempt, and a task that is unknown or not RUNNING is
//! answered with HTTP 200, `exit_code` 0 and `error` set, not an RPC error; otherwise the
//! command's exit code, stdout and stderr. Unlike Iris's process runtime, which runs the
//! command on the host, the command runs inside the task ([`crate::exec`]).

use std::time::Duration;

use tonic::{Code, Status};

use crate::proto::newest::iris::cluster::worker::{ExecInContainerRequest, ExecInContainerResponse};
use crate::task::{TaskError, TaskManager, TaskState, short};

/// Iris's default when the request says 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The timeout a request asks for: 0 → 60 s, negative → none.
pub fn timeout_of(timeout_seconds: i32) -> Option<Duration> {
    match timeout_seconds {
        0 => Some(DEFAULT_TIMEOUT),
        s if s < 0 => None,
        s => Some(Duration::from_secs(s as u64)),
    }
}

/// Runs the request's command in the task's current attempt.
pub async fn exec_in_container(
    manager: &TaskManager,
    req: ExecInContainerRequest,
) -> Result<ExecInContainerResponse, Status> {
    if req.command.is_empty() {
        return Err(Status::new(Code::InvalidArgument, "invalid command: is required (an argv of at least one word)"));
    }
    let refused = |error: String| Ok(ExecInContainerResponse { error, ..Default::default() });
    let (_, state, dir) = match manager.exec_target(&req.task_id) {
        Ok(target) => target,
        Err(TaskError::NotFound(_)) => return refused(format!("Task {} not found", short(&req.task_id))),
        Err(e) => return Err(crate::rpc::to_status(e)),
    };
    if state != TaskState::Running {
        return refused(format!("Task {} is not running (state=TASK_STATE_{})", short(&req.task_id), state.name()));
    }
    let timeout = timeout_of(req.timeout_seconds);
    match crate::exec::run(manager.helper_exe(), &dir, &req.command, timeout).await {
        Ok(o) => {
            Ok(ExecInContainerResponse { exit_code: o.exit_code, stdout: o.stdout, stderr: o.stderr, error: o.error })
        }
        Err(e) => {
            tracing::warn!(task_id = %req.task_id, error = %e, "exec into a task");
            refused(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_sixty_seconds_and_negative_means_none() {
        assert_eq!(timeout_of(0), Some(Duration::from_secs(60)));
        assert_eq!(timeout_of(-1), None);
        assert_eq!(timeout_of(5), Some(Duration::from_secs(5)));
    }
}
