//! `scripts/bench lifecycle`: the lifecycle of a `/bin/true` busybox container through the
//! project's runtime as a library call, and RunTask → RUNNING / SUCCEEDED through a real
//! server, each beside `runc run` + `runc delete`, `youki run` (the youki 0.7 CLI, the same
//! libcontainer version) and the `unshare --fork` floor measured in the same run (interleaved,
//! so load hits every peer alike). Prints a table and one JSON line per figure.
//!
//! The library lifecycle runs first, while this process is single-threaded (libcontainer
//! forks); the server phase then uses a current-thread tokio runtime. The benchmark's cgroups
//! go where the worker's would (`Layout::task_root`), so it runs on v1 and pure v2 hosts alike.

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Figure, run};
use iris_worker::cgroup::Layout;
use iris_worker::runtime::{self, LaunchSpec, Profile, RuntimeKind, TaskIo, phases};
use nix::sys::wait::waitpid;

fn devnull() -> anyhow::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new().write(true).open("/dev/null")?.into())
}

/// One create → start → exit → reaped → removed cycle through the container runtime.
fn library_lifecycle(rootfs: &Path, work: &Path, layout: &Layout, parent: &str, i: usize) -> anyhow::Result<Duration> {
    phases::mark("bench: begin");
    let dir = work.join(format!("lib-{i}"));
    std::fs::create_dir_all(&dir)?;
    phases::mark("bench: task dir made");
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
        disk_limit: None,
        leases: vec![],
        own_network: false,
        gvisor: None,
        filtered_egress: false,
    };
    let t = Instant::now();
    let mut rt = runtime::for_spec(&spec)?;
    let pid = rt.create(&spec, &dir, TaskIo { stdout: devnull()?, stderr: devnull()? })?;
    rt.start()?;
    waitpid(pid, None)?;
    phases::mark("bench: reaped");
    rt.remove()?;
    let took = t.elapsed();
    phases::mark("bench: removed");
    std::fs::remove_dir_all(&dir)?;
    Ok(took)
}

/// Runs `cmd` to its successful end and returns how long it took; a peer that hangs is killed
/// after 30 s and fails the benchmark instead of stalling it.
fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("{cmd:?} failed: {st}");
            }
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not end within 30 s");
        }
        // Short: this spin is part of every peer's time alike.
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn runc_lifecycle(bundle: &Path, i: usize) -> anyhow::Result<Duration> {
    let id = format!("iris-bench-runc-{}-{i}", std::process::id());
    let t = Instant::now();
    timed(Command::new("runc").arg("run").arg("-b").arg(bundle).arg(&id))?;
    timed(Command::new("runc").arg("delete").arg("-f").arg(&id))?;
    Ok(t.elapsed())
}

/// `crun run` + `crun delete` (Debian's crun, state in `state`).
fn crun_lifecycle(state: &Path, bundle: &Path, i: usize) -> anyhow::Result<Duration> {
    let id = format!("iris-bench-crun-{}-{i}", std::process::id());
    let crun = || {
        let mut c = Command::new("crun");
        c.arg("--root").arg(state);
        c
    };
    let t = Instant::now();
    timed(crun().arg("run").arg("-b").arg(bundle).arg(&id))?;
    timed(crun().arg("delete").arg("-f").arg(&id))?;
    Ok(t.elapsed())
}

/// Whether crun runs a container here, and if not what it said (it refuses hybrid cgroup
/// hosts: "cgroups in hybrid mode not supported").
fn crun_works(state: &Path, bundle: &Path) -> Result<(), String> {
    let id = format!("iris-bench-crun-{}-probe", std::process::id());
    let out = Command::new("crun")
        .arg("--root")
        .arg(state)
        .args(["run", "-b"])
        .arg(bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("not runnable ({e}); scripts/setup installs it"))?;
    let _ = Command::new("crun").arg("--root").arg(state).args(["delete", "-f"]).arg(&id).output();
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
}

