//! Shared by the integration tests: a real `iris-worker serve` process on a temporary state
//! directory, a gRPC client, and polling helpers. Every worker is stopped and cleaned up
//! (`iris-worker cleanup --all`) when its handle drops, even when the test fails.
//!
//! Root-only tests carry `#[ignore = "root: ..."]`; `scripts/test` runs them with
//! `--include-ignored`.

#![allow(dead_code)]

pub mod elf;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iris_worker::proto::worker_service_client::WorkerServiceClient;
use iris_worker::proto::{CommandEntrypoint, Empty, ResourceSpecProto, TaskStatus, worker};
use iris_worker::rpc::state_from_proto;
use iris_worker::task::TaskState;
use tonic::transport::Channel;

pub type Client = WorkerServiceClient<Channel>;

/// The worker id prefix of every test worker (the leftover check looks for it).
pub const TEST_PREFIX: &str = "iwtest-";

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_iris-worker")
}

/// The busybox root filesystem built by `scripts/fixtures`.
pub fn rootfs() -> PathBuf {
    std::env::var_os("IRIS_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/iris-worker/rootfs/busybox"))
}

/// The TCP ports process `pid` listens on (its sockets' inodes matched in /proc/net/tcp{,6}).
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, the inode is the 10th field.
            if f.len() > 9
                && f[3] == "0A"
                && inodes.iter().any(|i| i == f[9])
                && let Some(port) = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// A port free now, above every task port range the tests use (the default 30000-39999
/// included): a worker refuses a --port-range holding its own port.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port >= 40_000 {
            return port;
        }
    }
}

/// A worker process for one test.
pub struct Worker {
    pub name: String,
    pub state: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    /// The address it listens on (its port is `port`); clients use 127.0.0.1.
    pub listen_ip: &'static str,
    /// More environment variables for the worker process (and so its supervisors).
    pub env: Vec<(String, String)>,
    /// Its own `--port-lock-dir` (unless the test gives one): tests leave the host's alone.
    pub port_locks: tempfile::TempDir,
}

fn port_locks() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("iris-worker-test-ports-").tempdir().unwrap()
}

impl Worker {
    /// Starts `iris-worker serve` with the given extra flags and waits until it answers.
    pub async fn start(name: &str, extra: &[&str]) -> Worker {
        Worker::start_on(name, "127.0.0.1", extra).await
    }

    /// [`Worker::start`] listening on `listen_ip` (e.g. `0.0.0.0`: every address of the host).
    pub async fn start_on(name: &str, listen_ip: &'static str, extra: &[&str]) -> Worker {
        Self::start_full(name, listen_ip, extra, &[]).await
    }

    /// [`Self::start`] with more environment variables.
    pub async fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        Self::start_full(name, "127.0.0.1", extra, env).await
    }

    async fn start_full(name: &str, listen_ip: &'static str, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
        let mut w = Worker {
            name: format!("{TEST_PREFIX}{name}-{}", std::process::id()),
            state,
            port: 0,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            listen_ip,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            port_locks: port_locks(),
        };
        w.spawn().await;
        w
    }

    /// [`Worker::start`] on a state directory the test made (e.g. on a small filesystem of
    /// its own).
    pub async fn start_in(name: &str, state: tempfile::TempDir, extra: &[&str]) -> Worker {
        let mut w = Worker {
            name: format!("{TEST_PREFIX}{name}-{}", std::process::id()),
            state,
            port: 0,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            listen_ip: "127.0.0.1",
            env: Vec::new(),
            port_locks: port_locks(),
        };
        w.spawn().await;
        w
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (Re)starts the process on the same state directory.
    pub async fn spawn(&mut self) {
        for _ in 0..5 {
            self.port = free_port();
            let log = std::fs::File::create(self.state_dir().join(format!("worker-{}.log", self.port))).unwrap();
            // A test may give its own --rootfs (the python one, say).
            let rootfs_flag: Vec<std::ffi::OsString> = if self.extra.iter().any(|a| a == "--rootfs") {
                vec![]
            } else {
                vec!["--rootfs".into(), rootfs().into()]
            };
            let port_lock_flag = self.port_lock_flag();
            let child = Command::new(exe())
                .arg("serve")
                .arg("--listen")
                .arg(format!("{}:{}", self.listen_ip, self.port))
                .arg("--state-dir")
                .arg(self.state_dir())
                .args(rootfs_flag)
                .args(port_lock_flag)
                .args(disk_flags(&self.extra))
                .arg("--worker-id")
                .arg(&self.name)
                .args(&self.extra)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(Some(_)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                    break; // exited (port taken?): try another port
                }
                // Healthy, and on a port this process listens on: another test's worker may
                // hold the port we picked, and then it is the one answering.
                if let Ok(mut c) = self.try_client().await
                    && c.health_check(Empty {}).await.is_ok()
                    && self.child.as_ref().is_some_and(|c| listening_ports(c.id()).contains(&self.port))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.kill9();
        }
        panic!("the worker did not start; see {}", self.state_dir().display());
    }

    /// `--port-lock-dir` of its own, unless the test gave one.
    fn port_lock_flag(&self) -> Vec<std::ffi::OsString> {
        match self.extra.iter().position(|a| a == "--port-lock-dir") {
            Some(_) => vec![],
            None => vec!["--port-lock-dir".into(), self.port_locks.path().into()],
        }
    }

    pub async fn try_client(&self) -> Result<Client, tonic::transport::Error> {
        WorkerServiceClient::connect(format!("http://{}", self.addr())).await
    }

    pub async fn client(&self) -> Client {
        self.try_client().await.unwrap()
    }

    /// Kills the worker process with SIGKILL (its supervisors and tasks keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The worker's own log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.state_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("worker-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(exe())
            .arg("cleanup")
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--all")
            .args(self.port_lock_flag())
            .stdout(Stdio::null())
            .status();
    }
}

