//! One budget over every cache: the policy on top of the caches of [`crate::bundle`] and
//! [`crate::env`] (their shared parts are [`crate::cache`]), above them all so that none of
//! them names it.
//!
//! - [`scan`] lists every entry of every kind with its bytes, files and last use (the mtime of
//!   its record, which each use touches); [`evict`] removes one by its cache's protocol;
//!   [`InUse`] is what processes hold and overlay mounts use now;
//! - [`Janitor`] keeps the caches within their budget and the disk out of pressure, off the
//!   request path, in the worker;
//! - [`tools`] are `iris-worker cache ls` and `iris-worker cache prune`.
//!
//! The janitor: every [`TICK`] it reads the filesystems (a few `statvfs` calls). It scans the
//! caches and evicts when a task has just published something ([`Janitor::kick`]; kicks that
//! come faster than twenty times what a scan takes wait for the next tick, so scanning costs at
//! most about 5% of a core however fast tasks start), when a filesystem went below the soft
//! threshold since the last scan, and at least every [`RESCAN`]. A scan lists every entry of
//! every kind, then [`budget::enforce`] evicts the least recently used entries nobody uses
//! until the total budget, the per-kind overrides and the space each filesystem under pressure
//! must give back all hold. Its figures feed `/metrics`, the dashboard, HealthCheck and the
//! heartbeat.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::cache::budget::{self, Limit};
use crate::cache::pressure::{self, Filesystem, Level};
use crate::cache::{
    CacheDirs, CacheSettings, CacheStatus, Counters, DiskEntry, Entry, FsStatus, Kind, KindStatus, holders,
};

pub mod tools;

/// How often the filesystems are read.
pub const TICK: Duration = Duration::from_secs(2);
/// The longest between two scans.
pub const RESCAN: Duration = Duration::from_secs(60);

