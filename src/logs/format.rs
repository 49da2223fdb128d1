//! On-disk layout of a task's log directory, and the one rule that says which
//! part of it can be trusted.
//!
//! `log.bin` holds records `ts_ms: i64 LE | source: u8 | len: u32 LE | bytes`,
//! `log.idx` holds one 16-byte entry `offset: u64 LE | ts_ms: i64 LE` per
//! record; entry i is line i. The writer appends the record before its index
//! entry, so every complete index entry normally points at a complete record.
//! A crash (or a power loss, which can leave zero-filled blocks) can break
//! that, so readers and a restarted writer share [`LogFiles::valid_extent`]:
//! if they disagreed, a restarted writer could cut off lines a reader was
//! already serving.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::LogError;

pub(crate) const DATA_FILE: &str = "log.bin";
pub(crate) const INDEX_FILE: &str = "log.idx";
/// `ts_ms: i64 | source: u8 | len: u32`.
pub(crate) const HEADER_LEN: usize = 13;
/// `offset: u64 | ts_ms: i64`.
pub(crate) const ENTRY_LEN: usize = 16;

/// How many index entries the tail validation reads at most per step.
const TAIL_CHUNK: u64 = 4096;

/// Which stream a line came from; stored as one byte so the record header
/// stays fixed-size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Source {
    Stdout = 1,
    Stderr = 2,
    Build = 3,
}

