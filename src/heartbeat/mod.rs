//! The worker's side of a controller: RegisterWorker until accepted and then as a heartbeat,
//! and ReportTaskState for every state change, retried with backoff until it lands (a lost
//! report would leave the controller wrong about a task). Speaks Connect over HTTP/1.1.

use std::collections::VecDeque;
use std::time::Duration;

use crate::proto::{WorkerMetadata, controller};
use crate::rpc::connect::ConnectClient;
use crate::task::{TaskEvent, TaskManager, TaskState};

const SERVICE: &str = "iris.cluster.ControllerService";
/// Iris workers register every 5 s until accepted, then heartbeat every 10 s.
const REGISTER_EVERY: Duration = Duration::from_secs(5);
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub use iris_wire::cluster::{DISK_PRESSURE_ATTRIBUTE, attribute_text};

/// Who this worker is, for the controller.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub worker_id: String,
    /// host:port where the controller reaches this worker's WorkerService.
    pub address: String,
    pub metadata: WorkerMetadata,
}

/// Starts the heartbeat and the state reporter; they run until the manager shuts down
/// ([`TaskManager::shutdown`]).
pub fn start(manager: TaskManager, controller: &str, me: WorkerIdentity) {
    start_every(manager, controller, me, HEARTBEAT_EVERY);
}

/// [`start`] with another heartbeat interval (a controller with a short dead-worker timeout
/// needs heartbeats more often than Iris's 10 s).
pub fn start_every(manager: TaskManager, controller: &str, me: WorkerIdentity, every: Duration) {
    start_with_client(manager, ConnectClient::new(controller), me, every);
}

/// [`start_every`] through `client` (a controller that wants a token or TLS).
pub fn start_with_client(manager: TaskManager, client: ConnectClient, me: WorkerIdentity, every: Duration) {
    manager.set_controller_check(controller_check(client.clone(), me.worker_id.clone()));
    let events = manager.subscribe();
    let background = manager.background().clone();
    background.spawn(report_states(client.clone(), me.worker_id.clone(), events));
    background.spawn(heartbeat(client, manager, me, every));
}

