//! The newest Iris generation's `iris.cluster.WorkerService` (marin-iris 0.2.227), served over
//! Connect (binary and JSON, as Iris's controller calls it) on the same paths as the January
//! generation's, so a worker serves one generation at a time (`--iris-wire`).
//!
//! Reconcile is a thin shell over the pure [`reconcile::reconcile`]: the identity guard and the
//! keep-alive here, the rules there, the actions applied to the task manager, and the reply
//! built from in-memory state (the controller gives up after 3 s). GetTaskStatus, ListTasks and
//! HealthCheck answer from the task manager, GetProcessStatus from the worker's own /proc
//! ([`process`]), ExecInContainer runs a command inside the task ([`exec`]), ProfileTask a
//! `py-spy dump` there ([`profile`]).

pub mod convert;
mod exec;
mod keepalive;
mod process;
mod profile;
pub mod reconcile;

pub use keepalive::KeepAlive;

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Code, Status};

use crate::proto::newest::iris::cluster::worker::{
    self, AttemptObservation, HealthResponse, ReconcileRequest, ReconcileResponse, WorkerHealth,
};
use crate::proto::newest::iris::job::{self, TaskState as WireState};
use crate::proto::newest::iris::time::{Duration as WireDuration, Timestamp};
use crate::rpc::connect::{Codec, ConnectService, Generation, unary_in};
use crate::task::{DEFAULT_GRACE_MS, TaskError, TaskManager};

pub use reconcile::{Action, KillReason};

/// Iris's disk rule: unhealthy when the cache volume has less than 5 % **and** less than
/// 10 GiB free.
const MIN_DISK_FREE_FRACTION: f64 = 0.05;
const MIN_DISK_FREE_BYTES: u64 = 10 << 30;

/// Something that may hold back an attempt's terminal observation until its log is pushed
/// (see `join::push`).
pub trait TerminalGate: Send + Sync {
    /// Whether the ended attempt `a`'s terminal state may be reported now.
    fn may_report_terminal(&self, a: &crate::task::UidAttempt) -> bool;
}

/// The newest WorkerService.
#[derive(Clone)]
pub struct NewestService {
    manager: TaskManager,
    worker_id: String,
    /// The controller's URL: bundles come from `<controller>/blobs/<sha256>`.
    controller: Option<String>,
    keepalive: Option<Arc<KeepAlive>>,
    /// The cache volume whose free space says healthy or not.
    cache_dir: std::path::PathBuf,
    gate: Option<Arc<dyn TerminalGate>>,
    cpu: Arc<process::CpuSampler>,
    /// Who holds the host's TPU devices (none watched: never unhealthy for it).
    tpu: Option<Arc<crate::devices::TpuWatch>>,
}

impl NewestService {
    pub fn new(manager: TaskManager, controller: Option<String>, cache_dir: std::path::PathBuf) -> NewestService {
        if let Some(c) = &controller {
            convert::set_controller(c);
        }
        NewestService {
            worker_id: manager.worker_id().to_string(),
            manager,
            controller: controller.map(|c| c.trim_end_matches('/').to_string()),
            keepalive: None,
            cache_dir,
            gate: None,
            cpu: Arc::default(),
            tpu: None,
        }
    }

    /// Each Reconcile addressed to this worker resets `keepalive`.
    pub fn with_keepalive(mut self, keepalive: Arc<KeepAlive>) -> NewestService {
        self.keepalive = Some(keepalive);
        self
    }

    /// A TPU held by a process that is not one of this worker's tasks makes it unhealthy.
    pub fn with_tpu_watch(mut self, watch: crate::devices::TpuWatch) -> NewestService {
        self.tpu = Some(Arc::new(watch));
        self
    }

    /// Terminal observations wait for `gate` (the log pusher).
    pub fn with_terminal_gate(mut self, gate: Arc<dyn TerminalGate>) -> NewestService {
        self.gate = Some(gate);
        self
    }

    pub fn manager(&self) -> &TaskManager {
        &self.manager
    }

