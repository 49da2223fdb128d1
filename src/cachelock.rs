//! Per-entry locks for caches that several worker processes share (operators point many
//! workers on one host at one cache directory to share downloads and builds).
//!
//! Each cache entry has a lock file `<cache>/.locks/<key>.lock`, locked with `flock(2)`:
//! - **shared** while the entry is in use (a task runs on a bundle, a venv, an image's layers);
//! - **exclusive** while it is made (fetched, built, unpacked: the others wait, then find it
//!   published) and while it is evicted. Eviction takes the lock with
//!   [`EntryLocks::try_exclusive`] only, so an entry another process uses is never removed.
//!
//! Entries are published atomically by their caches: made in a temp directory and renamed
//! into place (with their record or completion marker inside or after), so a reader never sees
//! half an entry. A lock file may be removed by the holder of its exclusive lock
//! ([`EntryLock::remove`]); acquiring checks that the file it locked is still the one at the
//! path (same inode) and retries otherwise, so a removal never splits one entry's lock in two.
//! Locks are released when their [`EntryLock`] drops, or when its process dies (the kernel
//! drops flocks with the last descriptor): a crashed worker leaves no lock held.
//!
//! Lock directories are root's alone (0700, lock files 0600, never followed through a
//! symlink): any user who could open a lock file could `flock` it and stall every maker,
//! evictor and port allocation on the host.

#![warn(missing_docs)]

use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The directory the workers of a host share (the cgroup ledger, the port locks): a tmpfs,
/// gone at boot as are the cgroups and tasks it describes. Root's alone (0700, files 0600):
/// a local user who could open a lock file there could flock it and stall every worker.
pub const HOST_RUN_DIR: &str = "/run/iris-worker";

/// Creates [`HOST_RUN_DIR`] 0700, or makes it so when an older worker left it wider. Refuses
/// a symlink there (only root can make one in /run, but root's tools should not follow it).
pub fn private_host_run_dir() -> io::Result<()> {
    let dir = Path::new(HOST_RUN_DIR);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let md = fs::symlink_metadata(dir)?;
    if !md.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{HOST_RUN_DIR} is not a directory")));
    }
    if md.mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Opens (creating) a lock or ledger file as root's alone: 0600 also when it existed with a
