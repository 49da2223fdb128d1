//! Where the time of a container's lifecycle goes (`scripts/bench lifecycle --phases`).
//!
//! The runtime marks its steps with [`mark`], a `debug` event of target [`TARGET`]. Nothing
//! records them unless a process installs [`install_from_env`]'s recorder, which it does only
//! when [`ENV`] names a file: otherwise a mark is tracing's disabled-callsite check (one
//! relaxed atomic load; the supervisor's and the worker's subscribers filter `debug` out). The
//! recorder appends each mark, and libcontainer's and libcgroups' own debug events (the
//! steps of the forked container processes), as `<CLOCK_MONOTONIC ns> <pid> <target>:
//! <message>` lines to that file; the forked processes inherit it, and the monotonic clock is
//! the same in all of them, so one file holds the whole lifecycle in order.

use std::fmt;
use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// The environment variable naming the file the phases are appended to.
pub const ENV: &str = "IRIS_PHASES";
/// The tracing target of the runtime's marks.
pub const TARGET: &str = "iris_phase";

/// Marks the end of the step `name` (a no-op unless a recorder is installed).
pub fn mark(name: &str) {
    tracing::debug!(target: "iris_phase", "{name}");
}

/// Installs the recorder when [`ENV`] is set (once per process, before any other
/// subscriber); true if it did.
pub fn install_from_env() -> bool {
    std::env::var_os(ENV).is_some_and(|path| install(std::path::Path::new(&path)))
}

/// Installs the recorder, appending to `path` (once per process, before any other
/// subscriber); true if it did.
pub fn install(path: &std::path::Path) -> bool {
    let Ok(file) = OpenOptions::new().create(true).append(true).open(path) else { return false };
    tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_timer(Monotonic)
        .with_level(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("iris_phase=debug,libcontainer=debug,libcgroups=debug"))
        .try_init()
        .is_ok()
}

/// CLOCK_MONOTONIC in ns, and the pid: comparable across the lifecycle's processes.
struct Monotonic;

impl FormatTime for Monotonic {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        write!(w, "{} {}", i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec), std::process::id())
    }
}

/// One recorded line: (monotonic ns, pid, `target: message`).
pub fn parse_line(line: &str) -> Option<(i128, u32, &str)> {
    let mut parts = line.splitn(3, ' ');
    let ns = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    Some((ns, pid, parts.next()?.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_lines_parse_back() {
        assert_eq!(
            parse_line("12345 77 iris_phase: config written\n"),
            Some((12345, 77, "iris_phase: config written"))
        );
        assert_eq!(parse_line("garbage"), None);
    }
}
