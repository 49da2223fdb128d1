//! The task list as the dashboard shows it, computed once a second for all viewers: one
//! producer reads the manager's list while anyone watches (and stops a few seconds after the
//! last viewer left), and each viewer's stream sends only the rows that changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::Web;
use super::host::HostFigures;
use crate::task::{TaskState, TaskView};

/// How often the list is recomputed while someone watches.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Ticks without viewers before the producer stops.
const IDLE_TICKS: u32 = 5;

/// The worker's figures at the top of the list (also `/api/worker`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerFigures {
    pub worker_id: String,
    pub version: &'static str,
    /// The worker's clock (Unix ms), so pages can show durations whatever the viewer's clock.
    pub now_ms: i64,
    pub uptime_ms: i64,
    /// Tasks by the state of their current attempt, every state present.
    pub tasks: BTreeMap<&'static str, usize>,
    pub host: HostFigures,
    /// Whether tasks can reach the worker's port (HealthCheck's `task_isolation`).
    pub task_isolation: String,
}

/// One row of the task list (the `upsert` objects of `/api/events/tasks`).
#[derive(Debug, Serialize)]
struct Row<'a> {
    id: &'a str,
    job: &'a str,
    /// Position in arrival order.
    seq: usize,
    attempt: i32,
    state: &'static str,
    message: &'a str,
    exit: i32,
    error: &'a str,
    /// Unix ms; 0 = not yet.
    started: i64,
    finished: i64,
    mem: u64,
    peak: u64,
    cpu: f64,
    procs: u64,
    disk: u64,
}

/// The list at one moment: the worker's figures and each task's row, as JSON.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub worker: String,
    pub rows: Vec<(String, String)>,
}

/// The worker's figures for `tasks`.
pub fn worker_figures(web: &Web, tasks: &[TaskView]) -> WorkerFigures {
    let m = &web.inner.manager;
    WorkerFigures {
        worker_id: m.worker_id().to_string(),
        version: env!("CARGO_PKG_VERSION"),
        now_ms: iris_wire::clock::now_ms(),
        uptime_ms: m.health().uptime_ms,
        task_isolation: m.health().task_isolation,
        tasks: TaskState::ALL.iter().map(|s| (s.name(), tasks.iter().filter(|t| t.state == *s).count())).collect(),
        host: web.inner.host.read(),
    }
}

fn row_json(seq: usize, t: &TaskView) -> String {
    let u = t.usage.clone().unwrap_or_default();
    let row = Row {
        id: &t.task_id,
        job: &t.job_id,
        seq,
        attempt: t.current_attempt_id,
        state: t.state.name(),
        message: &t.status_message,
        exit: t.exit_code,
        error: &t.error,
        started: t.started_at_ms,
        finished: t.finished_at_ms,
        mem: u.memory_bytes,
        peak: u.memory_peak_bytes,
        cpu: (u.cpu_percent * 10.0).round() / 10.0,
        procs: u.processes,
        disk: u.disk_bytes,
    };
    serde_json::to_string(&row).unwrap_or_default()
}

/// Computes the list now (blocking: reads cgroup files and workdir sizes).
pub fn take(web: &Web) -> Snapshot {
    let tasks = web.inner.manager.list();
    let worker = serde_json::to_string(&worker_figures(web, &tasks)).unwrap_or_default();
    let rows = tasks.iter().enumerate().map(|(i, t)| (t.task_id.clone(), row_json(i, t))).collect();
    Snapshot { worker, rows }
}

/// A receiver of the list, recomputed every [`INTERVAL`]; starts the producer if none runs.
pub async fn subscribe(web: &Web) -> watch::Receiver<Arc<Snapshot>> {
    {
        let slot = web.inner.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = slot.as_ref()
            && rx.has_changed().is_ok()
        {
            return rx.clone();
        }
    }
    let w = web.clone();
    let first = tokio::task::spawn_blocking(move || take(&w)).await.unwrap_or_default();
    let (tx, rx) = watch::channel(Arc::new(first));
    let mut slot = web.inner.snapshots.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = slot.as_ref()
        && existing.has_changed().is_ok()
    {
        // Another viewer started one meanwhile.
        return existing.clone();
    }
    *slot = Some(rx.clone());
    drop(slot);
    let w = web.clone();
    web.inner.manager.background().spawn(async move {
        let mut idle = 0;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // The slot's own receiver is always there.
            if tx.receiver_count() <= 1 {
                idle += 1;
                if idle >= IDLE_TICKS {
                    let mut slot = w.inner.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                    if tx.receiver_count() <= 1 {
                        *slot = None;
                        return;
                    }
                }
                continue;
            }
            idle = 0;
            let w2 = w.clone();
            let Ok(snap) = tokio::task::spawn_blocking(move || take(&w2)).await else { continue };
            if tx.send(Arc::new(snap)).is_err() {
                return;
            }
        }
    });
    rx
}

/// One viewer's state: the rows it has, to send only what changed.
#[derive(Debug, Default)]
pub struct Viewer {
    rows: HashMap<String, String>,
    sent_any: bool,
}

impl Viewer {
    /// The event for `snap`: `{"full":bool,"worker":{…},"upsert":[rows],"remove":[ids]}`.
    pub fn diff(&mut self, snap: &Snapshot) -> String {
        let mut upsert = Vec::new();
        let mut seen = HashMap::with_capacity(snap.rows.len());
        for (id, json) in &snap.rows {
            if self.rows.get(id) != Some(json) {
                upsert.push(json.as_str());
            }
            seen.insert(id.clone(), json.clone());
        }
        let removed: Vec<&String> = self.rows.keys().filter(|id| !seen.contains_key(*id)).collect();
        let out = format!(
            "{{\"full\":{},\"worker\":{},\"upsert\":[{}],\"remove\":{}}}",
            !self.sent_any,
            if snap.worker.is_empty() { "null" } else { &snap.worker },
            upsert.join(","),
            serde_json::to_string(&removed).unwrap_or_else(|_| "[]".into())
        );
        self.rows = seen;
        self.sent_any = true;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_get_only_what_changed() {
        let snap = |rows: &[(&str, &str)]| Snapshot {
            worker: "{}".into(),
            rows: rows.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        };
        let mut v = Viewer::default();
        let e = v.diff(&snap(&[("a", "{\"id\":\"a\"}"), ("b", "{\"id\":\"b\"}")]));
        assert_eq!(e, r#"{"full":true,"worker":{},"upsert":[{"id":"a"},{"id":"b"}],"remove":[]}"#);
        let e = v.diff(&snap(&[("a", "{\"id\":\"a\"}"), ("b", "{\"id\":\"b\",\"x\":1}")]));
        assert_eq!(e, r#"{"full":false,"worker":{},"upsert":[{"id":"b","x":1}],"remove":[]}"#);
        let e = v.diff(&snap(&[("b", "{\"id\":\"b\",\"x\":1}")]));
        assert_eq!(e, r#"{"full":false,"worker":{},"upsert":[],"remove":["a"]}"#);
    }
}
