//! The BuildKit peer of the tests: Debian's docker.io daemon (20.10, BuildKit v0.8 inside),
//! used only for its embedded BuildKit — the worker never depends on it. Each `Dockerd` runs
//! its own containerd (root, state and sockets under a temp dir, the CRI plugin off) and a
//! dockerd on that containerd with a temp data root, exec root, pid file and socket, without
//! iptables rules or IP forwarding (its `docker0` bridge stays: RUN steps need a network). Both are started here and killed by their pids on
//! drop; then their mounts below the temp dir, the temp dir, any `docker0` link and the empty
//! `docker` cgroups are removed.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Docker 20.10 CLI (the newer /usr/local/bin/docker lacks what this needs).
pub const DOCKER_CLI: &str = "/usr/bin/docker";

pub struct Dockerd {
    pub dir: tempfile::TempDir,
    containerd: Option<Child>,
    dockerd: Option<Child>,
    /// Whether `docker0` existed before (then it is not ours to remove).
    had_docker0: bool,
    /// One daemon at a time per test binary: they would share the `docker0` bridge.
    _one: std::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn docker0_exists() -> bool {
    Path::new("/sys/class/net/docker0").exists()
}

/// Whether this host can run the peer (root and the Debian packages from scripts/setup).
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    for bin in ["/usr/sbin/dockerd", "/usr/bin/containerd", DOCKER_CLI] {
        if !Path::new(bin).exists() {
            return Err(format!("{bin} is missing (scripts/setup installs docker.io and containerd)"));
        }
    }
    Ok(())
}

fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} was not ready within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Dockerd {
    /// Starts containerd and dockerd; returns once the daemon answers.
    pub fn start() -> Dockerd {
        // Short paths: unix socket paths are limited to 108 bytes.
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new().prefix("iwtest-dockerd-").tempdir_in("/tmp").unwrap();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        let mut me = Dockerd { dir, containerd: None, dockerd: None, had_docker0: docker0_exists(), _one: one };
        let config = format!(
            "version = 2\nroot = \"{0}/ctd-root\"\nstate = \"{0}/ctd-state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd-ttrpc.sock\"\n\
             [debug]\n  address = \"{0}/containerd-debug.sock\"\n",
            d.display()
        );
        std::fs::write(d.join("containerd.toml"), config).unwrap();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        me.containerd = Some(
            Command::new("/usr/bin/containerd")
                .arg("--config")
                .arg(d.join("containerd.toml"))
                .stdin(Stdio::null())
                .stdout(log("containerd.out"))
                .stderr(log("containerd.log"))
                .spawn()
                .unwrap(),
        );
        let sock = d.join("containerd.sock");
        wait_until("containerd", Duration::from_secs(20), || sock.exists());

        std::fs::write(d.join("daemon.json"), "{}").unwrap();
        me.dockerd = Some(
            Command::new("/usr/sbin/dockerd")
                .arg(format!("--containerd={}", sock.display()))
                // The default bridge stays: BuildKit's RUN steps need a network (`--bridge=none`
                // fails them with "network bridge not found").
                .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
                .arg("--config-file")
                .arg(d.join("daemon.json"))
                .arg("--data-root")
                .arg(d.join("data"))
                .arg("--exec-root")
                .arg(d.join("exec"))
                .arg("--pidfile")
                .arg(d.join("docker.pid"))
                .arg("--host")
                .arg(format!("unix://{}", d.join("docker.sock").display()))
                .stdin(Stdio::null())
                .stdout(log("dockerd.out"))
                .stderr(log("dockerd.log"))
                .spawn()
                .unwrap(),
        );
        let host = me.host();
        let mut tries = 0;
        wait_until("dockerd", Duration::from_secs(60), || {
            tries += 1;
            Command::new(DOCKER_CLI)
                .args(["-H", &host, "version", "--format", "{{.Server.Version}}"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        me
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// `-H` for the CLI.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The BuildKit address of the worker's `--buildkit` for this daemon.
    pub fn buildkit_addr(&self) -> String {
        format!("docker-unix://{}", self.socket().display())
    }

    /// Imports `rootfs` (a directory) as the image `name` with `docker import`.
    pub fn import(&self, rootfs: &Path, name: &str) {
        let tarball = self.dir.path().join("import.tar");
        let tar = Command::new("tar").arg("-C").arg(rootfs).arg("-cf").arg(&tarball).arg(".").status().unwrap();
        assert!(tar.success(), "tar of {} failed", rootfs.display());
        let out =
            Command::new(DOCKER_CLI).args(["-H", &self.host(), "import"]).arg(&tarball).arg(name).output().unwrap();
        assert!(out.status.success(), "docker import failed: {}", String::from_utf8_lossy(&out.stderr));
        let _ = std::fs::remove_file(&tarball);
    }

    /// The daemons' own logs, for failure messages.
    pub fn logs(&self) -> String {
        ["containerd.log", "dockerd.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default()))
            .collect()
    }
}

fn stop(child: &mut Option<Child>, grace: Duration) {
    let Some(mut c) = child.take() else { return };
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        stop(&mut self.dockerd, Duration::from_secs(15));
        stop(&mut self.containerd, Duration::from_secs(10));
        // Mounts the daemons left below the temp dir (overlays, shm, netns), deepest first.
        super::common::unmount_below(self.dir.path());
        if !self.had_docker0 && docker0_exists() {
            let _ = Command::new("ip").args(["link", "delete", "docker0"]).stderr(Stdio::null()).status();
        }
        remove_empty_cgroups();
    }
}

/// Removes the empty `docker` cgroups (and empty ones below them, like `docker/buildkit`) in
/// every hierarchy; a cgroup still in use is not empty and stays.
fn remove_empty_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    for h in hierarchies.flatten() {
        let docker = h.path().join("docker");
        if docker.is_dir() {
            remove_tree_bottom_up(&docker);
        }
    }
}

fn remove_tree_bottom_up(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree_bottom_up(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
