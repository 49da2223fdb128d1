//! Disk pressure (issue 20), on small real filesystems the tests mount and remove (tmpfs):
//! below `--min-free-disk` a worker refuses new tasks with RESOURCE_EXHAUSTED naming the
//! filesystem by its role, says so in HealthCheck and its heartbeat, and the controller places
//! tasks elsewhere until space returns; running tasks go on; and a task that fills the disk
//! still gets its exit recorded and can still be killed.
//!
//! Root-only (`#[ignore = "root: …"]`): mounts, containers, cgroups.

#[path = "common/cluster.rs"]
mod cluster_common;
mod common;
#[path = "common/smallfs.rs"]
mod smallfs;

use std::time::{Duration, Instant};

use cluster_common::*;
use common::*;
use iris_worker::proto::controller::{Constraint, ConstraintOp};
use iris_worker::proto::{Empty, JobState, worker};
use iris_worker::task::TaskState;
use smallfs::SmallFs;

const WITHIN: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

async fn health(c: &mut Client) -> worker::HealthResponse {
    c.health_check(Empty {}).await.unwrap().into_inner()
}

/// Polls HealthCheck until its `disk_pressure` satisfies `pred`.
async fn wait_health(c: &mut Client, pred: impl Fn(&str) -> bool) -> worker::HealthResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = health(c).await;
        if pred(&h.disk_pressure) {
            return h;
        }
        assert!(Instant::now() < deadline, "HealthCheck never got there: {h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, runs containers"]