/// A RunTask request for `argv` in the busybox rootfs.
pub fn task(task_id: &str, argv: &[&str]) -> worker::RunTaskRequest {
    let job_id = task_id.split('/').next().unwrap_or("job").to_string();
    worker::RunTaskRequest {
        job_id,
        task_id: task_id.to_string(),
        num_tasks: 1,
        command: Some(CommandEntrypoint { argv: argv.iter().map(|s| s.to_string()).collect(), setup_commands: vec![] }),
        resources: Some(ResourceSpecProto::default()),
        ..Default::default()
    }
}

/// A shell script task.
pub fn sh(task_id: &str, script: &str) -> worker::RunTaskRequest {
    task(task_id, &["/bin/sh", "-c", script])
}

pub fn state_of(s: &TaskStatus) -> TaskState {
    state_from_proto(s.state).unwrap_or(TaskState::Pending)
}

pub async fn status(c: &mut Client, task_id: &str) -> TaskStatus {
    c.get_task_status(worker::GetTaskStatusRequest { task_id: task_id.into(), include_result: false })
        .await
        .unwrap()
        .into_inner()
}

/// Polls until `pred` holds for the task's status, or panics after `within`.
pub async fn wait_for(
    c: &mut Client,
    task_id: &str,
    within: Duration,
    pred: impl Fn(&TaskStatus) -> bool,
) -> TaskStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = status(c, task_id).await;
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() <= deadline,
            "task {task_id} did not reach the expected state within {within:?}; last status: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for a terminal state.
pub async fn wait_end(c: &mut Client, task_id: &str, within: Duration) -> TaskStatus {
    wait_for(c, task_id, within, |s| state_of(s).is_terminal()).await
}

pub async fn logs(c: &mut Client, task_id: &str, filter: worker::FetchLogsFilter) -> Vec<worker::LogEntry> {
    c.fetch_task_logs(worker::FetchTaskLogsRequest { task_id: task_id.into(), filter: Some(filter) })
        .await
        .unwrap()
        .into_inner()
        .logs
}

pub async fn all_logs(c: &mut Client, task_id: &str) -> Vec<worker::LogEntry> {
    logs(c, task_id, Default::default()).await
}

/// Every cgroup directory below any hierarchy whose name contains `needle`.
pub fn cgroups_named(needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let p = e.path();
                if p.file_name().is_some_and(|n| n.to_string_lossy().contains(needle)) {
                    out.push(p.clone());
                }
                stack.push(p);
            }
        }
    }
    out
}

/// Pids of processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// Unmounts everything mounted at or below `root`, deepest first (what a test peer such as
/// containerd or dockerd left in its temp dir).
pub fn unmount_below(root: &Path) {
    let root = root.to_string_lossy().into_owned();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&root))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The value of the series `name{labels}` in a worker's /metrics (served on its port).
pub fn metric(addr: &str, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

/// The disk thresholds a test worker runs with unless the test sets one itself: none. A
/// worker's defaults are shares of the host's filesystem (refuse below 5 % free, evict below
/// 10 %), so on a nearly full CI disk every test would fail or lose its caches for the host's
/// sake; the tests of the thresholds (tests/disk.rs, tests/caches.rs) give their own on small
/// filesystems of their own.
pub fn disk_flags<S: AsRef<str>>(extra: &[S]) -> Vec<&'static str> {
    const FLAGS: [&str; 4] = ["--min-free-disk", "--soft-free-disk", "--target-free-disk", "--min-free-inodes"];
    if extra.iter().any(|a| FLAGS.contains(&a.as_ref())) {
        return Vec::new();
    }
    FLAGS.iter().flat_map(|f| [*f, "0"]).collect()
}
