//! Figures read on demand from a task's cgroup files: no polling thread, a read costs a few
//! small file reads.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::layout::{CgroupError, Layout, io_err};

/// What a cgroup says about its processes. Fields are `None` when the controller is missing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupStats {
    pub memory_bytes: Option<u64>,
    /// The highest memory use since the cgroup was made (`memory.peak` / `max_usage_in_bytes`).
    pub memory_peak_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// How many times the kernel's OOM killer killed a process of the cgroup.
    pub oom_kills: u64,
    pub processes: Option<u64>,
    /// CPU time used by the cgroup's processes, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// Periods in which the cgroup was throttled by its cpu limit.
    pub cpu_throttled_periods: Option<u64>,
}

impl Layout {
    /// Reads the cgroup's figures. A missing cgroup gives empty figures, not an error: a task
    /// between its exit and its removal is a normal state.
    pub fn stats(&self, path: &str) -> Result<CgroupStats, CgroupError> {
        let mut s = CgroupStats::default();
        match self {
            Layout::V2 { .. } => {
                let Some(dir) = self.dir_for("", path)? else { return Ok(s) };
                s.memory_bytes = read_u64(&dir.join("memory.current"))?;
                s.memory_peak_bytes = read_u64(&dir.join("memory.peak"))?;
                s.memory_limit_bytes = read_u64(&dir.join("memory.max"))?;
                s.oom_kills = read_keyed(&dir.join("memory.events"), "oom_kill")?.unwrap_or(0);
                s.processes = read_u64(&dir.join("pids.current"))?;
                let cpu = dir.join("cpu.stat");
                s.cpu_usage_ns = read_keyed(&cpu, "usage_usec")?.map(|us| us * 1000);
                s.cpu_throttled_periods = read_keyed(&cpu, "nr_throttled")?;
            }
            Layout::V1 { .. } => {
                if let Some(dir) = self.dir_for("memory", path)? {
                    s.memory_bytes = read_u64(&dir.join("memory.usage_in_bytes"))?;
                    s.memory_peak_bytes = read_u64(&dir.join("memory.max_usage_in_bytes"))?;
                    s.memory_limit_bytes = read_u64(&dir.join("memory.limit_in_bytes"))?;
                    // v1 reports OOM kills here, not in memory.failcnt.
                    s.oom_kills = read_keyed(&dir.join("memory.oom_control"), "oom_kill")?.unwrap_or(0);
                }
                if let Some(dir) = self.dir_for("pids", path)? {
                    s.processes = read_u64(&dir.join("pids.current"))?;
                }
                if let Some(dir) = self.dir_for("cpuacct", path)? {
                    s.cpu_usage_ns = read_u64(&dir.join("cpuacct.usage"))?;
                }
                if let Some(dir) = self.dir_for("cpu", path)? {
                    s.cpu_throttled_periods = read_keyed(&dir.join("cpu.stat"), "nr_throttled")?;
                }
            }
        }
        // "max" (v2) or a huge v1 sentinel both mean "no limit".
        if s.memory_limit_bytes.is_some_and(|l| l >= 1 << 60) {
            s.memory_limit_bytes = None;
        }
        Ok(s)
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

fn read_u64(path: &Path) -> Result<Option<u64>, CgroupError> {
    Ok(read_opt(path)?.and_then(|t| t.trim().parse().ok()))
}

/// Reads `key value` from a flat-keyed file such as memory.events or cpu.stat.
fn read_keyed(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    Ok(read_opt(path)?.and_then(|t| {
        t.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_are_parsed_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        fs::write(&f, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(read_keyed(&f, "oom_kill").unwrap(), Some(2));
        assert_eq!(read_keyed(&f, "oom").unwrap(), Some(1));
        assert_eq!(read_keyed(&f, "absent").unwrap(), None);
        assert_eq!(read_keyed(&dir.path().join("missing"), "x").unwrap(), None);
    }

    #[test]
    fn v2_stats_are_read_from_the_unified_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("t");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("memory.current"), "1000\n").unwrap();
        fs::write(dir.join("memory.peak"), "5000\n").unwrap();
        fs::write(dir.join("memory.max"), "max\n").unwrap();
        fs::write(dir.join("memory.events"), "oom_kill 1\n").unwrap();
        fs::write(dir.join("pids.current"), "4\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 250\nnr_throttled 7\n").unwrap();
        let layout = Layout::V2 { root: root.path().to_path_buf() };
        let s = layout.stats("/t").unwrap();
        assert_eq!(s.memory_bytes, Some(1000));
        assert_eq!(s.memory_peak_bytes, Some(5000));
        assert_eq!(s.memory_limit_bytes, None);
        assert_eq!(s.oom_kills, 1);
        assert_eq!(s.processes, Some(4));
        assert_eq!(s.cpu_usage_ns, Some(250_000));
        assert_eq!(s.cpu_throttled_periods, Some(7));
    }
}
