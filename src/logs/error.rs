//! The one error type of the log store.

use std::io;
use std::path::PathBuf;

/// Every failure names the file it happened on, because a worker serves logs
/// for many tasks and "permission denied" alone does not say which one broke.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("creating log directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("opening log file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("reading log index {}: {source}", path.display())]
    ReadIndex { path: PathBuf, source: io::Error },
    #[error("reading log data {}: {source}", path.display())]
    ReadData { path: PathBuf, source: io::Error },
    #[error("writing log file {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("truncating torn tail of {}: {source}", path.display())]
    Truncate { path: PathBuf, source: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_the_file_and_the_cause() {
        let err = LogError::ReadIndex {
            path: PathBuf::from("/logs/t1/log.idx"),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(err.to_string(), "reading log index /logs/t1/log.idx: denied");
        assert!(std::error::Error::source(&err).is_some());
    }
}
