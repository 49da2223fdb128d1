//! The cache's directory and its in-memory index.
//!
//! On disk, under the cache directory (which several worker processes may share):
//! ```text
//! .locks/          per-entry locks (see crate::cachelock): shared while a task uses a bundle,
//!                  exclusive while it is fetched and published, or evicted; and one per
//!                  process's temp dir
//! .tmp/<id>/       one process's downloads and extractions in progress; removed (with its
//!                  lock file) when the process closes the cache, and a dead process's by the
//!                  next process to open it
//! <key>/           an extracted bundle (key: sha256 of its path)
//! <key>.json       its record (path, sha256, bytes, entries); written last, removed first
//! ```
//! A bundle directory without its record, found while nobody holds its lock, is a crash's
//! leftover and is removed at start (with its lock file), or moved aside by the next publisher
//! of its key, so an entry is in the cache exactly when its record exists. A record's
//! modification time is its
//! bundle's last use, so a restarted cache keeps the LRU order. In memory, [`Index`] keeps every
//! bundle with its last use, the ones being fetched, and the totals the LRU bounds apply to.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::Flight;
use crate::cachelock::{EntryLock, EntryLocks};

/// One extracted bundle.
#[derive(Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub source: String,
    pub dir: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub entries: u64,
}

/// The record beside a bundle's directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    path: String,
    sha256: String,
    bytes: u64,
    entries: u64,
}

/// The cache key of a bundle path: hex sha256 of the path.
pub(crate) fn key_for(path: &str) -> String {
    hex::encode(Sha256::digest(path.as_bytes()))
}

/// Removes the `.tmp/` entries of processes that are gone: a live process holds its temp
/// dir's lock, so what nobody holds is a dead one's.
fn remove_dead_tmp(root: &Path, locks: &EntryLocks) -> io::Result<()> {
    let tmp_root = root.join(".tmp");
    fs::create_dir_all(&tmp_root)?;
    for item in fs::read_dir(&tmp_root)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if let Some(dead) = locks.try_exclusive(&format!("tmp-{name}"))? {
            let path = item.path();
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            match removed {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            dead.remove();
        }
    }
    Ok(())
}

/// A new directory of this process under `.tmp/`, locked first (so no other process takes
/// it for a dead one's while it is made) and held for as long as the lock lives.
fn private_tmp(root: &Path, locks: &EntryLocks, what: &str) -> io::Result<(PathBuf, EntryLock)> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp_root = root.join(".tmp");
    fs::create_dir_all(&tmp_root)?;
    loop {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{what}-{seq}-{nanos:08x}", std::process::id());
        let Some(lock) = locks.try_exclusive(&format!("tmp-{name}"))? else { continue };
        let dir = tmp_root.join(&name);
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((dir, lock)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                lock.remove();
                return Err(e);
            }
        }
    }
}

/// The bundles recorded under `root`, with their records' modification times (last use).
/// With `tidy`, a bad record, and a directory without its record, go when nobody holds their
/// lock (a publisher holds it between the directory's rename and the record's).
fn read_records(root: &Path, locks: &EntryLocks, tidy: bool) -> io::Result<Vec<(Option<SystemTime>, Entry)>> {
    static RECORDS: crate::cache::Records<Record> = crate::cache::Records::new();
    let mut records = Vec::new();
    let mut dirs = std::collections::HashMap::new();
    for item in fs::read_dir(root)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        match name.strip_suffix(".json") {
            Some(key) => records.push((key.to_owned(), item)),
            None => {
                let is_dir = item.file_type().is_ok_and(|t| t.is_dir());
                dirs.insert(name, (item.path(), is_dir));
            }
        }
    }
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (key, item) in records {
        let path = item.path();
        let meta = item.metadata().ok();
        let record = meta.as_ref().and_then(|m| RECORDS.get(&path, m, |b| serde_json::from_slice::<Record>(b).ok()));
        seen.insert(path.clone());
        match record {
            Some(r) if dirs.get(&key).is_some_and(|(_, d)| *d) && key_for(&r.path) == key => {
                let age = meta.and_then(|m| m.modified().ok());
                let dir = root.join(&key);
                found.push((
                    age,
                    Entry { key, source: r.path, dir, sha256: r.sha256, bytes: r.bytes, entries: r.entries },
                ));
            }
            _ if tidy => {
                // Unless another process is publishing it right now.
                if let Some(quiet) = locks.try_exclusive(&key)? {
                    let _ = fs::remove_file(&path);
                    // A directory of that name goes below, with the lock file.
                    if !dirs.contains_key(&key) {
                        quiet.remove();
                    }
                }
            }
            _ => {}
        }
    }
    RECORDS.keep_only(root, &seen);
    if tidy {
        let recorded: std::collections::HashSet<&str> = found.iter().map(|(_, e)| e.key.as_str()).collect();
        for (name, (path, is_dir)) in &dirs {
            if !recorded.contains(name.as_str())
                && let Some(quiet) = locks.try_exclusive(name)?
                && !root.join(format!("{name}.json")).exists()
            {
                let removed = if *is_dir { fs::remove_dir_all(path) } else { fs::remove_file(path) };
                match removed {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                quiet.remove();
            }
        }
    }
    Ok(found)
}

