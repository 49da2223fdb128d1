//! The image tests' peers: Debian's `docker-registry` on 127.0.0.1 and Debian's `containerd`,
//! each started here in its own temp dir (data, config, sockets), killed by its pid and removed
//! on drop. Images come from the OCI layout `scripts/fixtures images` builds, pushed with
//! `skopeo` and pulled into containerd with `ctr`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The OCI layout of the test images (`scripts/fixtures images`).
pub fn layout() -> PathBuf {
    std::env::var_os("IRIS_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/iris-worker/images"))
        .join("layout")
}

fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} was not ready within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A registry with its storage in a temp dir.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new().prefix("iwtest-registry-").tempdir().unwrap();
        for _ in 0..5 {
            let port = super::free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            );
            std::fs::write(dir.path().join("config.yml"), config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("docker-registry (scripts/setup installs it)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                // Our registry's own socket, not just an answer on the port: between
                // free_port() and the bind another test's registry may take the port; this one
                // then exits, but a connect would reach the other's, and two tests would push
                // into one registry's repositories.
                if super::listening_ports(child.id()).contains(&port) {
                    return Registry { dir, port, child: Some(child) };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start; see {}", dir.path().join("registry.log").display());
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes the fixture layout's `tag` as `<name>:test`; returns the image reference.
    pub fn push(&self, tag: &str, name: &str) -> String {
        let reference = format!("{}/{name}:test", self.host());
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout().display()))
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo copy {tag}: {}", String::from_utf8_lossy(&out.stderr));
        reference
    }

    /// The file holding blob `digest` in the registry's storage.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A containerd with its root, state and sockets in a temp dir (CRI off).
pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Containerd {
    pub fn start() -> Containerd {
        // Short paths: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new().prefix("iwtest-ctd-").tempdir_in("/tmp").unwrap();
        let d = dir.path();
        let config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/ttrpc.sock\"\n\
             [debug]\n  address = \"{0}/debug.sock\"\n",
            d.display()
        );
        std::fs::write(d.join("containerd.toml"), config).unwrap();
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("containerd.log")).unwrap())
            .spawn()
            .expect("containerd (scripts/setup installs it)");
        let me = Containerd { dir, child: Some(child) };
        let sock = me.socket();
        wait_until("containerd", Duration::from_secs(20), || sock.exists());
        me
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr images pull` of `reference` from a plain-http registry into namespace `ns`.
    pub fn pull(&self, ns: &str, reference: &str) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", ns, "images", "pull", "--plain-http", reference])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr pull {reference}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        stop(&mut self.child);
        // Mounts containerd left below its root (snapshots), deepest first.
        super::common::unmount_below(self.dir.path());
    }
}

/// Whether the peers and the fixture exist (root, scripts/setup, scripts/fixtures images).
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    for bin in ["/usr/bin/docker-registry", "/usr/bin/skopeo", "/usr/bin/containerd", "/usr/bin/ctr"] {
        if !Path::new(bin).exists() {
            return Err(format!("{bin} is missing (run scripts/setup)"));
        }
    }
    if !layout().join("index.json").exists() {
        return Err(format!("{} is missing (run scripts/fixtures images)", layout().display()));
    }
    Ok(())
}

/// An image store of a test's own, removed on drop: bind it before the workers that use it,
/// so they drop (and unmount their overlays) first.
pub struct ImageStore(pub PathBuf);

impl ImageStore {
    /// A new empty store named after the test binary (`iwtest-<what>-…` under the temp dir).
    pub fn new(what: &str) -> ImageStore {
        ImageStore(tempfile::Builder::new().prefix(&format!("iwtest-{what}-")).tempdir().unwrap().keep())
    }

    /// The `--image-dir` flag of a worker on this store, with `extra` after it.
    pub fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--image-dir", self.0.to_str().unwrap()];
        args.extend_from_slice(extra);
        args
    }
}

impl Drop for ImageStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `(hits, misses)` of the image cache in a worker's /metrics: layers reused and unpacked.
pub fn image_layers(addr: &str) -> (u64, u64) {
    let value = |name: &str| super::common::metric(addr, &format!("{name}{{cache=\"images\"}}")) as u64;
    (value("iris_worker_cache_hits_total"), value("iris_worker_cache_misses_total"))
}

/// Panics, saying why, when the registry or containerd cannot run here (a test that needs
/// them must not pass without them).
pub fn require_peers(tests: &str) {
    if let Err(why) = available() {
        panic!("the {tests} tests cannot run here: {why}");
    }
}
