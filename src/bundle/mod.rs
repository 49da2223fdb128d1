//! Code bundles: fetched from an object store, verified, safely unzipped, cached.
//!
//! [`BundleCache::get`] turns a bundle path (`file://`, an absolute path, `http(s)://`,
//! `gs://`, `s3://`) into an extracted directory:
//! 1. `fetch`: the object is streamed into a file under the cache's `.tmp/` while its sha256 is
//!    computed (never held whole in memory);
//! 2. the sha256 is checked against the one asked for, if any;
//! 3. `extract`: the zip is unpacked into a temporary directory under the same limits and
//!    checks whatever its headers claim (see [`ExtractLimits`], [`ExtractError`]);
//! 4. `cache`: the directory is renamed into place and recorded.
//!
//! A failure at any step leaves nothing in the cache. Iris treats a bundle path as immutable,
//! so bundles are cached by path, within an LRU bound on total bytes and entries that never
//! evicts a bundle a [`Bundle`] still holds. Concurrent `get`s of one path fetch it once: the
//! first starts the fetch as its own task, and every caller (the first included) follows it,
//! seeing its phases and its result.
//!
//! ```no_run
//! # async fn example() -> Result<(), iris_worker::bundle::BundleError> {
//! use iris_worker::bundle::{BundleCache, BundleConfig};
//! let cache = BundleCache::new(BundleConfig::new("/var/cache/iris-worker/bundles"))?;
//! let bundle = cache
//!     .get("gs://bucket/bundles/abc.zip", None, |phase| println!("{phase}"))
//!     .await?;
//! println!("{} ({} bytes)", bundle.path().display(), bundle.size_bytes());
//! # Ok(()) }
//! ```

mod cache;
mod extract;
pub(crate) mod fetch;
pub mod sources;

use std::fmt;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures::FutureExt;
use tokio::sync::watch;

use crate::cachelock::Acquired;
#[cfg(test)]
pub(crate) use cache::key_for as cache_key;
use cache::{Disk, Entry, Index, Lookup, key_for};
pub(crate) use cache::{disk_entries, evict_on_disk};
pub use extract::{ExtractError, ExtractLimits, Extracted, RATIO_FLOOR, extract};
pub use sources::{ControllerSource, SourcePolicy};

/// Where and how much a [`BundleCache`] keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleConfig {
    /// The cache directory (worker processes may share it: see [`crate::cachelock`]).
    pub dir: PathBuf,
    /// Total extracted bytes the cache keeps before evicting.
    pub max_bytes: u64,
    /// Bundles the cache keeps before evicting.
    pub max_entries: usize,
    /// Bounds on each bundle's extraction.
    pub limits: ExtractLimits,
    /// Where bundles may come from ([`sources`]).
    pub sources: SourcePolicy,
}

impl BundleConfig {
    /// `dir` with the defaults: 20 GiB, 256 bundles, [`ExtractLimits::default`], no `file://`
    /// directory and public http(s) hosts only.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: 20 << 30,
            max_entries: 256,
            limits: ExtractLimits::default(),
            sources: SourcePolicy::default(),
        }
    }
}

/// The step a `get` is at, for a task's status message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Downloading,
    Verifying,
    Extracting,
}

impl Phase {
    /// "downloading bundle", "verifying bundle", "extracting bundle".
    pub fn message(self) -> &'static str {
        match self {
            Self::Downloading => "downloading bundle",
            Self::Verifying => "verifying bundle",
            Self::Extracting => "extracting bundle",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Why a bundle could not be had. Cloneable, because one fetch's failure is every waiter's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BundleError {
    #[error(
        "bundle path {path:?} is not a location we can fetch (file://, http(s)://, gs://, s3:// or an absolute path): {reason}"
    )]
    BadPath { path: String, reason: String },
    /// The operator does not allow this location (the reason names the flag that would).
    #[error("bundle {path} refused: {reason}")]
    Refused { path: String, reason: sources::Refused },
    #[error("bundle {path}: {given:?} is not a sha256 (64 hex digits)")]
    BadSha256 { path: String, given: String },
    #[error("bundle {path} was not found: {source}")]
    NotFound { path: String, source: Arc<object_store::Error> },
    #[error("downloading bundle {path}: {source}")]
    Fetch { path: String, source: Arc<object_store::Error> },
    #[error("bundle {path} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("bundle {path} has sha256 {actual}, but {expected} was expected")]
    HashMismatch { path: String, expected: String, actual: String },
    #[error("bundle {path} rejected: {source}")]
    Rejected { path: String, source: ExtractError },
    #[error("{what}: {source}")]
    Io { what: String, source: Arc<io::Error> },
    #[error("bundle cache {}: {source}", dir.display())]
    Cache { dir: PathBuf, source: Arc<io::Error> },
    #[error("bundle {path}: {reason}")]
    Internal { path: String, reason: String },
}