/// `youki create` + `youki start`, wait for the container's init, `youki delete`: the same
/// steps as the library lifecycle. (Not `youki run`: in the foreground it can miss the SIGCHLD
/// of an init that exits before it starts waiting, and then waits forever — seen with
/// `/bin/true` here.) The init is reparented to this process, a child subreaper, which reaps it.
fn youki_lifecycle(youki: &Path, state: &Path, bundle: &Path, i: usize) -> anyhow::Result<Duration> {
    let id = format!("iris-bench-youki-{}-{i}", std::process::id());
    let pid_file = state.join(format!("{id}.pid"));
    let youki = || {
        let mut c = Command::new(youki);
        c.arg("--root").arg(state);
        c
    };
    let t = Instant::now();
    timed(youki().arg("create").arg("--pid-file").arg(&pid_file).arg("-b").arg(bundle).arg(&id))?;
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse().context("youki's pid file")?;
    timed(youki().arg("start").arg(&id))?;
    waitpid(nix::unistd::Pid::from_raw(pid), None).context("waiting for youki's container")?;
    timed(youki().arg("delete").arg(&id))?;
    Ok(t.elapsed())
}

fn unshare_floor() -> anyhow::Result<Duration> {
    // Short options: busybox (in the VM) knows no --fork.
    timed(Command::new("unshare").args(["-m", "-p", "-u", "-i", "-f", "/bin/true"]))
}

async fn server_figures(work: &Path, n: usize) -> anyhow::Result<(Figure, Figure)> {
    let server = common::Server::start(work, "iris-bench", &[])?;
    let mut client = server.client().await?;
    let mut running = Figure::new("RunTask → RUNNING (server)");
    let mut done = Figure::new("RunTask → SUCCEEDED (server)");
    for i in 0..n {
        let r = run(&mut client, common::command_task(&format!("bench/task-{i}"), &["/bin/true"])).await?;
        running.samples.push(r.running);
        done.samples.push(r.ended);
    }
    Ok((running, done))
}

struct Lifecycles {
    lib: Figure,
    runc: Figure,
    /// crun's figure, or why it does not run here.
    crun: Result<Figure, String>,
    youki: Option<Figure>,
    floor: Figure,
}

fn measure_lifecycles(
    rootfs: &Path,
    work: &Path,
    layout: &Layout,
    parent: &str,
    n: usize,
) -> anyhow::Result<Lifecycles> {
    let bundle = common::runc_bundle(rootfs, &work.join("runc-bundle"), &["/bin/true"], None)?;
    let youki = match std::env::var_os("IRIS_BENCH_YOUKI").map(PathBuf::from) {
        Some(exe) if exe.exists() => {
            let state = work.join("youki-state");
            std::fs::create_dir_all(&state)?;
            let cgroup = format!("{parent}/youki");
            Some((exe, state, common::runc_bundle(rootfs, &work.join("youki-bundle"), &["/bin/true"], Some(&cgroup))?))
        }
        _ => {
            eprintln!("lifecycle: no youki (IRIS_BENCH_YOUKI; scripts/bench builds it): measured without it");
            None
        }
    };
    let crun_state = work.join("crun-state");
    let crun = crun_works(&crun_state, &bundle).map(|()| Figure::new("lifecycle, crun run + crun delete"));
    if let Err(why) = &crun {
        eprintln!("lifecycle: crun does not run here, measured without it: {why}");
    }
    let mut f = Lifecycles {
        lib: Figure::new("lifecycle, library (create→start→exit→reaped→removed)"),
        runc: Figure::new("lifecycle, runc run + runc delete"),
        crun,
        youki: youki.as_ref().map(|_| Figure::new("lifecycle, youki create + start + delete")),
        floor: Figure::new("unshare --fork floor"),
    };
    for i in 0..n {
        f.lib.samples.push(library_lifecycle(rootfs, work, layout, parent, i)?);
        f.runc.samples.push(runc_lifecycle(&bundle, i)?);
        if let Ok(fig) = &mut f.crun {
            fig.samples.push(crun_lifecycle(&crun_state, &bundle, i)?);
        }
        if let (Some((exe, state, bundle)), Some(fig)) = (&youki, &mut f.youki) {
            fig.samples.push(youki_lifecycle(exe, state, bundle, i)?);
        }
        f.floor.samples.push(unshare_floor()?);
    }
    Ok(f)
}

