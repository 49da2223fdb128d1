//! The errors of the BuildKit client.

use std::path::PathBuf;

/// What went wrong talking to BuildKit or building.
#[derive(Debug, thiserror::Error)]
pub enum BuildkitError {
    /// The address is not `unix://PATH`, `tcp://HOST:PORT` or `docker-unix://PATH`.
    #[error("BuildKit address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    /// Nothing answered at the address (or the HTTP upgrade of a Docker daemon failed).
    #[error("BuildKit at {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// A Control call failed.
    #[error("BuildKit at {addr}: {call} failed: {status}")]
    Call { addr: String, call: &'static str, status: Box<tonic::Status> },
    /// The build ran and failed (BuildKit's message, e.g. a RUN's exit code).
    #[error("the build failed: {0}")]
    BuildFailed(String),
    /// The request is unusable (no Dockerfile, a path outside the context, …).
    #[error("{0}")]
    BadRequest(String),
    /// The session's file transfer failed.
    #[error("BuildKit session: {0}")]
    Session(String),
    /// The exporter's output could not be written.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

pub(crate) fn io<'a>(op: &'static str, path: &'a std::path::Path) -> impl FnOnce(std::io::Error) -> BuildkitError + 'a {
    move |source| BuildkitError::Io { op, path: path.to_path_buf(), source }
}
