//! `scripts/bench throughput`: short `/bin/true` tasks per second through a real
//! `iris-worker serve` with 2, 8 and 32 in flight (each slot sends RunTask, polls
//! GetTaskStatus every 2 ms until the task ends, and sends the next), then what the tasks left
//! behind once all ended: task cgroups, supervisor processes, mounts under the state
//! directory, and task directories beyond one per task. The goal (issue #16) is ≥ 200 tasks/s on
//! 2 cores and nothing left behind. Beside each rate, the CPU time one task cost: the worker's own
//! threads, its reaped children (each task's supervisor and container processes), and this
//! client's polling — on 2 cores their sum bounds the rate (2 s of CPU a second).

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

/// CPU time in ms so far: (a process's own threads, its reaped children), from
/// `/proc/<pid>/stat` (utime + stime, cutime + cstime).
fn cpu_ms(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // SAFETY: sysconf with a constant name.
    let tick_ms = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime, stime, cutime, cstime are fields 14..=17 (1-based); `rest` starts at field 3.
    anyhow::ensure!(f.len() > 14, "short /proc/{pid}/stat");
    Ok(((f[11] + f[12]) * tick_ms, (f[13] + f[14]) * tick_ms))
}

/// This process's CPU time in ms (every thread).
fn own_cpu_ms() -> f64 {
    // SAFETY: rusage is plain integers, for which zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(ru.ru_utime) + ms(ru.ru_stime)
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
        let (worker0, client0) = (cpu_ms(server.pid())?, own_cpu_ms());
        let took = level(&server, width, per_level).await?;
        let (worker1, client1) = (cpu_ms(server.pid())?, own_cpu_ms());
        tasks += per_level;
        let rate = per_level as f64 / took.as_secs_f64();
        let per_task = |a: f64, b: f64| (b - a) / per_level as f64;
        let (own, kids, client) =
            (per_task(worker0.0, worker1.0), per_task(worker0.1, worker1.1), per_task(client0, client1));
        rows.push(
            Row::value(format!("short tasks/s, {width} in flight"), per_level, "tasks/s", rate)
                .vs(format!(
                    "{per_level} tasks in {:.2} s; CPU ms a task: worker {own:.2}, supervisor + container {kids:.2}, \
                     this client {client:.2}",
                    took.as_secs_f64()
                ))
                .goal(true, 200.0),
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
