//! Tasks cannot drive the worker (issue 14, section 1): a task — in a container or a plain
//! process, on the host network — cannot connect to the worker's port on 127.0.0.1, on any
//! other loopback address, on 0.0.0.0, on the host's own addresses or through IPv6 (`::1`,
//! `::ffff:127.0.0.1`), while its allocated port works and host processes outside tasks still
//! reach the worker. The hook stays while the worker is down and goes with `iris-worker
//! cleanup`; where the host cannot have it, the worker says so.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Worker, exe, sh, state_of, wait_for};
use iris_worker::proto::{Empty, worker};
use iris_worker::task::TaskState;

const WITHIN: Duration = Duration::from_secs(60);

/// The host's addresses other than loopback ones (IPv4 and IPv6, link-local v6 left out:
/// it needs a scope id in a URL).
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs().unwrap() {
        let Some(addr) = a.address else { continue };
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) if (v6.ip().segments()[0] & 0xffc0) != 0xfe80 => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn url_host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// GET `path` from `host:port` by hand (HTTP/1.0); the body, or the error.
fn http_get(host: &str, port: u16, path: &str) -> Result<String, String> {
    let addr = format!("{host}:{port}");
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// The tasks' parent cgroup in the cgroup2 tree (where the hook hangs), from the worker's
/// state directory.
fn hook_dir(w: &Worker) -> std::path::PathBuf {
    let parent = std::fs::read_to_string(w.state_dir().join("cgroup-parent")).unwrap();
    let layout = iris_worker::cgroup::Layout::detect().unwrap();
    layout.unified_dir(parent.trim()).unwrap().expect("this host has a cgroup2 tree")
}

async fn a_task_cannot_reach_the_worker(runtime: &str, busybox: &str) {
    let w = Worker::start_on(
        &format!("isolation-{runtime}"),
        "0.0.0.0",
        &["--runtime", runtime, "--port-range", "34700-34709"],
    )
    .await;
    let mut c = w.client().await;
    let health = c.health_check(Empty {}).await.unwrap().into_inner();
    assert!(
        health.task_isolation.starts_with(&format!("on: tasks cannot connect to port {}", w.port)),
        "HealthCheck says {:?}",
        health.task_isolation
    );
    assert!(w.logs().contains("task isolation on:"), "the worker says at start what tasks can reach:\n{}", w.logs());

    let mut targets: Vec<String> =
        ["127.0.0.1", "127.0.0.2", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]"].iter().map(|s| s.to_string()).collect();
    targets.extend(host_addresses().iter().map(url_host));
    let tries: String = targets
        .iter()
        .map(|t| {
            format!(
                "echo \"worker {t}: $({busybox} timeout 5 {busybox} wget -q -O - http://{t}:{port}/health 2>&1 | tr '\\n' ' ')\"\n",
                port = w.port
            )
        })
        .collect();
    let script = format!(
        "mkdir -p /tmp/www && echo task-port-ok > /tmp/www/index.html\n\
         {busybox} httpd -f -p $IRIS_PORT_WEB -h /tmp/www &\n\
         sleep 0.3\n\
         {tries}\
         echo \"own port: $({busybox} timeout 5 {busybox} wget -q -O - http://127.0.0.1:$IRIS_PORT_WEB/ 2>&1)\"\n\
         echo tried\n\
         sleep 60\n"
    );
    let id = format!("isolation-{runtime}/task-0");
    let mut req = sh(&id, &script);
    req.ports = vec!["web".into()];
    c.run_task(req).await.unwrap();
    let status = wait_for(&mut c, &id, WITHIN, |s| state_of(s) == TaskState::Running).await;
    let task_port = status.ports["web"] as u16;
    let deadline = Instant::now() + WITHIN;
    let log = loop {
        let lines: Vec<String> = common::all_logs(&mut c, &id).await.into_iter().map(|l| l.data).collect();
        if lines.iter().any(|l| l == "tried") {
            break lines;
        }
        assert!(Instant::now() < deadline, "the task did not finish its tries: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for t in &targets {
        let line = log.iter().find(|l| l.starts_with(&format!("worker {t}:"))).unwrap();
        // EPERM is the hook's answer; a refused or reached connection would be something else.
        assert!(line.contains("Operation not permitted"), "{runtime}: {line}\nwhole log: {log:#?}");
    }
    assert!(log.iter().any(|l| l == "own port: task-port-ok"), "{runtime}: the task's own port works: {log:#?}");

    // Outside the task: the host reaches the worker on every address it listens on (0.0.0.0:
    // the IPv4 ones) and the task's port.
    let v4 = host_addresses().into_iter().filter(IpAddr::is_ipv4);
    for t in std::iter::once("127.0.0.1".to_string()).chain(v4.map(|ip| url_host(&ip))) {
        let body = http_get(&t, w.port, "/health").unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(body.trim(), "ok", "the host reaches the worker on {t}");
    }
    assert_eq!(http_get("127.0.0.1", task_port, "/").unwrap().trim(), "task-port-ok");

    c.kill_task(worker::KillTaskRequest { task_id: id.clone(), term_timeout_ms: 100 }).await.unwrap();
    common::wait_end(&mut c, &id, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: containers, cgroups and a BPF connect hook"]
async fn a_container_task_cannot_connect_to_the_worker_on_any_local_address() {
    a_task_cannot_reach_the_worker("container", "/bin/busybox").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: plain processes in cgroups and a BPF connect hook"]
async fn a_process_task_cannot_connect_to_the_worker_on_any_local_address() {
    a_task_cannot_reach_the_worker("process", "/usr/bin/busybox").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: cgroups and a BPF connect hook"]
async fn the_hook_outlives_the_worker_and_goes_with_cleanup() {
    let mut w = Worker::start("isolation-cleanup", &[]).await;
    let dir = hook_dir(&w);
    let attached = iris_worker::isolation::attached(&dir).unwrap();
    assert_eq!(attached, vec!["iris_wk_conn4", "iris_wk_conn6"], "one hook per address family");

    // A restarted worker replaces the hook rather than adding a second one.
    w.kill9();
    assert_eq!(iris_worker::isolation::attached(&dir).unwrap().len(), 2, "tasks stay fenced off while it is down");
    w.spawn().await;
    assert_eq!(iris_worker::isolation::attached(&dir).unwrap(), vec!["iris_wk_conn4", "iris_wk_conn6"]);

    w.kill9();
    let out = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(w.state_dir()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(iris_worker::isolation::attached(&dir).unwrap(), Vec::<String>::new(), "cleanup removed the hook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker in a mount namespace without cgroups"]
async fn a_host_without_the_hook_is_told_at_start_and_in_health_checks() {
    // Off by the operator's choice.
    let w = Worker::start("isolation-off", &["--task-isolation", "false"]).await;
    let h = w.client().await.health_check(Empty {}).await.unwrap().into_inner();
    assert!(h.task_isolation.starts_with("off"), "{:?}", h.task_isolation);
    drop(w);

    // Unavailable: a process-runtime worker that sees no cgroup filesystem (unmounted in its
    // own mount namespace) has nothing to hang the hook on.
    let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
    let port = common::free_port();
    let log_path = state.path().join("worker.log");
    let script = format!(
        "umount -R -l /sys/fs/cgroup && exec {exe} serve --listen 127.0.0.1:{port} --state-dir {state} \
         --runtime process --worker-id {prefix}isolation-none-{pid} 2>{log}",
        exe = exe(),
        state = state.path().display(),
        prefix = common::TEST_PREFIX,
        pid = std::process::id(),
        log = log_path.display(),
    );
    let mut child =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).spawn().unwrap();
    let deadline = Instant::now() + WITHIN;
    let health = loop {
        if let Ok(mut c) =
            iris_worker::proto::worker_service_client::WorkerServiceClient::connect(format!("http://127.0.0.1:{port}"))
                .await
            && let Ok(h) = c.health_check(Empty {}).await
        {
            break h.into_inner();
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not start: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        health.task_isolation.starts_with("unavailable (tasks run without a cgroup"),
        "{:?}",
        health.task_isolation
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("task isolation")).collect();
    assert_eq!(lines.len(), 1, "one line says it: {log}");
    assert!(lines[0].contains("WARN") && lines[0].contains("--auth-token-file"), "{}", lines[0]);
    let _ = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(state.path()).arg("--all").status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: containers and a BPF connect hook"]
async fn the_local_controllers_port_is_fenced_off_only_when_asked() {
    // A stand-in for a controller on this host: the worker's heartbeats fail, which is fine
    // without a lease (with one, a worker runs only what its controller confirms).
    let controller = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = controller.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    for (fenced, flag) in [(false, "false"), (true, "true")] {
        let w = Worker::start(
            &format!("isolation-controller-{flag}"),
            &["--controller", &url, "--heartbeat-interval", "5", "--lease", "0", "--isolate-controller", flag],
        )
        .await;
        let mut c = w.client().await;
        let id = format!("isolation-controller-{flag}/task-0");
        let script = format!("busybox timeout 3 busybox nc 127.0.0.1 {port} </dev/null; echo rc=$?");
        c.run_task(sh(&id, &script)).await.unwrap();
        common::wait_end(&mut c, &id, WITHIN).await;
        let log: Vec<String> = common::all_logs(&mut c, &id).await.into_iter().map(|l| l.data).collect();
        let refused = log.iter().any(|l| l.contains("Operation not permitted"));
        // Iris tasks reach the controller (IRIS_CONTROLLER_ADDRESS) for endpoints and child jobs.
        assert_eq!(refused, fenced, "--isolate-controller {flag}: {log:?}");
        let health = c.health_check(Empty {}).await.unwrap().into_inner();
        assert_eq!(health.task_isolation.contains(&port.to_string()), fenced, "{}", health.task_isolation);
    }
}
