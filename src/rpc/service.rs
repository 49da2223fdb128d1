//! WorkerService: the same implementation serves gRPC and Connect.

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert;
use super::status::to_status;
use crate::proto::worker;
use crate::proto::worker_service_server::WorkerService;
use crate::proto::{Empty, TaskStatus};
use crate::task::TaskManager;

/// WorkerService over a [`TaskManager`].
#[derive(Clone)]
pub struct WorkerServiceImpl {
    manager: TaskManager,
}

impl WorkerServiceImpl {
    pub fn new(manager: TaskManager) -> WorkerServiceImpl {
        WorkerServiceImpl { manager }
    }

    pub fn manager(&self) -> &TaskManager {
        &self.manager
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    async fn run_task(
        &self,
        request: Request<worker::RunTaskRequest>,
    ) -> Result<Response<worker::RunTaskResponse>, Status> {
        let req = request.into_inner();
        let raw = req.encode_to_vec();
        let spec = convert::task_spec(req, raw).map_err(to_status)?;
        let task_id = spec.task_id.clone();
        let state = self.manager.run(spec).map_err(to_status)?;
        tracing::info!(%task_id, "task accepted");
        Ok(Response::new(worker::RunTaskResponse { task_id, state: convert::state_to_proto(state) as i32 }))
    }

    async fn get_task_status(
        &self,
        request: Request<worker::GetTaskStatusRequest>,
    ) -> Result<Response<TaskStatus>, Status> {
        let req = request.into_inner();
        let view = self.manager.status(&req.task_id).map_err(to_status)?;
        Ok(Response::new(convert::task_status(view)))
    }

    async fn list_tasks(
        &self,
        _request: Request<worker::ListTasksRequest>,
    ) -> Result<Response<worker::ListTasksResponse>, Status> {
        let tasks = self.manager.list().into_iter().map(convert::task_status).collect();
        Ok(Response::new(worker::ListTasksResponse { tasks }))
    }

    async fn fetch_task_logs(
        &self,
        request: Request<worker::FetchTaskLogsRequest>,
    ) -> Result<Response<worker::FetchTaskLogsResponse>, Status> {
        let req = request.into_inner();
        let filter = convert::log_filter(req.filter).map_err(to_status)?;
        let lines = match self.manager.logs(&req.task_id, filter).await {
            Ok(lines) => lines,
            // Iris's worker answers an empty list: its controller asks for the logs of tasks a
            // restarted worker no longer knows.
            Err(crate::task::TaskError::NotFound(_)) => Vec::new(),
            Err(e) => return Err(to_status(e)),
        };
        Ok(Response::new(worker::FetchTaskLogsResponse { logs: lines.into_iter().map(convert::log_entry).collect() }))
    }

    async fn kill_task(&self, request: Request<worker::KillTaskRequest>) -> Result<Response<Empty>, Status> {
        let req = request.into_inner();
        if req.term_timeout_ms < 0 {
            return Err(Status::invalid_argument("invalid term_timeout_ms: must not be negative"));
        }
        self.manager.kill(&req.task_id, req.term_timeout_ms as u64).map_err(to_status)?;
        Ok(Response::new(Empty {}))
    }

    async fn health_check(&self, _request: Request<Empty>) -> Result<Response<worker::HealthResponse>, Status> {
        let h = self.manager.health();
        Ok(Response::new(worker::HealthResponse {
            healthy: true,
            uptime_ms: h.uptime_ms,
            running_tasks: h.running_tasks as i32,
            task_isolation: h.task_isolation,
            disk_pressure: h.disk_pressure.unwrap_or_default(),
        }))
    }
}
