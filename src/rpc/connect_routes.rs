//! WorkerService over Connect: each method's request and response names, for the generic
//! Connect routes of [`iris_wire::connect`].

use axum::Router;
use tonic::{Code, Status};

use super::WorkerServiceImpl;
use crate::proto::worker_service_server::WorkerService;
use iris_wire::connect::{Codec, ConnectService, connect_router, unary};

/// The Connect routes of WorkerService.
pub fn worker_router(service: WorkerServiceImpl) -> Router {
    connect_router(service)
}

impl ConnectService for WorkerServiceImpl {
    const NAME: &'static str = "iris.cluster.WorkerService";

    async fn call(&self, method: &str, codec: Codec, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        dispatch(self.clone(), method, codec, body).await
    }
}

async fn dispatch(svc: WorkerServiceImpl, method: &str, codec: Codec, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    const P: &str = "iris.cluster.";
    let name = |n: &str| format!("{P}{n}");
    let s = &svc;
    match method {
        "RunTask" => {
            unary(codec, &name("Worker.RunTaskRequest"), &name("Worker.RunTaskResponse"), &body, |r| s.run_task(r))
                .await
        }
        "GetTaskStatus" => {
            unary(codec, &name("Worker.GetTaskStatusRequest"), &name("TaskStatus"), &body, |r| s.get_task_status(r))
                .await
        }
        "ListTasks" => {
            unary(codec, &name("Worker.ListTasksRequest"), &name("Worker.ListTasksResponse"), &body, |r| {
                s.list_tasks(r)
            })
            .await
        }
        "FetchTaskLogs" => {
            unary(codec, &name("Worker.FetchTaskLogsRequest"), &name("Worker.FetchTaskLogsResponse"), &body, |r| {
                s.fetch_task_logs(r)
            })
            .await
        }
        "KillTask" => unary(codec, &name("Worker.KillTaskRequest"), &name("Empty"), &body, |r| s.kill_task(r)).await,
        "HealthCheck" => {
            unary(codec, &name("Empty"), &name("Worker.HealthResponse"), &body, |r| s.health_check(r)).await
        }
        other => Err(Status::new(Code::Unimplemented, format!("no method {other:?} in iris.cluster.WorkerService"))),
    }
}
