//! Safe extraction of a bundle's zip archive into a fresh directory.
//!
//! Every entry is checked before anything is written: its name must stay inside the bundle (no
//! absolute path, no `..`, no path through a symlink of the archive), its type must be a file, a
//! directory or a symlink whose target stays inside, and the archive must not declare more
//! entries than the limit. Then files and directories are written (each file created new, never
//! following a symlink), counting the bytes actually decompressed against the total and ratio
//! limits so a zip bomb stops at the limit, not at the end; symlinks are created last. The caller
//! extracts into a temporary directory and removes it if this fails.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use zip::ZipArchive;
use zip::result::ZipError;

use crate::archive::{self, EntryPathError, Separators};

/// Bounds on what one bundle may expand to. Every one is checked against what extraction
/// actually produces, not against the sizes an archive's headers claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Total bytes of file contents (and symlink targets) a bundle may expand to.
    pub max_total_bytes: u64,
    /// Entries (files, directories, symlinks) a bundle may hold.
    pub max_entries: u64,
    /// How many times the compressed bytes read so far one entry may expand to, once it is
    /// past [`RATIO_FLOOR`] bytes (small files of repeated text legitimately compress very
    /// well). Checked as it decompresses, so a bomb stops a few megabytes in.
    pub max_ratio: u64,
}

impl Default for ExtractLimits {
    /// 4 GiB, 200,000 entries, 200× (deflate's best case is about 1030×, a source tree's
    /// typical one 3–10×).
    fn default() -> Self {
        Self { max_total_bytes: 4 << 30, max_entries: 200_000, max_ratio: 200 }
    }
}

/// An entry is held to [`ExtractLimits::max_ratio`] only past this many bytes.
pub const RATIO_FLOOR: u64 = 1 << 20;

/// The longest symlink target accepted.
const MAX_LINK_TARGET: u64 = 4096;

/// The copy buffer: big enough that a read + write pair costs little per byte.
const COPY_BUFFER: usize = 256 * 1024;

/// What an extraction produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extracted {
    /// Bytes of file contents and symlink targets written.
    pub bytes: u64,
    /// Entries in the archive (files, directories, symlinks).
    pub entries: u64,
}

/// Why a bundle was rejected or could not be extracted. Each names the entry at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExtractError {
    #[error("not a readable zip archive: {source}")]
    Archive { source: Arc<ZipError> },
    #[error("the archive declares {count} entries, more than the limit of {limit}")]
    TooManyEntries { count: u64, limit: u64 },
    #[error("the archive's entries share compressed data (an overlapping zip bomb)")]
    Overlapping,
    #[error("entry {entry:?} is an absolute path")]
    AbsolutePath { entry: String },
    #[error("entry {entry:?} contains '..', which could escape the bundle")]
    ParentDir { entry: String },
    #[error("entry {entry:?} has an unusable name: {reason}")]
    BadName { entry: String, reason: &'static str },
    #[error("entry {entry:?} is a {kind} (mode {mode:o}); bundles hold only files, directories and symlinks")]
    SpecialFile { entry: String, kind: &'static str, mode: u32 },
    #[error("entry {entry:?} is a symlink to {target:?}, which points outside the bundle")]
    SymlinkEscapes { entry: String, target: String },
    #[error("entry {entry:?} is a symlink with an unusable target: {reason}")]
    BadSymlink { entry: String, reason: &'static str },
    #[error("entry {entry:?} goes through the symlink {link:?} of the same bundle")]
    ThroughSymlink { entry: String, link: String },
    #[error("entry {entry:?} appears twice or clashes with another entry of the same path")]
    Duplicate { entry: String },
    #[error("entry {entry:?} takes the bundle past its limit of {limit} bytes uncompressed")]
    TooManyBytes { entry: String, limit: u64 },
    #[error(
        "entry {entry:?} expands more than {limit}× (to {written} bytes from {compressed} compressed bytes read so far): a zip bomb?"
    )]
    RatioExceeded { entry: String, written: u64, compressed: u64, limit: u64 },
    #[error("entry {entry:?} cannot be read: {source}")]
    Entry { entry: String, source: Arc<ZipError> },
    #[error("entry {entry:?}: {action}: {source}")]
    Io { entry: String, action: &'static str, source: Arc<io::Error> },
}

impl ExtractError {
    fn io(entry: &str, action: &'static str, source: io::Error) -> Self {
        Self::Io { entry: entry.to_owned(), action, source: Arc::new(source) }
    }
    fn entry(entry: &str, source: ZipError) -> Self {
        Self::Entry { entry: entry.to_owned(), source: Arc::new(source) }
    }
}

/// What an entry will become.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { executable: bool },
    Symlink { target: Vec<u8> },
}