async fn below_the_hard_threshold_new_tasks_are_refused_and_running_ones_go_on() {
    let fs = SmallFs::tmpfs("128m", None);
    let w = Worker::start_in("disk-hard", fs.tempdir(), &["--min-free-disk", "32M", "--soft-free-disk", "40M"]).await;
    let mut c = w.client().await;
    c.run_task(sh("hard/running", "echo started; while [ ! -e /workdir/go ]; do sleep 0.1; done; echo done"))
        .await
        .unwrap();
    wait_for(&mut c, "hard/running", WITHIN, |s| state_of(s) == TaskState::Running).await;
    assert_eq!(health(&mut c).await.disk_pressure, "");

    let filler = fs.fill_until_free(20 * MIB);
    let e = c.run_task(sh("hard/refused", "true")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let msg = e.message();
    assert!(msg.starts_with("disk: ") && msg.ends_with(" free on state/workdirs (minimum 32 MiB)"), "{msg}");
    assert!(!msg.contains(fs.dir.to_str().unwrap()), "no host path: {msg}");
    // Nothing of the refused task stays.
    let listed = c.list_tasks(worker::ListTasksRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.tasks.len(), 1, "{listed:?}");
    let h = wait_health(&mut c, |p| p.starts_with("disk: ")).await;
    assert!(h.healthy, "a worker under pressure still serves its tasks: {h:?}");
    // Connect's JSON too.
    let v = get_json(&w.addr());
    assert!(v["diskPressure"].as_str().unwrap_or_default().contains("minimum 32 MiB"), "{v}");

    // The running task was not touched: it goes on and ends as it would have.
    std::fs::write(w.state_dir().join("tasks/hard_2frunning.0/workdir/go"), "go\n").unwrap();
    let s = wait_end(&mut c, "hard/running", WITHIN).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    let logs = all_logs(&mut c, "hard/running").await;
    assert_eq!(logs.last().map(|l| l.data.as_str()), Some("done"));

    // Space returns: tasks are taken again.
    std::fs::remove_file(filler).unwrap();
    c.run_task(sh("hard/after", "echo ok")).await.unwrap();
    assert_eq!(state_of(&wait_end(&mut c, "hard/after", WITHIN).await), TaskState::Succeeded);
    wait_health(&mut c, str::is_empty).await;
}

/// `GET path` as JSON.
fn http_get_json(addr: &str, path: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// HealthCheck over Connect JSON.
fn get_json(addr: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = "{}";
    write!(
        s,
        "POST /iris.cluster.WorkerService/HealthCheck HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, runs containers"]
async fn a_task_that_fills_the_disk_still_gets_its_exit_recorded_and_kills_still_land() {
    let fs = SmallFs::tmpfs("96m", None);
    let w = Worker::start_in("disk-full", fs.tempdir(), &["--min-free-disk", "8M", "--soft-free-disk", "8M"]).await;
    let mut c = w.client().await;
    c.run_task(sh("full/sleeper", "echo up; sleep 600")).await.unwrap();
    wait_for(&mut c, "full/sleeper", WITHIN, |s| state_of(s) == TaskState::Running).await;
    // Writes until the disk is full (dd fails with ENOSPC), then waits; SIGUSR2 ends it with
    // its own exit code.
    let filler =
        "trap 'exit 3' USR2; dd if=/dev/zero of=/workdir/fill bs=1M 2>/dev/null; while true; do sleep 0.1; done";
    c.run_task(sh("full/filler", filler)).await.unwrap();
    wait_for(&mut c, "full/filler", WITHIN, |s| state_of(s) == TaskState::Running).await;
    let deadline = Instant::now() + WITHIN;
    while fs.space().1 >= 4096 {
        assert!(Instant::now() < deadline, "the task never filled the disk: {:?}", fs.space());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A kill on a full disk lands, and the killed task's end is recorded.
    c.kill_task(worker::KillTaskRequest { task_id: "full/sleeper".into(), term_timeout_ms: 100 }).await.unwrap();
    let s = wait_end(&mut c, "full/sleeper", WITHIN).await;
    assert_eq!(state_of(&s), TaskState::Killed, "{s:?}");
    // Full again (the record took less than the room kept for it), then the task ends on its
    // own: its real exit, not WORKER_FAILED.
    let _rest = fs.fill_until_free(0);
    let started: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.state_dir().join("tasks/full_2ffiller.0/started.json")).unwrap())
            .unwrap();
    let pid = nix::unistd::Pid::from_raw(started["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2).unwrap();
    let s = wait_end(&mut c, "full/filler", WITHIN).await;
    assert_eq!(state_of(&s), TaskState::Failed, "its real exit, not WORKER_FAILED: {s:?}");
    assert_eq!(s.exit_code, 3, "{s:?}");
    let e = c.run_task(sh("full/refused", "true")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    std::fs::remove_file(w.state_dir().join("tasks/full_2ffiller.0/workdir/fill")).unwrap();
    c.run_task(sh("full/after", "true")).await.unwrap();
    assert_eq!(state_of(&wait_end(&mut c, "full/after", WITHIN).await), TaskState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: mounts a tmpfs, uses cgroups"]
async fn the_controller_places_no_task_on_a_worker_under_disk_pressure_until_space_returns() {
    let fs = SmallFs::tmpfs("128m", None);
    let ctl = ControllerProc::start(60.0).await;
    let roomy = ctl.worker("disk-roomy", &["--runtime", "process", "--attribute", "host=roomy"]).await;
    let url = ctl.url();
    let full = Worker::start_in(
        "disk-pressed",
        fs.tempdir(),
        &[
            "--runtime",
            "process",
            "--attribute",
            "host=full",
            "--min-free-disk",
            "32M",
            "--soft-free-disk",
            "40M",
            "--controller",
            &url,
            "--heartbeat-interval",
            "0.3",
            "--advertise-host",
            "127.0.0.1",
        ],
    )
    .await;
    ctl.wait_workers(&[&roomy.name, &full.name]).await;
    let c = ctl.cluster();
    let filler = fs.fill_until_free(20 * MIB);
    // The next heartbeat tells the controller (its page shows it).
    let deadline = Instant::now() + WITHIN;
    loop {
        let v = http_get_json(&format!("{}:{}", ctl.listen_host, ctl.port), "/api/controller");
        let told = v["workers"].as_array().unwrap().iter().any(|w| {
            w["worker_id"] == full.name.as_str()
                && w["disk_pressure"].as_str().is_some_and(|p| p.ends_with("free on state/workdirs (minimum 32 MiB)"))
        });
        if told {
            break;
        }
        assert!(Instant::now() < deadline, "the controller was not told: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A job only the full worker may run waits, saying why, once its heartbeat told.
    let mut pinned = sh_job("disk-pinned", 1, "echo pinned");
    pinned.constraints = vec![Constraint {
        key: "host".into(),
        op: ConstraintOp::Eq as i32,
        value: Some(iris_worker::heartbeat::attribute_value("full")),
    }];
    let pinned_id = c.launch(&pinned).await.unwrap();
    let s = wait_job(&c, &pinned_id, WITHIN, |s| s.status_message.contains("takes no task for now")).await;
    assert!(s.status_message.contains("disk: ") && s.status_message.contains("minimum 32 MiB"), "{s:#?}");
    assert_eq!(job_state(&s), JobState::Pending);

    // Jobs that may run anywhere all go to the other worker; the full one gets no RunTask.
    let job_id = c.launch(&sh_job("disk-anywhere", 4, "echo hi")).await.unwrap();
    let s = c.wait(&job_id, WITHIN).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert!(
        s.tasks.iter().all(|t| t.worker_id == roomy.name && t.attempts.iter().all(|a| a.worker_id == roomy.name)),
        "no task was even tried on the worker under pressure: {s:#?}"
    );
    let mut fc = full.client().await;
    let listed = fc.list_tasks(worker::ListTasksRequest {}).await.unwrap().into_inner();
    assert!(listed.tasks.is_empty(), "the worker under pressure got tasks: {listed:?}");
    let e = fc.run_task(sh("disk/direct", "true")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);

    // Space returns: the next heartbeat says so, and the waiting job runs there.
    std::fs::remove_file(filler).unwrap();
    let s = c.wait(&pinned_id, WITHIN).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert!(s.tasks.iter().all(|t| t.worker_id == full.name), "{s:#?}");
}
