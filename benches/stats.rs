//! `scripts/bench stats`: what one running task's figures cost, in µs, interleaved read by
//! read:
//!
//! 1. a reading through the files the worker keeps open per running task (`StatsCache`):
//!    what GetTaskStatus and the sampler read (memory current, peak and limit, OOM kills,
//!    pids, CPU time, throttling), one `pread` per file;
//! 2. `Layout::stats` of the task's cgroup: the same figures read once, opening each file
//!    (what the supervisor does once at the task's end; every reading did it before);
//! 3. a GetTaskStatus round trip over gRPC (1. plus the RPC);
//! 4. the peer: `docker stats`-like figures (RSS and CPU time of the task's processes) the
//!    way a /proc walker gets them: every pid's `/proc/<pid>/stat`, the task's process tree
//!    from the parent pids, its RSS and CPU summed.
//!
//! The task runs `sh -c 'sleep & sleep & wait'` (three processes). The cgroup path is the one
//! the worker recorded in the task's `task.json`, so this works on v1 and v2 alike.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use common::{Figure, Row, Server};
use iris_worker::cgroup::{Layout, StatsCache};
use iris_worker::proto::worker;

/// (pid, ppid, utime + stime ticks, rss pages) of every process, from /proc/<pid>/stat.
fn proc_table() -> Vec<(i32, i32, u64, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command (field 2) may hold spaces and parentheses: fields resume after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15, rss 24.
        out.push((pid, num(1) as i32, num(11) + num(12), num(21)));
    }
    out
}

/// RSS bytes and CPU ticks of `root` and its descendants, by walking /proc.
fn proc_walk(root: i32, page: u64) -> (u64, u64) {
    let table = proc_table();
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    for (i, p) in table.iter().enumerate() {
        children.entry(p.1).or_default().push(i);
    }
    let (mut rss, mut cpu) = (0, 0);
    let mut todo: Vec<i32> = vec![root];
    if let Some(p) = table.iter().find(|p| p.0 == root) {
        rss += p.3 * page;
        cpu += p.2;
    }
    while let Some(pid) = todo.pop() {
        for &i in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            rss += table[i].3 * page;
            cpu += table[i].2;
            todo.push(table[i].0);
        }
    }
    (rss, cpu)
}

async fn measure(work: &Path, n: usize) -> anyhow::Result<([Figure; 4], usize)> {
    let server = Server::start(work, "iris-bench-stats", &[])?;
    let mut client = server.client().await?;
    let task_id = "bench/stats";
    client.run_task(common::command_task(task_id, &["sh", "-c", "sleep 1000 & sleep 1000 & wait"])).await?;
    common::wait_running(&mut client, task_id).await?;
    let dir = iris_worker::task::store::tasks_dir(&server.state).join(iris_worker::task::store::task_key(task_id, 0));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(iris_worker::task::store::TASK))?)?;
    let cgroup = meta["cgroup"].as_str().context("the task has no cgroup in task.json")?.to_string();
    let layout = Layout::detect()?;
    // Wait for all three processes, then take the tree's root (the one whose parent is outside).
    let t = Instant::now();
    let pids = loop {
        let pids = layout.procs(&cgroup)?;
        if pids.len() >= 3 || t.elapsed().as_secs() > 10 {
            break pids;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    let table = proc_table();
    let in_task = |pid: i32| pids.iter().any(|p| p.as_raw() == pid);
    let root = table
        .iter()
        .find(|p| in_task(p.0) && !in_task(p.1))
        .map(|p| p.0)
        .context("no process of the task's cgroup in /proc")?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.unwrap_or(4096) as u64;
    let status_req = worker::GetTaskStatusRequest { task_id: task_id.into(), include_result: false };
    let kept = StatsCache::default();
    let mut cached = Figure::new("task figures, kept files (GetTaskStatus, sampler)");
    let mut lib = Figure::new("task figures, Layout::stats (opens each file)");
    let mut rpc = Figure::new("task figures, GetTaskStatus over gRPC");
    let mut walk = Figure::new("task figures, /proc walk (docker-stats-like)");
    for i in 0..n + 20 {
        let t = Instant::now();
        let k = kept.read(&layout, &cgroup)?;
        let z = t.elapsed();
        let t = Instant::now();
        let s = layout.stats(&cgroup)?;
        let a = t.elapsed();
        let t = Instant::now();
        let st = client.get_task_status(status_req.clone()).await?.into_inner();
        let b = t.elapsed();
        let t = Instant::now();
        let w = proc_walk(root, page);
        let c = t.elapsed();
        if i == 0 {
            anyhow::ensure!(
                k.as_ref().map(|k| k.processes) == Some(s.processes),
                "the two readings differ: {k:?}, {s:?}"
            );
        }
        std::hint::black_box((k, s, st, w));
        if i >= 20 {
            cached.samples.push(z);
            lib.samples.push(a);
            rpc.samples.push(b);
            walk.samples.push(c);
        }
    }
    let processes = table.len();
    client.kill_task(worker::KillTaskRequest { task_id: task_id.into(), term_timeout_ms: 100 }).await?;
    Ok(([cached, lib, rpc, walk], processes))
}

fn main() -> anyhow::Result<()> {
    let n = common::runs(2000);
    let work = tempfile::Builder::new().prefix("iris-bench-stats-").tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ([cached, lib, rpc, walk], processes) = rt.block_on(measure(work.path(), n))?;
    let walk_us = walk.pct(0.5) * 1e3;
    let row = |f: &Figure| {
        let r = Row::timed(f, "µs");
        let ratio = walk_us / r.p50;
        r.vs(format!("/proc walk/this {ratio:.2}x")).with("proc_walk_over_this", ratio)
    };
    let rows = vec![
        row(&cached).goal(false, 20.0),
        row(&lib),
        row(&rpc),
        Row::timed(&walk, "µs")
            .vs(format!("{processes} processes on the host"))
            .with("host_processes", processes as f64),
    ];
    common::report("stats", &rows);
    Ok(())
}
