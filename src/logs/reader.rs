//! Serving log queries while the writer may still be appending.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};

use super::error::LogError;
use super::format::{ENTRY_LEN, Extent, HEADER_LEN, IndexEntry, LogFiles, RecordHeader, Source};

/// Lines returned by one [`read`] when the filter sets no `max_lines`, so a
/// client asking for "everything" of a million-line log gets it in pages
/// (continue with `start_line` = last `line_number` + 1).
pub const DEFAULT_MAX_LINES: u64 = 10_000;

/// Total line bytes after which one [`read`] stops adding lines (it always
/// returns at least one line if any matches); callers page on as above. 3 MiB
/// keeps a whole answer (10,000 lines' framing included) under the 4 MiB that
/// gRPC clients accept by default, and bounds what a burst of concurrent
/// fetches holds in memory: a log of 64 KiB lines would otherwise give pages of
/// hundreds of MiB.
pub const MAX_RESULT_BYTES: usize = 3 << 20;

/// Index entries read per syscall while scanning.
const INDEX_CHUNK: u64 = 4096;
/// Read-ahead into `log.bin` while scanning.
const DATA_WINDOW: u64 = 1 << 20;

/// A log query as it comes off the Iris wire; zero / `None` fields do not
/// filter, so `LogFilter::default()` matches everything.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Lines whose text matches (text is decoded lossily as UTF-8 first).
    pub regex: Option<regex::Regex>,
    /// `>= 0`: lines numbered from here on. `< 0`: only the last
    /// `|start_line|` lines of the log; the other filters then apply inside
    /// that window.
    pub start_line: i64,
    /// `> 0`: lines stamped strictly after this.
    pub start_ms: i64,
    /// `> 0`: lines stamped at or before this.
    pub end_ms: i64,
    /// `> 0`: at most this many lines: the first ones, or for a negative
    /// `start_line` the last ones. `0` means [`DEFAULT_MAX_LINES`].
    pub max_lines: u64,
    pub source: Option<Source>,
    /// `> 0`: only lines numbered below this, as if the log ended there (a negative
    /// `start_line` then counts back from it). Not on the Iris wire: the dashboard pages
    /// backwards with it.
    pub end_line: u64,
}

/// One line of a query result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// 0-based and stable across writer restarts, so it can be used to page.
    pub line_number: u64,
    pub ts_ms: i64,
    pub source: Source,
    /// Invalid UTF-8 is replaced by U+FFFD; tasks print whatever they like.
    pub data: String,
}

/// Answers `filter` from the log in `dir`. Lines the writer has not finished
/// (or left torn when it died) are not visible. A missing directory or file
/// reads as an empty log: a task that never printed has no log yet.
///
/// Cost is proportional to the lines looked at, not to the log: a tail or a
/// `start_line` seeks straight to its index entry, and a time range is
/// found by binary search on the index (timestamps are non-decreasing as
/// written; every returned line is still checked against the range).
///
/// A capped log (segments.rs) whose middle was dropped shows one marker line at the gap's
/// first line number, saying what was dropped; it passes every source filter.
pub fn read(dir: &Path, filter: &LogFilter) -> Result<Vec<LogLine>, LogError> {
    let log = Log::open(dir)?;
    let total = log.end();
    let n = if filter.end_line > 0 { total.min(filter.end_line) } else { total };
    if n == 0 {
        return Ok(Vec::new());
    }
    let pieces = log.pieces(n)?;
    let tail = filter.start_line < 0;
    let lo =
        if tail { window_start(&pieces, filter.start_line.unsigned_abs()) } else { (filter.start_line as u64).min(n) };
    let limit = if filter.max_lines > 0 { filter.max_lines } else { DEFAULT_MAX_LINES };
    let mut budget = Budget { lines: limit, bytes: MAX_RESULT_BYTES };
    let mut out = Vec::new();
    if tail {
        for piece in pieces.iter().rev() {
            let mut found = piece.read(filter, lo, n, &mut budget, true)?;
            found.reverse();
            out.extend(found);
            if budget.is_spent() {
                break;
            }
        }
        out.reverse();
    } else {
        for piece in &pieces {
            out.extend(piece.read(filter, lo, n, &mut budget, false)?);
            if budget.is_spent() {
                break;
            }
        }
    }
    Ok(out)
}

/// The number of lines in the log in `dir` (0 if there is none): the number the next line
/// will get, dropped lines included.
pub fn line_count(dir: &Path) -> Result<u64, LogError> {
    Ok(Log::open(dir)?.end())
}

/// What is left of a query's room: lines, and bytes of line text.
struct Budget {
    lines: u64,
    bytes: usize,
}

impl Budget {
    fn is_spent(&self) -> bool {
        self.lines == 0 || self.bytes == 0
    }

    /// Takes one line of `len` bytes; false when there was no room left for it. The first
    /// line always fits, however long: a query that matches returns at least one line.
    fn take(&mut self, len: usize) -> bool {
        if self.is_spent() {
            return false;
        }
        self.lines -= 1;
        self.bytes = self.bytes.saturating_sub(len.max(1));
        true
    }
}

/// One segment of a log, opened, with the lines it holds.
struct Segment {
    first: u64,
    files: LogFiles,
    extent: Extent,
}

