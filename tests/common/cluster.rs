//! Cluster test helpers: a real `iris-worker controller serve` process, workers registered
//! with it (plain or inside a network namespace the test makes), job requests, and polling.
//! Everything is stopped and removed on drop, also when the test fails.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iris_controller::Cluster;
use iris_worker::proto::controller::{JobStatus, LaunchJobRequest};
use iris_worker::proto::{CommandEntrypoint, JobState, ResourceSpecProto};

use crate::common::{TEST_PREFIX, Worker, exe, free_port, listening_ports, rootfs};

/// A controller process on a temporary state directory.
pub struct ControllerProc {
    pub state: tempfile::TempDir,
    pub port: u16,
    pub listen_host: String,
    pub worker_timeout: f64,
    pub child: Option<Child>,
    /// More flags for `controller serve`.
    pub extra: Vec<String>,
}

impl ControllerProc {
    /// Starts a controller on a loopback address of its own (127.x.y.z) declaring workers dead
    /// after `worker_timeout` s. Its own address, not 127.0.0.1: a killed controller's port may
    /// be handed to another test's controller before the restart, and that one must not get
    /// this test's heartbeats (it would answer should_reset and the worker would kill its tasks).
    pub async fn start(worker_timeout: f64) -> ControllerProc {
        Self::start_with(worker_timeout, &[]).await
    }

    /// [`Self::start`] with more flags for `controller serve`.
    pub async fn start_with(worker_timeout: f64, extra: &[&str]) -> ControllerProc {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let host = format!("127.{}.{}.{}", 100 + std::process::id() % 100, n / 250, n % 250 + 1);
        Self::start_on_with(&host, worker_timeout, extra).await
    }

    /// Starts a controller listening on `host` (e.g. 0.0.0.0 for workers in namespaces).
    pub async fn start_on(host: &str, worker_timeout: f64) -> ControllerProc {
        Self::start_on_with(host, worker_timeout, &[]).await
    }

