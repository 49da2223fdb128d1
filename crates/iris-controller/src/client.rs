//! [`Cluster`]: the Rust client of a controller (ours or Iris's: it speaks Connect, which both
//! serve). Launch, status, wait with a deadline, terminate, a task's logs read from its worker,
//! workers and endpoints.
//!
//! Calls ride out a controller restart: a call that could not reach the controller is tried
//! again with jittered exponential backoff (0.1 s doubling to 2 s, each pause drawn between
//! half and all of it) until [`Cluster::with_retry_for`]'s bound (15 s by default). A call
//! that may have reached it (no answer in time, a connection cut mid-call) is retried only if
//! repeating it is harmless: reads, TerminateJob, and LaunchJob, which is made idempotent by
//! its name (a job without one gets a unique name here; the controller answers the same
//! name and spec with the job it already launched).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use super::model::job_terminal;
use iris_wire::connect::{ConnectClient, ConnectError};
use iris_wire::proto::controller as pc;
use iris_wire::proto::{Empty, JobState, TaskStatus, worker};

const SERVICE: &str = "iris.cluster.ControllerService";
/// How long calls are retried by default while the controller cannot be reached.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(15);
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
pub enum ClusterError {
    #[error(transparent)]
    Call(#[from] ConnectError),
    #[error("job {job_id} did not end within {within:?} (it is {state})")]
    WaitTimeout { job_id: String, within: Duration, state: String },
    #[error("task {0} has not been placed on a worker yet")]
    NoWorker(String),
    #[error("the controller answered without the {0}")]
    Missing(&'static str),
}

/// A client of one controller.
#[derive(Clone)]
pub struct Cluster {
    client: ConnectClient,
    timeout: Duration,
    /// What calls present (to the controller and to the workers logs are read from).
    security: iris_wire::ClientSecurity,
    retry_for: Duration,
}

/// Whether a call may be repeated after it may have reached the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Repeating it changes nothing (reads, terminate, a named launch).
    Harmless,
    /// Only retried when it surely never reached the controller (it creates or removes
    /// something each time).
    OnlyUnsent,
}

/// Whether `e` is worth another try.
fn retryable(e: &ConnectError, repeat: Repeat) -> bool {
    match e {
        // Refused or unreachable: the request never left.
        ConnectError::Transport { source, .. } if source.is_connect() => true,
        ConnectError::Status { code, .. } => *code == tonic::Code::Unavailable,
        ConnectError::Transport { .. } | ConnectError::Timeout { .. } | ConnectError::Body { .. } => {
            repeat == Repeat::Harmless
        }
        ConnectError::Url { .. } => false,
    }
}

/// A random number (std's per-instance random hash keys; enough for jitter and names).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// A pause of between half and all of `backoff` (jitter keeps clients that lost the same
/// controller from coming back in step).
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + Duration::from_nanos(random_u64() % (half.as_nanos() as u64 + 1))
}

/// The name of a job state without its prefix (`SUCCEEDED`).
pub fn job_state_name(state: i32) -> &'static str {
    JobState::try_from(state).map(|s| s.as_str_name().trim_start_matches("JOB_STATE_")).unwrap_or("UNKNOWN")
}

impl Cluster {
    /// A client of the controller at `address` (`host:port` or `http://host:port`).
    pub fn new(address: &str) -> Cluster {
        Cluster::with_security(address, &iris_wire::ClientSecurity::default())
    }

    /// A client that presents `security`'s token and TLS settings to the controller and to
    /// workers.
    pub fn with_security(address: &str, security: &iris_wire::ClientSecurity) -> Cluster {
        Cluster {
            client: ConnectClient::with_security(address, security),
            timeout: Duration::from_secs(10),
            security: security.clone(),
            retry_for: DEFAULT_RETRY_FOR,
        }
    }

    /// Retries calls that fail to reach the controller for up to `bound` (zero: never).
    pub fn with_retry_for(mut self, bound: Duration) -> Cluster {
        self.retry_for = bound;
        self
    }

    /// The controller's base URL.
    pub fn address(&self) -> &str {
        self.client.base()
    }

    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, ClusterError> {
        self.call_with(method, req, Repeat::Harmless).await
    }