/// The state of one fetch, as its followers see it: the phases so far, then its outcome (the
/// bundle itself is in the index).
#[derive(Debug, Clone)]
pub(crate) enum Flight {
    Running(Vec<Phase>),
    Done(Result<(), BundleError>),
}

/// An extracted bundle, kept in the cache for as long as this (or a clone) lives: in this
/// process's index, and, through the entry's shared lock, from every process's eviction.
#[derive(Debug, Clone)]
pub struct Bundle {
    entry: Arc<Entry>,
    from_cache: bool,
    cache: Weak<Inner>,
    /// Taken out on drop, before evicting: our own lock must not keep the entry.
    lease: Option<Arc<crate::cachelock::EntryLock>>,
}

impl Bundle {
    /// The extracted directory.
    pub fn path(&self) -> &Path {
        &self.entry.dir
    }
    /// Bytes of file contents (and symlink targets) in the directory.
    pub fn size_bytes(&self) -> u64 {
        self.entry.bytes
    }
    /// Files, directories and symlinks the archive held.
    pub fn entries(&self) -> u64 {
        self.entry.entries
    }
    /// Lowercase hex sha256 of the archive as fetched.
    pub fn sha256(&self) -> &str {
        &self.entry.sha256
    }
    /// The bundle path it was fetched from.
    pub fn source(&self) -> &str {
        &self.entry.source
    }
    /// Whether this `get` found it ready or waited on another's fetch (no fetch of its own).
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
    /// Its key in the cache directory: the name of its lock and record.
    pub fn key(&self) -> &str {
        &self.entry.key
    }
}

impl Drop for Bundle {
    /// The last holder of a bundle lets the cache evict it if the cache is over its bounds.
    fn drop(&mut self) {
        drop(self.lease.take());
        if let Some(inner) = self.cache.upgrade() {
            let trash = inner.evict(&mut inner.index(), Some(&self.entry));
            dispose(trash);
        }
    }
}

/// Cache totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTotals {
    /// Bundles ready in the cache.
    pub entries: usize,
    /// Their extracted bytes.
    pub bytes: u64,
}

/// The bundle cache. Cheap to clone; clones share one cache.
#[derive(Debug, Clone)]
pub struct BundleCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: BundleConfig,
    disk: Disk,
    index: Mutex<Index>,
}

