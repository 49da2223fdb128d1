//! Task errors as gRPC/Connect status codes.

use tonic::{Code, Status};

use crate::task::TaskError;

/// The status for `err`: bad input → INVALID_ARGUMENT naming the field, unknown task →
/// NOT_FOUND, a duplicate attempt → ALREADY_EXISTS, everything else INTERNAL with the causes.
pub fn to_status(err: TaskError) -> Status {
    let code = match &err {
        TaskError::Invalid { .. } => Code::InvalidArgument,
        TaskError::NotFound(_) => Code::NotFound,
        TaskError::AlreadyExists { .. } => Code::AlreadyExists,
        TaskError::StaleAttempt { .. } | TaskError::AlreadyCompleted { .. } => Code::FailedPrecondition,
        TaskError::PortsExhausted { .. } => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Status::new(code, message)
}