/// A log as a reader sees it: its segments, in order.
struct Log {
    dir: PathBuf,
    segments: Vec<Segment>,
}

impl Log {
    fn open(dir: &Path) -> Result<Log, LogError> {
        let mut segments = Vec::new();
        for first in super::segments::list(dir)? {
            // A segment rotated away since the listing is simply not there any more.
            if let Some(files) = super::segments::open_segment(dir, first)? {
                let extent = files.valid_extent()?;
                segments.push(Segment { first, files, extent });
            }
        }
        Ok(Log { dir: dir.to_path_buf(), segments })
    }

    fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.first + s.extent.lines)
    }

    /// The segments and the gaps between them, clipped to lines below `n`.
    fn pieces(&self, n: u64) -> Result<Vec<Piece<'_>>, LogError> {
        let mut pieces = Vec::new();
        let mut at = 0u64;
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.first >= n {
                break;
            }
            if seg.first > at {
                // Lines at..seg.first are gone: rotation dropped them (the gap after the
                // head), or a crash tore them off a segment's end.
                let after_head = i > 0 && self.segments[i - 1].first == 0;
                let dropped = super::segments::read_dropped(&self.dir);
                let bytes = (after_head && dropped.lines == seg.first - at).then_some(dropped.bytes);
                let ts_ms = if seg.extent.lines > 0 { seg.files.entry(0)?.ts_ms } else { 0 };
                let cap = super::segments::read_cap(&self.dir);
                let data = super::segments::marker_text(seg.first - at, bytes, cap);
                pieces.push(Piece::Gap(LogLine { line_number: at, ts_ms, source: Source::Stderr, data }));
            }
            // A segment may claim lines a later one starts at (a torn end a restarted writer
            // cut after this reader looked): the later segment wins.
            let end = (seg.first + seg.extent.lines).min(n);
            let end = self.segments.get(i + 1).map_or(end, |next| end.min(next.first));
            let lo = seg.first.max(at);
            if end > lo {
                pieces.push(Piece::Lines { seg, lo, hi: end });
            }
            at = at.max(end);
        }
        Ok(pieces)
    }
}

/// A run of lines of one segment, or the marker of dropped lines.
enum Piece<'a> {
    Lines { seg: &'a Segment, lo: u64, hi: u64 },
    Gap(LogLine),
}

impl Piece<'_> {
    /// Lines that exist in this piece (a gap shows as its one marker line).
    fn count(&self) -> u64 {
        match self {
            Piece::Lines { lo, hi, .. } => hi - lo,
            Piece::Gap(_) => 1,
        }
    }

    /// The first line number of the piece, and the one past its last line.
    fn range(&self) -> (u64, u64) {
        match self {
            Piece::Lines { lo, hi, .. } => (*lo, *hi),
            Piece::Gap(m) => (m.line_number, m.line_number + 1),
        }
    }

    /// The matches of `filter` within lines `lo..hi` of this piece, in line order; the last
    /// ones when `backward`. Takes from `budget` what they use.
    fn read(
        &self,
        filter: &LogFilter,
        lo: u64,
        hi: u64,
        budget: &mut Budget,
        backward: bool,
    ) -> Result<Vec<LogLine>, LogError> {
        let (first, end) = self.range();
        let (lo, hi) = (lo.max(first), hi.min(end));
        if lo >= hi || budget.is_spent() {
            return Ok(Vec::new());
        }
        match self {
            Piece::Gap(marker) => {
                let f = filter;
                let in_time =
                    (f.start_ms <= 0 || marker.ts_ms > f.start_ms) && (f.end_ms <= 0 || marker.ts_ms <= f.end_ms);
                let matches = f.regex.as_ref().is_none_or(|re| re.is_match(&marker.data));
                if in_time && matches && budget.take(marker.data.len()) {
                    Ok(vec![marker.clone()])
                } else {
                    Ok(Vec::new())
                }
            }
            Piece::Lines { seg, .. } => {
                let (mut lo, mut hi) = (lo - seg.first, hi - seg.first);
                if filter.start_ms > 0 {
                    lo = partition_point(&seg.files, lo, hi, |ts| ts <= filter.start_ms)?;
                }
                if filter.end_ms > 0 {
                    hi = partition_point(&seg.files, lo, hi, |ts| ts <= filter.end_ms)?;
                }
                let mut scan = Scanner {
                    files: &seg.files,
                    first: seg.first,
                    filter,
                    extent: seg.extent,
                    index_buf: Vec::new(),
                    window: Vec::new(),
                    window_start: 0,
                };
                if backward { scan.backward(lo, hi, budget) } else { scan.forward(lo, hi, budget) }
            }
        }
    }
}

/// The line number where the last `count` existing lines of `pieces` start.
fn window_start(pieces: &[Piece<'_>], count: u64) -> u64 {
    let mut left = count;
    for piece in pieces.iter().rev() {
        let (lo, hi) = piece.range();
        let n = piece.count();
        if left <= n {
            return match piece {
                Piece::Lines { .. } => hi - left,
                Piece::Gap(_) => lo,
            };
        }
        left -= n;
    }
    0
}

/// First line in `lo..hi` whose timestamp fails `pred` (`pred` holding for a
/// prefix of the range), reading one index entry per probe.
fn partition_point(files: &LogFiles, mut lo: u64, mut hi: u64, pred: impl Fn(i64) -> bool) -> Result<u64, LogError> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(files.entry(mid)?.ts_ms) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

fn corrupt(line: u64, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("line {line}: {what}"))
}