/// One checked entry: its index in the archive, its name as written, and its path inside the
/// bundle as normal components.
#[derive(Debug)]
struct Planned {
    index: usize,
    name: String,
    parts: Vec<String>,
    kind: Kind,
}

/// A reader that counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for Counting<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Extracts the zip archive at `archive` into `dest`, an empty directory, within `limits`.
pub fn extract(archive: &Path, dest: &Path, limits: &ExtractLimits) -> Result<Extracted, ExtractError> {
    let open_err = |source: io::Error| ExtractError::Archive { source: Arc::new(ZipError::Io(source)) };
    let mut file = File::open(archive).map_err(open_err)?;
    // Refuse an archive with too many entries before its central directory is parsed: parsing
    // a million entries costs hundreds of megabytes.
    if let Some(count) = declared_entries(&mut file).map_err(open_err)?
        && count > limits.max_entries
    {
        return Err(ExtractError::TooManyEntries { count, limit: limits.max_entries });
    }
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    // The ratio limit compares what an entry expands to with the compressed bytes the
    // decompressor has actually read so far (a header's sizes can lie): `Counting` sits between
    // the zip reader and the buffered file and counts every byte handed over.
    let consumed = Rc::new(Cell::new(0));
    let reader = Counting { inner: BufReader::new(file), count: consumed.clone() };
    let mut zip = ZipArchive::new(reader).map_err(|source| ExtractError::Archive { source: Arc::new(source) })?;
    let count = zip.len() as u64;
    if count > limits.max_entries {
        return Err(ExtractError::TooManyEntries { count, limit: limits.max_entries });
    }
    // Entries sharing compressed data multiply an archive's output with no entry's ratio
    // standing out (the "non-recursive" zip bomb); no tool makes such archives for real files.
    match zip.has_overlapping_files() {
        Ok(false) => {}
        Ok(true) => return Err(ExtractError::Overlapping),
        Err(source) => return Err(ExtractError::Archive { source: Arc::new(source) }),
    }
    let plan = plan(&mut zip)?;
    let mut writer = Writer::new(dest, limits);
    for entry in &plan {
        match &entry.kind {
            Kind::Dir => writer.make_dirs(&entry.name, &entry.parts)?,
            Kind::File { executable } => {
                let mut file = zip.by_index(entry.index).map_err(|e| ExtractError::entry(&entry.name, e))?;
                consumed.set(0);
                writer.write_file(entry, *executable, &consumed, &mut file)?;
            }
            Kind::Symlink { .. } => {}
        }
    }
    for entry in &plan {
        if let Kind::Symlink { target } = &entry.kind {
            writer.make_symlink(entry, target)?;
        }
    }
    Ok(Extracted { bytes: writer.total, entries: count })
}

/// Checks every entry's name and type, reads symlink targets, and returns the entries in order.
fn plan<R: Read + Seek>(zip: &mut ZipArchive<R>) -> Result<Vec<Planned>, ExtractError> {
    let mut plan = Vec::with_capacity(zip.len());
    let mut kinds: HashMap<Vec<String>, bool> = HashMap::new(); // path → is a directory
    for index in 0..zip.len() {
        let file = zip.by_index_data(index).map_err(|source| ExtractError::Archive { source: Arc::new(source) })?;
        let name = match file.name() {
            Ok(name) => name.into_owned(),
            Err(e) => return Err(ExtractError::entry(&String::from_utf8_lossy(file.name_raw()), e)),
        };
        let parts = split_name(&name)?;
        let kind = kind_of(&name, file.unix_mode())?;
        if file.encrypted() {
            return Err(ExtractError::BadName { entry: name, reason: "it is encrypted" });
        }
        if parts.is_empty() {
            // "./" and the like: the bundle's root itself.
            if kind == Kind::Dir {
                continue;
            }
            return Err(ExtractError::BadName { entry: name, reason: "it names no file" });
        }
        let is_dir = kind == Kind::Dir;
        if let Some(was_dir) = kinds.insert(parts.clone(), is_dir)
            && !(was_dir && is_dir)
        {
            return Err(ExtractError::Duplicate { entry: name });
        }
        plan.push(Planned { index, name, parts, kind });
    }
    // Symlink targets are the entries' contents: read them (bounded) now, so that every check
    // is done before the first byte is written.
    for entry in &mut plan {
        if let Kind::Symlink { target } = &mut entry.kind {
            let file = zip.by_index(entry.index).map_err(|e| ExtractError::entry(&entry.name, e))?;
            file.take(MAX_LINK_TARGET + 1)
                .read_to_end(target)
                .map_err(|e| ExtractError::io(&entry.name, "reading the symlink target", e))?;
            if target.len() as u64 > MAX_LINK_TARGET {
                return Err(ExtractError::BadSymlink {
                    entry: entry.name.clone(),
                    reason: "the target is longer than 4096 bytes",
                });
            }
        }
    }
    let links: HashSet<&[String]> =
        plan.iter().filter(|e| matches!(e.kind, Kind::Symlink { .. })).map(|e| e.parts.as_slice()).collect();
    for entry in &plan {
        // Nothing may be placed below a symlink: the kernel would follow it.
        for depth in 1..entry.parts.len() {
            if links.contains(&entry.parts[..depth]) {
                return Err(ExtractError::ThroughSymlink {
                    entry: entry.name.clone(),
                    link: entry.parts[..depth].join("/"),
                });
            }
        }
        if let Kind::Symlink { target } = &entry.kind {
            check_link_target(entry, target, &links)?;
        }
    }
    Ok(plan)
}

