//! In-memory fakes of the task manager's seams ([`super::seams`]), for the unit tests of its
//! state machine (`task::tests`). A unit-test seam only: the same paths run against real
//! supervisors, cgroups and clocks in tests/containers.rs and the kill -9 and restart tests
//! of tests/shared_host.rs.
//!
//! The fake supervisor does nothing by itself: a test plays the supervisor's part — it says
//! when the command started ([`FakeSpawner::start`]), what the exit record holds
//! ([`FakeSpawner::exit`]) — and reads what the manager asked of it ([`FakeSpawner::kills`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::seams::{BoxFuture, Cgroups, Clock, Seams, Spawner};
use super::{ManagerConfig, TaskError};
use crate::cgroup::{CgroupStats, Layout};
use crate::supervisor::handle::{Ready, Supervisor};
use crate::taskdir::{self, ExitRecord, KillRequest, ProcessId};

/// Fake pids start above the kernel's largest pid (2^22), so none is a real process.
const FIRST_PID: i32 = 1 << 24;

/// The seams, all fake, with handles to drive them.
pub(crate) struct Fakes {
    pub(crate) cgroups: Arc<FakeCgroups>,
    pub(crate) spawner: Arc<FakeSpawner>,
    pub(crate) clock: Arc<FakeClock>,
}

impl Fakes {
    pub(crate) fn new() -> Fakes {
        Fakes {
            cgroups: Arc::new(FakeCgroups::default()),
            spawner: Arc::new(FakeSpawner::default()),
            clock: Arc::new(FakeClock::new()),
        }
    }

    pub(crate) fn seams(&self) -> Seams {
        Seams { cgroups: self.cgroups.clone(), spawner: self.spawner.clone(), clock: self.clock.clone() }
    }
}

/// What the manager did to the cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CgroupCall {
    Kill(String),
    Remove(String),
}

/// Cgroups in memory: one parent, readings the test sets, calls recorded.
#[derive(Default)]
pub(crate) struct FakeCgroups {
    calls: Mutex<Vec<CgroupCall>>,
    stats: Mutex<HashMap<String, CgroupStats>>,
}

/// The fake worker's parent cgroup.
pub(crate) const PARENT: &str = "/fake/iris-worker/w";

impl FakeCgroups {
    pub(crate) fn calls(&self) -> Vec<CgroupCall> {
        self.calls.lock().unwrap().clone()
    }

    /// What reading the cgroup `path` gives from now on.
    pub(crate) fn set_stats(&self, path: &str, stats: CgroupStats) {
        self.stats.lock().unwrap().insert(path.to_string(), stats);
    }
}

impl Cgroups for FakeCgroups {
    fn prepare_parent(&self, _: &ManagerConfig) -> Result<Option<(Layout, String)>, TaskError> {
        // A layout nothing reads through: the fake answers for it.
        Ok(Some((Layout::V2 { root: PathBuf::from("/nonexistent/fake-cgroupfs") }, PARENT.to_string())))
    }

    fn stats(&self, _: &Layout, path: &str, _: &crate::cgroup::StatsCache) -> Option<CgroupStats> {
        self.stats.lock().unwrap().get(path).cloned()
    }

    fn kill_all(&self, path: &str) {
        self.calls.lock().unwrap().push(CgroupCall::Kill(path.to_string()));
    }

    fn remove(&self, path: &str) {
        self.calls.lock().unwrap().push(CgroupCall::Remove(path.to_string()));
    }
}

/// One fake supervisor.
struct FakeSup {
    dir: PathBuf,
    ready: Option<oneshot::Sender<Ready>>,
    exited: watch::Sender<bool>,
}

#[derive(Default)]
struct SpawnerState {
    next: i32,
    sups: HashMap<i32, FakeSup>,
    /// Task directories in the order their supervisors were spawned.
    spawned: Vec<PathBuf>,
    /// Every kill delivered: the directory, and its `kill.json` as the supervisor would read it.
    kills: Vec<(PathBuf, Option<KillRequest>)>,
}

/// Supervisors in memory.
#[derive(Default)]
pub(crate) struct FakeSpawner {
    state: Mutex<SpawnerState>,
    changed: tokio::sync::Notify,
}

impl FakeSpawner {
    fn register(&self, dir: &Path, ready: Option<oneshot::Sender<Ready>>) -> Supervisor {
        let mut st = self.state.lock().unwrap();
        let pid = FIRST_PID + st.next;
        st.next += 1;
        st.sups.insert(pid, FakeSup { dir: dir.to_path_buf(), ready, exited: watch::channel(false).0 });
        Supervisor { id: ProcessId { pid, start_time: 1 } }
    }

    /// A supervisor a previous worker started for `dir`, alive (for restart recovery):
    /// [`Spawner::find`] finds it.
    pub(crate) fn adopt(&self, dir: &Path) -> Supervisor {
        self.register(dir, None)
    }

    /// Task directories whose supervisors were spawned, in order.
    pub(crate) fn spawned(&self) -> Vec<PathBuf> {
        self.state.lock().unwrap().spawned.clone()
    }

    /// Waits (with a deadline) until `n` supervisors have been spawned; returns their dirs.
    pub(crate) async fn wait_spawned(&self, n: usize) -> Vec<PathBuf> {
        self.wait_for(|st| (st.spawned.len() >= n).then(|| st.spawned.clone()), &format!("{n} spawns")).await
    }

