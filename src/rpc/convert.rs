//! proto ⇄ typed conversions for WorkerService.

use std::time::Duration;

use super::figures::{WireBuild, WireUsage};
use crate::logs::{LogFilter, LogLine, Source};
use crate::proto::{self, worker};
use crate::task::{Command, TaskError, TaskSpec, TaskState, TaskView};

fn invalid(field: &str, reason: impl Into<String>) -> TaskError {
    TaskError::Invalid { field: field.to_string(), reason: reason.into() }
}

pub fn state_to_proto(s: TaskState) -> proto::TaskState {
    match s {
        TaskState::Pending => proto::TaskState::Pending,
        TaskState::Building => proto::TaskState::Building,
        TaskState::Running => proto::TaskState::Running,
        TaskState::Succeeded => proto::TaskState::Succeeded,
        TaskState::Failed => proto::TaskState::Failed,
        TaskState::Killed => proto::TaskState::Killed,
        TaskState::WorkerFailed => proto::TaskState::WorkerFailed,
    }
}

pub fn state_from_proto(s: i32) -> Option<TaskState> {
    Some(match proto::TaskState::try_from(s).ok()? {
        proto::TaskState::Pending => TaskState::Pending,
        proto::TaskState::Building => TaskState::Building,
        proto::TaskState::Running => TaskState::Running,
        proto::TaskState::Succeeded => TaskState::Succeeded,
        proto::TaskState::Failed => TaskState::Failed,
        proto::TaskState::Killed => TaskState::Killed,
        proto::TaskState::WorkerFailed => TaskState::WorkerFailed,
        _ => return None,
    })
}

/// A RunTaskRequest as a TaskSpec; numeric fields that cannot be right are refused here,
/// the rest is checked by the task manager.
pub fn task_spec(req: worker::RunTaskRequest, raw: Vec<u8>) -> Result<TaskSpec, TaskError> {
    let env = req.environment.unwrap_or_default();
    let res = req.resources.unwrap_or_default();
    if res.cpu < 0 {
        return Err(invalid("resources.cpu", "must not be negative"));
    }
    if res.cpu_millicores < 0 {
        return Err(invalid("resources.cpu_millicores", "must not be negative"));
    }
    if res.memory_bytes < 0 {
        return Err(invalid("resources.memory_bytes", "must not be negative"));
    }
    if res.pids_limit < 0 {
        return Err(invalid("resources.pids_limit", "must not be negative"));
    }
    if res.disk_bytes < 0 {
        return Err(invalid("resources.disk_bytes", "must not be negative"));
    }
    if res.max_log_bytes < 0 {
        return Err(invalid("resources.max_log_bytes", "must not be negative"));
    }
    if req.timeout_seconds < 0 {
        return Err(invalid("timeout_seconds", "must not be negative"));
    }
    let cpu_millicores = if res.cpu_millicores > 0 {
        Some(res.cpu_millicores as u32)
    } else if res.cpu > 0 {
        Some((res.cpu as u32).saturating_mul(1000))
    } else {
        None
    };
    let mut spec = TaskSpec {
        task_id: req.task_id,
        job_id: req.job_id,
        task_index: req.task_index,
        num_tasks: req.num_tasks,
        attempt_id: req.attempt_id,
        command: req.command.map(|c| Command { argv: c.argv, setup_commands: c.setup_commands }),
        serialized_entrypoint: (!req.serialized_entrypoint.is_empty()).then_some(req.serialized_entrypoint),
        env_vars: env.env_vars.into_iter().collect(),
        extras: env.extras,
        pip_packages: env.pip_packages,
        bundle_sha256: (!req.bundle_sha256.is_empty()).then_some(req.bundle_sha256),
        image: (!req.image.is_empty()).then_some(req.image),
        bundle_gcs_path: (!req.bundle_gcs_path.is_empty()).then_some(req.bundle_gcs_path),
        timeout: (req.timeout_seconds > 0).then(|| Duration::from_secs(req.timeout_seconds as u64)),
        ports: req.ports,
        workdir_files: req.workdir_files.into_iter().collect(),
        raw_request: raw,
        ..Default::default()
    };
    spec.limits.cpu_millicores = cpu_millicores;
    spec.limits.memory_bytes = (res.memory_bytes > 0).then_some(res.memory_bytes as u64);
    spec.limits.pids = (res.pids_limit > 0).then_some(res.pids_limit);
    spec.disk_bytes = (res.disk_bytes > 0).then_some(res.disk_bytes as u64);
    spec.max_log_bytes = (res.max_log_bytes > 0).then_some(res.max_log_bytes as u64);
    Ok(spec)
}

