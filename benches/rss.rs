//! `scripts/bench rss`: memory of the worker's own processes: VmRSS (the binary's and the
//! libraries' pages count in every process that maps them) and PSS (shared pages split among
//! the processes that map them, so ten supervisors of one binary share its pages).
//!
//! - the worker idle, after it started, and again after 10 tasks ran and ended;
//! - each supervisor while 10 `sleep` tasks run (the supervisor only: the task's processes
//!   are in its container);
//! - peers: the process that holds a container in the foreground, `runc run` and `youki run`
//!   of a `sleep` container (what stays in memory per container without a daemon).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Row, Server, pss_kib, rss_kib};
use iris_worker::cgroup::Layout;
use iris_worker::proto::worker;

const TASKS: usize = 10;

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The RSS of a foreground runtime process once its container runs, then the container ends.
fn foreground_rss(mut cmd: Command, kill: impl Fn() -> anyhow::Result<()>, name: &str) -> anyhow::Result<(u64, u64)> {
    let mut child: Child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let pid = child.id() as i32;
    // Running once it has a child (the container's init) that runs `sleep`.
    let t = Instant::now();
    let rss = loop {
        // Any thread may have forked it (runc is Go), so look at every process's parent.
        let init = std::fs::read_dir("/proc")?.flatten().find(|e| {
            std::fs::read_to_string(e.path().join("stat")).is_ok_and(|st| {
                st.rsplit_once(')').and_then(|(head, rest)| {
                    let ppid: i32 = rest.split_ascii_whitespace().nth(1)?.parse().ok()?;
                    Some(ppid == pid && head.ends_with("(sleep"))
                }) == Some(true)
            })
        });
        if init.is_some() {
            // A moment for the runtime to settle into its wait.
            std::thread::sleep(Duration::from_millis(200));
            break rss_kib(pid).zip(pss_kib(pid));
        }
        if t.elapsed() > Duration::from_secs(20) || child.try_wait()?.is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let killed = kill();
    let _ = child.kill();
    let _ = child.wait();
    killed?;
    rss.with_context(|| format!("{name} never ran its container"))
}

fn peers(work: &Path) -> anyhow::Result<Vec<(String, (u64, u64))>> {
    let rootfs = std::fs::canonicalize(common::rootfs())?;
    let mut out = Vec::new();
    let bundle = common::runc_bundle(&rootfs, &work.join("runc-bundle"), &["sleep", "1000"], None)?;
    let id = format!("iris-bench-rss-runc-{}", std::process::id());
    let mut cmd = Command::new("runc");
    cmd.arg("run").arg("-b").arg(&bundle).arg(&id);
    let kill = || {
        let _ = Command::new("runc").args(["kill", &id, "KILL"]).stderr(Stdio::null()).status();
        let _ = Command::new("runc").args(["delete", "-f", &id]).stderr(Stdio::null()).status();
        Ok(())
    };
    out.push(("runc run (foreground)".to_string(), foreground_rss(cmd, kill, "runc run")?));

    if let Some(youki) = std::env::var_os("IRIS_BENCH_YOUKI").map(PathBuf::from).filter(|p| p.exists()) {
        let layout = Layout::detect()?;
        let parent =
            format!("{}/iris-worker/iris-bench-rss-{}", layout.task_root()?.trim_end_matches('/'), std::process::id());
        layout.prepare_parent(&parent)?;
        let result = (|| {
            let bundle = common::runc_bundle(
                &rootfs,
                &work.join("youki-bundle"),
                &["sleep", "1000"],
                Some(&format!("{parent}/youki")),
            )?;
            let state = work.join("youki-state");
            std::fs::create_dir_all(&state)?;
            let id = format!("iris-bench-rss-youki-{}", std::process::id());
            let mut cmd = Command::new(&youki);
            cmd.arg("--root").arg(&state).arg("run").arg("-b").arg(&bundle).arg(&id);
            let kill = || {
                let _ = Command::new(&youki)
                    .arg("--root")
                    .arg(&state)
                    .args(["kill", &id, "9"])
                    .stderr(Stdio::null())
                    .status();
                Ok(())
            };
            foreground_rss(cmd, kill, "youki run")
        })();
        // youki run deletes its container when the init ends; wait for that before the parent.
        let t = Instant::now();
        while !layout.procs(&parent).map(|p| p.is_empty()).unwrap_or(true) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = layout.remove(&format!("{parent}/youki"));
        let _ = layout.release_parent(&parent);
        out.push(("youki run (foreground)".to_string(), result?));
    }
    Ok(out)
}

async fn measure(work: &Path) -> anyhow::Result<(u64, u64, Vec<(u64, u64)>)> {
    let server = Server::start(work, "iris-bench-rss", &[])?;
    let mut client = server.client().await?;
    let pid = server.pid() as i32;
    // Idle: started, answered, then left alone for a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(pid).context("the worker's RSS")?;
    for i in 0..TASKS {
        client.run_task(common::command_task(&format!("bench/rss-{i}"), &["sleep", "1000"])).await?;
    }
    for i in 0..TASKS {
        common::wait_running(&mut client, &format!("bench/rss-{i}")).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tasks_dir = iris_worker::task::store::tasks_dir(&server.state);
    let sups = iris_worker::supervisor::handle::running_under(&tasks_dir);
    if sups.len() != TASKS {
        bail!("{} supervisors for {TASKS} running tasks", sups.len());
    }
    let per: Vec<(u64, u64)> = sups.iter().filter_map(|(p, _)| rss_kib(*p).zip(pss_kib(*p))).collect();
    for i in 0..TASKS {
        client.kill_task(worker::KillTaskRequest { task_id: format!("bench/rss-{i}"), term_timeout_ms: 100 }).await?;
    }
    let t = Instant::now();
    while !iris_worker::supervisor::handle::running_under(&tasks_dir).is_empty() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("supervisors still running 20 s after KillTask");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid).context("the worker's RSS")?;
    Ok((idle, after, per))
}

fn main() -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("iris-bench-rss-").tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (idle, after, per) = rt.block_on(measure(work.path()))?;
    let peers = peers(work.path())?;
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        (v[v.len() / 2], v.last().copied().unwrap_or(0))
    };
    let (rss, rss_max) = median(per.iter().map(|p| p.0).collect());
    let (pss, pss_max) = median(per.iter().map(|p| p.1).collect());
    let peer_text = |pick: fn(&(u64, u64)) -> u64| {
        peers.iter().map(|(n, k)| format!("{n} {:.1} MB", mb(pick(k)))).collect::<Vec<_>>().join(", ")
    };
    let mut rows = vec![
        Row::value("worker RSS, idle after start", 1, "MB", mb(idle)).goal(false, 12.0),
        Row::value(format!("worker RSS, idle after {TASKS} tasks"), 1, "MB", mb(after)).goal(false, 12.0),
        Row::value(format!("supervisor RSS, each of {TASKS} running tasks (p50)"), per.len(), "MB", mb(rss))
            .vs(format!("max {:.1} MB; {}", mb(rss_max), peer_text(|k| k.0)))
            .goal(false, 2.0),
        Row::value(format!("supervisor PSS, each of {TASKS} running tasks (p50)"), per.len(), "MB", mb(pss))
            .vs(format!("max {:.1} MB; {}", mb(pss_max), peer_text(|k| k.1)))
            .goal(false, 1.5),
    ];
    for (n, (r, p)) in &peers {
        rows.push(Row::value(format!("peer, {n}"), 1, "MB", mb(*r)).vs(format!("RSS; PSS {:.1} MB", mb(*p))));
    }
    common::report("rss", &rows);
    Ok(())
}
