//! The January-2026 Iris wire (`iris.cluster`; docs/ARCHITECTURE.md, "Wire generations") end
//! to end against a real worker process: the same flow over gRPC, Connect+proto and
//! Connect+JSON (from a hand-written HTTP/1.1 client), Connect error bodies and statuses, gRPC
//! reflection, and the worker's side of a Connect controller (RegisterWorker, ReportTaskState
//! with retry).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use iris_worker::proto::controller::{
    RegisterWorkerRequest, RegisterWorkerResponse, ReportTaskStateRequest, ReportTaskStateResponse,
};
use iris_worker::proto::worker_service_client::WorkerServiceClient;
use iris_worker::proto::{Empty, TaskState as ProtoState, TaskStatus, worker};
use iris_worker::rpc::connect::ConnectClient;
use iris_worker::task::TaskState;
use prost::Message;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const WORKER_SERVICE: &str = "iris.cluster.WorkerService";
const TASK_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// A plain HTTP/1.1 client over std::net::TcpStream (what a minimal Connect client sends).

struct HttpResponse {
    status_line: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("the body is not JSON ({e}): {:?} ({})", String::from_utf8_lossy(&self.body), self.status_line)
        })
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = find(raw, b"\r\n").expect("a chunk size line");
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("a hex chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// POSTs `body` to `path` on `addr` over HTTP/1.1 and reads the whole response.
fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    stream.flush().unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();

    let end =
        find(&raw, b"\r\n\r\n").unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_string();
    assert!(status_line.starts_with("HTTP/1.1 "), "not an HTTP/1.1 answer: {status_line:?}");
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().unwrap();
        assert!(rest.len() >= len, "a short body: {} of {len} bytes", rest.len());
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    HttpResponse { status_line, status, headers, body }
}

/// A Connect JSON call of WorkerService.
fn connect_json(addr: &str, method: &str, body: &Value) -> HttpResponse {
    http_post(
        addr,
        &format!("/{WORKER_SERVICE}/{method}"),
        &[("Content-Type", "application/json"), ("Connect-Protocol-Version", "1")],
        body.to_string().as_bytes(),
    )
}

/// The same, with the body gzip-compressed.
fn connect_json_gzip(addr: &str, method: &str, body: &Value) -> HttpResponse {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body.to_string().as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    http_post(
        addr,
        &format!("/{WORKER_SERVICE}/{method}"),
        &[("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Accept-Encoding", "identity")],
        &gz,
    )
}

fn assert_ok(r: &HttpResponse) -> Value {
    assert!(r.status_line.starts_with("HTTP/1.1 200"), "{}: {}", r.status_line, r.body_text());
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    r.json()
}

/// Asserts a Connect error: the HTTP status, `Content-Type: application/json` and the code.
fn assert_connect_error(r: &HttpResponse, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}: {}", r.status_line, r.body_text());
    assert_eq!(r.header("content-type"), Some("application/json"), "{}", r.body_text());
    let v = r.json();
    assert_eq!(v["code"], code, "{v}");
    v["message"].as_str().unwrap_or_else(|| panic!("no message in {v}")).to_string()
}