/// A step's name for the table: the event's text with what changes from run to run (pids,
/// numbers) left out, and long Debug dumps cut.
fn step_name(event: &str) -> String {
    let event = event.strip_prefix("iris_phase: ").unwrap_or(event);
    // libcontainer::rootfs::mount: … → mount: …
    let event = match event.split_once(": ") {
        Some((target, rest)) if target.contains("::") => {
            let module = target.rsplit("::").next().unwrap_or(target);
            return step_name(&format!("{module}: {rest}"));
        }
        _ => event,
    };
    let mut name: String = event.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
    // A Debug dump (a mount, a namespace): its destination or type names it.
    for field in ["destination: ", "typ: "] {
        if let Some(at) = name.find(field) {
            let what: String = name[at + field.len()..].chars().take_while(|c| *c != ',').collect();
            // What comes before the dump, less the dumped type's name.
            let head = name.split('{').next().unwrap_or_default().trim_end();
            let head = head.rsplit_once(' ').map_or(head, |(h, _)| h).to_string();
            name = format!("{head} {what}");
            break;
        }
    }
    // libcgroups removes the v1 hierarchies in no fixed order.
    if name.contains("remove cgroup \"") {
        return "manager: remove cgroup (a v1 hierarchy)".into();
    }
    // Sets print in no fixed order.
    if let Some(at) = name.find(" {") {
        name.truncate(at);
    }
    name
}

/// `s` cut to `n` characters.
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// `--phases`: `n` library lifecycles recorded by the runtime's phase recorder; prints, for
/// each pair of consecutive events (`from → to`) in order, the median and p90 of the time
/// between them (over the runs), and its share of the median lifecycle.
fn phase_profile(rootfs: &Path, work: &Path, layout: &Layout, parent: &str, n: usize) -> anyhow::Result<()> {
    let log = work.join("phases.log");
    std::fs::File::create(&log)?;
    anyhow::ensure!(phases::install(&log), "could not install the phase recorder");
    let mut order: Vec<String> = Vec::new();
    let mut steps: std::collections::HashMap<String, Vec<Duration>> = Default::default();
    let mut totals = Vec::new();
    for i in 0..n + 3 {
        std::fs::OpenOptions::new().write(true).open(&log)?.set_len(0)?;
        library_lifecycle(rootfs, work, layout, parent, i)?;
        let text = std::fs::read_to_string(&log)?;
        let mut events: Vec<(i128, String)> =
            text.lines().filter_map(phases::parse_line).map(|(ns, _, e)| (ns, step_name(e))).collect();
        events.sort_by_key(|e| e.0);
        let (Some(first), Some(last)) = (events.first(), events.last()) else { bail!("no phase recorded") };
        if i < 3 {
            continue; // warm-up
        }
        totals.push(Duration::from_nanos((last.0 - first.0) as u64));
        // The k-th occurrence of a step in a run is its own row.
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        for w in events.windows(2) {
            let step = format!("{} → {}", cut(&w[0].1, 44), cut(&w[1].1, 44));
            let k = seen.entry(step.clone()).or_default();
            *k += 1;
            let key = if *k > 1 { format!("{step} ({k})") } else { step };
            if !steps.contains_key(&key) {
                order.push(key.clone());
            }
            steps.entry(key).or_default().push(Duration::from_nanos((w[1].0 - w[0].0) as u64));
        }
    }
    let total = Figure { name: "lifecycle (first to last event)", samples: totals };
    let total_ms = total.pct(0.5);
    println!(
        "{:<66} {:>9} {:>9} {:>6} {:>5}",
        "step (from one event → to the next)", "p50 µs", "p90 µs", "share", "runs"
    );
    for key in &order {
        let f = Figure { name: "", samples: steps.remove(key).unwrap_or_default() };
        let p50 = f.pct(0.5) * 1e3;
        println!(
            "{key:<92} {p50:>9.0} {:>9.0} {:>5.1}% {:>5}",
            f.pct(0.9) * 1e3,
            p50 / (total_ms * 10.0),
            f.samples.len()
        );
    }
    println!("{:<92} {:>9.0} {:>9.0} {:>6} {:>5}", total.name, total_ms * 1e3, total.pct(0.9) * 1e3, "", n);
    cgroup_steps(layout, parent, n)?;
    println!("(load average: {})", std::fs::read_to_string("/proc/loadavg")?.trim());
    Ok(())
}

