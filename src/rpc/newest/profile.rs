//! ProfileTask with the semantics of Iris's newest worker (`service.py`): every failure is the
//! answer's `error` with HTTP 200, never an RPC error. The target is a task id, optionally with
//! `:<attempt id>` (which must be the current attempt), and the attempt must be RUNNING.
//!
//! Served: `threads`, a `py-spy dump` (with `--locals`, `--native` when asked) run inside the
//! task through the exec helper ([`crate::exec`]): in its namespaces, cgroup, user and
//! capabilities, so it needs CAP_SYS_PTRACE (the DEFAULT container profile has it, RESTRICTED
//! not, as in Iris). py-spy is the task venv's (`$IRIS_VENV/bin/py-spy`) or the one on the
//! task's PATH. Its target is the task's command: the child of the container's pid 1, which is
//! our init (non-dumpable, and not Python), not pid 1 as under Docker. Afterwards every process
//! of the task is sent SIGCONT (py-spy stops them while it reads, and a killed py-spy would
//! leave them stopped), as Iris's worker sweeps. Not served: `cpu` and `memory` profiles, the
//! worker itself (`/system/process`: this worker is no Python process), tasks of the process
//! runtime (no pid namespace to find the task's command in).

use std::time::Duration;

use crate::proto::newest::iris::job::{ProfileTaskRequest, ProfileTaskResponse, profile_type::Profiler};
use crate::task::{TaskError, TaskManager, TaskState, short};

/// How long a dump may take (py-spy reads every thread's stack once).
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs py-spy inside the task (`$1` onwards: py-spy's extra flags); exit 127 with a message when
/// there is no py-spy, 125 outside a container.
const DUMP_SCRIPT: &str = r#"
[ "$(cat /proc/1/comm 2>/dev/null)" = iris-init ] || { echo "the task runs without a pid namespace of its own (process runtime): profiling needs the container runtime" >&2; exit 125; }
spy="${IRIS_VENV:-/app/.venv}/bin/py-spy"
[ -x "$spy" ] || spy=$(command -v py-spy) || { echo "py-spy is not installed in the task (neither \$IRIS_VENV/bin/py-spy nor on its PATH)" >&2; exit 127; }
pid=$(cut -d' ' -f1 /proc/1/task/1/children 2>/dev/null)
"$spy" dump --pid "${pid:-2}" "$@"
status=$?
kill -CONT -1 2>/dev/null
exit $status
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
    let flags = match profiler {
        Profiler::Threads(t) => {
            let mut flags = Vec::new();
            if t.locals {
                flags.push("--locals".to_string());
            }
            if t.native {
                flags.push("--native".to_string());
            }
            flags
        }
        Profiler::Cpu(_) | Profiler::Memory(_) => {
            return Err("only threads profiles (py-spy dump) are supported by this worker".into());
        }
    };
    let mut argv = vec!["sh".to_string(), "-c".to_string(), DUMP_SCRIPT.to_string(), "iris-profile".to_string()];
    argv.extend(flags);
    let outcome =
        crate::exec::run(manager.helper_exe(), &dir, &argv, Some(DUMP_TIMEOUT)).await.map_err(|e| e.to_string())?;
    if !outcome.error.is_empty() {
        return Err(outcome.error);
    }
    if outcome.exit_code != 0 {
        let why = outcome.stderr.trim();
        return Err(format!("py-spy dump failed (exit code {}): {why}", outcome.exit_code));
    }
    Ok(outcome.stdout.into_bytes())
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