async fn heartbeat(client: ConnectClient, manager: TaskManager, me: WorkerIdentity, every: Duration) {
    let mut accepted = false;
    let fence_ms = manager.fence().map(|f| f.as_millis() as i64).unwrap_or(0);
    loop {
        // Taken before the send: a reset in the answer reaches only what the worker held then,
        // and a lease renewed by the answer counts from then (never past what the controller saw).
        let fence = manager.fence_mark();
        let mut metadata = me.metadata.clone();
        if let Some(why) = manager.disk_pressure() {
            metadata.attributes.insert(DISK_PRESSURE_ATTRIBUTE.to_string(), attribute_text(&why));
        }
        let sent_ms = crate::supervisor::lease::boottime_ms();
        let req = controller::RegisterWorkerRequest {
            worker_id: me.worker_id.clone(),
            address: me.address.clone(),
            metadata: Some(metadata),
            running_task_ids: manager.active_task_ids(),
            fence_ms,
        };
        match client.call::<_, controller::RegisterWorkerResponse>(SERVICE, "RegisterWorker", &req, CALL_TIMEOUT).await
        {
            Ok(resp) => {
                if resp.accepted && !accepted {
                    tracing::info!(controller = client.base(), "registered with the controller");
                }
                accepted = resp.accepted;
                if resp.accepted {
                    manager.heard_from_controller(sent_ms);
                }
                if resp.should_reset {
                    tracing::warn!("the controller asked for a reset: killing and forgetting the tasks held until now");
                    // In the background: heartbeats go on while the tasks end.
                    drop(manager.reset(fence));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                accepted = false;
            }
        }
        tokio::time::sleep(if accepted { every } else { REGISTER_EVERY.min(every) }).await;
    }
}

async fn report_states(
    client: ConnectClient,
    worker_id: String,
    mut events: tokio::sync::mpsc::UnboundedReceiver<TaskEvent>,
) {
    let mut queue: VecDeque<TaskEvent> = VecDeque::new();
    let mut backoff = Duration::from_millis(200);
    // One report per state change, as Iris's worker sends them: the manager also emits an
    // event when only a task's status message changes (each BUILDING phase).
    let mut last_sent = LastSent::default();
    loop {
        if queue.is_empty() {
            match events.recv().await {
                Some(e) => queue.push_back(e),
                None => return,
            }
        }
        while let Ok(e) = events.try_recv() {
            queue.push_back(e);
        }
        let Some(event) = queue.front() else { continue };
        if event.state == TaskState::Pending || last_sent.is_repeat(event) {
            queue.pop_front();
            continue;
        }
        let req = report(&worker_id, event);
        match client
            .call::<_, controller::ReportTaskStateResponse>(SERVICE, "ReportTaskState", &req, CALL_TIMEOUT)
            .await
        {
            Ok(_) => {
                if let Some(sent) = queue.pop_front() {
                    last_sent.record(&sent);
                }
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                tracing::warn!(task_id = %event.task_id, error = %e, retry_in = ?backoff, "reporting a task state");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The state last reported for each attempt still going (a final state ends the entry).
#[derive(Default)]
struct LastSent(std::collections::HashMap<(String, i32), TaskState>);

impl LastSent {
    fn is_repeat(&self, e: &TaskEvent) -> bool {
        self.0.get(&(e.task_id.clone(), e.attempt_id)) == Some(&e.state)
    }

    fn record(&mut self, e: &TaskEvent) {
        let key = (e.task_id.clone(), e.attempt_id);
        if e.state.is_terminal() {
            self.0.remove(&key);
        } else {
            self.0.insert(key, e.state);
        }
    }
}

fn report(worker_id: &str, e: &TaskEvent) -> controller::ReportTaskStateRequest {
    controller::ReportTaskStateRequest {
        worker_id: worker_id.to_string(),
        task_id: e.task_id.clone(),
        job_id: e.job_id.clone(),
        task_index: e.task_index,
        state: crate::rpc::state_to_proto(e.state) as i32,
        exit_code: e.exit_code,
        error: e.error.clone(),
        finished_at_ms: e.finished_at_ms,
        attempt_id: e.attempt_id,
    }
}

/// This host's metadata (hostname, address, CPUs, memory).
pub fn host_metadata(ip_address: &str) -> WorkerMetadata {
    let hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let cpu_count = std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<i64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    WorkerMetadata { hostname, ip_address: ip_address.to_string(), cpu_count, memory_bytes, ..Default::default() }
}

/// An attribute value from its text, as [`iris_wire::cluster::AttributeText`] reads it.
pub fn attribute_value(v: &str) -> crate::proto::AttributeValue {
    iris_wire::cluster::AttributeText::parse(v).into()
}

/// Asks the controller (GetTaskStatus) whether the attempt is still the task's current one, on
/// this worker, and not ended: what a worker checks before it starts an attempt. A controller
/// that does not serve GetTaskStatus cannot tell: the lease alone fences then.
fn controller_check(client: ConnectClient, worker_id: String) -> crate::task::lease::ControllerCheck {
    std::sync::Arc::new(move |a: crate::task::lease::AttemptOf| {
        let (client, worker_id) = (client.clone(), worker_id.clone());
        Box::pin(async move {
            let req = controller::GetTaskStatusRequest { job_id: a.job_id, task_index: a.task_index };
            match client
                .call::<_, controller::GetTaskStatusResponse>(SERVICE, "GetTaskStatus", &req, CALL_TIMEOUT)
                .await
            {
                Ok(r) => Some(r.task.is_some_and(|t| {
                    t.task_id == a.task_id
                        && t.current_attempt_id == a.attempt_id
                        && t.worker_id == worker_id
                        && !crate::proto::TaskState::try_from(t.state).is_ok_and(|s| s.is_terminal())
                })),
                Err(crate::rpc::connect::ConnectError::Status { code: tonic::Code::NotFound, .. }) => Some(false),
                Err(crate::rpc::connect::ConnectError::Status { code: tonic::Code::Unimplemented, .. }) => Some(true),
                Err(e) => {
                    tracing::warn!(task_id = %a.task_id, error = %e, "asking the controller about a task");
                    None
                }
            }
        })
    })
}
