//! One budget for every cache under the cache directory, and the disk's health.
//!
//! The caches keep their own formats and locks (see [`crate::cachelock`]): bundles
//! (`bundle/`), venvs and uv's download cache (`env/venv.rs`), unpacked image layers with their
//! image records and images built from Dockerfiles (`env/image/`). Each exposes what it has on
//! disk as [`DiskEntry`]s and evicts one entry by its own protocol, always taking the entry's
//! exclusive lock with `try_exclusive`, so an entry any process uses is never removed. This
//! module puts one policy on top of them:
//! - [`scan`] lists every entry of every kind with its bytes, files and last use (the mtime of
//!   its record, which each use touches);
//! - [`budget`] chooses what to evict: least recently used first, until every [`budget::Limit`]
//!   holds (the total `--cache-size`, per-kind overrides, the space a filesystem under pressure
//!   needs back);
//! - [`pressure`] reads free space and inodes of the worker's filesystems against the
//!   thresholds;
//! - [`janitor`] runs both off the request path, in the worker, on a tick and when a task has
//!   just published something;
//! - [`holders`] says who holds an entry (from `/proc/locks`: a task's supervisor, a worker),
//!   for `iris-worker cache ls` and the dashboard;
//! - [`tools`] are `iris-worker cache ls` and `iris-worker cache prune`.

pub mod budget;
pub mod holders;
pub mod janitor;
pub mod pressure;
pub mod size;
pub mod tools;

use std::collections::HashSet;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use budget::Limit;
pub use janitor::{CacheSettings, CacheStatus, Janitor};
pub use size::{Amount, SizeError};

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

    fn index(self) -> usize {
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
    fn home(&self, kind: Kind) -> PathBuf {
        match kind {
            Kind::Uv => self.cache.join("uv"),
            other => self.locks_root(other),
        }
    }
}

/// Every entry of every cache. With `tidy`, also removes what crashed or interrupted work
/// left behind where no process holds it (half-made entries, records without their entry,
/// evicted trees not yet deleted). Blocking: call off the async threads.
pub fn scan(dirs: &CacheDirs, tidy: bool) -> Vec<Entry> {
    let mut found: Vec<DiskEntry> = Vec::new();
    found.extend(crate::bundle::disk_entries(&dirs.bundles(), tidy));
    found.extend(crate::env::venv::disk_entries(&dirs.venvs(), tidy));
    found.extend(crate::env::venv::uv_entry(&dirs.cache, tidy));
    found.extend(crate::env::image::disk_entries(&dirs.images, tidy));
    let devs: Vec<u64> = Kind::ALL.iter().map(|k| dev_of(&dirs.home(*k))).collect();
    let locks: Vec<crate::cachelock::EntryLocks> =
        Kind::ALL.iter().map(|k| crate::cachelock::EntryLocks::new(&dirs.locks_root(*k))).collect();
    found
        .into_iter()
        .map(|e| Entry {
            dev: devs[e.kind.index()],
            lock: locks[e.kind.index()].path(lock_key(e.kind, &e.key)),
            kind: e.kind,
            key: e.key,
            name: e.name,
            bytes: e.bytes,
            files: e.files,
            last_use: e.last_use,
        })
        .collect()
}

/// The lock key of an entry (uv's cache is one entry under a fixed name).
fn lock_key(kind: Kind, key: &str) -> &str {
    match kind {
        Kind::Uv => crate::env::venv::UV_LOCK_KEY,
        _ => key,
    }
}

/// What is in use right now, as far as can be seen without taking a lock: entries whose lock
/// a process holds (`/proc/locks`), and image layers an overlay mount uses. Eviction takes
/// the exclusive lock anyway; this only lets the budget pass over busy entries.
pub struct InUse {
    held: holders::Held,
    /// The held lock files of the caches' lock directories.
    held_files: HashSet<PathBuf>,
    mounted: HashSet<PathBuf>,
}

impl InUse {
    /// Reads `/proc/locks`, the caches' lock directories and the overlay mounts now.
    pub fn now(dirs: &CacheDirs) -> InUse {
        let held = holders::Held::read();
        let mut held_files = HashSet::new();
        for kind in [Kind::Bundles, Kind::Venvs, Kind::Images] {
            held_files.extend(held.held_in(&dirs.locks_root(kind).join(".locks")));
        }
        InUse { held, held_files, mounted: crate::env::image::overlay::lower_dirs_in_use() }
    }

    /// Whether a process holds `e` or a mount uses it.
    pub fn contains(&self, dirs: &CacheDirs, e: &Entry) -> bool {
        self.held_files.contains(&e.lock) || self.mounted_layer(dirs, e)
    }

    /// Who holds `e` (pids).
    pub fn pids(&self, e: &Entry) -> Vec<i32> {
        self.held.pids(&e.lock)
    }

    /// Whether an overlay mount uses `e` (an image layer).
    pub fn mounted_layer(&self, dirs: &CacheDirs, e: &Entry) -> bool {
        matches!(e.kind, Kind::Images | Kind::Built)
            && self.mounted.contains(&crate::env::image::layer_dir(&dirs.images, &e.key))
    }

    /// The overlay mounts' lower directories.
    pub fn mounts(&self) -> &HashSet<PathBuf> {
        &self.mounted
    }
}

/// Evicts `e` by its cache's protocol if no process uses it: `Ok(Some(bytes))` when it is
/// gone, `Ok(None)` when someone holds it (it stays). Blocking.
pub fn evict(dirs: &CacheDirs, e: &Entry, mounts: &HashSet<PathBuf>) -> std::io::Result<Option<u64>> {
    match e.kind {
        Kind::Bundles => crate::bundle::evict_on_disk(&dirs.bundles(), &e.key),
        Kind::Venvs => crate::env::venv::evict_on_disk(&dirs.venvs(), &e.key),
        Kind::Uv => crate::env::venv::evict_uv(&dirs.cache),
        Kind::Images | Kind::Built => crate::env::image::evict_layer(&dirs.images, &e.key, mounts),
    }
}

/// After layers were evicted: image records that name a missing layer go too (the image is
/// pulled or built again when a task asks for it).
pub fn after_evictions(dirs: &CacheDirs, kinds: &HashSet<Kind>) {
    if kinds.contains(&Kind::Images) || kinds.contains(&Kind::Built) {
        crate::env::image::prune_records(&dirs.images);
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
