//! The worker's background loops (task drivers, samplers, janitors, heartbeat, log pusher),
//! spawned under one cancellation token and one tracker, so that a shutdown can stop them all
//! and wait until each has stopped (see [`crate::worker`]). Tasks themselves are not touched:
//! they run under their supervisors, and the next worker on the state directory adopts them.

#![warn(missing_docs)]

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns loops that end when [`Background::shutdown`] is called. Cheap to clone: clones share
/// the token and the tracker.
#[derive(Clone, Debug, Default)]
pub struct Background {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Background {
    /// A set with nothing running, not shut down.
    pub fn new() -> Background {
        Background::default()
    }

    /// Spawns `work` on the current runtime; it is dropped at its next await once shutdown
    /// begins. Spawned after shutdown began, it never runs.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<()>
    where
        F: Future + Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            let _ = token.run_until_cancelled(work).await;
        })
    }

    /// The loops still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// No loop is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancels every loop and waits until each has ended.
    pub async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_and_waits_for_every_loop() {
        let bg = Background::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..3 {
            let tx = tx.clone();
            bg.spawn(async move {
                // Held until the loop is dropped: the channel closes only when all three are.
                let _tx = tx;
                std::future::pending::<()>().await;
            });
        }
        drop(tx);
        assert_eq!(bg.len(), 3);
        bg.shutdown().await;
        assert!(bg.is_empty());
        assert!(rx.recv().await.is_none(), "every loop was dropped");
        // After shutdown nothing new runs.
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        bg.spawn(async move { r.store(true, std::sync::atomic::Ordering::SeqCst) }).await.unwrap();
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
