//! The single appender of a task's log.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::error::LogError;
use super::format::{ENTRY_LEN, HEADER_LEN, IndexEntry, LogFiles, RecordHeader, Source};
use super::segments;

/// One line to append. Borrowed, so a batch can point straight into the
/// reader's buffers without copying each line first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord<'a> {
    pub ts_ms: i64,
    pub source: Source,
    /// The line without its trailing `'\n'`.
    pub data: &'a [u8],
}

/// Appends lines to a task's log (see segments.rs for the files of a capped log). There must
/// be at most one per log directory (the task's supervisor, or the build it runs first): the
/// files carry no lock, and two writers would interleave records.
///
/// Nothing is fsynced: the logs must survive the worker daemon, not a power
/// loss, and readers ignore whatever torn tail a crash leaves.
pub struct LogWriter {
    dir: PathBuf,
    /// The log's cap, from its `cap` file.
    cap: Option<u64>,
    /// The segment being appended to.
    files: LogFiles,
    /// Its first line.
    first_line: u64,
    /// Its bytes on disk (both files).
    segment_bytes: u64,
    /// Older tail segments still on disk, oldest first: (first line, lines, bytes of data).
    tails: VecDeque<(u64, u64, u64)>,
    /// Where the next record goes in the segment; equals the length of its data file.
    data_end: u64,
    /// The next line's number (lines in every segment and dropped ones included).
    lines: u64,
    /// Reused across batches so steady-state appends do not allocate.
    data_buf: Vec<u8>,
    index_buf: Vec<u8>,
    /// A write failed part-way; the file tails must be re-derived before the
    /// next append can compute offsets.
    needs_recovery: bool,
}

fn record_bytes(r: &LogRecord<'_>) -> u64 {
    (HEADER_LEN + ENTRY_LEN + r.data.len()) as u64
}

impl LogWriter {
    /// Opens (creating if needed) the log in `dir`, in its newest segment. A previous writer may
    /// have been killed mid-append; its torn tail is cut off here, with the same rule readers
    /// use to ignore it, so numbering continues right after the last line any reader could
    /// have seen.
    pub fn open(dir: &Path) -> Result<LogWriter, LogError> {
        segments::create_dir(dir)?;
        let firsts = segments::list(dir)?;
        let first_line = firsts.last().copied().unwrap_or(0);
        let mut tails = VecDeque::new();
        for &first in firsts.iter().filter(|f| **f > 0 && **f != first_line) {
            if let Some(files) = segments::open_segment(dir, first)? {
                let x = files.valid_extent()?;
                tails.push_back((first, x.lines, x.data_end.saturating_sub(x.lines * HEADER_LEN as u64)));
            }
        }
        let files = open_files(dir, first_line, false)?;
        let mut writer = LogWriter {
            dir: dir.to_path_buf(),
            cap: segments::read_cap(dir),
            files,
            first_line,
            segment_bytes: 0,
            tails,
            data_end: 0,
            lines: first_line,
            data_buf: Vec::new(),
            index_buf: Vec::new(),
            needs_recovery: true,
        };
        writer.recover()?;
        Ok(writer)
    }

    /// Cuts both files of the segment back to their trusted prefix. The index goes first so
    /// that no entry ever points past the end of its data file.
    fn recover(&mut self) -> Result<(), LogError> {
        let x = self.files.valid_extent()?;
        let index_end = x.lines * ENTRY_LEN as u64;
        if x.index_len != index_end {
            self.files
                .index
                .set_len(index_end)
                .map_err(|source| LogError::Truncate { path: self.files.index_path.clone(), source })?;
        }
        if x.data_len != x.data_end {
            self.files
                .data
                .set_len(x.data_end)
                .map_err(|source| LogError::Truncate { path: self.files.data_path.clone(), source })?;
        }
        self.lines = self.first_line + x.lines;
        self.data_end = x.data_end;
        self.segment_bytes = x.data_end + index_end;
        self.needs_recovery = false;
        Ok(())
    }

