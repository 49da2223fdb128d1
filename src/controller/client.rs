//! [`Cluster`]: the Rust client of a controller (ours or Iris's: it speaks Connect, which both
//! serve). Launch, status, wait with a deadline, terminate, a task's logs read from its worker,
//! workers and endpoints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::model::job_terminal;
use crate::proto::controller as pc;
use crate::proto::{Empty, JobState, TaskStatus, worker};
use crate::rpc::connect::{ConnectClient, ConnectError};

const SERVICE: &str = "iris.cluster.ControllerService";

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
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
    security: crate::rpc::ClientSecurity,
}

/// The name of a job state without its prefix (`SUCCEEDED`).
pub fn job_state_name(state: i32) -> &'static str {
    JobState::try_from(state).map(|s| s.as_str_name().trim_start_matches("JOB_STATE_")).unwrap_or("UNKNOWN")
}

impl Cluster {
    /// A client of the controller at `address` (`host:port` or `http://host:port`).
    pub fn new(address: &str) -> Cluster {
        Cluster::with_security(address, &crate::rpc::ClientSecurity::default())
    }

    /// A client that presents `security`'s token and TLS settings to the controller and to
    /// workers.
    pub fn with_security(address: &str, security: &crate::rpc::ClientSecurity) -> Cluster {
        Cluster {
            client: ConnectClient::with_security(address, security),
            timeout: Duration::from_secs(10),
            security: security.clone(),
        }
    }

    pub fn address(&self) -> &str {
        self.client.base()
    }

    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, ClusterError> {
        Ok(self.client.call(SERVICE, method, req, self.timeout).await?)
    }

    /// Launches a job; returns its id.
    pub async fn launch(&self, req: &pc::LaunchJobRequest) -> Result<String, ClusterError> {
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
            if job_terminal(s.state) {
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
    pub async fn terminate(&self, job_id: &str) -> Result<(), ClusterError> {
        let _: Empty = self.call("TerminateJob", &pc::TerminateJobRequest { job_id: job_id.to_string() }).await?;
        Ok(())
    }

    pub async fn list_jobs(&self) -> Result<Vec<pc::JobStatus>, ClusterError> {
        let r: pc::ListJobsResponse = self.call("ListJobs", &pc::ListJobsRequest {}).await?;
        Ok(r.jobs)
    }

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
        let r: pc::RegisterEndpointResponse = self.call("RegisterEndpoint", &req).await?;
        Ok(r.endpoint_id)
    }

    pub async fn unregister_endpoint(&self, endpoint_id: &str) -> Result<(), ClusterError> {
        let req = pc::UnregisterEndpointRequest { endpoint_id: endpoint_id.to_string() };
        let _: Empty = self.call("UnregisterEndpoint", &req).await?;
        Ok(())
    }

    pub async fn lookup_endpoint(&self, name: &str) -> Result<pc::Endpoint, ClusterError> {
        let r: pc::LookupEndpointResponse =
            self.call("LookupEndpoint", &pc::LookupEndpointRequest { name: name.to_string() }).await?;
        r.endpoint.ok_or(ClusterError::Missing("endpoint"))
    }

    pub async fn list_endpoints(&self, prefix: &str) -> Result<Vec<pc::Endpoint>, ClusterError> {
        let r: pc::ListEndpointsResponse =
            self.call("ListEndpoints", &pc::ListEndpointsRequest { prefix: prefix.to_string() }).await?;
        Ok(r.endpoints)
    }
}
