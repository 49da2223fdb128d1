//! The web side of a real worker over plain HTTP: the JSON API with task ids that contain `/`
//! and HTML, the pages' escaping, a 1,000,000-line log paged through `/api/logs` and followed
//! through `/api/events/task`, and `/metrics` parsed with a Prometheus text-format parser and
//! checked against a known task and known RPC calls.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use iris_worker::proto::worker;
use iris_worker::task::TaskState;
use serde_json::Value;

const TASK_TIMEOUT: Duration = Duration::from_secs(60);

struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(raw, b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).split(';').next().unwrap().trim(), 16)
            .expect("a chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
    out
}

/// `GET path` over HTTP/1.1 with `Connection: close`, read to the end.
fn get(addr: &str, path: &str) -> Http {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = find(&raw, b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Http { status, headers, body }
}

/// A task id in a URL path, each `/`-separated part percent-encoded.
fn path_of(task_id: &str) -> String {
    task_id
        .split('/')
        .map(|part| {
            part.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
#[ignore = "root: runs containers"]
async fn api_routes_take_task_ids_with_slashes_and_pages_escape_them() {
    let w = Worker::start("web-api", &[]).await;
    let mut c = w.client().await;
    let id = "web job/<b>task</b> \"0\"/x";
    c.run_task(sh(id, "echo '<script>alert(1)</script>'; echo err >&2; exec sleep 600")).await.unwrap();
    c.run_task(sh("web/done", "echo done")).await.unwrap();
    wait_for(&mut c, id, TASK_TIMEOUT, |s| state_of(s) == TaskState::Running).await;
    wait_end(&mut c, "web/done", TASK_TIMEOUT).await;
    let p = path_of(id);

    let r = get(&w.addr(), &format!("/api/task/{p}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["taskId"], id);
    assert_eq!(j["state"], "TASK_STATE_RUNNING");
    assert!(j["buildMetrics"]["buildStartedMs"].as_str().is_some(), "{j}");

    // Iris's worker routes, in Iris's shapes: /api/tasks is a plain list.
    let all = get(&w.addr(), "/api/tasks").json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let running = get(&w.addr(), "/api/tasks?state=RUNNING").json();
    assert_eq!(running.as_array().unwrap().len(), 1, "{running}");
    let row = &running[0];
    assert_eq!((row["task_id"].as_str(), row["status"].as_str()), (Some(id), Some("TASK_STATE_RUNNING")), "{row}");
    for key in [
        "job_id",
        "task_index",
        "attempt_id",
        "started_at",
        "finished_at",
        "exit_code",
        "error",
        "memory_mb",
        "memory_peak_mb",
        "cpu_percent",
        "process_count",
        "disk_mb",
        "build_from_cache",
        "image_tag",
    ] {
        assert!(row.get(key).is_some(), "{key} in {row}");
    }
    let stats = get(&w.addr(), "/api/stats").json();
    assert_eq!(stats, serde_json::json!({"running": 1, "pending": 0, "building": 0, "completed": 1}));
    let one = get(&w.addr(), &format!("/api/tasks/{p}")).json();
    assert_eq!((one["task_id"].as_str(), one["attempt_id"].as_i64()), (Some(id), Some(0)), "{one}");
    assert!(one["resources"]["memory_mb"].is_i64() && one["build"]["duration_ms"].is_i64(), "{one}");
    assert!(one["ports"].is_object(), "{one}");
    let done = get(&w.addr(), "/api/tasks/web/done/logs").json();
    assert_eq!(done[0]["data"], "done", "{done}");
    assert_eq!((done[0]["source"].as_str(), done[0]["timestamp"].is_i64()), (Some("stdout"), true), "{done}");
    assert_eq!(get(&w.addr(), "/api/tasks/web/done/logs?source=stderr").json(), serde_json::json!([]));
    // Unknown: 404 {"error": "Not found"} for the task, no lines for its logs (as Iris answers).
    let r = get(&w.addr(), "/api/tasks/no/such/task");
    assert_eq!((r.status, r.json()), (404, serde_json::json!({"error": "Not found"})));
    assert_eq!(get(&w.addr(), "/api/tasks/no/such/task/logs").json(), serde_json::json!([]));

    // The log as the proto's JSON, with the stdout filter; the line count in a header.
    let deadline = Instant::now() + TASK_TIMEOUT;
    let r = loop {
        let r = get(&w.addr(), &format!("/api/logs/{p}?source=stdout"));
        if r.json()["logs"].as_array().is_some_and(|l| !l.is_empty()) || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.json()["logs"][0]["data"], "<script>alert(1)</script>");
    assert_eq!(r.json()["logs"].as_array().unwrap().len(), 1);
    assert_eq!(r.header("x-iris-log-lines"), Some("2"));

    let stats = get(&w.addr(), &format!("/api/stats/{p}")).json();
    assert_eq!(stats["taskId"], id);
    assert_eq!(stats["state"], "RUNNING");
    assert!(stats["usage"]["memoryBytes"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["history"]["intervalMs"], 1000);

    let worker = get(&w.addr(), "/api/worker").json();
    assert_eq!(worker["workerId"], w.name.as_str());
    assert_eq!(worker["tasks"]["RUNNING"], 1);
    assert_eq!(worker["tasks"]["SUCCEEDED"], 1);
    assert!(worker["host"]["memoryTotalBytes"].as_u64().unwrap() > 0);

    // The page: the id escaped, no inline script, a CSP that forbids one.
    let page = get(&w.addr(), &format!("/task/{p}"));
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("web job/&lt;b&gt;task&lt;/b&gt; &quot;0&quot;/x"), "{html}");
    assert!(!html.contains("<b>task"), "{html}");
    assert!(page.header("content-security-policy").is_some_and(|c| c.contains("script-src 'self'")));
    assert_eq!(get(&w.addr(), "/").status, 200);
    assert_eq!(get(&w.addr(), "/assets/task.js").status, 200);
    assert_eq!(get(&w.addr(), "/health").text(), "ok\n");

    // Errors: Connect's error JSON with the status of the code.
    let r = get(&w.addr(), "/api/task/no/such/task");
    assert_eq!((r.status, r.json()["code"].as_str()), (404, Some("not_found")));
    assert_eq!(get(&w.addr(), "/task/no/such/task").status, 404);
    let r = get(&w.addr(), &format!("/api/logs/{p}?regex=%28"));
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("invalid_argument")));
    assert!(r.json()["message"].as_str().unwrap().contains("filter.regex"));
    let r = get(&w.addr(), &format!("/api/logs/{p}?source=nope"));
    assert_eq!(r.status, 400);

    c.kill_task(worker::KillTaskRequest { task_id: id.into(), term_timeout_ms: 500 }).await.unwrap();
    wait_end(&mut c, id, TASK_TIMEOUT).await;
}

#[tokio::test]
#[ignore = "root: runs containers"]
async fn a_million_line_log_is_paged_and_followed_without_reading_it_whole() {
    let w = Worker::start("web-logs", &[]).await;
    let mut c = w.client().await;
    let id = "big/task-0";
    c.run_task(sh(id, "seq 0 999999; echo the-end >&2")).await.unwrap();
    let s = wait_end(&mut c, id, Duration::from_secs(120)).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    let lines = |r: &Http| -> Vec<(u64, String)> {
        r.json()["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["lineNumber"].as_str().unwrap_or("0").parse().unwrap(), e["data"].as_str().unwrap().into()))
            .collect()
    };
    let timed = |path: &str| {
        let t = Instant::now();
        let r = get(&w.addr(), path);
        (r, t.elapsed())
    };
    const WHOLE: &str = "-1000000000000000";

    // The tail the page opens with.
    let (r, took) = timed(&format!("/api/logs/{id}?start_line={WHOLE}&max_lines=500"));
    assert_eq!(r.header("x-iris-log-lines"), Some("1000001"));
    let tail = lines(&r);
    assert_eq!(tail.len(), 500);
    assert_eq!(tail.first().unwrap().0, 999_501);
    assert_eq!(tail.last().unwrap(), &(1_000_000, "the-end".to_string()));
    assert!(took < Duration::from_secs(1), "the tail took {took:?}");

    // Iris's route returns every line (FetchTaskLogs pages by 10,000): here up to 100,000, so
    // even this log's answer stays bounded; `tail` gives the last lines, as Iris's does.
    let iris: Vec<String> = get(&w.addr(), &format!("/api/tasks/{id}/logs"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!((iris.len(), iris[0].as_str(), iris[99_999].as_str()), (100_000, "0", "99999"));
    let tail = get(&w.addr(), &format!("/api/tasks/{id}/logs?tail=2")).json();
    let tail: Vec<&str> = tail.as_array().unwrap().iter().filter_map(|l| l["data"].as_str()).collect();
    assert_eq!(tail, ["999999", "the-end"]);

    // The page before it, then the first page.
    let (r, took) = timed(&format!("/api/logs/{id}?start_line={WHOLE}&end_line=999501&max_lines=500"));
    let older = lines(&r);
    assert_eq!((older.len(), older[0].0, older[499].0), (500, 999_001, 999_500));
    assert_eq!(older[0].1, "999001");
    assert!(took < Duration::from_secs(1), "an older page took {took:?}");
    let first = lines(&get(&w.addr(), &format!("/api/logs/{id}?start_line=0&max_lines=500")));
    assert_eq!((first[0].0, first[0].1.as_str(), first.len()), (0, "0", 500));

    // A search over the whole log, newest matches first, and a source tab.
    let (r, took) = timed(&format!("/api/logs/{id}?start_line={WHOLE}&max_lines=500&regex=%5E12345%5Cd%24"));
    let found = lines(&r);
    assert_eq!(
        found.iter().map(|l| l.1.as_str()).collect::<Vec<_>>(),
        (123450..123460).map(|n| n.to_string()).collect::<Vec<_>>().iter().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    assert!(took < Duration::from_secs(10), "a regex over a million lines took {took:?}");
    let stderr = lines(&get(&w.addr(), &format!("/api/logs/{id}?start_line={WHOLE}&max_lines=500&source=stderr")));
    assert_eq!(stderr, vec![(1_000_000, "the-end".to_string())]);

    // Without max_lines, one page of at most 10,000 lines, never the whole log.
    assert_eq!(lines(&get(&w.addr(), &format!("/api/logs/{id}"))).len(), 10_000);

    // Following from near the end: the last lines, then `end` (the attempt is over).
    let (r, took) = timed(&format!("/api/events/task/{id}?after=999998"));
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = sse_events(&r.text());
    let logs: Vec<&Value> = events.iter().filter(|(e, _)| e == "logs").map(|(_, d)| d).collect();
    assert_eq!(logs.len(), 1, "{events:?}");
    assert_eq!(logs[0]["lines"].as_array().unwrap().len(), 3);
    assert_eq!(logs[0]["lines"][2][3], "the-end");
    assert_eq!(logs[0]["next"], 1_000_001);
    let status = events.iter().find(|(e, _)| e == "status").map(|(_, d)| d).expect("a status event");
    assert_eq!((status["state"].as_str(), status["logLines"].as_u64()), (Some("SUCCEEDED"), Some(1_000_001)));
    assert_eq!(events.last().map(|(e, _)| e.as_str()), Some("end"));

    // A viewer far behind skips ahead to the last 5,000 lines.
    let events = sse_events(&get(&w.addr(), &format!("/api/events/task/{id}?after=0")).text());
    let logs: Vec<&Value> = events.iter().filter(|(e, _)| e == "logs").map(|(_, d)| d).collect();
    assert_eq!(logs[0]["skipped"], 1_000_001 - 5000);
    let sent: usize = logs.iter().map(|l| l["lines"].as_array().unwrap().len()).sum();
    assert_eq!(sent, 5000);
}

/// (event, data) of each event of a text/event-stream body.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut event = "message".to_string();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if !data.is_empty() {
            let v = serde_json::from_str(&data).unwrap_or(Value::String(data));
            out.push((event, v));
        }
    }
    out
}

/// The samples of a `/metrics` page: (name, labels) → value; histograms as their buckets.
struct Metrics {
    scrape: prometheus_parse::Scrape,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        // prometheus-parse skips lines it cannot read: make sure there are none.
        let sample = regex::Regex::new(
            r#"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\["\\n])*",?)*\})? [-+0-9.eEInfNa]+$"#,
        )
        .unwrap();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                typed.insert(parts.next().unwrap().to_string());
                assert!(
                    matches!(parts.next(), Some("counter" | "gauge" | "histogram" | "summary" | "untyped")),
                    "{line}"
                );
            } else if !line.starts_with("# HELP ") {
                assert!(sample.is_match(line), "not a Prometheus sample line: {line:?}");
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{name} has no # TYPE line before it");
            }
        }
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        Metrics { scrape }
    }

    fn samples(&self, name: &str) -> Vec<&prometheus_parse::Sample> {
        self.scrape.samples.iter().filter(|s| s.metric == name).collect()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let s = self.samples(name).into_iter().find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        }
    }

    /// The `+Inf` bucket (the count) of a histogram series.
    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let s = self.samples(name).into_iter().find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
        match &s.value {
            prometheus_parse::Value::Histogram(b) => b.iter().find(|h| h.less_than.is_infinite()).map(|h| h.count),
            _ => None,
        }
    }
}

