//! One attempt of a task: its record, its state changes and its end. The verbs that move it
//! live beside it, one file each: [`super::launch`] (accept, wait for a slot, prepare, start
//! the supervisor), [`super::watch`] (wait for the supervisor's exit and read it),
//! [`super::kill`] (kill requests, leftovers of dead supervisors), [`super::report`] (what
//! status and events show), and [`super::recover`] (adopting what a previous worker left).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::history::{History, HistoryView};
use super::state::TaskState;
use super::store::{self, TaskMeta};
use super::{Inner, TaskEvent, lock};
use crate::cgroup::CgroupStats;
use crate::supervisor::handle::Supervisor;
use crate::taskdir::{self, ExitRecord};

/// A kill request that arrives before the supervisor can take it is parked here.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch {
    pub(crate) grace_ms: Mutex<Option<u64>>,
    /// The worker's own reason, when the first kill request was one (the attempt ends
    /// WORKER_FAILED with it).
    pub(crate) worker_failure: Mutex<Option<String>>,
    pub(crate) notify: Notify,
}

/// The changing part of an attempt.
#[derive(Debug)]
pub(super) struct Status {
    pub(super) state: TaskState,
    pub(super) status_message: String,
    pub(super) exit_code: i32,
    pub(super) error: String,
    pub(super) started_at_ms: i64,
    pub(super) finished_at_ms: i64,
    pub(super) supervisor: Option<Supervisor>,
    /// The supervisor said the command runs: kill requests can go to it directly.
    pub(super) started: bool,
    pub(super) final_stats: Option<CgroupStats>,
    /// When the attempt first became BUILDING, and when it left it (0: not yet).
    pub(super) build_started_ms: i64,
    pub(super) build_finished_ms: i64,
}

/// One attempt of a task.
pub(crate) struct Attempt {
    pub(crate) meta: TaskMeta,
    pub(crate) dir: PathBuf,
    /// The order in which this worker accepted (or adopted) its attempts: a controller's reset
    /// reaches only the attempts up to a mark ([`super::TaskManager::reset`]).
    pub(crate) seq: u64,
    /// When it was accepted (CLOCK_BOOTTIME ms): a lapsing lease ends the attempts accepted
    /// while it was held.
    pub(crate) accepted_boottime_ms: i64,
    pub(super) status: Mutex<Status>,
    pub(super) kill: KillSwitch,
    done: (watch::Sender<bool>, watch::Receiver<bool>),
    pub(super) history: Mutex<History>,
    /// The running task's cgroup figure files, kept open between readings (closed at its end).
    pub(super) stats_files: crate::cgroup::StatsCache,
    /// The environment's identity and whether it came from the cache (BuildMetrics).
    build: Mutex<Option<(bool, String)>>,
    /// The bundle the attempt runs from, held so the cache keeps it while the task runs.
    bundle: Mutex<Option<crate::bundle::Bundle>>,
    /// Shared locks on cache entries the attempt uses (its venv), released when it ends.
    leases: Mutex<Vec<std::sync::Arc<crate::cachelock::EntryLock>>>,
    /// The image the attempt runs in: its layers stay pinned until the attempt ends.
    image: Mutex<Option<crate::env::image::Image>>,
    /// Every cache entry the attempt uses, for its supervisor to hold and to mark as used when
    /// the attempt ends (so a long task's entries are not the first to go after it).
    uses: Mutex<Vec<crate::cachelock::Lease>>,
}

