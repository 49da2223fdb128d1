//! One budget for every cache (issue 20): bundles, venvs, uv's cache and image layers on a
//! small real filesystem (a tmpfs each test mounts and removes) stay within `--cache-size`
//! while many different ones are used; what a task of any worker process uses is never
//! evicted, even while its worker is down; a filesystem below the soft threshold gives space
//! back; `iris-worker cache ls` names who uses an entry and `cache prune` never removes it.
//!
//! Root-only (`#[ignore = "root: …"]`): mounts, containers. The Python tasks use the fixtures'
//! python rootfs and wheels, offline.

mod common;
#[path = "common/registry.rs"]
mod registry;
#[path = "common/smallfs.rs"]
mod smallfs;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use iris_worker::proto::worker;
use iris_worker::task::TaskState;
use sha2::Digest;
use smallfs::{SmallFs, du};

const WITHIN: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("IRIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/iris-worker".into()))
}

/// Worker flags for Python tasks with their caches in `cache`, offline with the fixture wheels.
fn python_flags(cache: &Path) -> Vec<String> {
    [
        "--cache-dir",
        cache.to_str().unwrap(),
        "--python-rootfs",
        fixtures().join("rootfs/python").to_str().unwrap(),
        "--uv-find-links",
        fixtures().join("wheels").to_str().unwrap(),
        "--uv-offline",
        "true",
        // The tests' bundles are zips in temp dirs.
        "--allow-bundle-path",
        std::env::temp_dir().to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn flags<'a>(base: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().map(String::as_str).chain(more.iter().copied()).collect()
}

/// Bytes that do not compress, different for each seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A bundle: a uv project `proj-<n>` of its own (so it gets a venv of its own) with `bytes` of
/// noise. Returns its `file://` path.
fn bundle(dir: &Path, n: u64, bytes: usize) -> String {
    let path = dir.join(format!("bundle-{n}.zip"));
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("pyproject.toml", stored).unwrap();
    let project = format!("[project]\nname = \"proj-{n}\"\nversion = \"0.1.{n}\"\nrequires-python = \">=3.11\"\n");
    z.write_all(project.as_bytes()).unwrap();
    z.start_file("data/noise.bin", stored).unwrap();
    z.write_all(&noise(bytes, n)).unwrap();
    z.finish().unwrap();
    format!("file://{}", path.display())
}

/// A Python task with `bundle` (its command runs in the bundle's venv).
fn python_task(task_id: &str, bundle: &str, script: &str) -> worker::RunTaskRequest {
    let mut req = task(task_id, &["python3", "-c", script]);
    req.bundle_gcs_path = bundle.to_string();
    req
}

fn image_task(task_id: &str, image: &str, script: &str) -> worker::RunTaskRequest {
    let mut req = sh(task_id, script);
    req.image = image.to_string();
    req
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len() as u64)
}

/// An OCI layout in `dir` with images `img-0` … `img-<n-1>`: the fixture busybox image's base
/// layer (shared) and a top layer of each image's own with `bytes` of noise in `/noise`.
/// Returns their references (`oci:<dir>:img-<i>`).
fn images_layout(dir: &Path, n: u64, bytes: usize) -> Vec<String> {
    let fixture = registry::layout();
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let read_json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let index = read_json(fixture.join("index.json"));
    let busybox = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "busybox")
        .expect("the fixture's busybox image")
        .clone();
    let blob = |digest: &serde_json::Value| {
        fixture.join("blobs/sha256").join(digest.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let manifest = read_json(blob(&busybox["digest"]));
    let base = manifest["layers"][0].clone();
    let config = manifest["config"].clone();
    for d in [&base["digest"], &config["digest"]] {
        let to = dir.join("blobs/sha256").join(d.as_str().unwrap().trim_start_matches("sha256:"));
        if !to.exists() {
            std::os::unix::fs::symlink(blob(d), to).unwrap();
        }
    }
    let mut manifests = Vec::new();
    let mut refs = Vec::new();
    for i in 0..n {
        let mut tar = tar::Builder::new(Vec::new());
        let header = |kind: tar::EntryType, size: usize, mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size as u64);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            h
        };
        tar.append_data(&mut header(tar::EntryType::Directory, 0, 0o755), "noise/", std::io::empty()).unwrap();
        let data = noise(bytes, 1000 + i);
        let mut file = header(tar::EntryType::Regular, data.len(), 0o644);
        tar.append_data(&mut file, format!("noise/{i}"), data.as_slice()).unwrap();
        let (layer, layer_size) = write_blob(dir, &tar.into_inner().unwrap());
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [base, {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
        });
        let (digest, size) = write_blob(dir, &serde_json::to_vec(&m).unwrap());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": format!("img-{i}")},
        }));
        refs.push(format!("oci:{}:img-{i}", dir.display()));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    refs
}