/// Polls `f` until it returns Some, or panics after `within`.
async fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() <= deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn has_line(lines: &[worker::LogEntry], want: &str) -> bool {
    lines.iter().any(|l| l.data.trim_end() == want && l.source == "stdout")
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn grpc_connect_proto_and_connect_json_run_the_same_flow() {
    let w = Worker::start("wire-flow", &[]).await;

    // (a) gRPC.
    let mut c = w.client().await;
    let id = "wire-grpc/task-0";
    let resp = c.run_task(sh(id, "echo hello-over-grpc")).await.unwrap().into_inner();
    assert_eq!(resp.task_id, id);
    let s = wait_for(&mut c, id, TASK_TIMEOUT, |s| state_of(s).is_terminal()).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{}", w.logs());
    assert_eq!(s.job_id, "wire-grpc");
    let lines = all_logs(&mut c, id).await;
    assert!(has_line(&lines, "hello-over-grpc"), "{lines:?}");

    // (b) Connect, application/proto.
    let cc = ConnectClient::new(&format!("http://{}", w.addr()));
    let t = Duration::from_secs(10);
    let id = "wire-proto/task-0";
    let resp: worker::RunTaskResponse =
        cc.call(WORKER_SERVICE, "RunTask", &sh(id, "echo hello-over-connect-proto"), t).await.unwrap();
    assert_eq!(resp.task_id, id);
    let deadline = Instant::now() + TASK_TIMEOUT;
    let s = loop {
        let req = worker::GetTaskStatusRequest { task_id: id.into(), include_result: false };
        let s: TaskStatus = cc.call(WORKER_SERVICE, "GetTaskStatus", &req, t).await.unwrap();
        if state_of(&s).is_terminal() {
            break s;
        }
        assert!(Instant::now() < deadline, "{id} did not end: {s:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(s.state, ProtoState::Succeeded as i32, "{s:?}\n{}", w.logs());
    assert_eq!(s.exit_code, 0);
    let req = worker::FetchTaskLogsRequest { task_id: id.into(), filter: None };
    let logs: worker::FetchTaskLogsResponse = cc.call(WORKER_SERVICE, "FetchTaskLogs", &req, t).await.unwrap();
    assert!(has_line(&logs.logs, "hello-over-connect-proto"), "{:?}", logs.logs);

    // (c) Connect, application/json, from a plain HTTP/1.1 client.
    let addr = w.addr();
    let id = "wire-json/task-0";
    let run = json!({
        "jobId": "wire-json",
        "taskId": id,
        "numTasks": 1,
        "command": { "argv": ["/bin/sh", "-c", "echo hello-over-connect-json"] },
        "resources": {},
    });
    let v = assert_ok(&connect_json(&addr, "RunTask", &run));
    assert_eq!(v["taskId"], id, "{v}");
    assert!(v["state"].as_str().is_some_and(|s| s.starts_with("TASK_STATE_")), "enums are names: {v}");
    let status = poll("the JSON task ends", TASK_TIMEOUT, || {
        let v = assert_ok(&connect_json(&addr, "GetTaskStatus", &json!({ "taskId": id })));
        let state = v["state"].as_str().unwrap_or("").to_string();
        matches!(
            state.as_str(),
            "TASK_STATE_SUCCEEDED" | "TASK_STATE_FAILED" | "TASK_STATE_KILLED" | "TASK_STATE_WORKER_FAILED"
        )
        .then_some(v)
    })
    .await;
    assert_eq!(status["state"], "TASK_STATE_SUCCEEDED", "{status}\n{}", w.logs());
    assert_eq!(status["taskId"], id);
    assert_eq!(status["jobId"], "wire-json");
    // int64 fields are JSON strings in proto3 JSON.
    for field in ["startedAtMs", "finishedAtMs"] {
        let ms: i64 =
            status[field].as_str().unwrap_or_else(|| panic!("{field} should be a string: {status}")).parse().unwrap();
        assert!(ms > 0, "{field}: {status}");
    }
    let v = assert_ok(&connect_json(&addr, "FetchTaskLogs", &json!({ "taskId": id })));
    let logs = v["logs"].as_array().unwrap_or_else(|| panic!("no logs: {v}"));
    let line = logs
        .iter()
        .find(|l| l["data"].as_str().is_some_and(|d| d.trim_end() == "hello-over-connect-json"))
        .unwrap_or_else(|| panic!("the line is missing: {v}"));
    assert_eq!(line["source"], "stdout");
    assert!(line["timestampMs"].is_string(), "timestampMs is int64: {line}");

    // A gzip-compressed JSON request (with a filter; int64 maxLines sent as a string).
    let v = assert_ok(&connect_json_gzip(
        &addr,
        "FetchTaskLogs",
        &json!({ "taskId": id, "filter": { "regex": "hello-over", "maxLines": "10" } }),
    ));
    let logs = v["logs"].as_array().unwrap_or_else(|| panic!("no logs: {v}"));
    assert_eq!(logs.len(), 1, "{v}");
    assert_eq!(logs[0]["data"].as_str().map(str::trim_end), Some("hello-over-connect-json"));
    let v = assert_ok(&connect_json_gzip(&addr, "GetTaskStatus", &json!({ "taskId": id })));
    assert_eq!(v["state"], "TASK_STATE_SUCCEEDED");

    // The three tasks are all visible over each protocol.
    let list = c.list_tasks(worker::ListTasksRequest {}).await.unwrap().into_inner();
    for id in ["wire-grpc/task-0", "wire-proto/task-0", "wire-json/task-0"] {
        assert!(list.tasks.iter().any(|t| t.task_id == id), "{id} not listed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn connect_errors_are_json_with_http_status() {
    let w = Worker::start("wire-errors", &[]).await;
    let addr = w.addr();

    // Connect (JSON over a plain HTTP/1.1 client).
    let r = connect_json(&addr, "GetTaskStatus", &json!({ "taskId": "wire-errors-nope/task-0" }));
    assert_connect_error(&r, 404, "not_found");

    let no_id = json!({ "jobId": "wire-errors", "taskId": "", "command": { "argv": ["true"] } });
    let msg = assert_connect_error(&connect_json(&addr, "RunTask", &no_id), 400, "invalid_argument");
    assert!(msg.contains("task_id"), "{msg}");

    let once = json!({ "jobId": "wire-errors", "taskId": "wire-errors/task-0", "command": { "argv": ["true"] } });
    assert_ok(&connect_json(&addr, "RunTask", &once));
    let msg = assert_connect_error(&connect_json(&addr, "RunTask", &once), 409, "already_exists");
    assert!(msg.contains("wire-errors/task-0"), "{msg}");

    // gRPC.
    let mut c = w.client().await;
    let expect_invalid = |r: Result<tonic::Response<worker::RunTaskResponse>, tonic::Status>, field: &str| {
        let e = r.expect_err("the request should be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field:?} not named in {:?}", e.message());
    };

    let mut req = sh("wire-errors-a/task-0", "true");
    req.job_id = String::new();
    expect_invalid(c.run_task(req).await, "job_id");

    let mut req = sh("wire-errors-b/task-0", "true");
    req.command = None;
    expect_invalid(c.run_task(req).await, "command");

    let mut req = sh("wire-errors-c/task-0", "true");
    req.ports = vec!["bad-name".into()];
    expect_invalid(c.run_task(req).await, "ports[0]");

    let mut req = sh("wire-errors-d/task-0", "true");
    req.workdir_files.insert("../x".into(), b"x".to_vec());
    expect_invalid(c.run_task(req).await, "workdir_files");

    let mut req = sh("wire-errors-e/task-0", "true");
    req.resources.get_or_insert_default().memory_bytes = -1;
    expect_invalid(c.run_task(req).await, "resources.memory_bytes");

    let e = c
        .kill_task(worker::KillTaskRequest { task_id: "wire-errors-nope/task-0".into(), term_timeout_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Logs of a task this worker does not know: an empty list, as Iris's worker answers (its
    // controller asks a restarted worker for tasks it forgot).
    let logs = c
        .fetch_task_logs(worker::FetchTaskLogsRequest { task_id: "wire-errors-nope/task-0".into(), filter: None })
        .await
        .unwrap()
        .into_inner()
        .logs;
    assert!(logs.is_empty(), "{logs:?}");
    // KillTask of a task that already ended: FAILED_PRECONDITION with Iris's words.
    wait_end(&mut c, "wire-errors/task-0", TASK_TIMEOUT).await;
    let e = c
        .kill_task(worker::KillTaskRequest { task_id: "wire-errors/task-0".into(), term_timeout_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(e.message(), "Task wire-errors/task-0 already completed with state TASK_STATE_SUCCEEDED");

    // None of the refused requests left a task behind, and the worker is fine.
    let list = c.list_tasks(worker::ListTasksRequest {}).await.unwrap().into_inner();
    let ids: Vec<&str> = list.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, vec!["wire-errors/task-0"]);
    let h = c.health_check(Empty {}).await.unwrap().into_inner();
    assert!(h.healthy);
    let v = assert_ok(&connect_json(&addr, "HealthCheck", &json!({})));
    assert_eq!(v["healthy"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn reflection_lists_the_worker_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let w = Worker::start("wire-reflection", &[]).await;
    let channel = Channel::from_shared(format!("http://{}", w.addr())).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a ListServices answer: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"iris.cluster.WorkerService"), "{names:?}");

    // The generated gRPC client still works on the same port afterwards.
    let mut c: WorkerServiceClient<Channel> = w.client().await;
    assert!(c.health_check(Empty {}).await.unwrap().into_inner().healthy);
}

// ---------------------------------------------------------------------------------------
// A Connect controller in the test.

#[derive(Default)]
struct FakeController {
    registers: Mutex<Vec<RegisterWorkerRequest>>,
    /// The Content-Type of every call.
    content_types: Mutex<Vec<String>>,
    /// ReportTaskState calls that were answered OK, in arrival order.
    reports: Mutex<Vec<ReportTaskStateRequest>>,
    /// ReportTaskState calls that were answered with an error.
    refused: Mutex<Vec<ReportTaskStateRequest>>,
    /// How many ReportTaskState calls to refuse first.
    refuse_first: AtomicUsize,
}

fn proto_response(msg: &impl Message) -> Response {
    ([(header::CONTENT_TYPE, "application/proto")], msg.encode_to_vec()).into_response()
}

fn connect_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "code": code, "message": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn record_content_type(ctl: &FakeController, headers: &HeaderMap) {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("(none)");
    ctl.content_types.lock().unwrap().push(ct.to_string());
}

async fn register_worker(State(ctl): State<Arc<FakeController>>, headers: HeaderMap, body: Bytes) -> Response {
    record_content_type(&ctl, &headers);
    let Ok(req) = RegisterWorkerRequest::decode(body) else {
        return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "undecodable RegisterWorkerRequest");
    };
    ctl.registers.lock().unwrap().push(req);
    proto_response(&RegisterWorkerResponse { accepted: true, controller_address: String::new(), should_reset: false })
}

async fn report_task_state(State(ctl): State<Arc<FakeController>>, headers: HeaderMap, body: Bytes) -> Response {
    record_content_type(&ctl, &headers);
    let Ok(req) = ReportTaskStateRequest::decode(body) else {
        return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "undecodable ReportTaskStateRequest");
    };
    let refuse = ctl.refuse_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    if refuse {
        ctl.refused.lock().unwrap().push(req);
        return connect_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the controller is busy");
    }
    ctl.reports.lock().unwrap().push(req);
    proto_response(&ReportTaskStateResponse {})
}

/// Serves a fake controller on 127.0.0.1; returns its port.
async fn start_controller(ctl: Arc<FakeController>) -> u16 {
    let app = axum::Router::new()
        .route("/iris.cluster.ControllerService/RegisterWorker", post(register_worker))
        .route("/iris.cluster.ControllerService/ReportTaskState", post(report_task_state))
        .with_state(ctl);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    port
}

/// For `task_id`: the index of its first RUNNING report and of its terminal report (the
/// last report of the task), once the terminal one has arrived.
fn running_then_end(reports: &[ReportTaskStateRequest], task_id: &str) -> Option<(usize, usize)> {
    let mine: Vec<(usize, &ReportTaskStateRequest)> =
        reports.iter().enumerate().filter(|(_, r)| r.task_id == task_id).collect();
    let terminal =
        [ProtoState::Succeeded, ProtoState::Failed, ProtoState::Killed, ProtoState::WorkerFailed].map(|s| s as i32);
    let (end, _) = mine.iter().find(|(_, r)| terminal.contains(&r.state))?;
    let (running, _) = mine.iter().find(|(_, r)| r.state == ProtoState::Running as i32)?;
    Some((*running, *end))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn worker_registers_and_reports_states_to_a_controller() {
    let ctl = Arc::new(FakeController { refuse_first: AtomicUsize::new(2), ..Default::default() });
    let port = start_controller(ctl.clone()).await;
    let url = format!("http://127.0.0.1:{port}");
    let w = Worker::start("wire-controller", &["--controller", &url]).await;

    // Registration: the worker's id and the port of its WorkerService.
    let reg = poll("a RegisterWorker from the worker", Duration::from_secs(20), || {
        ctl.registers.lock().unwrap().iter().find(|r| r.worker_id == w.name).cloned()
    })
    .await;
    // Listening on 127.0.0.1 (no --advertise-host), it registers the address it listens on:
    // the only one a controller on this host can reach it at.
    assert_eq!(reg.address, format!("127.0.0.1:{}", w.port), "{reg:?}");
    assert!(reg.metadata.is_some(), "{reg:?}");

    // Two tasks: one succeeds after a second, one fails with exit code 3.
    let mut c = w.client().await;
    let ok_id = "wire-ctl-ok/task-0";
    let fail_id = "wire-ctl-fail/task-0";
    let mut ok = sh(ok_id, "echo advertise=$IRIS_ADVERTISE_HOST; sleep 1; exit 0");
    ok.attempt_id = 1;
    let mut fail = sh(fail_id, "exit 3");
    fail.attempt_id = 2;
    c.run_task(ok).await.unwrap();
    c.run_task(fail).await.unwrap();

    let reports = poll("RUNNING and terminal reports of both tasks", Duration::from_secs(60), || {
        let reports = ctl.reports.lock().unwrap().clone();
        (running_then_end(&reports, ok_id).is_some() && running_then_end(&reports, fail_id).is_some())
            .then_some(reports)
    })
    .await;
    let dump = || format!("{reports:#?}\nrefused: {:#?}\n{}", ctl.refused.lock().unwrap(), w.logs());

    for (id, job, attempt, state, exit_code) in
        [(ok_id, "wire-ctl-ok", 1, ProtoState::Succeeded, 0), (fail_id, "wire-ctl-fail", 2, ProtoState::Failed, 3)]
    {
        let (running, end) = running_then_end(&reports, id).unwrap();
        assert!(running < end, "{id}: RUNNING must come before the end\n{}", dump());
        let r = &reports[end];
        assert_eq!(r.state, state as i32, "{id}\n{}", dump());
        assert_eq!(r.exit_code, exit_code, "{id}\n{}", dump());
        assert!(r.finished_at_ms > 0, "{id}\n{}", dump());
        for r in reports.iter().filter(|r| r.task_id == id) {
            assert_eq!(r.worker_id, w.name, "{}", dump());
            assert_eq!(r.job_id, job, "{}", dump());
            assert_eq!(r.attempt_id, attempt, "{}", dump());
        }
        // Nothing is reported after the terminal state.
        assert!(reports[end + 1..].iter().all(|r| r.task_id != id), "{id}: a report after the end\n{}", dump());
        // One report per state change, though BUILDING has two phases (two status messages).
        let states: Vec<i32> = reports.iter().filter(|r| r.task_id == id).map(|r| r.state).collect();
        assert_eq!(states, [ProtoState::Building as i32, ProtoState::Running as i32, state as i32], "{id}\n{}", dump());
    }

    // Retry: the two refused calls happened, and each refused report was delivered later.
    let refused = ctl.refused.lock().unwrap().clone();
    assert_eq!(refused.len(), 2, "{}", dump());
    for r in &refused {
        assert!(reports.contains(r), "the refused report {r:?} was never delivered\n{}", dump());
    }

    // Every call was Connect with application/proto.
    let cts = ctl.content_types.lock().unwrap().clone();
    assert!(cts.iter().all(|ct| ct == "application/proto"), "{cts:?}");

    // The worker's own view agrees.
    let s = wait_end(&mut c, fail_id, TASK_TIMEOUT).await;
    assert_eq!((state_of(&s), s.exit_code), (TaskState::Failed, 3));
    // Tasks are told the same address the worker advertises.
    let out: Vec<String> = all_logs(&mut c, ok_id).await.into_iter().map(|l| l.data).collect();
    assert_eq!(out, ["advertise=127.0.0.1"]);
}
