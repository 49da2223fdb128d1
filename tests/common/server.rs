//! A worker or controller process started with exactly the flags a test gives (a token, TLS,
//! a descriptor limit), ready once it listens on its port — no RPC needed, so it works whatever
//! the server demands of callers. Stopped and cleaned up on drop.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TEST_PREFIX, disk_flags, exe, free_port, listening_ports, rootfs};

/// A worker or controller process with its own flags; ready once it listens on its port.
pub struct Server {
    pub state: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    worker: bool,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_path(&self) -> PathBuf {
        self.state.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `iris-worker serve` (or `controller serve`) on `listen_ip` with `extra` flags.
    pub async fn start(worker: bool, name: &str, listen_ip: &str, extra: &[&str]) -> Server {
        Server::start_limited(worker, name, listen_ip, extra, None).await
    }

    /// [`Server::start`] with at most `max_fds` open descriptors (soft and hard limit).
    pub async fn start_limited(
        worker: bool,
        name: &str,
        listen_ip: &str,
        extra: &[&str],
        max_fds: Option<u64>,
    ) -> Server {
        let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
        let mut s = Server { state, port: 0, child: None, worker };
        for _ in 0..5 {
            s.port = free_port();
            let log = std::fs::File::create(s.log_path()).unwrap();
            let mut cmd = Command::new(exe());
            if worker {
                cmd.arg("serve")
                    .arg("--rootfs")
                    .arg(rootfs())
                    .args(["--worker-id", &format!("{TEST_PREFIX}{name}-{}", std::process::id())])
                    .args(disk_flags(extra));
            } else {
                cmd.args(["controller", "serve"]);
            }
            if let Some(n) = max_fds {
                use std::os::unix::process::CommandExt;
                // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
                unsafe {
                    cmd.pre_exec(move || {
                        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                            .map_err(std::io::Error::from)
                    });
                }
            }
            let child = cmd
                .arg("--listen")
                .arg(format!("{listen_ip}:{}", s.port))
                .arg("--state-dir")
                .arg(s.state.path())
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let pid = child.id();
            s.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if listening_ports(pid).contains(&s.port) {
                    return s;
                }
                if let Some(Some(_)) = s.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        panic!("the server did not start: {}", s.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.worker {
            let _ = Command::new(exe())
                .arg("cleanup")
                .arg("--state-dir")
                .arg(self.state.path())
                .arg("--all")
                .stdout(Stdio::null())
                .status();
        }
    }
}
