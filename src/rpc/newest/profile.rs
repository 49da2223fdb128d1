//! ProfileTask with the semantics of Iris's newest worker (`service.py`): every failure is the
//! answer's `error` with HTTP 200, never an RPC error. The target is a task id, optionally with
//! `:<attempt id>` (which must be the current attempt), and the attempt must be RUNNING.
//!
//! Served: `threads`, a `py-spy dump` (with `--locals`, `--native` when asked), and `cpu`, a
//! `py-spy record` of `duration_seconds` (0: 10 s) in Iris's formats (flamegraph SVG, the
//! default; speedscope JSON; raw text), rate (0: 20 Hz) and `--native` unless asked not to,
//! with `--subprocesses`, written into the task's workdir under a random name and read back by
//! the worker without following links. Each runs inside the task through the exec helper
//! ([`crate::exec`]): in its namespaces, cgroup, user and capabilities, so it needs
//! CAP_SYS_PTRACE (the DEFAULT container profile has it, RESTRICTED not, as in Iris). py-spy is the task venv's (`$IRIS_VENV/bin/py-spy`) or the one on the
//! task's PATH. Its target is the task's command: the child of the container's pid 1, which is
//! our init (non-dumpable, and not Python), not pid 1 as under Docker. Afterwards every process
//! of the task is sent SIGCONT (py-spy stops them while it reads, and a killed py-spy would
//! leave them stopped), as Iris's worker sweeps. `memory`: `memray attach --native` for the
//! window (`--aggregate` for leaks), then rendered as Iris renders it (flamegraph HTML, table,
//! stats JSON, or the raw trace), memray and the debugger it drives (gdb or lldb) being the
//! task's own, as under Iris. Not served: the worker itself (`/system/process`: this worker is no Python process), tasks of the process
//! runtime (no pid namespace to find the task's command in).

use std::time::Duration;

use crate::proto::newest::iris::job::{self, ProfileTaskRequest, ProfileTaskResponse, profile_type::Profiler};
use crate::task::{TaskError, TaskManager, TaskState, short};

/// How long a dump may take (py-spy reads every thread's stack once).
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A CPU profile's sampling window when the request leaves it 0 (Iris's default).
const DEFAULT_DURATION_S: u64 = 10;
/// The longest sampling window served: the exec holds a helper and py-spy for that long.
const MAX_DURATION_S: u64 = 600;
/// Time py-spy has beyond the window to write its output (Iris gives it the same).
const WRITE_HEADROOM: Duration = Duration::from_secs(30);
/// How long rendering a memray trace may take (Iris gives it 30 s).
const TRANSFORM_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest profile read back.
const MAX_PROFILE_BYTES: u64 = 64 << 20;

/// Runs py-spy inside the task (`$1`: `dump` or `record`, then py-spy's flags); exit 127 with
/// a message when there is no py-spy, 125 outside a container. The worker resumes the task's
/// processes afterwards ([`resume`]), whatever became of the script.
const SPY_SCRIPT: &str = r#"
[ "$(cat /proc/1/comm 2>/dev/null)" = iris-init ] || { echo "the task does not run under this worker's init (the process runtime, or gVisor): profiling needs a libcontainer container" >&2; exit 125; }
spy="${IRIS_VENV:-/app/.venv}/bin/py-spy"
[ -x "$spy" ] || spy=$(command -v py-spy) || { echo "py-spy is not installed in the task (neither \$IRIS_VENV/bin/py-spy nor on its PATH)" >&2; exit 127; }
pid=$(cut -d' ' -f1 /proc/1/task/1/children 2>/dev/null)
verb=$1
shift
"$spy" "$verb" --pid "${pid:-2}" "$@"
"#;

/// Runs memray inside the task: attaches to the task's command for `$4` seconds (`$5` = 1:
/// leaks, aggregated) writing the trace `$1`, then renders it as reporter `$3` into `$2`
/// (`raw`: the trace itself). memray is the task venv's, the one on its PATH, or the module of
/// its Python; `memray attach` drives gdb or lldb, which the task's image must have, as under
/// Iris.
const MEMRAY_SCRIPT: &str = r#"
[ "$(cat /proc/1/comm 2>/dev/null)" = iris-init ] || { echo "the task does not run under this worker's init (the process runtime, or gVisor): profiling needs a libcontainer container" >&2; exit 125; }
bin="${IRIS_VENV:-/app/.venv}/bin/memray"
[ -x "$bin" ] || bin=$(command -v memray) || bin=
py="${IRIS_PYTHON:-python3}"
if [ -z "$bin" ] && ! "$py" -c 'import memray' 2>/dev/null; then echo "memray is not installed in the task (neither \$IRIS_VENV/bin/memray, nor on its PATH, nor a module of its Python)" >&2; exit 127; fi
mr() { if [ -n "$bin" ]; then "$bin" "$@"; else "$py" -m memray "$@"; fi; }
pid=$(cut -d' ' -f1 /proc/1/task/1/children 2>/dev/null)
trace=$1 out=$2 reporter=$3 duration=$4 leaks=$5
if [ "$leaks" = 1 ]; then aggregate=--aggregate; leak=--leaks; else aggregate=; leak=; fi
mr attach --native "${pid:-2}" --duration "$duration" --force --output "$trace" $aggregate || exit
# memray tracks in the background of the task's process for the window, then detaches.
sleep $((duration + 1))
case $reporter in
  raw) ;;
  flamegraph) mr flamegraph $leak --force --output "$out" "$trace" ;;
  table) mr table --force --output "$out" "$trace" ;;
  stats) mr stats --json --force --output "$out" "$trace" ;;
