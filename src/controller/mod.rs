//! The controller: jobs become tasks scheduled onto registered workers, with retries, an
//! endpoint registry, and its state in an embedded SQLite file.
//!
//! - [`model`]: the records (jobs, tasks and attempts, workers, endpoints);
//! - [`store`]: the SQLite file under `--state-dir`;
//! - [`state`]: the state machine (launch, reports, retries, dead workers, aggregation);
//! - [`scheduler`]: placement by free resources, devices, constraints and coscheduling;
//! - [`dispatch`]: the calls to workers (RunTask, KillTask, GetTaskStatus), in parallel;
//! - [`service`]: ControllerService over gRPC and Connect on one port, with [`web`]'s pages;
//! - [`client`]: [`Cluster`], the Rust client of a controller (what the CLI verbs use).
//!
//! `Controller::open(config)` resumes from the state directory; [`serve`] runs it on a
//! listener until a shutdown future completes.

pub mod client;
mod dispatch;
pub mod model;
pub mod scheduler;
mod service;
pub mod state;
pub mod store;
mod web;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use client::{Cluster, ClusterError};
pub use service::{ServeError, serve};

use state::{Knobs, State};
use store::{Store, StoreError};

/// Errors of the controller's operations (mapped to gRPC/Connect codes in [`service`]).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A bad request, naming the field.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("job {0:?} already exists and has not ended")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Settings of a controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where `controller.db` lives.
    pub state_dir: PathBuf,
    /// A worker silent this long is dead (Iris: 60 s).
    pub worker_timeout: Duration,
    /// RunTask calls in flight at once.
    pub max_parallel_dispatch: usize,
}

impl ControllerConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> ControllerConfig {
        ControllerConfig {
            state_dir: state_dir.into(),
            worker_timeout: Duration::from_secs(60),
            max_parallel_dispatch: 64,
        }
    }
}

/// A running controller's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Group commit: one writer at a time; `committed` is the last change on disk.
    commit: tokio::sync::Mutex<()>,
    committed: AtomicU64,
    wake: tokio::sync::Notify,
    config: ControllerConfig,
    calls: dispatch::Calls,
    started: std::time::Instant,
}

impl Controller {
    /// Opens (or creates) the state in `config.state_dir` and resumes from it. Call inside a
    /// tokio runtime: the resumed dispatches and the scheduler start at once.
    pub fn open(config: ControllerConfig) -> Result<Controller, ControllerError> {
        let store = Store::open(&config.state_dir)?;
        let knobs = Knobs { worker_timeout: config.worker_timeout, suspect_for: Duration::from_secs(5) };
        let state = State::open(store, knobs)?;
        let c = Controller {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                commit: tokio::sync::Mutex::new(()),
                committed: AtomicU64::new(0),
                wake: tokio::sync::Notify::new(),
                calls: dispatch::Calls::new(config.max_parallel_dispatch),
                config,
                started: std::time::Instant::now(),
            }),
        };
        let effects = c.lock().take_effects();
        c.run_effects(effects);
        tokio::spawn(c.clone().scheduler_loop());
        Ok(c)
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as it was at that point; carrying
        // on is better than refusing every later call.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and returns once what it changed is on disk (concurrent callers
    /// share one transaction: group commit); then makes the calls it asked for.
    pub(crate) async fn with_state<R>(
        &self,
        f: impl FnOnce(&mut State) -> Result<R, ControllerError>,
    ) -> Result<R, ControllerError> {
        let (result, effects, change) = {
            let mut s = self.lock();
            let r = f(&mut s);
            s.changes += 1;
            (r, s.take_effects(), s.changes)
        };
        let committed = self.commit(change).await;
        self.run_effects(effects);
        let r = result?;
        committed?;
        Ok(r)
    }

    /// Runs `f` on the state without waiting for the disk: for outcomes nobody is waiting
    /// an answer for (a dispatch's result); the next commit writes them.
    pub(crate) fn update(&self, f: impl FnOnce(&mut State)) {
        let effects = {
            let mut s = self.lock();
            f(&mut s);
            s.changes += 1;
            s.take_effects()
        };
        self.run_effects(effects);
    }

    async fn commit(&self, change: u64) -> Result<(), ControllerError> {
        if self.inner.committed.load(Ordering::Acquire) >= change {
            return Ok(());
        }
        let _writer = self.inner.commit.lock().await;
        if self.inner.committed.load(Ordering::Acquire) >= change {
            return Ok(());
        }
        let mut s = self.lock();
        let upto = s.changes;
        s.flush()?;
        self.inner.committed.store(upto, Ordering::Release);
        Ok(())
    }

    /// Reads the state.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Asks the scheduler to run a pass soon.
    pub(crate) fn wake(&self) {
        self.inner.wake.notify_one();
    }

    fn run_effects(&self, effects: Vec<state::Effect>) {
        for e in effects {
            dispatch::run(self.clone(), e);
        }
    }

    /// The scheduler: a pass whenever something changed, and the periodic checks (dead
    /// workers, scheduling timeouts) a few times per worker timeout.
    async fn scheduler_loop(self) {
        let tick = (self.inner.config.worker_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            if let Err(e) = self
                .with_state(|s| {
                    s.tick();
                    s.schedule();
                    Ok(())
                })
                .await
            {
                tracing::error!(error = %e, "scheduling pass");
            }
        }
    }

    /// Placement decision times (ns per task) recorded so far, and the rows/transactions written (for the
    /// benchmark).
    pub fn figures(&self) -> (Vec<u64>, u64, u64) {
        let s = self.lock();
        let (rows, txs) = s.store_counts();
        (s.placement_latencies_ns.clone(), rows, txs)
    }
}
