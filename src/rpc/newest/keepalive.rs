//! When the controller last spoke to this worker: touched by each Reconcile addressed to it
//! (in this module's service), waited on by [`crate::join`], which registers again after a
//! silence.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When the controller last spoke to this worker (a Reconcile addressed to it).
#[derive(Debug)]
pub struct KeepAlive {
    last: Mutex<Instant>,
    timeout: Duration,
    touched: tokio::sync::Notify,
}

impl KeepAlive {
    pub fn new(timeout: Duration) -> Arc<KeepAlive> {
        Arc::new(KeepAlive { last: Mutex::new(Instant::now()), timeout, touched: tokio::sync::Notify::new() })
    }

    /// How long a silence may last.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A Reconcile for this worker arrived.
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.touched.notify_waiters();
    }

    /// When the keep-alive runs out, unless touched before.
    fn deadline(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) + self.timeout
    }

    /// Returns once no touch came for the timeout.
    pub async fn silence(&self) {
        loop {
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = self.touched.notified() => {}
            }
        }
    }
}
