//! The dashboard in a real browser: a real worker with two tasks, and
//! `tests/browser/dashboard.test.mjs` driving Debian's headless Chromium through playwright-core
//! (installed by `scripts/setup`: the `chromium` package and `npm ci --prefix tests/browser`).
//!
//! The script opens `/`, checks the running task's memory, clicks through to its page, switches
//! the log tabs, times a new line's arrival (≤ 2 s), kills the task through the page's
//! confirmation and waits for KILLED, and checks that a task printing
//! `<script>alert(1)</script>` opens no dialog. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/browser/` (printed). Chromium runs on a fresh profile directory named
//! `iris-worker-test-chromium-*`; any process left on it is killed by pid afterwards.
//!
//! Marked `#[ignore = "browser: …"]`: `scripts/test` runs it with the other ignored tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use iris_worker::task::TaskState;

const SLOW: &str = "browser/slow-0";
/// Finished tasks beside the two running ones: the list must stay usable with this many.
const FINISHED: usize = 1000;
const XSS: &str = "browser/<img src=x onerror=alert(2)>";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Kills (by pid) every process whose command line names `profile`: Chromium's, if any is left.
fn kill_chromium_on(profile: &Path) -> usize {
    let needle = profile.to_string_lossy().into_owned();
    let left = processes_with(&needle);
    for (pid, _) in &left {
        // SAFETY: a signal to a pid we just found running Chromium on our own profile.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    left.len()
}

#[tokio::test]
#[ignore = "browser: headless chromium"]
async fn the_dashboard_works_in_headless_chromium() {
    let node_modules = repo().join("tests/browser/node_modules/playwright-core");
    assert!(Path::new("/usr/bin/chromium").exists(), "no /usr/bin/chromium: run scripts/setup (Debian's chromium)");
    assert!(node_modules.exists(), "no {}: run scripts/setup (npm ci --prefix tests/browser)", node_modules.display());

    let started = Instant::now();
    let w = Worker::start("browser", &[]).await;
    let mut c = w.client().await;
    let slow = "head -c 16777216 /dev/zero > /tmp/fill; i=0; \
                while true; do i=$((i+1)); echo \"out $i\"; echo \"err $i\" >&2; sleep 0.4; done";
    c.run_task(sh(SLOW, slow)).await.unwrap();
    c.run_task(sh(XSS, "echo '<script>alert(1)</script>'; exec sleep 600")).await.unwrap();
    for id in [SLOW, XSS] {
        wait_for(&mut c, id, Duration::from_secs(60), |s| state_of(s) == TaskState::Running).await;
    }
    // A thousand short tasks, 50 requests at a time; then wait for them all to end.
    let ids: Vec<String> = (0..FINISHED).map(|i| format!("load/task-{i}")).collect();
    for chunk in ids.chunks(50) {
        let calls = chunk.iter().map(|id| {
            let mut c = c.clone();
            async move { c.run_task(task(id, &["/bin/true"])).await.map(|_| ()) }
        });
        for r in futures::future::join_all(calls).await {
            r.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let list = c.list_tasks(iris_worker::proto::worker::ListTasksRequest {}).await.unwrap().into_inner();
        let done = list.tasks.iter().filter(|t| state_of(t) == TaskState::Succeeded).count();
        if done == FINISHED {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of {FINISHED} tasks finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("browser test: {FINISHED} tasks ran in {:.1} s", started.elapsed().as_secs_f64());

    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let profile = tempfile::Builder::new().prefix("iris-worker-test-chromium-").tempdir().unwrap();
    eprintln!("browser test: screenshots in {}", out.display());

    let mut node = tokio::process::Command::new("node");
    node.arg(repo().join("tests/browser/dashboard.test.mjs"))
        .args(["--url", &format!("http://{}", w.addr())])
        .arg("--out")
        .arg(&out)
        .arg("--profile")
        .arg(profile.path())
        .args(["--slow", SLOW, "--xss", XSS, "--finished", &FINISHED.to_string()])
        .current_dir(repo().join("tests/browser"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = node.spawn().expect("running node (Debian's nodejs)");
    let pgid = child.id().map(|p| p as i32);
    let result = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output()).await;
    // Whatever happened, nothing of the browser may stay: the script's group, then any
    // Chromium process on our profile.
    if let Some(pgid) = pgid {
        // SAFETY: the process group the node script leads (we made it with process_group(0)).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while kill_chromium_on(profile.path()) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = result.expect("the browser test did not finish within 240 s").expect("waiting for node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(output.status.success(), "the browser test failed ({}); worker log:\n{}", output.status, w.logs());
    for shot in ["list.png", "task.png", "task-killed.png", "xss.png"] {
        let len = std::fs::metadata(out.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "{shot} is missing or empty ({len} bytes) in {}", out.display());
    }
    let s = status(&mut c, SLOW).await;
    assert_eq!(state_of(&s), TaskState::Killed, "{s:?}");
    eprintln!("browser test: {:.1} s", started.elapsed().as_secs_f64());
}
