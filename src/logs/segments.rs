//! A capped log: its head and its newest output, in segments.
//!
//! A log without a cap is one segment, `log.bin` + `log.idx` (lines from 0). A log with a cap
//! (the `cap` file, written by the worker when it makes the task's directory) fills that
//! segment — its head — up to half the cap, then goes on in tail segments
//! `tail.<first line>.{bin,idx}` of an eighth of the cap each. When a fifth tail segment
//! starts, the oldest is deleted, so the tail holds between three and four eighths of the cap
//! of the newest output and the whole log stays within the cap: rotation as Docker's json-file
//! driver does it (`max-size` × `max-file`), after a head that is never rotated away (where a
//! task says what it is and how it starts).
//!
//! Line numbers stay those the lines were written with: the dropped lines leave a gap, and
//! the reader shows one marker line at the gap's first number saying how many lines and bytes
//! were dropped (the `dropped` file counts them; the writer updates it before it deletes a
//! segment). Each segment is an ordinary log (format.rs) whose index entry `i` is line
//! `first + i`.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::LogError;
use super::format::{INDEX_FILE, LogFiles};

/// The file that holds a log's cap in bytes (absent: no cap).
pub(crate) const CAP_FILE: &str = "cap";
/// The file that counts what rotation dropped.
pub(crate) const DROPPED_FILE: &str = "dropped";
const TAIL_PREFIX: &str = "tail.";
/// Tail segments kept at most, the one being written included.
pub(crate) const TAIL_SEGMENTS: usize = 4;

/// The smallest cap: a head of half of it and tail segments of an eighth must each hold
/// lines of the longest length the supervisor writes (64 KiB) several times over.
pub const MIN_CAP: u64 = 1 << 20;

/// What rotation dropped so far: whole lines and their bytes of output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

/// The paths (index, data) of the segment whose first line is `first`.
pub(crate) fn segment_paths(dir: &Path, first: u64) -> (PathBuf, PathBuf) {
    if first == 0 {
        LogFiles::paths(dir)
    } else {
        (dir.join(format!("{TAIL_PREFIX}{first}.idx")), dir.join(format!("{TAIL_PREFIX}{first}.bin")))
    }
}

/// The first lines of the segments in `dir`, in order (the head's 0 when it exists).
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>, LogError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(LogError::Open { path: dir.to_path_buf(), source }),
    };
    let mut firsts = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == INDEX_FILE {
            firsts.push(0);
        } else if let Some(n) = name.strip_prefix(TAIL_PREFIX).and_then(|r| r.strip_suffix(".idx"))
            && let Ok(first) = n.parse::<u64>()
            && first > 0
        {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Opens the segment at `first` for reading; `None` if either file is gone (rotated away).
pub(crate) fn open_segment(dir: &Path, first: u64) -> Result<Option<LogFiles>, LogError> {
    let (index_path, data_path) = segment_paths(dir, first);
    let open = |path: &Path| match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LogError::Open { path: path.to_path_buf(), source }),
    };
    let Some(index) = open(&index_path)? else { return Ok(None) };
    let Some(data) = open(&data_path)? else { return Ok(None) };
    Ok(Some(LogFiles { index, data, index_path, data_path }))
}

/// Gives the log in `dir` a cap of `bytes` (at least [`MIN_CAP`]); made before its first line.
pub fn set_cap(dir: &Path, bytes: u64) -> Result<(), LogError> {
    create_dir(dir)?;
    let path = dir.join(CAP_FILE);
    write_private(&path, bytes.max(MIN_CAP).to_string().as_bytes()).map_err(|source| LogError::Write { path, source })
}

/// The log's cap, if it has one.
pub(crate) fn read_cap(dir: &Path) -> Option<u64> {
    fs::read_to_string(dir.join(CAP_FILE)).ok()?.trim().parse().ok()
}

pub(crate) fn read_dropped(dir: &Path) -> Dropped {
    fs::read(dir.join(DROPPED_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Replaces the `dropped` file atomically.
pub(crate) fn write_dropped(dir: &Path, dropped: &Dropped) -> Result<(), LogError> {
    let path = dir.join(DROPPED_FILE);
    let tmp = dir.join(format!(".{DROPPED_FILE}.tmp"));
    let bytes = serde_json::to_vec(dropped).map_err(|e| LogError::Write { path: path.clone(), source: e.into() })?;
    write_private(&tmp, &bytes).map_err(|source| LogError::Write { path: tmp.clone(), source })?;
    fs::rename(&tmp, &path).map_err(|source| LogError::Write { path, source })
}

/// Creates the log's directory: root's alone, as a task's output may hold secrets.
pub(crate) fn create_dir(dir: &Path) -> Result<(), LogError> {
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(|source| LogError::CreateDir { path: dir.to_path_buf(), source })
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

/// A byte count for people: `512 B`, `3.0 KiB`, `1.5 GiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The marker line's text for `lines` dropped lines (and their `bytes`, when known).
pub(crate) fn marker_text(lines: u64, bytes: Option<u64>, cap: Option<u64>) -> String {
    let what = match bytes {
        Some(b) => format!("{lines} lines ({}) of output", human_bytes(b)),
        None => format!("{lines} lines of output"),
    };
    match cap {
        Some(cap) => format!(
            "[iris-worker] {what} dropped here: this task's log is capped at {} on disk \
             and keeps its first and its newest output",
            human_bytes(cap)
        ),
        None => format!("[iris-worker] {what} missing here"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_markers_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 10), "3.0 KiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        let m = marker_text(10, Some(2 << 20), Some(1 << 30));
        assert!(m.contains("10 lines (2.0 MiB)") && m.contains("capped at 1.0 GiB"), "{m}");
    }

    #[test]
    fn segments_are_listed_by_first_line() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["log.idx", "tail.20.idx", "tail.100.idx", "tail.x.idx", "tail.3.bin", "cap"] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(list(dir.path()).unwrap(), vec![0, 20, 100]);
        assert_eq!(list(&dir.path().join("none")).unwrap(), Vec::<u64>::new());
    }
}
