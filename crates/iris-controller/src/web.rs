//! The controller's pages on its port: `/` (jobs with their task counts, workers with health
//! and load, endpoints), `/job/<id>` (its tasks, each linking to its worker's task page), and
//! `/api/controller` (the same as JSON). Server-rendered with the worker dashboard's
//! stylesheet, refreshed every 2 s; every value is HTML-escaped.

use std::fmt::Write;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Controller;
use super::model::now_ms;
use iris_wire::proto::{JobState, TaskState};
use iris_wire::text::escape;

const STYLE: &str = include_str!("../../../src/web/assets/style.css");
const CSP: &str = "default-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
                   frame-ancestors 'none'";

pub fn router(c: Controller) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/job/{*id}", get(job))
        .route("/api/controller", get(api))
        .route("/bundles/{name}", get(bundle))
        .route("/assets/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }))
        .route("/health", get(|| async { "ok" }))
        .with_state(c)
}

/// `GET /bundles/<sha256>.zip`: an inline bundle a job was launched with (see
/// [`super::bundles`]), streamed from disk.
async fn bundle(State(c): State<Controller>, Path(name): Path<String>) -> Response {
    let Some(sha) = super::bundles::BlobStore::sha_of_name(&name) else {
        return (StatusCode::NOT_FOUND, "no such bundle").into_response();
    };
    match tokio::fs::File::open(c.blobs().path(sha)).await {
        Ok(file) => {
            let len = file.metadata().await.map(|m| m.len()).ok();
            let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
            let mut resp = ([(header::CONTENT_TYPE, "application/zip")], body).into_response();
            if let Some(len) = len {
                resp.headers_mut().insert(header::CONTENT_LENGTH, len.into());
            }
            resp
        }
        Err(_) => (StatusCode::NOT_FOUND, "no such bundle").into_response(),
    }
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>{t}</title><link rel=\"stylesheet\" href=\"/assets/style.css\"><link rel=\"icon\" href=\"data:,\"></head>\
         <body class=\"list-page\"><header class=\"top\"><a class=\"brand\" href=\"/\">iris controller</a>\
         <span class=\"worker-id\">{t}</span></header><main>{body}</main>\
         <footer>iris-worker {v} · refreshes every 2 s</footer></body></html>",
        t = escape(title),
        v = env!("CARGO_PKG_VERSION"),
    );
    let mut resp = (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn job_state(s: i32) -> &'static str {
    JobState::try_from(s).map(|s| s.as_str_name().trim_start_matches("JOB_STATE_")).unwrap_or("UNKNOWN")
}

fn task_state(s: i32) -> &'static str {
    TaskState::try_from(s).map(|s| s.as_str_name().trim_start_matches("TASK_STATE_")).unwrap_or("UNKNOWN")
}

fn badge(state: &str) -> String {
    format!("<span class=\"state state-{state}\">{state}</span>")
}

fn figure(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = write!(
        out,
        "<div class=\"figure\"><span class=\"label\">{label}</span><span class=\"value\">{value}</span></div>"
    );
}

