//! Bundles end to end, no root needed: the same archive from file:// and from a real HTTP server
//! on loopback extracts to the same tree; a wrong sha256 caches nothing; concurrent gets fetch
//! once (counted at the server); the LRU evicts by bytes and by entries but never a bundle in
//! use; a restarted cache finds its bundles; and hostile archives (zip-slip, absolute path,
//! symlink escape, a 10 GB bomb, a million entries, a device) are each rejected with their own
//! error naming the entry, leaving nothing in the cache and nothing written outside it.
//! Bundles come only from where the operator allows (`file://` below its directories, http(s)
//! from public addresses), and a worker fails tasks that ask for anything else (that one test
//! needs root).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use iris_worker::bundle::{Bundle, BundleCache, BundleConfig, BundleError, ExtractError, ExtractLimits, Phase};
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

// ---------------------------------------------------------------------------------------
// A static file server on 127.0.0.1:0 that counts the GETs of each path.

#[derive(Default)]
struct Served {
    files: Mutex<HashMap<String, Bytes>>,
    gets: Mutex<HashMap<String, usize>>,
    delay: Mutex<Duration>,
    /// Paths answered with a 302 to the URL given.
    redirects: Mutex<HashMap<String, String>>,
}

impl Served {
    fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(path.to_owned(), Bytes::from(bytes));
    }
    fn gets(&self, path: &str) -> usize {
        self.gets.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn handle(State(served): State<Arc<Served>>, method: Method, uri: Uri) -> Response {
    let path = uri.path().to_owned();
    if method == Method::GET {
        *served.gets.lock().unwrap().entry(path.clone()).or_default() += 1;
    }
    let delay = *served.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    if let Some(to) = served.redirects.lock().unwrap().get(&path) {
        return (StatusCode::FOUND, [(axum::http::header::LOCATION, to.clone())]).into_response();
    }
    match served.files.lock().unwrap().get(&path) {
        Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn serve() -> (Arc<Served>, SocketAddr) {
    let served = Arc::new(Served::default());
    let app = Router::new().fallback(handle).with_state(served.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (served, addr)
}

// ---------------------------------------------------------------------------------------
// Archives and trees.

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A bundle like a real one: a package, an executable script, an empty directory, symlinks
/// inside the bundle, and a few MB of mixed data (several copy buffers, past the ratio floor).
fn sample_bundle() -> Vec<u8> {
    let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let file = SimpleFileOptions::default().unix_permissions(0o644);
    let exec = SimpleFileOptions::default().unix_permissions(0o755);
    w.add_directory("app/", SimpleFileOptions::default()).unwrap();
    w.start_file("app/pyproject.toml", file).unwrap();
    w.write_all(b"[project]\nname = \"demo\"\nversion = \"0.1.0\"\n").unwrap();
    w.start_file("app/demo/__init__.py", file).unwrap();
    w.write_all(b"def main():\n    return 42\n").unwrap();
    w.start_file("app/bin/run.sh", exec).unwrap();
    w.write_all(b"#!/bin/sh\nexec python -m demo\n").unwrap();
    w.add_directory("app/empty/", SimpleFileOptions::default()).unwrap();
    w.add_symlink("app/readme-link", "../README.md", SimpleFileOptions::default()).unwrap();
    w.add_symlink("app/demo/up", "../bin", SimpleFileOptions::default()).unwrap();
    w.start_file("README.md", file).unwrap();
    w.write_all(b"# demo\n").unwrap();
    w.start_file("data/mixed.bin", file).unwrap();
    let mut state: u32 = 1;
    let mut chunk = Vec::with_capacity(1 << 20);
    for i in 0..3 {
        chunk.clear();
        for _ in 0..(1 << 20) {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            // Half text-like, half noise: compresses, but not too well.
            chunk.push(if i % 2 == 0 { b"abcdefgh"[(state >> 29) as usize] } else { (state >> 16) as u8 });
        }
        w.write_all(&chunk).unwrap();
    }
    w.start_file("data/stored.txt", file.compression_method(CompressionMethod::Stored)).unwrap();
    w.write_all(b"stored, not deflated\n").unwrap();
    w.finish().unwrap().into_inner()
}

/// Every path below `root`: kind, mode and a digest of the contents (or the link target).
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for item in fs::read_dir(dir).unwrap() {
            let path = item.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.insert(rel, format!("link -> {}", fs::read_link(&path).unwrap().display()));
            } else if meta.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(root, &path, out);
            } else {
                out.insert(rel, format!("file {mode:o} {}", sha256_hex(&fs::read(&path).unwrap())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Everything under `dir` but the cache's lock and its (empty) .tmp/.
fn cache_contents(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).unwrap() {
        let item = item.unwrap();
        let name = item.file_name().to_string_lossy().into_owned();
        if name == ".locks" {
            continue;
        }
        // Each process (each BundleCache) has its own temp dir there: what is in them counts.
        if name == ".tmp" {
            for own in fs::read_dir(item.path()).unwrap() {
                for inner in fs::read_dir(own.unwrap().path()).unwrap() {
                    out.push(format!(".tmp/{}", inner.unwrap().file_name().to_string_lossy()));
                }
            }
            continue;
        }
        out.push(name);
    }
    out.sort();
    out
}

fn config(dir: &Path) -> BundleConfig {
    // These tests fetch from their temp dirs and loopback servers (sources are tested apart).
    let sources = iris_worker::bundle::SourcePolicy {
        allowed_dirs: vec![std::env::temp_dir()],
        allow_private_hosts: true,
        controller: None,
    };
    BundleConfig { sources, ..BundleConfig::new(dir) }
}

fn phases() -> (Arc<Mutex<Vec<Phase>>>, impl Fn(Phase) + Send + Sync + 'static) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (seen, move |phase| sink.lock().unwrap().push(phase))
}

// ---------------------------------------------------------------------------------------
// The data path.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_http_bundles_extract_the_same_tree() {
    let work = tempfile::tempdir().unwrap();
    let bytes = sample_bundle();
    let sha = sha256_hex(&bytes);
    let local = work.path().join("bundle.zip");
    fs::write(&local, &bytes).unwrap();
    let (served, addr) = serve().await;
    served.put("/bundles/b.zip", bytes.clone());

    let cache = BundleCache::new(config(&work.path().join("cache"))).unwrap();
    let (seen, progress) = phases();
    let from_file = cache.get(&format!("file://{}", local.display()), Some(&sha), progress).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [Phase::Downloading, Phase::Verifying, Phase::Extracting]);
    assert!(!from_file.from_cache());
    assert_eq!(from_file.sha256(), sha);
    let http_path = format!("http://{addr}/bundles/b.zip");
    let from_http = cache.get(&http_path, Some(&sha.to_uppercase()), |_| {}).await.unwrap();
    assert_ne!(from_file.path(), from_http.path(), "cached by path, so two entries");

    let want = tree(from_file.path());
    assert_eq!(tree(from_http.path()), want);
    assert_eq!(from_file.size_bytes(), from_http.size_bytes());
    assert_eq!(from_file.entries(), 10);
    assert_eq!(fs::read_to_string(from_file.path().join("app/readme-link")).unwrap(), "# demo\n");
    assert_eq!(want["app/bin/run.sh"].split(' ').nth(1), Some("755"));
    assert_eq!(want["app/pyproject.toml"].split(' ').nth(1), Some("644"));
    assert_eq!(want["app/demo/up"], "link -> ../bin");
    assert_eq!(want["app/empty"], "dir 755");
    let mixed = fs::metadata(from_file.path().join("data/mixed.bin")).unwrap().len();
    assert_eq!(mixed, 3 << 20);
    assert_eq!(fs::metadata(from_file.path()).unwrap().permissions().mode() & 0o777, 0o755);

    // Cached: no second request, and no phases.
    let (seen, progress) = phases();
    let again = cache.get(&http_path, None, progress).await.unwrap();
    assert!(again.from_cache());
    assert_eq!(again.path(), from_http.path());
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(served.gets("/bundles/b.zip"), 1);
    // A plain absolute path is a file:// path too.
    let plain = cache.get(local.to_str().unwrap(), None, |_| {}).await.unwrap();
    assert_eq!(tree(plain.path()), want);
    assert_eq!(cache.totals().entries, 3);
    assert!(cache_contents(&work.path().join("cache")).iter().all(|n| !n.starts_with(".tmp/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha256_is_a_mismatch_and_caches_nothing() {
    let work = tempfile::tempdir().unwrap();
    let bytes = sample_bundle();
    let (served, addr) = serve().await;
    served.put("/b.zip", bytes.clone());
    let dir = work.path().join("cache");
    let cache = BundleCache::new(config(&dir)).unwrap();
    let path = format!("http://{addr}/b.zip");
    let wrong = "0".repeat(64);
    let (seen, progress) = phases();
    let err = cache.get(&path, Some(&wrong), progress).await.unwrap_err();
    match &err {
        BundleError::HashMismatch { expected, actual, .. } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*actual, sha256_hex(&bytes));
        }
        other => panic!("expected a hash mismatch, got {other}"),
    }
    assert!(err.to_string().contains("but 0000"), "{err}");
    assert!(!seen.lock().unwrap().contains(&Phase::Extracting), "a mismatch is never extracted");
    assert_eq!(cache.totals().entries, 0);
    assert!(cache_contents(&dir).is_empty(), "{:?}", cache_contents(&dir));

    // Not cached: the right sha256 fetches again and works.
    let good = cache.get(&path, Some(&sha256_hex(&bytes)), |_| {}).await.unwrap();
    assert!(!good.from_cache());
    assert_eq!(served.gets("/b.zip"), 2);
    // And once cached, a wrong sha256 is still refused.
    let err = cache.get(&path, Some(&wrong), |_| {}).await.unwrap_err();
    assert!(matches!(err, BundleError::HashMismatch { .. }), "{err}");

    let err = cache.get(&path, Some("abc"), |_| {}).await.unwrap_err();
    assert!(matches!(err, BundleError::BadSha256 { .. }), "{err}");
    let err = cache.get(&format!("http://{addr}/missing.zip"), None, |_| {}).await.unwrap_err();
    assert!(matches!(err, BundleError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.zip"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_of_one_path_fetch_once() {
    let work = tempfile::tempdir().unwrap();
    let (served, addr) = serve().await;
    served.put("/b.zip", sample_bundle());
    *served.delay.lock().unwrap() = Duration::from_millis(300);
    let cache = BundleCache::new(config(&work.path().join("cache"))).unwrap();
    let path = format!("http://{addr}/b.zip");
    let mut gets = Vec::new();
    for _ in 0..16 {
        let cache = cache.clone();
        let path = path.clone();
        gets.push(tokio::spawn(async move {
            let (seen, progress) = phases();
            let bundle = cache.get(&path, None, progress).await.unwrap();
            let seen = seen.lock().unwrap().clone();
            (bundle, seen)
        }));
    }
    let mut results = Vec::new();
    for get in gets {
        results.push(get.await.unwrap());
    }
    assert_eq!(served.gets("/b.zip"), 1, "16 concurrent gets, one download");
    let fetched = results.iter().filter(|(b, _)| !b.from_cache()).count();
    assert_eq!(fetched, 1, "exactly one get did the fetch");
    let dir = results[0].0.path().to_path_buf();
    for (bundle, seen) in &results {
        assert_eq!(bundle.path(), dir);
        // Every waiter saw the fetch's phases, ending with extraction.
        assert_eq!(seen.last(), Some(&Phase::Extracting), "{seen:?}");
    }
    assert_eq!(cache.totals().entries, 1);
}

/// A zip with one file of `size` bytes of noise (incompressible, so its size is what it takes).
fn noise_bundle(size: usize, seed: u32) -> Vec<u8> {
    let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file("noise.bin", SimpleFileOptions::default()).unwrap();
    let mut state = seed;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 16) as u8
        })
        .collect();
    w.write_all(&data).unwrap();
    w.finish().unwrap().into_inner()
}

async fn get_local(cache: &BundleCache, path: &Path) -> Result<Bundle, BundleError> {
    cache.get(path.to_str().unwrap(), None, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lru_evicts_by_bytes_and_by_entries_but_never_a_bundle_in_use() {
    let work = tempfile::tempdir().unwrap();
    let src: Vec<PathBuf> = (0..4)
        .map(|i| {
            let path = work.path().join(format!("b{i}.zip"));
            fs::write(&path, noise_bundle(100_000, i)).unwrap();
            path
        })
        .collect();

    // By bytes: room for two 100 kB bundles.
    let dir = work.path().join("by-bytes");
    let cache = BundleCache::new(BundleConfig { max_bytes: 250_000, ..config(&dir) }).unwrap();
    let b0 = get_local(&cache, &src[0]).await.unwrap();
    let d0 = b0.path().to_path_buf();
    drop(b0);
    let b1 = get_local(&cache, &src[1]).await.unwrap();
    drop(b1);
    assert!(get_local(&cache, &src[0]).await.unwrap().from_cache()); // b0 now more recent than b1
    let b2 = get_local(&cache, &src[2]).await.unwrap();
    assert_eq!(cache.totals().entries, 2);
    assert_eq!(cache.totals().bytes, 200_000);
    assert!(d0.exists(), "b0 was used more recently than b1");
    assert!(!get_local(&cache, &src[1]).await.unwrap().from_cache(), "b1 was evicted");
    drop(b2);

    // By entries: room for one; the one held stays even when over the bound.
    let dir = work.path().join("by-entries");
    let cache = BundleCache::new(BundleConfig { max_entries: 1, ..config(&dir) }).unwrap();
    let held = get_local(&cache, &src[0]).await.unwrap();
    let held_dir = held.path().to_path_buf();
    let other = get_local(&cache, &src[1]).await.unwrap();
    assert_eq!(cache.totals().entries, 2, "both in use: over the bound, nothing evictable");
    drop(other);
    assert_eq!(cache.totals().entries, 1, "released and over the bound: evicted at once");
    assert!(held_dir.exists(), "the bundle held is never evicted");
    assert_eq!(fs::read_dir(&held_dir).unwrap().count(), 1);
    let third = get_local(&cache, &src[2]).await.unwrap();
    drop(held);
    assert_eq!(cache.totals().entries, 1);
    assert!(!held_dir.exists());
    assert!(third.path().exists());
    // Evicted directories are deleted on the blocking pool; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cache_contents(&dir).iter().all(|n| !n.starts_with(".tmp/")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = cache_contents(&dir);
    assert_eq!(left.len(), 2, "one bundle and its record: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cache_finds_its_bundles() {
    let work = tempfile::tempdir().unwrap();
    let (served, addr) = serve().await;
    served.put("/b.zip", sample_bundle());
    let dir = work.path().join("cache");
    let path = format!("http://{addr}/b.zip");
    let first = {
        let cache = BundleCache::new(config(&dir)).unwrap();
        // A second worker process on the same directory (a cache of its own: its own locks
        // and temp dir) shares what the first fetched instead of failing or fetching again.
        let other = BundleCache::new(config(&dir)).unwrap();
        let bundle = cache.get(&path, None, |_| {}).await.unwrap();
        let theirs = other.get(&path, None, |_| {}).await.unwrap();
        assert_eq!(theirs.path(), bundle.path());
        assert_eq!(served.gets("/b.zip"), 1, "fetched once for both");
        tree(theirs.path())
    };
    let cache = BundleCache::new(config(&dir)).unwrap();
    let again = cache.get(&path, None, |_| {}).await.unwrap();
    assert!(again.from_cache());
    assert_eq!(tree(again.path()), first);
    assert_eq!(served.gets("/b.zip"), 1);
}

/// A fetch whose runtime shuts down mid-download (a worker stopping) leaves no stuck entry:
/// the next get on another runtime fetches again.
#[test]
fn a_fetch_cut_off_by_its_runtime_is_retried() {
    let server = tokio::runtime::Runtime::new().unwrap();
    let (served, addr) = server.block_on(serve());
    served.put("/b.zip", sample_bundle());
    *served.delay.lock().unwrap() = Duration::from_millis(500);
    let work = tempfile::tempdir().unwrap();
    let cache = BundleCache::new(config(&work.path().join("cache"))).unwrap();
    let path = format!("http://{addr}/b.zip");

    let first = tokio::runtime::Runtime::new().unwrap();
    let (c, p) = (cache.clone(), path.clone());
    first.spawn(async move { c.get(&p, None, |_| {}).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while served.gets("/b.zip") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(first); // cancels the fetch while the server is still answering

    *served.delay.lock().unwrap() = Duration::ZERO;
    let second = tokio::runtime::Runtime::new().unwrap();
    let bundle = second.block_on(cache.get(&path, None, |_| {})).unwrap();
    assert!(!bundle.from_cache());
    assert_eq!(served.gets("/b.zip"), 2);
    assert_eq!(cache.totals().entries, 1);
}

// ---------------------------------------------------------------------------------------
// Hostile bundles.

/// Gets a hostile archive from a fresh cache in `work` and returns the rejection, after
/// checking that nothing was cached and nothing was written anywhere in `work` except the
/// archive itself and the cache's empty skeleton.
async fn reject(work: &Path, archive: &Path, limits: ExtractLimits) -> ExtractError {
    static CACHES: AtomicUsize = AtomicUsize::new(0);
    let dir = work.join(format!("cache{}", CACHES.fetch_add(1, Ordering::Relaxed)));
    let cache = BundleCache::new(BundleConfig { limits, ..config(&dir) }).unwrap();
    let before = tree(work);
    let err = cache.get(archive.to_str().unwrap(), None, |_| {}).await.unwrap_err();
    assert_eq!(cache.totals().entries, 0);
    assert!(cache_contents(&dir).is_empty(), "left in the cache: {:?}", cache_contents(&dir));
    assert_eq!(tree(work), before, "something was written in {}", work.display());
    // Nor is a lock file left for it (only the cache's own temp dir's, until it closes).
    assert!(lock_files(&dir).iter().all(|n| n.starts_with("tmp-")), "{:?}", lock_files(&dir));
    drop(cache);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(lock_files(&dir).is_empty() && fs::read_dir(dir.join(".tmp")).unwrap().count() == 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lock_files(&dir).is_empty(), "{:?}", lock_files(&dir));
    match err {
        BundleError::Rejected { source, .. } => source,
        other => panic!("expected a rejection, got {other}"),
    }
}

fn write_zip(path: &Path, build: impl FnOnce(&mut ZipWriter<BufWriter<File>>)) {
    let mut w = ZipWriter::new(BufWriter::new(File::create(path).unwrap()));
    build(&mut w);
    w.finish().unwrap().flush().unwrap();
}

fn opts() -> SimpleFileOptions {
    SimpleFileOptions::default()
}

#[tokio::test]
async fn zip_slip_is_rejected() {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("slip.zip");
    write_zip(&archive, |w| {
        w.start_file("ok.txt", opts()).unwrap();
        w.write_all(b"fine").unwrap();
        w.start_file("../x", opts()).unwrap();
        w.write_all(b"escaped").unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(matches!(err, ExtractError::ParentDir { ref entry } if entry == "../x"), "{err}");
    assert!(err.to_string().contains("\"../x\""), "{err}");
    // Deeper, and hidden in the middle of a path.
    write_zip(&archive, |w| {
        w.start_file("a/b/../../../../x", opts()).unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(matches!(err, ExtractError::ParentDir { .. }), "{err}");
}

#[tokio::test]
async fn an_absolute_path_is_rejected() {
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("absolute-target");
    let archive = work.path().join("abs.zip");
    let name = format!("{}", target.display());
    write_zip(&archive, |w| {
        w.start_file(name.as_str(), opts()).unwrap();
        w.write_all(b"escaped").unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(matches!(err, ExtractError::AbsolutePath { ref entry } if *entry == name), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    assert!(!target.exists());
}

#[tokio::test]
async fn a_symlink_escaping_and_a_file_written_through_it_are_rejected() {
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let archive = work.path().join("link.zip");
    // From <cache>/.tmp/<extraction>/link, ../../../outside is <work>/outside.
    write_zip(&archive, |w| {
        w.add_symlink("link", "../../../outside", opts()).unwrap();
        w.start_file("link/evil.txt", opts()).unwrap();
        w.write_all(b"written through the link").unwrap();
    });
    // The link is the first entry, and the first fault found.
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(
        matches!(err, ExtractError::SymlinkEscapes { ref entry, ref target } if entry == "link" && target == "../../../outside"),
        "{err}"
    );
    // The file written through it is refused on its own, whichever comes first.
    write_zip(&archive, |w| {
        w.start_file("link/evil.txt", opts()).unwrap();
        w.write_all(b"written through the link").unwrap();
        w.add_symlink("link", ".", opts()).unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(
        matches!(err, ExtractError::ThroughSymlink { ref entry, ref link } if entry == "link/evil.txt" && link == "link"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

    // The escaping link alone.
    write_zip(&archive, |w| {
        w.start_file("a.txt", opts()).unwrap();
        w.add_symlink("sub/link", "../../../../outside", opts()).unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(
        matches!(err, ExtractError::SymlinkEscapes { ref entry, ref target } if entry == "sub/link" && target == "../../../../outside"),
        "{err}"
    );
    // An absolute target escapes too.
    write_zip(&archive, |w| {
        w.add_symlink("etc", "/etc", opts()).unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(matches!(err, ExtractError::SymlinkEscapes { ref entry, .. } if entry == "etc"), "{err}");
    // A link pointing inside is fine, but nothing may be written through it either.
    write_zip(&archive, |w| {
        w.add_directory("real/", opts()).unwrap();
        w.add_symlink("alias", "real", opts()).unwrap();
        w.start_file("alias/x", opts()).unwrap();
    });
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    assert!(matches!(err, ExtractError::ThroughSymlink { ref entry, .. } if entry == "alias/x"), "{err}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[tokio::test]
async fn a_device_entry_is_rejected() {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("dev.zip");
    for (mode, kind) in [(0o020_666, "character device"), (0o060_660, "block device"), (0o010_644, "fifo")] {
        write_zip(&archive, |w| {
            w.start_file("ok.txt", opts()).unwrap();
            w.start_file("dev/null", opts().external_attributes(mode << 16)).unwrap();
        });
        let err = reject(work.path(), &archive, ExtractLimits::default()).await;
        assert!(
            matches!(err, ExtractError::SpecialFile { ref entry, kind: k, .. } if entry == "dev/null" && k == kind),
            "{err}"
        );
        assert!(err.to_string().contains("\"dev/null\"") && err.to_string().contains(kind), "{err}");
    }
}

/// 10 GiB of zeros in one deflated entry (about 10 MB), written with the zip crate in about
/// 3 s; extraction must stop a few megabytes in, on the ratio limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_stops_early() {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("bomb.zip");
    let started = Instant::now();
    write_zip(&archive, |w| {
        // Level 6 makes the same 1030:1 as level 9 at six times the speed.
        let options = opts().large_file(true).compression_level(Some(6));
        w.start_file("zeros.bin", options).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(10 << 10) {
            w.write_all(&zeros).unwrap();
        }
    });
    let made = started.elapsed();
    let size = fs::metadata(&archive).unwrap().len();
    assert!(size < 20 << 20, "the bomb is {size} bytes");
    let started = Instant::now();
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    let took = started.elapsed();
    assert!(
        matches!(err, ExtractError::RatioExceeded { ref entry, written, .. } if entry == "zeros.bin" && written < 64 << 20),
        "{err}"
    );
    eprintln!("bomb: {size} bytes made in {made:?}, rejected in {took:?}: {err}");

    // With the ratio limit out of the way, the total limit stops it as early.
    let limits = ExtractLimits { max_ratio: u64::MAX, max_total_bytes: 32 << 20, ..ExtractLimits::default() };
    let err = reject(work.path(), &archive, limits).await;
    assert!(matches!(err, ExtractError::TooManyBytes { ref entry, .. } if entry == "zeros.bin"), "{err}");
}

/// A million empty stored entries, written directly (zip64 end records and all): about 100 MB
/// in well under a second. The limit refuses it from the end record, before the central
/// directory is parsed.
#[tokio::test]
async fn a_million_entries_are_rejected() {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("million.zip");
    let started = Instant::now();
    write_many_entries(&archive, 1_000_000);
    let made = started.elapsed();
    let started = Instant::now();
    let err = reject(work.path(), &archive, ExtractLimits::default()).await;
    let took = started.elapsed();
    assert!(matches!(err, ExtractError::TooManyEntries { count: 1_000_000, limit: 200_000 }), "{err}");
    eprintln!("million: made in {made:?}, rejected in {took:?}: {err}");

    // The same writer's archive under the limit is a valid zip that extracts.
    write_many_entries(&archive, 1000);
    let cache = BundleCache::new(config(&work.path().join("ok"))).unwrap();
    let bundle = cache.get(archive.to_str().unwrap(), None, |_| {}).await.unwrap();
    assert_eq!(bundle.entries(), 1000);
    assert_eq!(fs::read_dir(bundle.path().join("d0")).unwrap().count(), 1000);
}

/// Writes `count` empty stored files `d<i/1000>/f<i>` with zip64 end records.
fn write_many_entries(path: &Path, count: u64) {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    let mut central = Vec::with_capacity(count as usize * 64);
    let mut offset: u64 = 0;
    for i in 0..count {
        let name = format!("d{}/f{i}", i / 1000);
        let name = name.as_bytes();
        // Local file header: stored, no data, crc 0, sizes 0.
        let mut local = Vec::with_capacity(30 + name.len());
        local.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        local.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
        local.extend_from_slice(&[0; 12]); // crc, compressed, uncompressed
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&[0, 0]); // extra length
        local.extend_from_slice(name);
        out.write_all(&local).unwrap();
        // Central directory header, made on unix (3) with mode 0644.
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
        central.extend_from_slice(&((0o100_644u32) << 16).to_le_bytes());
        central.extend_from_slice(&(offset as u32).to_le_bytes());
        central.extend_from_slice(name);
        offset += local.len() as u64;
    }
    let cd_offset = offset;
    out.write_all(&central).unwrap();
    let cd_size = central.len() as u64;
    let eocd64_offset = cd_offset + cd_size;
    // Zip64 end of central directory record.
    out.write_all(&0x0606_4b50u32.to_le_bytes()).unwrap();
    out.write_all(&44u64.to_le_bytes()).unwrap();
    out.write_all(&[45, 3, 45, 0]).unwrap();
    out.write_all(&[0; 8]).unwrap(); // disk numbers
    out.write_all(&count.to_le_bytes()).unwrap();
    out.write_all(&count.to_le_bytes()).unwrap();
    out.write_all(&cd_size.to_le_bytes()).unwrap();
    out.write_all(&cd_offset.to_le_bytes()).unwrap();
    // Its locator.
    out.write_all(&0x0706_4b50u32.to_le_bytes()).unwrap();
    out.write_all(&0u32.to_le_bytes()).unwrap();
    out.write_all(&eocd64_offset.to_le_bytes()).unwrap();
    out.write_all(&1u32.to_le_bytes()).unwrap();
    // The classic record, its counts saturated.
    out.write_all(&0x0605_4b50u32.to_le_bytes()).unwrap();
    out.write_all(&[0; 4]).unwrap();
    out.write_all(&[0xff; 4]).unwrap();
    out.write_all(&[0xff; 8]).unwrap();
    out.write_all(&[0, 0]).unwrap();
    let mut file = out.into_inner().unwrap();
    assert_eq!(file.stream_position().unwrap(), eocd64_offset + 56 + 20 + 22);
}

// ---------------------------------------------------------------------------------------
// Where bundles may come from: the operator's directories and public hosts only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_come_only_from_the_operators_directories_and_public_hosts() {
    use iris_worker::bundle::SourcePolicy;
    let work = tempfile::tempdir().unwrap();
    let allowed = work.path().join("allowed");
    fs::create_dir(&allowed).unwrap();
    let bytes = sample_bundle();
    fs::write(allowed.join("b.zip"), &bytes).unwrap();
    fs::write(work.path().join("secret.zip"), &bytes).unwrap();
    std::os::unix::fs::symlink(work.path().join("secret.zip"), allowed.join("link.zip")).unwrap();
    let (served, addr) = serve().await;
    served.put("/b.zip", bytes.clone());

    let strict = SourcePolicy { allowed_dirs: vec![allowed.clone()], ..Default::default() };
    let dir = work.path().join("cache");
    let cache = BundleCache::new(BundleConfig { sources: strict.clone(), ..BundleConfig::new(&dir) }).unwrap();
    cache.get(&format!("file://{}", allowed.join("b.zip").display()), None, |_| {}).await.unwrap();

    let refused = |e: BundleError, flag: &str| match &e {
        BundleError::Refused { .. } => assert!(e.to_string().contains(flag), "{e}"),
        other => panic!("expected a refusal naming {flag}, got {other}"),
    };
    for outside in [
        work.path().join("secret.zip"),
        work.path().join("missing.zip"), // no existence oracle: refused, not "not found"
        allowed.join("../secret.zip"),
        allowed.join("link.zip"),
        PathBuf::from("/etc/hostname"),
    ] {
        let e = cache.get(&format!("file://{}", outside.display()), None, |_| {}).await.unwrap_err();
        refused(e, "--allow-bundle-path");
    }
    for url in [
        format!("http://{addr}/b.zip"),
        format!("http://localhost:{}/b.zip", addr.port()),
        "http://169.254.169.254/latest/meta-data/b.zip".to_string(),
        format!("http://[::ffff:127.0.0.1]:{}/b.zip", addr.port()),
    ] {
        let e = cache.get(&url, None, |_| {}).await.unwrap_err();
        refused(e, "--allow-private-bundle-hosts");
    }
    assert_eq!(served.gets("/b.zip"), 0, "a refused host is never contacted");
    drop(cache);

    // The operator allows private hosts: the same URL works.
    let open = SourcePolicy { allow_private_hosts: true, ..strict.clone() };
    let cache = BundleCache::new(BundleConfig { sources: open, ..BundleConfig::new(&dir) }).unwrap();
    cache.get(&format!("http://localhost:{}/b.zip", addr.port()), None, |_| {}).await.unwrap();
    assert_eq!(served.gets("/b.zip"), 1);
    drop(cache);
    // Cached under the wider policy, refused under the narrower one.
    let cache = BundleCache::new(BundleConfig { sources: strict, ..BundleConfig::new(&dir) }).unwrap();
    let e = cache.get(&format!("http://localhost:{}/b.zip", addr.port()), None, |_| {}).await.unwrap_err();
    refused(e, "--allow-private-bundle-hosts");
}

/// Review of #14, finding 9: a `file://` bundle is opened once, beneath its allowed directory
/// and without blocking, and only a regular file is read. A FIFO there used to block a
/// blocking-pool thread for ever (the fetch never ended); a link that leads out, relative or
/// absolute, is refused; one that stays inside works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_bundle_must_be_a_regular_file_beneath_the_allowed_directory() {
    use iris_worker::bundle::SourcePolicy;
    let work = tempfile::tempdir().unwrap();
    let allowed = work.path().join("allowed");
    fs::create_dir_all(allowed.join("sub")).unwrap();
    let bytes = sample_bundle();
    fs::write(allowed.join("b.zip"), &bytes).unwrap();
    fs::write(work.path().join("secret.zip"), &bytes).unwrap();
    std::os::unix::fs::symlink("../b.zip", allowed.join("sub/latest.zip")).unwrap();
    std::os::unix::fs::symlink("../secret.zip", allowed.join("out.zip")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root/etc/hostname", allowed.join("magic.zip")).unwrap();
    let fifo = allowed.join("fifo.zip");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let policy = SourcePolicy { allowed_dirs: vec![allowed.clone()], ..Default::default() };
    let cache =
        BundleCache::new(BundleConfig { sources: policy, ..BundleConfig::new(work.path().join("cache")) }).unwrap();
    let url = |p: &Path| format!("file://{}", p.display());

    let got = tokio::time::timeout(Duration::from_secs(30), cache.get(&url(&fifo), None, |_| {})).await;
    if got.is_err() {
        // Wake the reader stuck in open(2) so the runtime can shut down, then fail.
        drop(fs::OpenOptions::new().write(true).open(&fifo));
        panic!("the fetch of a FIFO did not end");
    }
    let e = got.unwrap().unwrap_err();
    assert!(matches!(e, BundleError::BadPath { .. }) && e.to_string().contains("not a regular file"), "{e}");
    let e = cache.get(&url(&allowed.join("sub")), None, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    for out in ["out.zip", "magic.zip"] {
        let e = cache.get(&url(&allowed.join(out)), None, |_| {}).await.unwrap_err();
        assert!(
            matches!(e, BundleError::Refused { .. }) && e.to_string().contains("--allow-bundle-path"),
            "{out}: {e}"
        );
    }
    let b = cache.get(&url(&allowed.join("sub/latest.zip")), None, |_| {}).await.unwrap();
    assert_eq!(b.sha256(), hex::encode(Sha256::digest(&bytes)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_purpose_and_tunnelled_addresses_and_the_controllers_other_paths_are_refused() {
    use iris_worker::bundle::{ControllerSource, SourcePolicy};
    let work = tempfile::tempdir().unwrap();
    let refused = |e: BundleError| match &e {
        BundleError::Refused { .. } => assert!(e.to_string().contains("--allow-private-bundle-hosts"), "{e}"),
        other => panic!("expected a refusal naming --allow-private-bundle-hosts, got {other}"),
    };
    let cache = BundleCache::new(BundleConfig::new(work.path().join("strict"))).unwrap();
    for host in [
        "192.0.0.170",            // IETF protocol assignments
        "198.18.0.1",             // benchmarking
        "[64:ff9b:1::a9fe:a9fe]", // local-use NAT64
        "[2002:7f00:1::1]",       // 6to4 of 127.0.0.1
        "[2002:a9fe:a9fe::1]",    // 6to4 of 169.254.169.254
        "[::a9fe:a9fe]",          // IPv4-compatible 169.254.169.254
        "[2001:0:4136:e378::1]",  // Teredo
    ] {
        let e = cache.get(&format!("http://{host}/b.zip"), None, |_| {}).await.unwrap_err();
        refused(e);
    }
    drop(cache);

    // The worker's controller (on loopback here) is trusted for its inline bundles only: another
    // path on it is an ordinary URL, and where it redirects is checked like any other URL.
    let (controller, addr) = serve().await;
    let (elsewhere, other) = serve().await;
    let bytes = sample_bundle();
    let sha = sha256_hex(&bytes);
    controller.put(&format!("/bundles/{sha}.zip"), bytes.clone());
    controller.put("/admin/dump.zip", bytes.clone());
    elsewhere.put("/b.zip", bytes.clone());
    let moved = format!("/bundles/{}.zip", "0".repeat(64));
    controller.redirects.lock().unwrap().insert(moved.clone(), format!("http://localhost:{}/b.zip", other.port()));
    let policy = SourcePolicy {
        controller: ControllerSource::new(&format!("http://{addr}"), iris_wire::auth::AuthToken::new("t"), None),
        ..Default::default()
    };
    let cache = BundleCache::new(BundleConfig { sources: policy, ..BundleConfig::new(work.path().join("controller")) })
        .unwrap();
    cache.get(&format!("http://{addr}/bundles/{sha}.zip"), None, |_| {}).await.unwrap();
    refused(cache.get(&format!("http://{addr}/admin/dump.zip"), None, |_| {}).await.unwrap_err());
    assert_eq!(controller.gets("/admin/dump.zip"), 0, "another path on the controller is not trusted");
    refused(cache.get(&format!("http://{addr}{moved}"), None, |_| {}).await.unwrap_err());
    assert_eq!(elsewhere.gets("/b.zip"), 0, "a redirect from the controller to a private host is not followed");
}

#[test]
#[ignore = "root: a network namespace of the test's own"]
fn the_hosts_own_public_addresses_are_refused() {
    use iris_worker::bundle::SourcePolicy;
    // A thread in a network namespace of its own, whose loopback carries a public (TEST-NET-3)
    // address: a service there is this host's, whatever its address says.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        for args in [&["link", "set", "lo", "up"][..], &["addr", "add", "203.0.113.9/32", "dev", "lo"]] {
            let out = std::process::Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let policy = SourcePolicy::default();
        let own: url::Url = "http://203.0.113.9:8000/b.zip".parse().unwrap();
        let e = policy.check_url(&own).unwrap_err();
        assert!(e.to_string().contains("this host's own address"), "{e}");
        assert!(e.to_string().contains("--allow-private-bundle-hosts"), "{e}");
        let e = policy.filter_resolved("own.example", vec!["203.0.113.9:80".parse().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("--allow-private-bundle-hosts"), "{e}");
        let other: url::Url = "http://203.0.113.10:8000/b.zip".parse().unwrap();
        assert!(policy.check_url(&other).is_ok(), "a public address not this host's passes");
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker running tasks"]
async fn a_worker_fails_tasks_whose_bundle_the_operator_does_not_allow() {
    let w = common::Worker::start("bundle-sources", &[]).await;
    let mut c = w.client().await;
    let (served, addr) = serve().await;
    served.put("/b.zip", sample_bundle());
    for (id, path, flag) in [
        ("sources/file", "file:///etc/hostname".to_string(), "--allow-bundle-path"),
        ("sources/http", format!("http://{addr}/b.zip"), "--allow-private-bundle-hosts"),
    ] {
        let mut req = common::task(id, &["/bin/true"]);
        req.bundle_gcs_path = path;
        c.run_task(req).await.unwrap();
        let s = common::wait_end(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(common::state_of(&s), iris_worker::task::TaskState::Failed, "{s:?}");
        assert!(s.error.contains(flag), "{id}: {}", s.error);
    }
    assert_eq!(served.gets("/b.zip"), 0);
}

// ---------------------------------------------------------------------------------------
// Several processes on one cache (review of #13).

/// The lock files under `dir/.locks`, by name.
fn lock_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir.join(".locks")) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// A worker that died between moving a bundle's directory into place and writing its record
/// leaves `<key>/` without a record (finding 3): the next fetch of that path, in a process
/// that opened the cache before (so did not tidy it), publishes over it instead of failing on
/// the rename (ENOTEMPTY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_publishers_directory_without_its_record_is_replaced() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("b.zip");
    fs::write(&src, sample_bundle()).unwrap();
    let want = {
        let fresh = BundleCache::new(config(&work.path().join("fresh"))).unwrap();
        tree(get_local(&fresh, &src).await.unwrap().path())
    };
    let dir = work.path().join("cache");
    let cache = BundleCache::new(config(&dir)).unwrap();
    let key = sha256_hex(src.to_str().unwrap().as_bytes());
    fs::create_dir_all(dir.join(&key).join("app/half")).unwrap();
    fs::write(dir.join(&key).join("app/half/written"), b"cut short").unwrap();
    let bundle = get_local(&cache, &src).await.unwrap();
    assert!(!bundle.from_cache());
    assert_eq!(bundle.path(), dir.join(&key));
    assert_eq!(tree(bundle.path()), want, "the leftover is gone, the bundle whole");
    drop(bundle);
    // And a restarted cache finds it recorded.
    drop(cache);
    let again = BundleCache::new(config(&dir)).unwrap();
    assert!(get_local(&again, &src).await.unwrap().from_cache());
}

/// Two worker processes sharing one cache fetch a bundle they both ask for at once a single
/// time (review of #13, finding 13: counted at the server, not inferred from the entries): the
/// other process waits for the fetch and uses what it published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_getting_one_bundle_at_once_fetch_it_once() {
    let work = tempfile::tempdir().unwrap();
    let (served, addr) = serve().await;
    served.put("/b.zip", sample_bundle());
    *served.delay.lock().unwrap() = Duration::from_millis(300);
    let dir = work.path().join("cache");
    let caches = [BundleCache::new(config(&dir)).unwrap(), BundleCache::new(config(&dir)).unwrap()];
    let path = format!("http://{addr}/b.zip");
    let mut gets = Vec::new();
    for i in 0..8 {
        let (cache, path) = (caches[i % 2].clone(), path.clone());
        gets.push(tokio::spawn(async move { cache.get(&path, None, |_| {}).await.unwrap() }));
    }
    let mut bundles = Vec::new();
    for get in gets {
        bundles.push(get.await.unwrap());
    }
    assert_eq!(served.gets("/b.zip"), 1, "8 gets in two processes, one download");
    assert_eq!(bundles.iter().filter(|b| !b.from_cache()).count(), 1, "one get fetched it");
    assert!(bundles.iter().all(|b| b.path() == bundles[0].path()));
    assert_eq!(tree(bundles[0].path()), tree(bundles[1].path()));
}

/// A closed cache takes its temp dir and that dir's lock file with it, and what opening a
/// cache tidies (a dead process's temp dir, a directory without its record, a bad record)
/// goes with its lock file (finding 22): lock files do not pile up for entries that are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_cache_and_the_leftovers_it_tidies_leave_no_lock_files() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("b.zip");
    fs::write(&src, noise_bundle(1000, 7)).unwrap();
    let dir = work.path().join("cache");
    let key = sha256_hex(src.to_str().unwrap().as_bytes());
    {
        let cache = BundleCache::new(config(&dir)).unwrap();
        drop(get_local(&cache, &src).await.unwrap());
        // Rejected: no lock file stays for it either (finding 14).
        let bad = work.path().join("bad.zip");
        fs::write(&bad, b"not a zip").unwrap();
        get_local(&cache, &bad).await.unwrap_err();
    }
    // The closed cache removes its temp dir, then that dir's lock file, off the runtime's
    // threads: wait for both, not only the first.
    let only_bundle_lock = [format!("{key}.lock")];
    let deadline = Instant::now() + Duration::from_secs(10);
    while (fs::read_dir(dir.join(".tmp")).unwrap().count() > 0 || lock_files(&dir) != only_bundle_lock)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fs::read_dir(dir.join(".tmp")).unwrap().count(), 0, "the closed cache's temp dir is gone");
    assert_eq!(lock_files(&dir), only_bundle_lock, "only the bundle's own lock file stays");

    // What dead processes left: a temp dir, a directory without its record, a bad record; all
    // were locked once (a lock file each).
    fs::create_dir_all(dir.join(".tmp/1-work-0-0/x")).unwrap();
    let orphan = "0".repeat(64);
    fs::create_dir(dir.join(&orphan)).unwrap();
    fs::write(dir.join("1".repeat(64) + ".json"), b"{").unwrap();
    let locks = iris_worker::cachelock::EntryLocks::new(&dir);
    for k in ["tmp-1-work-0-0".to_string(), orphan.clone(), "1".repeat(64)] {
        drop(locks.exclusive(&k).unwrap());
    }
    let cache = BundleCache::new(config(&dir)).unwrap();
    assert!(!dir.join(&orphan).exists());
    let mut left = lock_files(&dir);
    left.retain(|n| !n.starts_with("tmp-"));
    assert_eq!(left, [format!("{key}.lock")], "the tidied entries' lock files went with them");
    assert_eq!(lock_files(&dir).iter().filter(|n| n.starts_with("tmp-")).count(), 1, "the open cache's own");
    drop(cache);
}

/// A bundle cache that could not be opened (here: something in the way of its directory) is
/// opened again by the next task once the cause is gone (finding 2): the failure is the
/// task's, never the worker's for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker running tasks"]
async fn a_bundle_cache_that_failed_to_open_is_opened_by_the_next_task() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("b.zip");
    fs::write(&src, sample_bundle()).unwrap();
    let cache = work.path().join("cache");
    fs::create_dir_all(cache.join("bundles")).unwrap();
    // Where the cache's temp dirs go: opening it fails while this file is there.
    fs::write(cache.join("bundles/.tmp"), b"in the way").unwrap();
    let allow = std::env::temp_dir();
    let fixtures = PathBuf::from(std::env::var("IRIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/iris-worker".into()));
    let python = fixtures.join("rootfs/python");
    let w = common::Worker::start(
        "bundle-reopen",
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--allow-bundle-path",
            allow.to_str().unwrap(),
            "--python-rootfs",
            python.to_str().unwrap(),
        ],
    )
    .await;
    let mut c = w.client().await;
    let run = |id: &str| {
        let mut req = common::task(id, &["/bin/true"]);
        req.bundle_gcs_path = format!("file://{}", src.display());
        req
    };
    c.run_task(run("reopen/blocked")).await.unwrap();
    let s = common::wait_end(&mut c, "reopen/blocked", Duration::from_secs(60)).await;
    assert_eq!(common::state_of(&s), iris_worker::task::TaskState::Failed, "{s:?}");
    assert!(s.error.contains("bundle cache"), "{}", s.error);
    fs::remove_file(cache.join("bundles/.tmp")).unwrap();
    c.run_task(run("reopen/clear")).await.unwrap();
    let s = common::wait_end(&mut c, "reopen/clear", Duration::from_secs(60)).await;
    assert_eq!(common::state_of(&s), iris_worker::task::TaskState::Succeeded, "{s:?}");
}
