//! `scripts/bench images` (issue 5), beside its peers in the same run (interleaved):
//!
//! 1. pull + unpack of the python test image from a local `docker-registry` into a fresh
//!    ImageStore (manifest, config, both layers verified and unpacked as they stream) vs
//!    `skopeo copy docker://… oci:…` + `umoci unpack` of the same image (goal ≤ 0.7×);
//! 2. rootfs ready for a second task of the same image: the store's lookup + the task's overlay
//!    mount (goal ≤ 2 ms), unmounted after each run.
//!
//! Prints a table and one JSON line per figure.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Figure, Row};
use iris_worker::env::image::{ImageStore, ImageStoreConfig};

/// A docker-registry on a free loopback port, its storage in `dir`; killed on drop.
struct Registry {
    child: std::process::Child,
    host: String,
}

impl Registry {
    fn start(dir: &Path) -> anyhow::Result<Registry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("docker-registry (scripts/setup installs it)")?;
        let reg = Registry { child, host: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on {}", reg.host);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(reg)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn store(dir: &Path, registry: &str) -> anyhow::Result<ImageStore> {
    Ok(ImageStore::open(ImageStoreConfig {
        dir: dir.to_path_buf(),
        insecure_registries: vec![registry.to_string()],
        auth_file: None,
        containerd: None,
        max_bytes: u64::MAX,
        devices: false,
        pull: Default::default(),
    })?)
}

fn main() -> anyhow::Result<()> {
    let runs = common::runs(3);
    let layout = common::cache_dir().join("images/layout");
    if !layout.join("index.json").exists() {
        bail!("{} is missing (scripts/fixtures images)", layout.display());
    }
    let work = tempfile::Builder::new().prefix("iris-bench-images-").tempdir()?;
    let registry = Registry::start(work.path())?;
    let reference = format!("{}/python:bench", registry.host);
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:python", layout.display()))
        .arg(format!("docker://{reference}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let mut ours = Figure::new("pull + unpack, python image (2 layers, 236 MB)");
    let mut peer = Figure::new("skopeo copy + umoci unpack, same image");
    for i in 0..runs {
        let dir = work.path().join(format!("store-{i}"));
        let t = Instant::now();
        let image = rt.block_on(store(&dir, &registry.host)?.pull(&reference))?;
        ours.samples.push(t.elapsed());
        drop(image);
        std::fs::remove_dir_all(&dir)?;

        let oci = work.path().join(format!("oci-{i}"));
        let bundle = work.path().join(format!("bundle-{i}"));
        let t = Instant::now();
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:python", oci.display())))?;
        run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:python", oci.display())).arg(&bundle))?;
        peer.samples.push(t.elapsed());
        std::fs::remove_dir_all(&oci)?;
        std::fs::remove_dir_all(&bundle)?;
    }

    // A second task of an image the store has: look it up, mount its overlay.
    let dir = work.path().join("store");
    let images = store(&dir, &registry.host)?;
    rt.block_on(images.pull(&reference))?;
    let mut ready = Figure::new("rootfs ready for a second task (lookup + overlay mount)");
    for i in 0..50 {
        let task = work.path().join(format!("task-{i}"));
        let t = Instant::now();
        let image = rt.block_on(images.pull(&reference))?;
        images.mount(&image, &task)?;
        ready.samples.push(t.elapsed());
        iris_worker::env::image::unmount(&task)?;
        std::fs::remove_dir_all(&task)?;
    }
    drop(images);

    let ratio = ours.pct(0.5) / peer.pct(0.5);
    let rows = vec![
        Row::timed(&ours, "ms")
            .vs(format!("this/(skopeo+umoci) {ratio:.2}x"))
            .with("this_over_peer", ratio)
            .goal_text("≤ 0.7x skopeo+umoci", ratio <= 0.7),
        Row::timed(&peer, "ms"),
        Row::timed(&ready, "ms").goal(false, 2.0),
    ];
    common::report("images", &rows);
    drop(registry);
    Ok(())
}
