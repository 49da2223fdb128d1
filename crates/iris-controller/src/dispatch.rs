//! Calls to workers over Connect (what every Iris worker serves): RunTask with a 5 s
//! deadline, many in parallel but bounded; KillTask with a 5 s grace; GetTaskStatus to check
//! a task a heartbeat no longer lists. Outcomes go back into the state machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::Code;

use super::Controller;
use super::model::task_state;
use super::state::{DispatchOutcome, Effect, Verified};
use iris_wire::connect::{ConnectClient, ConnectError};
use iris_wire::proto::{Empty, TaskState, TaskStatus, worker};

const SERVICE: &str = "iris.cluster.WorkerService";
/// Iris's controller dispatches with a 5 s deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// KillTask's grace before SIGKILL, as Iris sends it.
const KILL_GRACE_MS: i32 = 5000;

/// One Connect client per worker address (each keeps its connections), and the bound on
/// RunTask calls in flight.
pub struct Calls {
    clients: Mutex<HashMap<String, ConnectClient>>,
    slots: Arc<Semaphore>,
    security: iris_wire::ClientSecurity,
}

impl Calls {
    pub fn new(parallel: usize, security: iris_wire::ClientSecurity) -> Calls {
        Calls { clients: Mutex::new(HashMap::new()), slots: Arc::new(Semaphore::new(parallel.max(1))), security }
    }

    fn client(&self, address: &str) -> ConnectClient {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(address.to_string())
            .or_insert_with(|| ConnectClient::with_security(address, &self.security))
            .clone()
    }
}

/// Makes one call in the background.
pub fn run(c: Controller, effect: Effect) {
    tokio::spawn(async move {
        match effect {
            Effect::Dispatch { task_id, attempt_id, worker_id, address, request } => {
                dispatch(c, task_id, attempt_id, worker_id, address, *request).await;
            }
            Effect::Kill { worker_id, address, task_id } => {
                let client = c.inner.calls.client(&address);
                let req = worker::KillTaskRequest { task_id: task_id.clone(), term_timeout_ms: KILL_GRACE_MS };
                match client.call::<_, Empty>(SERVICE, "KillTask", &req, CALL_TIMEOUT).await {
                    Ok(_) => tracing::info!(%task_id, %worker_id, "killed"),
                    // Unknown there, or it ended already: nothing left to kill.
                    Err(ConnectError::Status { code: Code::NotFound | Code::FailedPrecondition, .. }) => {}
                    Err(e) => tracing::warn!(%task_id, %worker_id, error = %e, "KillTask"),
                }
            }
            Effect::Verify { task_id, attempt_id, worker_id, address } => {
                let client = c.inner.calls.client(&address);
                let req = worker::GetTaskStatusRequest { task_id: task_id.clone(), include_result: false };
                let v = match client.call::<_, TaskStatus>(SERVICE, "GetTaskStatus", &req, CALL_TIMEOUT).await {
                    Ok(s) => Some(Verified::Status {
                        attempt_id: s.current_attempt_id,
                        state: task_state(s.state),
                        exit_code: s.exit_code,
                        error: s.error,
                    }),
                    Err(ConnectError::Status { code: Code::NotFound, .. }) => Some(Verified::NotFound),
                    Err(e) => {
                        tracing::warn!(%task_id, %worker_id, error = %e, "checking a task the heartbeat did not list");
                        None
                    }
                };
                c.update(|s| match v {
                    Some(v) => s.verified(&task_id, attempt_id, &worker_id, v),
                    None => s.verified(&task_id, -1, &worker_id, Verified::NotFound),
                });
                c.wake();
            }
        }
    });
}

async fn dispatch(
    c: Controller,
    task_id: String,
    attempt_id: i32,
    worker_id: String,
    address: String,
    request: worker::RunTaskRequest,
) {
    let slots = c.inner.calls.slots.clone();
    let Ok(_permit) = slots.acquire_owned().await else { return };
    let client = c.inner.calls.client(&address);
    let wants_ports = !request.ports.is_empty();
    let outcome = match client.call::<_, worker::RunTaskResponse>(SERVICE, "RunTask", &request, CALL_TIMEOUT).await {
        Ok(r) => DispatchOutcome::Accepted(task_state(r.state)),
        // The worker has this attempt already (a resumed controller sent it again).
        Err(ConnectError::Status { code: Code::AlreadyExists, .. }) => {
            DispatchOutcome::Accepted(TaskState::Unspecified)
        }
        Err(ConnectError::Status { code: Code::InvalidArgument, message, .. }) => DispatchOutcome::Refused(message),
        // The worker answered (with an error) or was never reached: it does not run it.
        Err(e @ ConnectError::Status { .. }) => DispatchOutcome::Unreachable(e.to_string()),
        Err(ConnectError::Transport { source, url }) if source.is_connect() => {
            DispatchOutcome::Unreachable(ConnectError::Transport { source, url }.to_string())
        }
        Err(e) => DispatchOutcome::Unknown(e.to_string()),
    };
    let retry = !matches!(outcome, DispatchOutcome::Accepted(_) | DispatchOutcome::Unknown(_));
    if let DispatchOutcome::Unreachable(e) = &outcome {
        tracing::warn!(%task_id, %worker_id, error = %e, "dispatch failed; the worker is suspect");
    }
    let accepted = !retry;
    c.update(|s| s.dispatched(&task_id, attempt_id, &worker_id, outcome));
    if retry {
        c.wake();
    }
    if accepted && wants_ports {
        let req = worker::GetTaskStatusRequest { task_id: task_id.clone(), include_result: false };
        if let Ok(s) = client.call::<_, TaskStatus>(SERVICE, "GetTaskStatus", &req, CALL_TIMEOUT).await {
            c.update(|st| st.set_ports(&task_id, attempt_id, s.ports.into_iter().collect()));
        }
    }
}