/// libcgroups joins a task's cgroup in one step that records no event per hierarchy: the
/// same work done here, hierarchy by hierarchy, for a `sleep` child: make the directory (v1
/// cpuset: with its parent's cpus and mems, as libcgroups does), write the pid to its
/// `cgroup.procs`, and after the child's end remove it. Medians over `n` rounds, in µs.
fn cgroup_steps(layout: &Layout, parent: &str, n: usize) -> anyhow::Result<()> {
    let dirs = layout.dirs(&format!("{parent}/steps"))?;
    let mut times: Vec<[Figure; 3]> =
        dirs.iter().map(|_| [Figure::new(""), Figure::new(""), Figure::new("")]).collect();
    for _ in 0..n {
        let mut child = Command::new("sleep").arg("60").spawn()?;
        let pid = child.id().to_string();
        let mut made = Vec::new();
        let mut step = || -> anyhow::Result<()> {
            for (dir, t) in dirs.iter().zip(times.iter_mut()) {
                let start = Instant::now();
                std::fs::create_dir(dir)?;
                made.push(dir.clone());
                for name in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(current) = std::fs::read_to_string(dir.join(name))
                        && current.trim().is_empty()
                        && let Some(up) = dir.parent()
                    {
                        std::fs::write(dir.join(name), std::fs::read_to_string(up.join(name))?.trim())?;
                    }
                }
                let made_at = Instant::now();
                std::fs::write(dir.join("cgroup.procs"), &pid)?;
                t[0].samples.push(made_at - start);
                t[1].samples.push(made_at.elapsed());
            }
            Ok(())
        };
        let stepped = step();
        let _ = child.kill();
        let _ = child.wait();
        for (dir, t) in made.iter().zip(times.iter_mut()) {
            let start = Instant::now();
            // The kernel may hold a just-emptied cgroup busy for a moment.
            while let Err(e) = std::fs::remove_dir(dir) {
                if e.raw_os_error() != Some(libc::EBUSY) || start.elapsed() > Duration::from_secs(2) {
                    bail!("removing {}: {e}", dir.display());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            t[2].samples.push(start.elapsed());
        }
        stepped?;
    }
    println!();
    println!("{:<40} {:>10} {:>10} {:>10}", "cgroup steps per hierarchy (µs, p50)", "create", "join", "remove");
    let (mut sum_c, mut sum_j, mut sum_r) = (0.0, 0.0, 0.0);
    for (dir, t) in dirs.iter().zip(&times) {
        // A v1 hierarchy's (or the hybrid host's unified) mount point names it.
        let name = match layout {
            Layout::V2 { .. } => "the v2 tree".to_string(),
            Layout::V1 { .. } => {
                let first = dir.strip_prefix("/sys/fs/cgroup").unwrap_or(dir).components().next();
                first.map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default()
            }
        };
        let [c, j, r] = [t[0].pct(0.5) * 1e3, t[1].pct(0.5) * 1e3, t[2].pct(0.5) * 1e3];
        (sum_c, sum_j, sum_r) = (sum_c + c, sum_j + j, sum_r + r);
        println!("{name:<40} {c:>10.0} {j:>10.0} {r:>10.0}");
    }
    println!("{:<40} {sum_c:>10.0} {sum_j:>10.0} {sum_r:>10.0}", "sum of the medians");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let n = common::runs(50);
    // runc wants the real path of the rootfs, not a symlink to it.
    let rootfs = std::fs::canonicalize(common::rootfs()).context("the busybox rootfs (run scripts/fixtures)")?;
    let work = tempfile::Builder::new().prefix("iris-bench-").tempdir()?;
    // youki's detached containers are reparented to us, and reaped by us.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let layout = Layout::detect()?;
    // Where the worker would put its tasks: our own cgroup on v1, its parent on v2.
    let parent = format!("{}/iris-worker/iris-bench-{}", layout.task_root()?.trim_end_matches('/'), std::process::id());
    layout.prepare_parent(&parent)?;
    if std::env::args().any(|a| a == "--phases") {
        let profiled = phase_profile(&rootfs, work.path(), &layout, &parent, n);
        let _ = layout.release_parent(&parent);
        return profiled;
    }
    let measured = measure_lifecycles(&rootfs, work.path(), &layout, &parent, n);
    // youki (a peer) has been seen to leave a container's init waiting in its cgroup after a
    // lifecycle whose every command succeeded: whatever is left there goes with the benchmark.
    let youki_cgroup = format!("{parent}/youki");
    let _ = layout.kill_all(&youki_cgroup, Duration::from_secs(10));
    let _ = layout.remove(&youki_cgroup);
    // The parent cgroups go whatever happened.
    let _ = layout.release_parent(&parent);
    let f = measured?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (running, done) = rt.block_on(server_figures(work.path(), n.min(30)))?;

    let runc = f.runc.pct(0.5);
    let youki = f.youki.as_ref().map(|y| y.pct(0.5));
    let crun = f.crun.as_ref().ok().map(|c| c.pct(0.5));
    let floor = f.floor.pct(0.5);
    let row = |fig: &Figure| {
        let p50 = fig.pct(0.5);
        let mut vs = format!("runc/this {:.2}x", runc / p50);
        let mut r =
            common::Row::timed(fig, "ms").with("runc_over_this", runc / p50).with("this_over_floor", p50 / floor);
        match crun {
            Some(c) => {
                vs += &format!(", crun/this {:.2}x", c / p50);
                r = r.with("crun_over_this", c / p50);
            }
            None => vs += ", crun: refuses this host",
        }
        if let Some(y) = youki {
            vs += &format!(", youki/this {:.2}x", y / p50);
            r = r.with("youki_over_this", y / p50);
        }
        vs += &format!(", this/floor {:.2}x", p50 / floor);
        r.vs(vs)
    };
    let lib = f.lib.pct(0.5);
    // The goals: ≤ 1.5x the floor on cgroup v2, ≤ 3x on hybrid hosts, faster than crun.
    let bound = if layout.is_v2() { 1.5 } else { 3.0 };
    let crun_text = crun.map(|c| format!(", crun/this {:.2}x", c / lib)).unwrap_or_default();
    let mut rows = vec![row(&f.lib).goal_text(
        &format!("≤ {bound}x the floor and faster than crun (now {:.2}x{crun_text})", lib / floor),
        lib <= bound * floor && crun.is_none_or(|c| c > lib),
    )];
    rows.push(row(&f.runc));
    if let Ok(c) = &f.crun {
        rows.push(row(c));
    }
    if let Some(y) = &f.youki {
        rows.push(row(y));
    }
    rows.push(row(&f.floor));
    rows.push(row(&running).goal(false, 10.0));
    rows.push(row(&done));
    common::report("lifecycle", &rows);
    Ok(())
}