    /// Reconcile: see the module's documentation and [`reconcile`].
    pub fn reconcile(&self, req: ReconcileRequest) -> ReconcileResponse {
        if !addressed_to(&req.worker_id, &self.worker_id) {
            // Another worker's desired set (a recycled address): do nothing, and answer with
            // our id so the controller sees the mismatch. No keep-alive either.
            return ReconcileResponse {
                worker_id: self.worker_id.clone(),
                observed: vec![],
                health: Some(WorkerHealth { healthy: true, ..Default::default() }),
            };
        }
        if let Some(k) = &self.keepalive {
            k.touch();
        }
        // The controller's contact renews the lease under which tasks run (see
        // `crate::supervisor::lease`): on this wire a Reconcile is that contact.
        self.manager.heard_from_controller(crate::supervisor::lease::boottime_ms());
        let local = self.manager.uid_attempts();
        let (actions, mut observed) = reconcile::reconcile(&req.desired, &local);
        let mut refused: HashMap<String, String> = HashMap::new();
        let mut started = Vec::new();
        for action in actions {
            match action {
                Action::Start(spec) => {
                    let uid = spec.attempt_uid.clone();
                    let accepted =
                        convert::task_spec(*spec, self.controller.as_deref()).and_then(|spec| self.manager.run(spec));
                    match accepted {
                        Ok(_) => {
                            tracing::info!(attempt_uid = %uid, "attempt started");
                            started.push(uid);
                        }
                        Err(e) => {
                            let why = refusal(e);
                            tracing::warn!(attempt_uid = %uid, error = %why, "attempt refused");
                            refused.insert(uid, why);
                        }
                    }
                }
                Action::Kill { uid, why } => {
                    tracing::info!(attempt_uid = %uid, ?why, "killing attempt");
                    if let Err(e) = self.manager.kill_uid(&uid, DEFAULT_GRACE_MS) {
                        tracing::warn!(attempt_uid = %uid, error = %e, "killing attempt");
                    }
                }
            }
        }
        let now: HashMap<String, crate::task::UidAttempt> = if started.is_empty() {
            HashMap::new()
        } else {
            self.manager.uid_attempts().into_iter().map(|a| (a.attempt_uid.clone(), a)).collect()
        };
        for o in &mut observed {
            if let Some(error) = refused.get(&o.attempt_uid) {
                *o = AttemptObservation {
                    attempt_uid: o.attempt_uid.clone(),
                    state: WireState::Failed as i32,
                    exit_code: -1,
                    error: error.clone(),
                    finished_at: Some(Timestamp { epoch_ms: iris_wire::clock::now_ms() }),
                    ..Default::default()
                };
            } else if let Some(a) = now.get(&o.attempt_uid) {
                *o = reconcile::observe(a);
            }
        }
        if let Some(gate) = &self.gate {
            hold_back_unpushed(&mut observed, &local, gate.as_ref());
        }
        ReconcileResponse { worker_id: self.worker_id.clone(), observed, health: Some(self.health()) }
    }

    /// Iris's health rule on the cache volume, and a host snapshot.
    fn health(&self) -> WorkerHealth {
        let running = self.manager.uid_attempts().iter().filter(|a| a.state == crate::task::TaskState::Running).count();
        let mut snapshot = job::WorkerResourceSnapshot {
            timestamp: Some(Timestamp { epoch_ms: iris_wire::clock::now_ms() }),
            running_task_count: running as i32,
            ..Default::default()
        };
        if let Some((total, available)) = meminfo() {
            snapshot.memory_total_bytes = total as i64;
            snapshot.memory_used_bytes = total.saturating_sub(available) as i64;
        }
        let (healthy, health_error) = match nix::sys::statvfs::statvfs(&self.cache_dir) {
            Ok(s) => {
                let frag = s.fragment_size();
                let total = s.blocks().saturating_mul(frag);
                let free = s.blocks_available().saturating_mul(frag);
                snapshot.disk_total_bytes = total as i64;
                snapshot.disk_used_bytes = total.saturating_sub(s.blocks_free().saturating_mul(frag)) as i64;
                disk_health(free, total)
            }
            Err(e) => (false, format!("reading the cache volume's free space: {e}")),
        };
        let tpu = self.tpu.as_ref().and_then(|w| w.unhealthy());
        let (healthy, health_error) = match tpu {
            Some(why) if healthy => (false, why),
            Some(why) => (false, format!("{health_error}; {why}")),
            None => (healthy, health_error),
        };
        WorkerHealth { healthy, health_error, resources: Some(snapshot) }
    }

