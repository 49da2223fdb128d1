//! `scripts/bench cache` (issue 20): what the cache budget's eviction scan costs with 10,000
//! entries on disk (4,000 bundles, 3,000 venvs, 3,000 image layers, each a directory with a
//! file and its record, in the caches' own on-disk formats, last used over the past three
//! hours), on the filesystem of `$TMPDIR`. No root needed. Figures:
//!
//! 1. the scan: every entry of every kind with its bytes, files and last use (`janitor::scan`);
//! 2. who uses what: `/proc/locks` and the overlay mounts (`janitor::InUse::now`);
//! 3. choosing what to evict, least recently used first, among the 10,000 (`budget::enforce`,
//!    without touching the disk);
//! 4. a janitor pass that evicts 100 entries (scan with tidying, choose, take each entry's
//!    lock, move it out, delete it): what the worker does off the request path.
//!
//! The scan and the pass are also given in CPU time (user + system, this thread's): wall time
//! on a loaded machine is mostly waiting for a core.
//!
//! Prints a table and one JSON line per figure. Nothing asserts a timing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{Figure, Row};
use iris_worker::cache::{self, Amount, CacheDirs, CacheSettings, Kind, Limit};
use iris_worker::janitor::{self, Janitor};
use sha2::Digest;

const BUNDLES: usize = 4_000;
const VENVS: usize = 3_000;
const LAYERS: usize = 3_000;
/// Bytes of the file in each entry.
const FILE: usize = 4096;

/// This thread's CPU time (user + system): what a scan costs whatever else the machine runs.
fn cpu_time() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn hex_of(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Makes entry `i` of each kind that is missing, with its record last used `i` seconds ago.
fn populate(dirs: &CacheDirs) -> anyhow::Result<usize> {
    let now = SystemTime::now();
    let mut made = 0;
    let mut entry = |dir: &Path, record: &Path, json: String, extra: Option<&str>, age: usize| -> anyhow::Result<()> {
        if record.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("file"), vec![7u8; FILE])?;
        if let Some(marker) = extra {
            std::fs::write(dir.join(marker), "")?;
        }
        std::fs::write(record, json)?;
        std::fs::File::options().append(true).open(record)?.set_modified(now - Duration::from_secs(age as u64))?;
        made += 1;
        Ok(())
    };
    let bundles = dirs.bundles();
    for i in 0..BUNDLES {
        let path = format!("file:///bench/bundle-{i}.zip");
        let key = hex_of(&path);
        let json = serde_json::json!({"path": path, "sha256": "0".repeat(64), "bytes": FILE, "entries": 1});
        entry(&bundles.join(&key), &bundles.join(format!("{key}.json")), json.to_string(), None, i * 3)?;
    }
    let venvs = dirs.venvs();
    for i in 0..VENVS {
        let key = hex_of(&format!("venv-{i}"));
        let json = serde_json::json!({"bytes": FILE, "files": 3, "measured_ms": 0});
        let record = venvs.join(format!("{key}.json"));
        entry(&venvs.join(&key), &record, json.to_string(), Some(".iris-complete"), i * 3 + 1)?;
    }
    let layers = dirs.images.join("layers");
    for i in 0..LAYERS {
        let key = hex_of(&format!("layer-{i}"));
        let json = serde_json::json!({"bytes": FILE, "files": 2});
        entry(&layers.join(&key), &layers.join(format!("{key}.json")), json.to_string(), None, i * 3 + 2)?;
    }
    Ok(made)
}

fn main() -> anyhow::Result<()> {
    let runs = common::runs(20);
    let work = tempfile::Builder::new().prefix("iris-bench-cache-").tempdir()?;
    let dirs = CacheDirs::new(work.path().join("cache"), work.path().join("cache/images"));
    let t = Instant::now();
    let made = populate(&dirs)?;
    eprintln!("cache: {made} entries made in {:.1} s", t.elapsed().as_secs_f64());
    let entries = janitor::scan(&dirs, false);
    anyhow::ensure!(entries.len() == BUNDLES + VENVS + LAYERS, "the scan found {} entries", entries.len());
    let total: u64 = entries.iter().map(|e| e.bytes).sum();

    let mut scan = Figure::new("scan of 10,000 entries (bundles, venvs, layers)");
    let mut scan_cpu = Figure::new("scan of 10,000 entries, CPU time (user + system)");
    let mut in_use = Figure::new("who uses what (/proc/locks, overlay mounts)");
    let mut choose = Figure::new("choose 100 to evict among 10,000 (LRU)");
    for _ in 0..runs {
        let (t, cpu) = (Instant::now(), cpu_time());
        let found = janitor::scan(&dirs, false);
        scan.samples.push(t.elapsed());
        scan_cpu.samples.push(cpu_time() - cpu);
        let t = Instant::now();
        let busy = janitor::InUse::now(&dirs);
        in_use.samples.push(t.elapsed());
        let limit = Limit::bytes("total", &Kind::ALL, total - 100 * FILE as u64);
        let t = Instant::now();
        let out = cache::budget::enforce(&found, &[limit], |e| busy.contains(&dirs, e), |_| true);
        choose.samples.push(t.elapsed());
        anyhow::ensure!(out.evicted.len() == 100, "chose {}", out.evicted.len());
    }

    let settings = CacheSettings { size: Amount::Bytes(total - 100 * FILE as u64), ..CacheSettings::default() };
    let janitor = Janitor::new(dirs.clone(), settings, &work.path().join("state"));
    let mut pass = Figure::new("janitor pass: scan, choose, evict 100 of 10,000");
    let mut pass_cpu = Figure::new("janitor pass, CPU time (user + system)");
    for _ in 0..runs.min(10) {
        populate(&dirs)?;
        let (t, cpu) = (Instant::now(), cpu_time());
        let done = janitor.scan_now();
        pass.samples.push(t.elapsed());
        pass_cpu.samples.push(cpu_time() - cpu);
        anyhow::ensure!(done.evicted.len() == 100, "evicted {}", done.evicted.len());
    }
    let per_entry = (pass.pct(0.5) - scan.pct(0.5)) / 100.0;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_string();
    let rows = vec![
        Row::timed(&scan, "ms").vs(format!("load average {load}")),
        Row::timed(&scan_cpu, "ms"),
        Row::timed(&in_use, "ms"),
        Row::timed(&choose, "ms"),
        Row::timed(&pass, "ms").vs(format!("{per_entry:.3} ms per evicted entry beyond the scan")),
        Row::timed(&pass_cpu, "ms"),
    ];
    common::report("cache", &rows);
    Ok(())
}