    /// The most the current segment may hold: half the cap for the head, an eighth for a
    /// tail segment.
    fn segment_limit(&self) -> Option<u64> {
        let cap = self.cap?;
        Some(if self.first_line == 0 { cap / 2 } else { (cap / 8).max(1) })
    }

    /// Appends a batch, with one `write` per file and segment: per-line syscalls would cap
    /// throughput far below what a chatty task produces. A line longer than `u32::MAX` bytes
    /// is refused before anything is written. Past the cap the batch goes on in a new tail
    /// segment, and the oldest tail segment goes.
    pub fn append(&mut self, lines: &[LogRecord<'_>]) -> Result<(), LogError> {
        if lines.is_empty() {
            return Ok(());
        }
        if self.needs_recovery {
            self.recover()?;
        }
        if let Some(r) = lines.iter().find(|r| u32::try_from(r.data.len()).is_err()) {
            return Err(LogError::Write {
                path: self.files.data_path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("log line of {} bytes exceeds 4 GiB", r.data.len()),
                ),
            });
        }
        let mut i = 0;
        while i < lines.len() {
            // As many records as the segment takes (always one, into an empty segment).
            let limit = self.segment_limit();
            let mut bytes = self.segment_bytes;
            let mut j = i;
            while j < lines.len() {
                let r = record_bytes(&lines[j]);
                let segment_has_lines = self.lines > self.first_line || j > i;
                if limit.is_some_and(|l| bytes + r > l) && segment_has_lines {
                    break;
                }
                bytes += r;
                j += 1;
            }
            if j > i {
                self.write_run(&lines[i..j])?;
            }
            if j < lines.len() {
                self.rotate()?;
            }
            i = j;
        }
        Ok(())
    }