/// Splits an entry's name into normal components, rejecting absolute paths and `..` (see
/// [`crate::archive`]). Both `/` and `\` separate components (archives made on Windows use `\`).
fn split_name(name: &str) -> Result<Vec<String>, ExtractError> {
    let bad = |reason| ExtractError::BadName { entry: name.to_owned(), reason };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    match archive::entry_parts(name.as_bytes(), Separators::SlashOrBackslash) {
        // Split at ASCII separators, the parts of a `str` are `str`s.
        Ok(parts) => Ok(parts.into_iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()),
        Err(EntryPathError::Nul) => Err(bad("it contains a NUL byte")),
        Err(EntryPathError::Absolute) => Err(ExtractError::AbsolutePath { entry: name.to_owned() }),
        Err(EntryPathError::ParentDir) => Err(ExtractError::ParentDir { entry: name.to_owned() }),
    }
}

const S_IFMT: u32 = 0o170_000;
const S_IFSOCK: u32 = 0o140_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFREG: u32 = 0o100_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFIFO: u32 = 0o010_000;

/// What an entry is, from its unix mode (the high half of the external attributes) when the
/// archive was made on unix, else from its name.
fn kind_of(name: &str, mode: Option<u32>) -> Result<Kind, ExtractError> {
    let trailing_slash = name.ends_with('/') || name.ends_with('\\');
    let Some(mode) = mode else {
        return Ok(if trailing_slash { Kind::Dir } else { Kind::File { executable: false } });
    };
    let special = |kind| ExtractError::SpecialFile { entry: name.to_owned(), kind, mode };
    match mode & S_IFMT {
        S_IFCHR => Err(special("character device")),
        S_IFBLK => Err(special("block device")),
        S_IFIFO => Err(special("fifo")),
        S_IFSOCK => Err(special("socket")),
        S_IFLNK if trailing_slash => {
            Err(ExtractError::BadSymlink { entry: name.to_owned(), reason: "its name ends with a slash" })
        }
        S_IFLNK => Ok(Kind::Symlink { target: Vec::new() }),
        S_IFDIR => Ok(Kind::Dir),
        S_IFREG | 0 if trailing_slash => Ok(Kind::Dir),
        S_IFREG | 0 => Ok(Kind::File { executable: mode & 0o111 != 0 }),
        _ => Err(special("file of unknown type")),
    }
}