esac
"#;

/// Answers one ProfileTask request.
pub async fn profile_task(manager: &TaskManager, req: ProfileTaskRequest) -> ProfileTaskResponse {
    match profile(manager, req).await {
        Ok(profile_data) => ProfileTaskResponse { profile_data, error: String::new() },
        Err(error) => ProfileTaskResponse { profile_data: Vec::new(), error },
    }
}

async fn profile(manager: &TaskManager, req: ProfileTaskRequest) -> Result<Vec<u8>, String> {
    let Some(profiler) = req.profile_type.and_then(|p| p.profiler) else {
        return Err("profile_type is required".into());
    };
    if req.target.is_empty() || req.target == "/system/process" {
        return Err("profiling this worker is not supported: it is not a Python process".into());
    }
    let (task_id, attempt) = split_target(&req.target)?;
    let (current, state, dir) = match manager.exec_target(task_id) {
        Ok(t) => t,
        Err(TaskError::NotFound(_)) => return Err(format!("Task {} not found", short(task_id))),
        Err(e) => return Err(crate::rpc::to_status(e).message().to_string()),
    };
    if attempt.is_some_and(|a| a != current) {
        return Err(format!(
            "attempt {} of task {} is not its current attempt ({current})",
            attempt.unwrap_or(0),
            short(task_id)
        ));
    }
    if state != TaskState::Running {
        return Err(format!("Task {} is not running (state=TASK_STATE_{})", short(task_id), state.name()));
    }
    match profiler {
        Profiler::Threads(t) => {
            let mut flags = vec!["dump".to_string()];
            if t.locals {
                flags.push("--locals".to_string());
            }
            if t.native {
                flags.push("--native".to_string());
            }
            let outcome = spy(manager, &dir, flags, DUMP_TIMEOUT).await?;
            Ok(outcome.stdout.into_bytes())
        }
        Profiler::Cpu(cpu) => {
            let duration = window(req.duration_seconds);
            let (format, ext) = match job::cpu_profile::Format::try_from(cpu.format) {
                Ok(job::cpu_profile::Format::Speedscope) => ("speedscope", "json"),
                Ok(job::cpu_profile::Format::Raw) => ("raw", "txt"),
                _ => ("flamegraph", "svg"),
            };
            let rate = if cpu.rate_hz > 0 { cpu.rate_hz } else { 20 };
            // py-spy writes into the workdir (the task's own, at /app), where the worker reads
            // it back: a name the task cannot guess ahead.
            let name = format!(".iris-profile-{:016x}.{ext}", rand_u64());
            let mut flags: Vec<String> = ["record", "--duration", &duration.to_string(), "--rate", &rate.to_string()]
                .into_iter()
                .map(String::from)
                .collect();
            flags.extend(["--format".into(), format.into(), "--subprocesses".into(), "--output".into()]);
            flags.push(format!("{}/{name}", crate::env::WORKDIR_IN_TASK));
            if cpu.native.unwrap_or(true) {
                flags.push("--native".to_string());
            }
            let host = dir.join(crate::taskdir::WORKDIR).join(&name);
            let recorded = spy(manager, &dir, flags, Duration::from_secs(duration) + WRITE_HEADROOM).await;
            let read = recorded.and_then(|_| read_profile(&host));
            let _ = std::fs::remove_file(&host);
            read
        }
        Profiler::Memory(memory) => {
            let duration = window(req.duration_seconds);
            let (reporter, ext) = match job::memory_profile::Format::try_from(memory.format) {
                Ok(job::memory_profile::Format::Table) => ("table", "html"),
                Ok(job::memory_profile::Format::Stats) => ("stats", "json"),
                Ok(job::memory_profile::Format::Raw) => ("raw", "bin"),
                _ => ("flamegraph", "html"),
            };
            let stem = format!(".iris-profile-{:016x}", rand_u64());
            let workdir = dir.join(crate::taskdir::WORKDIR);
            let (trace, out) = (format!("{stem}.bin"), format!("{stem}.out.{ext}"));
            let in_task = |name: &str| format!("{}/{name}", crate::env::WORKDIR_IN_TASK);
            let mut argv = vec!["sh".to_string(), "-c".to_string(), MEMRAY_SCRIPT.to_string(), "iris-profile".into()];
            argv.extend([in_task(&trace), in_task(&out), reporter.to_string(), duration.to_string()]);
            argv.push(if memory.leaks { "1" } else { "0" }.to_string());
            let timeout = Duration::from_secs(duration) + WRITE_HEADROOM + TRANSFORM_TIMEOUT;
            let ran = in_task_checked(manager, &dir, argv, timeout, "memray").await;
            let read = ran.and_then(|_| read_profile(&workdir.join(if reporter == "raw" { &trace } else { &out })));
            let _ = std::fs::remove_file(workdir.join(&trace));
            let _ = std::fs::remove_file(workdir.join(&out));
            read
        }
    }
}

