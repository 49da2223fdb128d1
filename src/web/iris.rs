//! Iris's worker JSON routes, with the shapes Iris's worker dashboard (January 2026) serves,
//! beside our own `/api/…` routes, so that tools written against an Iris worker read ours:
//!
//! - `GET /api/stats` → `{running, pending, building, completed}` (completed: SUCCEEDED,
//!   FAILED and KILLED, as Iris counts)
//! - `GET /api/tasks[?state=RUNNING,FAILED]` → a plain list, one object per task
//!   (`task_id, job_id, task_index, attempt_id, status` as `TASK_STATE_…`, `started_at,
//!   finished_at, exit_code, error, memory_mb, memory_peak_mb, cpu_percent, process_count,
//!   disk_mb, build_from_cache, image_tag`); `state` is our filter
//! - `GET /api/tasks/<id>` → one task (`…, ports, resources {…}, build {started_ms,
//!   finished_ms, duration_ms, from_cache, image_tag}`); unknown: 404 `{"error": "Not found"}`
//! - `GET /api/tasks/<id>/logs[?tail=N&source=S]` → `[{timestamp, source, data}]`; an unknown
//!   task has no lines (`[]`), as Iris answers. A task id ending in `/logs` reads as its logs
//!   here too, as in Iris. Iris returns every line (the last N with `tail`); so do we, up to
//!   [`IRIS_LOGS_MAX_LINES`] lines (and the log reader's byte bound per answer).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Web;
use crate::proto::{self, worker};
use crate::task::{TaskError, TaskState};

fn respond(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

fn status_name(state: i32) -> String {
    proto::TaskState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({state})"))
}

fn row(t: &proto::TaskStatus) -> Value {
    let u = t.resource_usage.unwrap_or_default();
    let b = t.build_metrics.clone().unwrap_or_default();
    json!({
        "task_id": t.task_id,
        "job_id": t.job_id,
        "task_index": t.task_index,
        "attempt_id": t.current_attempt_id,
        "status": status_name(t.state),
        "started_at": t.started_at_ms,
        "finished_at": t.finished_at_ms,
        "exit_code": t.exit_code,
        "error": t.error,
        "memory_mb": u.memory_mb,
        "memory_peak_mb": u.memory_peak_mb,
        "cpu_percent": u.cpu_percent,
        "process_count": u.process_count,
        "disk_mb": u.disk_mb,
        "build_from_cache": b.from_cache,
        "image_tag": b.image_tag,
    })
}

fn detail(t: &proto::TaskStatus) -> Value {
    let u = t.resource_usage.unwrap_or_default();
    let b = t.build_metrics.clone().unwrap_or_default();
    json!({
        "task_id": t.task_id,
        "job_id": t.job_id,
        "task_index": t.task_index,
        "attempt_id": t.current_attempt_id,
        "status": status_name(t.state),
        "started_at": t.started_at_ms,
        "finished_at": t.finished_at_ms,
        "exit_code": t.exit_code,
        "error": t.error,
        "ports": t.ports,
        "resources": {
            "memory_mb": u.memory_mb,
            "memory_peak_mb": u.memory_peak_mb,
            "cpu_percent": u.cpu_percent,
            "disk_mb": u.disk_mb,
            "process_count": u.process_count,
        },
        "build": {
            "started_ms": b.build_started_ms,
            "finished_ms": b.build_finished_ms,
            "duration_ms": if b.build_started_ms > 0 { b.build_finished_ms - b.build_started_ms } else { 0 },
            "from_cache": b.from_cache,
            "image_tag": b.image_tag,
        },
    })
}

async fn all(web: &Web) -> Vec<crate::task::TaskView> {
    let m = web.inner.manager.clone();
    tokio::task::spawn_blocking(move || m.list()).await.unwrap_or_default()
}

pub async fn stats(State(web): State<Web>) -> Response {
    let tasks = all(&web).await;
    let count = |f: &dyn Fn(TaskState) -> bool| tasks.iter().filter(|t| f(t.state)).count();
    respond(
        StatusCode::OK,
        json!({
            "running": count(&|s| s == TaskState::Running),
            "pending": count(&|s| s == TaskState::Pending),
            "building": count(&|s| s == TaskState::Building),
            "completed": count(&|s| matches!(s, TaskState::Succeeded | TaskState::Failed | TaskState::Killed)),
        }),
    )
}

#[derive(Debug, Deserialize)]
pub struct TasksQuery {
    /// Comma-separated state names (`RUNNING,FAILED`); all when absent.
    state: Option<String>,
}

pub async fn tasks(State(web): State<Web>, Query(q): Query<TasksQuery>) -> Response {
    let wanted: Option<Vec<String>> =
        q.state.map(|s| s.split(',').map(|x| x.trim().to_ascii_uppercase()).filter(|x| !x.is_empty()).collect());
    let rows: Vec<Value> = all(&web)
        .await
        .into_iter()
        .filter(|t| wanted.as_ref().is_none_or(|w| w.iter().any(|s| s == t.state.name())))
        .map(|t| row(&crate::rpc::task_status_proto(t)))
        .collect();
    respond(StatusCode::OK, Value::Array(rows))
}

#[derive(Debug, Default, Deserialize)]
pub struct LogsQuery {
    tail: Option<i64>,
    source: Option<String>,
}

/// `/api/tasks/<id>` and `/api/tasks/<id>/logs`.
pub async fn task_or_logs(State(web): State<Web>, Path(rest): Path<String>, Query(q): Query<LogsQuery>) -> Response {
    match rest.strip_suffix("/logs") {
        Some(task_id) => logs(&web, task_id, q).await,
        None => match web.inner.manager.status(&rest) {
            Ok(v) => respond(StatusCode::OK, detail(&crate::rpc::task_status_proto(v))),
            Err(TaskError::NotFound(_)) => respond(StatusCode::NOT_FOUND, json!({"error": "Not found"})),
            Err(e) => super::api::error(e),
        },
    }
}

/// The most lines one `/api/tasks/<id>/logs` answer holds: Iris's route returns the whole log,
/// which a root daemon must not build in memory for an unbounded log, so a generous bound (10×
/// FetchTaskLogs' default page) keeps the answer whole for any log a person reads in a browser.
/// Longer logs are paged with `/api/logs/<id>` or FetchTaskLogs.
pub const IRIS_LOGS_MAX_LINES: i64 = 100_000;

async fn logs(web: &Web, task_id: &str, q: LogsQuery) -> Response {
    let filter = worker::FetchLogsFilter {
        start_line: q.tail.filter(|n| *n > 0).map(|n| -n).unwrap_or(0),
        source: q.source.unwrap_or_default(),
        max_lines: IRIS_LOGS_MAX_LINES,
        ..Default::default()
    };
    let filter = match crate::rpc::log_filter(Some(filter)) {
        Ok(f) => f,
        Err(e) => return super::api::error(e),
    };
    let lines = match web.inner.manager.logs(task_id, filter).await {
        Ok(lines) => lines,
        Err(TaskError::NotFound(_)) => Vec::new(),
        Err(e) => return super::api::error(e),
    };
    let out: Vec<Value> =
        lines.into_iter().map(|l| json!({"timestamp": l.ts_ms, "source": l.source.as_str(), "data": l.data})).collect();
    respond(StatusCode::OK, Value::Array(out))
}