/// Every entry of every cache. With `tidy`, also removes what crashed or interrupted work
/// left behind where no process holds it (half-made entries, records without their entry,
/// evicted trees not yet deleted). Blocking: call off the async threads.
pub fn scan(dirs: &CacheDirs, tidy: bool) -> Vec<Entry> {
    let mut found: Vec<DiskEntry> = Vec::new();
    found.extend(crate::bundle::disk_entries(&dirs.bundles(), tidy));
    found.extend(crate::env::venv::disk_entries(&dirs.venvs(), tidy));
    found.extend(crate::env::venv::uv_entry(&dirs.cache, tidy));
    found.extend(crate::env::image::disk_entries(&dirs.images, tidy));
    let devs: Vec<u64> = Kind::ALL.iter().map(|k| crate::cache::dev_of(&dirs.home(*k))).collect();
    let locks: Vec<crate::cachelock::EntryLocks> =
        Kind::ALL.iter().map(|k| crate::cachelock::EntryLocks::new(&dirs.locks_root(*k))).collect();
    found
        .into_iter()
        .map(|e| {
            let (dev, lock) = (devs[e.kind.index()], locks[e.kind.index()].path(lock_key(e.kind, &e.key)));
            e.placed(dev, lock)
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

type AfterScan = Box<dyn Fn(&[Entry]) + Send + Sync>;

/// Keeps the caches within budget. Shared by the task manager (which kicks it and asks it
/// whether to refuse tasks) and the web side (which shows its figures).
pub struct Janitor {
    dirs: CacheDirs,
    settings: CacheSettings,
    watch: Vec<(&'static str, PathBuf)>,
    status: Mutex<CacheStatus>,
    kick: Arc<Notify>,
    counters: Counters,
    after_scan: Mutex<Option<AfterScan>>,
    /// When the last scan ran, the worst level after it, and what it took.
    last_scan: Mutex<Option<(Instant, Level, Duration)>>,
    /// A kick not acted on yet (it came too soon after a scan).
    pending: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub scanned: bool,
    pub evicted: Vec<(Kind, String)>,
    pub freed_bytes: u64,
}

impl Janitor {
    /// A janitor for the caches in `dirs` of a worker whose state dir is `state_dir`.
    pub fn new(dirs: CacheDirs, settings: CacheSettings, state_dir: &Path) -> Arc<Janitor> {
        let watch = pressure::watched(state_dir, &dirs.cache, &dirs.images);
        Arc::new(Janitor {
            dirs,
            settings,
            watch,
            status: Mutex::default(),
            kick: Arc::new(Notify::new()),
            counters: Counters::default(),
            after_scan: Mutex::new(None),
            last_scan: Mutex::new(None),
            pending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs the janitor on this tokio runtime until the janitor is dropped or `background`
    /// shuts down.
    pub fn start(self: &Arc<Self>, background: &crate::background::Background) {
        let weak: Weak<Janitor> = Arc::downgrade(self);
        let kick = self.kick.clone();
        self.kick();
        background.spawn(async move {
            loop {
                // Only the notifier is held while waiting: a dropped janitor ends the loop.
                let kicked = tokio::select! {
                    _ = kick.notified() => true,
                    _ = tokio::time::sleep(TICK) => false,
                };
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = tokio::task::spawn_blocking(move || me.pass(kicked)).await {
                    tracing::warn!(error = %e, "the cache janitor's pass failed");
                }
            }
        });
    }

    /// Asks for a scan soon: something was just added to a cache.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn dirs(&self) -> &CacheDirs {
        &self.dirs
    }

    /// Runs `f` with every entry after each scan (the in-process caches forget what another
    /// process or the janitor evicted).
    pub fn after_scan(&self, f: impl Fn(&[Entry]) + Send + Sync + 'static) {
        *lock(&self.after_scan) = Some(Box::new(f));
    }

    /// Why a new task is refused now, if a filesystem is below the hard threshold (read now:
    /// a few `statvfs` calls).
    pub fn refusal(&self) -> Option<String> {
        self.settings.thresholds.refusal_of(&pressure::read(&self.watch))
    }

    /// The last figures, with this process's counters.
    pub fn status(&self) -> CacheStatus {
        let mut s = lock(&self.status).clone();
        if s.kinds.is_empty() {
            s.kinds = Kind::ALL.iter().map(|k| KindStatus { kind: k.name(), ..Default::default() }).collect();
        }
        for k in &mut s.kinds {
            if let Ok(kind) = Kind::parse(k.kind) {
                (k.hits, k.misses, k.evictions) = self.counters.get(kind);
            }
        }
        s
    }

    /// One look: reads the filesystems, and scans and evicts when due (`kicked`, pressure
    /// that rose since the last scan, or [`RESCAN`] passed). Blocking.
    pub fn pass(&self, kicked: bool) -> Pass {
        self.look(kicked, false)
    }

    /// A scan and its evictions now, whenever the last one was (benchmarks, tests). Blocking.
    pub fn scan_now(&self) -> Pass {
        self.look(false, true)
    }

    fn look(&self, kicked: bool, force: bool) -> Pass {
        let filesystems = pressure::read(&self.watch);
        let t = &self.settings.thresholds;
        let worst = filesystems.iter().map(|f| t.level(f)).max().unwrap_or(Level::Ok);
        use std::sync::atomic::Ordering::Relaxed;
        if kicked {
            self.pending.store(true, Relaxed);
        }
        let due = force
            || match *lock(&self.last_scan) {
                None => true,
                Some((at, level, took)) => {
                    let gap = (took * 20).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    (self.pending.load(Relaxed) && at.elapsed() >= gap) || at.elapsed() >= RESCAN || worst > level
                }
            };
        let mut pass = Pass::default();
        let started = Instant::now();
        if due {
            self.pending.store(false, Relaxed);
            pass = self.scan_and_evict(&filesystems);
        }
        let filesystems = if pass.freed_bytes > 0 { pressure::read(&self.watch) } else { filesystems };
        if due {
            // Where the disk stands after this scan's evictions: pressure that rises from
            // there (the disk filling again) is worth another scan at once.
            let after = filesystems.iter().map(|f| t.level(f)).max().unwrap_or(Level::Ok);
            *lock(&self.last_scan) = Some((Instant::now(), after, started.elapsed()));
        }
        let mut status = lock(&self.status);
        status.pressure = t.refusal_of(&filesystems);
        status.filesystems = filesystems.into_iter().map(|fs| FsStatus { level: t.level(&fs), fs }).collect();
        pass
    }

    /// The limits now: the total, the overrides, and what each filesystem under pressure must
    /// give back.
    fn limits(&self, entries: &[Entry], filesystems: &[Filesystem]) -> Vec<Limit> {
        let size_of = |path: &Path| {
            let dev = crate::cache::dev_of(path);
            filesystems.iter().find(|f| f.dev == dev).map(|f| f.size_bytes).unwrap_or_else(|| {
                nix::sys::statvfs::statvfs(path).map(|s| s.blocks() * s.fragment_size()).unwrap_or(u64::MAX)
            })
        };
        let mut limits = vec![Limit::bytes("total", &Kind::ALL, self.settings.size.of(size_of(&self.dirs.cache)))];
        for (kinds, amount) in &self.settings.limits {
            let home = kinds.first().map(|k| self.dirs.home(*k)).unwrap_or_else(|| self.dirs.cache.clone());
            let name = kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("+");
            limits.push(Limit::bytes(name, kinds, amount.of(size_of(&home))));
        }
        for fs in filesystems {
            let Some((bytes, inodes)) = self.settings.thresholds.shortfall(fs) else { continue };
            let on: Vec<&Entry> = entries.iter().filter(|e| e.dev == fs.dev).collect();
            if on.is_empty() {
                continue;
            }
            let (have_bytes, have_files) = on.iter().fold((0u64, 0u64), |(b, f), e| (b + e.bytes, f + e.files));
            limits.push(Limit {
                name: format!("free space on {}", fs.name),
                kinds: Kind::ALL.to_vec(),
                dev: Some(fs.dev),
                max_bytes: have_bytes.saturating_sub(bytes),
                max_files: if inodes > 0 { have_files.saturating_sub(inodes) } else { u64::MAX },
            });
        }
        limits
    }

    fn scan_and_evict(&self, filesystems: &[Filesystem]) -> Pass {
        let started = Instant::now();
        let entries = scan(&self.dirs, true);
        let limits = self.limits(&entries, filesystems);
        let in_use = InUse::now(&self.dirs);
        let mut kinds_evicted = HashSet::new();
        let outcome = budget::enforce(
            &entries,
            &limits,
            |e| in_use.contains(&self.dirs, e),
            |e| match evict(&self.dirs, e, in_use.mounts()) {
                Ok(Some(_)) => {
                    self.counters.evicted(e.kind);
                    kinds_evicted.insert(e.kind);
                    tracing::info!(kind = e.kind.name(), entry = %e.name, bytes = e.bytes, "evicted from the cache");
                    true
                }
                Ok(None) => false,
                Err(err) => {
                    tracing::warn!(kind = e.kind.name(), entry = %e.name, error = %err, "evicting from the cache");
                    false
                }
            },
        );
        after_evictions(&self.dirs, &kinds_evicted);
        if !outcome.still_over.is_empty() {
            tracing::debug!(limits = ?outcome.still_over, "cache limits still over: the rest is in use");
        }
        let gone: HashSet<usize> = outcome.evicted.iter().copied().collect();
        let kept: Vec<Entry> =
            entries.iter().enumerate().filter(|(i, _)| !gone.contains(i)).map(|(_, e)| e.clone()).collect();
        if let Some(f) = lock(&self.after_scan).as_ref() {
            f(&kept);
        }
        let mut kinds: Vec<KindStatus> = Kind::ALL
            .iter()
            .map(|k| KindStatus {
                kind: k.name(),
                limit_bytes: limits.iter().find(|l| l.dev.is_none() && l.kinds == [*k]).map(|l| l.max_bytes),
                ..Default::default()
            })
            .collect();
        for e in &kept {
            let k = &mut kinds[e.kind as usize];
            k.entries += 1;
            k.bytes += e.bytes;
            k.in_use += u64::from(in_use.contains(&self.dirs, e));
        }
        let images = limits.iter().find(|l| l.kinds == [Kind::Images, Kind::Built]).map(|l| l.max_bytes);
        for k in kinds.iter_mut().filter(|k| k.kind == "images" || k.kind == "built") {
            k.limit_bytes = k.limit_bytes.or(images);
        }
        let mut status = lock(&self.status);
        status.total_bytes = kinds.iter().map(|k| k.bytes).sum();
        status.limit_bytes = limits[0].max_bytes;
        status.kinds = kinds;
        status.scanned_at_ms = iris_wire::clock::now_ms();
        status.scan_micros = started.elapsed().as_micros() as u64;
        Pass {
            scanned: true,
            evicted: outcome.evicted.iter().map(|&i| (entries[i].kind, entries[i].name.clone())).collect(),
            freed_bytes: outcome.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Amount;
    use crate::cachelock::EntryLocks;
    use std::time::SystemTime;

    /// An entry of `kind` in its cache's on-disk format, 4 KiB, last used `age_s` ago.
    fn entry(dirs: &CacheDirs, kind: Kind, n: u32, age_s: u64) -> String {
        let (dir, record, json) = match kind {
            Kind::Bundles => {
                let path = format!("file:///b{n}.zip");
                let key = crate::bundle::cache_key(&path);
                let json = serde_json::json!({"path": path, "sha256": "00", "bytes": 4096, "entries": 1});
                (dirs.bundles().join(&key), dirs.bundles().join(format!("{key}.json")), json)
            }
            Kind::Venvs => {
                let key = format!("{n:064x}");
                let json = serde_json::json!({"bytes": 4096, "files": 2});
                (dirs.venvs().join(&key), dirs.venvs().join(format!("{key}.json")), json)
            }
            _ => unreachable!("not used here"),
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), [0u8; 4096]).unwrap();
        std::fs::write(dir.join(".iris-complete"), "").unwrap();
        std::fs::write(&record, json.to_string()).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_s);
        std::fs::File::options().append(true).open(&record).unwrap().set_modified(when).unwrap();
        dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn a_pass_evicts_the_least_recently_used_idle_entries_down_to_the_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = CacheDirs::new(tmp.path().join("cache"), tmp.path().join("cache/images"));
        let oldest_bundle = entry(&dirs, Kind::Bundles, 1, 500);
        let old_venv = entry(&dirs, Kind::Venvs, 2, 400);
        let held_venv = entry(&dirs, Kind::Venvs, 3, 300);
        let newer_bundle = entry(&dirs, Kind::Bundles, 4, 200);
        let newest_venv = entry(&dirs, Kind::Venvs, 5, 100);
        // Room for two entries; the oldest venv but one is held by a "task" of another process.
        // No disk thresholds: on a host whose disk is nearly full the soft one would evict more
        // than the budget does, and this test is about the budget.
        let none = Amount::Bytes(0);
        let thresholds = crate::cache::pressure::Thresholds {
            min_free: none,
            soft_free: none,
            target_free: none,
            min_free_inodes: none,
        };
        let settings = CacheSettings { size: Amount::Bytes(2 * 4096), limits: Vec::new(), thresholds };
        let janitor = Janitor::new(dirs.clone(), settings, &tmp.path().join("state"));
        let lease = EntryLocks::new(&dirs.venvs()).shared(&held_venv).unwrap();
        let pass = janitor.pass(true);
        assert!(pass.scanned);
        let gone: Vec<&str> = pass.evicted.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(gone, ["file:///b1.zip", &format!("venv:{}", &old_venv[..16]), "file:///b4.zip"]);
        assert!(!dirs.bundles().join(&oldest_bundle).exists() && !dirs.bundles().join(&newer_bundle).exists());
        assert!(dirs.venvs().join(&held_venv).exists() && dirs.venvs().join(&newest_venv).exists());
        let status = janitor.status();
        let venvs = status.kinds.iter().find(|k| k.kind == "venvs").unwrap();
        assert_eq!((venvs.entries, venvs.bytes, venvs.in_use, venvs.evictions), (2, 8192, 1, 1));
        assert_eq!(status.limit_bytes, 8192);
        // A kick right after a scan waits (scans are spaced); the next look does it.
        entry(&dirs, Kind::Bundles, 6, 50);
        assert!(!janitor.pass(true).scanned, "too soon after the last scan");
        drop(lease);
        *lock(&janitor.last_scan) = Some((Instant::now() - Duration::from_secs(5), Level::Ok, Duration::ZERO));
        let pass = janitor.pass(false);
        assert!(pass.scanned, "the kick was remembered");
        assert_eq!(pass.evicted.len(), 1, "the venv no longer held, the oldest: {pass:?}");
        assert!(!dirs.venvs().join(&held_venv).exists());
    }
}