/// A task's `request.pb` (the RunTaskRequest as received) as its spec again: how a restarted
/// worker runs a task it had accepted but not yet started.
pub fn decode_run_task(raw: &[u8]) -> Result<TaskSpec, TaskError> {
    let req = <worker::RunTaskRequest as prost::Message>::decode(raw)
        .map_err(|e| invalid("request", format!("cannot be decoded: {e}")))?;
    task_spec(req, raw.to_vec())
}

pub fn task_status(v: TaskView) -> proto::TaskStatus {
    let build = WireBuild::of(&v);
    proto::TaskStatus {
        task_id: v.task_id,
        job_id: v.job_id,
        task_index: v.task_index,
        state: state_to_proto(v.state) as i32,
        worker_id: String::new(),
        worker_address: String::new(),
        exit_code: v.exit_code,
        error: v.error,
        started_at_ms: v.started_at_ms,
        finished_at_ms: v.finished_at_ms,
        ports: v.ports.into_iter().map(|(k, p)| (k, i32::from(p))).collect(),
        resource_usage: v.usage.as_ref().map(WireUsage::from).map(|u| proto::ResourceUsage {
            memory_mb: u.memory_mb,
            disk_mb: u.disk_mb,
            cpu_millicores: u.cpu_millicores,
            memory_peak_mb: u.memory_peak_mb,
            cpu_percent: u.cpu_percent,
            process_count: u.process_count,
        }),
        build_metrics: build.map(|b| proto::BuildMetrics {
            build_started_ms: b.started_ms,
            build_finished_ms: b.finished_ms,
            from_cache: b.from_cache,
            image_tag: b.image_tag,
        }),
        current_attempt_id: v.current_attempt_id,
        attempts: v
            .attempts
            .into_iter()
            .map(|a| proto::TaskAttempt {
                attempt_id: a.attempt_id,
                worker_id: String::new(),
                state: state_to_proto(a.state) as i32,
                exit_code: a.exit_code,
                error: a.error,
                started_at_ms: a.started_at_ms,
                finished_at_ms: a.finished_at_ms,
                is_worker_failure: a.is_worker_failure,
            })
            .collect(),
        status_message: v.status_message,
    }
}

pub fn log_filter(f: Option<worker::FetchLogsFilter>) -> Result<LogFilter, TaskError> {
    let Some(f) = f else { return Ok(LogFilter::default()) };
    let regex = if f.regex.is_empty() {
        None
    } else {
        Some(regex::Regex::new(&f.regex).map_err(|e| invalid("filter.regex", e.to_string()))?)
    };
    let source = if f.source.is_empty() {
        None
    } else {
        Some(f.source.parse::<Source>().map_err(|e| invalid("filter.source", e.to_string()))?)
    };
    if f.max_lines < 0 {
        return Err(invalid("filter.max_lines", "must not be negative"));
    }
    Ok(LogFilter {
        regex,
        start_line: f.start_line,
        start_ms: f.start_ms,
        end_ms: f.end_ms,
        max_lines: f.max_lines as u64,
        source,
        end_line: 0,
    })
}

pub fn log_entry(l: LogLine) -> worker::LogEntry {
    worker::LogEntry {
        timestamp_ms: l.ts_ms,
        source: l.source.as_str().to_string(),
        data: l.data,
        line_number: l.line_number as i64,
    }
}