/// Resolves a symlink's target as the kernel would, from the link's directory, and rejects it
/// if it leaves the bundle. A target that passes through another symlink of the bundle is
/// rejected too: `a/..` is not the directory holding `a` when `a` is a symlink, so no lexical
/// check could vouch for it.
fn check_link_target(entry: &Planned, target: &[u8], links: &HashSet<&[String]>) -> Result<(), ExtractError> {
    let shown = String::from_utf8_lossy(target).into_owned();
    let escapes = || ExtractError::SymlinkEscapes { entry: entry.name.clone(), target: shown.clone() };
    if target.is_empty() {
        return Err(ExtractError::BadSymlink { entry: entry.name.clone(), reason: "it is empty" });
    }
    if target.contains(&0) {
        return Err(ExtractError::BadSymlink { entry: entry.name.clone(), reason: "the target contains a NUL byte" });
    }
    if target.starts_with(b"/") {
        return Err(escapes());
    }
    let mut at: Vec<String> = entry.parts[..entry.parts.len() - 1].to_vec();
    let parts: Vec<&[u8]> = target.split(|b| *b == b'/').filter(|p| !p.is_empty() && *p != b".").collect();
    for (i, part) in parts.iter().enumerate() {
        if *part == b".." {
            if at.pop().is_none() {
                return Err(escapes());
            }
            continue;
        }
        at.push(String::from_utf8_lossy(part).into_owned());
        let last = i + 1 == parts.len();
        if !last && links.contains(at.as_slice()) {
            return Err(ExtractError::ThroughSymlink { entry: entry.name.clone(), link: at.join("/") });
        }
    }
    Ok(())
}

/// Writes entries below `root`, counting bytes against the limits.
struct Writer<'a> {
    root: &'a Path,
    limits: &'a ExtractLimits,
    total: u64,
    /// Directories known to exist (made by us), so a thousand files in one directory cost one
    /// `mkdir` each, not one per ancestor.
    made: HashSet<PathBuf>,
    buffer: Vec<u8>,
}

impl<'a> Writer<'a> {
    fn new(root: &'a Path, limits: &'a ExtractLimits) -> Self {
        Self { root, limits, total: 0, made: HashSet::new(), buffer: vec![0; COPY_BUFFER] }
    }

    /// Makes the directory `parts` and its missing ancestors, each a real directory (no
    /// symlink exists yet while files and directories are written).
    fn make_dirs(&mut self, name: &str, parts: &[String]) -> Result<(), ExtractError> {
        let mut path = self.root.to_path_buf();
        for part in parts {
            path.push(part);
            if self.made.contains(&path) {
                continue;
            }
            match fs::create_dir(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map_err(|e| ExtractError::io(name, "setting a directory's mode", e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_dir());
                    if !is_dir {
                        return Err(ExtractError::Duplicate { entry: name.to_owned() });
                    }
                }
                Err(e) => return Err(ExtractError::io(name, "creating a directory", e)),
            }
            self.made.insert(path.clone());
        }
        Ok(())
    }

    /// Creates the file new (never through a symlink, never over an existing file) and copies
    /// the entry's contents into it, stopping as soon as a limit is passed.
    fn write_file(
        &mut self,
        entry: &Planned,
        executable: bool,
        consumed: &Cell<u64>,
        contents: &mut impl Read,
    ) -> Result<(), ExtractError> {
        let name = entry.name.as_str();
        let (parent, _) = entry.parts.split_at(entry.parts.len() - 1);
        self.make_dirs(name, parent)?;
        let path: PathBuf = entry.parts.iter().fold(self.root.to_path_buf(), |p, c| p.join(c));
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ExtractError::Duplicate { entry: name.to_owned() },
                _ => ExtractError::io(name, "creating a file", e),
            })?;
        let mut written: u64 = 0;
        loop {
            let n = match contents.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ExtractError::io(name, "decompressing", e)),
            };
            written += n as u64;
            self.total += n as u64;
            if self.total > self.limits.max_total_bytes {
                return Err(ExtractError::TooManyBytes { entry: name.to_owned(), limit: self.limits.max_total_bytes });
            }
            let compressed = consumed.get();
            if written > RATIO_FLOOR && written / compressed.max(1) >= self.limits.max_ratio {
                return Err(ExtractError::RatioExceeded {
                    entry: name.to_owned(),
                    written,
                    compressed,
                    limit: self.limits.max_ratio,
                });
            }
            out.write_all(&self.buffer[..n]).map_err(|e| ExtractError::io(name, "writing a file", e))?;
        }
        let mode = if executable { 0o755 } else { 0o644 };
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ExtractError::io(name, "setting a file's mode", e))?;
        Ok(())
    }

    /// Creates a symlink whose target was checked to stay inside the bundle.
    fn make_symlink(&mut self, entry: &Planned, target: &[u8]) -> Result<(), ExtractError> {
        let name = entry.name.as_str();
        self.total += target.len() as u64;
        if self.total > self.limits.max_total_bytes {
            return Err(ExtractError::TooManyBytes { entry: name.to_owned(), limit: self.limits.max_total_bytes });
        }
        let (parent, _) = entry.parts.split_at(entry.parts.len() - 1);
        self.make_dirs(name, parent)?;
        let path: PathBuf = entry.parts.iter().fold(self.root.to_path_buf(), |p, c| p.join(c));
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ExtractError::Duplicate { entry: name.to_owned() },
            _ => ExtractError::io(name, "creating a symlink", e),
        })
    }
}