struct Scanner<'a> {
    files: &'a LogFiles,
    /// The line number of the segment's first line (its index entry 0).
    first: u64,
    filter: &'a LogFilter,
    extent: Extent,
    index_buf: Vec<u8>,
    /// `log.bin` bytes from `window_start`.
    window: Vec<u8>,
    window_start: u64,
}

impl Scanner<'_> {
    /// The first matches in `lo..hi` (segment-local numbers), as many as `budget` takes.
    fn forward(&mut self, lo: u64, hi: u64, budget: &mut Budget) -> Result<Vec<LogLine>, LogError> {
        let mut out = Vec::new();
        let mut c0 = lo;
        while c0 < hi {
            let c1 = hi.min(c0 + INDEX_CHUNK);
            let done = self.chunk(c0, c1, &mut |line| {
                if budget.take(line.data.len()) {
                    out.push(line);
                }
                budget.is_spent()
            })?;
            if done {
                break;
            }
            c0 = c1;
        }
        Ok(out)
    }

    /// The last matches in `lo..hi`, as many as `budget` takes, in line order: chunks are
    /// scanned from the end, starting small so a plain tail reads only the lines it returns.
    /// Each chunk's records fit the bytes left in the budget (found from the index's offsets
    /// before anything is read), so what a tail holds in memory is bounded in bytes, not only
    /// in lines: 4,096 lines of 64 KiB would be 256 MiB.
    fn backward(&mut self, lo: u64, hi: u64, budget: &mut Budget) -> Result<Vec<LogLine>, LogError> {
        let mut chunks: Vec<Vec<LogLine>> = Vec::new();
        let (mut count, mut bytes) = (0u64, 0usize);
        let mut c1 = hi;
        let mut step = 0u64;
        while c1 > lo && count < budget.lines && bytes < budget.bytes {
            // What is still missing, but at least twice the last chunk when
            // filters turn out to be selective.
            let want = (budget.lines - count).max(step).clamp(16, INDEX_CHUNK);
            step = want * 2;
            let c0 = self.fitting_start(lo.max(c1.saturating_sub(want)), c1, (budget.bytes - bytes) as u64)?;
            let mut found = Vec::new();
            self.chunk(c0, c1, &mut |line| {
                found.push(line);
                false
            })?;
            count += found.len() as u64;
            bytes += found.iter().map(|l| l.data.len().max(1)).sum::<usize>();
            chunks.push(found);
            c1 = c0;
        }
        // Keep the newest lines within the budget, then restore line order.
        let mut out = Vec::new();
        'outer: for chunk in &mut chunks {
            while let Some(line) = chunk.pop() {
                if !budget.take(line.data.len()) {
                    break 'outer;
                }
                out.push(line);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The first line of the longest run `start..c1` (`start` at least `c0`, and at most
    /// `c1 - 1`: one line always) whose records take at most `room` bytes of `log.bin`.
    fn fitting_start(&mut self, c0: u64, c1: u64, room: u64) -> Result<u64, LogError> {
        let read_to = if c1 < self.extent.lines { c1 + 1 } else { c1 };
        self.index_buf.resize(((read_to - c0) as usize) * ENTRY_LEN, 0);
        self.files.read_index(c0, &mut self.index_buf)?;
        let offset = |i: u64| IndexEntry::decode(&self.index_buf[((i - c0) as usize) * ENTRY_LEN..]).offset;
        let end = if read_to > c1 { offset(c1).min(self.extent.data_end) } else { self.extent.data_end };
        let mut start = c1 - 1;
        while start > c0 && end.saturating_sub(offset(start - 1)) <= room {
            start -= 1;
        }
        Ok(start)
    }

    /// Feeds the matching lines of `c0..c1` to `emit` in order until it
    /// returns true; returns whether it did.
    fn chunk(&mut self, c0: u64, c1: u64, emit: &mut dyn FnMut(LogLine) -> bool) -> Result<bool, LogError> {
        // One entry past the chunk tells where its records end, which bounds
        // the read-ahead into log.bin.
        let read_to = if c1 < self.extent.lines { c1 + 1 } else { c1 };
        self.index_buf.resize(((read_to - c0) as usize) * ENTRY_LEN, 0);
        self.files.read_index(c0, &mut self.index_buf)?;
        let region_end = if read_to > c1 {
            let at = ((c1 - c0) as usize) * ENTRY_LEN;
            IndexEntry::decode(&self.index_buf[at..]).offset.min(self.extent.data_end)
        } else {
            self.extent.data_end
        };
        let f = self.filter;
        let first = self.first;
        for line_number in c0..c1 {
            let at = ((line_number - c0) as usize) * ENTRY_LEN;
            let e = IndexEntry::decode(&self.index_buf[at..]);
            if (f.start_ms > 0 && e.ts_ms <= f.start_ms) || (f.end_ms > 0 && e.ts_ms > f.end_ms) {
                continue;
            }
            let header = RecordHeader::decode(self.data(line_number, e.offset, HEADER_LEN as u64, region_end)?);
            let source = Source::from_byte(header.source)
                .ok_or_else(|| self.files.data_err(corrupt(line_number, "unknown source byte")))?;
            if f.source.is_some_and(|s| s != source) {
                continue;
            }
            let len = HEADER_LEN as u64 + u64::from(header.len);
            let record = self.data(line_number, e.offset, len, region_end)?;
            let text = String::from_utf8_lossy(&record[HEADER_LEN..]);
            if let Some(re) = &f.regex
                && !re.is_match(&text)
            {
                continue;
            }
            let line = LogLine {
                line_number: first + line_number,
                ts_ms: e.ts_ms,
                source,
                data: match text {
                    Cow::Borrowed(s) => s.to_owned(),
                    Cow::Owned(s) => s,
                },
            };
            if emit(line) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `len` bytes of `log.bin` at `offset`, served from the read-ahead
    /// window, which is refilled (up to `region_end`) when it misses.
    fn data(&mut self, line: u64, offset: u64, len: u64, region_end: u64) -> Result<&[u8], LogError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.extent.data_end)
            .ok_or_else(|| self.files.data_err(corrupt(line, "record runs past the end of log.bin")))?;
        let window_end = self.window_start + self.window.len() as u64;
        if offset < self.window_start || end > window_end {
            let ahead = region_end.saturating_sub(offset).min(DATA_WINDOW);
            let size = len.max(ahead) as usize;
            self.window.clear();
            self.window.resize(size, 0);
            self.window_start = offset;
            if let Err(e) = self.files.read_data(offset, &mut self.window) {
                self.window.clear();
                return Err(e);
            }
        }
        let at = (offset - self.window_start) as usize;
        Ok(&self.window[at..at + len as usize])
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::super::format::tests::{append_raw, entry, record};
    use super::super::format::{DATA_FILE, INDEX_FILE};
    use super::super::writer::{LogRecord, LogWriter};
    use super::*;

    const SOURCES: [Source; 3] = [Source::Stdout, Source::Stderr, Source::Build];

    /// Line i: ts 1000 + 10 i, source cycling stdout/stderr/build,
    /// text "line i".
    fn build_log(dir: &Path, n: u64) {
        let mut w = LogWriter::open(dir).unwrap();
        let mut i = w.lines_written();
        while i < n {
            let end = n.min(i + 5000);
            let texts: Vec<String> = (i..end).map(|i| format!("line {i}")).collect();
            let recs: Vec<LogRecord<'_>> = (i..end)
                .zip(&texts)
                .map(|(i, t)| LogRecord {
                    ts_ms: 1000 + 10 * i as i64,
                    source: SOURCES[(i % 3) as usize],
                    data: t.as_bytes(),
                })
                .collect();
            w.append(&recs).unwrap();
            i = end;
        }
    }

    fn numbers(lines: &[LogLine]) -> Vec<u64> {
        lines.iter().map(|l| l.line_number).collect()
    }

    fn query(dir: &Path, f: LogFilter) -> Vec<u64> {
        numbers(&read(dir, &f).unwrap())
    }

    fn assert_consistent(lines: &[LogLine]) {
        for l in lines {
            assert_eq!(l.data, format!("line {}", l.line_number));
            assert_eq!(l.ts_ms, 1000 + 10 * l.line_number as i64);
            assert_eq!(l.source, SOURCES[(l.line_number % 3) as usize]);
        }
    }

    #[test]
    fn missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("never-created");
        assert_eq!(read(&gone, &LogFilter::default()).unwrap(), vec![]);
        assert_eq!(line_count(&gone).unwrap(), 0);
        // An index without its data file has no complete record.
        append_raw(&dir.path().join(INDEX_FILE), &entry(0, 1));
        assert_eq!(read(dir.path(), &LogFilter::default()).unwrap(), vec![]);
        assert_eq!(line_count(dir.path()).unwrap(), 0);
    }

    #[test]
    fn default_filter_returns_every_line() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 50);
        let lines = read(dir.path(), &LogFilter::default()).unwrap();
        assert_eq!(numbers(&lines), (0..50).collect::<Vec<_>>());
        assert_consistent(&lines);
        assert_eq!(line_count(dir.path()).unwrap(), 50);
    }

    #[test]
    fn start_line_seeks() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 50);
        let f = |start_line| LogFilter { start_line, ..Default::default() };
        assert_eq!(query(dir.path(), f(45)), vec![45, 46, 47, 48, 49]);
        assert_eq!(query(dir.path(), f(49)), vec![49]);
        assert!(query(dir.path(), f(50)).is_empty());
        assert!(query(dir.path(), f(i64::MAX)).is_empty());
    }

    #[test]
    fn time_range_is_exclusive_then_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 50);
        // Line i has ts 1000 + 10 i.
        let f = |start_ms, end_ms| LogFilter { start_ms, end_ms, ..Default::default() };
        assert_eq!(query(dir.path(), f(1440, 0)), vec![45, 46, 47, 48, 49]);
        assert_eq!(query(dir.path(), f(1441, 0)), vec![45, 46, 47, 48, 49]);
        assert_eq!(query(dir.path(), f(0, 1020)), vec![0, 1, 2]);
        assert_eq!(query(dir.path(), f(0, 1019)), vec![0, 1]);
        assert_eq!(query(dir.path(), f(1100, 1130)), vec![11, 12, 13]);
        assert!(query(dir.path(), f(1130, 1130)).is_empty());
        assert!(query(dir.path(), f(5000, 0)).is_empty());
        assert!(query(dir.path(), f(0, 999)).is_empty());
        // Combined with a start line.
        let g = LogFilter { start_line: 12, start_ms: 1100, end_ms: 1150, ..Default::default() };
        assert_eq!(query(dir.path(), g), vec![12, 13, 14, 15]);
    }

    #[test]
    fn time_range_checks_each_line_after_binary_search() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        // A clock step back at line 4.
        let ts = [10, 30, 40, 50, 15, 60, 70];
        let recs: Vec<_> = ts.iter().map(|&ts_ms| LogRecord { ts_ms, source: Source::Stdout, data: b"x" }).collect();
        w.append(&recs).unwrap();
        let f = LogFilter { start_ms: 20, ..Default::default() };
        assert_eq!(query(dir.path(), f), vec![1, 2, 3, 5, 6]);
    }

    #[test]
    fn source_filter() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 10);
        let f = |source| LogFilter { source: Some(source), ..Default::default() };
        assert_eq!(query(dir.path(), f(Source::Stdout)), vec![0, 3, 6, 9]);
        assert_eq!(query(dir.path(), f(Source::Stderr)), vec![1, 4, 7]);
        assert_eq!(query(dir.path(), f(Source::Build)), vec![2, 5, 8]);
    }

    #[test]
    fn regex_filter() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 120);
        let f = LogFilter { regex: Some(regex::Regex::new(r"^line 1\d$").unwrap()), ..Default::default() };
        assert_eq!(query(dir.path(), f), (10..20).collect::<Vec<_>>());
        let f = LogFilter { regex: Some(regex::Regex::new("nomatch").unwrap()), ..Default::default() };
        assert!(query(dir.path(), f).is_empty());
    }

    #[test]
    fn max_lines_keeps_the_first_matches() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 100);
        let f = LogFilter { max_lines: 3, ..Default::default() };
        assert_eq!(query(dir.path(), f), vec![0, 1, 2]);
        let f = LogFilter { max_lines: 3, start_line: 10, source: Some(Source::Stderr), ..Default::default() };
        assert_eq!(query(dir.path(), f), vec![10, 13, 16]);
    }

    #[test]
    fn end_line_pages_backwards() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 100);
        let f = |start_line, end_line, max_lines, source| LogFilter {
            start_line,
            end_line,
            max_lines,
            source,
            ..Default::default()
        };
        // The 3 lines before line 50, then the last 3 stdout lines of 0..50.
        assert_eq!(query(dir.path(), f(-3, 50, 0, None)), vec![47, 48, 49]);
        assert_eq!(query(dir.path(), f(-50, 50, 3, Some(Source::Stdout))), vec![42, 45, 48]);
        assert_eq!(query(dir.path(), f(45, 50, 0, None)), vec![45, 46, 47, 48, 49]);
        // Past the end of the log: the log's end.
        assert_eq!(query(dir.path(), f(-2, 1000, 0, None)), vec![98, 99]);
    }

    #[test]
    fn negative_start_line_is_a_tail_window() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 100);
        let f = |start_line, max_lines, source| LogFilter { start_line, max_lines, source, ..Default::default() };
        assert_eq!(query(dir.path(), f(-3, 0, None)), vec![97, 98, 99]);
        assert_eq!(query(dir.path(), f(-1000, 0, None)), (0..100).collect::<Vec<_>>());
        // The window is taken first, then filtered: of lines 90..100 only
        // three are stdout.
        assert_eq!(query(dir.path(), f(-10, 0, Some(Source::Stdout))), vec![90, 93, 96, 99]);
        // With max_lines: the last max_lines matches of the window.
        assert_eq!(query(dir.path(), f(-10, 2, None)), vec![98, 99]);
        assert_eq!(query(dir.path(), f(-50, 2, Some(Source::Build))), vec![95, 98]);
        assert_eq!(query(dir.path(), f(-10, 50, None)), (90..100).collect::<Vec<_>>());
        // Sparse matches far back in a wide window.
        let g = LogFilter {
            start_line: -100,
            max_lines: 2,
            regex: Some(regex::Regex::new(r"^line [12]$").unwrap()),
            ..Default::default()
        };
        assert_eq!(query(dir.path(), g), vec![1, 2]);
        // Time filters apply inside the window too.
        let g = LogFilter { start_line: -10, end_ms: 1000 + 10 * 92, ..Default::default() };
        assert_eq!(query(dir.path(), g), vec![90, 91, 92]);
    }

    #[test]
    fn unbounded_queries_are_paged() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 25_000);
        let mut start_line = 0;
        let mut pages = Vec::new();
        loop {
            let lines = read(dir.path(), &LogFilter { start_line, ..Default::default() }).unwrap();
            let Some(last) = lines.last() else { break };
            assert_consistent(&lines);
            assert_eq!(lines[0].line_number, start_line as u64);
            start_line = last.line_number as i64 + 1;
            pages.push(lines.len());
        }
        assert_eq!(pages, vec![10_000, 10_000, 5_000]);
        // A tail wider than the page returns the newest page.
        let tail = read(dir.path(), &LogFilter { start_line: -20_000, ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), (15_000..25_000).collect::<Vec<_>>());
    }

    #[test]
    fn result_bytes_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        let big = vec![b'x'; 1 << 20];
        let recs: Vec<_> = (0..70).map(|i| LogRecord { ts_ms: i, source: Source::Stdout, data: &big }).collect();
        w.append(&recs).unwrap();
        let all = read(dir.path(), &LogFilter::default()).unwrap();
        assert_eq!(numbers(&all), vec![0, 1, 2], "3 MiB of text at most");
        assert!(all.iter().all(|l| l.data.len() == 1 << 20));
        let tail = read(dir.path(), &LogFilter { start_line: -70, ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), vec![67, 68, 69]);
        // One line longer than the whole budget still comes back: paging never gets stuck.
        let huge = vec![b'y'; MAX_RESULT_BYTES + 1];
        w.append(&[LogRecord { ts_ms: 99, source: Source::Stdout, data: &huge }]).unwrap();
        let last = read(dir.path(), &LogFilter { start_line: 70, ..Default::default() }).unwrap();
        assert_eq!(numbers(&last), vec![70]);
    }

    #[test]
    fn a_tail_of_long_lines_reads_only_what_fits_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        // 1,600 lines of 64 KiB: 100 MiB, within one chunk of lines.
        let long = vec![b'x'; 64 << 10];
        let recs: Vec<_> = (0..1600).map(|i| LogRecord { ts_ms: i, source: Source::Stdout, data: &long }).collect();
        w.append(&recs).unwrap();
        let log = Log::open(dir.path()).unwrap();
        let seg = &log.segments[0];
        let f = LogFilter::default();
        let mut scan = Scanner {
            files: &seg.files,
            first: seg.first,
            filter: &f,
            extent: seg.extent,
            index_buf: Vec::new(),
            window: Vec::new(),
            window_start: 0,
        };
        // The worker's memory bound is tests/shared_host.rs's sixteen tails (peak RSS); here,
        // which lines a chunk may take, and that the answer is still the newest lines.
        let mut budget = Budget { lines: 10_000, bytes: MAX_RESULT_BYTES };
        let lines = scan.backward(0, 1600, &mut budget).unwrap();
        assert_eq!(lines.len(), MAX_RESULT_BYTES / (64 << 10), "the newest lines the budget takes");
        assert_eq!(lines.last().unwrap().line_number, 1599);
        let start = scan.fitting_start(0, 1600, 1 << 20).unwrap();
        let per_line = (64 << 10) + HEADER_LEN as u64;
        assert_eq!(1600 - start, (1 << 20) / per_line, "the lines that fit 1 MiB");
        assert_eq!(scan.fitting_start(0, 1600, 0).unwrap(), 1599, "one line at least");
        assert_eq!(scan.fitting_start(1590, 1600, u64::MAX).unwrap(), 1590, "never before the chunk");
        // And through `read`: the tail wider than the budget returns its newest 3 MiB.
        let tail = read(dir.path(), &LogFilter { start_line: -10_000, ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), (1552..1600).collect::<Vec<_>>());
    }

    /// Writes lines `from..to` ("line i", ts 1000 + 10 i) in batches of 7.
    fn append_lines(w: &mut LogWriter, from: u64, to: u64) {
        let mut i = from;
        while i < to {
            let end = to.min(i + 7);
            let texts: Vec<String> = (i..end).map(|i| format!("line {i:06}")).collect();
            let recs: Vec<_> = (i..end)
                .zip(&texts)
                .map(|(i, t)| LogRecord { ts_ms: 1000 + 10 * i as i64, source: Source::Stdout, data: t.as_bytes() })
                .collect();
            w.append(&recs).unwrap();
            i = end;
        }
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum()
    }

    #[test]
    fn a_capped_log_keeps_its_head_and_newest_lines_and_marks_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let cap = super::super::MIN_CAP;
        super::super::set_cap(dir.path(), cap).unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        // 40 bytes a line on disk (13 + 16 + 11): 200,000 lines are 8 MB, 8 times the cap.
        append_lines(&mut w, 0, 200_000);
        assert_eq!(w.lines_written(), 200_000);
        let on_disk = disk_bytes(dir.path());
        assert!(on_disk <= cap, "{on_disk} bytes on disk");
        assert!(on_disk >= cap * 7 / 8, "{on_disk} bytes on disk: the cap is used");
        assert_eq!(line_count(dir.path()).unwrap(), 200_000);

        let all = |f: LogFilter| read(dir.path(), &f).unwrap();
        let head = all(LogFilter { max_lines: 2, ..Default::default() });
        assert_eq!(head.iter().map(|l| l.data.as_str()).collect::<Vec<_>>(), ["line 000000", "line 000001"]);
        let tail = all(LogFilter { start_line: -2, ..Default::default() });
        assert_eq!(numbers(&tail), vec![199_998, 199_999]);
        assert_eq!(tail[1].data, "line 199999");

        // The marker sits at the gap's first line number and says what went.
        let marker = all(LogFilter { regex: Some(regex::Regex::new("dropped").unwrap()), ..Default::default() });
        assert_eq!(marker.len(), 1, "{marker:?}");
        let m = &marker[0];
        let dropped = super::super::segments::read_dropped(dir.path());
        assert!(m.data.contains(&format!("{} lines (", dropped.lines)), "{}", m.data);
        assert_eq!(dropped.bytes, dropped.lines * 11);
        assert!(m.data.contains("capped at 1.0 MiB"), "{}", m.data);
        let after = all(LogFilter { start_line: m.line_number as i64 + 1, max_lines: 1, ..Default::default() });
        assert_eq!(after[0].line_number, m.line_number + dropped.lines, "numbers keep counting through the gap");
        assert_eq!(after[0].data, format!("line {:06}", after[0].line_number));
        // Around the gap, forwards and backwards.
        let across = all(LogFilter { start_line: m.line_number as i64 - 1, max_lines: 3, ..Default::default() });
        assert_eq!(across.len(), 3);
        assert_eq!(across[1], *m);
        let before = all(LogFilter { start_line: -2, end_line: after[0].line_number + 1, ..Default::default() });
        assert_eq!(before, vec![m.clone(), after[0].clone()]);
        // Every existing line once, paging from the start.
        let (mut start, mut seen) = (0i64, 0u64);
        loop {
            let page = all(LogFilter { start_line: start, ..Default::default() });
            let Some(last) = page.last() else { break };
            seen += page.len() as u64;
            start = last.line_number as i64 + 1;
        }
        assert_eq!(seen, 200_000 - dropped.lines + 1);
        // A source filter still shows the marker; a time range picks it by its neighbour's time.
        let stderr = all(LogFilter { source: Some(Source::Stderr), ..Default::default() });
        assert_eq!(stderr, vec![m.clone()]);

        // A restarted writer goes on where it was, in the newest segment.
        drop(w);
        let mut w = LogWriter::open(dir.path()).unwrap();
        assert_eq!(w.lines_written(), 200_000);
        append_lines(&mut w, 200_000, 200_010);
        assert_eq!(all(LogFilter { start_line: -1, ..Default::default() })[0].data, "line 200009");
        assert!(disk_bytes(dir.path()) <= cap);
    }

    #[test]
    fn a_log_without_a_cap_is_never_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        append_lines(&mut w, 0, 100_000);
        assert_eq!(super::super::segments::list(dir.path()).unwrap(), vec![0]);
        assert_eq!(
            read(dir.path(), &LogFilter { start_line: -100_000, max_lines: 100_000, ..Default::default() })
                .unwrap()
                .len(),
            100_000
        );
    }

    #[test]
    fn torn_tail_is_invisible_to_readers() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 5);
        let data_len = std::fs::metadata(dir.path().join(DATA_FILE)).unwrap().len();
        // Writer killed after writing an entry but with its record cut short,
        // plus half of a following entry.
        let rec = record(2000, Source::Stdout, b"torn line");
        append_raw(&dir.path().join(DATA_FILE), &rec[..rec.len() - 1]);
        append_raw(&dir.path().join(INDEX_FILE), &entry(data_len, 2000));
        append_raw(&dir.path().join(INDEX_FILE), &entry(data_len + 100, 2001)[..8]);
        assert_eq!(line_count(dir.path()).unwrap(), 5);
        let all = read(dir.path(), &LogFilter::default()).unwrap();
        assert_eq!(numbers(&all), vec![0, 1, 2, 3, 4]);
        let tail = read(dir.path(), &LogFilter { start_line: -2, ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), vec![3, 4]);
        assert_consistent(&tail);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path()).unwrap();
        w.append(&[LogRecord { ts_ms: 1, source: Source::Stderr, data: b"bad \xff byte\r" }]).unwrap();
        let lines = read(dir.path(), &LogFilter::default()).unwrap();
        assert_eq!(
            lines,
            vec![LogLine { line_number: 0, ts_ms: 1, source: Source::Stderr, data: "bad \u{fffd} byte\r".into() }]
        );
    }

    #[test]
    fn corrupt_source_byte_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 3);
        // Overwrite line 0's source byte; the tail still validates.
        let f = std::fs::OpenOptions::new().write(true).open(dir.path().join(DATA_FILE)).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[9], 8).unwrap();
        let err = read(dir.path(), &LogFilter::default()).unwrap_err();
        assert!(matches!(err, LogError::ReadData { .. }));
        assert!(err.to_string().contains("log.bin"), "{err}");
        assert!(err.to_string().contains("line 0"), "{err}");
    }

    #[test]
    fn tail_of_200k_line_log_reads_only_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 200_000);
        // Wreck everything but the last 1000 lines of both files: a tail
        // that scanned from the start would fail or return garbage.
        let index_len = std::fs::metadata(dir.path().join(INDEX_FILE)).unwrap().len();
        let keep_from = LogFiles {
            index: File::open(dir.path().join(INDEX_FILE)).unwrap(),
            data: File::open(dir.path().join(DATA_FILE)).unwrap(),
            index_path: dir.path().join(INDEX_FILE),
            data_path: dir.path().join(DATA_FILE),
        }
        .entry(199_000)
        .unwrap()
        .offset;
        let wreck = |name: &str, len: u64| {
            let f = std::fs::OpenOptions::new().write(true).open(dir.path().join(name)).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xee; len as usize], 0).unwrap();
        };
        wreck(INDEX_FILE, index_len - 1000 * 16);
        wreck(DATA_FILE, keep_from);

        assert_eq!(line_count(dir.path()).unwrap(), 200_000);
        let tail = read(dir.path(), &LogFilter { start_line: -100, ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), (199_900..200_000).collect::<Vec<_>>());
        assert_consistent(&tail);
        let seek = read(dir.path(), &LogFilter { start_line: 199_990, ..Default::default() }).unwrap();
        assert_eq!(numbers(&seek), (199_990..200_000).collect::<Vec<_>>());
        assert_consistent(&seek);
    }

    #[test]
    fn time_range_is_found_by_binary_search() {
        let dir = tempfile::tempdir().unwrap();
        build_log(dir.path(), 200_000);
        // Give lines 0..1000 a timestamp inside the queried range. A linear
        // scan would return them; a binary search never probes that far back
        // (and timestamps are assumed non-decreasing).
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.path().join(INDEX_FILE)).unwrap();
        let mut index = vec![0u8; 1000 * 16];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut index, 0).unwrap();
        for e in index.chunks_mut(16) {
            e[8..].copy_from_slice(&(1000i64 + 10 * 150_002).to_le_bytes());
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &index, 0).unwrap();
        let lines = read(
            dir.path(),
            &LogFilter { start_ms: 1000 + 10 * 150_000, end_ms: 1000 + 10 * 150_004, ..Default::default() },
        )
        .unwrap();
        assert_eq!(numbers(&lines), vec![150_001, 150_002, 150_003, 150_004]);
        assert_consistent(&lines);
    }

    /// A 5 GB log made of holes with real lines only at its end: a tail must
    /// not depend on the size of what comes before.
    #[test]
    fn tail_of_sparse_5gb_log_is_fast() {
        let dir = tempfile::tempdir().unwrap();
        let base_line: u64 = 300_000_000;
        let base_off: u64 = 5 << 30;
        let mut data = Vec::new();
        let mut index = Vec::new();
        for i in 0..200u64 {
            let text = format!("line {}", base_line + i);
            index.extend(entry(base_off + data.len() as u64, 7));
            data.extend(record(7, Source::Stdout, text.as_bytes()));
        }
        let put = |name: &str, at: u64, bytes: &[u8]| {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(dir.path().join(name))
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
        };
        put(DATA_FILE, base_off, &data);
        put(INDEX_FILE, base_line * 16, &index);

        let start = std::time::Instant::now();
        assert_eq!(line_count(dir.path()).unwrap(), base_line + 200);
        let tail = read(dir.path(), &LogFilter { start_line: -100, ..Default::default() }).unwrap();
        let seek = read(dir.path(), &LogFilter { start_line: (base_line + 195) as i64, ..Default::default() }).unwrap();
        let elapsed = start.elapsed();
        let want: Vec<u64> = (base_line + 100..base_line + 200).collect();
        assert_eq!(numbers(&tail), want);
        for l in tail.iter().chain(&seek) {
            assert_eq!(l.data, format!("line {}", l.line_number));
        }
        assert_eq!(numbers(&seek), (base_line + 195..base_line + 200).collect::<Vec<_>>());
        assert!(elapsed < std::time::Duration::from_secs(2), "{elapsed:?}");
    }

    /// The reader runs while the writer appends: every read must see a
    /// consistent prefix of the log.
    #[test]
    fn reads_during_appends_see_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || build_log_slowly(&path, 20_000));
        let mut last_count = 0;
        loop {
            let done = writer.is_finished();
            let count = line_count(dir.path()).unwrap();
            assert!(count >= last_count);
            last_count = count;
            let tail = read(dir.path(), &LogFilter { start_line: -50, ..Default::default() }).unwrap();
            assert_consistent(&tail);
            if let (Some(first), Some(last)) = (tail.first(), tail.last()) {
                assert_eq!(last.line_number - first.line_number + 1, tail.len() as u64);
                assert!(last.line_number + 1 >= count);
            }
            if done {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(line_count(dir.path()).unwrap(), 20_000);
    }

    fn build_log_slowly(dir: &Path, n: u64) {
        let mut w = LogWriter::open(dir).unwrap();
        let mut i = 0;
        let mut batch = 1;
        while i < n {
            let end = n.min(i + batch);
            let texts: Vec<String> = (i..end).map(|i| format!("line {i}")).collect();
            let recs: Vec<_> = (i..end)
                .zip(&texts)
                .map(|(i, t)| LogRecord {
                    ts_ms: 1000 + 10 * i as i64,
                    source: SOURCES[(i % 3) as usize],
                    data: t.as_bytes(),
                })
                .collect();
            w.append(&recs).unwrap();
            i = end;
            batch = batch % 97 + 1;
        }
    }
}