/// The sampling window asked for: 0 (unset) is [`DEFAULT_DURATION_S`], at most
/// [`MAX_DURATION_S`].
fn window(duration_seconds: i32) -> u64 {
    match u64::try_from(duration_seconds) {
        Ok(0) | Err(_) => DEFAULT_DURATION_S,
        Ok(s) => s.min(MAX_DURATION_S),
    }
}

/// Runs py-spy in the task with `flags` (its verb first), at most `timeout`.
async fn spy(
    manager: &TaskManager,
    dir: &std::path::Path,
    flags: Vec<String>,
    timeout: Duration,
) -> Result<crate::exec::ExecOutcome, String> {
    let what = format!("py-spy {}", flags.first().map_or("", String::as_str));
    let mut argv = vec!["sh".to_string(), "-c".to_string(), SPY_SCRIPT.to_string(), "iris-profile".to_string()];
    argv.extend(flags);
    in_task_checked(manager, dir, argv, timeout, &what).await
}

/// Runs `argv` in the task through the exec helper, at most `timeout`; a failure is said with
/// `what` and the command's stderr.
async fn in_task_checked(
    manager: &TaskManager,
    dir: &std::path::Path,
    argv: Vec<String>,
    timeout: Duration,
    what: &str,
) -> Result<crate::exec::ExecOutcome, String> {
    let outcome = crate::exec::run(manager.helper_exe(), dir, &argv, Some(timeout)).await.map_err(|e| e.to_string());
    resume(dir);
    let outcome = outcome?;
    if !outcome.error.is_empty() {
        return Err(outcome.error);
    }
    if outcome.exit_code != 0 {
        let why = outcome.stderr.trim();
        return Err(format!("{what} failed (exit code {}): {why}", outcome.exit_code));
    }
    Ok(outcome)
}

/// Sends SIGCONT to every process of the task, whatever became of the profiler: a profiler
/// stops what it reads, and one killed at its deadline (its script with it) would leave the
/// task stopped. Iris's worker does the same after each profile.
fn resume(dir: &std::path::Path) {
    let spec = crate::taskdir::read_json::<crate::runtime::LaunchSpec>(dir, crate::taskdir::SPEC);
    if let Ok(Some(crate::runtime::LaunchSpec { cgroup: Some((layout, path)), .. })) = spec
        && let Err(e) = layout.signal_all_but(&path, nix::sys::signal::Signal::SIGCONT, None)
    {
        tracing::warn!(error = %e, "resuming the task's processes after a profile");
    }
}

/// The profile py-spy wrote into the task's workdir: a regular file (never through a link the
/// task planted in its place), at most [`MAX_PROFILE_BYTES`].
fn read_profile(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("the profiler wrote no profile: {}", e.kind()))?;
    let meta = file.metadata().map_err(|e| format!("reading the profile: {}", e.kind()))?;
    if !meta.is_file() {
        return Err("the profile is not a regular file".into());
    }
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(format!(
            "the profile is {} MiB, over the {} MiB served",
            meta.len() >> 20,
            MAX_PROFILE_BYTES >> 20
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_PROFILE_BYTES).read_to_end(&mut data).map_err(|e| format!("reading the profile: {}", e.kind()))?;
    Ok(data)
}

/// A random number for a file name the task cannot predict (the time, were the kernel's
/// generator unreadable: a weaker name, and the read refuses links anyway).
fn rand_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => iris_wire::clock::now_ms() as u64,
    }
}

/// `/user/job/0` or `/user/job/0:2` → (task id, attempt id).
fn split_target(target: &str) -> Result<(&str, Option<i32>), String> {
    match target.rsplit_once(':') {
        Some((task, attempt)) if !attempt.contains('/') => {
            let id = attempt.parse().map_err(|_| format!("target {}: bad attempt id {attempt:?}", short(target)))?;
            Ok((task, Some(id)))
        }
        _ => Ok((target, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_a_task_and_maybe_its_attempt() {
        assert_eq!(split_target("/user/job/0"), Ok(("/user/job/0", None)));
        assert_eq!(split_target("/user/job/0:3"), Ok(("/user/job/0", Some(3))));
        assert!(split_target("/user/job/0:x").is_err());
    }
}
