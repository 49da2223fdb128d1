//! Finished tasks' workdirs are removed after a retention period; their logs and exit records
//! stay until `iris-worker cleanup --all`. A finished task's workdir holds its outputs (an Iris
//! entrypoint's `_result.pkl`), so the default period is long.

use std::sync::Arc;
use std::time::Duration;

use super::{Inner, lock};
use crate::supervisor::files::{self, now_ms};

/// Starts the janitor, when the manager has a retention period.
pub(super) fn spawn_janitor(inner: &Arc<Inner>) {
    let Some(retention) = inner.config.workdir_retention else { return };
    let weak = Arc::downgrade(inner);
    let period = (retention / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let retention_ms = retention.as_millis() as i64;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(inner) = weak.upgrade() else { return };
            let cutoff = now_ms() - retention_ms;
            let due: Vec<std::path::PathBuf> = lock(&inner.tasks)
                .values()
                .flatten()
                .filter(|a| a.finished_at_ms().is_some_and(|t| t <= cutoff))
                .map(|a| a.dir.join(files::WORKDIR))
                .filter(|w| w.exists())
                .collect();
            drop(inner);
            if due.is_empty() {
                continue;
            }
            let _ = tokio::task::spawn_blocking(move || {
                for dir in due {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(dir = %dir.display(), error = %e, "removing a finished task's workdir");
                    }
                }
            })
            .await;
        }
    });
}