/// The bundles on disk under `root`, for the cache budget (which may run in a process that
/// never opened this cache). With `tidy`, dead processes' temp dirs and leftovers go too.
pub(crate) fn disk_entries(root: &Path, tidy: bool) -> Vec<crate::cache::DiskEntry> {
    if !root.is_dir() {
        return Vec::new();
    }
    let locks = EntryLocks::new(root);
    if tidy && let Err(e) = remove_dead_tmp(root, &locks) {
        tracing::warn!(error = %e, "removing dead processes' bundle downloads");
    }
    let found = match read_records(root, &locks, tidy) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "listing the bundle cache");
            return Vec::new();
        }
    };
    found
        .into_iter()
        .map(|(age, e)| crate::cache::DiskEntry {
            kind: crate::cache::Kind::Bundles,
            key: e.key,
            name: e.source,
            bytes: e.bytes,
            files: e.entries + 1,
            last_use: age.unwrap_or(SystemTime::UNIX_EPOCH),
        })
        .collect()
}

/// Evicts bundle `key` from the cache at `root` if no process uses it, as [`Disk::retire`]
/// does (record first, then the directory out of the cache, deleted last): `Ok(None)` when
/// someone holds it. Any process sharing the cache may call it.
pub(crate) fn evict_on_disk(root: &Path, key: &str) -> io::Result<Option<u64>> {
    let locks = EntryLocks::new(root);
    let Some(evicting) = locks.try_exclusive(key)? else { return Ok(None) };
    let record = root.join(format!("{key}.json"));
    let bytes =
        fs::read(&record).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()).map(|r| r.bytes).unwrap_or(0);
    match fs::remove_file(&record) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let (trash, trash_lock) = private_tmp(root, &locks, "evicted")?;
    match fs::rename(root.join(key), trash.join(key)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            let _ = fs::remove_dir(&trash);
            trash_lock.remove();
            return Err(e);
        }
        _ => {}
    }
    evicting.remove();
    let _ = fs::remove_dir_all(&trash);
    trash_lock.remove();
    Ok(Some(bytes))
}

/// The cache directory's layout.
#[derive(Debug)]
pub(crate) struct Disk {
    root: PathBuf,
    /// This process's temp dir under `.tmp/`, and the lock that says it is alive.
    tmp: PathBuf,
    tmp_lock: Option<EntryLock>,
    pub locks: EntryLocks,
}