    /// Writes records that all go into the current segment.
    fn write_run(&mut self, lines: &[LogRecord<'_>]) -> Result<(), LogError> {
        let data_len: usize = lines.iter().map(|r| HEADER_LEN + r.data.len()).sum();
        self.data_buf.clear();
        self.index_buf.clear();
        self.data_buf.reserve(data_len);
        self.index_buf.reserve(lines.len() * ENTRY_LEN);
        let mut offset = self.data_end;
        for r in lines {
            IndexEntry { offset, ts_ms: r.ts_ms }.encode_into(&mut self.index_buf);
            RecordHeader {
                ts_ms: r.ts_ms,
                source: r.source as u8,
                // Checked by `append`.
                len: r.data.len() as u32,
            }
            .encode_into(&mut self.data_buf);
            self.data_buf.extend_from_slice(r.data);
            offset += (HEADER_LEN + r.data.len()) as u64;
        }
        if let Err(source) = (&self.files.data).write_all(&self.data_buf) {
            self.needs_recovery = true;
            return Err(LogError::Write { path: self.files.data_path.clone(), source });
        }
        if let Err(source) = (&self.files.index).write_all(&self.index_buf) {
            self.needs_recovery = true;
            return Err(LogError::Write { path: self.files.index_path.clone(), source });
        }
        self.segment_bytes += (offset - self.data_end) + (lines.len() * ENTRY_LEN) as u64;
        self.data_end = offset;
        self.lines += lines.len() as u64;
        // Do not pin the memory of one huge batch for the writer's lifetime.
        const KEEP: usize = 4 << 20;
        if self.data_buf.capacity() > KEEP {
            self.data_buf = Vec::new();
        }
        if self.index_buf.capacity() > KEEP {
            self.index_buf = Vec::new();
        }
        Ok(())
    }

    /// Starts a new tail segment at the next line, and drops the oldest tail segments beyond
    /// [`segments::TAIL_SEGMENTS`].
    fn rotate(&mut self) -> Result<(), LogError> {
        let first = self.lines;
        let files = open_files(&self.dir, first, true)?;
        if self.first_line > 0 {
            let data = self.data_end - (self.lines - self.first_line) * HEADER_LEN as u64;
            self.tails.push_back((self.first_line, self.lines - self.first_line, data));
        }
        self.files = files;
        self.first_line = first;
        self.segment_bytes = 0;
        self.data_end = 0;
        while self.tails.len() >= segments::TAIL_SEGMENTS {
            let Some((old, lines, bytes)) = self.tails.pop_front() else { break };
            // Counted before the files go: a reader that sees the gap finds it counted.
            let mut dropped = segments::read_dropped(&self.dir);
            dropped.lines += lines;
            dropped.bytes += bytes;
            segments::write_dropped(&self.dir, &dropped)?;
            let (index, data) = segments::segment_paths(&self.dir, old);
            for path in [index, data] {
                if let Err(source) = fs::remove_file(&path)
                    && source.kind() != io::ErrorKind::NotFound
                {
                    return Err(LogError::Write { path, source });
                }
            }
        }
        Ok(())
    }

    /// Total lines in the log, including those from before a restart and those rotation
    /// dropped; also the line number the next appended line will get.
    pub fn lines_written(&self) -> u64 {
        self.lines
    }
}

/// Opens (creating) the files of the segment at `first`; `fresh` empties them first (a tail
/// segment is only ever started once).
fn open_files(dir: &Path, first: u64, fresh: bool) -> Result<LogFiles, LogError> {
    let (index_path, data_path) = segments::segment_paths(dir, first);
    let open = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| LogError::Open { path: path.to_path_buf(), source })
    };
    // The data file first: a reader lists segments by their index file.
    let data = open(&data_path)?;
    let index = open(&index_path)?;
    if fresh {
        for (f, path) in [(&index, &index_path), (&data, &data_path)] {
            f.set_len(0).map_err(|source| LogError::Truncate { path: path.clone(), source })?;
        }
    }
    Ok(LogFiles { index, data, index_path, data_path })
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::{append_raw, entry, record};
    use super::super::format::{DATA_FILE, INDEX_FILE};
    use super::super::reader::{LogFilter, read};
    use super::*;

    fn rec(ts: i64, source: Source, data: &[u8]) -> LogRecord<'_> {
        LogRecord { ts_ms: ts, source, data }
    }

    fn all(dir: &Path) -> Vec<(u64, i64, Source, String)> {
        read(dir, &LogFilter::default())
            .unwrap()
            .into_iter()
            .map(|l| (l.line_number, l.ts_ms, l.source, l.data))
            .collect()
    }

    #[test]
    fn writes_documented_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(&dir.path().join("a/b")).unwrap();
        w.append(&[rec(5, Source::Stdout, b"ab"), rec(6, Source::Build, b"")]).unwrap();
        assert_eq!(w.lines_written(), 2);
        let data = std::fs::read(dir.path().join("a/b").join(DATA_FILE)).unwrap();
        let index = std::fs::read(dir.path().join("a/b").join(INDEX_FILE)).unwrap();
        let mut want_data = record(5, Source::Stdout, b"ab");
        want_data.extend(record(6, Source::Build, b""));
        assert_eq!(data, want_data);
        let mut want_index = entry(0, 5);
        want_index.extend(entry(15, 6));
        assert_eq!(index, want_index);
    }

    #[test]
    fn round_trip_and_reopen_continues_numbering() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = LogWriter::open(dir.path()).unwrap();
            w.append(&[]).unwrap();
            assert_eq!(w.lines_written(), 0);
            w.append(&[rec(1, Source::Stdout, b"one"), rec(2, Source::Stderr, b"two\r")]).unwrap();
        }
        let mut w = LogWriter::open(dir.path()).unwrap();
        assert_eq!(w.lines_written(), 2);
        w.append(&[rec(3, Source::Build, b"three")]).unwrap();
        assert_eq!(w.lines_written(), 3);
        assert_eq!(
            all(dir.path()),
            vec![
                (0, 1, Source::Stdout, "one".into()),
                (1, 2, Source::Stderr, "two\r".into()),
                (2, 3, Source::Build, "three".into()),
            ]
        );
    }

    #[test]
    fn reopen_truncates_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let good_data_len;
        {
            let mut w = LogWriter::open(dir.path()).unwrap();
            w.append(&[rec(1, Source::Stdout, b"a"), rec(2, Source::Stdout, b"b")]).unwrap();
            good_data_len = w.data_end;
        }
        // Killed mid-batch: a whole record whose entry never made it, then
        // half a record; and half an index entry.
        append_raw(&dir.path().join(DATA_FILE), &record(3, Source::Stdout, b"c"));
        append_raw(&dir.path().join(DATA_FILE), &record(4, Source::Stdout, b"dd")[..7]);
        append_raw(&dir.path().join(INDEX_FILE), &entry(good_data_len, 3)[..9]);
        assert_eq!(all(dir.path()).len(), 2);

        let mut w = LogWriter::open(dir.path()).unwrap();
        assert_eq!(w.lines_written(), 2);
        let data_len = std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len();
        let index_len = std::fs::metadata(dir.path().join(INDEX_FILE)).unwrap().len();
        assert_eq!((data_len, index_len), (good_data_len, 32));

        w.append(&[rec(5, Source::Stderr, b"e")]).unwrap();
        assert_eq!(
            all(dir.path()),
            vec![
                (0, 1, Source::Stdout, "a".into()),
                (1, 2, Source::Stdout, "b".into()),
                (2, 5, Source::Stderr, "e".into()),
            ]
        );
    }

    #[test]
    fn reopen_drops_entry_whose_record_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = LogWriter::open(dir.path()).unwrap();
            w.append(&[rec(1, Source::Stdout, b"a")]).unwrap();
            w.append(&[rec(2, Source::Stdout, b"bbbb")]).unwrap();
        }
        // Lose the end of the last record (e.g. the data file lost a block).
        let data = std::fs::OpenOptions::new().write(true).open(dir.path().join(DATA_FILE)).unwrap();
        let len = data.metadata().unwrap().len();
        data.set_len(len - 2).unwrap();
        assert_eq!(all(dir.path()).len(), 1);

        let mut w = LogWriter::open(dir.path()).unwrap();
        assert_eq!(w.lines_written(), 1);
        assert_eq!(std::fs::metadata(dir.path().join(INDEX_FILE)).unwrap().len(), 16);
        assert_eq!(std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len(), 14);
        w.append(&[rec(3, Source::Stdout, b"c")]).unwrap();
        assert_eq!(all(dir.path()), vec![(0, 1, Source::Stdout, "a".into()), (1, 3, Source::Stdout, "c".into()),]);
    }

    #[test]
    fn reopen_keeps_log_whose_index_tail_is_zeros() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = LogWriter::open(dir.path()).unwrap();
            let lines: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
            let recs: Vec<_> = lines.iter().map(|l| rec(1, Source::Stdout, l.as_bytes())).collect();
            w.append(&recs).unwrap();
        }
        append_raw(&dir.path().join(INDEX_FILE), &[0u8; 4096]);
        let w = LogWriter::open(dir.path()).unwrap();
        assert_eq!(w.lines_written(), 100);
        let got = all(dir.path());
        assert_eq!(got.len(), 100);
        assert_eq!(got[99].3, "line 99");
    }

    #[test]
    fn open_fails_with_path_when_dir_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = LogWriter::open(&file).err().unwrap();
        assert!(matches!(err, LogError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains(&*file.to_string_lossy()));
    }

    /// Throughput check for many short lines; run with
    /// `cargo test --release -- --ignored --nocapture append_throughput`.
    #[test]
    #[ignore]
    fn append_throughput() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        let line = [b'x'; 60];
        let batch: Vec<_> = (0..4096).map(|i| rec(i, Source::Stdout, &line)).collect();
        let start = std::time::Instant::now();
        let batches = 2000;
        for _ in 0..batches {
            w.append(&batch).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let mb = (batches * batch.len() * (line.len() + 1)) as f64 / 1e6;
        println!("{:.0} MB/s of line payload ({} lines)", mb / secs, w.lines_written());
    }
}