impl Attempt {
    pub(super) fn new(meta: TaskMeta, dir: PathBuf, state: TaskState, seq: u64) -> Arc<Attempt> {
        Arc::new(Attempt {
            meta,
            dir,
            seq,
            accepted_boottime_ms: crate::supervisor::lease::boottime_ms(),
            status: Mutex::new(Status {
                state,
                status_message: String::new(),
                exit_code: 0,
                error: String::new(),
                started_at_ms: 0,
                finished_at_ms: 0,
                supervisor: None,
                started: false,
                final_stats: None,
                build_started_ms: 0,
                build_finished_ms: 0,
            }),
            kill: KillSwitch::default(),
            done: watch::channel(false),
            history: Mutex::new(History::default()),
            stats_files: Default::default(),
            build: Mutex::new(None),
            bundle: Mutex::new(None),
            leases: Mutex::new(Vec::new()),
            image: Mutex::new(None),
            uses: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn state(&self) -> TaskState {
        lock(&self.status).state
    }

    /// When the attempt ended, once it has.
    pub(crate) fn finished_at_ms(&self) -> Option<i64> {
        let st = lock(&self.status);
        st.state.is_terminal().then_some(st.finished_at_ms)
    }

    pub(crate) async fn wait_done(&self) {
        let mut rx = self.done.1.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Adds cache entries (and host ports) the attempt uses: its supervisor holds them.
    pub(super) fn uses(&self, leases: impl IntoIterator<Item = crate::cachelock::Lease>) {
        let mut uses = lock(&self.uses);
        for l in leases {
            if !uses.contains(&l) {
                uses.push(l);
            }
        }
    }

    /// The cache entries the attempt uses.
    pub(super) fn leases(&self) -> Vec<crate::cachelock::Lease> {
        lock(&self.uses).clone()
    }

    /// Holds the image the attempt runs in (its layers' pins) until the attempt ends.
    pub(super) fn hold_image(&self, image: &crate::env::image::Image) {
        self.uses(image.leases());
        *lock(&self.image) = Some(image.clone());
    }

    /// Records the environment the attempt runs in.
    pub(super) fn set_build(&self, env: &crate::env::PythonEnv, lease: crate::cachelock::Lease) {
        self.uses([lease]);
        lock(&self.leases).push(env.lease.clone());
        let tag = format!("venv:{}", &env.key[..16.min(env.key.len())]);
        *lock(&self.build) = Some((env.from_cache, tag));
    }

    /// The attempt's environment is an image built from a Dockerfile (`tag` names it).
    pub(super) fn set_image_build(&self, from_cache: bool, tag: String) {
        *lock(&self.build) = Some((from_cache, tag));
    }

    pub(super) fn hold_bundle(&self, bundle: crate::bundle::Bundle, lease: crate::cachelock::Lease) {
        self.uses([lease]);
        *lock(&self.bundle) = Some(bundle);
    }

    /// (from_cache, image_tag) of the attempt's environment, once known.
    pub(super) fn build_info(&self) -> Option<(bool, String)> {
        lock(&self.build).clone()
    }

    pub(super) fn set(&self, inner: &Inner, state: TaskState, message: &str) {
        let mut st = lock(&self.status);
        st.state = state;
        st.status_message = message.to_string();
        if state == TaskState::Building && st.build_started_ms == 0 {
            st.build_started_ms = inner.seams.clock.now_ms();
        }
        if state == TaskState::Running {
            st.started_at_ms = inner.seams.clock.now_ms();
            st.build_finished_ms = st.started_at_ms;
        }
        drop(st);
        self.emit(inner);
    }

    pub(super) fn emit(&self, inner: &Inner) {
        let st = lock(&self.status);
        let event = TaskEvent {
            task_id: self.meta.task_id.clone(),
            job_id: self.meta.job_id.clone(),
            task_index: self.meta.task_index,
            attempt_id: self.meta.attempt_id,
            state: st.state,
            exit_code: st.exit_code,
            error: st.error.clone(),
            finished_at_ms: st.finished_at_ms,
        };
        drop(st);
        inner.emit(event);
    }

    /// Records the end: state, exit, figures; releases the ports; wakes the waiters. An end
    /// no `exit.json` records (`exit` is `None`) is written to the attempt's `ended.json`
    /// first, so it is the end a restarted worker finds too.
    pub(super) fn finish(
        &self,
        inner: &Inner,
        state: TaskState,
        exit_code: i32,
        error: String,
        exit: Option<&ExitRecord>,
    ) {
        let finished_at_ms =
            exit.map(|e| e.finished_at_ms).filter(|t| *t > 0).unwrap_or_else(|| inner.seams.clock.now_ms());
        let record = store::EndRecord { state, exit_code, error, finished_at_ms };
        self.end(inner, record, exit, exit.is_none());
    }

    /// Ends the attempt as its `ended.json` says (a restarted worker's view of it).
    pub(super) fn finish_recorded(&self, inner: &Inner, record: store::EndRecord) {
        self.end(inner, record, None, false);
    }

    fn end(&self, inner: &Inner, record: store::EndRecord, exit: Option<&ExitRecord>, persist: bool) {
        let mut st = lock(&self.status);
        if st.state.is_terminal() {
            return;
        }
        if persist && let Err(e) = store::record_end(&self.dir, &record) {
            tracing::warn!(task_id = %self.meta.task_id, error = %e, "recording how the task ended");
        }
        let store::EndRecord { state, exit_code, error, finished_at_ms } = record;
        self.stats_files.close();
        st.state = state;
        st.exit_code = exit_code;
        st.error = error;
        st.status_message.clear();
        st.finished_at_ms = finished_at_ms;
        if let Some(e) = exit {
            if let Some(s) = e.started_at_ms {
                st.started_at_ms = s;
            }
            st.final_stats = Some(e.stats.clone());
        }
        if st.build_started_ms > 0 && st.build_finished_ms == 0 {
            st.build_finished_ms = st.finished_at_ms;
        }
        drop(st);
        lock(&self.history).end();
        lock(&inner.ports).release(self.meta.ports.values().copied());
        lock(&self.bundle).take();
        lock(&self.leases).clear();
        lock(&self.image).take();
        for used in lock(&self.uses).iter() {
            used.touch();
        }
        // No kill request will come any more: its room goes back.
        taskdir::release(&self.dir, taskdir::KILL);
        tracing::info!(task_id = %self.meta.task_id, attempt = self.meta.attempt_id, state = state.name(), "task ended");
        self.emit(inner);
        let _ = self.done.0.send(true);
    }

    pub(crate) fn history(&self) -> HistoryView {
        lock(&self.history).view()
    }
}
