//! The worker's own log, kept for Iris's log service: the newest Iris worker pushes its
//! process log under `/system/worker/<worker id>`, where Iris's dashboard and client read it,
//! and so does this one ([`super::push::LogPusher`] sends it with the attempts' lines).
//!
//! [`CaptureLayer`] is a `tracing` layer the binary installs beside its stderr output. It
//! keeps nothing until a pusher starts ([`WorkerLog::enable`]): a worker on the January wire,
//! or without a controller, pays one atomic load per event. Once enabled it keeps at most
//! [`MAX_LINES`] lines (the oldest go first, and the next batch says how many were dropped),
//! so a log service that is away for long costs bounded memory.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Lines kept at most while the log service cannot take them.
pub const MAX_LINES: usize = 10_000;

/// A line of the worker's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLine {
    /// When it was logged (Unix ms).
    pub epoch_ms: i64,
    /// Its level.
    pub level: Level,
    /// `<target>: <message> <field>=<value>...`
    pub text: String,
}

/// Lines to push, oldest first, and what to forget once the log service has them.
#[derive(Debug, Default)]
pub struct Batch {
    /// The lines (a first one says how many were dropped, when some were).
    pub lines: Vec<WorkerLine>,
    /// The sequence number of the last kept line in the batch.
    last: Option<u64>,
    /// How many dropped lines the batch's note counts.
    noted: u64,
}

/// The lines captured and not yet pushed.
#[derive(Debug, Default)]
pub struct WorkerLog {
    enabled: AtomicBool,
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// (sequence number, line), oldest first.
    lines: VecDeque<(u64, WorkerLine)>,
    next: u64,
    dropped: u64,
}

/// The process's one worker log (a process has one stderr, and one `tracing` subscriber).
pub fn global() -> &'static WorkerLog {
    static LOG: OnceLock<WorkerLog> = OnceLock::new();
    LOG.get_or_init(WorkerLog::default)
}

impl WorkerLog {
    /// Starts keeping lines (a pusher will take them).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `line` if enabled, dropping the oldest past [`MAX_LINES`].
    pub fn record(&self, line: WorkerLine) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut kept = self.kept();
        if kept.lines.len() >= MAX_LINES {
            kept.lines.pop_front();
            kept.dropped += 1;
        }
        let seq = kept.next;
        kept.next += 1;
        kept.lines.push_back((seq, line));
    }

    /// Up to `max` of the oldest lines, not removed: [`WorkerLog::consumed`] removes them
    /// once the log service has them.
    pub fn peek(&self, max: usize) -> Batch {
        let kept = self.kept();
        let mut batch = Batch { noted: kept.dropped, ..Batch::default() };
        if kept.dropped > 0 {
            let epoch_ms = kept.lines.front().map_or_else(iris_wire::clock::now_ms, |(_, l)| l.epoch_ms);
            let text =
                format!("iris-worker: {} lines of this log were dropped (the log service was away)", kept.dropped);
            batch.lines.push(WorkerLine { epoch_ms, level: Level::WARN, text });
        }
        for (seq, line) in kept.lines.iter().take(max) {
            batch.lines.push(line.clone());
            batch.last = Some(*seq);
        }
        batch
    }

    /// Forgets what `batch` held (lines dropped meanwhile were counted, and are noted next).
    pub fn consumed(&self, batch: &Batch) {
        let mut kept = self.kept();
        kept.dropped -= batch.noted.min(kept.dropped);
        if let Some(last) = batch.last {
            while kept.lines.front().is_some_and(|(seq, _)| *seq <= last) {
                kept.lines.pop_front();
            }
        }
    }
}

/// The `tracing` layer that feeds [`global`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CaptureLayer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let log = global();
        if !log.enabled.load(Ordering::Relaxed) {
            return;
        }
        let meta = event.metadata();
        let mut text = Text { message: String::new(), fields: String::new() };
        event.record(&mut text);
        let line = format!("{}: {}{}", meta.target(), text.message, text.fields);
        log.record(WorkerLine { epoch_ms: iris_wire::clock::now_ms(), level: *meta.level(), text: line });
    }
}

/// An event's message and its other fields as ` name=value`.
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: i64) -> WorkerLine {
        WorkerLine { epoch_ms: n, level: Level::INFO, text: format!("l{n}") }
    }

    #[test]
    fn nothing_is_kept_until_enabled_then_at_most_max_lines_with_a_note_of_the_rest() {
        let log = WorkerLog::default();
        log.record(line(0));
        assert!(log.peek(10).lines.is_empty(), "kept before a pusher enabled it");
        log.enable();
        for n in 0..(MAX_LINES as i64 + 5) {
            log.record(line(n));
        }
        let batch = log.peek(3);
        assert_eq!(batch.lines.len(), 4);
        assert!(batch.lines[0].text.contains("5 lines of this log were dropped"), "{:?}", batch.lines[0]);
        assert_eq!(batch.lines[1], line(5), "the oldest went first");
        // Two more arrive while the batch is in flight: two old ones go, and are noted next.
        log.record(line(100));
        log.record(line(101));
        log.consumed(&batch);
        let next = log.peek(2);
        assert!(next.lines[0].text.contains("2 lines of this log were dropped"), "{:?}", next.lines[0]);
        assert_eq!(next.lines[1..], [line(8), line(9)], "the batch is gone");
    }
}