#[tokio::test]
#[ignore = "root: runs containers"]
async fn metrics_parse_and_show_a_known_task_and_the_calls_made() {
    let w = Worker::start("web-metrics", &[]).await;
    let mut c = w.client().await;
    let id = "metrics-job/task-0";
    // 24 MiB in the container's /tmp (tmpfs: charged to the task's memory), two processes
    // (the command and the container's init).
    c.run_task(sh(id, "head -c 25165824 /dev/zero > /tmp/fill; exec sleep 600")).await.unwrap();
    let deadline = Instant::now() + TASK_TIMEOUT;
    loop {
        let s = status(&mut c, id).await;
        if s.resource_usage.as_ref().is_some_and(|u| u.memory_mb >= 24 && u.process_count == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "the task never filled its memory: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrape = |w: &Worker| {
        let r = get(&w.addr(), "/metrics");
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
        Metrics::parse(&r.text())
    };
    let before = scrape(&w);

    // Known calls: 3 GetTaskStatus ok and 2 not_found over gRPC, 1 of each over Connect.
    for _ in 0..3 {
        status(&mut c, id).await;
    }
    for _ in 0..2 {
        let e = c
            .get_task_status(worker::GetTaskStatusRequest { task_id: "nope".into(), include_result: false })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
    let connect = iris_worker::rpc::connect::ConnectClient::new(&w.addr());
    let get_status = |task_id: &str| {
        let req = worker::GetTaskStatusRequest { task_id: task_id.into(), include_result: false };
        let connect = &connect;
        async move {
            connect
                .call::<_, iris_worker::proto::TaskStatus>(
                    "iris.cluster.WorkerService",
                    "GetTaskStatus",
                    &req,
                    Duration::from_secs(10),
                )
                .await
        }
    };
    get_status(id).await.unwrap();
    get_status("nope").await.unwrap_err();
    let after = scrape(&w);

    let calls = |m: &Metrics, code: &str, protocol: &str| {
        let l = [("method", "GetTaskStatus"), ("code", code), ("protocol", protocol)];
        m.value("iris_worker_rpc_requests_total", &l).unwrap_or(0.0)
    };
    assert_eq!(calls(&after, "ok", "grpc") - calls(&before, "ok", "grpc"), 3.0);
    assert_eq!(calls(&after, "not_found", "grpc") - calls(&before, "not_found", "grpc"), 2.0);
    assert_eq!(calls(&after, "ok", "connect") - calls(&before, "ok", "connect"), 1.0);
    assert_eq!(calls(&after, "not_found", "connect") - calls(&before, "not_found", "connect"), 1.0);
    let l = [("method", "GetTaskStatus"), ("code", "ok"), ("protocol", "grpc")];
    assert_eq!(
        after.histogram_count("iris_worker_rpc_duration_seconds", &l),
        after.value("iris_worker_rpc_requests_total", &l)
    );
    assert_eq!(after.value("iris_worker_rpc_requests_total", &[("method", "RunTask"), ("code", "ok")]), Some(1.0));

    // The known task.
    let t = [("task_id", id), ("job_id", "metrics-job")];
    let mem = after.value("iris_worker_task_memory_bytes", &t).expect("the task's memory series");
    assert!(mem >= 24.0 * 1024.0 * 1024.0, "memory {mem}");
    let api = get(&w.addr(), &format!("/api/stats/{id}")).json();
    let api_mem = api["usage"]["memoryBytes"].as_f64().unwrap();
    assert!((api_mem - mem).abs() < 4.0 * 1024.0 * 1024.0, "metrics {mem} vs api {api_mem}");
    assert!(after.value("iris_worker_task_memory_peak_bytes", &t).unwrap() >= mem);
    assert_eq!(after.value("iris_worker_task_processes", &t), Some(2.0));
    assert!(after.value("iris_worker_task_cpu_seconds_total", &t).unwrap() > 0.0);
    assert!(after.value("iris_worker_task_cpu_percent", &t).is_some());
    assert!(after.value("iris_worker_task_disk_bytes", &t).is_some());
    assert_eq!(after.value("iris_worker_tasks", &[("state", "RUNNING")]), Some(1.0));
    assert_eq!(after.value("iris_worker_tasks", &[("state", "SUCCEEDED")]), Some(0.0));
    assert!(after.value("iris_worker_uptime_seconds", &[]).unwrap() > 0.0);
    assert_eq!(after.value("iris_worker_info", &[("worker_id", w.name.as_str())]), Some(1.0));
    assert_eq!(after.histogram_count("iris_worker_build_duration_seconds", &[]), Some(1.0));
    for cache in ["bundles", "venvs", "images"] {
        assert_eq!(after.value("iris_worker_cache_hits_total", &[("cache", cache)]), Some(0.0));
        assert_eq!(after.value("iris_worker_cache_misses_total", &[("cache", cache)]), Some(0.0));
    }
    let documented: HashMap<&str, &str> = [
        ("iris_worker_tasks", "gauge"),
        ("iris_worker_tasks_finished_total", "counter"),
        ("iris_worker_rpc_requests_total", "counter"),
        ("iris_worker_rpc_duration_seconds", "histogram"),
    ]
    .into();
    for name in documented.keys() {
        assert!(after.scrape.docs.contains_key(*name), "no HELP for {name}");
    }

    // Killed: counted as finished, and its per-task series are gone.
    c.kill_task(worker::KillTaskRequest { task_id: id.into(), term_timeout_ms: 500 }).await.unwrap();
    let s = wait_end(&mut c, id, TASK_TIMEOUT).await;
    assert_eq!(state_of(&s), TaskState::Killed);
    let done = scrape(&w);
    assert_eq!(done.value("iris_worker_tasks_finished_total", &[("state", "KILLED")]), Some(1.0));
    assert_eq!(done.value("iris_worker_tasks", &[("state", "KILLED")]), Some(1.0));
    assert_eq!(done.value("iris_worker_task_memory_bytes", &t), None);
}

#[tokio::test]
#[ignore = "root: runs containers"]
async fn open_event_streams_do_not_hold_a_graceful_shutdown() {
    let mut w = Worker::start("web-shutdown", &[]).await;
    let mut c = w.client().await;
    c.run_task(sh("sse/task-0", "while true; do echo tick; sleep 0.2; done")).await.unwrap();
    wait_for(&mut c, "sse/task-0", TASK_TIMEOUT, |s| state_of(s) == TaskState::Running).await;
    // Two dashboards watching: the list and the task.
    let mut streams = Vec::new();
    for path in ["/api/events/tasks", "/api/events/task/sse/task-0"] {
        let mut s = TcpStream::connect(w.addr()).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", w.addr()).unwrap();
        let mut first = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = s.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        streams.push(s);
    }
    let child = w.child.as_mut().unwrap();
    // SAFETY: SIGTERM to the worker process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the worker did not stop within 10 s of SIGTERM with event streams open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The streams were ended by the server, not cut.
    for mut s in streams {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(find(&rest, b"0\r\n\r\n").is_some(), "{}", String::from_utf8_lossy(&rest));
    }
    // Its task runs on under its supervisor; the worker's cleanup (on drop) ends it.
}
