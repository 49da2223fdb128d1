//! Hostile and malformed requests (issue 14, section 4): idle and slow clients cannot take the
//! port (descriptors stay bounded, HealthCheck still answers at once, the idle ones are closed
//! after the timeout); an over-size body gets Connect's error form.

mod common;
#[path = "common/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Worker;
use server::Server;

/// A raw HTTP/1.1 exchange: (status, body).
fn http(port: u16, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), body.to_string())
}

fn connect_json(port: u16, method: &str, body: &str) -> (u16, String) {
    http(
        port,
        format!(
            "POST /iris.cluster.WorkerService/{method} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// One Connect HealthCheck on a new connection; how long it took.
fn timed_health(port: u16) -> Duration {
    let start = Instant::now();
    let (status, body) = connect_json(port, "HealthCheck", "{}");
    assert_eq!(status, 200, "{body}");
    start.elapsed()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker with a low descriptor limit"]
async fn two_thousand_idle_connections_neither_exhaust_descriptors_nor_delay_health_checks() {
    const FDS: u64 = 512;
    let w = Server::start_limited(true, "idle", "127.0.0.1", &["--read-timeout", "3"], Some(FDS)).await;
    let pid = w.pid();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        // Connected, never a byte sent: what a slowloris or a port scan leaves.
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], w.port).into(), Duration::from_secs(5)).unwrap();
        idle.push(s);
    }
    let fds = open_fds(pid);
    assert!((fds as u64) < FDS, "the worker holds {fds} descriptors of its {FDS}");
    // HealthCheck answers at once on a new connection, with the idle ones still open.
    let mut times: Vec<Duration> = (0..5).map(|_| timed_health(w.port)).collect();
    times.sort();
    let median = times[2];
    println!("HealthCheck beside 2000 idle connections: {times:?}, median {median:?}; worker fds {fds}");
    assert!(median < Duration::from_millis(100), "HealthCheck took {times:?}");

    // After the read timeout every idle connection is closed by the worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &mut idle {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed: {other:?}"),
        }
    }
    assert!(open_fds(pid) < 100, "descriptors back down: {}", open_fds(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn slow_headers_and_slow_bodies_time_out() {
    let w = Server::start(true, "slow", "127.0.0.1", &["--read-timeout", "1"]).await;
    // Headers that never end: the connection is closed.
    let start = Instant::now();
    let (status, _) = http(w.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
    assert_eq!(status, 0, "no answer to half a request");
    assert!(start.elapsed() < Duration::from_secs(15), "closed after the read timeout: {:?}", start.elapsed());
    // A body that stops short: DEADLINE_EXCEEDED in Connect's form.
    let (status, body) = http(
        w.port,
        b"POST /iris.cluster.WorkerService/HealthCheck HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    );
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("deadline_exceeded"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn an_oversize_body_gets_connects_error_form() {
    let w = Worker::start("oversize", &[]).await;
    let length = (64u64 << 20) + 1;
    let (status, body) = http(
        w.port,
        format!(
            "POST /iris.cluster.WorkerService/RunTask HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/proto\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status, 413, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(v["code"], "resource_exhausted", "{body}");
}