    fn get_task_status(&self, req: worker::GetTaskStatusRequest) -> Result<job::TaskStatus, Status> {
        self.manager.status(&req.task_id).map(convert::task_status).map_err(crate::rpc::to_status)
    }

    fn list_tasks(&self) -> worker::ListTasksResponse {
        worker::ListTasksResponse { tasks: self.manager.list().into_iter().map(convert::task_status).collect() }
    }

    fn health_check(&self) -> HealthResponse {
        let h = self.manager.health();
        HealthResponse {
            healthy: true,
            uptime: Some(WireDuration { milliseconds: h.uptime_ms }),
            running_tasks: h.running_tasks as i32,
        }
    }
}

/// Whether a Reconcile is for this worker: an empty id (an older controller) is.
pub fn addressed_to(request_worker_id: &str, own: &str) -> bool {
    request_worker_id.is_empty() || request_worker_id == own
}

/// (healthy, why not) by Iris's rule: unhealthy only when both thresholds are crossed.
pub fn disk_health(free: u64, total: u64) -> (bool, String) {
    let fraction = if total == 0 { 0.0 } else { free as f64 / total as f64 };
    if fraction < MIN_DISK_FREE_FRACTION && free < MIN_DISK_FREE_BYTES {
        let why =
            format!("the cache volume has {} MiB free ({:.1} %), below 5 % and 10 GiB", free >> 20, fraction * 100.0);
        (false, why)
    } else {
        (true, String::new())
    }
}

/// A terminal observation whose log is not pushed yet is reported with the attempt's last
/// live state (RUNNING), so that the controller, and Iris's client after it, see the job end
/// only once its lines are in the log service. The gate bounds how long.
fn hold_back_unpushed(observed: &mut [AttemptObservation], local: &[crate::task::UidAttempt], gate: &dyn TerminalGate) {
    for o in observed.iter_mut() {
        let terminal = matches!(
            WireState::try_from(o.state),
            Ok(WireState::Succeeded | WireState::Failed | WireState::Killed | WireState::WorkerFailed)
        );
        let held = terminal && local.iter().any(|a| a.attempt_uid == o.attempt_uid && !gate.may_report_terminal(a));
        if held {
            *o = AttemptObservation {
                attempt_uid: o.attempt_uid.clone(),
                state: WireState::Running as i32,
                container_id: o.container_id.clone(),
                ..Default::default()
            };
        }
    }
}

/// The message of a refused start (the task manager's errors name the field, never a path).
fn refusal(e: TaskError) -> String {
    match e {
        TaskError::Invalid { .. } | TaskError::DiskPressure(_) | TaskError::PortsExhausted { .. } => e.to_string(),
        other => format!("the worker could not accept the attempt: {}", crate::rpc::to_status(other).message()),
    }
}

/// (MemTotal, MemAvailable) in bytes.
fn meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

impl ConnectService for NewestService {
    const NAME: &'static str = "iris.cluster.WorkerService";

