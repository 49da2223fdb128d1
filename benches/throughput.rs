//! `scripts/bench throughput`: short `/bin/true` tasks per second through a real
//! `iris-worker serve` with 2, 8 and 32 in flight (each slot sends RunTask, polls
//! GetTaskStatus every 2 ms until the task ends, and sends the next), then what the tasks left
//! behind once all ended: task cgroups, supervisor processes, mounts under the state
//! directory, and task directories beyond one per task. The goal is ≥ 100 tasks/s on 2 cores
//! and nothing left behind.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use common::{Row, Server};
use iris_worker::cgroup::Layout;
use iris_worker::proto::worker;
use iris_worker::task::TaskState;

/// Runs `total` tasks keeping `width` in flight; returns the wall time.
async fn level(server: &Server, width: usize, total: usize) -> anyhow::Result<Duration> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut slots = Vec::new();
    for _ in 0..width {
        let mut client = server.client().await?;
        let next = next.clone();
        slots.push(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let task_id = format!("bench/w{width}-{i}");
                client.run_task(common::command_task(&task_id, &["/bin/true"])).await?;
                loop {
                    let s = client
                        .get_task_status(worker::GetTaskStatusRequest {
                            task_id: task_id.clone(),
                            include_result: false,
                        })
                        .await?
                        .into_inner();
                    match iris_worker::rpc::state_from_proto(s.state) {
                        Some(TaskState::Succeeded) => break,
                        Some(st) if st.is_terminal() => bail!("{task_id} ended {st:?}: {}", s.error),
                        _ => tokio::time::sleep(Duration::from_millis(2)).await,
                    }
                }
            }
        });
    }
    futures::future::try_join_all(slots).await?;
    Ok(t.elapsed())
}

/// What the ended tasks left behind, one line per item.
fn leftovers(server: &Server, tasks: usize) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    let layout = Layout::detect()?;
    let parent = format!(
        "{}/{}/{}",
        layout.task_root()?.trim_end_matches('/'),
        iris_worker::cgroup::ROOT_NAME,
        iris_worker::task::store::escape(&server.worker_id)
    );
    for dir in layout.dirs(&parent)? {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    let tasks_dir = iris_worker::task::store::tasks_dir(&server.state);
    for (pid, dir) in iris_worker::supervisor::handle::running_under(&tasks_dir) {
        left.push(format!("supervisor {pid} of {}", dir.display()));
    }
    let state = server.state.to_string_lossy().into_owned();
    for line in std::fs::read_to_string("/proc/self/mountinfo")?.lines() {
        if line.split(' ').nth(4).is_some_and(|m| m.starts_with(&state)) {
            left.push(format!("mount {line}"));
        }
    }
    let dirs = std::fs::read_dir(&tasks_dir)?.count();
    if dirs != tasks {
        left.push(format!("{dirs} task directories for {tasks} tasks"));
    }
    Ok(left)
}

async fn measure(work: &Path, per_level: usize) -> anyhow::Result<Vec<Row>> {
    let server = Server::start(work, "iris-bench-tp", &[])?;
    let mut client = server.client().await?;
    // One task first so the first level does not pay for the first container.
    common::run(&mut client, common::command_task("bench/warm", &["/bin/true"])).await?;
    let mut rows = Vec::new();
    let mut tasks = 1;
    for width in [2, 8, 32] {
        let took = level(&server, width, per_level).await?;
        tasks += per_level;
        let rate = per_level as f64 / took.as_secs_f64();
        rows.push(
            Row::value(format!("short tasks/s, {width} in flight"), per_level, "tasks/s", rate)
                .vs(format!("{per_level} tasks in {:.2} s", took.as_secs_f64()))
                .goal(true, 100.0),
        );
    }
    // A task is SUCCEEDED once its exit is recorded; its supervisor may still be removing the
    // container for a moment, so look until nothing is left or 5 s passed.
    let t = Instant::now();
    let left = loop {
        let left = leftovers(&server, tasks)?;
        if left.is_empty() || t.elapsed() > Duration::from_secs(5) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for l in &left {
        eprintln!("throughput: left behind: {l}");
    }
    rows.push(
        Row::value("left behind after all tasks ended", tasks, "items", left.len() as f64)
            .vs("task cgroups, supervisors, mounts, extra task dirs")
            .goal(false, 0.0),
    );
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let n = common::runs(200);
    let work = tempfile::Builder::new().prefix("iris-bench-tp-").tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let rows = rt.block_on(measure(work.path(), n))?;
    common::report("throughput", &rows);
    Ok(())
}
