//! Pages and JSON on the worker's port: `/health`, `/api/tasks`, `/api/task/<id>`, and a
//! plain task list at `/`. Everything that comes from a task is HTML-escaped.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::rpc::connect::Codec;
use crate::task::TaskManager;

/// The web routes over `manager`.
pub fn router(manager: TaskManager) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/api/tasks", get(api_tasks))
        .route("/api/task/{*task_id}", get(api_task))
        .route("/", get(index))
        .with_state(manager)
}

fn json<M: prost::Message>(name: &str, msg: &M) -> Response {
    match Codec::Json.encode(name, msg) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn api_tasks(State(m): State<TaskManager>) -> Response {
    let tasks = m.list().into_iter().map(crate::rpc::task_status_proto).collect();
    json("iris.cluster.Worker.ListTasksResponse", &crate::proto::worker::ListTasksResponse { tasks })
}

async fn api_task(State(m): State<TaskManager>, Path(task_id): Path<String>) -> Response {
    match m.status(&task_id) {
        Ok(v) => json("iris.cluster.TaskStatus", &crate::rpc::task_status_proto(v)),
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

async fn index(State(m): State<TaskManager>) -> Html<String> {
    let h = m.health();
    let mut rows = String::new();
    for t in m.list() {
        let u = t.usage.clone().unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{} MiB</td><td>{} MiB</td><td>{:.0}%</td><td>{}</td><td>{}</td></tr>\n",
            escape(&t.task_id),
            t.state.name(),
            u.memory_bytes >> 20,
            u.memory_peak_bytes >> 20,
            u.cpu_percent,
            u.processes,
            escape(&t.error),
        ));
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>iris-worker {id}</title>\
         <style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;text-align:left}}</style></head><body>\
         <h1>iris-worker {id}</h1><p>{running} running, up {up} s</p>\
         <table><tr><th>task</th><th>state</th><th>memory</th><th>peak</th><th>cpu</th><th>procs</th><th>error</th></tr>\n{rows}</table></body></html>",
        id = escape(m.worker_id()),
        running = h.running_tasks,
        up = h.uptime_ms / 1000,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn html_is_escaped() {
        assert_eq!(
            super::escape("<script>alert('1')</script>&"),
            "&lt;script&gt;alert(&#39;1&#39;)&lt;/script&gt;&amp;"
        );
    }
}