/// wider mode, and never through a symlink.
pub fn open_private_lock_file(path: &Path, read: bool) -> io::Result<File> {
    let file = File::options()
        .read(read)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if file.metadata()?.mode() & 0o777 != 0o600 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// The lock files of one cache directory.
#[derive(Debug, Clone)]
pub struct EntryLocks {
    dir: PathBuf,
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct EntryLock {
    file: File,
    path: PathBuf,
    exclusive: bool,
}

/// A cache entry a task uses, named for a process that did not make it: the task's supervisor
/// takes it share-locked when it starts and holds it for the task's whole life (the worker
/// holds its own lease meanwhile, but a worker can restart while its tasks run).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// The cache directory whose `.locks/` has the entry's lock.
    pub cache: PathBuf,
    /// The entry's key in that cache.
    pub key: String,
    /// The entry's record, whose modification time is its last use.
    #[serde(default)]
    pub record: Option<PathBuf>,
}

impl Lease {
    /// Takes the entry's shared lock, unless a process is evicting it right now (`None`).
    pub fn take(&self) -> io::Result<Option<EntryLock>> {
        EntryLocks::new(&self.cache).try_shared(&self.key)
    }

    /// Marks the entry as used now (best effort): it then goes last among the idle ones.
    pub fn touch(&self) {
        if let Some(record) = &self.record
            && let Ok(f) = File::options().append(true).open(record)
        {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// What [`EntryLocks::lease_or_make`] got.
#[derive(Debug)]
pub enum Acquired<T> {
    /// The entry is there, and held shared.
    Published(T, EntryLock),
    /// Nobody holds it and it is not there: the exclusive lock, to make it.
    Make(EntryLock),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    Exclusive,
}

impl EntryLocks {
    /// The locks of the cache at `cache_dir` (in `<cache_dir>/.locks`, created on first use).
    pub fn new(cache_dir: &Path) -> EntryLocks {
        EntryLocks { dir: cache_dir.join(".locks") }
    }

    /// The lock file of `key` (it may not exist yet): the cache budget finds who holds an
    /// entry by this file's inode in `/proc/locks`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.lock", file_name_of(key)))
    }

    /// Waits for the shared lock of `key` (blocking: call off the async threads).
    pub fn shared(&self, key: &str) -> io::Result<EntryLock> {
        self.acquire(key, Mode::Shared, true)?.ok_or_else(|| io::Error::other("a blocking lock returned none"))
    }

    /// Waits for the exclusive lock of `key` (blocking: call off the async threads).
    pub fn exclusive(&self, key: &str) -> io::Result<EntryLock> {
        self.acquire(key, Mode::Exclusive, true)?.ok_or_else(|| io::Error::other("a blocking lock returned none"))
    }

    /// The shared lock of `key` if nobody holds it exclusively now.
    pub fn try_shared(&self, key: &str) -> io::Result<Option<EntryLock>> {
        self.acquire(key, Mode::Shared, false)
    }

    /// The exclusive lock of `key` if nobody holds it at all now (what eviction uses).
    pub fn try_exclusive(&self, key: &str) -> io::Result<Option<EntryLock>> {
        self.acquire(key, Mode::Exclusive, false)
    }

    /// [`EntryLocks::exclusive`] for async code: waits on the blocking pool.
    pub async fn exclusive_async(&self, key: &str) -> io::Result<EntryLock> {
        let (locks, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || locks.exclusive(&key)).await.map_err(io::Error::other)?
    }

    /// [`EntryLocks::shared`] for async code: waits on the blocking pool.
    pub async fn shared_async(&self, key: &str) -> io::Result<EntryLock> {
        let (locks, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || locks.shared(&key)).await.map_err(io::Error::other)?
    }

    /// For a maker: waits until either `published()` holds (`None`: use what another process
    /// made) or the exclusive lock of `key` is free (`Some`: make it, checking `published()`
    /// again first). Polls: a published entry stays share-locked by its users for as long as
    /// they run, so waiting for the exclusive lock alone could wait for ever.
    pub async fn exclusive_unless(&self, key: &str, published: impl Fn() -> bool) -> io::Result<Option<EntryLock>> {
        let mut pause = Duration::from_millis(20);
        loop {
            if published() {
                return Ok(None);
            }
            let (locks, k) = (self.clone(), key.to_string());
            let got =
                tokio::task::spawn_blocking(move || locks.try_exclusive(&k)).await.map_err(io::Error::other)??;
            if got.is_some() {
                return Ok(got);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Creates the lock directory root's alone, or narrows one an older version (or an
    /// operator) made wider; refuses one that is not a plain directory.
    fn private_dir(&self) -> io::Result<()> {
        let meta = match fs::symlink_metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(&self.dir)?;
                fs::symlink_metadata(&self.dir)?
            }
            Err(e) => return Err(e),
        };
        if !meta.is_dir() {
            return Err(io::Error::new(io::ErrorKind::NotADirectory, "the lock directory is not a directory"));
        }
        if meta.mode() & 0o7777 != PRIVATE_DIR {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(PRIVATE_DIR))?;
        }
        Ok(())
    }

    /// Removes every lock file here that no process holds (what crashed or interrupted work
    /// left, for `cleanup --all`), by name: taken exclusively first, so a lock someone holds or
    /// takes meanwhile stays. Returns how many went.
    pub fn remove_unheld(&self) -> io::Result<usize> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for item in rd {
            let path = item?.path();
            if path.extension().is_none_or(|x| x != "lock") {
                continue;
            }
            let file = match File::options().write(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !flag(file.try_lock())? {
                continue;
            }
            let ours = file.metadata()?;
            if fs::symlink_metadata(&path).is_ok_and(|now| now.ino() == ours.ino() && now.dev() == ours.dev()) {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// For a user that makes what it does not find: waits until either the entry is
    /// published (`found()` says so while its shared lock is held: [`Acquired::Published`],
    /// already leased, so no eviction can come between the look and the lease) or nobody holds
    /// its lock ([`Acquired::Make`]: the exclusive lock; make it, then
    /// [`EntryLock::downgrade`] to use it). An entry being evicted is waited out, never
    /// reported. Polls, on the blocking pool: users of a published entry hold it shared for as
    /// long as they run, so waiting for the exclusive lock alone could wait for ever.
    pub async fn lease_or_make<T, F>(&self, key: &str, found: F) -> io::Result<Acquired<T>>
    where
        T: Send + 'static,
        F: Fn() -> Option<T> + Send + Sync + 'static,
    {
        let found = std::sync::Arc::new(found);
        let mut pause = Duration::from_millis(20);
        loop {
            let (locks, k, found) = (self.clone(), key.to_string(), found.clone());
            let got = tokio::task::spawn_blocking(move || -> io::Result<Option<Acquired<T>>> {
                if let Some(lease) = locks.try_shared(&k)? {
                    if let Some(t) = found() {
                        return Ok(Some(Acquired::Published(t, lease)));
                    }
                    drop(lease);
                }
                let Some(making) = locks.try_exclusive(&k)? else { return Ok(None) };
                match found() {
                    None => Ok(Some(Acquired::Make(making))),
                    // Published between our two looks: use it.
                    Some(t) => Ok(making.downgrade()?.map(|lease| Acquired::Published(t, lease))),
                }
            })
            .await
            .map_err(io::Error::other)??;
            if let Some(got) = got {
                return Ok(got);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn acquire(&self, key: &str, mode: Mode, wait: bool) -> io::Result<Option<EntryLock>> {
        self.private_dir()?;
        let path = self.path(key);
        loop {
            let file = open_private_lock_file(&path, false)?;
            let got = match (mode, wait) {
                (Mode::Shared, true) => file.lock_shared().map(|()| true),
                (Mode::Exclusive, true) => file.lock().map(|()| true),
                (Mode::Shared, false) => flag(file.try_lock_shared()),
                (Mode::Exclusive, false) => flag(file.try_lock()),
            }?;
            if !got {
                return Ok(None);
            }
            // The file may have been removed (and another made) between our open and lock.
            let ours = file.metadata()?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    if ours.mode() & 0o077 != 0 {
                        // Made by an older version, before lock files were private.
                        file.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE))?;
                    }
                    return Ok(Some(EntryLock { file, path, exclusive: mode == Mode::Exclusive }));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The lock directory's mode, and its files'.
const PRIVATE_DIR: u32 = 0o700;
const PRIVATE_FILE: u32 = 0o600;

/// `key` as a file name, one to one: letters, digits, `-`, `_` and `.` stay, every other byte
/// becomes `%XX` (`%` itself too), so two keys never share a lock (`a/b` is `a%2Fb`, `a_b`
/// stays `a_b`). The caches' keys (hex digests, `uv-cache`, `port-N`, `tmp-…`) are unchanged.
fn file_name_of(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn flag(r: Result<(), TryLockError>) -> io::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

impl EntryLock {
    /// Turns an exclusive lock into a shared one, for a maker that goes on using what it made
    /// (other users may then share it; eviction still cannot take it). `None` when another
    /// process took the lock in between (Linux converts without a gap, but flock(2) does not
    /// promise it): what was made may be gone, and the caller must look again.
    pub fn downgrade(self) -> io::Result<Option<EntryLock>> {
        if !self.exclusive {
            return Ok(Some(self));
        }
        if !flag(self.file.try_lock_shared())? {
            return Ok(None);
        }
        Ok(Some(EntryLock { exclusive: false, ..self }))
    }

    /// Removes the lock file (the entry is gone for good), then releases the lock. Only the
    /// exclusive holder may; a shared lock is just released.
    pub fn remove(self) {
        if self.exclusive {
            let _ = fs::remove_file(&self.path);
        }
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_locks_coexist_and_keep_eviction_out() {
        let dir = tempfile::tempdir().unwrap();
        let a = EntryLocks::new(dir.path());
        let b = EntryLocks::new(dir.path());
        let one = a.shared("k").unwrap();
        let two = b.try_shared("k").unwrap().expect("shared locks coexist");
        assert!(b.try_exclusive("k").unwrap().is_none(), "in use: no eviction");
        drop(one);
        assert!(a.try_exclusive("k").unwrap().is_none(), "still in use by the other");
        drop(two);
        let evicting = a.try_exclusive("k").unwrap().expect("nobody uses it");
        assert!(b.try_shared("k").unwrap().is_none(), "no use while it is evicted");
        evicting.remove();
        assert!(!dir.path().join(".locks/k.lock").exists());
        assert!(b.try_shared("k").unwrap().is_some(), "a new lock file");
    }

    #[test]
    fn a_waiter_gets_the_lock_when_the_maker_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let locks = EntryLocks::new(dir.path());
        let making = locks.exclusive("v/../x").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = locks.clone();
        let waiter = std::thread::spawn(move || {
            let l = other.shared("v/../x").unwrap();
            tx.send(()).unwrap();
            drop(l);
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "waits while the entry is made");
        drop(making);
        rx.recv_timeout(Duration::from_secs(10)).expect("gets it after");
        waiter.join().unwrap();
        assert!(dir.path().join(".locks/v%2F..%2Fx.lock").exists(), "keys are made safe file names");
    }

    #[test]
    fn a_downgraded_lock_is_shared_and_still_keeps_eviction_out() {
        let dir = tempfile::tempdir().unwrap();
        let locks = EntryLocks::new(dir.path());
        let made = locks.exclusive("k").unwrap();
        assert!(locks.try_shared("k").unwrap().is_none(), "being made: nobody uses it yet");
        let using = made.downgrade().unwrap().expect("nobody else holds it");
        let other = locks.try_shared("k").unwrap().expect("shared with other users now");
        drop(other);
        assert!(locks.try_exclusive("k").unwrap().is_none(), "still in use: no eviction");
        drop(using);
        assert!(locks.try_exclusive("k").unwrap().is_some());
    }

    /// What a user finds is leased as it is found (finding 4): between the look and the
    /// lease, nobody can evict it, so a user never finds an entry that is then gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_or_make_finds_an_entry_already_leased_and_makes_one_nobody_has() {
        let dir = tempfile::tempdir().unwrap();
        let locks = EntryLocks::new(dir.path());
        let published = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let unleased_looks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let look = |evictor: EntryLocks, published: std::sync::Arc<std::sync::atomic::AtomicBool>| {
            let unleased_looks = unleased_looks.clone();
            move || {
                // Another process tries to evict it right as it is looked at: it never can.
                if evictor.try_exclusive("k").unwrap().is_some() {
                    unleased_looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return None;
                }
                published.load(std::sync::atomic::Ordering::SeqCst).then_some("entry")
            }
        };
        // Nothing there, nobody on it: make it.
        let got = locks.lease_or_make("k", look(locks.clone(), published.clone())).await.unwrap();
        let Acquired::Make(making) = got else { panic!("expected to make it, got {got:?}") };
        assert!(making.exclusive);
        // Made and published: the maker goes on using it; another user finds it, leased.
        published.store(true, std::sync::atomic::Ordering::SeqCst);
        let using = making.downgrade().unwrap().unwrap();
        let got = locks.lease_or_make("k", look(locks.clone(), published.clone())).await.unwrap();
        let Acquired::Published("entry", lease) = got else { panic!("expected it found, got {got:?}") };
        drop(using);
        assert!(locks.try_exclusive("k").unwrap().is_none(), "the finder's lease keeps eviction out");
        drop(lease);
        // Found by someone nobody else holds it for: still leased while it is looked at.
        let got = locks.lease_or_make("k", look(locks.clone(), published.clone())).await.unwrap();
        assert!(matches!(got, Acquired::Published("entry", _)), "{got:?}");
        drop(got);
        // Being made by another process: waited out, then found.
        let other = locks.exclusive("k").unwrap();
        published.store(false, std::sync::atomic::Ordering::SeqCst);
        let waiter = {
            let (locks, found) = (locks.clone(), look(locks.clone(), published.clone()));
            tokio::spawn(async move { locks.lease_or_make("k", found).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "waits while another process makes it");
        published.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(other);
        let got = waiter.await.unwrap().unwrap();
        assert!(matches!(got, Acquired::Published("entry", _)), "{got:?}");
        assert_eq!(unleased_looks.load(std::sync::atomic::Ordering::SeqCst), 0, "every look held the lock");
    }

    #[test]
    fn only_lock_files_nobody_holds_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let locks = EntryLocks::new(dir.path());
        let shared = locks.shared("in-use").unwrap();
        let making = locks.exclusive("being-made").unwrap();
        drop(locks.exclusive("left").unwrap());
        drop(locks.shared("also-left").unwrap());
        fs::write(dir.path().join(".locks/k.failed"), b"").unwrap();
        assert_eq!(locks.remove_unheld().unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path().join(".locks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["being-made.lock", "in-use.lock", "k.failed"]);
        drop((shared, making));
        assert_eq!(EntryLocks::new(&dir.path().join("none")).remove_unheld().unwrap(), 0);
    }

    #[test]
    fn distinct_keys_never_share_a_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let locks = EntryLocks::new(dir.path());
        let keys = ["a/b", "a_b", "a%2Fb", "a b", "a\u{e9}", "a\u{c3}", ".", "..", ""];
        let paths: std::collections::HashSet<PathBuf> = keys.iter().map(|k| locks.path(k)).collect();
        assert_eq!(paths.len(), keys.len(), "{paths:?}");
        let _one = locks.exclusive("a/b").unwrap();
        assert!(locks.try_exclusive("a_b").unwrap().is_some(), "another key's lock is free");
        for p in &paths {
            assert_eq!(p.parent(), Some(dir.path().join(".locks").as_path()), "{p:?} stays in the lock directory");
        }
    }

    #[test]
    fn lock_files_are_roots_alone_and_never_followed_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let locks = EntryLocks::new(dir.path());
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        drop(locks.shared("k").unwrap());
        assert_eq!(mode(&dir.path().join(".locks")), 0o700);
        assert_eq!(mode(&locks.path("k")), 0o600);
        // What an older version left wider is narrowed on use.
        fs::set_permissions(dir.path().join(".locks"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(locks.path("k"), fs::Permissions::from_mode(0o644)).unwrap();
        drop(locks.try_shared("k").unwrap().unwrap());
        assert_eq!(mode(&dir.path().join(".locks")), 0o700);
        assert_eq!(mode(&locks.path("k")), 0o600);
        // A lock file that is a symlink is refused, not followed to its target.
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, locks.path("planted")).unwrap();
        assert!(locks.try_exclusive("planted").is_err());
        assert_eq!(mode(&target), 0o644, "the target is untouched");
        // So is a lock directory that is a symlink.
        let other = tempfile::tempdir().unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(other.path(), linked.path().join(".locks")).unwrap();
        assert!(EntryLocks::new(linked.path()).try_shared("k").is_err());
        assert!(!other.path().join("k.lock").exists());
    }
}
