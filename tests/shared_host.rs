//! A worker on a host many people's tasks share (issue 14): every resource bounded, task files
//! out of other users' reach, nothing lost across a `kill -9`, and a real init as the
//! container's pid 1. Each test drives a real `iris-worker serve`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use iris_worker::proto::{ResourceSpecProto, worker};
use iris_worker::task::TaskState;

const LONG: Duration = Duration::from_secs(60);

fn python_rootfs() -> PathBuf {
    std::env::var_os("IRIS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/iris-worker"))
        .join("rootfs/python")
}

fn stdout_of(logs: &[worker::LogEntry]) -> Vec<String> {
    logs.iter().filter(|l| l.source == "stdout").map(|l| l.data.clone()).collect()
}

fn with_resources(mut req: worker::RunTaskRequest, r: ResourceSpecProto) -> worker::RunTaskRequest {
    req.resources = Some(r);
    req
}

/// True when no process is left in the task's cgroups.
fn no_process_in(cgroup_key: &str) -> bool {
    cgroups_named(cgroup_key)
        .iter()
        .all(|d| std::fs::read_to_string(d.join("cgroup.procs")).map(|p| p.trim().is_empty()).unwrap_or(true))
}

/// The most memory the process `pid` has used (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn sixteen_fetches_of_a_log_made_of_one_100mb_line_stay_small() {
    let w = Worker::start("bigline", &[]).await;
    let mut c = w.client().await;
    c.run_task(sh("bigline/task-0", "head -c 100000000 /dev/zero | tr '\\0' x; echo")).await.unwrap();
    let s = wait_end(&mut c, "bigline/task-0", LONG).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    let pid = w.child.as_ref().unwrap().id();
    let before = peak_rss(pid);
    let addr = w.addr();
    let fetches: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                // A client that would take a huge answer: the bound must be the worker's.
                let mut c =
                    iris_worker::proto::worker_service_client::WorkerServiceClient::connect(format!("http://{addr}"))
                        .await
                        .unwrap()
                        .max_decoding_message_size(1 << 30);
                let req = worker::FetchTaskLogsRequest { task_id: "bigline/task-0".into(), filter: None };
                c.fetch_task_logs(req).await.unwrap().into_inner().logs
            })
        })
        .collect();
    let mut total = 0;
    for f in fetches {
        let lines = f.await.unwrap();
        let bytes: usize = lines.iter().map(|l| l.data.len()).sum();
        assert!(!lines.is_empty());
        assert!(bytes <= iris_worker::logs::MAX_RESULT_BYTES + (64 << 10), "an answer of {bytes} bytes");
        total += lines.len();
    }
    let after = peak_rss(pid);
    println!(
        "16 fetches of 100 MB in 64 KiB lines: {total} lines; worker peak RSS {} → {} MiB",
        before >> 20,
        after >> 20
    );
    assert!(after < 200 << 20, "the worker's peak RSS reached {} MiB", after >> 20);
    // Paging on gets the rest: the answers are bounded, not the log.
    let all = logs(&mut c, "bigline/task-0", worker::FetchLogsFilter { start_line: -1, ..Default::default() }).await;
    assert!(all[0].line_number >= 1525, "{} lines of 64 KiB", all[0].line_number + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn killing_a_python_task_that_traps_nothing_ends_it_by_sigterm_at_once() {
    let python = python_rootfs();
    let w = Worker::start("pykill", &["--rootfs", python.to_str().unwrap()]).await;
    let mut c = w.client().await;
    let script = "import time\nprint('up', flush=True)\ntime.sleep(1000)\n";
    c.run_task(task("pykill/task-0", &["python3", "-c", script])).await.unwrap();
    wait_for(&mut c, "pykill/task-0", LONG, |s| state_of(s) == TaskState::Running).await;
    let deadline = Instant::now() + LONG;
    while stdout_of(&all_logs(&mut c, "pykill/task-0").await) != ["up"] {
        assert!(Instant::now() < deadline, "python never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    c.kill_task(worker::KillTaskRequest { task_id: "pykill/task-0".into(), term_timeout_ms: 30_000 }).await.unwrap();
    let s = wait_end(&mut c, "pykill/task-0", LONG).await;
    let took = asked.elapsed();
    println!("KillTask → KILLED of a python task: {took:?}");
    assert_eq!(state_of(&s), TaskState::Killed, "{s:?}");
    // 128 + SIGTERM: the signal ended it, not the SIGKILL 30 s later.
    assert_eq!(s.exit_code, 143, "{s:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn the_init_reaps_orphans_and_an_exit_takes_every_process_of_the_task() {
    let python = python_rootfs();
    // A port range of its own: other workers on this host hand out ports from the default
    // range, and one could take the task's port the moment it is released.
    let w = Worker::start("init", &["--rootfs", python.to_str().unwrap(), "--port-range", "41720-41729"]).await;
    let mut c = w.client().await;
    // Orphans (a shell's background `sleep`) end under pid 1: an init reaps them, a Python
    // program as pid 1 would leave them zombies.
    let zombies = "import os, time, glob\n\
                   for _ in range(5): os.system('sh -c \"sleep 0.1 &\"')\n\
                   time.sleep(1)\n\
                   z = [p for p in glob.glob('/proc/[0-9]*/status') if 'State:\\tZ' in open(p).read()]\n\
                   print('pid', os.getpid(), 'zombies', len(z))\n";
    c.run_task(task("init/zombies", &["python3", "-c", zombies])).await.unwrap();
    // A server in the background holds the task's port; the main process exits.
    let mut bg = sh(
        "init/orphan",
        "setsid sleep 1000 & python3 -m http.server --bind 127.0.0.1 $IRIS_PORT_HTTP & sleep 1; exit 0",
    );
    bg.ports = vec!["http".into()];
    c.run_task(bg).await.unwrap();

    let s = wait_end(&mut c, "init/zombies", LONG).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    assert_eq!(stdout_of(&all_logs(&mut c, "init/zombies").await), ["pid 2 zombies 0"]);

    let s = wait_end(&mut c, "init/orphan", LONG).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    // Terminal means nothing of the task is left: the port is free at once.
    assert!(no_process_in("init_2forphan.0"), "a process of the task outlived it");
    let port = s.ports["http"] as u16;
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} is still held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn an_oom_kill_of_a_child_is_reported_when_the_main_process_exits_0() {
    let w = Worker::start("oom-child", &[]).await;
    let mut c = w.client().await;
    let script = "sh -c 'head -c 268435456 /dev/zero | tail -c 268435456 > /dev/null'; echo survived; exit 0";
    let req = with_resources(
        sh("oomchild/task-0", script),
        ResourceSpecProto { memory_bytes: 64 << 20, ..Default::default() },
    );
    c.run_task(req).await.unwrap();
    let s = wait_end(&mut c, "oomchild/task-0", LONG).await;
    assert_eq!((state_of(&s), s.exit_code), (TaskState::Succeeded, 0), "the state follows the exit code: {s:?}");
    assert!(s.error.contains("out of memory") && s.error.contains("64 MiB"), "{}", s.error);
    assert!(s.error.contains("tail (pid "), "the process is named: {}", s.error);
    assert_eq!(stdout_of(&all_logs(&mut c, "oomchild/task-0").await), ["survived"]);
}
