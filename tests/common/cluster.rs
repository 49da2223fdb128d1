//! Cluster test helpers: a real `iris-worker controller serve` process, workers registered
//! with it (plain or inside a network namespace the test makes), job requests, and polling.
//! Everything is stopped and removed on drop, also when the test fails.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iris_worker::controller::Cluster;
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
        let mut args = vec!["--controller", &url, "--heartbeat-interval", "0.3", "--advertise-host", "127.0.0.1"];
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
}

impl NsWorker {
    pub async fn start(ns: &Netns, name: &str, controller_url: &str, extra: &[&str]) -> NsWorker {
        let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
        let name = format!("{TEST_PREFIX}{name}-{}", std::process::id());
        let port = free_port();
        let addr = format!("{}:{port}", ns.ns_ip);
        let log = std::fs::File::create(state.path().join("worker.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg(exe())
            .args(["serve", "--listen", &format!("0.0.0.0:{port}")])
            .arg("--state-dir")
            .arg(state.path())
            .arg("--rootfs")
            .arg(rootfs())
            .args(["--worker-id", &name, "--controller", controller_url, "--advertise-host", &ns.ns_ip])
            .args(["--heartbeat-interval", "0.3"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        NsWorker { name, state, addr, child: Some(child) }
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
            .stdout(Stdio::null())
            .status();
    }
}
