//! Task errors as gRPC/Connect status codes.

use tonic::{Code, Status};

use crate::task::{TaskError, short};
use crate::taskdir::FileError;

/// The status for `err`: bad input → INVALID_ARGUMENT naming the field, unknown task →
/// NOT_FOUND, a duplicate attempt → ALREADY_EXISTS, no free port or a full disk →
/// RESOURCE_EXHAUSTED, everything else INTERNAL.
///
/// Ids are echoed cut short, and no message carries a host path: a failure inside the worker
/// is told by what failed and the system's reason, the full error (paths included) goes to the
/// worker's log.
pub fn to_status(err: TaskError) -> Status {
    let (code, message) = match &err {
        TaskError::Invalid { field, reason } => (Code::InvalidArgument, format!("invalid {field}: {reason}")),
        TaskError::NotFound(id) => (Code::NotFound, format!("task {:?} not found", short(id))),
        TaskError::AlreadyExists { task_id, attempt_id } => {
            (Code::AlreadyExists, format!("task {:?} attempt {attempt_id} already exists", short(task_id)))
        }
        TaskError::StaleAttempt { task_id, attempt_id, current } => (
            Code::FailedPrecondition,
            format!("attempt {attempt_id} of task {:?} is older than its current attempt {current}", short(task_id)),
        ),
        TaskError::AlreadyCompleted { task_id, state } => (
            Code::FailedPrecondition,
            format!("Task {} already completed with state TASK_STATE_{}", short(task_id), state.name()),
        ),
        TaskError::PortsExhausted { .. } => (Code::ResourceExhausted, err.to_string()),
        // "disk: N GiB free on <role> (minimum M GiB)": the filesystem by its role, no path.
        TaskError::DiskPressure(why) => (Code::ResourceExhausted, why.clone()),
        TaskError::File(FileError::Io { op, source, .. }) => {
            logged(&err);
            let code =
                if source.raw_os_error() == Some(libc::ENOSPC) { Code::ResourceExhausted } else { Code::Internal };
            (code, format!("{op} the task's files: {source}"))
        }
        TaskError::File(FileError::Parse { .. }) => {
            logged(&err);
            (Code::Internal, "a task file of the worker is malformed (see the worker's log)".to_string())
        }
        TaskError::Logs(_) => {
            logged(&err);
            (Code::Internal, "reading the task's log failed (see the worker's log)".to_string())
        }
        TaskError::Cgroup(_) => {
            logged(&err);
            (Code::Internal, "setting up the task's cgroup failed (see the worker's log)".to_string())
        }
        TaskError::Locked { reason, .. } => (Code::Internal, format!("the state directory is locked: {reason}")),
        // Errors added later are internal until they get their own code.
        #[allow(unreachable_patterns)]
        _ => {
            logged(&err);
            (Code::Internal, "the worker failed to handle the request (see its log)".to_string())
        }
    };
    Status::new(code, message)
}

/// Logs an internal error with its whole chain (paths included), for the operator.
fn logged(err: &TaskError) {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    tracing::warn!(error = %message, "a request failed inside the worker");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cut_ids_and_carry_no_path() {
        let long = "j/".repeat(400);
        let s = to_status(TaskError::NotFound(long.clone()));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() < 120, "{}", s.message());
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let path = "/var/lib/iris-worker/tasks/j_2ftask-0.0/request.pb".into();
        let s = to_status(TaskError::File(FileError::Io { op: "writing", path, source: io }));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(!s.message().contains("/var/lib"), "{}", s.message());
        assert!(s.message().starts_with("writing the task's files: No space left"), "{}", s.message());
    }
}