async fn run(c: &mut Client, req: worker::RunTaskRequest) -> worker::LogEntry {
    let id = req.task_id.clone();
    c.run_task(req).await.unwrap();
    let s = wait_end(c, &id, WITHIN).await;
    let logs = all_logs(c, &id).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{id}: {s:?}\n{logs:#?}");
    logs.into_iter().rfind(|l| l.source == "stdout").unwrap_or_default()
}

/// `GET path` from the worker's port: the body.
fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The value of the series `name{labels}` in the worker's /metrics.
fn metric(addr: &str, series: &str) -> f64 {
    let text = get(addr, "/metrics");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

/// Polls until `cond` holds (or panics with `what` after `within`).
async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match cond() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && !n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn venv_keys(cache: &Path) -> Vec<String> {
    entries(&cache.join("venvs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, runs containers"]
async fn the_budget_holds_while_50_bundles_venvs_and_images_are_used() {
    let fs = SmallFs::tmpfs("300m", None);
    let cache = fs.path("cache");
    let files = tempfile::Builder::new().prefix("iwtest-cache-files-").tempdir().unwrap();
    let images = images_layout(&files.path().join("layout"), 25, MIB as usize);
    let budget = 24 * MIB;
    let base = python_flags(&cache);
    let w = Worker::start("cache-budget", &flags(&base, &["--cache-size", "24M"])).await;
    let mut c = w.client().await;
    // What the budget counts is what `du` sees, give or take the records, the lock files and
    // the small files of the shared busybox layer (counted by their lengths).
    let slack = 3 * MIB;
    let first_bundle = bundle(files.path(), 0, MIB as usize);
    for i in 0..50u64 {
        if i % 2 == 0 {
            let b = if i == 0 { first_bundle.clone() } else { bundle(files.path(), i, MIB as usize) };
            let out = run(&mut c, python_task(&format!("budget/py-{i}"), &b, "import cloudpickle; print('py')")).await;
            assert_eq!(out.data, "py");
        } else {
            let image = &images[(i / 2) as usize];
            let out = run(&mut c, image_task(&format!("budget/img-{i}"), image, "ls /noise")).await;
            assert_eq!(out.data, (i / 2).to_string());
        }
        // The janitor runs beside the tasks, kicked when each one published what it made.
        eventually(&format!("the caches within {budget} bytes after task {i}"), Duration::from_secs(30), || {
            let used = du(&cache);
            if used <= budget + slack { Ok(()) } else { Err(format!("{used} bytes in the caches")) }
        })
        .await;
    }
    let evicted: f64 = ["bundles", "venvs", "images"]
        .iter()
        .map(|k| metric(&w.addr(), &format!("iris_worker_cache_evictions_total{{kind=\"{k}\"}}")))
        .sum();
    assert!(evicted >= 20.0, "{evicted} evictions");
    assert!(metric(&w.addr(), "iris_worker_cache_bytes{kind=\"venvs\"}") > 0.0);
    assert!(metric(&w.addr(), "iris_worker_cache_limit_bytes{limit=\"total\"}") == budget as f64);
    let free = metric(&w.addr(), "iris_worker_disk_free_bytes{filesystem=\"cache/images\"}");
    assert!(free > 200.0 * MIB as f64, "{free}");
    // The dashboard's cache panel reads /api/cache: the same figures.
    let api: serde_json::Value = serde_json::from_str(&get(&w.addr(), "/api/cache")).unwrap();
    let venvs = api["kinds"].as_array().unwrap().iter().find(|k| k["kind"] == "venvs").unwrap().clone();
    assert_eq!(venvs["bytes"].as_f64(), Some(metric(&w.addr(), "iris_worker_cache_bytes{kind=\"venvs\"}")), "{api}");
    assert!(venvs["evictions"].as_u64().unwrap() > 0 && venvs["misses"].as_u64().unwrap() == 25, "{api}");
    assert_eq!(api["limitBytes"].as_u64(), Some(budget), "{api}");
    let disk = api["filesystems"].as_array().unwrap().iter().find(|f| f["name"] == "cache/images").unwrap();
    assert_eq!(disk["level"], "ok", "{api}");
    assert!(api["pressure"].is_null(), "{api}");
    let page = get(&w.addr(), "/");
    assert!(page.contains("id=\"cache-kinds\"") && page.contains("/assets/cache.js"), "{page}");
    assert!(get(&w.addr(), "/assets/cache.js").contains("fetch(\"/api/cache\""));
    // The first task's bundle and venv are long gone: running it again costs a fetch and a
    // build, never a failure.
    let out = run(&mut c, python_task("budget/again", &first_bundle, "import cloudpickle; print('again')")).await;
    assert_eq!(out.data, "again");
    let s = status(&mut c, "budget/again").await;
    assert!(!s.build_metrics.unwrap().from_cache, "the venv was built again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, runs containers"]
async fn what_a_task_of_another_worker_uses_survives_eviction_even_while_that_worker_is_down() {
    let fs = SmallFs::tmpfs("300m", None);
    let cache = fs.path("cache");
    let files = tempfile::Builder::new().prefix("iwtest-cache-files-").tempdir().unwrap();
    let images = images_layout(&files.path().join("layout"), 3, 256 << 10);
    let base = python_flags(&cache);
    // Worker A runs a Python task and an image task that stay; worker B, on the same cache,
    // may keep 1 MiB: each scan of its janitor evicts everything it may.
    let mut a = Worker::start("cache-share-a", &flags(&base, &[])).await;
    let b = Worker::start("cache-share-b", &flags(&base, &["--cache-size", "1M"])).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let held_bundle = bundle(files.path(), 1, 512 << 10);
    ca.run_task(python_task("share/py", &held_bundle, "import time; print('up', flush=True); time.sleep(600)"))
        .await
        .unwrap();
    ca.run_task(image_task("share/img", &images[0], "echo up; sleep 600")).await.unwrap();
    for id in ["share/py", "share/img"] {
        wait_for(&mut ca, id, WITHIN, |s| state_of(s) == TaskState::Running).await;
    }
    let held_venvs = venv_keys(&cache);
    let held_bundles = entries(&cache.join("bundles"));
    let held_layers = entries(&cache.join("images/layers"));
    assert_eq!((held_venvs.len(), held_bundles.len(), held_layers.len()), (1, 1, 2));

    // B uses other entries; its janitor evicts them once its tasks end, never A's.
    let check_held = || {
        assert_eq!(venv_keys(&cache), held_venvs, "worker A's venv");
        assert_eq!(entries(&cache.join("bundles")), held_bundles, "worker A's bundle");
        for l in &held_layers {
            assert!(entries(&cache.join("images/layers")).contains(l), "worker A's layer {l}");
        }
    };
    let mut i = 10;
    let mut b_round = async |cb: &mut Client| {
        i += 1;
        run(cb, python_task(&format!("share/b-{i}"), &bundle(files.path(), i, 512 << 10), "print('b')")).await;
        run(cb, image_task(&format!("share/b-img-{i}"), &images[1 + i as usize % 2], "true")).await;
        // B's own entries go (it may keep 1 MiB); A's stay.
        eventually("worker B's entries evicted", Duration::from_secs(30), || {
            let venvs = venv_keys(&cache);
            if venvs.len() == 1 { Ok(()) } else { Err(format!("venvs {venvs:?}")) }
        })
        .await;
    };
    b_round(&mut cb).await;
    check_held();
    assert!(metric(&b.addr(), "iris_worker_cache_evictions_total{kind=\"venvs\"}") >= 1.0);
    assert_eq!(metric(&b.addr(), "iris_worker_cache_in_use{kind=\"venvs\"}"), 1.0);

    // Worker A dies; its tasks run on under their supervisors, which hold what they use.
    a.kill9();
    b_round(&mut cb).await;
    check_held();

    // A is back; once its tasks end, what they used is B's to evict.
    a.spawn().await;
    let mut ca = a.client().await;
    for id in ["share/py", "share/img"] {
        ca.kill_task(worker::KillTaskRequest { task_id: id.into(), term_timeout_ms: 100 }).await.unwrap();
        wait_end(&mut ca, id, WITHIN).await;
    }
    run(&mut cb, image_task("share/b-last", &images[2], "true")).await;
    eventually("worker A's entries evicted once its tasks ended", Duration::from_secs(30), || {
        let (venvs, bundles) = (venv_keys(&cache), entries(&cache.join("bundles")));
        if venvs.is_empty() && bundles.is_empty() {
            Ok(())
        } else {
            Err(format!("venvs {venvs:?} bundles {bundles:?}"))
        }
    })
    .await;
}

fn cache_cli(args: &[&str], cache: &Path) -> String {
    let out = Command::new(exe()).arg("cache").args(args).arg("--cache-dir").arg(cache).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cache {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, runs containers"]
async fn cache_ls_names_the_task_using_an_entry_and_prune_never_removes_it() {
    let fs = SmallFs::tmpfs("300m", None);
    let cache = fs.path("cache");
    let files = tempfile::Builder::new().prefix("iwtest-cache-files-").tempdir().unwrap();
    let images = images_layout(&files.path().join("layout"), 2, 256 << 10);
    let base = python_flags(&cache);
    let w = Worker::start("cache-cli", &flags(&base, &[])).await;
    let mut c = w.client().await;
    let done_bundle = bundle(files.path(), 1, 256 << 10);
    run(&mut c, python_task("cli/done", &done_bundle, "print('done')")).await;
    run(&mut c, image_task("cli/done-img", &images[1], "true")).await;
    let held = bundle(files.path(), 2, 256 << 10);
    c.run_task(python_task("cli/held", &held, "import time; print('up', flush=True); time.sleep(600)")).await.unwrap();
    c.run_task(image_task("cli/held-img", &images[0], "sleep 600")).await.unwrap();
    for id in ["cli/held", "cli/held-img"] {
        wait_for(&mut c, id, WITHIN, |s| state_of(s) == TaskState::Running).await;
    }

    let ls = cache_cli(&["ls"], &cache);
    assert!(ls.contains("bundles        2"), "{ls}");
    assert!(ls.contains("venvs          2"), "{ls}");
    assert!(ls.contains(&format!("task {}", "cli/held")), "the running task is named: {ls}");
    assert!(ls.contains("task cli/held-img"), "{ls}");
    assert!(ls.contains(&held["file://".len()..]), "bundles by path: {ls}");
    assert!(ls.contains(":img-0"), "layers by the images that use them: {ls}");
    let venvs_before = venv_keys(&cache);

    // Nothing is that old.
    let none = cache_cli(&["prune", "--older-than", "1h"], &cache);
    assert!(none.starts_with("removed nothing"), "{none}");
    assert_eq!(venv_keys(&cache), venvs_before);
    // --kind narrows: only bundles go, and the running task's stays.
    let bundles = cache_cli(&["prune", "--all", "--kind", "bundles"], &cache);
    assert!(bundles.starts_with("removed 1 entries"), "{bundles}");
    assert!(bundles.contains("kept bundles") && bundles.contains("in use by task cli/held"), "{bundles}");
    assert_eq!(venv_keys(&cache), venvs_before);
    let all = cache_cli(&["prune", "--all"], &cache);
    assert!(all.contains("venvs 1") && all.contains("images 1"), "the done task's venv and layer: {all}");
    assert!(all.contains("kept venvs venv:") && all.contains("task cli/held"), "{all}");
    assert!(all.contains("in use by task cli/held-img"), "{all}");
    // The running tasks' entries are all there, and they still work.
    assert_eq!(venv_keys(&cache).len(), 1);
    assert_eq!(entries(&cache.join("bundles")).len(), 1);
    let ls = cache_cli(&["ls", "--kind", "venvs"], &cache);
    assert!(ls.contains("venvs          1"), "{ls}");
    for id in ["cli/held", "cli/held-img"] {
        assert_eq!(state_of(&status(&mut c, id).await), TaskState::Running, "{id}");
    }
    let bad = Command::new(exe()).args(["cache", "prune"]).arg("--cache-dir").arg(&cache).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--older-than AGE or --all"));
    let bad = Command::new(exe()).args(["cache", "ls", "--kind", "layers"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a cache kind"), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, runs containers"]
async fn below_the_soft_threshold_unused_entries_go_until_the_target_is_free() {
    let fs = SmallFs::tmpfs("200m", None);
    let cache = fs.path("cache");
    let files = tempfile::Builder::new().prefix("iwtest-cache-files-").tempdir().unwrap();
    let images = images_layout(&files.path().join("layout"), 8, 4 * MIB as usize);
    let w = Worker::start(
        "cache-soft",
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--min-free-disk",
            "10M",
            "--soft-free-disk",
            "60M",
            "--target-free-disk",
            "100M",
        ],
    )
    .await;
    let mut c = w.client().await;
    for (i, image) in images.iter().enumerate() {
        run(&mut c, image_task(&format!("soft/img-{i}"), image, "true")).await;
    }
    c.run_task(image_task("soft/held", &images[0], "sleep 600")).await.unwrap();
    wait_for(&mut c, "soft/held", WITHIN, |s| state_of(s) == TaskState::Running).await;
    let layers = entries(&cache.join("images/layers"));
    assert_eq!(layers.len(), 9, "a base and 8 tops: {layers:?}");
    let (_, free) = fs.space();
    assert!(free > 100 * MIB, "{free}");
    // Something else fills the disk: below 60 MiB free, the caches give space back at once
    // (least recently used first), until 100 MiB are free — here, everything no task uses.
    let filler = fs.fill_until_free(40 * MIB);
    eventually("evictions down to the target", Duration::from_secs(20), || {
        let left = entries(&cache.join("images/layers"));
        if left.len() == 2 { Ok(()) } else { Err(format!("{left:?}")) }
    })
    .await;
    let (_, free) = fs.space();
    assert!(free > 60 * MIB, "{free} free");
    assert!(metric(&w.addr(), "iris_worker_cache_evictions_total{kind=\"images\"}") >= 7.0);
    // The running task's two layers stayed; the worker takes tasks (only soft pressure).
    assert_eq!(state_of(&status(&mut c, "soft/held").await), TaskState::Running);
    let out = run(&mut c, sh("soft/ok", "echo ok")).await;
    assert_eq!(out.data, "ok");
    assert_eq!(metric(&w.addr(), "iris_worker_disk_pressure{filesystem=\"cache/images\"}"), 0.0);
    std::fs::remove_file(filler).unwrap();
}

/// `cleanup --all` on a cache another worker shares: what that worker uses (a bundle whose
/// shared lock it holds, a port its task holds) stays; what nobody uses goes, lock files too;
/// what is not a cache's (a rootfs tree kept under the cache directory) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_all_removes_only_what_no_process_holds() {
    use iris_worker::bundle::{BundleCache, BundleConfig, SourcePolicy};
    use iris_worker::cachelock::EntryLocks;
    let work = tempfile::Builder::new().prefix("iwtest-cleanup-").tempdir().unwrap();
    let (cache, state, ports) = (work.path().join("cache"), work.path().join("state"), work.path().join("ports"));
    let sources = SourcePolicy { allowed_dirs: vec![work.path().to_path_buf()], ..SourcePolicy::default() };
    let other_worker = BundleCache::new(BundleConfig { sources, ..BundleConfig::new(cache.join("bundles")) }).unwrap();
    let held = other_worker.get(&bundle(work.path(), 1, 1024), None, |_| {}).await.unwrap();
    let unused = other_worker.get(&bundle(work.path(), 2, 1024), None, |_| {}).await.unwrap();
    let unused_dir = unused.path().to_path_buf();
    drop(unused);
    std::fs::create_dir_all(cache.join("rootfs/busybox/bin")).unwrap();
    let port_locks = EntryLocks::new(&ports);
    let held_port = port_locks.shared("port-30001").unwrap();
    drop(port_locks.exclusive("port-30002").unwrap()); // a worker killed while it looked
    let lock_files = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(".locks"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };

    let out = Command::new(exe())
        .args(["cleanup", "--all", "--state-dir"])
        .arg(&state)
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--port-lock-dir")
        .arg(&ports)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(held.path().join("data/noise.bin").is_file(), "the bundle another worker uses stays: {text}");
    assert!(text.contains("in use by"), "{text}");
    assert!(!unused_dir.exists(), "the bundle nobody uses goes: {text}");
    // (The other worker's own temp dir is locked too: it lives.)
    let entry_locks: Vec<String> =
        lock_files(&cache.join("bundles")).into_iter().filter(|n| !n.starts_with("tmp-")).collect();
    assert_eq!(entry_locks, [format!("{}.lock", held.key())], "{text}");
    assert!(cache.join("rootfs/busybox/bin").is_dir(), "not a cache's: {text}");
    assert_eq!(lock_files(&ports), ["port-30001.lock"], "{text}");

    // Once nothing is held, nothing of the caches is left.
    drop((held, held_port, other_worker));
    let out = Command::new(exe())
        .args(["cleanup", "--all", "--state-dir"])
        .arg(&state)
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--port-lock-dir")
        .arg(&ports)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let left: Vec<String> =
        std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["rootfs"]);
    assert_eq!(lock_files(&ports), Vec::<String>::new());
}

/// A port a running task holds stays its own while its worker is down and after the worker
/// is back: another worker on the host (the same port lock directory) cannot hand it out
/// until the task ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_running_tasks_port_stays_its_own_while_its_worker_is_down_and_after() {
    let locks = tempfile::Builder::new().prefix("iwtest-port-locks-").tempdir().unwrap();
    let port = free_port();
    let range = format!("{port}-{port}");
    let flags = ["--port-range", &range, "--port-lock-dir", locks.path().to_str().unwrap()];
    let mut a = Worker::start("ports-a", &flags).await;
    let b = Worker::start("ports-b", &flags).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let with_port = |id: &str, script: &str| {
        let mut req = sh(id, script);
        req.ports = vec!["http".into()];
        req
    };
    // The task never binds its port: only the locks keep it its own.
    ca.run_task(with_port("ports/held", "echo up; sleep 600")).await.unwrap();
    let s = wait_for(&mut ca, "ports/held", WITHIN, |s| state_of(s) == TaskState::Running).await;
    assert_eq!(s.ports.get("http"), Some(&i32::from(port)), "{s:?}");
    let refused = async |cb: &mut Client, id: &str, when: &str| match cb.run_task(with_port(id, "true")).await {
        Ok(_) => panic!("{when}: worker B handed out the running task's port"),
        Err(err) => assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{when}: {err:?}"),
    };
    refused(&mut cb, "ports/b-1", "while worker A runs").await;
    a.kill9();
    refused(&mut cb, "ports/b-2", "while worker A is down").await;
    a.spawn().await;
    let mut ca = a.client().await;
    refused(&mut cb, "ports/b-3", "after worker A is back").await;
    assert!(!a.logs().contains("not its own alone"), "A took its task's port back without a conflict:\n{}", a.logs());
    // The task ends: the port is free for B.
    ca.kill_task(worker::KillTaskRequest { task_id: "ports/held".into(), term_timeout_ms: 100 }).await.unwrap();
    wait_end(&mut ca, "ports/held", WITHIN).await;
    cb.run_task(with_port("ports/b-4", "true")).await.unwrap();
    let s = wait_end(&mut cb, "ports/b-4", WITHIN).await;
    assert_eq!(s.ports.get("http"), Some(&i32::from(port)), "{s:?}");
}

/// A parent cgroup of the test's own for venv builds (as a worker's), removed on drop.
struct BuildCgroup {
    layout: iris_worker::cgroup::Layout,
    parent: String,
}

impl BuildCgroup {
    fn new(name: &str) -> BuildCgroup {
        let layout = iris_worker::cgroup::Layout::detect().unwrap();
        let base = layout.task_root().unwrap();
        let parent = format!(
            "{}/{}/{TEST_PREFIX}{name}-{}",
            base.trim_end_matches('/'),
            iris_worker::cgroup::ROOT_NAME,
            std::process::id()
        );
        layout.prepare_parent(&parent).unwrap();
        BuildCgroup { layout, parent }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        let _ = self.layout.release_parent(&self.parent);
    }
}

/// The venv cache of one worker process on `cache` (two of them on one directory have their
/// own locks and their own in-process sharing, as two processes do).
fn venv_cache(cache: &Path, cgroup: &BuildCgroup) -> iris_worker::env::VenvCache {
    iris_worker::env::VenvCache::new(iris_worker::env::VenvConfig {
        python_rootfs: fixtures().join("rootfs/python"),
        cache_dir: cache.to_path_buf(),
        find_links: Some(fixtures().join("wheels")),
        offline: true,
        ca_bundle: None,
        build_env: vec![],
        build_memory_bytes: 1 << 30,
        pids_limit: None,
        supervisor_exe: env!("CARGO_BIN_EXE_iris-worker").into(),
        cgroups: Some((cgroup.layout.clone(), cgroup.parent.clone())),
    })
}

/// A project needing `dependency`, and a task directory for each of `tasks` asking for it.
fn venv_project(work: &Path, dependency: &str, tasks: &[&str]) -> (PathBuf, Vec<(PathBuf, String)>) {
    let project = work.join("project");
    std::fs::create_dir_all(&project).unwrap();
    let toml = format!(
        "[project]\nname = \"shared\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\ndependencies = [\"{dependency}\"]\n"
    );
    std::fs::write(project.join("pyproject.toml"), toml).unwrap();
    let dirs = tasks
        .iter()
        .map(|t| {
            let dir = work.join(t);
            std::fs::create_dir_all(&dir).unwrap();
            (dir, format!("{TEST_PREFIX}venv-{t}-{}", std::process::id()))
        })
        .collect();
    (project, dirs)
}

fn venv_request<'a>(project: &'a Path, task: &'a (PathBuf, String)) -> iris_worker::env::VenvRequest<'a> {
    iris_worker::env::VenvRequest {
        bundle_dir: Some(project),
        bundle_sha256: None,
        extras: &[],
        pip_packages: &[],
        task_dir: &task.0,
        task_key: &task.1,
    }
}

/// Two worker processes asking for one venv at the same moment build it once: the other waits
/// for the build and uses it (review of #13, finding 13: counted, not inferred from entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: venv builds run in containers"]
async fn two_processes_asking_for_one_venv_at_once_build_it_once() {
    let work = tempfile::tempdir().unwrap();
    let cgroup = BuildCgroup::new("venv-once");
    let cache = work.path().join("cache");
    let (a, b) = (venv_cache(&cache, &cgroup), venv_cache(&cache, &cgroup));
    let (project, tasks) = venv_project(work.path(), "six", &["a", "b"]);
    let (ra, rb) = (venv_request(&project, &tasks[0]), venv_request(&project, &tasks[1]));
    let (ea, eb) = tokio::join!(a.get(&ra), b.get(&rb));
    let (ea, eb) = (ea.unwrap(), eb.unwrap());
    assert_eq!(a.builds() + b.builds(), 1, "one build for both processes");
    assert_eq!(ea.dir, eb.dir);
    assert!(ea.from_cache != eb.from_cache, "one built it, the other waited and used it");
    assert!(ea.dir.join("lib").is_dir());
}

/// A build that fails fails every process that waited for it, once (review of #13, finding 5):
/// the waiters read the builder's failure instead of each building again in turn; a request
/// made after the failure builds again (the cause may have passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: venv builds run in containers"]
async fn a_failed_build_fails_every_process_waiting_for_it_and_runs_once() {
    let work = tempfile::tempdir().unwrap();
    let cgroup = BuildCgroup::new("venv-fail");
    let cache = work.path().join("cache");
    let (a, b) = (venv_cache(&cache, &cgroup), venv_cache(&cache, &cgroup));
    // Offline with the fixture wheels: a package that is not there cannot be installed.
    let (project, tasks) = venv_project(work.path(), "iris-test-no-such-package", &["a", "b", "c"]);
    let (ra, rb, rc) =
        (venv_request(&project, &tasks[0]), venv_request(&project, &tasks[1]), venv_request(&project, &tasks[2]));
    let key = a.key(&ra).unwrap();
    // Held here until both have asked: then both wait for the same build, whoever runs it.
    let held = iris_worker::cachelock::EntryLocks::new(&cache.join("venvs")).exclusive(&key).unwrap();
    let (ea, eb, ()) = tokio::join!(a.get(&ra), b.get(&rb), async move { drop(held) });
    let (ea, eb) = (ea.unwrap_err().to_string(), eb.unwrap_err().to_string());
    assert_eq!(a.builds() + b.builds(), 1, "one build, however many waited: {ea} / {eb}");
    for e in [&ea, &eb] {
        assert!(e.contains("building the Python environment failed"), "{e}");
        assert!(e.contains("iris-test-no-such-package"), "{e}");
    }
    // Asked after the failure: built again.
    let ec = a.get(&rc).await.unwrap_err().to_string();
    assert_eq!(a.builds() + b.builds(), 2, "{ec}");
}