    pub async fn start_on_with(host: &str, worker_timeout: f64, extra: &[&str]) -> ControllerProc {
        let state = tempfile::Builder::new().prefix("iris-controller-test-").tempdir().unwrap();
        let mut c = ControllerProc {
            state,
            port: 0,
            listen_host: host.to_string(),
            worker_timeout,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        c.spawn().await;
        c
    }

    /// The lease a test worker of this controller gets: half its worker timeout (at most the
    /// default 30 s), so the lease and its kill end before the controller moves the tasks.
    pub fn lease(&self) -> String {
        (self.worker_timeout / 2.0).min(30.0).to_string()
    }

    /// Starts the process on a port of its choosing (port 0) the first time, then again on the
    /// same state directory and port. Ready once this very process listens and answers (a port
    /// freed by a killed controller may be taken by another test meanwhile).
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("controller.log"))
            .unwrap();
        let child = Command::new(exe())
            .args(["controller", "serve", "--listen", &format!("{}:{}", self.listen_host, self.port)])
            .arg("--state-dir")
            .arg(self.state.path())
            .args(["--worker-timeout", &self.worker_timeout.to_string()])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ports = listening_ports(pid);
            if self.port == 0 && ports.len() == 1 {
                self.port = ports[0];
            }
            if self.port != 0 && ports.contains(&self.port) && self.cluster().list_jobs().await.is_ok() {
                return;
            }
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("the controller exited ({status}): {}", self.logs());
            }
            assert!(Instant::now() < deadline, "the controller did not start: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL workers and clients use from the root network namespace.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.listen_host, self.port)
    }

    pub fn cluster(&self) -> Cluster {
        Cluster::new(&self.url())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.state.path().join("controller.log")).unwrap_or_default()
    }

    /// A worker registered with this controller (heartbeat every 0.3 s), with extra flags.
    pub async fn worker(&self, name: &str, extra: &[&str]) -> Worker {
        let url = self.url();
        let lease = self.lease();
        let mut args = vec!["--controller", &url, "--heartbeat-interval", "0.3", "--advertise-host", "127.0.0.1"];
        args.extend_from_slice(&["--lease", &lease]);
        args.extend_from_slice(extra);
        let w = Worker::start(name, &args).await;
        self.wait_workers(&[&w.name]).await;
        w
    }

    /// Waits until every named worker is registered and healthy.
    pub async fn wait_workers(&self, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ws = self.cluster().workers().await.unwrap_or_default();
            if names.iter().all(|n| ws.iter().any(|w| w.worker_id == *n && w.healthy)) {
                return;
            }
            assert!(Instant::now() < deadline, "workers {names:?} did not register: {ws:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A job of `replicas` tasks running `script` with /bin/sh.
pub fn sh_job(name: &str, replicas: i32, script: &str) -> LaunchJobRequest {
    LaunchJobRequest {
        name: format!("{TEST_PREFIX}{name}-{}", std::process::id()),
        resources: Some(ResourceSpecProto { replicas, ..Default::default() }),
        command: Some(CommandEntrypoint {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            setup_commands: vec![],
        }),
        max_retries_preemption: 10,
        ..Default::default()
    }
}

pub fn job_state(j: &JobStatus) -> JobState {
    JobState::try_from(j.state).unwrap_or(JobState::Unspecified)
}

/// Polls the job until `pred` holds, or panics after `within` with the last status.
pub async fn wait_job(c: &Cluster, job_id: &str, within: Duration, pred: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = c.status(job_id).await.unwrap();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "job {job_id} did not get there within {within:?}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A network namespace with a veth pair to the root namespace: the host side gets
/// `10.<net>.<sub>.1/24`, the namespace side `.2`. Removed on drop.
pub struct Netns {
    pub name: String,
    pub host_veth: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    pub fn create(tag: &str, net: u8) -> Netns {
        let pid = std::process::id();
        let sub = (pid % 250) as u8 + 1;
        let n = Netns {
            name: format!("{TEST_PREFIX}ns-{tag}-{pid}"),
            host_veth: format!("iwh{tag}{}", pid % 100_000),
            host_ip: format!("10.{net}.{sub}.1"),
            ns_ip: format!("10.{net}.{sub}.2"),
        };
        let peer = format!("iwn{tag}{}", pid % 100_000);
        ip(&["netns", "add", &n.name]);
        ip(&["link", "add", &n.host_veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &n.name]);
        ip(&["addr", "add", &format!("{}/24", n.host_ip), "dev", &n.host_veth]);
        ip(&["link", "set", &n.host_veth, "up"]);
        ip(&["-n", &n.name, "addr", "add", &format!("{}/24", n.ns_ip), "dev", &peer]);
        ip(&["-n", &n.name, "link", "set", &peer, "up"]);
        ip(&["-n", &n.name, "link", "set", "lo", "up"]);
        // The host's other addresses (another namespace's veth end) are reached through it.
        ip(&["-n", &n.name, "route", "add", "default", "via", &n.host_ip]);
        n
    }
}

impl Netns {
    /// Cuts the namespace off (its veth's host end down): it reaches nothing and nothing
    /// reaches it, until [`Self::heal`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_veth, "down"]);
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.host_veth, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_veth]).stderr(Stdio::null()).status();
    }
}

/// A worker process inside a network namespace (entered with nsenter, so it keeps the host's
/// mounts and cgroups), registered with a controller reachable at `controller_url`.
pub struct NsWorker {
    pub name: String,
    pub state: tempfile::TempDir,
    pub addr: String,
    pub child: Option<Child>,
    ns_name: String,
    ns_ip: String,
    controller_url: String,
    extra: Vec<String>,
}

