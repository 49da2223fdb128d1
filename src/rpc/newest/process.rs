//! GetProcessStatus: the worker process's own figures, as Iris's worker reports its own (pid,
//! memory, threads, descriptors, CPU) — what `iris` shows for `/system/worker/<id>` through the
//! controller. Logs are not included: on the newest wire they live in Iris's log service.

use std::sync::Mutex;
use std::time::Instant;

use iris_wire::proto::newest::iris::job;
use tonic::Status;

/// The CPU time the worker had used at the last GetProcessStatus: `cpu_millicores` is the use
/// since then (since the worker started, on the first call), as Iris's worker measures it.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Mutex<Option<(Instant, u64)>>,
}

/// Who may be asked about: this process, by any of the names Iris uses for it.
fn is_this_process(target: &str, worker_id: &str) -> bool {
    target.is_empty() || target == "/system/process" || target.strip_prefix("/system/worker/") == Some(worker_id)
}

impl CpuSampler {
    /// The answer to `req` for this worker process, up `uptime_ms` since it started.
    pub fn status(
        &self,
        req: &job::GetProcessStatusRequest,
        worker_id: &str,
        uptime_ms: i64,
    ) -> Result<job::GetProcessStatusResponse, Status> {
        if !is_this_process(&req.target, worker_id) {
            return Err(Status::invalid_argument(format!(
                "target: {:?} is not this worker (ask for \"/system/process\" or \"/system/worker/{worker_id}\")",
                iris_wire::text::short(&req.target)
            )));
        }
        let info =
            self.process_info(worker_id, uptime_ms).map_err(|e| Status::internal(format!("reading /proc: {e}")))?;
        Ok(job::GetProcessStatusResponse { process_info: Some(info), log_entries: Vec::new() })
    }

    fn process_info(&self, worker_id: &str, uptime_ms: i64) -> procfs::ProcResult<job::ProcessInfo> {
        use procfs::Current;
        let me = procfs::process::Process::myself()?;
        let stat = me.stat()?;
        let cpu_ticks = stat.utime + stat.stime;
        let cpu_millicores = self.millicores(cpu_ticks, uptime_ms);
        let memory_total_bytes = procfs::Meminfo::current().map(|m| m.mem_total).unwrap_or(0);
        Ok(job::ProcessInfo {
            hostname: nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default(),
            pid: me.pid,
            // Not a Python process; Iris shows an empty version as such.
            python_version: String::new(),
            uptime_ms,
            memory_rss_bytes: (stat.rss * procfs::page_size()) as i64,
            memory_vms_bytes: stat.vsize as i64,
            thread_count: stat.num_threads as i32,
            open_fd_count: me.fd_count().unwrap_or(0) as i32,
            memory_total_bytes: memory_total_bytes as i64,
            cpu_count: std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1),
            cpu_millicores,
            provenance: Some(job::Provenance {
                built_by: format!("iris-worker {} ({worker_id})", env!("CARGO_PKG_VERSION")),
                ..Default::default()
            }),
        })
    }

    /// Millicores of CPU used between the last sample and now (`ticks`: the process's user +
    /// system time in clock ticks); since the start (`uptime_ms` ago) on the first sample.
    fn millicores(&self, ticks: u64, uptime_ms: i64) -> i32 {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (wall_ms, used_ticks) = match *last {
            Some((at, before)) => (now.duration_since(at).as_millis() as u64, ticks.saturating_sub(before)),
            None => (uptime_ms.max(0) as u64, ticks),
        };
        *last = Some((now, ticks));
        let used_ms = used_ticks.saturating_mul(1000) / procfs::ticks_per_second().max(1);
        used_ms.saturating_mul(1000).checked_div(wall_ms).map_or(0, |m| m.min(i32::MAX as u64) as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_answers_for_itself_under_each_of_its_names_and_no_other() {
        let cpu = CpuSampler::default();
        for target in ["", "/system/process", "/system/worker/w-1"] {
            let req = job::GetProcessStatusRequest { target: target.into(), ..Default::default() };
            let info = cpu.status(&req, "w-1", 1000).unwrap().process_info.unwrap();
            assert_eq!(info.pid, std::process::id() as i32, "{target:?}");
            assert!(info.memory_rss_bytes > 0 && info.memory_vms_bytes >= info.memory_rss_bytes, "{info:?}");
            assert!(info.thread_count >= 1 && info.open_fd_count >= 3 && info.memory_total_bytes > 0, "{info:?}");
        }
        let req = job::GetProcessStatusRequest { target: "/system/worker/other".into(), ..Default::default() };
        let err = cpu.status(&req, "w-1", 1000).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("target: "), "{}", err.message());
    }

    #[test]
    fn cpu_is_the_use_since_the_last_sample() {
        let cpu = CpuSampler::default();
        let ticks = procfs::ticks_per_second();
        // First sample: 1 s of CPU over 2 s up is half a core.
        assert_eq!(cpu.millicores(ticks, 2000), 500);
        // Then the use since that sample: none more.
        assert_eq!(cpu.millicores(ticks, 999_999), 0);
    }
}
