//! A command run inside a running task (the newest Iris wire's ExecInContainer).
//!
//! The worker is multi-threaded and must never fork a container process itself (see
//! docs/ARCHITECTURE.md, "Processes"), so an exec is its own short-lived, single-threaded
//! process, as `runc exec` is: the worker starts `iris-worker exec <task-dir> [--timeout-ms N]
//! -- <command…>` ([`run`]), which enters the task through the task's runtime
//! ([`crate::runtime::exec_in`]: libcontainer's tenant path for containers), captures the
//! command's stdout and stderr (at most [`OUTPUT_CAP`] each; the rest is counted and dropped,
//! and a marker line says so), kills the command's whole session when the timeout passes or
//! when the worker gives up (SIGTERM to the helper), and prints one JSON [`ExecOutcome`] on its
//! stdout ([`helper`]).

pub mod helper;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// The most of each of stdout and stderr an exec returns: 1 MiB. A command that writes more
/// keeps running (its output is read and dropped, so it never blocks on a full pipe) and the
/// answer ends with a marker line naming how much was dropped.
pub const OUTPUT_CAP: usize = 1 << 20;

/// How long the worker waits for the helper beyond the command's own timeout (entering the
/// container, killing the command, reaping it) before it gives up on it.
const HELPER_MARGIN: Duration = Duration::from_secs(30);

/// What an exec did: the command's exit code (128+N when killed by signal N, as a shell
/// reports it), its output, and `error` when the exec could not be set up or did not end by
/// itself (a timeout: the output then is what it wrote until it was killed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutcome {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub error: String,
}

/// Why the worker got no outcome from the helper.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("starting the exec helper: {0}")]
    Spawn(std::io::Error),
    #[error("the exec helper failed: {0}")]
    Helper(String),
    #[error("the exec helper did not finish within {0:?} after the command's timeout; it was stopped")]
    Stuck(Duration),
}

/// Runs `argv` in the task of `task_dir` through `exe exec` (this program), for at most
/// `timeout` (none: until it ends). Dropping the future stops the helper, which kills the
/// command.
pub async fn run(
    exe: &Path,
    task_dir: &Path,
    argv: &[String],
    timeout: Option<Duration>,
) -> Result<ExecOutcome, ExecError> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("exec").arg(task_dir);
    if let Some(t) = timeout {
        cmd.arg("--timeout-ms").arg(t.as_millis().to_string());
    }
    cmd.arg("--").args(argv);
    // As for supervisors: the worker's environment (credentials) is none of the helper's
    // business; the command gets the task's environment.
    cmd.env_clear();
    for name in crate::supervisor::handle::SUPERVISOR_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(ExecError::Spawn)?;
    let guard = StopOnDrop(child.id().map(|p| Pid::from_raw(p as i32)));
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ExecError::Helper("no pipes to the helper".into()));
    };
    let collect = async {
        // The outcome holds at most twice the cap, escaped: a bound on what is read.
        let mut json = Vec::new();
        let mut diag = Vec::new();
        let bound = (8 * OUTPUT_CAP) as u64;
        let mut out = (&mut out).take(bound);
        let mut err = (&mut err).take(64 << 10);
        let (a, b) = tokio::join!(out.read_to_end(&mut json), err.read_to_end(&mut diag));
        let _ = child.wait().await;
        (a.map(|_| json), b.map(|_| diag))
    };
    let (json, diag) = match timeout {
        Some(t) => match tokio::time::timeout(t + HELPER_MARGIN, collect).await {
            Ok(done) => done,
            Err(_) => return Err(ExecError::Stuck(HELPER_MARGIN)),
        },
        None => collect.await,
    };
    guard.disarm();
    let diag = String::from_utf8_lossy(&diag.unwrap_or_default()).trim().to_string();
    let json = json.map_err(|e| ExecError::Helper(format!("reading its answer: {e}")))?;
    serde_json::from_slice(&json).map_err(|_| {
        let why = diag.lines().last().unwrap_or("it exited without an answer").to_string();
        ExecError::Helper(why)
    })
}

/// SIGTERMs the helper unless disarmed: the worker gave up (the caller went away, or the
/// helper is stuck); the helper kills the command's session and exits.
struct StopOnDrop(Option<Pid>);

impl StopOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
}