impl BundleCache {
    /// Opens (or creates) the cache directory, locks it, removes what a crash left half done,
    /// and takes in the bundles already there (evicting down to the bounds).
    pub fn new(config: BundleConfig) -> Result<Self, BundleError> {
        let cache_err = |e| BundleError::Cache { dir: config.dir.clone(), source: Arc::new(e) };
        let (disk, found) = Disk::open(&config.dir).map_err(cache_err)?;
        let mut index = Index::default();
        for entry in found {
            index.insert(Arc::new(entry));
        }
        let inner = Arc::new(Inner { config, disk, index: Mutex::new(index) });
        let trash = inner.evict(&mut inner.index(), None);
        dispose(trash);
        Ok(Self { inner })
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &BundleConfig {
        &self.inner.config
    }

    /// Bundles ready and their bytes.
    pub fn totals(&self) -> CacheTotals {
        let (entries, bytes) = self.inner.index().totals();
        CacheTotals { entries, bytes }
    }

    /// The extracted bundle at `path`, fetched and extracted unless cached. `sha256` (hex),
    /// when given, must match the archive: a mismatch is an error and caches nothing.
    /// `progress` is told each phase as it starts, including phases of a fetch this call waits
    /// on. Runs on a tokio runtime (the fetch is a task of its own, so dropping this future
    /// does not stop a fetch that others may wait on); the future is `Send` when `progress` is.
    pub async fn get(
        &self,
        path: &str,
        sha256: Option<&str>,
        mut progress: impl Fn(Phase),
    ) -> Result<Bundle, BundleError> {
        let expected = match sha256 {
            Some(given) => Some(parse_sha256(path, given)?),
            None => None,
        };
        // The policy holds for cached bundles too: one fetched under an earlier, wider
        // policy is not handed out under a narrower one.
        fetch::check(path, &self.inner.config.sources).await?;
        let key = key_for(path);
        // Another round when the fetch we followed failed on another caller's sha256 (ours may
        // well match), its bundle was evicted before we took it (by the cache budget or another
        // process: then it is fetched again, never a failure), or its task vanished.
        for _ in 0..4 {
            // Follow another caller's fetch, or start one (and be handed its lease).
            let (mut rx, handoff) = {
                let mut index = self.inner.index();
                match index.lookup(&key) {
                    Lookup::Ready(entry) => {
                        if let Some(lease) = self.lease(path, &entry)? {
                            self.inner.disk.touch(&key);
                            return self.hand_out(path, entry, &expected, true, lease);
                        }
                        // Another process evicts or replaced it: fetch (or find) it anew.
                        index.finish(&key, None);
                        let (rx, handoff) = self.start(&mut index, &key, path, &expected);
                        (rx, Some(handoff))
                    }
                    Lookup::Loading(rx) => (rx, None),
                    Lookup::Missing => {
                        let (rx, handoff) = self.start(&mut index, &key, path, &expected);
                        (rx, Some(handoff))
                    }
                }
            };
            match follow(&mut rx, &mut progress).await {
                // Forget the abandoned fetch, and start another.
                None => self.inner.index().forget_abandoned(&key, &rx),
                Some(Ok(())) => {
                    let handed = handoff.as_ref().and_then(|h| h.lock().unwrap_or_else(|p| p.into_inner()).take());
                    // The fetch's result is taken from the index, so that the channel never
                    // holds a reference that would keep the bundle from being evicted.
                    let found = self.inner.index().lookup(&key);
                    if let Lookup::Ready(entry) = found {
                        // The fetch's lease was taken as the entry was found or published:
                        // nothing came in between. A follower takes its own.
                        let (lease, fetched) = match handed {
                            Some(Handoff { lease: Some(lease), fetched }) => (Some(lease), fetched),
                            Some(Handoff { lease: None, fetched }) => (self.lease(path, &entry)?, fetched),
                            None => (self.lease(path, &entry)?, false),
                        };
                        if let Some(lease) = lease {
                            return self.hand_out(path, entry, &expected, !fetched, lease);
                        }
                    }
                }
                Some(Err(BundleError::HashMismatch { expected: theirs, .. }))
                    if handoff.is_none() && Some(&theirs) != expected.as_ref() => {}
                Some(Err(e)) => return Err(e),
            }
        }
        Err(BundleError::Internal {
            path: path.to_owned(),
            reason: "four fetches in a row failed on other callers' sha256, were evicted at once or vanished"
                .to_owned(),
        })
    }

    /// Starts fetching `key` as a task of its own; returns its channel and what it hands over.
    fn start(
        &self,
        index: &mut Index,
        key: &str,
        path: &str,
        expected: &Option<String>,
    ) -> (watch::Receiver<Flight>, Arc<Mutex<Option<Handoff>>>) {
        let (tx, rx) = watch::channel(Flight::Running(Vec::new()));
        index.start(key, rx.clone());
        let handoff = Arc::new(Mutex::new(None));
        let job =
            Job { key: key.to_owned(), path: path.to_owned(), expected: expected.clone(), handoff: handoff.clone() };
        tokio::spawn(run(self.inner.clone(), job, tx));
        (rx, handoff)
    }

    /// The entry's shared lock, taken while its record still proves it whole: `None` when
    /// another process holds it exclusively (evicting it) or evicted it already. Once held, no
    /// process can evict it. A lock that cannot be taken at all is an error, never "evicted".
    fn lease(&self, path: &str, entry: &Arc<Entry>) -> Result<Option<crate::cachelock::EntryLock>, BundleError> {
        let lease = self.inner.disk.locks.try_shared(&entry.key).map_err(|e| BundleError::Io {
            what: format!("locking the cache entry of bundle {path}"),
            source: Arc::new(e),
        })?;
        Ok(lease.filter(|_| self.inner.disk.load(&entry.key).is_some_and(|e| e.sha256 == entry.sha256)))
    }

    /// Forgets bundles this process knows that are no longer on disk (the cache budget, here
    /// or in another process, evicted them) and nobody here holds.
    pub fn forget_missing(&self, on_disk: &std::collections::HashSet<&str>) {
        self.inner.index().forget_missing(on_disk);
    }

    fn hand_out(
        &self,
        path: &str,
        entry: Arc<Entry>,
        expected: &Option<String>,
        from_cache: bool,
        lease: crate::cachelock::EntryLock,
    ) -> Result<Bundle, BundleError> {
        if let Some(expected) = expected
            && *expected != entry.sha256
        {
            return Err(BundleError::HashMismatch {
                path: path.to_owned(),
                expected: expected.clone(),
                actual: entry.sha256.clone(),
            });
        }
        Ok(Bundle { entry, from_cache, cache: Arc::downgrade(&self.inner), lease: Some(Arc::new(lease)) })
    }
}

/// A sha256 as 64 lowercase hex digits.
fn parse_sha256(path: &str, given: &str) -> Result<String, BundleError> {
    let hex = given.trim().to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(BundleError::BadSha256 { path: path.to_owned(), given: given.to_owned() })
    }
}