    /// The kills delivered to supervisors of `dir`: the `kill.json` each one found.
    pub(crate) fn kills(&self, dir: &Path) -> Vec<Option<KillRequest>> {
        let st = self.state.lock().unwrap();
        st.kills.iter().filter(|(d, _)| d == dir).map(|(_, k)| k.clone()).collect()
    }

    /// Waits (with a deadline) until `n` kills reached the supervisor of `dir`.
    pub(crate) async fn wait_kills(&self, dir: &Path, n: usize) -> Vec<Option<KillRequest>> {
        self.wait_for(
            |st| {
                let k: Vec<_> = st.kills.iter().filter(|(d, _)| d == dir).map(|(_, k)| k.clone()).collect();
                (k.len() >= n).then_some(k)
            },
            &format!("{n} kills"),
        )
        .await
    }

    async fn wait_for<T>(&self, mut done: impl FnMut(&SpawnerState) -> Option<T>, what: &str) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.changed.notified();
            if let Some(t) = done(&self.state.lock().unwrap()) {
                return t;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the fake supervisors saw no {what} within 5 s"
            );
        }
    }

    /// The supervisor of `dir` records that the command runs (at the clock's start) and says
    /// so on its ready pipe.
    pub(crate) fn start(&self, dir: &Path) {
        let started = taskdir::Started { pid: 1, started_at_ms: EPOCH_MS };
        taskdir::write_json(dir, taskdir::STARTED, &started).unwrap();
        let ready = self.sup_of(dir, |s| s.ready.take());
        if let Some(tx) = ready.flatten() {
            let _ = tx.send(Ready::Started);
        }
    }

    /// The supervisor of `dir` records `exit` and exits (`None`: it dies without a record).
    pub(crate) fn exit(&self, dir: &Path, exit: Option<ExitRecord>) {
        if let Some(exit) = exit {
            taskdir::write_json(dir, taskdir::EXIT, &exit).unwrap();
        }
        let mut st = self.state.lock().unwrap();
        let pid = st.sups.iter().find(|(_, s)| s.dir == dir).map(|(p, _)| *p).expect("no supervisor for the dir");
        if let Some(sup) = st.sups.remove(&pid) {
            let _ = sup.exited.send(true);
        }
    }

    fn sup_of<T>(&self, dir: &Path, f: impl FnOnce(&mut FakeSup) -> T) -> Option<T> {
        let mut st = self.state.lock().unwrap();
        st.sups.values_mut().find(|s| s.dir == dir).map(f)
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&self, _exe: &Path, dir: &Path) -> io::Result<(Supervisor, BoxFuture<Ready>)> {
        let (tx, rx) = oneshot::channel();
        let sup = self.register(dir, Some(tx));
        // A supervisor records itself first thing.
        taskdir::write_json(dir, taskdir::PID, &sup.id).map_err(io::Error::other)?;
        self.state.lock().unwrap().spawned.push(dir.to_path_buf());
        self.changed.notify_waiters();
        // A supervisor that goes away without a word failed to start the command.
        Ok((sup, Box::pin(async move { rx.await.unwrap_or(Ready::Failed) })))
    }

    fn find(&self, dir: &Path) -> Option<Supervisor> {
        let st = self.state.lock().unwrap();
        st.sups
            .iter()
            .find(|(_, s)| s.dir == dir)
            .map(|(pid, _)| Supervisor { id: ProcessId { pid: *pid, start_time: 1 } })
    }

    fn deliver_kill(&self, sup: &Supervisor) {
        let mut st = self.state.lock().unwrap();
        if let Some(dir) = st.sups.get(&sup.id.pid).map(|s| s.dir.clone()) {
            let request = taskdir::read_json::<KillRequest>(&dir, taskdir::KILL).ok().flatten();
            st.kills.push((dir, request));
        }
        drop(st);
        self.changed.notify_waiters();
    }

    fn wait_exit(&self, sup: Supervisor) -> BoxFuture<io::Result<()>> {
        let rx = self.state.lock().unwrap().sups.get(&sup.id.pid).map(|s| s.exited.subscribe());
        Box::pin(async move {
            if let Some(mut rx) = rx {
                let _ = rx.wait_for(|e| *e).await;
            }
            Ok(())
        })
    }

    fn running_under(&self, _: &Path) -> Vec<(i32, PathBuf)> {
        // Every fake supervisor records itself at once: none is found by its command line.
        Vec::new()
    }
}

/// A clock that moves only when the test says so.
pub(crate) struct FakeClock {
    base: Instant,
    /// Milliseconds since `base`.
    offset_ms: AtomicI64,
    ticks: watch::Sender<i64>,
}

/// The fake clock's wall time at its start (2026-01-01T00:00:00Z).
pub(crate) const EPOCH_MS: i64 = 1_767_225_600_000;

impl FakeClock {
    fn new() -> FakeClock {
        FakeClock { base: Instant::now(), offset_ms: AtomicI64::new(0), ticks: watch::channel(0).0 }
    }

    /// Moves the clock `d` forward, waking the sleepers whose time has come.
    pub(crate) fn advance(&self, d: Duration) {
        let now = self.offset_ms.fetch_add(d.as_millis() as i64, Ordering::SeqCst) + d.as_millis() as i64;
        self.ticks.send_replace(now);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> i64 {
        EPOCH_MS + self.offset_ms.load(Ordering::SeqCst)
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.offset_ms.load(Ordering::SeqCst) as u64)
    }

    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        let until = self.offset_ms.load(Ordering::SeqCst) + d.as_millis() as i64;
        let mut rx = self.ticks.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= until).await;
        })
    }
}