    async fn call_with<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        req: &Req,
        repeat: Repeat,
    ) -> Result<Resp, ClusterError> {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = FIRST_PAUSE;
        loop {
            match self.client.call(SERVICE, method, req, self.timeout).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let pause = jittered(backoff);
                    if !retryable(&e, repeat) || Instant::now() + pause > deadline {
                        return Err(e.into());
                    }
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    /// Launches a job; returns its id. A job without a name gets a unique one here, so a
    /// retried launch is the same job, never a second one.
    pub async fn launch(&self, req: &pc::LaunchJobRequest) -> Result<String, ClusterError> {
        let named;
        let req = if req.name.is_empty() {
            let ms = iris_wire::clock::now_ms();
            named = pc::LaunchJobRequest { name: format!("job-{ms}-{:08x}", random_u64() as u32), ..req.clone() };
            &named
        } else {
            req
        };
        let r: pc::LaunchJobResponse = self.call("LaunchJob", req).await?;
        Ok(r.job_id)
    }

    /// The job's status with its tasks.
    pub async fn status(&self, job_id: &str) -> Result<pc::JobStatus, ClusterError> {
        let req = pc::GetJobStatusRequest { job_id: job_id.to_string(), include_result: false };
        let r: pc::GetJobStatusResponse = self.call("GetJobStatus", &req).await?;
        r.job.ok_or(ClusterError::Missing("job"))
    }

    /// Polls until the job has ended, or fails after `within`.
    pub async fn wait(&self, job_id: &str, within: Duration) -> Result<pc::JobStatus, ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status(job_id).await?;
            if job_terminal(super::model::job_state(s.state)) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::WaitTimeout {
                    job_id: job_id.to_string(),
                    within,
                    state: job_state_name(s.state).to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the job's tasks and its child jobs; the job becomes KILLED.
    /// TerminateJob: kills the job's tasks and its children.
    pub async fn terminate(&self, job_id: &str) -> Result<(), ClusterError> {
        let _: Empty = self.call("TerminateJob", &pc::TerminateJobRequest { job_id: job_id.to_string() }).await?;
        Ok(())
    }

    /// ListJobs: every job the controller knows.
    pub async fn list_jobs(&self) -> Result<Vec<pc::JobStatus>, ClusterError> {
        let r: pc::ListJobsResponse = self.call("ListJobs", &pc::ListJobsRequest {}).await?;
        Ok(r.jobs)
    }

    /// GetTaskStatus of one task of a job.
    pub async fn task(&self, job_id: &str, index: i32) -> Result<TaskStatus, ClusterError> {
        let req = pc::GetTaskStatusRequest { job_id: job_id.to_string(), task_index: index };
        let r: pc::GetTaskStatusResponse = self.call("GetTaskStatus", &req).await?;
        r.task.ok_or(ClusterError::Missing("task"))
    }

    /// A task's log lines, read from the worker that runs (or ran) its current attempt.
    pub async fn logs(
        &self,
        job_id: &str,
        index: i32,
        filter: worker::FetchLogsFilter,
    ) -> Result<Vec<worker::LogEntry>, ClusterError> {
        let task = self.task(job_id, index).await?;
        if task.worker_address.is_empty() {
            return Err(ClusterError::NoWorker(task.task_id));
        }
        let w = ConnectClient::with_security(&task.worker_address, &self.security);
        let req = worker::FetchTaskLogsRequest { task_id: task.task_id, filter: Some(filter) };
        let r: worker::FetchTaskLogsResponse =
            w.call("iris.cluster.WorkerService", "FetchTaskLogs", &req, self.timeout).await?;
        Ok(r.logs)
    }

    /// ListWorkers: the registered workers and their health.
    pub async fn workers(&self) -> Result<Vec<pc::WorkerHealthStatus>, ClusterError> {
        let r: pc::ListWorkersResponse = self.call("ListWorkers", &pc::ListWorkersRequest {}).await?;
        Ok(r.workers)
    }

    /// Registers `name` → `address` for a job; returns the endpoint id.
    pub async fn register_endpoint(
        &self,
        name: &str,
        address: &str,
        job_id: &str,
        metadata: HashMap<String, String>,
    ) -> Result<String, ClusterError> {
        let req = pc::RegisterEndpointRequest {
            name: name.to_string(),
            address: address.to_string(),
            job_id: job_id.to_string(),
            metadata,
        };
        let r: pc::RegisterEndpointResponse = self.call_with("RegisterEndpoint", &req, Repeat::OnlyUnsent).await?;
        Ok(r.endpoint_id)
    }

    /// UnregisterEndpoint (sent again only when the first send surely did not arrive).
    pub async fn unregister_endpoint(&self, endpoint_id: &str) -> Result<(), ClusterError> {
        let req = pc::UnregisterEndpointRequest { endpoint_id: endpoint_id.to_string() };
        let _: Empty = self.call_with("UnregisterEndpoint", &req, Repeat::OnlyUnsent).await?;
        Ok(())
    }

    /// LookupEndpoint by name.
    pub async fn lookup_endpoint(&self, name: &str) -> Result<pc::Endpoint, ClusterError> {
        let r: pc::LookupEndpointResponse =
            self.call("LookupEndpoint", &pc::LookupEndpointRequest { name: name.to_string() }).await?;
        r.endpoint.ok_or(ClusterError::Missing("endpoint"))
    }

    /// ListEndpoints whose names start with `prefix`.
    pub async fn list_endpoints(&self, prefix: &str) -> Result<Vec<pc::Endpoint>, ClusterError> {
        let r: pc::ListEndpointsResponse =
            self.call("ListEndpoints", &pc::ListEndpointsRequest { prefix: prefix.to_string() }).await?;
        Ok(r.endpoints)
    }
}
