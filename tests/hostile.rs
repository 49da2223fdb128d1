//! Hostile and malformed requests (issue 14, section 4): idle and slow clients cannot take the
//! port (descriptors stay bounded, HealthCheck still answers at once, the idle ones are closed
//! after the timeout); an over-size body gets Connect's error form; long ids are refused
//! naming the field, with no host path and cut short; a RunTask failing half-way leaves
//! nothing; unknown JSON fields are ignored.

mod common;
#[path = "common/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Worker, task};
use iris_worker::proto::{Empty, worker};
use server::Server;

/// A raw HTTP/1.1 exchange: (status, body).
fn http(port: u16, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), body.to_string())
}

fn connect_json(port: u16, method: &str, body: &str) -> (u16, String) {
    http(
        port,
        format!(
            "POST /iris.cluster.WorkerService/{method} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// One Connect HealthCheck on a new connection; how long it took.
fn timed_health(port: u16) -> Duration {
    let start = Instant::now();
    let (status, body) = connect_json(port, "HealthCheck", "{}");
    assert_eq!(status, 200, "{body}");
    start.elapsed()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker with a low descriptor limit"]
async fn two_thousand_idle_connections_neither_exhaust_descriptors_nor_delay_health_checks() {
    const FDS: u64 = 512;
    let w = Server::start_limited(true, "idle", "127.0.0.1", &["--read-timeout", "3"], Some(FDS)).await;
    let pid = w.pid();
    // What a HealthCheck costs on this machine now, before any idle connection: the bound
    // below scales with it when other tests load the machine.
    let mut baseline: Vec<Duration> = (0..5).map(|_| timed_health(w.port)).collect();
    baseline.sort();
    let baseline = baseline[2];
    let mut idle = Vec::new();
    for _ in 0..2000 {
        // Connected, never a byte sent: what a slowloris or a port scan leaves.
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], w.port).into(), Duration::from_secs(5)).unwrap();
        idle.push(s);
    }
    let fds = open_fds(pid);
    assert!((fds as u64) < FDS, "the worker holds {fds} descriptors of its {FDS}");
    // HealthCheck answers at once on a new connection, with the idle ones still open.
    let mut times: Vec<Duration> = (0..5).map(|_| timed_health(w.port)).collect();
    times.sort();
    let median = times[2];
    println!(
        "HealthCheck beside 2000 idle connections: {times:?}, median {median:?} (alone: {baseline:?}); worker fds {fds}"
    );
    // The issue's figure is 100 ms; on a loaded machine, five times what a HealthCheck took
    // alone in this run, and never as long as the 3 s read timeout: without the connection
    // bound a new connection waits for an idle one to time out, or is never accepted.
    let bound = (baseline * 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
    assert!(median < bound, "HealthCheck took {times:?}, alone {baseline:?}");

    // After the read timeout every idle connection is closed by the worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &mut idle {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed: {other:?}"),
        }
    }
    assert!(open_fds(pid) < 100, "descriptors back down: {}", open_fds(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn slow_headers_and_slow_bodies_time_out() {
    let w = Server::start(true, "slow", "127.0.0.1", &["--read-timeout", "1"]).await;
    // Headers that never end: the connection is closed.
    let start = Instant::now();
    let (status, _) = http(w.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
    assert_eq!(status, 0, "no answer to half a request");
    assert!(start.elapsed() < Duration::from_secs(15), "closed after the read timeout: {:?}", start.elapsed());
    // A body that stops short: DEADLINE_EXCEEDED in Connect's form.
    let (status, body) = http(
        w.port,
        b"POST /iris.cluster.WorkerService/HealthCheck HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    );
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("deadline_exceeded"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn an_oversize_body_gets_connects_error_form() {
    let w = Worker::start("oversize", &[]).await;
    let length = (64u64 << 20) + 1;
    let (status, body) = http(
        w.port,
        format!(
            "POST /iris.cluster.WorkerService/RunTask HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/proto\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status, 413, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(v["code"], "resource_exhausted", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn long_ids_are_refused_naming_the_field_without_paths_and_echoed_short() {
    let w = Worker::start("long-ids", &[]).await;
    let mut c = w.client().await;
    // Under the id length limit, but 300 bytes once escaped for the directory name.
    let id = format!("long{}task-0", "/".repeat(100));
    let err = c.run_task(task(&id, &["/bin/true"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("invalid task_id:"), "{}", err.message());
    assert!(!err.message().contains(w.state_dir().to_str().unwrap()), "{}", err.message());
    let huge = "x".repeat(100_000);
    let err = c.run_task(task(&huge, &["/bin/true"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("task_id") && err.message().len() < 300, "{}", err.message());
    let err = c
        .get_task_status(worker::GetTaskStatusRequest { task_id: huge.clone(), include_result: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().len() < 300, "the id is echoed cut short: {} bytes", err.message().len());
    // Nothing was made for them.
    assert_eq!(std::fs::read_dir(w.state_dir().join("tasks")).unwrap().count(), 0);
}

/// A small tmpfs mounted over a directory, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker on a tiny tmpfs"]
async fn a_run_task_failing_half_way_leaves_no_directory_record_or_port() {
    // One port, below the kernel's ephemeral range (32768-60999), where no other test's
    // outgoing connection can hold it.
    let mut w = Worker::start("atomic", &["--port-range", "26200-26200"]).await;
    // Restart the worker on a 256 KiB state filesystem: room for its files, not for a request
    // carrying 1 MiB of workdir files.
    w.kill9();
    let tasks = w.state_dir().join("tasks");
    nix::mount::mount(Some("tmpfs"), &tasks, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=256k")).unwrap();
    let _tmpfs = Tmpfs(tasks.clone());
    w.spawn().await;
    let mut c = w.client().await;
    let mut big = task("atomic/task-0", &["/bin/true"]);
    big.ports = vec!["http".into()];
    big.workdir_files.insert("blob".into(), vec![7u8; 1 << 20]);
    let err = c.run_task(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(!err.message().contains(w.state_dir().to_str().unwrap()), "no host path: {}", err.message());
    assert_eq!(std::fs::read_dir(&tasks).unwrap().count(), 0, "no task directory left");
    let e = c
        .get_task_status(worker::GetTaskStatusRequest { task_id: "atomic/task-0".into(), include_result: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "no record left");
    // The only port of the range is free again.
    let mut small = task("atomic/task-1", &["/bin/true"]);
    small.ports = vec!["http".into()];
    c.run_task(small).await.unwrap();
    let s = common::wait_end(&mut c, "atomic/task-1", Duration::from_secs(60)).await;
    assert_eq!(s.ports.get("http"), Some(&26200), "{s:?}");
    // The tmpfs goes first, then the worker and its state (drop order).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn unknown_json_fields_are_ignored() {
    let w = Worker::start("unknown-fields", &[]).await;
    let (status, body) = connect_json(w.port, "HealthCheck", r#"{"fromTheFuture": {"x": 1}}"#);
    assert_eq!(status, 200, "{body}");
    let (status, body) = connect_json(
        w.port,
        "RunTask",
        r#"{"jobId":"u","taskId":"u/task-0","numTasks":1,"newField":"x",
            "command":{"argv":["/bin/true"],"alsoNew":[1,2]},"resources":{"someDay":true}}"#,
    );
    assert_eq!(status, 200, "{body}");
    let mut c = w.client().await;
    let s = common::wait_end(&mut c, "u/task-0", Duration::from_secs(60)).await;
    assert_eq!(s.exit_code, 0, "{s:?}");
    let _ = c.health_check(Empty {}).await.unwrap();
}

/// A HealthCheck on a new connection: its status, or `None` when none came within `within`.
fn health_within(port: u16, within: Duration) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), within).ok()?;
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(
        b"POST /iris.cluster.WorkerService/HealthCheck HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    String::from_utf8_lossy(&head[..n]).split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn event_streams_and_bodies_that_never_arrive_cannot_hold_every_connection() {
    let w = Server::start(true, "busy", "127.0.0.1", &["--max-connections", "8", "--read-timeout", "3"]).await;
    assert_eq!(health_within(w.port, Duration::from_secs(20)), Some(200), "the worker answers");

    // A gRPC request whose announced body never comes (tonic reads bodies without a timeout
    // of its own) is answered with an error once no byte came for the read timeout, and its
    // connection is free again; before, it stayed busy for good.
    let mut stuck = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    stuck
        .write_all(
            b"POST /iris.cluster.WorkerService/ListTasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Content-Type: application/grpc\r\nTE: trailers\r\nContent-Length: 100\r\n\r\n\0",
        )
        .unwrap();
    stuck.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = [0u8; 512];
    let n = stuck.read(&mut head).unwrap_or(0);
    let got = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(got.contains("grpc-status: 2") && got.contains("read%20timeout"), "a stuck body ends in an error: {got:?}");

    // Every connection an event stream that never ends (the dashboard's live views), opened one
    // after another: a new client is still answered, the oldest stream making room (its
    // browser's EventSource reconnects). Before, streams counted as busy and the accept loop
    // waited for one to end.
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /api/events/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut head = [0u8; 256];
        let n = s.read(&mut head).unwrap_or(0);
        let got = String::from_utf8_lossy(&head[..n]).to_string();
        assert!(got.starts_with("HTTP/1.1 200"), "stream {i}: {got:?}");
        streams.push(s);
    }
    assert_eq!(health_within(w.port, Duration::from_secs(10)), Some(200), "HealthCheck beside 8 event streams");
    drop(streams);
}
