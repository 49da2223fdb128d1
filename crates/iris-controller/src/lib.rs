//! The controller: jobs become tasks scheduled onto registered workers, with retries, an
//! endpoint registry, and its state in an embedded SQLite file.
//!
//! - `model`: the records (jobs, tasks and attempts, workers, endpoints);
//! - `store`: the SQLite file under `--state-dir`;
//! - `state`: the state machine (launch, reports, retries, dead workers, aggregation);
//! - `scheduler`: placement by free resources, devices, constraints and coscheduling;
//! - [`dispatch`]: the calls to workers (RunTask, KillTask, GetTaskStatus), in parallel;
//! - [`service`]: ControllerService over gRPC and Connect on one port, with [`web`]'s pages;
//! - [`client`]: [`Cluster`], the Rust client of a controller (what the CLI verbs use).
//!
//! `Controller::open(config)` resumes from the state directory; [`serve`] runs it on a
//! listener until a shutdown future completes.

#![warn(missing_docs)]

mod bundles;
pub mod client;
mod dispatch;
mod model;
mod scheduler;
mod service;
mod state;
mod store;
mod web;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use client::{Cluster, ClusterError};
pub use service::{ServeError, serve, serve_with};

use state::{Knobs, State};
use store::{Store, StoreError};

/// How often unneeded inline bundles are looked for (and how old one must be to go).
const BLOB_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Errors of the controller's operations (mapped to gRPC/Connect codes in [`service`]).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
pub enum ControllerError {
    /// A bad request, naming the field.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("Job {0} already exists")]
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
    /// The URL workers reach this controller at (`http://host:port`): inline bundles
    /// (`bundle_blob`) are dispatched as `<advertise_url>/bundles/<sha256>.zip` (made at each
    /// dispatch: a restart may change it). Empty: such jobs are refused.
    pub advertise_url: String,
    /// What calls to workers present (token, TLS).
    pub workers: iris_wire::ClientSecurity,
    /// Test seam: how long a RegisterWorker answer is held back after the heartbeat was taken
    /// in and the scheduler woken, so that a RunTask (or another call) reaches the worker before
    /// the answer does — the races of a real cluster (a join's reset, a lease renewed late),
    /// made certain. Zero outside tests.
    pub register_reply_delay: Duration,
}

