//! Each newest-wire attempt's log pushed to Iris's log service (finelog's
//! `LogService/PushLogs`) under the key `<task id>:<attempt id>`, where Iris's client reads it.
//!
//! The attempt's on-disk log (written by its supervisor, outliving the worker) is the source:
//! a cursor per attempt (`<task dir>/log.pushed`, the number of lines acknowledged) is written
//! after each acknowledged batch, so a restarted worker resumes where it stopped and nothing is
//! held in memory while the log service is away. Lines go in order, in batches of at most
//! [`BATCH_LINES`] lines / [`BATCH_BYTES`] bytes, at least every [`TICK`]. The log service is
//! found through the controller (`EndpointService/ListEndpoints {prefix: "/system/log-server",
//! exact: true}`) and looked up again after a failed push. A batch the worker had in flight
//! (or acknowledged but not recorded) when it died is not sent again: for the attempts it finds
//! at start, a restarted worker waits [`RESUME_SETTLE`], asks the log service for the key's
//! last entry and moves the cursor past that line (finelog does not deduplicate).
//!
//! The pusher is also the gate of terminal observations (see
//! [`crate::rpc::newest::TerminalGate`]): an attempt is reported ended only once its lines are
//! all pushed, or [`HOLD_AT_MOST`] after it ended (pushing goes on).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::logs::{LogFilter, LogLine, Source};
use crate::proto::newest::finelog::logging::{
    FetchLogsRequest, FetchLogsResponse, LogEntry, LogLevel, MatchScope, PushLogsRequest, PushLogsResponse, Timestamp,
};
use crate::proto::newest::iris::cluster::controller::{ListEndpointsRequest, ListEndpointsResponse};
use crate::rpc::ClientSecurity;
use crate::rpc::connect::ConnectClient;
use crate::task::{TaskManager, UidAttempt};