    async fn call(&self, method: &str, codec: Codec, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        let s = self;
        match method {
            "Reconcile" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.cluster.Worker.ReconcileRequest",
                    "iris.cluster.Worker.ReconcileResponse",
                    &body,
                    |r| async move { Ok(s.reconcile(r)) },
                )
                .await
            }
            "GetTaskStatus" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.cluster.Worker.GetTaskStatusRequest",
                    "iris.job.TaskStatus",
                    &body,
                    |r| async move { s.get_task_status(r) },
                )
                .await
            }
            "ListTasks" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.cluster.Worker.ListTasksRequest",
                    "iris.cluster.Worker.ListTasksResponse",
                    &body,
                    |_: worker::ListTasksRequest| async move { Ok(s.list_tasks()) },
                )
                .await
            }
            "HealthCheck" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.job.Empty",
                    "iris.cluster.Worker.HealthResponse",
                    &body,
                    |_: job::Empty| async move { Ok(s.health_check()) },
                )
                .await
            }
            "GetProcessStatus" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.job.GetProcessStatusRequest",
                    "iris.job.GetProcessStatusResponse",
                    &body,
                    |r: job::GetProcessStatusRequest| async move {
                        s.cpu.status(&r, &s.worker_id, s.manager.health().uptime_ms)
                    },
                )
                .await
            }
            "ExecInContainer" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.cluster.Worker.ExecInContainerRequest",
                    "iris.cluster.Worker.ExecInContainerResponse",
                    &body,
                    |r| async move { exec::exec_in_container(&s.manager, r).await },
                )
                .await
            }
            "ProfileTask" => {
                unary_in(
                    Generation::Newest,
                    codec,
                    "iris.job.ProfileTaskRequest",
                    "iris.job.ProfileTaskResponse",
                    &body,
                    |r| async move { Ok(profile::profile_task(&s.manager, r).await) },
                )
                .await
            }
            other => {
                Err(Status::new(Code::Unimplemented, format!("no method {other:?} in iris.cluster.WorkerService")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_for_another_worker_is_not_ours() {
        assert!(addressed_to("w1", "w1"));
        assert!(addressed_to("", "w1"));
        assert!(!addressed_to("w2", "w1"));
    }

    #[test]
    fn unhealthy_only_below_both_disk_thresholds() {
        const GIB: u64 = 1 << 30;
        let (healthy, why) = disk_health(4 * GIB, 100 * GIB);
        assert!(!healthy && why.contains("4096 MiB free"), "{why}");
        assert!(disk_health(4 * GIB, 50 * GIB).0, "8 % free");
        assert!(disk_health(20 * GIB, 1000 * GIB).0, "2 % free but 20 GiB");
    }

    #[test]
    fn json_requests_use_the_newest_descriptors() {
        use crate::rpc::connect::{Codec, Generation};
        let json = br#"{"workerId":"w1","desired":[{"attemptUid":"u1","stop":"STOP_REASON_CANCELLED"}]}"#;
        let req: ReconcileRequest =
            Codec::Json.decode_in(Generation::Newest, "iris.cluster.Worker.ReconcileRequest", json).unwrap();
        assert_eq!(req.worker_id, "w1");
        assert_eq!(req.desired[0].attempt_uid, "u1");
        // The January generation has no such message.
        let january: Result<ReconcileRequest, _> = Codec::Json.decode("iris.cluster.Worker.ReconcileRequest", json);
        assert!(january.is_err());
        let resp = ReconcileResponse { worker_id: "w1".into(), ..Default::default() };
        let out = Codec::Json.encode_in(Generation::Newest, "iris.cluster.Worker.ReconcileResponse", &resp).unwrap();
        assert_eq!(out, br#"{"workerId":"w1"}"#);
    }

    struct Never;
    impl TerminalGate for Never {
        fn may_report_terminal(&self, _: &crate::task::UidAttempt) -> bool {
            false
        }
    }

    #[test]
    fn a_terminal_attempt_with_unpushed_lines_is_reported_running() {
        let local = crate::task::UidAttempt::succeeded_for_test(2, Default::default());
        let mut observed = vec![reconcile::observe(&local), reconcile::missing("other")];
        hold_back_unpushed(&mut observed, std::slice::from_ref(&local), &Never);
        assert_eq!(observed[0].state, WireState::Running as i32);
        assert_eq!(observed[0].finished_at, None);
        assert_eq!(observed[1].state, WireState::Missing as i32);
    }
}