/// Follows a fetch to its end, telling `progress` each new phase; `None` if the fetch's task
/// vanished without a result (its runtime shut down). (`&mut`, not `&`: the future then needs
/// `progress` to be Send, not Sync.)
async fn follow(rx: &mut watch::Receiver<Flight>, progress: &mut impl Fn(Phase)) -> Option<Result<(), BundleError>> {
    let mut told = 0;
    loop {
        let flight = rx.borrow_and_update().clone();
        match flight {
            Flight::Running(phases) => {
                for phase in phases.iter().skip(told) {
                    progress(*phase);
                }
                told = told.max(phases.len());
            }
            Flight::Done(result) => return Some(result),
        }
        if rx.changed().await.is_err() {
            return match rx.borrow().clone() {
                Flight::Done(result) => Some(result),
                Flight::Running(_) => None,
            };
        }
    }
}

/// One fetch to run.
struct Job {
    key: String,
    path: String,
    expected: Option<String>,
    /// For the `get` that started the fetch.
    handoff: Arc<Mutex<Option<Handoff>>>,
}

/// What a fetch hands the `get` that started it: the entry's shared lock, held since the
/// entry was found or published (`None` in the rare case it could not be kept), and whether
/// this process downloaded it (rather than finding it published by another).
struct Handoff {
    lease: Option<crate::cachelock::EntryLock>,
    fetched: bool,
}

/// Runs a fetch as its own task, so no caller's cancellation cuts it short: records the result
/// in the index, evicts, then tells the followers.
async fn run(inner: Arc<Inner>, job: Job, tx: watch::Sender<Flight>) {
    let result = AssertUnwindSafe(fetch_and_extract(&inner, &job, &tx)).catch_unwind().await.unwrap_or_else(|_| {
        Err(BundleError::Internal { path: job.path.clone(), reason: "its fetch panicked".to_owned() })
    });
    if result.is_err()
        && let Ok(Some(unused)) = inner.disk.locks.try_exclusive(&job.key)
        && inner.disk.load(&job.key).is_none()
    {
        // Nothing was published: no lock file stays behind for it.
        unused.remove();
    }
    let (result, handoff) = match result {
        Ok((entry, handoff)) => (Ok(entry), Some(handoff)),
        Err(e) => (Err(e), None),
    };
    *job.handoff.lock().unwrap_or_else(|p| p.into_inner()) = handoff;
    let trash = {
        let mut index = inner.index();
        index.finish(&job.key, result.as_ref().ok().cloned());
        inner.evict(&mut index, None)
    };
    match &result {
        Ok(entry) => {
            tracing::info!(bundle = %job.path, dir = %entry.dir.display(), bytes = entry.bytes, "bundle ready");
        }
        Err(e) => tracing::warn!(bundle = %job.path, error = %e, "bundle failed"),
    }
    dispose(trash);
    // Let go of the cache and the entry before telling anyone: then a bundle dropped right
    // after `get` returns is evictable, and a cache dropped then releases its directory lock.
    drop(inner);
    tx.send_replace(Flight::Done(result.map(|_| ())));
}