impl Source {
    /// The spelling used on the Iris wire and in filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
            Source::Build => "build",
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Source> {
        match b {
            1 => Some(Source::Stdout),
            2 => Some(Source::Stderr),
            3 => Some(Source::Build),
            _ => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source name that is none of `stdout`, `stderr`, `build`; kept so the
/// caller can echo the bad value back to whoever sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log source {0:?} (expected stdout, stderr or build)")]
pub struct ParseSourceError(pub String);

impl FromStr for Source {
    type Err = ParseSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Source::Stdout),
            "stderr" => Ok(Source::Stderr),
            "build" => Ok(Source::Build),
            other => Err(ParseSourceError(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub offset: u64,
    pub ts_ms: i64,
}

impl IndexEntry {
    pub fn encode_into(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.ts_ms.to_le_bytes());
    }

    /// `b` must hold at least [`ENTRY_LEN`] bytes.
    pub fn decode(b: &[u8]) -> IndexEntry {
        let mut offset = [0u8; 8];
        let mut ts = [0u8; 8];
        offset.copy_from_slice(&b[0..8]);
        ts.copy_from_slice(&b[8..16]);
        IndexEntry { offset: u64::from_le_bytes(offset), ts_ms: i64::from_le_bytes(ts) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub ts_ms: i64,
    pub source: u8,
    pub len: u32,
}

impl RecordHeader {
    pub fn encode_into(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ts_ms.to_le_bytes());
        out.push(self.source);
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// `b` must hold at least [`HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> RecordHeader {
        let mut ts = [0u8; 8];
        let mut len = [0u8; 4];
        ts.copy_from_slice(&b[0..8]);
        len.copy_from_slice(&b[9..13]);
        RecordHeader { ts_ms: i64::from_le_bytes(ts), source: b[8], len: u32::from_le_bytes(len) }
    }

    /// Offset just past this record when it starts at `offset`.
    pub fn end(self, offset: u64) -> Option<u64> {
        offset.checked_add(HEADER_LEN as u64)?.checked_add(u64::from(self.len))
    }
}

/// The trusted part of a log: lines `0..lines`, whose records end at
/// `data_end`; plus the raw file lengths seen when it was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub lines: u64,
    pub data_end: u64,
    pub index_len: u64,
    pub data_len: u64,
}

/// The two files of one log directory, with their paths for error messages.
/// Reads are positional (`pread`), so one handle serves any access pattern
/// without seek state.
pub(crate) struct LogFiles {
    pub index: File,
    pub data: File,
    pub index_path: PathBuf,
    pub data_path: PathBuf,
}

impl LogFiles {
    pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join(INDEX_FILE), dir.join(DATA_FILE))
    }

    pub fn index_err(&self, source: io::Error) -> LogError {
        LogError::ReadIndex { path: self.index_path.clone(), source }
    }

    pub fn data_err(&self, source: io::Error) -> LogError {
        LogError::ReadData { path: self.data_path.clone(), source }
    }

    /// Index length first: the writer only grows `log.bin` before `log.idx`,
    /// so a data length taken later covers every entry the index length
    /// admits.
    pub fn lengths(&self) -> Result<(u64, u64), LogError> {
        let index_len = self.index.metadata().map_err(|e| self.index_err(e))?.len();
        let data_len = self.data.metadata().map_err(|e| self.data_err(e))?.len();
        Ok((index_len, data_len))
    }

    /// Reads whole entries starting at entry `first` into `buf`.
    pub fn read_index(&self, first: u64, buf: &mut [u8]) -> Result<(), LogError> {
        let pos = first
            .checked_mul(ENTRY_LEN as u64)
            .ok_or_else(|| self.index_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        self.index.read_exact_at(buf, pos).map_err(|e| self.index_err(e))
    }

    pub fn entry(&self, i: u64) -> Result<IndexEntry, LogError> {
        let mut b = [0u8; ENTRY_LEN];
        self.read_index(i, &mut b)?;
        Ok(IndexEntry::decode(&b))
    }

    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<(), LogError> {
        self.data.read_exact_at(buf, offset).map_err(|e| self.data_err(e))
    }

    /// Finds the longest trusted prefix of the log. Only the last entry is
    /// checked (records are appended in order, so a good last entry vouches
    /// for the ones before it); a bad one is dropped and the one before it
    /// checked, in chunks so a zero-filled tail does not cost a read per entry.
    ///
    /// An entry is trusted when it is whole, its offset lies past the previous
    /// entry's record header (offset 0 for line 0), its record is whole within
    /// `log.bin`, and the record header repeats the entry's timestamp and
    /// names a known source. The extra checks reject zero-filled entries that
    /// would otherwise point at record 0 and make a restarted writer cut
    /// `log.bin` back to one line.
    pub fn valid_extent(&self) -> Result<Extent, LogError> {
        let (index_len, data_len) = self.lengths()?;
        let mut n = index_len / ENTRY_LEN as u64;
        let mut chunk = 1u64;
        let mut buf = Vec::new();
        while n > 0 {
            // One entry more than we check, for the previous-offset test.
            let first = n.saturating_sub(chunk + 1);
            let count = (n - first) as usize;
            buf.resize(count * ENTRY_LEN, 0);
            self.read_index(first, &mut buf)?;
            let lowest = if first == 0 { 0 } else { first + 1 };
            for i in (lowest..n).rev() {
                let at = ((i - first) as usize) * ENTRY_LEN;
                let e = IndexEntry::decode(&buf[at..]);
                let offset_ok = if i == 0 {
                    e.offset == 0
                } else {
                    let prev = IndexEntry::decode(&buf[at - ENTRY_LEN..]);
                    prev.offset.checked_add(HEADER_LEN as u64).is_some_and(|min| e.offset >= min)
                };
                if !offset_ok || e.offset.checked_add(HEADER_LEN as u64).is_none_or(|h| h > data_len) {
                    continue;
                }
                let mut hb = [0u8; HEADER_LEN];
                self.read_data(e.offset, &mut hb)?;
                let h = RecordHeader::decode(&hb);
                if let Some(end) = h.end(e.offset)
                    && end <= data_len
                    && h.ts_ms == e.ts_ms
                    && Source::from_byte(h.source).is_some()
                {
                    return Ok(Extent { lines: i + 1, data_end: end, index_len, data_len });
                }
            }
            n = lowest;
            chunk = (chunk * 16).min(TAIL_CHUNK);
        }
        Ok(Extent { lines: 0, data_end: 0, index_len, data_len })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;

    /// Appends raw bytes to a log file, for building torn or corrupt logs.
    pub fn append_raw(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    pub fn record(ts: i64, source: Source, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        RecordHeader { ts_ms: ts, source: source as u8, len: data.len() as u32 }.encode_into(&mut out);
        out.extend_from_slice(data);
        out
    }

    pub fn entry(offset: u64, ts: i64) -> Vec<u8> {
        let mut out = Vec::new();
        IndexEntry { offset, ts_ms: ts }.encode_into(&mut out);
        out
    }

    fn open(dir: &Path) -> LogFiles {
        let (index_path, data_path) = LogFiles::paths(dir);
        LogFiles {
            index: File::open(&index_path).unwrap(),
            data: File::open(&data_path).unwrap(),
            index_path,
            data_path,
        }
    }

    /// Writes `n` well-formed lines "l0".."l{n-1}" with ts = 100 + i.
    fn write_lines(dir: &Path, n: u64) -> u64 {
        let mut data = Vec::new();
        let mut index = Vec::new();
        for i in 0..n {
            index.extend(entry(data.len() as u64, 100 + i as i64));
            data.extend(record(100 + i as i64, Source::Stdout, format!("l{i}").as_bytes()));
        }
        append_raw(&dir.join(DATA_FILE), &data);
        append_raw(&dir.join(INDEX_FILE), &index);
        data.len() as u64
    }

    #[test]
    fn source_names_round_trip() {
        for s in [Source::Stdout, Source::Stderr, Source::Build] {
            assert_eq!(s.as_str().parse::<Source>(), Ok(s));
            assert_eq!(Source::from_byte(s as u8), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(Source::Stdout as u8, 1);
        assert_eq!(Source::Stderr as u8, 2);
        assert_eq!(Source::Build as u8, 3);
        assert_eq!("STDOUT".parse::<Source>(), Err(ParseSourceError("STDOUT".into())));
        assert_eq!(Source::from_byte(0), None);
        assert_eq!(Source::from_byte(4), None);
    }

    #[test]
    fn encoding_matches_the_documented_layout() {
        let r = record(0x0102_0304_0506_0708, Source::Stderr, b"hi");
        assert_eq!(r, [8, 7, 6, 5, 4, 3, 2, 1, 2, 2, 0, 0, 0, b'h', b'i'].to_vec());
        let h = RecordHeader::decode(&r);
        assert_eq!(h.len, 2);
        assert_eq!(h.end(10), Some(10 + 13 + 2));
        let e = entry(0x10, -1);
        assert_eq!(e.len(), ENTRY_LEN);
        assert_eq!(&e[..8], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&e[8..], &[0xff; 8]);
        assert_eq!(IndexEntry::decode(&e), IndexEntry { offset: 0x10, ts_ms: -1 });
    }

    #[test]
    fn extent_of_clean_log_covers_everything() {
        let dir = tempfile::tempdir().unwrap();
        let end = write_lines(dir.path(), 10);
        let x = open(dir.path()).valid_extent().unwrap();
        assert_eq!((x.lines, x.data_end, x.data_len), (10, end, end));
    }

    #[test]
    fn extent_ignores_torn_entry_and_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let end = write_lines(dir.path(), 3);
        // Half an index entry.
        append_raw(&dir.path().join(INDEX_FILE), &[1, 2, 3]);
        assert_eq!(open(dir.path()).valid_extent().unwrap().lines, 3);

        // A whole entry whose record is cut short.
        let dir = tempfile::tempdir().unwrap();
        let end2 = write_lines(dir.path(), 3);
        assert_eq!(end, end2);
        let rec = record(200, Source::Stdout, b"0123456789");
        append_raw(&dir.path().join(DATA_FILE), &rec[..rec.len() - 4]);
        append_raw(&dir.path().join(INDEX_FILE), &entry(end, 200));
        let x = open(dir.path()).valid_extent().unwrap();
        assert_eq!((x.lines, x.data_end), (3, end));
    }

    #[test]
    fn extent_rejects_zero_filled_index_tail() {
        let dir = tempfile::tempdir().unwrap();
        let end = write_lines(dir.path(), 5);
        // As after a power loss: the index grew but its blocks are zeros.
        append_raw(&dir.path().join(INDEX_FILE), &vec![0u8; 16 * 10_000]);
        let x = open(dir.path()).valid_extent().unwrap();
        assert_eq!((x.lines, x.data_end), (5, end));
    }

    #[test]
    fn extent_rejects_entry_whose_timestamp_disagrees() {
        let dir = tempfile::tempdir().unwrap();
        let end = write_lines(dir.path(), 2);
        append_raw(&dir.path().join(DATA_FILE), &record(7, Source::Build, b"x"));
        append_raw(&dir.path().join(INDEX_FILE), &entry(end, 8));
        assert_eq!(open(dir.path()).valid_extent().unwrap().lines, 2);
    }

    #[test]
    fn extent_of_empty_or_garbage_log_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        append_raw(&dir.path().join(DATA_FILE), b"");
        append_raw(&dir.path().join(INDEX_FILE), &[0u8; 15]);
        let x = open(dir.path()).valid_extent().unwrap();
        assert_eq!((x.lines, x.data_end), (0, 0));
        append_raw(&dir.path().join(INDEX_FILE), &[0u8; 17]);
        let x = open(dir.path()).valid_extent().unwrap();
        assert_eq!((x.lines, x.index_len), (0, 32));
    }
}
