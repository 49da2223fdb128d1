//! Live updates by Server-Sent Events.
//!
//! `GET /api/events/tasks`: event `tasks` once a second,
//! `{"full":bool,"worker":{…},"upsert":[row…],"remove":[task_id…]}` — the first event has
//! every row (`full`), later ones only rows that changed (see [`super::snapshot`]).
//!
//! `GET /api/events/task/<id>?after=N&source=&regex=`: for one task,
//! - `status` (about once a second, when it changed): the task's figures ([`StatusJson`]);
//! - `logs`: `{"lines":[[line_number,ts_ms,source,data]…],"skipped":n,"next":line}` — lines
//!   from line `after` on that pass the filters, checked every 500 ms. A viewer more than
//!   5,000 lines behind skips ahead (`skipped` counts the lines passed over);
//! - `end` once the attempt has ended and its log was sent, `reset` when a newer attempt
//!   replaced it, `gone` when the worker forgot the task. The stream closes after these.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::Web;
use super::api::{self, HistoryJson, LogsQuery, UsageJson};
use super::snapshot::{self, Viewer};
use crate::logs::LogFilter;
use crate::task::{TaskError, TaskView};

/// How often a task's stream looks for new log lines.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);
/// Lines sent in one `logs` event at most.
const FOLLOW_BATCH: u64 = 1000;
/// A viewer further behind than this skips ahead.
const FOLLOW_MAX_BEHIND: u64 = 5000;
/// Browsers reconnect this long after a stream ends unexpectedly.
const RETRY: Duration = Duration::from_millis(1000);

pub async fn tasks(State(web): State<Web>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let closed = web.closed();
    let rx = snapshot::subscribe(&web).await;
    let events = stream::unfold((rx, Viewer::default(), true), |(mut rx, mut viewer, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let snap = rx.borrow_and_update().clone();
        let mut event = Event::default().event("tasks").data(viewer.diff(&snap));
        if first {
            event = event.retry(RETRY);
        }
        Some((Ok(event), (rx, viewer, false)))
    })
    .take_until(closed);
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[derive(Debug, Deserialize)]
pub struct FollowQuery {
    /// The first line number wanted (0 when absent).
    after: Option<u64>,
    source: Option<String>,
    regex: Option<String>,
}

/// One attempt of a task as the `status` event shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptJson {
    attempt: i32,
    state: &'static str,
    exit_code: i32,
    error: String,
    started_ms: i64,
    finished_ms: i64,
    worker_failure: bool,
}

/// The `status` event: everything the task page shows except the logs and the chart's past.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusJson {
    task_id: String,
    job_id: String,
    task_index: i32,
    state: &'static str,
    message: String,
    exit_code: i32,
    error: String,
    started_ms: i64,
    finished_ms: i64,
    build_started_ms: i64,
    build_finished_ms: i64,
    /// The environment built or reused (e.g. `venv:<hash>`), for tasks that have one.
    environment: Option<String>,
    from_cache: Option<bool>,
    ports: std::collections::BTreeMap<String, u16>,
    attempt: i32,
    attempts: Vec<AttemptJson>,
    usage: Option<UsageJson>,
    /// The history's newest sample, `[at_ms, memory_bytes, cpu_percent, processes]`.
    sample: Option<(i64, u64, f64, u64)>,
    log_lines: u64,
    now_ms: i64,
}

fn status_json(v: &TaskView, history: Option<&HistoryJson>, log_lines: u64) -> StatusJson {
    StatusJson {
        task_id: v.task_id.clone(),
        job_id: v.job_id.clone(),
        task_index: v.task_index,
        state: v.state.name(),
        message: v.status_message.clone(),
        exit_code: v.exit_code,
        error: v.error.clone(),
        started_ms: v.started_at_ms,
        finished_ms: v.finished_at_ms,
        build_started_ms: v.build_started_ms,
        build_finished_ms: v.build_finished_ms,
        environment: v.build.as_ref().map(|b| b.1.clone()),
        from_cache: v.build.as_ref().map(|b| b.0),
        ports: v.ports.clone(),
        attempt: v.current_attempt_id,
        attempts: v
            .attempts
            .iter()
            .map(|a| AttemptJson {
                attempt: a.attempt_id,
                state: a.state.name(),
                exit_code: a.exit_code,
                error: a.error.clone(),
                started_ms: a.started_at_ms,
                finished_ms: a.finished_at_ms,
                worker_failure: a.is_worker_failure,
            })
            .collect(),
        usage: v.usage.as_ref().map(api::usage_json),
        sample: history.and_then(|h| h.recent.last().or(h.life.last()).copied()),
        log_lines,
        now_ms: iris_wire::clock::now_ms(),
    }
}