async fn index(State(c): State<Controller>) -> Response {
    let body = c.read(|s| {
        let mut out = String::new();
        let healthy = s.workers.values().filter(|w| w.rec.healthy).count();
        let running = s.jobs.values().filter(|j| j.rec.state == JobState::Running).count();
        out.push_str("<section class=\"figures\">");
        figure(&mut out, "jobs", s.jobs.len());
        figure(&mut out, "running jobs", running);
        figure(&mut out, "workers", format!("{healthy}/{}", s.workers.len()));
        figure(&mut out, "endpoints", s.endpoints.len());
        figure(&mut out, "uptime", format!("{} s", c.uptime().as_secs()));
        out.push_str("</section><h2>Jobs</h2><div class=\"table-wrap\"><table><thead><tr><th>job</th><th>state</th>\
                      <th class=\"num\">tasks</th><th class=\"num\">pending</th><th class=\"num\">running</th>\
                      <th class=\"num\">succeeded</th><th class=\"num\">failed</th><th>error / status</th></tr></thead><tbody>");
        let mut jobs: Vec<_> = s.jobs.values().collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.rec.submitted_ms));
        for j in jobs {
            let st = s.job_status(j, false);
            let note = if st.error.is_empty() { &st.status_message } else { &st.error };
            let _ = write!(
                out,
                "<tr><td class=\"id\"><a href=\"/job/{id}\">{id}</a></td><td>{state}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"error-text\">{}</td></tr>",
                st.num_tasks,
                st.tasks_pending,
                st.tasks_running,
                st.tasks_succeeded,
                st.tasks_failed,
                escape(note),
                id = escape(&st.job_id),
                state = badge(job_state(st.state)),
            );
        }
        out.push_str("</tbody></table></div><h2>Workers</h2><div class=\"table-wrap\"><table><thead><tr><th>worker</th>\
                      <th>address</th><th>health</th><th class=\"num\">tasks</th><th class=\"num\">CPU used</th>\
                      <th class=\"num\">memory used</th><th class=\"num\">last heartbeat</th><th>attributes</th></tr></thead><tbody>");
        let now = now_ms();
        for w in s.workers.values() {
            let cap = super::scheduler::capacity(&w.metadata);
            let mut attrs: Vec<String> = w
                .metadata
                .attributes
                .iter()
                .map(|(k, v)| match &v.value {
                    Some(iris_wire::proto::attribute_value::Value::StringValue(x)) => format!("{k}={x}"),
                    Some(iris_wire::proto::attribute_value::Value::IntValue(x)) => format!("{k}={x}"),
                    Some(iris_wire::proto::attribute_value::Value::FloatValue(x)) => format!("{k}={x}"),
                    None => k.clone(),
                })
                .collect();
            attrs.sort();
            let _ = write!(
                out,
                "<tr><td class=\"id\"><a href=\"http://{addr}/\">{id}</a></td><td>{addr}</td><td>{health}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{:.1}/{} cores</td><td class=\"num\">{} / {} MiB</td>\
                 <td class=\"num\">{:.1} s ago</td><td>{}</td></tr>",
                w.tasks.len(),
                w.used.cpu_millicores as f64 / 1000.0,
                cap.cpu_millicores / 1000,
                w.used.memory_bytes >> 20,
                cap.memory_bytes >> 20,
                (now - w.rec.last_heartbeat_ms) as f64 / 1000.0,
                escape(&attrs.join(", ")),
                id = escape(&w.rec.worker_id),
                addr = escape(&w.rec.address),
                health = if w.rec.healthy { badge("SUCCEEDED").replace(">SUCCEEDED<", ">healthy<") } else { badge("FAILED").replace(">FAILED<", ">dead<") },
            );
        }
        out.push_str("</tbody></table></div><h2>Endpoints</h2><div class=\"table-wrap\"><table><thead><tr><th>name</th>\
                      <th>address</th><th>job</th><th>id</th></tr></thead><tbody>");
        for e in s.endpoints.values() {
            let _ = write!(
                out,
                "<tr><td class=\"id\">{}</td><td>{}</td><td class=\"id\"><a href=\"/job/{job}\">{job}</a></td><td>{}</td></tr>",
                escape(&e.name),
                escape(&e.address),
                escape(&e.endpoint_id),
                job = escape(&e.job_id),
            );
        }
        out.push_str("</tbody></table></div>");
        out
    });
    page(StatusCode::OK, "cluster", &body)
}

async fn job(State(c): State<Controller>, Path(id): Path<String>) -> Response {
    let body = c.read(|s| {
        let job = s.jobs.get(&id)?;
        let st = s.job_status(job, true);
        let mut out = format!(
            "<div class=\"task-head\"><h1>{}</h1>{}</div><p class=\"message\">{}</p>",
            escape(&st.job_id),
            badge(job_state(st.state)),
            escape(if st.error.is_empty() { &st.status_message } else { &st.error })
        );
        out.push_str("<div class=\"table-wrap\"><table><thead><tr><th>task</th><th>state</th><th>worker</th>\
                      <th class=\"num\">attempt</th><th class=\"num\">exit</th><th>error</th></tr></thead><tbody>");
        for t in &st.tasks {
            let worker = if t.worker_address.is_empty() {
                escape(&t.worker_id)
            } else {
                format!(
                    "<a href=\"http://{a}/task/{tid}\">{w}</a>",
                    a = escape(&t.worker_address),
                    tid = escape(&t.task_id),
                    w = escape(&t.worker_id)
                )
            };
            let _ = write!(
                out,
                "<tr><td class=\"id\">{}</td><td>{}</td><td>{worker}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"error-text\">{}</td></tr>",
                escape(&t.task_id),
                badge(task_state(t.state)),
                t.current_attempt_id,
                t.exit_code,
                escape(&t.error),
            );
        }
        out.push_str("</tbody></table></div>");
        Some(out)
    });
    match body {
        Some(b) => page(StatusCode::OK, &id, &b),
        None => page(StatusCode::NOT_FOUND, &id, "<p class=\"empty\">no such job</p>"),
    }
}

async fn api(State(c): State<Controller>) -> Response {
    let v = c.read(|s| {
        serde_json::json!({
            "jobs": s.jobs.values().map(|j| {
                let st = s.job_status(j, false);
                serde_json::json!({"job_id": st.job_id, "state": job_state(st.state), "num_tasks": st.num_tasks,
                    "pending": st.tasks_pending, "running": st.tasks_running, "succeeded": st.tasks_succeeded,
                    "failed": st.tasks_failed, "error": st.error})
            }).collect::<Vec<_>>(),
            "workers": s.workers.values().map(|w| serde_json::json!({"worker_id": w.rec.worker_id,
                "address": w.rec.address, "healthy": w.rec.healthy, "tasks": w.tasks.len(),
                "last_heartbeat_ms": w.rec.last_heartbeat_ms,
                "disk_pressure": super::scheduler::disk_pressure(w)})).collect::<Vec<_>>(),
            "endpoints": s.endpoints.values().collect::<Vec<_>>(),
        })
    });
    axum::Json(v).into_response()
}