/// The entry count an archive's end-of-central-directory record declares (its zip64 record's
/// when there is one), or `None` when no such record is found (the zip reader then says why).
fn declared_entries(file: &mut File) -> io::Result<Option<u64>> {
    const EOCD: &[u8] = &[0x50, 0x4b, 0x05, 0x06];
    const EOCD64_LOCATOR: &[u8] = &[0x50, 0x4b, 0x06, 0x07];
    const EOCD64: &[u8] = &[0x50, 0x4b, 0x06, 0x06];
    let len = file.seek(SeekFrom::End(0))?;
    // The record is 22 bytes plus a comment of at most 65535 bytes, at the end of the file.
    let tail_len = len.min(22 + 65_535 + 20);
    let start = len - tail_len;
    file.seek(SeekFrom::Start(start))?;
    let mut tail = vec![0; tail_len as usize];
    file.read_exact(&mut tail)?;
    let Some(at) = (0..tail.len().saturating_sub(21)).rev().find(|&i| &tail[i..i + 4] == EOCD) else {
        return Ok(None);
    };
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let total = u16_at(&tail, at + 10);
    if total != 0xffff {
        return Ok(Some(u64::from(total)));
    }
    // Zip64: a 20-byte locator right before the record gives the zip64 record's offset.
    if at < 20 || &tail[at - 20..at - 16] != EOCD64_LOCATOR {
        return Ok(Some(u64::from(total)));
    }
    let mut offset = [0; 8];
    offset.copy_from_slice(&tail[at - 12..at - 4]);
    let offset = u64::from_le_bytes(offset);
    if offset.saturating_add(40) > len {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut record = [0; 40];
    file.read_exact(&mut record)?;
    if &record[..4] != EOCD64 {
        return Ok(None);
    }
    let mut total = [0; 8];
    total.copy_from_slice(&record[32..40]);
    Ok(Some(u64::from_le_bytes(total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn names(entries: &[(&str, Option<u32>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        for (name, mode) in entries {
            let mut options = SimpleFileOptions::default();
            if let Some(mode) = mode {
                options = options.unix_permissions(*mode);
            }
            w.start_file(*name, options).unwrap();
            w.write_all(b"x").unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn run(zip_bytes: &[u8], limits: &ExtractLimits) -> (tempfile::TempDir, Result<Extracted, ExtractError>) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("b.zip");
        fs::write(&archive, zip_bytes).unwrap();
        let dest = dir.path().join("out");
        fs::create_dir(&dest).unwrap();
        let result = extract(&archive, &dest, limits);
        (dir, result)
    }

    #[test]
    fn names_split_into_normal_parts() {
        assert_eq!(split_name("a/./b//c").unwrap(), ["a", "b", "c"]);
        assert_eq!(split_name("a\\b").unwrap(), ["a", "b"]);
        assert!(split_name("./").unwrap().is_empty());
        assert!(matches!(split_name("/etc/passwd"), Err(ExtractError::AbsolutePath { .. })));
        assert!(matches!(split_name("\\x"), Err(ExtractError::AbsolutePath { .. })));
        assert!(matches!(split_name("C:/x"), Err(ExtractError::AbsolutePath { .. })));
        assert!(matches!(split_name("a/../../x"), Err(ExtractError::ParentDir { .. })));
        assert!(matches!(split_name("a\\..\\x"), Err(ExtractError::ParentDir { .. })));
        assert!(matches!(split_name(""), Err(ExtractError::BadName { .. })));
        // A name that merely starts with dots is an ordinary name.
        assert_eq!(split_name("..a/b..").unwrap(), ["..a", "b.."]);
    }

    #[test]
    fn kinds_come_from_the_unix_mode() {
        assert_eq!(kind_of("d/", None).unwrap(), Kind::Dir);
        assert_eq!(kind_of("f", None).unwrap(), Kind::File { executable: false });
        assert_eq!(kind_of("f", Some(0o100755)).unwrap(), Kind::File { executable: true });
        assert_eq!(kind_of("d", Some(0o040755)).unwrap(), Kind::Dir);
        assert!(matches!(kind_of("l", Some(0o120777)).unwrap(), Kind::Symlink { .. }));
        for (mode, kind) in
            [(0o020644, "character device"), (0o060644, "block device"), (0o010644, "fifo"), (0o140644, "socket")]
        {
            match kind_of("x", Some(mode)) {
                Err(ExtractError::SpecialFile { kind: k, .. }) => assert_eq!(k, kind),
                other => panic!("{mode:o}: {other:?}"),
            }
        }
    }

    fn planned(name: &str) -> Planned {
        Planned {
            index: 0,
            name: name.to_owned(),
            parts: split_name(name).unwrap(),
            kind: Kind::Symlink { target: Vec::new() },
        }
    }

    #[test]
    fn link_targets_resolve_from_the_links_directory() {
        let none = HashSet::new();
        let ok = |name: &str, target: &str| check_link_target(&planned(name), target.as_bytes(), &none);
        assert!(ok("a/l", "../b").is_ok());
        assert!(ok("a/b/l", "../../c/d").is_ok());
        assert!(ok("l", "x/../y").is_ok());
        assert!(matches!(ok("l", "../x"), Err(ExtractError::SymlinkEscapes { .. })));
        assert!(matches!(ok("a/l", "../../x"), Err(ExtractError::SymlinkEscapes { .. })));
        assert!(matches!(ok("l", "/etc"), Err(ExtractError::SymlinkEscapes { .. })));
        assert!(matches!(ok("l", "x/../../y"), Err(ExtractError::SymlinkEscapes { .. })));
        // Through another link: `m/..` is not the bundle's root when m points deeper.
        let m = vec!["m".to_owned()];
        let links: HashSet<&[String]> = [m.as_slice()].into_iter().collect();
        let err = check_link_target(&planned("l"), b"m/../x", &links).unwrap_err();
        assert!(matches!(err, ExtractError::ThroughSymlink { .. }), "{err}");
        // Naming another link as the final component is fine (each is checked on its own).
        assert!(check_link_target(&planned("l"), b"m", &links).is_ok());
    }

    #[test]
    fn a_plain_archive_extracts_with_modes() {
        let bytes = names(&[("a/b.txt", Some(0o644)), ("run.sh", Some(0o755)), ("c/", None)]);
        let (dir, result) = run(&bytes, &ExtractLimits::default());
        let got = result.unwrap();
        assert_eq!(got, Extracted { bytes: 2, entries: 3 });
        let out = dir.path().join("out");
        assert_eq!(fs::read(out.join("a/b.txt")).unwrap(), b"x");
        let mode = |p: &str| fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(mode("a/b.txt"), 0o644);
        assert!(out.join("c").is_dir());
    }

    #[test]
    fn duplicates_are_rejected() {
        let mut w = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        w.start_file("a", SimpleFileOptions::default()).unwrap();
        w.add_directory("a/", SimpleFileOptions::default()).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let (_dir, result) = run(&bytes, &ExtractLimits::default());
        assert!(matches!(result, Err(ExtractError::Duplicate { .. })), "{result:?}");
    }

    #[test]
    fn the_declared_entry_count_is_read_from_the_end_record() {
        let bytes = names(&[("a", None), ("b", None), ("c", None)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.zip");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(declared_entries(&mut File::open(&path).unwrap()).unwrap(), Some(3));
        fs::write(&path, b"not a zip").unwrap();
        assert_eq!(declared_entries(&mut File::open(&path).unwrap()).unwrap(), None);
        let limits = ExtractLimits { max_entries: 2, ..ExtractLimits::default() };
        let (_dir, result) = run(&bytes, &limits);
        assert!(matches!(result, Err(ExtractError::TooManyEntries { count: 3, limit: 2 })));
    }

    #[test]
    fn entries_sharing_data_are_rejected() {
        let mut w = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        w.start_file("a", SimpleFileOptions::default()).unwrap();
        w.write_all(&[0; 4096]).unwrap();
        for i in 0..3 {
            w.shallow_copy_file("a", &format!("copy{i}")).unwrap();
        }
        let bytes = w.finish().unwrap().into_inner();
        let (_dir, result) = run(&bytes, &ExtractLimits::default());
        assert!(matches!(result, Err(ExtractError::Overlapping)), "{result:?}");
    }

    #[test]
    fn garbage_is_not_an_archive() {
        let (_dir, result) = run(b"PK but not really", &ExtractLimits::default());
        let err = result.unwrap_err();
        assert!(matches!(err, ExtractError::Archive { .. }), "{err}");
    }
}
