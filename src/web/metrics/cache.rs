//! The caches and the disk in `/metrics`: per kind its entries, bytes, entries in use, limit,
//! hits, misses and evictions; per filesystem its free space and inodes and where it stands
//! against the thresholds.

use std::fmt::Write as _;

use super::{family, label};
use crate::cache::CacheStatus;
use crate::cache::pressure::Level;

/// Appends the cache and disk families to `/metrics`.
pub fn write_metrics(out: &mut String, s: &CacheStatus) {
    type Get = fn(&crate::cache::KindStatus) -> u64;
    let per_kind: [(&str, &str, &str, Get); 4] = [
        ("iris_worker_cache_bytes", "gauge", "Bytes a kind of cache holds.", |k| k.bytes),
        ("iris_worker_cache_entries", "gauge", "Entries a kind of cache holds.", |k| k.entries),
        ("iris_worker_cache_in_use", "gauge", "Entries a task (of any worker) uses now.", |k| k.in_use),
        (
            "iris_worker_cache_evictions_total",
            "counter",
            "Entries this worker evicted (budget or disk pressure).",
            |k| k.evictions,
        ),
    ];
    for (name, kind, help, get) in per_kind {
        family(out, name, kind, &format!("{help} As of the last scan."));
        for k in &s.kinds {
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {}", k.kind, get(k));
        }
    }
    family(out, "iris_worker_cache_limit_bytes", "gauge", "The cache budget (total) and each kind's own limit.");
    let _ = writeln!(out, "iris_worker_cache_limit_bytes{{limit=\"total\"}} {}", s.limit_bytes);
    for k in &s.kinds {
        if let Some(l) = k.limit_bytes {
            let _ = writeln!(out, "iris_worker_cache_limit_bytes{{limit=\"{}\"}} {l}", k.kind);
        }
    }
    family(out, "iris_worker_cache_scan_seconds", "gauge", "How long the last scan of every cache took.");
    let _ = writeln!(out, "iris_worker_cache_scan_seconds {}", s.scan_micros as f64 / 1e6);
    type FsGet = fn(&crate::cache::FsStatus) -> u64;
    let per_fs: [(&str, &str, FsGet); 5] = [
        ("iris_worker_disk_free_bytes", "Bytes free for the worker's writes.", |f| f.fs.free_bytes),
        ("iris_worker_disk_size_bytes", "The filesystem's size.", |f| f.fs.size_bytes),
        ("iris_worker_disk_free_inodes", "Inodes free.", |f| f.fs.free_inodes),
        ("iris_worker_disk_inodes", "Inodes in all.", |f| f.fs.inodes),
        (
            "iris_worker_disk_pressure",
            "0 ok, 1 below the soft threshold (caches evict), 2 below the hard one (no new task).",
            |f| match f.level {
                Level::Ok => 0,
                Level::Soft => 1,
                Level::Hard => 2,
            },
        ),
    ];
    for (name, help, get) in per_fs {
        family(out, name, "gauge", &format!("{help} Per filesystem the worker writes to, named by its roles."));
        for f in &s.filesystems {
            let _ = writeln!(out, "{name}{{filesystem=\"{}\"}} {}", label(&f.fs.name), get(f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::pressure::Filesystem;
    use crate::cache::{FsStatus, KindStatus};

    #[test]
    fn every_kind_and_filesystem_gets_its_series() {
        let s = CacheStatus {
            kinds: vec![KindStatus {
                kind: "venvs",
                entries: 3,
                bytes: 300,
                in_use: 1,
                limit_bytes: Some(1000),
                evictions: 2,
                ..Default::default()
            }],
            limit_bytes: 5000,
            filesystems: vec![FsStatus {
                fs: Filesystem {
                    name: "state/workdirs".into(),
                    dev: 1,
                    size_bytes: 100,
                    free_bytes: 4,
                    inodes: 10,
                    free_inodes: 9,
                },
                level: Level::Hard,
            }],
            ..Default::default()
        };
        let mut out = String::new();
        write_metrics(&mut out, &s);
        for line in [
            "iris_worker_cache_bytes{kind=\"venvs\"} 300\n",
            "iris_worker_cache_entries{kind=\"venvs\"} 3\n",
            "iris_worker_cache_in_use{kind=\"venvs\"} 1\n",
            "iris_worker_cache_evictions_total{kind=\"venvs\"} 2\n",
            "iris_worker_cache_limit_bytes{limit=\"total\"} 5000\n",
            "iris_worker_cache_limit_bytes{limit=\"venvs\"} 1000\n",
            "iris_worker_disk_free_bytes{filesystem=\"state/workdirs\"} 4\n",
            "iris_worker_disk_pressure{filesystem=\"state/workdirs\"} 2\n",
        ] {
            assert!(out.contains(line), "{line} not in:\n{out}");
        }
    }
}
