//! ControllerService: one implementation served over gRPC (tonic, with reflection) and over
//! Connect (what Iris workers and Python clients speak), on one port with the controller's
//! pages. Errors become codes here: bad input → INVALID_ARGUMENT naming the field, unknown
//! job/endpoint → NOT_FOUND, a live job's name again → ALREADY_EXISTS.

use std::future::Future;

use axum::Router;
use tonic::{Code, Request, Response, Status};

use super::model::task_terminal;
use super::{Controller, ControllerError};
use iris_wire::connect::{Codec, ConnectService, connect_router, unary};
use iris_wire::proto::Empty;
use iris_wire::proto::controller as pc;
use iris_wire::proto::controller_service_server::{ControllerService, ControllerServiceServer};

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
pub enum ServeError {
    #[error(transparent)]
    Rpc(#[from] iris_wire::server::ServeError),
    #[error("serving the controller: {0}")]
    Io(std::io::Error),
}

/// The status of a controller error.
pub fn to_status(e: ControllerError) -> Status {
    let code = match &e {
        ControllerError::Invalid { .. } => Code::InvalidArgument,
        ControllerError::NotFound { .. } => Code::NotFound,
        ControllerError::AlreadyExists(_) => Code::AlreadyExists,
        ControllerError::FailedPrecondition(_) => Code::FailedPrecondition,
        ControllerError::Store(_) => Code::Internal,
    };
    let mut message = match &e {
        // Ids are echoed cut short.
        ControllerError::NotFound { what, id } => format!("{what} {:?} not found", iris_wire::text::short(id)),
        _ => e.to_string(),
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Status::new(code, message)
}

/// ControllerService over a [`Controller`].
#[derive(Clone)]
pub struct ControllerServiceImpl {
    c: Controller,
}

fn not_found(what: &'static str, id: impl Into<String>) -> Status {
    to_status(ControllerError::NotFound { what, id: id.into() })
}

#[tonic::async_trait]
impl ControllerService for ControllerServiceImpl {
    async fn launch_job(&self, r: Request<pc::LaunchJobRequest>) -> Result<Response<pc::LaunchJobResponse>, Status> {
        // Iris's client ships the workspace inline (`bundle_blob`): kept here, fetched by
        // workers by URL.
        let job_id = self.c.launch(r.into_inner()).await.map_err(to_status)?;
        tracing::info!(%job_id, "job launched");
        self.c.wake();
        Ok(Response::new(pc::LaunchJobResponse { job_id }))
    }

    async fn get_job_status(
        &self,
        r: Request<pc::GetJobStatusRequest>,
    ) -> Result<Response<pc::GetJobStatusResponse>, Status> {
        let id = r.into_inner().job_id;
        let job = self.c.read(|s| s.jobs.get(&id).map(|j| s.job_status(j, true)));
        let job = job.ok_or_else(|| not_found("job_id", &id))?;
        Ok(Response::new(pc::GetJobStatusResponse { job: Some(job) }))
    }

    async fn terminate_job(&self, r: Request<pc::TerminateJobRequest>) -> Result<Response<Empty>, Status> {
        let id = r.into_inner().job_id;
        self.c.with_state(|s| s.terminate(&id)).await.map_err(to_status)?;
        tracing::info!(job_id = %id, "job terminated");
        self.c.wake();
        Ok(Response::new(Empty {}))
    }

    async fn list_jobs(&self, _r: Request<pc::ListJobsRequest>) -> Result<Response<pc::ListJobsResponse>, Status> {
        let jobs = self.c.read(|s| s.jobs.values().map(|j| s.job_status(j, false)).collect());
        Ok(Response::new(pc::ListJobsResponse { jobs }))
    }

    async fn get_task_status(
        &self,
        r: Request<pc::GetTaskStatusRequest>,
    ) -> Result<Response<pc::GetTaskStatusResponse>, Status> {
        let r = r.into_inner();
        let id = super::state::task_id(&r.job_id, r.task_index);
        let task = self.c.read(|s| {
            if !s.jobs.contains_key(&r.job_id) {
                return Err(not_found("job_id", &r.job_id));
            }
            s.tasks.get(&id).map(|t| s.task_status(t)).ok_or_else(|| not_found("task_index", r.task_index.to_string()))
        })?;
        Ok(Response::new(pc::GetTaskStatusResponse { task: Some(task) }))
    }

    async fn list_tasks(&self, r: Request<pc::ListTasksRequest>) -> Result<Response<pc::ListTasksResponse>, Status> {
        let id = r.into_inner().job_id;
        let tasks = self.c.read(|s| {
            if !s.jobs.contains_key(&id) {
                return Err(not_found("job_id", &id));
            }
            Ok(s.job_tasks(&id).into_iter().map(|t| s.task_status(t)).collect())
        })?;
        Ok(Response::new(pc::ListTasksResponse { tasks }))
    }

    async fn register_worker(
        &self,
        r: Request<pc::RegisterWorkerRequest>,
    ) -> Result<Response<pc::RegisterWorkerResponse>, Status> {
        let resp = self.c.with_state(|s| s.register_worker(r.into_inner())).await.map_err(to_status)?;
        self.c.wake();
        let delay = self.c.config().register_reply_delay;
        if !delay.is_zero() {
            // The test seam of `ControllerConfig::register_reply_delay`.
            tokio::time::sleep(delay).await;
        }
        Ok(Response::new(resp))
    }

    async fn list_workers(
        &self,
        _r: Request<pc::ListWorkersRequest>,
    ) -> Result<Response<pc::ListWorkersResponse>, Status> {
        let workers = self.c.read(|s| {
            s.workers
                .values()
                .map(|w| {
                    let jobs: std::collections::BTreeSet<String> =
                        w.tasks.iter().filter_map(|t| s.tasks.get(t).map(|t| t.job_id.clone())).collect();
                    pc::WorkerHealthStatus {
                        worker_id: w.rec.worker_id.clone(),
                        healthy: w.rec.healthy,
                        consecutive_failures: w.rec.consecutive_failures,
                        last_heartbeat_ms: w.rec.last_heartbeat_ms,
                        running_job_ids: jobs.into_iter().collect(),
                    }
                })
                .collect()
        });
        Ok(Response::new(pc::ListWorkersResponse { workers }))
    }

    async fn report_task_state(
        &self,
        r: Request<pc::ReportTaskStateRequest>,
    ) -> Result<Response<pc::ReportTaskStateResponse>, Status> {
        let r = r.into_inner();
        let ended = task_terminal(super::model::task_state(r.state));
        self.c
            .with_state(|s| {
                s.report(&r);
                Ok(())
            })
            .await
            .map_err(to_status)?;
        if ended {
            self.c.wake();
        }
        Ok(Response::new(pc::ReportTaskStateResponse {}))
    }

    async fn register_endpoint(
        &self,
        r: Request<pc::RegisterEndpointRequest>,
    ) -> Result<Response<pc::RegisterEndpointResponse>, Status> {
        let endpoint_id = self.c.with_state(|s| s.register_endpoint(r.into_inner())).await.map_err(to_status)?;
        Ok(Response::new(pc::RegisterEndpointResponse { endpoint_id }))
    }

    async fn unregister_endpoint(&self, r: Request<pc::UnregisterEndpointRequest>) -> Result<Response<Empty>, Status> {
        let id = r.into_inner().endpoint_id;
        self.c.with_state(|s| s.unregister_endpoint(&id)).await.map_err(to_status)?;
        Ok(Response::new(Empty {}))
    }

    async fn lookup_endpoint(
        &self,
        r: Request<pc::LookupEndpointRequest>,
    ) -> Result<Response<pc::LookupEndpointResponse>, Status> {
        let name = r.into_inner().name;
        if name.is_empty() {
            return Err(to_status(ControllerError::Invalid {
                field: "name".into(),
                reason: "must not be empty".into(),
            }));
        }
        let e = self.c.read(|s| s.endpoints.values().find(|e| e.name == name).map(endpoint));
        let e = e.ok_or_else(|| not_found("endpoint name", &name))?;
        Ok(Response::new(pc::LookupEndpointResponse { endpoint: Some(e) }))
    }

    async fn list_endpoints(
        &self,
        r: Request<pc::ListEndpointsRequest>,
    ) -> Result<Response<pc::ListEndpointsResponse>, Status> {
        let prefix = r.into_inner().prefix;
        let endpoints =
            self.c.read(|s| s.endpoints.values().filter(|e| e.name.starts_with(&prefix)).map(endpoint).collect());
        Ok(Response::new(pc::ListEndpointsResponse { endpoints }))
    }
}

fn endpoint(e: &super::model::EndpointRec) -> pc::Endpoint {
    pc::Endpoint {
        endpoint_id: e.endpoint_id.clone(),
        name: e.name.clone(),
        address: e.address.clone(),
        job_id: e.job_id.clone(),
        metadata: e.metadata.clone().into_iter().collect(),
    }
}

impl ConnectService for ControllerServiceImpl {
    const NAME: &'static str = "iris.cluster.ControllerService";

    async fn call(&self, method: &str, codec: Codec, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        let n = |m: &str| format!("iris.cluster.{m}");
        let c = |m: &str| format!("iris.cluster.Controller.{m}");
        let s = self;
        match method {
            "LaunchJob" => {
                unary(codec, &c("LaunchJobRequest"), &c("LaunchJobResponse"), &body, |r| s.launch_job(r)).await
            }
            "GetJobStatus" => {
                unary(codec, &c("GetJobStatusRequest"), &c("GetJobStatusResponse"), &body, |r| s.get_job_status(r))
                    .await
            }
            "TerminateJob" => unary(codec, &c("TerminateJobRequest"), &n("Empty"), &body, |r| s.terminate_job(r)).await,
            "ListJobs" => unary(codec, &c("ListJobsRequest"), &c("ListJobsResponse"), &body, |r| s.list_jobs(r)).await,
            "GetTaskStatus" => {
                unary(codec, &c("GetTaskStatusRequest"), &c("GetTaskStatusResponse"), &body, |r| s.get_task_status(r))
                    .await
            }
            "ListTasks" => {
                unary(codec, &c("ListTasksRequest"), &c("ListTasksResponse"), &body, |r| s.list_tasks(r)).await
            }
            "RegisterWorker" => {
                unary(codec, &c("RegisterWorkerRequest"), &c("RegisterWorkerResponse"), &body, |r| s.register_worker(r))
                    .await
            }
            "ListWorkers" => {
                unary(codec, &c("ListWorkersRequest"), &c("ListWorkersResponse"), &body, |r| s.list_workers(r)).await
            }
            "ReportTaskState" => {
                unary(codec, &c("ReportTaskStateRequest"), &c("ReportTaskStateResponse"), &body, |r| {
                    s.report_task_state(r)
                })
                .await
            }
            "RegisterEndpoint" => {
                unary(codec, &c("RegisterEndpointRequest"), &c("RegisterEndpointResponse"), &body, |r| {
                    s.register_endpoint(r)
                })
                .await
            }
            "UnregisterEndpoint" => {
                unary(codec, &c("UnregisterEndpointRequest"), &n("Empty"), &body, |r| s.unregister_endpoint(r)).await
            }
            "LookupEndpoint" => {
                unary(codec, &c("LookupEndpointRequest"), &c("LookupEndpointResponse"), &body, |r| s.lookup_endpoint(r))
                    .await
            }
            "ListEndpoints" => {
                unary(codec, &c("ListEndpointsRequest"), &c("ListEndpointsResponse"), &body, |r| s.list_endpoints(r))
                    .await
            }
            other => Err(Status::unimplemented(format!("no method {other:?} in iris.cluster.ControllerService"))),
        }
    }
}

/// The controller's router: gRPC with reflection, Connect, and its pages.
pub fn router(c: Controller) -> Result<Router, ServeError> {
    let svc = ControllerServiceImpl { c: c.clone() };
    // LaunchJob may carry an inline bundle: both protocols take requests a little above it.
    let max_request = super::bundles::MAX_BLOB_BYTES + (4 << 20);
    let grpc = iris_wire::server::grpc_with_reflection(tonic::service::Routes::new(
        ControllerServiceServer::new(svc.clone()).max_decoding_message_size(max_request),
    ))?;
    let http =
        connect_router(svc).layer(axum::extract::DefaultBodyLimit::max(max_request)).merge(super::web::router(c));
    Ok(iris_wire::server::one_port(grpc, http))
}

/// Serves the controller on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    c: Controller,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(listener, c, iris_wire::ServeOptions::default(), shutdown).await
}

/// [`serve`] behind `options`' gate (token, Host check), TLS and connection bounds.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    c: Controller,
    options: iris_wire::ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = options.gate.protect(router(c)?);
    iris_wire::listen::serve(listener, app, options.listen, shutdown).await.map_err(ServeError::Io)
}
