//! What every cache under the cache directory shares, and the disk's health: the parts of the
//! one budget that know no particular cache (the policy over them all is [`crate::janitor`]).
//!
//! The caches keep their own formats and locks (see [`crate::cachelock`]): bundles
//! (`bundle/`), venvs and uv's download cache (`env/venv.rs`), unpacked image layers with their
//! image records and images built from Dockerfiles (`env/image/`). Each exposes what it has on
//! disk as [`DiskEntry`]s (of a [`Kind`], with [`Records`] of what it read before and
//! [`tree_size`]) and evicts one entry by its own protocol, always taking the entry's
//! exclusive lock with `try_exclusive`, so an entry any process uses is never removed. Here:
//! - [`budget`] chooses what to evict: least recently used first, until every [`budget::Limit`]
//!   holds (the total `--cache-size`, per-kind overrides, the space a filesystem under pressure
//!   needs back);
//! - [`pressure`] reads free space and inodes of the worker's filesystems against the
//!   thresholds;
//! - [`holders`] says which processes hold an entry (from `/proc/locks`), for
//!   `iris-worker cache ls` and the dashboard;
//! - [`status`] is what the janitor last saw and the settings it keeps ([`CacheSettings`]).
//!
//! The caches sit above this module and use it; none of it calls them.

pub mod budget;
pub mod holders;
pub mod pressure;
pub mod size;
pub mod status;

use std::collections::HashSet;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use budget::Limit;
pub use size::{Amount, SizeError};
pub use status::{CacheSettings, CacheStatus, FsStatus, KindStatus};

/// The kinds of cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Extracted code bundles (`<cache>/bundles`).
    Bundles,
    /// Venvs built for bundles (`<cache>/venvs`).
    Venvs,
    /// Unpacked image layers, with the image records that name them (`<image-dir>`).
    Images,
    /// Images built from a bundle's Dockerfile (`<image-dir>`, one layer each).
    Built,
    /// uv's download and build cache (`<cache>/uv`), shared by every venv build: one entry.
    Uv,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Bundles, Kind::Venvs, Kind::Images, Kind::Built, Kind::Uv];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Bundles => "bundles",
            Kind::Venvs => "venvs",
            Kind::Images => "images",
            Kind::Built => "built",
            Kind::Uv => "uv",
        }
    }

    /// The kind named `s` (its name as [`Kind::name`] gives it).
    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("{s:?} is not a cache kind (one of {})", Kind::ALL.map(Kind::name).join(", ")))
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a cache reports of one of its entries on disk.
#[derive(Debug, Clone)]
pub struct DiskEntry {
    pub kind: Kind,
    /// The entry's key in its cache (and the name of its lock).
    pub key: String,
    /// What it is, for people: a bundle's path, `venv:<hash>`, a layer's digest, a built
    /// image's name.
    pub name: String,
    pub bytes: u64,
    /// Files, directories and links (what it costs in inodes).
    pub files: u64,
    /// When a task last used it (the mtime of its record).
    pub last_use: SystemTime,
}

impl DiskEntry {
    /// The entry on the filesystem `dev`, its lock file at `lock`.
    pub fn placed(self, dev: u64, lock: PathBuf) -> Entry {
        let DiskEntry { kind, key, name, bytes, files, last_use } = self;
        Entry { kind, key, name, bytes, files, last_use, dev, lock }
    }
}

/// An entry with where it lives.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub key: String,
    pub name: String,
    pub bytes: u64,
    pub files: u64,
    pub last_use: SystemTime,
    /// The filesystem it is on (`st_dev`).
    pub dev: u64,
    /// Its lock file (it may not exist: nobody ever locked it).
    pub lock: PathBuf,
}

/// Where the caches are: the cache directory and the image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDirs {
    /// `--cache-dir`: `bundles/`, `venvs/`, `uv/`.
    pub cache: PathBuf,
    /// `--image-dir` (`<cache>/images` by default).
    pub images: PathBuf,
}