impl Drop for Disk {
    /// The cache is closed: this process's temp dir goes, and its lock file with it (removed
    /// after the directory, so no other process takes the directory for a dead one's before).
    fn drop(&mut self) {
        let (tmp, lock) = (self.tmp.clone(), self.tmp_lock.take());
        let remove = move || {
            if let Err(e) = fs::remove_dir_all(&tmp)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %tmp.display(), error = %e, "removing the bundle cache's temp dir");
            }
            if let Some(lock) = lock {
                lock.remove();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

impl Disk {
    /// Opens the directory (creating it) beside any other process using it: makes this
    /// process's temp dir, removes dead processes' temp dirs and leftovers nobody is writing,
    /// and returns the bundles recorded there, oldest first.
    pub fn open(root: &Path) -> io::Result<(Self, Vec<Entry>)> {
        fs::create_dir_all(root)?;
        let locks = EntryLocks::new(root);
        remove_dead_tmp(root, &locks)?;
        let (tmp, tmp_lock) = private_tmp(root, &locks, "work")?;
        let disk = Self { root: root.to_path_buf(), tmp, tmp_lock: Some(tmp_lock), locks };
        let mut found = read_records(root, &disk.locks, true)?;
        found.sort_by_key(|(age, _)| *age);
        Ok((disk, found.into_iter().map(|(_, e)| e).collect()))
    }

    /// Where this process's downloads and extractions in progress go.
    pub fn tmp(&self) -> PathBuf {
        self.tmp.clone()
    }

    /// The entry recorded on disk for `key`, if any (another process may have published it).
    pub fn load(&self, key: &str) -> Option<Entry> {
        let record = fs::read(self.root.join(format!("{key}.json"))).ok()?;
        let r: Record = serde_json::from_slice(&record).ok()?;
        let dir = self.root.join(key);
        (dir.is_dir() && key_for(&r.path) == key).then(|| Entry {
            key: key.to_owned(),
            source: r.path,
            dir,
            sha256: r.sha256,
            bytes: r.bytes,
            entries: r.entries,
        })
    }

    /// Moves a finished extraction into place and writes its record, in that order. The
    /// caller holds the entry's exclusive lock.
    pub fn commit(
        &self,
        key: &str,
        extracted: &Path,
        source: &str,
        sha256: &str,
        bytes: u64,
        entries: u64,
    ) -> io::Result<Entry> {
        let record = Record { path: source.to_owned(), sha256: sha256.to_owned(), bytes, entries };
        let json = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let pending = self.tmp().join(format!("{key}.json"));
        fs::write(&pending, json)?;
        let dir = self.root.join(key);
        // The caller holds the entry's exclusive lock and found no record: what is at <key>/
        // is a leftover (a crash between the directory's rename and its record's, or an
        // eviction cut short). Out of the way first, or the rename fails (ENOTEMPTY).
        match fs::symlink_metadata(&dir) {
            Ok(_) => {
                let aside = tempfile::Builder::new().prefix("leftover-").tempdir_in(self.tmp())?.keep();
                fs::rename(&dir, aside.join(key))?;
                if let Err(e) = fs::remove_dir_all(&aside) {
                    tracing::warn!(dir = %aside.display(), error = %e, "removing a bundle's leftover");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::rename(extracted, &dir)?;
        fs::rename(&pending, self.root.join(format!("{key}.json")))?;
        Ok(Entry { key: key.to_owned(), source: source.to_owned(), dir, sha256: sha256.to_owned(), bytes, entries })
    }

    /// Marks a bundle as just used, so that a restarted cache evicts in the same order (the
    /// records' modification times order the bundles found at start). Best effort.
    pub fn touch(&self, key: &str) {
        let record = self.root.join(format!("{key}.json"));
        if let Ok(file) = File::options().write(true).open(record) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }

    /// Takes an entry out of the cache: its record goes first (so a crash leaves only a
    /// leftover directory), then its directory moves into `.tmp/`. Returns where it moved,
    /// for the caller to delete away from any lock. The caller holds the entry's exclusive
    /// lock (so no process uses it).
    pub fn retire(&self, entry: &Entry) -> io::Result<PathBuf> {
        let record = self.root.join(format!("{}.json", entry.key));
        match fs::remove_file(&record) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let trash = tempfile::Builder::new().prefix("evicted-").tempdir_in(self.tmp())?.keep();
        let moved = trash.join(&entry.key);
        fs::rename(&entry.dir, &moved)?;
        Ok(trash)
    }
}

/// A bundle in the index: ready, or being fetched by one task that others wait on.
#[derive(Debug)]
pub(crate) enum Slot {
    Ready { entry: Arc<Entry>, used: u64 },
    Loading(watch::Receiver<Flight>),
}

/// What the index holds for a key.
pub(crate) enum Lookup {
    Ready(Arc<Entry>),
    Loading(watch::Receiver<Flight>),
    Missing,
}

/// The cache's contents in memory: every slot, a use clock, and the totals of ready entries.
#[derive(Debug, Default)]
pub(crate) struct Index {
    slots: HashMap<String, Slot>,
    clock: u64,
    bytes: u64,
    ready: usize,
}

impl Index {
    /// Finds `key`, counting a use of a ready entry.
    pub fn lookup(&mut self, key: &str) -> Lookup {
        self.clock += 1;
        match self.slots.get_mut(key) {
            Some(Slot::Ready { entry, used }) => {
                *used = self.clock;
                Lookup::Ready(entry.clone())
            }
            Some(Slot::Loading(rx)) => Lookup::Loading(rx.clone()),
            None => Lookup::Missing,
        }
    }

    /// Marks `key` as being fetched.
    pub fn start(&mut self, key: &str, rx: watch::Receiver<Flight>) {
        self.slots.insert(key.to_owned(), Slot::Loading(rx));
    }

    /// Forgets a fetch whose task ended without finishing it, if `key` still names that fetch.
    pub fn forget_abandoned(&mut self, key: &str, rx: &watch::Receiver<Flight>) {
        if let Some(Slot::Loading(current)) = self.slots.get(key)
            && current.same_channel(rx)
        {
            self.slots.remove(key);
        }
    }

    /// Ends a fetch: the entry becomes ready (as just used), or the key is forgotten.
    pub fn finish(&mut self, key: &str, entry: Option<Arc<Entry>>) {
        if let Some(Slot::Ready { entry, .. }) = self.slots.remove(key) {
            self.bytes -= entry.bytes;
            self.ready -= 1;
        }
        if let Some(entry) = entry {
            self.insert(entry);
        }
    }

    /// Adds a ready entry as the most recently used.
    pub fn insert(&mut self, entry: Arc<Entry>) {
        self.clock += 1;
        self.bytes += entry.bytes;
        self.ready += 1;
        self.slots.insert(entry.key.clone(), Slot::Ready { entry, used: self.clock });
    }

    /// Removes least recently used entries that nobody holds until the totals fit the bounds,
    /// and returns them. Entries in use stay, even if the bounds are then still exceeded;
    /// `releasing` is a holder being dropped, whose own reference doesn't count.
    pub fn evict(&mut self, max_bytes: u64, max_entries: usize, releasing: Option<&Arc<Entry>>) -> Vec<Arc<Entry>> {
        if self.bytes <= max_bytes && self.ready <= max_entries {
            return Vec::new();
        }
        let mut idle: Vec<(u64, String)> = self
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                // The index's own reference is the only one: no Bundle holds it.
                Slot::Ready { entry, used } => {
                    let released = releasing.is_some_and(|r| Arc::ptr_eq(r, entry));
                    let holders = Arc::strong_count(entry) - usize::from(released);
                    (holders == 1).then(|| (*used, key.clone()))
                }
                _ => None,
            })
            .collect();
        idle.sort();
        let mut gone = Vec::new();
        for (_, key) in idle {
            if self.bytes <= max_bytes && self.ready <= max_entries {
                break;
            }
            if let Some(Slot::Ready { entry, .. }) = self.slots.remove(&key) {
                self.bytes -= entry.bytes;
                self.ready -= 1;
                gone.push(entry);
            }
        }
        gone
    }

    /// Forgets ready entries no longer on disk (another process, or the cache budget,
    /// evicted them) that no holder uses.
    pub fn forget_missing(&mut self, on_disk: &std::collections::HashSet<&str>) {
        let gone: Vec<String> = self
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Ready { entry, .. } if Arc::strong_count(entry) == 1 && !on_disk.contains(key.as_str()) => {
                    Some(key.clone())
                }
                _ => None,
            })
            .collect();
        for key in gone {
            self.finish(&key, None);
        }
    }

    /// (ready entries, their bytes)
    pub fn totals(&self) -> (usize, u64) {
        (self.ready, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn entry(key: &str, bytes: u64) -> Arc<Entry> {
        Arc::new(Entry {
            key: key.to_owned(),
            source: format!("file:///{key}"),
            dir: PathBuf::from(key),
            sha256: String::new(),
            bytes,
            entries: 1,
        })
    }

    fn keys(gone: &[Arc<Entry>]) -> Vec<&str> {
        gone.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn evicts_least_recently_used_first_by_bytes_and_count() {
        let mut index = Index::default();
        for key in ["a", "b", "c"] {
            index.insert(entry(key, 10));
        }
        assert!(index.evict(30, 3, None).is_empty());
        let _ = index.lookup("a"); // a is now the most recent: b goes first
        assert_eq!(keys(&index.evict(20, 3, None)), ["b"]);
        assert_eq!(index.totals(), (2, 20));
        index.insert(entry("d", 10));
        assert_eq!(keys(&index.evict(100, 2, None)), ["c"]);
        assert_eq!(index.totals(), (2, 20));
    }

    #[test]
    fn never_evicts_an_entry_in_use() {
        let mut index = Index::default();
        index.insert(entry("a", 10));
        index.insert(entry("b", 10));
        let Lookup::Ready(held) = index.lookup("a") else { panic!("a is ready") };
        let _ = index.lookup("b");
        // a is the least recently used, but held: b goes, and a stays even over the bound.
        assert_eq!(keys(&index.evict(0, 0, None)), ["b"]);
        assert_eq!(index.totals(), (1, 10));
        drop(held);
        assert_eq!(keys(&index.evict(0, 0, None)), ["a"]);
        assert_eq!(index.totals(), (0, 0));
    }

    #[test]
    fn loading_slots_are_not_counted_or_evicted() {
        let mut index = Index::default();
        let (_tx, rx) = watch::channel(Flight::Running(Vec::new()));
        index.start("x", rx);
        assert!(matches!(index.lookup("x"), Lookup::Loading(_)));
        assert!(index.evict(0, 0, None).is_empty());
        index.finish("x", None);
        assert!(matches!(index.lookup("x"), Lookup::Missing));
        // An abandoned fetch is forgotten only while it is still the key's fetch.
        let (tx, stale) = watch::channel(Flight::Running(Vec::new()));
        index.start("x", stale.clone());
        drop(tx);
        index.forget_abandoned("x", &watch::channel(Flight::Running(Vec::new())).1);
        assert!(matches!(index.lookup("x"), Lookup::Loading(_)));
        index.forget_abandoned("x", &stale);
        assert!(matches!(index.lookup("x"), Lookup::Missing));
        index.start("x", watch::channel(Flight::Running(Vec::new())).1);
        index.finish("x", Some(entry("x", 7)));
        assert_eq!(index.totals(), (1, 7));
    }

    #[test]
    fn open_recovers_records_and_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bundles");
        {
            let (disk, found) = Disk::open(&root).unwrap();
            assert!(found.is_empty());
            let extracted = disk.tmp().join("x");
            fs::create_dir(&extracted).unwrap();
            fs::write(extracted.join("f"), b"1").unwrap();
            let key = key_for("file:///b.zip");
            disk.commit(&key, &extracted, "file:///b.zip", "ab", 1, 1).unwrap();
            // A second process opens it too, and sees the bundle; its temp dir is its own and
            // the first's stays while the first lives.
            let (other, seen) = Disk::open(&root).unwrap();
            assert_eq!(seen.len(), 1);
            assert!(disk.tmp().exists() && other.tmp().exists() && disk.tmp() != other.tmp());
            assert_eq!(other.load(&key).map(|e| e.sha256), Some("ab".to_string()));
            // A leftover another process is publishing (its lock held) stays.
            let busy = disk.locks.exclusive("busy").unwrap();
            fs::create_dir(root.join("busy")).unwrap();
            drop(other);
            let (_third, _) = Disk::open(&root).unwrap();
            assert!(root.join("busy").exists());
            drop(busy);
        }
        fs::create_dir(root.join("orphan")).unwrap();
        fs::write(root.join(".tmp").join("partial"), b"").unwrap();
        fs::write(root.join("stray.json"), b"{").unwrap();
        let (disk, found) = Disk::open(&root).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].source, "file:///b.zip");
        assert_eq!(fs::read(found[0].dir.join("f")).unwrap(), b"1");
        assert!(!root.join("orphan").exists() && !root.join("busy").exists());
        assert!(!root.join("stray.json").exists());
        assert_eq!(fs::read_dir(disk.tmp()).unwrap().count(), 0);
        let tmps: Vec<_> = fs::read_dir(root.join(".tmp")).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(tmps, [disk.tmp()], "dead processes' temp dirs and stray files are gone");
        // Using a bundle moves it to the end of the order found at start.
        let extracted = disk.tmp().join("y");
        fs::create_dir(&extracted).unwrap();
        let newer = disk.commit(&key_for("file:///c.zip"), &extracted, "file:///c.zip", "cd", 1, 1).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options().write(true).open(root.join(format!("{}.json", newer.key))).unwrap().set_modified(old).unwrap();
        drop(disk);
        let (disk, found) = Disk::open(&root).unwrap();
        let order: Vec<&str> = found.iter().map(|e| e.source.as_str()).collect();
        assert_eq!(order, ["file:///c.zip", "file:///b.zip"]);
        disk.touch(&found[0].key);
        drop(disk);
        let (disk, found) = Disk::open(&root).unwrap();
        let order: Vec<&str> = found.iter().map(|e| e.source.as_str()).collect();
        assert_eq!(order, ["file:///b.zip", "file:///c.zip"]);
        let trash = disk.retire(&found[0]).unwrap();
        assert!(!found[0].dir.exists());
        assert!(!root.join(format!("{}.json", found[0].key)).exists());
        fs::remove_dir_all(trash).unwrap();
    }
}
