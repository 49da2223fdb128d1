//! Moves the task's output from its pipes into the log, one batch per wake-up.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};

use crate::logs::{LineAssembler, LogRecord, LogWriter, Source};

use iris_wire::clock::now_ms;

/// Longest line kept whole; longer output is cut into lines of this size.
const MAX_LINE: usize = 64 * 1024;
/// Bytes read from one pipe per wake-up before giving the other pipe a turn.
const READ_BUDGET: usize = 1 << 20;

struct Stream {
    fd: Option<OwnedFd>,
    source: Source,
    lines: LineAssembler,
}

/// Reads the task's stdout and stderr and appends their lines to the log.
pub(super) struct Pump {
    streams: [Stream; 2],
    log: LogWriter,
    buf: Vec<u8>,
}

impl Pump {
    /// `source` overrides both streams' sources (environment builds log as `build`).
    pub(super) fn new(log: LogWriter, stdout: OwnedFd, stderr: OwnedFd, source: Option<Source>) -> Pump {
        let stream = |fd, default| Stream {
            fd: Some(fd),
            source: source.unwrap_or(default),
            lines: LineAssembler::new(MAX_LINE),
        };
        Pump { streams: [stream(stdout, Source::Stdout), stream(stderr, Source::Stderr)], log, buf: vec![0; 64 * 1024] }
    }

    /// Both pipes are closed: every writer is gone and everything is logged.
    pub(super) fn is_done(&self) -> bool {
        self.streams.iter().all(|s| s.fd.is_none())
    }

    /// Adds an entry per open pipe to `fds`; returns which stream each entry is.
    pub(super) fn poll_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) -> Vec<usize> {
        let mut which = Vec::with_capacity(2);
        for (i, s) in self.streams.iter().enumerate() {
            if let Some(fd) = &s.fd {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        which
    }

    /// Reads whatever the ready pipes hold and logs the complete lines.
    pub(super) fn on_ready(&mut self, ready: &[(usize, PollFlags)]) {
        for &(i, flags) in ready {
            if !flags.is_empty() && self.streams[i].fd.is_some() {
                self.read_stream(i);
            }
        }
    }

    fn read_stream(&mut self, i: usize) {
        let mut total = 0;
        let mut records: Vec<(i64, Vec<u8>)> = Vec::new();
        let stream = &mut self.streams[i];
        while let Some(fd) = stream.fd.as_ref() {
            match nix::unistd::read(fd.as_raw_fd(), &mut self.buf) {
                Ok(0) => {
                    stream.fd = None;
                    records.extend(stream.lines.flush());
                    break;
                }
                Ok(n) => {
                    records.extend(stream.lines.push(&self.buf[..n], now_ms()));
                    total += n;
                    if total >= READ_BUDGET {
                        break;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the task's output");
                    stream.fd = None;
                    records.extend(stream.lines.flush());
                    break;
                }
            }
        }
        let source = stream.source;
        self.append(source, &records);
    }

    fn append(&mut self, source: Source, records: &[(i64, Vec<u8>)]) {
        if records.is_empty() {
            return;
        }
        let batch: Vec<LogRecord<'_>> =
            records.iter().map(|(ts_ms, data)| LogRecord { ts_ms: *ts_ms, source, data }).collect();
        if let Err(e) = self.log.append(&batch) {
            tracing::warn!(error = %e, "appending to the task log");
        }
    }

    /// Logs the partial lines still held (the task is gone).
    pub(super) fn finish(&mut self) {
        for i in 0..2 {
            let source = self.streams[i].source;
            let rest: Vec<(i64, Vec<u8>)> = self.streams[i].lines.flush().into_iter().collect();
            self.append(source, &rest);
            self.streams[i].fd = None;
        }
    }
}