impl CacheDirs {
    pub fn new(cache: impl Into<PathBuf>, images: impl Into<PathBuf>) -> CacheDirs {
        CacheDirs { cache: cache.into(), images: images.into() }
    }

    pub fn bundles(&self) -> PathBuf {
        self.cache.join("bundles")
    }

    pub fn venvs(&self) -> PathBuf {
        self.cache.join("venvs")
    }

    /// The directory whose `.locks/` holds `kind`'s locks.
    pub fn locks_root(&self, kind: Kind) -> PathBuf {
        match kind {
            Kind::Bundles => self.bundles(),
            Kind::Venvs | Kind::Uv => self.venvs(),
            Kind::Images | Kind::Built => self.images.clone(),
        }
    }

    /// The directory `kind`'s entries are in (its filesystem is theirs).
    pub(crate) fn home(&self, kind: Kind) -> PathBuf {
        match kind {
            Kind::Uv => self.cache.join("uv"),
            other => self.locks_root(other),
        }
    }
}

/// The filesystem `path` is on (its nearest existing ancestor's).
pub fn dev_of(path: &Path) -> u64 {
    let mut p = Some(path);
    while let Some(at) = p {
        if let Ok(m) = std::fs::metadata(at) {
            return m.dev();
        }
        p = at.parent();
    }
    0
}

/// Per-kind counters of this process: hits, misses and evictions.
#[derive(Debug, Default)]
pub struct Counters {
    hits: [std::sync::atomic::AtomicU64; 5],
    misses: [std::sync::atomic::AtomicU64; 5],
    evictions: [std::sync::atomic::AtomicU64; 5],
}

impl Counters {
    /// A task found `kind`'s entry ready (`true`) or had it made (`false`).
    pub fn used(&self, kind: Kind, from_cache: bool) {
        let which = if from_cache { &self.hits } else { &self.misses };
        which[kind.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn evicted(&self, kind: Kind) {
        self.evictions[kind.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (hits, misses, evictions) of `kind`.
    pub fn get(&self, kind: Kind) -> (u64, u64, u64) {
        let load = |a: &[std::sync::atomic::AtomicU64; 5]| a[kind.index()].load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.hits), load(&self.misses), load(&self.evictions))
    }
}

/// What `dir` takes on disk, as `du` counts it (allocated blocks: a venv's many small files
/// take more than their lengths), and how many entries it has, itself included. Symlinks are
/// not followed; hard links are counted once per name (which errs toward evicting).
pub fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0u64, 1u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            files += 1;
            let Ok(m) = e.path().symlink_metadata() else { continue };
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, files)
}

/// Records read by earlier scans, by path and inode. A record's content never changes once it
/// is written (a new one is a new file renamed into place); only its modification time does,
/// with each use. So a scan stats each record (for its last use) and reads and parses only the
/// ones it has not seen: one syscall per entry instead of four or five.
pub(crate) struct Records<T> {
    seen: std::sync::Mutex<Option<std::collections::HashMap<PathBuf, (u64, T)>>>,
}

impl<T: Clone> Records<T> {
    pub(crate) const fn new() -> Records<T> {
        Records { seen: std::sync::Mutex::new(None) }
    }

    /// The record at `path` (whose metadata is `meta`), parsed by `parse` unless seen before.
    pub(crate) fn get(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
        parse: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let ino = meta.ino();
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((i, v)) = seen.as_ref().and_then(|m| m.get(path))
                && *i == ino
            {
                return Some(v.clone());
            }
        }
        let record = parse(&std::fs::read(path).ok()?)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get_or_insert_with(Default::default).insert(path.to_path_buf(), (ino, record.clone()));
        Some(record)
    }

    /// Forgets the records under `root` a scan did not find (`found`).
    pub(crate) fn keep_only(&self, root: &Path, found: &HashSet<PathBuf>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = seen.as_mut() {
            m.retain(|p, _| !p.starts_with(root) || found.contains(p));
        }
    }
}
