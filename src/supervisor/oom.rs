//! Which processes of a task the kernel's OOM killer chose.
//!
//! The cgroup only counts OOM kills (`memory.events` / `memory.oom_control`); the kernel's log
//! names each victim, in a line the OOM killer prints for every kill:
//! `oom-kill:constraint=CONSTRAINT_MEMCG,…,oom_memcg=/a/b,task_memcg=/a/b,task=python3,pid=42,uid=0`.
//! The supervisor reads those lines from `/dev/kmsg` (root may) once the task is over and the
//! cgroup says something was killed, so a task whose main process exits 0 after one of its
//! workers was OOM-killed still says which one.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// Most victims named in a task's error.
const MAX_VICTIMS: usize = 3;

/// The processes OOM-killed in `cgroup` (the path as the kernel prints it: from the hierarchy's
/// root) since `since_us` (the kernel log's clock, µs since boot), as `name (pid N)`.
pub fn victims(cgroup: &str, since_us: u64) -> Vec<String> {
    let Ok(mut kmsg) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // One read returns one record; a record overwritten while we read gives EPIPE once.
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(v) = victim_of(&String::from_utf8_lossy(&buf[..n]), cgroup, since_us)
                    && !out.contains(&v)
                {
                    out.push(v);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break, // EAGAIN: the end of the log
        }
    }
    let skipped = out.len().saturating_sub(MAX_VICTIMS);
    out.truncate(MAX_VICTIMS);
    if skipped > 0 {
        out.push(format!("{skipped} more"));
    }
    out
}

/// The kernel's clock as `/dev/kmsg` stamps records (CLOCK_MONOTONIC), in µs.
pub fn kernel_clock_us() -> u64 {
    // SAFETY: timespec is plain data, filled in by clock_gettime.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out-parameter.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// `name (pid N)` if `record` (`prio,seq,ts_us,flags;message`) is an OOM kill in `cgroup`.
fn victim_of(record: &str, cgroup: &str, since_us: u64) -> Option<String> {
    let (header, message) = record.split_once(';')?;
    let ts_us: u64 = header.split(',').nth(2)?.parse().ok()?;
    let fields = message.trim_end().strip_prefix("oom-kill:")?;
    if ts_us < since_us {
        return None;
    }
    // task= comes last but for pid= and uid=, and its value (the command name) may hold
    // commas: split those three off from the right.
    let (front, _uid) = fields.rsplit_once(",uid=")?;
    let (front, pid) = front.rsplit_once(",pid=")?;
    let (front, task) = front.rsplit_once(",task=")?;
    let memcg = front.split(',').find_map(|f| f.strip_prefix("task_memcg="));
    (memcg? == cgroup).then(|| format!("{task} (pid {pid})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "6,1234,5000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,\
mems_allowed=0,oom_memcg=/p/iris-worker/w/t.0,task_memcg=/p/iris-worker/w/t.0,task=python3,pid=4242,uid=0\n";

    #[test]
    fn an_oom_kill_line_names_the_process_of_its_cgroup_only() {
        assert_eq!(victim_of(LINE, "/p/iris-worker/w/t.0", 0).as_deref(), Some("python3 (pid 4242)"));
        assert_eq!(victim_of(LINE, "/p/iris-worker/w/t.1", 0), None);
        assert_eq!(victim_of(LINE, "/p/iris-worker/w/t.0", 6_000_000), None, "older than the task");
        let other = "6,1235,5000001,-;Memory cgroup out of memory: Killed process 4242 (python3)\n";
        assert_eq!(victim_of(other, "/p/iris-worker/w/t.0", 0), None);
        let comma = LINE.replace("task=python3", "task=a,b");
        assert_eq!(victim_of(&comma, "/p/iris-worker/w/t.0", 0).as_deref(), Some("a,b (pid 4242)"));
    }
}