impl NsWorker {
    pub async fn start(ns: &Netns, name: &str, controller_url: &str, extra: &[&str]) -> NsWorker {
        let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
        let mut w = NsWorker {
            name: format!("{TEST_PREFIX}{name}-{}", std::process::id()),
            state,
            addr: String::new(),
            child: None,
            ns_name: ns.name.clone(),
            ns_ip: ns.ns_ip.clone(),
            controller_url: controller_url.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        w.spawn(free_port());
        w
    }

    /// (Re)starts the process on the same state directory, listening on `port` in its
    /// namespace (each namespace has its own ports). Its log is appended to.
    pub fn spawn(&mut self, port: u16) {
        self.addr = format!("{}:{port}", self.ns_ip);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.state.path().join("worker.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns_name))
            .arg(exe())
            .args(["serve", "--listen", &format!("0.0.0.0:{port}")])
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--rootfs")
            .arg(rootfs())
            .args(["--worker-id", &self.name, "--controller", &self.controller_url, "--advertise-host", &self.ns_ip])
            .args(["--heartbeat-interval", "0.3"])
            // Its own port locks: tests leave the host's alone.
            .arg("--port-lock-dir")
            .arg(self.state.path().join("port-locks"))
            .args(crate::common::disk_flags(&self.extra))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.state.path().join("worker.log")).unwrap_or_default()
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Drop for NsWorker {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(exe())
            .arg("cleanup")
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--all")
            .arg("--port-lock-dir")
            .arg(self.state.path().join("port-locks"))
            .stdout(Stdio::null())
            .status();
    }
}

/// Where the attempts of a test's tasks record themselves, in a directory the test owns (tasks
/// run with `--runtime process`, so they see it). Each attempt appends `start TASK ATTEMPT PID
/// MS` and, if it ends on its own, `end TASK ATTEMPT PID MS` to `attempts`, and holds an flock
/// on its task's lock file while it lives (its processes inherit it): an attempt that finds
/// the lock taken — an earlier attempt of the same task still alive — appends to `overlaps`.
pub struct AttemptLog {
    pub dir: tempfile::TempDir,
}

/// One line of an [`AttemptLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub event: String,
    pub task_id: String,
    pub attempt_id: i32,
    pub pid: i32,
    pub at_ms: i64,
}

impl AttemptLog {
    pub fn new() -> AttemptLog {
        AttemptLog { dir: tempfile::Builder::new().prefix("iwtest-attempts-").tempdir().unwrap() }
    }

    /// A shell script that records the attempt around `body`.
    pub fn script(&self, body: &str) -> String {
        let d = self.dir.path().display();
        format!(
            "d={d}; k=$(echo \"$IRIS_TASK_ID\" | tr / _); exec 9>>\"$d/$k.lock\"; \
             flock -n 9 || echo \"$IRIS_TASK_ID $IRIS_ATTEMPT_ID $(date +%s%3N)\" >> \"$d/overlaps\"; \
             echo \"start $IRIS_TASK_ID $IRIS_ATTEMPT_ID $$ $(date +%s%3N)\" >> \"$d/attempts\"; \
             {body}
             echo \"end $IRIS_TASK_ID $IRIS_ATTEMPT_ID $$ $(date +%s%3N)\" >> \"$d/attempts\""
        )
    }

    pub fn records(&self) -> Vec<AttemptRecord> {
        std::fs::read_to_string(self.dir.path().join("attempts"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 5).then(|| AttemptRecord {
                    event: f[0].to_string(),
                    task_id: f[1].to_string(),
                    attempt_id: f[2].parse().unwrap_or(-1),
                    pid: f[3].parse().unwrap_or(0),
                    at_ms: f[4].parse().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Attempts that started while an earlier attempt of their task was alive.
    pub fn overlaps(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("overlaps")).unwrap_or_default()
    }

    /// The `start` record of the task's attempt, once it has started.
    pub fn started(&self, task_id: &str, attempt_id: i32) -> Option<AttemptRecord> {
        self.records().into_iter().find(|r| r.event == "start" && r.task_id == task_id && r.attempt_id == attempt_id)
    }
}

/// Milliseconds since the Unix epoch (what `date +%s%3N` prints).
pub fn epoch_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Polls until process `pid` is gone; returns when (epoch ms), or panics after `within`.
pub async fn wait_gone(pid: i32, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(false);
        if zombie {
            break;
        }
        assert!(Instant::now() < deadline, "process {pid} still runs after {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    epoch_ms()
}

/// A TCP proxy on 127.0.0.1 to `upstream` that lets the first `cut` connections' requests
/// through to it but closes each of them as soon as the answer starts: the call lands and its
/// caller never hears back (a connection lost mid-call). Later connections pass untouched.
pub struct LossyProxy {
    pub addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    pub async fn start(upstream: &str, cut: usize) -> LossyProxy {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let upstream = upstream.trim_start_matches("http://").to_string();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut client, _)) = listener.accept().await {
                n += 1;
                let cut_this = n <= cut;
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    if cut_this {
                        let (mut client_r, _client_w) = client.split();
                        let (mut server_r, mut server_w) = server.split();
                        let mut first = [0u8; 1];
                        tokio::select! {
                            _ = tokio::io::copy(&mut client_r, &mut server_w) => {}
                            _ = server_r.read(&mut first) => {}
                        }
                        // Both connections close here, the answer unsent.
                    } else {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        LossyProxy { addr, task }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
