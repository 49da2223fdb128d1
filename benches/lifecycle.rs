//! `scripts/bench lifecycle`: the lifecycle of a `/bin/true` busybox container through the
//! project's runtime as a library call, and RunTask → RUNNING / SUCCEEDED through a real
//! server, each beside `runc run` + `runc delete` and the `unshare --fork` floor measured in
//! the same run (interleaved, so load hits every peer alike). Prints a table and one JSON
//! line per figure.
//!
//! The library lifecycle runs first, while this process is single-threaded (libcontainer
//! forks); the server phase then uses a current-thread tokio runtime.

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Figure, run};
use iris_worker::cgroup::Layout;
use iris_worker::proto::{CommandEntrypoint, worker};
use iris_worker::runtime::{self, LaunchSpec, Profile, RuntimeKind, TaskIo};
use nix::sys::wait::waitpid;

fn devnull() -> anyhow::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new().write(true).open("/dev/null")?.into())
}

/// One create → start → exit → reaped → removed cycle through the container runtime.
fn library_lifecycle(rootfs: &Path, work: &Path, layout: &Layout, parent: &str, i: usize) -> anyhow::Result<Duration> {
    let dir = work.join(format!("lib-{i}"));
    std::fs::create_dir_all(&dir)?;
    let spec = LaunchSpec {
        runtime: RuntimeKind::Container,
        profile: Profile::Restricted,
        id: format!("bench-{i}"),
        argv: vec!["/bin/true".into()],
        env: vec!["PATH=/bin".into()],
        cwd_in_task: "/".into(),
        hostname: "bench".into(),
        rootfs: rootfs.to_path_buf(),
        mounts: vec![],
        limits: Default::default(),
        shm_bytes: 1 << 20,
        cgroup: Some((layout.clone(), format!("{parent}/bench-{i}"))),
        timeout_ms: None,
        log_dir: None,
        log_source: None,
        rootfs_overlay: false,
        user: None,
    };
    let t = Instant::now();
    let mut rt = runtime::for_kind(RuntimeKind::Container)?;
    let pid = rt.create(&spec, &dir, TaskIo { stdout: devnull()?, stderr: devnull()? })?;
    let t1 = t.elapsed();
    rt.start()?;
    let t2 = t.elapsed();
    waitpid(pid, None)?;
    let t3 = t.elapsed();
    rt.remove()?;
    let took = t.elapsed();
    if std::env::var_os("IRIS_BENCH_PHASES").is_some() {
        eprintln!("create {t1:?} start {:?} wait {:?} remove {:?}", t2 - t1, t3 - t2, took - t3);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(took)
}

fn runc_bundle(rootfs: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let bundle = work.join("runc-bundle");
    std::fs::create_dir_all(&bundle)?;
    let st = Command::new("runc").arg("spec").current_dir(&bundle).status().context("running runc spec")?;
    if !st.success() {
        bail!("runc spec failed");
    }
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    config["root"]["path"] = rootfs.to_string_lossy().into_owned().into();
    config["root"]["readonly"] = true.into();
    // The same namespaces as ours: no network namespace.
    config["linux"]["namespaces"] = serde_json::json!([{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"}]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(bundle)
}

fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let st = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(t.elapsed())
}

fn runc_lifecycle(bundle: &Path, i: usize) -> anyhow::Result<Duration> {
    let id = format!("iris-bench-runc-{}-{i}", std::process::id());
    let t = Instant::now();
    timed(Command::new("runc").arg("run").arg("-b").arg(bundle).arg(&id))?;
    timed(Command::new("runc").arg("delete").arg("-f").arg(&id))?;
    Ok(t.elapsed())
}

fn unshare_floor() -> anyhow::Result<Duration> {
    timed(Command::new("unshare").args(["--mount", "--pid", "--uts", "--ipc", "--fork", "/bin/true"]))
}

async fn server_figures(exe: &Path, rootfs: &Path, work: &Path, n: usize) -> anyhow::Result<(Figure, Figure)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let state = work.join("server-state");
    let mut child = Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--worker-id", "iris-bench"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--rootfs")
        .arg(rootfs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iris-worker serve")?;
    let result = async {
        let url = format!("http://127.0.0.1:{port}");
        let mut client = common::connect(&url, Duration::from_secs(20)).await?;
        let mut running = Figure::new("RunTask → RUNNING (server)");
        let mut done = Figure::new("RunTask → SUCCEEDED (server)");
        for i in 0..n {
            let task_id = format!("bench/task-{i}");
            let req = worker::RunTaskRequest {
                job_id: "bench".into(),
                task_id: task_id.clone(),
                command: Some(CommandEntrypoint { argv: vec!["/bin/true".into()], setup_commands: vec![] }),
                ..Default::default()
            };
            let r = run(&mut client, req).await?;
            running.samples.push(r.running);
            done.samples.push(r.ended);
        }
        Ok((running, done))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = Command::new(exe).arg("cleanup").arg("--state-dir").arg(&state).arg("--all").stdout(Stdio::null()).status();
    result
}

type Lifecycles = (Figure, Figure, Figure);

fn measure_lifecycles(
    rootfs: &Path,
    work: &Path,
    layout: &Layout,
    parent: &str,
    n: usize,
) -> anyhow::Result<Lifecycles> {
    let bundle = runc_bundle(rootfs, work)?;
    let mut lib = Figure::new("lifecycle, library (create→start→exit→reaped→removed)");
    let mut runc = Figure::new("lifecycle, runc run + runc delete");
    let mut floor = Figure::new("unshare --fork floor");
    for i in 0..n {
        lib.samples.push(library_lifecycle(rootfs, work, layout, parent, i)?);
        runc.samples.push(runc_lifecycle(&bundle, i)?);
        floor.samples.push(unshare_floor()?);
    }
    Ok((lib, runc, floor))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // runc wants the real path of the rootfs, not a symlink to it.
    let rootfs = std::fs::canonicalize(
        std::env::var("IRIS_BENCH_ROOTFS").unwrap_or_else(|_| "/var/cache/iris-worker/rootfs/busybox".into()),
    )
    .context("the busybox rootfs (run scripts/fixtures)")?;
    let exe =
        PathBuf::from(std::env::var("IRIS_BENCH_EXE").context("IRIS_BENCH_EXE: the iris-worker binary to serve")?);
    let work = tempfile::Builder::new().prefix("iris-bench-").tempdir()?;
    let layout = Layout::detect()?;
    let parent = format!("{}/iris-worker/iris-bench-{}", layout.own_path()?.trim_end_matches('/'), std::process::id());
    layout.prepare_parent(&parent)?;
    let measured = measure_lifecycles(&rootfs, work.path(), &layout, &parent, n);
    // The parent cgroups go whatever happened.
    let _ = layout.release_parent(&parent);
    let (lib, runc, floor) = measured?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (running, done) = rt.block_on(server_figures(&exe, &rootfs, work.path(), n.min(30)))?;

    let runc_p50 = runc.pct(0.5);
    let floor_p50 = floor.pct(0.5);
    println!("{:<58} {:>9} {:>9} {:>12} {:>12}", "figure (n runs)", "p50 ms", "p90 ms", "runc/this", "this/floor");
    for f in [&lib, &runc, &floor, &running, &done] {
        let p50 = f.pct(0.5);
        println!(
            "{:<58} {:>9.2} {:>9.2} {:>11.2}x {:>11.2}x",
            format!("{} ({})", f.name, f.samples.len()),
            p50,
            f.pct(0.9),
            runc_p50 / p50,
            p50 / floor_p50
        );
    }
    for f in [&lib, &runc, &floor, &running, &done] {
        println!(
            "{}",
            serde_json::json!({"bench": "lifecycle", "figure": f.name, "runs": f.samples.len(), "p50_ms": f.pct(0.5),
                "p90_ms": f.pct(0.9), "runc_p50_over_this": runc_p50 / f.pct(0.5), "this_over_floor": f.pct(0.5) / floor_p50})
        );
    }
    Ok(())
}