struct Follow {
    web: Web,
    task_id: String,
    attempt: i32,
    filter: LogFilter,
    after: u64,
    tick: u64,
    last_status: String,
    done: bool,
}

#[derive(Debug, Serialize)]
struct LogsEvent {
    lines: Vec<(u64, i64, &'static str, String)>,
    skipped: u64,
    next: u64,
}

impl Follow {
    /// New lines since `after`: the event, and whether the reader caught up with the log.
    async fn logs(&mut self) -> Result<(Option<Event>, bool), TaskError> {
        let n = api::line_count(&self.web, &self.task_id).await?;
        if n <= self.after {
            return Ok((None, true));
        }
        let mut skipped = 0;
        if n - self.after > FOLLOW_MAX_BEHIND {
            skipped = n - FOLLOW_MAX_BEHIND - self.after;
            self.after = n - FOLLOW_MAX_BEHIND;
        }
        let filter = LogFilter { start_line: self.after as i64, max_lines: FOLLOW_BATCH, ..self.filter.clone() };
        let lines = self.web.inner.manager.logs(&self.task_id, filter).await?;
        let full = lines.len() as u64 >= FOLLOW_BATCH;
        let last = lines.last().map(|l| l.line_number + 1).unwrap_or(0);
        // Without a full batch, every line up to the log's end (at least n) was looked at.
        self.after = if full { last } else { last.max(n) };
        if lines.is_empty() && skipped == 0 {
            return Ok((None, !full));
        }
        let event = LogsEvent {
            lines: lines.into_iter().map(|l| (l.line_number, l.ts_ms, l.source.as_str(), l.data)).collect(),
            skipped,
            next: self.after,
        };
        let data = serde_json::to_string(&event).unwrap_or_default();
        Ok((Some(Event::default().event("logs").data(data)), !full))
    }

    /// The events of one tick (none when nothing changed): new log lines every tick, the
    /// task's figures every other tick (reading them walks its cgroup and workdir). The figures
    /// are read before the lines, so lines read after a terminal state are the whole log.
    async fn step(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        if self.tick == 1 {
            events.push(Event::default().retry(RETRY).comment("follow"));
        }
        let m = self.web.inner.manager.clone();
        let view = if self.tick % 2 == 1 {
            match m.status(&self.task_id) {
                Ok(v) if v.current_attempt_id != self.attempt => {
                    self.done = true;
                    return vec![Event::default().event("reset").data(v.current_attempt_id.to_string())];
                }
                Ok(v) => Some(v),
                Err(_) => {
                    self.done = true;
                    return vec![Event::default().event("gone").data("{}")];
                }
            }
        } else {
            None
        };
        let caught_up = match self.logs().await {
            Ok((event, caught_up)) => {
                events.extend(event);
                caught_up
            }
            Err(e) => {
                tracing::debug!(task_id = %self.task_id, error = %e, "reading logs for a viewer");
                true
            }
        };
        let Some(view) = view else { return events };
        let history = m.history(&self.task_id).ok().map(HistoryJson::from);
        let lines = api::line_count(&self.web, &self.task_id).await.unwrap_or(0);
        let mut status = status_json(&view, history.as_ref(), lines);
        // `nowMs` changes every time: compare without it.
        let now_ms = std::mem::take(&mut status.now_ms);
        let key = serde_json::to_string(&status).unwrap_or_default();
        if key != self.last_status {
            self.last_status = key;
            status.now_ms = now_ms;
            events.push(Event::default().event("status").data(serde_json::to_string(&status).unwrap_or_default()));
        }
        if view.state.is_terminal() && caught_up {
            self.done = true;
            events.push(Event::default().event("end").data(view.state.name()));
        }
        events
    }
}

pub async fn task(State(web): State<Web>, Path(task_id): Path<String>, Query(q): Query<FollowQuery>) -> Response {
    let filter = match (LogsQuery { regex: q.regex, source: q.source, ..Default::default() }).filter() {
        Ok(f) => f,
        Err(e) => return api::error(e),
    };
    let view = match web.inner.manager.status(&task_id) {
        Ok(v) => v,
        Err(e) => return api::error(e),
    };
    let closed = web.closed();
    let follow = Follow {
        web,
        task_id,
        attempt: view.current_attempt_id,
        filter,
        after: q.after.unwrap_or(0),
        tick: 0,
        last_status: String::new(),
        done: false,
    };
    let events = stream::unfold(follow, |mut f| async move {
        loop {
            if f.done {
                return None;
            }
            if f.tick > 0 {
                tokio::time::sleep(FOLLOW_INTERVAL).await;
            }
            f.tick += 1;
            let events = f.step().await;
            if !events.is_empty() {
                return Some((stream::iter(events.into_iter().map(Ok::<_, Infallible>)), f));
            }
        }
    })
    .flatten()
    .take_until(closed);
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
