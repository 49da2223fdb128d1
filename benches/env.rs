//! `scripts/bench env` (issue 4): Python environments through a real `iris-worker serve`, each
//! beside a peer measured in the same run (interleaved):
//!
//! 1. a cold venv build (the task's build phase, from its build metrics) vs bare `uv venv` +
//!    `uv pip install -r pyproject.toml` on the same project with a warm uv cache of its own,
//!    both compiling the modules to bytecode (the worker's tasks import from a read-only venv);
//! 2. RunTask → RUNNING of a Python task whose venv is cached vs a command task with no bundle,
//!    and RunTask → the first line of its function vs `python3 -c` of the same function in the
//!    same root filesystem outside any container (`chroot`), until its line is read;
//! 3. bundle fetch + extract (`BundleCache::get`, file://, fresh cache) of a ~200 MB zip vs
//!    `unzip -q`.
//!
//! Prints a table and one JSON line per figure.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Figure, Row, run};
use iris_worker::bundle::{BundleCache, BundleConfig};
use iris_worker::proto::{CommandEntrypoint, worker};

fn cache() -> PathBuf {
    PathBuf::from(std::env::var("IRIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/iris-worker".into()))
}

/// `cloudpickle.dumps((fn, args, kwargs))` of a function that does nothing, by the host's cloudpickle.
fn noop_pickle() -> anyhow::Result<Vec<u8>> {
    let program =
        "import sys, cloudpickle\ndef fn():\n    pass\nsys.stdout.buffer.write(cloudpickle.dumps((fn, (), {})))\n";
    let out = Command::new("python3").arg("-c").arg(program).output().context("running python3")?;
    if !out.status.success() {
        bail!("making the pickle: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// What the timed function prints.
const FIRST_LINE: &str = "iris-bench-first-line";

/// The function the first-line figure times, as a Python definition and call.
fn first_line_function() -> String {
    format!("def fn():\n    print({FIRST_LINE:?}, flush=True)\n")
}

/// `cloudpickle.dumps((fn, (), {}))` of [`first_line_function`].
fn first_line_pickle() -> anyhow::Result<Vec<u8>> {
    let program = format!(
        "import sys, cloudpickle\n{}sys.stdout.buffer.write(cloudpickle.dumps((fn, (), {{}})))\n",
        first_line_function()
    );
    let out = Command::new("python3").arg("-c").arg(program).output().context("running python3")?;
    if !out.status.success() {
        bail!("making the pickle: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// `chroot <rootfs> python3 -c` of the same function, until its line is read from its stdout.
fn python_c_first_line(rootfs: &Path) -> anyhow::Result<Duration> {
    use std::io::BufRead;
    let t = Instant::now();
    let mut child = Command::new("chroot")
        .arg(rootfs)
        .args(["/usr/bin/python3", "-c", &format!("{}fn()\n", first_line_function())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("chroot python3")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let took = t.elapsed();
    child.wait()?;
    if line.trim() != FIRST_LINE {
        bail!("python3 -c printed {line:?}");
    }
    Ok(took)
}

/// RunTask of `req` until its log has the function's line (polled over FetchTaskLogs).
async fn first_line(
    client: &mut iris_worker::proto::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    req: worker::RunTaskRequest,
) -> anyhow::Result<Duration> {
    let task_id = req.task_id.clone();
    let t = Instant::now();
    client.run_task(req).await?;
    let want = worker::FetchTaskLogsRequest {
        task_id: task_id.clone(),
        filter: Some(worker::FetchLogsFilter { regex: FIRST_LINE.into(), max_lines: 1, ..Default::default() }),
    };
    loop {
        if !client.fetch_task_logs(want.clone()).await?.into_inner().logs.is_empty() {
            let took = t.elapsed();
            // Ended before the next task, as every figure's task is.
            loop {
                let status = worker::GetTaskStatusRequest { task_id: task_id.clone(), include_result: false };
                let s = client.get_task_status(status).await?.into_inner();
                match iris_worker::rpc::state_from_proto(s.state) {
                    Some(iris_worker::task::TaskState::Succeeded) => return Ok(took),
                    Some(state) if state.is_terminal() => bail!("{task_id} ended {state:?}: {}", s.error),
                    _ => tokio::task::yield_now().await,
                }
            }
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{task_id} printed no first line within 60 s");
        }
        tokio::task::yield_now().await;
    }
}

/// A uv project named `name` whose dependencies are among the fixture wheels (cloudpickle too,
/// so neither side installs anything after the project).
fn pyproject(name: &str) -> String {
    format!(
        "[project]\nname = \"{name}\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\ndependencies = [\"six\", \"cloudpickle\"]\n"
    )
}

fn project_zip(path: &Path, name: &str) -> anyhow::Result<()> {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path)?);
    z.start_file("pyproject.toml", zip::write::SimpleFileOptions::default())?;
    z.write_all(pyproject(name).as_bytes())?;
    z.finish()?;
    Ok(())
}

/// Bare uv doing the worker's build on the host: a venv, then the project's dependencies.
fn bare_uv(uv: &Path, uv_cache: &Path, dir: &Path) -> anyhow::Result<Duration> {
    let venv = dir.join(".venv");
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
        let out = Command::new(uv)
            .args(args)
            .current_dir(dir)
            .env("UV_CACHE_DIR", uv_cache)
            .env("UV_OFFLINE", "1")
            .env("UV_FIND_LINKS", cache().join("wheels"))
            .env("UV_PYTHON_DOWNLOADS", "never")
            // As the worker's build does (its tasks import from a read-only venv): the same work.
            .env("UV_COMPILE_BYTECODE", "1")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("uv {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let py = venv.join("bin/python");
    let t = Instant::now();
    run(&["venv".as_ref(), "--python".as_ref(), "/usr/bin/python3".as_ref(), venv.as_os_str()])?;
    run(&[
        "pip".as_ref(),
        "install".as_ref(),
        "--python".as_ref(),
        py.as_os_str(),
        "-r".as_ref(),
        "pyproject.toml".as_ref(),
    ])?;
    Ok(t.elapsed())
}

struct ServerFigures {
    worker_build: Figure,
    uv_build: Figure,
    no_bundle: Figure,
    cache_hit: Figure,
    first_line: Figure,
    python_c: Figure,
}

async fn server_figures(exe: &Path, work: &Path, n: usize) -> anyhow::Result<ServerFigures> {
    let python = cache().join("rootfs/python");
    let uv = python.join("usr/local/bin/uv");
    let port = common::worker_port()?;
    let state = work.join("server-state");
    let worker_cache = work.join("server-cache");
    let mut child = Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--worker-id", "iris-bench-env"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--cache-dir")
        .arg(&worker_cache)
        .arg("--rootfs")
        .arg(cache().join("rootfs/busybox"))
        .arg("--python-rootfs")
        .arg(&python)
        .arg("--uv-find-links")
        .arg(cache().join("wheels"))
        .args(["--uv-offline", "true"])
        // The projects are file:// bundles in the work dir: a worker reads those only below a
        // directory it is given.
        .arg("--allow-bundle-path")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iris-worker serve")?;
    let result = async {
        let pickle = noop_pickle()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut client = common::connect(&url, Duration::from_secs(20)).await?;
        let peer_cache = work.join("peer-uv-cache");
        let mut f = ServerFigures {
            worker_build: Figure::new("cold venv build, worker (build phase)"),
            uv_build: Figure::new("cold venv build, bare uv venv + pip install"),
            no_bundle: Figure::new("RunTask → RUNNING, command task, no bundle"),
            cache_hit: Figure::new("RunTask → RUNNING, Python task, venv cached"),
            first_line: Figure::new("RunTask → first line of the function, Python task, venv cached"),
            python_c: Figure::new("python3 -c of the same function, chroot into the same rootfs"),
        };
        let first_pickle = first_line_pickle()?;
        // Round 0 warms both uv caches and is not counted.
        for i in 0..=n {
            let name = format!("p{i}");
            let zip = work.join(format!("{name}.zip"));
            project_zip(&zip, &name)?;
            let python_task = |id: String| worker::RunTaskRequest {
                job_id: "bench".into(),
                task_id: id,
                num_tasks: 1,
                serialized_entrypoint: pickle.clone(),
                bundle_gcs_path: format!("file://{}", zip.display()),
                ..Default::default()
            };
            let cold = run(&mut client, python_task(format!("bench/cold-{i}"))).await?;
            let m = cold.status.build_metrics.clone().context("no build metrics")?;
            if m.from_cache {
                bail!("round {i}: the venv came from the cache");
            }
            let hit = run(&mut client, python_task(format!("bench/hit-{i}"))).await?;
            if !hit.status.build_metrics.as_ref().is_some_and(|m| m.from_cache) {
                bail!("round {i}: the second task built its venv again");
            }
            let plain = run(
                &mut client,
                worker::RunTaskRequest {
                    job_id: "bench".into(),
                    task_id: format!("bench/plain-{i}"),
                    num_tasks: 1,
                    command: Some(CommandEntrypoint { argv: vec!["/bin/true".into()], setup_commands: vec![] }),
                    ..Default::default()
                },
            )
            .await?;
            let first = first_line(
                &mut client,
                worker::RunTaskRequest {
                    serialized_entrypoint: first_pickle.clone(),
                    ..python_task(format!("bench/first-{i}"))
                },
            )
            .await?;
            let peer_first = python_c_first_line(&python)?;
            let dir = work.join(format!("peer-{i}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("pyproject.toml"), pyproject(&name))?;
            let peer = bare_uv(&uv, &peer_cache, &dir)?;
            std::fs::remove_dir_all(&dir)?;
            if i > 0 {
                f.worker_build.samples.push(Duration::from_millis((m.build_finished_ms - m.build_started_ms) as u64));
                f.uv_build.samples.push(peer);
                f.cache_hit.samples.push(hit.running);
                f.no_bundle.samples.push(plain.running);
                f.first_line.samples.push(first);
                f.python_c.samples.push(peer_first);
            }
        }
        Ok(f)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = Command::new(exe).arg("cleanup").arg("--state-dir").arg(&state).arg("--all").stdout(Stdio::null()).status();
    result
}

/// A zip of ~`mb` MiB in 1 MiB files of hex text from a xorshift generator (it deflates to
/// about half, like source and data rather than nothing).
fn big_zip(path: &Path, mb: usize) -> anyhow::Result<u64> {
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let opts = zip::write::SimpleFileOptions::default().compression_level(Some(1));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let hex = b"0123456789abcdef";
    for i in 0..mb {
        for b in &mut buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = hex[(x & 15) as usize];
        }
        z.start_file(format!("data/{:02}/file-{i}.txt", i % 16), opts)?;
        z.write_all(&buf)?;
    }
    z.finish()?.flush()?;
    Ok((mb as u64) << 20)
}

async fn bundle_figures(work: &Path, n: usize) -> anyhow::Result<(Figure, Figure, u64)> {
    let zip = work.join("big.zip");
    let bytes = big_zip(&zip, 200)?;
    let url = format!("file://{}", zip.display());
    let mut ours = Figure::new("200 MB bundle, BundleCache::get (file://, fresh cache)");
    let mut unzip = Figure::new("200 MB bundle, unzip -q");
    for i in 0..n {
        let dir = work.join(format!("bundles-{i}"));
        let mut config = BundleConfig::new(&dir);
        config.sources.allowed_dirs = vec![work.to_path_buf()];
        let cache = BundleCache::new(config)?;
        let t = Instant::now();
        let b = cache.get(&url, None, |_| {}).await?;
        ours.samples.push(t.elapsed());
        drop(b);
        drop(cache);
        std::fs::remove_dir_all(&dir)?;

        let dir = work.join(format!("unzip-{i}"));
        let t = Instant::now();
        let st = Command::new("unzip").arg("-q").arg(&zip).arg("-d").arg(&dir).stdin(Stdio::null()).status()?;
        if !st.success() {
            bail!("unzip failed: {st}");
        }
        unzip.samples.push(t.elapsed());
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::remove_file(&zip)?;
    Ok((ours, unzip, bytes))
}

fn main() -> anyhow::Result<()> {
    let n = common::runs(5);
    let exe =
        PathBuf::from(std::env::var("IRIS_BENCH_EXE").context("IRIS_BENCH_EXE: the iris-worker binary to serve")?);
    let work = tempfile::Builder::new().prefix("iris-bench-env-").tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let s = rt.block_on(server_figures(&exe, work.path(), n))?;
    let (ours, unzip, bytes) = rt.block_on(bundle_figures(work.path(), n))?;

    let mb_s = |f: &Figure| bytes as f64 / f64::from(1 << 20) / (f.pct(0.5) / 1e3);
    let build_ratio = s.worker_build.pct(0.5) / s.uv_build.pct(0.5);
    let added = s.cache_hit.pct(0.5) - s.no_bundle.pct(0.5);
    let first_ratio = s.first_line.pct(0.5) / s.python_c.pct(0.5);
    let unzip_ratio = unzip.pct(0.5) / ours.pct(0.5);
    let rows = vec![
        Row::timed(&s.worker_build, "ms")
            .vs(format!("worker/uv {build_ratio:.2}x"))
            .with("worker_over_uv", build_ratio)
            .goal_text("≤ 1.05x bare uv", build_ratio <= 1.05),
        Row::timed(&s.uv_build, "ms"),
        Row::timed(&s.no_bundle, "ms"),
        Row::timed(&s.cache_hit, "ms")
            .vs(format!("{added:+.2} ms over no bundle"))
            .with("added_over_no_bundle_ms", added)
            .goal_text("≤ 5 ms over no bundle", added <= 5.0),
        Row::timed(&s.first_line, "ms")
            .vs(format!("this/python -c {first_ratio:.2}x"))
            .with("this_over_python_c", first_ratio)
            .goal_text("≤ 1.2x python -c", first_ratio <= 1.2),
        Row::timed(&s.python_c, "ms"),
        Row::timed(&ours, "ms")
            .vs(format!("{:.0} MB/s; unzip/this {unzip_ratio:.2}x", mb_s(&ours)))
            .with("mb_per_s", mb_s(&ours))
            .with("unzip_over_this", unzip_ratio),
        Row::timed(&unzip, "ms").vs(format!("{:.0} MB/s", mb_s(&unzip))).with("mb_per_s", mb_s(&unzip)),
    ];
    common::report("env", &rows);
    Ok(())
}