impl ControllerConfig {
    /// The defaults, with the controller's state (its SQLite file, stored bundles) in
    /// `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> ControllerConfig {
        ControllerConfig {
            state_dir: state_dir.into(),
            worker_timeout: Duration::from_secs(60),
            max_parallel_dispatch: 64,
            advertise_url: String::new(),
            workers: iris_wire::ClientSecurity::default(),
            register_reply_delay: Duration::ZERO,
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
    blobs: bundles::BlobStore,
}

impl Controller {
    /// Opens (or creates) the state in `config.state_dir` and resumes from it. Call inside a
    /// tokio runtime: the resumed dispatches and the scheduler start at once.
    pub fn open(config: ControllerConfig) -> Result<Controller, ControllerError> {
        let store = Store::open(&config.state_dir)?;
        let knobs = Knobs {
            worker_timeout: config.worker_timeout,
            suspect_for: Duration::from_secs(5),
            bundle_base: config.advertise_url.trim_end_matches('/').to_string(),
        };
        let state = State::open(store, knobs)?;
        let blobs = bundles::BlobStore::open(&config.state_dir)
            .map_err(|e| ControllerError::FailedPrecondition(format!("opening the bundle directory: {e}")))?;
        let c = Controller {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                commit: tokio::sync::Mutex::new(()),
                committed: AtomicU64::new(0),
                wake: tokio::sync::Notify::new(),
                calls: dispatch::Calls::new(config.max_parallel_dispatch, config.workers.clone()),
                config,
                started: std::time::Instant::now(),
                blobs,
            }),
        };
        let effects = c.lock().take_effects();
        c.run_effects(effects);
        tokio::spawn(c.clone().scheduler_loop());
        Ok(c)
    }

    /// What the controller was opened with.
    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    /// How long since the controller was opened.
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

    /// The registered workers' ids and addresses (what `iris-worker cluster` prints).
    pub fn worker_addresses(&self) -> Vec<(String, String)> {
        self.read(|s| s.workers.values().map(|w| (w.rec.worker_id.clone(), w.rec.address.clone())).collect())
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
        let mut last_sweep = std::time::Instant::now() - BLOB_SWEEP_EVERY;
        loop {
            if last_sweep.elapsed() >= BLOB_SWEEP_EVERY {
                last_sweep = std::time::Instant::now();
                self.sweep_blobs().await;
            }
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

    /// The inline bundles (`bundle_blob`) this controller keeps and serves.
    pub fn blobs(&self) -> &bundles::BlobStore {
        &self.inner.blobs
    }

    /// LaunchJob: an inline bundle (`bundle_blob`) is stored first and the job keeps its sha256;
    /// returns the job's id once it is on disk.
    pub(crate) async fn launch(
        &self,
        mut req: iris_wire::proto::controller::LaunchJobRequest,
    ) -> Result<String, ControllerError> {
        let inline = if req.bundle_blob.is_empty() { None } else { Some(self.take_blob(&mut req).await?) };
        self.with_state(|s| s.launch_with_bundle(req, inline)).await
    }

    /// Stores an inline bundle and returns its sha256; the blob leaves the request, and so does
    /// any `bundle_gcs_path` (the blob is the job's bundle). The URL is made at dispatch.
    async fn take_blob(
        &self,
        req: &mut iris_wire::proto::controller::LaunchJobRequest,
    ) -> Result<String, ControllerError> {
        let base = self.inner.config.advertise_url.trim_end_matches('/').to_string();
        if base.is_empty() {
            return Err(ControllerError::FailedPrecondition(
                "bundle_blob: this controller has no advertised URL to serve bundles from".into(),
            ));
        }
        let blob = std::mem::take(&mut req.bundle_blob);
        let expected = (!req.bundle_sha256.is_empty()).then(|| req.bundle_sha256.clone());
        let store = self.inner.blobs.clone();
        let sha = tokio::task::spawn_blocking(move || store.put(&blob, expected.as_deref()))
            .await
            .map_err(|e| ControllerError::FailedPrecondition(format!("storing the bundle: {e}")))?
            .map_err(|e| match e {
                bundles::BlobError::Io(_) => ControllerError::FailedPrecondition(e.to_string()),
                other => ControllerError::Invalid { field: "bundle_blob".into(), reason: other.to_string() },
            })?;
        req.bundle_gcs_path.clear();
        req.bundle_sha256.clear();
        Ok(sha)
    }

    /// Removes the inline bundles no job that has not ended names by sha256, once they are
    /// older than [`BLOB_SWEEP_EVERY`] (a blob stored for a launch still being recorded is
    /// young). Jobs recorded before the controller kept the sha name theirs by their URL's
    /// `…/bundles/<sha>.zip`, whatever host it names.
    async fn sweep_blobs(&self) {
        let keep: std::collections::HashSet<String> = self.read(|s| {
            s.jobs
                .values()
                .filter(|j| !model::job_terminal(j.rec.state))
                .filter_map(|j| match j.rec.inline_bundle.as_str() {
                    "" => bundles::sha_in_url(&j.request.bundle_gcs_path).map(str::to_string),
                    sha => Some(sha.to_string()),
                })
                .collect()
        });
        let store = self.inner.blobs.clone();
        let removed = tokio::task::spawn_blocking(move || store.sweep(&keep, BLOB_SWEEP_EVERY)).await.unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "removed inline bundles no live job needs");
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

#[cfg(test)]
mod tests {
    use super::*;
    use iris_wire::proto::CommandEntrypoint;
    use iris_wire::proto::controller::LaunchJobRequest;
    use sha2::Digest;

    fn config(dir: &std::path::Path, url: &str) -> ControllerConfig {
        ControllerConfig { advertise_url: url.into(), ..ControllerConfig::new(dir) }
    }

    /// Makes the blob look as old as the sweep's minimum age, so only `keep` protects it.
    fn age(path: &std::path::Path) {
        let old = std::time::SystemTime::now() - BLOB_SWEEP_EVERY * 2;
        std::fs::File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn a_live_jobs_inline_bundle_outlives_a_restart_under_another_url() {
        let dir = tempfile::tempdir().unwrap();
        let zip = b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec();
        let req = LaunchJobRequest {
            name: "inline".into(),
            command: Some(CommandEntrypoint { argv: vec!["true".into()], setup_commands: vec![] }),
            bundle_blob: zip.clone(),
            ..Default::default()
        };
        // Each controller in a runtime of its own: dropping the runtime ends its scheduler.
        let first = tokio::runtime::Runtime::new().unwrap();
        let blob = first.block_on(async {
            let c = Controller::open(config(dir.path(), "http://old-host:1")).unwrap();
            c.launch(req).await.unwrap();
            c.blobs().path(&hex::encode(sha2::Sha256::digest(&zip)))
        });
        drop(first);
        assert!(blob.exists());
        age(&blob);
        let second = tokio::runtime::Runtime::new().unwrap();
        second.block_on(async {
            let c = Controller::open(config(dir.path(), "http://new-host:2")).unwrap();
            c.sweep_blobs().await;
            assert!(blob.exists(), "the live job's bundle is kept under the new URL");
            // Once the job has ended, its bundle goes.
            c.with_state(|s| s.terminate("inline")).await.unwrap();
            age(&blob);
            c.sweep_blobs().await;
            assert!(!blob.exists(), "an ended job's bundle is removed");
        });
    }
}