/// Tells the followers a new phase began.
fn enter(tx: &watch::Sender<Flight>, phase: Phase) {
    tx.send_modify(|flight| {
        if let Flight::Running(phases) = flight {
            phases.push(phase);
        }
    });
}

/// Find it published (leased as it is found), or download, verify, extract, commit (and keep
/// the lock shared).
async fn fetch_and_extract(
    inner: &Arc<Inner>,
    job: &Job,
    tx: &watch::Sender<Flight>,
) -> Result<(Arc<Entry>, Handoff), BundleError> {
    let path = job.path.as_str();
    let io_err =
        |what: &str, e: io::Error| BundleError::Io { what: format!("{what} for bundle {path}"), source: Arc::new(e) };
    let location = fetch::locate(path, &inner.config.sources)?;
    // One fetch per bundle across the worker processes sharing this cache: the others wait
    // here, then find it published.
    let (finder, key) = (inner.clone(), job.key.clone());
    let publishing = match inner
        .disk
        .locks
        .lease_or_make(&job.key, move || finder.disk.load(&key))
        .await
        .map_err(|e| io_err("locking the cache entry", e))?
    {
        Acquired::Published(entry, lease) => {
            return Ok((Arc::new(entry), Handoff { lease: Some(lease), fetched: false }));
        }
        Acquired::Make(publishing) => publishing,
    };
    let tmp = inner.disk.tmp();
    let download = tempfile::Builder::new()
        .prefix(&format!("{}-", job.key))
        .suffix(".zip")
        .tempfile_in(&tmp)
        .map_err(|e| io_err("creating a download file", e))?;
    let file = download.reopen().map_err(|e| io_err("opening the download file", e))?;
    enter(tx, Phase::Downloading);
    let limits = inner.config.limits;
    // The archive can't be much bigger than what it expands to: deflate adds a fraction of a
    // percent to incompressible data, and each entry some headers.
    let max_download = limits
        .max_total_bytes
        .saturating_add(limits.max_total_bytes / 64)
        .saturating_add(limits.max_entries.saturating_mul(1024));
    let got = fetch::download(path, &location, file, max_download).await?;
    enter(tx, Phase::Verifying);
    if let Some(expected) = &job.expected
        && *expected != got.sha256
    {
        return Err(BundleError::HashMismatch {
            path: path.to_owned(),
            expected: expected.clone(),
            actual: got.sha256,
        });
    }
    enter(tx, Phase::Extracting);
    let inner = inner.clone();
    let (key, source) = (job.key.clone(), job.path.clone());
    tokio::task::spawn_blocking(move || {
        let path = source.as_str();
        let io_err = |what: &str, e: io::Error| BundleError::Io {
            what: format!("{what} for bundle {path}"),
            source: Arc::new(e),
        };
        let dest = tempfile::Builder::new()
            .prefix(&format!("{key}-"))
            .tempdir_in(&tmp)
            .map_err(|e| io_err("creating the extraction directory", e))?;
        let done = extract(download.path(), dest.path(), &limits)
            .map_err(|source| BundleError::Rejected { path: path.to_owned(), source })?;
        drop(download);
        std::fs::set_permissions(dest.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| io_err("opening the extracted directory to all", e))?;
        let entry = inner
            .disk
            .commit(&key, dest.path(), path, &got.sha256, done.bytes, done.entries)
            .map_err(|e| io_err("moving the extracted directory into the cache", e))?;
        let _moved = dest.keep();
        // Made: now used, as any user of it (shared); the record proves it whole.
        let lease = publishing.downgrade().ok().flatten();
        Ok((Arc::new(entry), Handoff { lease, fetched: true }))
    })
    .await
    .map_err(|e| BundleError::Internal { path: job.path.clone(), reason: format!("the extraction task failed: {e}") })?
}