/// Lines and bytes per PushLogs at most.
pub const BATCH_LINES: u64 = 1000;
pub const BATCH_BYTES: usize = 1 << 20;
/// How often the pusher looks for new lines.
pub const TICK: Duration = Duration::from_millis(250);
/// How long an ended attempt's terminal state waits for its lines to be pushed.
pub const HOLD_AT_MOST: Duration = Duration::from_secs(30);
/// How long after a restart the pusher waits before it asks the log service what a previous
/// run pushed: finelog acknowledges a push once it is durable (about a second here), so a
/// push the killed worker had in flight lands a moment after it died (within about a second
/// here; the rest is margin for a loaded host).
pub const RESUME_SETTLE: Duration = Duration::from_secs(5);
pub use crate::taskdir::LOG_PUSHED as CURSOR;
/// Iris's name of its log server's endpoint.
pub const LOG_SERVER_ENDPOINT: &str = "/system/log-server";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The number of an attempt's lines the log service has acknowledged (0 when none).
pub fn cursor(task_dir: &Path) -> u64 {
    std::fs::read_to_string(task_dir.join(CURSOR)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn write_cursor(task_dir: &Path, lines: u64) -> std::io::Result<()> {
    let tmp = task_dir.join(format!("{CURSOR}.tmp"));
    crate::taskdir::write_private(&tmp, lines.to_string().as_bytes())?;
    std::fs::rename(&tmp, task_dir.join(CURSOR))
}

/// Whether every line of the attempt's log is acknowledged.
pub fn fully_pushed(task_dir: &Path) -> bool {
    let count = crate::logs::line_count(&task_dir.join(crate::taskdir::LOGS)).unwrap_or(0);
    cursor(task_dir) >= count
}

/// The log key of an attempt: `<task id>:<attempt id>` (Iris's `cluster/log_keys.py`).
pub fn key(task_id: &str, attempt_id: i32) -> String {
    format!("{task_id}:{attempt_id}")
}

/// Iris's level of a line (`classify_log_level`): a glog-style prefix (`I1207 …`, `W…`, `E…`,
/// `F…`, and the one-letter prefixes of Iris's callable runner) wins; otherwise stdout is INFO,
/// stderr ERROR, anything else UNKNOWN.
pub fn level(source: Source, data: &str) -> LogLevel {
    let b = data.as_bytes();
    if b.len() >= 5 && b[1..5].iter().all(u8::is_ascii_digit) {
        match b[0] {
            b'D' => return LogLevel::Debug,
            b'I' => return LogLevel::Info,
            b'W' => return LogLevel::Warning,
            b'E' => return LogLevel::Error,
            b'F' | b'C' => return LogLevel::Critical,
            _ => {}
        }
    }
    match source {
        Source::Stdout => LogLevel::Info,
        Source::Stderr => LogLevel::Error,
        Source::Build => LogLevel::Unknown,
    }
}

/// One line as a finelog entry.
pub fn entry(line: &LogLine, key: &str, attempt_id: i32) -> LogEntry {
    LogEntry {
        timestamp: Some(Timestamp { epoch_ms: line.ts_ms }),
        source: line.source.as_str().to_string(),
        data: line.data.clone(),
        attempt_id,
        level: level(line.source, &line.data) as i32,
        key: key.to_string(),
        seq: 0,
    }
}

/// Pushes the logs of a task manager's newest-wire attempts.
#[derive(Clone)]
pub struct LogPusher {
    inner: Arc<Inner>,
}

struct Inner {
    manager: TaskManager,
    controller: ConnectClient,
    security: ClientSecurity,
    /// The log service, once found.
    service: Mutex<Option<ConnectClient>>,
    /// Attempts ended and fully pushed: not looked at again.
    done: Mutex<HashSet<String>>,
    /// Attempts whose cursor was checked against the log service since this worker started.
    resumed: Mutex<HashSet<String>>,
    /// The attempts a previous run of the worker may have pushed for (those there at the first
    /// pass); `None` before it.
    inherited: Mutex<Option<HashSet<String>>>,
    started: std::time::Instant,
}

impl LogPusher {
    /// A pusher for `manager`'s attempts that finds the log service through `controller` and
    /// presents `security` to it.
    pub fn new(manager: TaskManager, controller: ConnectClient, security: ClientSecurity) -> LogPusher {
        LogPusher {
            inner: Arc::new(Inner {
                manager,
                controller,
                security,
                service: Mutex::new(None),
                done: Mutex::new(HashSet::new()),
                resumed: Mutex::new(HashSet::new()),
                inherited: Mutex::new(None),
                started: std::time::Instant::now(),
            }),
        }
    }

    /// Runs the pusher until its manager shuts down ([`TaskManager::shutdown`]).
    pub fn start(&self) {
        super::worker_log::global().enable();
        let this = self.clone();
        self.inner.manager.background().spawn(async move {
            let mut backoff = TICK;
            loop {
                tokio::time::sleep(backoff).await;
                match this.push_all().await {
                    Ok(()) => backoff = TICK,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "pushing logs to the log service");
                        *this.inner.service.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }

    /// The log service's client, looked up through the controller when not known.
    async fn service(&self) -> Result<ConnectClient, String> {
        if let Some(s) = self.inner.service.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(s);
        }
        let req = ListEndpointsRequest { prefix: LOG_SERVER_ENDPOINT.into(), exact: true, task_ids: vec![] };
        let resp: ListEndpointsResponse = self
            .inner
            .controller
            .call("iris.cluster.EndpointService", "ListEndpoints", &req, CALL_TIMEOUT)
            .await
            .map_err(|e| format!("finding the log service: {e}"))?;
        let address = resp
            .endpoints
            .first()
            .map(|e| e.address.clone())
            .ok_or_else(|| format!("the controller has no {LOG_SERVER_ENDPOINT} endpoint"))?;
        let address = if address.contains("://") { address } else { format!("http://{address}") };
        tracing::info!(%address, "the log service");
        // finelog's own clients send zstd bodies; so do we (a batch of log lines shrinks well).
        let client = ConnectClient::with_security(&address, &self.inner.security).with_zstd_requests();
        *self.inner.service.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// One pass: every attempt's new lines, in batches, each acknowledged batch recorded.
    async fn push_all(&self) -> Result<(), String> {
        let attempts = self.inner.manager.uid_attempts();
        let inherited: HashSet<String> = self
            .inner
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| attempts.iter().map(|a| a.attempt_uid.clone()).collect())
            .clone();
        let mut pending: Vec<UidAttempt> = Vec::new();
        {
            // Attempts the manager removed (retention) leave the sets: they stay bounded.
            let present: HashSet<&str> = attempts.iter().map(|a| a.attempt_uid.as_str()).collect();
            self.inner.resumed.lock().unwrap_or_else(|p| p.into_inner()).retain(|u| present.contains(u.as_str()));
            let mut done = self.inner.done.lock().unwrap_or_else(|p| p.into_inner());
            done.retain(|u| present.contains(u.as_str()));
            pending.extend(attempts.iter().filter(|a| !done.contains(&a.attempt_uid)).cloned());
        }
        for a in pending {
            let ended = a.state.is_terminal();
            if ended && fully_pushed(&a.dir) {
                self.inner.done.lock().unwrap_or_else(|p| p.into_inner()).insert(a.attempt_uid.clone());
                continue;
            }
            if inherited.contains(&a.attempt_uid)
                && !self.inner.resumed.lock().unwrap_or_else(|p| p.into_inner()).contains(&a.attempt_uid)
            {
                if self.inner.started.elapsed() < RESUME_SETTLE {
                    // A push the previous run had in flight may still be landing.
                    continue;
                }
                self.resume(&a).await?;
                self.inner.resumed.lock().unwrap_or_else(|p| p.into_inner()).insert(a.attempt_uid.clone());
            }
            loop {
                let dir = a.dir.clone();
                let from = cursor(&dir);
                let lines = tokio::task::spawn_blocking(move || read_batch(&dir, from))
                    .await
                    .map_err(|e| format!("reading a log: {e}"))?;
                let Some(last) = lines.last().map(|l| l.line_number) else {
                    if ended && fully_pushed(&a.dir) {
                        self.inner.done.lock().unwrap_or_else(|p| p.into_inner()).insert(a.attempt_uid.clone());
                    }
                    break;
                };
                let key = key(&a.task_id, a.attempt_id);
                let req = PushLogsRequest {
                    key: key.clone(),
                    entries: lines.iter().map(|l| entry(l, &key, a.attempt_id)).collect(),
                    cluster: String::new(),
                };
                let service = self.service().await?;
                service
                    .call::<_, PushLogsResponse>("finelog.logging.LogService", "PushLogs", &req, CALL_TIMEOUT)
                    .await
                    .map_err(|e| format!("PushLogs of {key}: {e}"))?;
                write_cursor(&a.dir, last + 1).map_err(|e| format!("recording what was pushed of {key}: {e}"))?;
                tracing::debug!(%key, from, to = last + 1, "pushed");
            }
        }
        self.push_worker_log().await
    }

    /// The worker's own log lines (see [`super::worker_log`]) under `/system/worker/<id>`, a
    /// few batches a pass: the attempts' lines come first.
    async fn push_worker_log(&self) -> Result<(), String> {
        let log = super::worker_log::global();
        let key = worker_key(self.inner.manager.worker_id());
        for _ in 0..4 {
            let batch = log.peek(BATCH_LINES as usize);
            if batch.lines.is_empty() {
                break;
            }
            let entries = batch.lines.iter().map(|l| worker_entry(l, &key)).collect();
            let req = PushLogsRequest { key: key.clone(), entries, cluster: String::new() };
            let service = self.service().await?;
            service
                .call::<_, PushLogsResponse>("finelog.logging.LogService", "PushLogs", &req, CALL_TIMEOUT)
                .await
                .map_err(|e| format!("PushLogs of {key}: {e}"))?;
            log.consumed(&batch);
        }
        Ok(())
    }
}

/// The log key of a worker's own log (Iris's `cluster/log_keys.py`).
pub fn worker_key(worker_id: &str) -> String {
    format!("/system/worker/{worker_id}")
}

/// A line of the worker's own log as a finelog entry (source `stderr`, where the worker writes
/// its log; the level is the line's own).
fn worker_entry(line: &super::worker_log::WorkerLine, key: &str) -> LogEntry {
    let level = match line.level {
        tracing::Level::ERROR => LogLevel::Error,
        tracing::Level::WARN => LogLevel::Warning,
        tracing::Level::INFO => LogLevel::Info,
        _ => LogLevel::Debug,
    };
    LogEntry {
        timestamp: Some(Timestamp { epoch_ms: line.epoch_ms }),
        source: "stderr".into(),
        data: line.text.clone(),
        attempt_id: 0,
        level: level as i32,
        key: key.to_string(),
        seq: 0,
    }
}

impl LogPusher {
    /// Moves an attempt's cursor past a batch the log service acknowledged but this worker
    /// never recorded (it died in between): the service's last entry of the key is looked for
    /// among the lines after the cursor, by timestamp and text.
    async fn resume(&self, a: &UidAttempt) -> Result<(), String> {
        let key = key(&a.task_id, a.attempt_id);
        let req = FetchLogsRequest {
            source: key.clone(),
            max_lines: 1,
            tail: true,
            match_scope: MatchScope::Exact as i32,
            ..Default::default()
        };
        let service = self.service().await?;
        let resp: FetchLogsResponse = service
            .call("finelog.logging.LogService", "FetchLogs", &req, CALL_TIMEOUT)
            .await
            .map_err(|e| format!("FetchLogs of {key}: {e}"))?;
        let Some(last) = resp.entries.last() else { return Ok(()) };
        let last_ms = last.timestamp.as_ref().map_or(0, |t| t.epoch_ms);
        let dir = a.dir.clone();
        let from = cursor(&dir);
        let lines = tokio::task::spawn_blocking(move || read_batch(&dir, from))
            .await
            .map_err(|e| format!("reading a log: {e}"))?;
        if let Some(seen) = lines.iter().find(|l| l.ts_ms == last_ms && l.data == last.data) {
            tracing::info!(%key, lines = seen.line_number + 1 - from, "the log service had lines not recorded as pushed");
            write_cursor(&a.dir, seen.line_number + 1)
                .map_err(|e| format!("recording what was pushed of {key}: {e}"))?;
        }
        Ok(())
    }
}

/// The lines from `from` on, at most a batch.
fn read_batch(task_dir: &Path, from: u64) -> Vec<LogLine> {
    let filter = LogFilter { start_line: from as i64, max_lines: BATCH_LINES, ..Default::default() };
    let mut lines = match crate::logs::read(&task_dir.join(crate::taskdir::LOGS), &filter) {
        Ok(lines) => lines,
        Err(e) => {
            // Tried again next tick; the cursor stays where it is.
            tracing::warn!(dir = %task_dir.display(), error = %e, "reading a task's log to push it");
            Vec::new()
        }
    };
    let mut bytes = 0;
    let keep = lines
        .iter()
        .position(|l| {
            bytes += l.data.len();
            bytes > BATCH_BYTES
        })
        .map_or(lines.len(), |i| i.max(1));
    lines.truncate(keep);
    lines
}

/// Whether an ended attempt may be reported ended: its lines are all pushed, or it ended more
/// than [`HOLD_AT_MOST`] ago.
pub fn may_report_end(a: &UidAttempt) -> bool {
    let ended_long_ago = iris_wire::clock::now_ms() - a.finished_at_ms > HOLD_AT_MOST.as_millis() as i64;
    ended_long_ago || fully_pushed(&a.dir)
}

impl crate::rpc::newest::TerminalGate for LogPusher {
    fn may_report_terminal(&self, a: &UidAttempt) -> bool {
        may_report_end(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_attempt_is_reported_once_pushed_or_after_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join(crate::taskdir::LOGS);
        let record = crate::logs::LogRecord { ts_ms: 1, source: Source::Stdout, data: b"last words" };
        crate::logs::LogWriter::open(&logs).unwrap().append(&[record]).unwrap();
        let now = iris_wire::clock::now_ms();
        let ended = |finished_at_ms| UidAttempt::succeeded_for_test(finished_at_ms, dir.path().to_path_buf());
        assert!(!may_report_end(&ended(now)), "its line is not pushed yet");
        let long_ago = now - HOLD_AT_MOST.as_millis() as i64 - 1;
        assert!(may_report_end(&ended(long_ago)), "held at most HOLD_AT_MOST");
        write_cursor(dir.path(), 1).unwrap();
        assert!(may_report_end(&ended(now)), "pushed to the end");
    }

    #[test]
    fn levels_follow_iris_rules() {
        assert_eq!(level(Source::Stdout, "hello"), LogLevel::Info);
        assert_eq!(level(Source::Stderr, "Traceback"), LogLevel::Error);
        assert_eq!(level(Source::Stderr, "I1207 12:00:00 ok"), LogLevel::Info);
        assert_eq!(level(Source::Stdout, "W20261207 12:00:00 careful"), LogLevel::Warning);
        assert_eq!(level(Source::Stdout, "Item 1"), LogLevel::Info);
    }

    #[test]
    fn the_cursor_is_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cursor(dir.path()), 0);
        write_cursor(dir.path(), 41).unwrap();
        assert_eq!(cursor(dir.path()), 41);
        assert!(fully_pushed(dir.path()), "no log at all is fully pushed");
    }

    #[test]
    fn batches_resume_at_the_cursor_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join(crate::taskdir::LOGS);
        let mut w = crate::logs::LogWriter::open(&logs).unwrap();
        let texts: Vec<String> = (0..5).map(|i| format!("line-{i}")).collect();
        let records: Vec<crate::logs::LogRecord<'_>> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| crate::logs::LogRecord { ts_ms: 1000 + i as i64, source: Source::Stdout, data: t.as_bytes() })
            .collect();
        w.append(&records).unwrap();
        let batch = read_batch(dir.path(), 2);
        assert_eq!(batch.iter().map(|l| l.data.as_str()).collect::<Vec<_>>(), ["line-2", "line-3", "line-4"]);
        assert!(!fully_pushed(dir.path()));
        write_cursor(dir.path(), 5).unwrap();
        assert!(fully_pushed(dir.path()));
        let e = entry(&batch[0], "/j/0:0", 0);
        assert_eq!((e.key.as_str(), e.source.as_str(), e.data.as_str()), ("/j/0:0", "stdout", "line-2"));
        assert_eq!(e.timestamp, Some(Timestamp { epoch_ms: 1002 }));
    }
}
