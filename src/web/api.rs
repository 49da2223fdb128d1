//! The JSON API under `/api/`, `/health` and `/metrics`. Task ids contain `/`: every route
//! that takes one ends with it (`/api/task/{*task_id}`). Errors are Connect's error JSON
//! (`{"code","message"}`) with the HTTP status of the code.
//!
//! - `GET /api/task/<id>` → `TaskStatus`
//! - `GET /api/logs/<id>?regex=&start_line=&start_ms=&end_ms=&max_lines=&source=&end_line=`
//!   → `FetchTaskLogsResponse`; the parameters are `FetchLogsFilter`'s (`max_lines` 0 = at most
//!   10,000 lines), plus `end_line` (lines numbered below it only; with a negative
//!   `start_line`, the page before that line). Header `X-Iris-Log-Lines`: the log's lines.
//! - `GET /api/stats/<id>` → the current usage and the resource history (see [`stats`])
//! - `GET /api/worker` → the worker's and host's figures ([`super::snapshot::WorkerFigures`])
//! - `GET /api/cache` → the caches and the disk ([`crate::cache::CacheStatus`])

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::Web;
use crate::logs::LogFilter;
use crate::proto::worker;
use crate::rpc::connect::{Codec, error_response};
use crate::task::{HistoryView, Sample, TaskError};

/// The response header with the number of lines in a task's log.
pub const LOG_LINES_HEADER: &str = "x-iris-log-lines";

pub fn json<M: prost::Message>(name: &str, msg: &M) -> Response {
    match Codec::Json.encode(name, msg) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

pub fn error(e: TaskError) -> Response {
    error_response(&crate::rpc::to_status(e))
}

fn serde_json_response<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub async fn task(State(web): State<Web>, Path(task_id): Path<String>) -> Response {
    match web.inner.manager.status(&task_id) {
        Ok(v) => json("iris.cluster.TaskStatus", &crate::rpc::task_status_proto(v)),
        Err(e) => error(e),
    }
}

/// `FetchLogsFilter` as query parameters, plus `end_line`.
#[derive(Debug, Default, Deserialize)]
pub struct LogsQuery {
    pub regex: Option<String>,
    pub start_line: Option<i64>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub max_lines: Option<i64>,
    pub source: Option<String>,
    pub end_line: Option<u64>,
}

impl LogsQuery {
    /// The log filter, validated as FetchTaskLogs validates its filter.
    pub fn filter(&self) -> Result<LogFilter, TaskError> {
        let mut f = crate::rpc::log_filter(Some(worker::FetchLogsFilter {
            regex: self.regex.clone().unwrap_or_default(),
            start_line: self.start_line.unwrap_or(0),
            start_ms: self.start_ms.unwrap_or(0),
            end_ms: self.end_ms.unwrap_or(0),
            max_lines: self.max_lines.unwrap_or(0),
            source: self.source.clone().unwrap_or_default(),
        }))?;
        f.end_line = self.end_line.unwrap_or(0);
        Ok(f)
    }
}

/// The number of lines in the task's log (one index read).
pub async fn line_count(web: &Web, task_id: &str) -> Result<u64, TaskError> {
    let last =
        web.inner.manager.logs(task_id, LogFilter { start_line: -1, max_lines: 1, ..Default::default() }).await?;
    Ok(last.last().map(|l| l.line_number + 1).unwrap_or(0))
}

pub async fn logs(State(web): State<Web>, Path(task_id): Path<String>, Query(q): Query<LogsQuery>) -> Response {
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return error(e),
    };
    // Counted first: every line below `total` was looked at by the query that follows.
    let total = match line_count(&web, &task_id).await {
        Ok(n) => n,
        Err(e) => return error(e),
    };
    let lines = match web.inner.manager.logs(&task_id, filter).await {
        Ok(l) => l,
        Err(e) => return error(e),
    };
    let msg = worker::FetchTaskLogsResponse { logs: lines.into_iter().map(crate::rpc::log_entry_proto).collect() };
    let mut resp = json("iris.cluster.Worker.FetchTaskLogsResponse", &msg);
    resp.headers_mut().insert(LOG_LINES_HEADER, total.into());
    resp
}

/// A task's usage now, as `/api/stats/<id>` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageJson {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub cpu_percent: f64,
    pub cpu_seconds: f64,
    pub processes: u64,
    pub disk_bytes: u64,
    pub cpu_throttled_periods: u64,
}

/// The resource history: each sample is `[at_ms, memory_bytes, cpu_percent, processes]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryJson {
    pub interval_ms: u64,
    /// Samples per point of `life`.
    pub life_stride: u32,
    pub life: Vec<(i64, u64, f64, u64)>,
    pub recent: Vec<(i64, u64, f64, u64)>,
}

pub fn sample_json(s: &Sample) -> (i64, u64, f64, u64) {
    (s.at_ms, s.memory_bytes, (s.cpu_percent * 10.0).round() / 10.0, s.processes)
}

impl From<HistoryView> for HistoryJson {
    fn from(h: HistoryView) -> HistoryJson {
        HistoryJson {
            interval_ms: h.interval_ms,
            life_stride: h.life_stride,
            life: h.life.iter().map(sample_json).collect(),
            recent: h.recent.iter().map(sample_json).collect(),
        }
    }
}

/// `/api/stats/<id>`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsJson {
    pub task_id: String,
    pub state: &'static str,
    pub attempt: i32,
    pub usage: Option<UsageJson>,
    pub history: HistoryJson,
}

pub fn usage_json(u: &crate::task::Usage) -> UsageJson {
    UsageJson {
        memory_bytes: u.memory_bytes,
        memory_peak_bytes: u.memory_peak_bytes,
        cpu_percent: (u.cpu_percent * 10.0).round() / 10.0,
        cpu_seconds: u.cpu_usage_ns as f64 / 1e9,
        processes: u.processes,
        disk_bytes: u.disk_bytes,
        cpu_throttled_periods: u.cpu_throttled_periods,
    }
}

pub async fn stats(State(web): State<Web>, Path(task_id): Path<String>) -> Response {
    let m = &web.inner.manager;
    let (view, history) = match (m.status(&task_id), m.history(&task_id)) {
        (Ok(v), Ok(h)) => (v, h),
        (Err(e), _) | (_, Err(e)) => return error(e),
    };
    serde_json_response(&StatsJson {
        task_id: view.task_id,
        state: view.state.name(),
        attempt: view.current_attempt_id,
        usage: view.usage.as_ref().map(usage_json),
        history: history.into(),
    })
}

pub async fn worker_figures(State(web): State<Web>) -> Response {
    let w = web.clone();
    let figures = tokio::task::spawn_blocking(move || {
        let tasks = w.inner.manager.list();
        super::snapshot::worker_figures(&w, &tasks)
    })
    .await;
    match figures {
        Ok(f) => serde_json_response(&f),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub async fn metrics(State(web): State<Web>) -> Response {
    let w = web.clone();
    let text = tokio::task::spawn_blocking(move || {
        let m = &w.inner.manager;
        let tasks = m.list();
        w.inner.metrics.render(m.worker_id(), m.health().uptime_ms, &tasks, &m.cache_status())
    })
    .await;
    match text {
        Ok(t) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], t).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
/// `GET /api/cache`: the caches and the disk as the janitor last saw them (the dashboard's
/// cache panel): per kind, per filesystem, and why new tasks are refused, while they are.
pub async fn cache(State(web): State<Web>) -> Response {
    match serde_json::to_vec(&web.inner.manager.cache_status()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