impl Inner {
    fn index(&self) -> MutexGuard<'_, Index> {
        // A panic elsewhere while the lock was held leaves the index consistent enough: every
        // update is a few field writes.
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Evicts down to the bounds (with `releasing`, a Bundle being dropped, counted as idle),
    /// moving each evicted directory into `.tmp/` while the index is locked so a new fetch of
    /// the same path can't race its removal. Returns what to delete.
    fn evict(&self, index: &mut Index, releasing: Option<&Arc<Entry>>) -> Vec<PathBuf> {
        let gone = index.evict(self.config.max_bytes, self.config.max_entries, releasing);
        let mut trash = Vec::with_capacity(gone.len());
        for entry in gone {
            // Only what no process uses: a task of another worker on this cache holds the
            // entry's shared lock, and then it stays (back in the index, as just used).
            let evicting = match self.disk.locks.try_exclusive(&entry.key) {
                Ok(Some(evicting)) => evicting,
                Ok(None) => {
                    index.insert(entry);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(bundle = %entry.source, error = %e, "locking a bundle to evict it");
                    index.insert(entry);
                    continue;
                }
            };
            match self.disk.retire(&entry) {
                Ok(dir) => trash.push(dir),
                Err(e) => tracing::warn!(bundle = %entry.source, error = %e, "evicting a bundle"),
            }
            evicting.remove();
            tracing::debug!(bundle = %entry.source, bytes = entry.bytes, "bundle evicted");
        }
        trash
    }
}

/// Deletes evicted directories: on the blocking pool inside a runtime, else right here.
fn dispose(trash: Vec<PathBuf>) {
    if trash.is_empty() {
        return;
    }
    let remove = move || {
        for dir in trash {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "removing an evicted bundle");
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => drop(handle.spawn_blocking(remove)),
        Err(_) => remove(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_can_be_spawned_with_a_progress_that_is_send_but_not_sync() {
        fn assert_send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let cache = BundleCache::new(BundleConfig::new(dir.path())).unwrap();
        let counter = std::cell::Cell::new(0);
        let future = cache.get("/nonexistent.zip", None, move |_| counter.set(counter.get() + 1));
        assert_send(&future);
    }

    /// Another worker process on the cache evicts the bundle whenever nobody holds it (finding
    /// 4): every get still succeeds, and what it hands out stays on disk while it is held (the
    /// lease is taken as the bundle is found or published, with no gap for an eviction).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bundle_evicted_at_any_moment_is_never_a_failure_nor_gone_while_held() {
        use std::io::Write;
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("b.zip");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&src).unwrap());
        z.start_file("f", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(b"contents").unwrap();
        z.finish().unwrap();
        let root = work.path().join("cache");
        let sources = SourcePolicy { allowed_dirs: vec![work.path().to_path_buf()], ..SourcePolicy::default() };
        let config = BundleConfig { sources, ..BundleConfig::new(&root) };
        let caches = [BundleCache::new(config.clone()).unwrap(), BundleCache::new(config).unwrap()];
        let path = src.to_str().unwrap().to_owned();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let evictor = {
            let (root, key, stop) = (root.clone(), key_for(&path), stop.clone());
            std::thread::spawn(move || {
                let mut evicted = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(Some(_)) = evict_on_disk(&root, &key) {
                        evicted += 1;
                    }
                }
                evicted
            })
        };
        for round in 0..300 {
            let cache = &caches[round % 2];
            let bundle = cache.get(&path, None, |_| {}).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
            let read = std::fs::read(bundle.path().join("f"));
            assert_eq!(read.ok().as_deref(), Some(&b"contents"[..]), "round {round}: evicted while held");
            drop(bundle);
            // Let this process's index forget it, as the cache budget's scan would.
            cache.forget_missing(&Default::default());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(evictor.join().unwrap() > 0, "the other process did evict");
    }

    #[test]
    fn phases_read_as_status_messages() {
        assert_eq!(Phase::Downloading.to_string(), "downloading bundle");
        assert_eq!(Phase::Verifying.to_string(), "verifying bundle");
        assert_eq!(Phase::Extracting.message(), "extracting bundle");
    }

    #[test]
    fn sha256_must_be_64_hex_digits() {
        let upper = "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824";
        assert_eq!(parse_sha256("p", upper).unwrap(), upper.to_ascii_lowercase());
        for bad in ["", "abc", &"g".repeat(64)] {
            let err = parse_sha256("p", bad).unwrap_err();
            assert!(matches!(err, BundleError::BadSha256 { .. }), "{err}");
        }
    }
}
