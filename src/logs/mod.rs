//! Task logs that outlive the worker daemon.
//!
//! Each task's log directory holds two append-only files written by the
//! task's supervisor ([`LogWriter`]) and read concurrently by the daemon
//! ([`read`], [`line_count`]): `log.bin` with the line records and `log.idx`
//! with one fixed-size entry per line. The fixed-size index is what makes
//! tails, line-number seeks and time-range lookups cost O(lines returned)
//! even on multi-gigabyte logs, and it is the source of truth for how many
//! lines exist, so a writer killed mid-append leaves nothing a reader trusts
//! half-written. See `format.rs` for the byte layout, and `segments.rs` for a
//! log with a cap: its head and its newest output, with a marker of what was
//! dropped between them.

mod error;
mod format;
mod lines;
mod reader;
mod segments;
mod writer;

pub use error::LogError;
pub use format::{ParseSourceError, Source};
pub use lines::LineAssembler;
pub use reader::{DEFAULT_MAX_LINES, LogFilter, LogLine, MAX_RESULT_BYTES, line_count, read};
pub use segments::{MIN_CAP, set_cap};
pub use writer::{LogRecord, LogWriter};
