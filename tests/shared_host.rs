//! A worker on a host many people's tasks share (issue 14): every resource bounded, task files
//! out of other users' reach, nothing lost across a `kill -9`, and a real init as the
//! container's pid 1. Each test drives a real `iris-worker serve`.

mod common;

use std::time::Duration;

use common::*;
use iris_worker::proto::worker;
use iris_worker::task::TaskState;

const LONG: Duration = Duration::from_secs(60);

/// The most memory the process `pid` has used (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn sixteen_fetches_of_a_log_made_of_one_100mb_line_stay_small() {
    let w = Worker::start("bigline", &[]).await;
    let mut c = w.client().await;
    c.run_task(sh("bigline/task-0", "head -c 100000000 /dev/zero | tr '\\0' x; echo")).await.unwrap();
    let s = wait_end(&mut c, "bigline/task-0", LONG).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}");
    let pid = w.child.as_ref().unwrap().id();
    let before = peak_rss(pid);
    let addr = w.addr();
    let fetches: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                // A client that would take a huge answer: the bound must be the worker's.
                let mut c =
                    iris_worker::proto::worker_service_client::WorkerServiceClient::connect(format!("http://{addr}"))
                        .await
                        .unwrap()
                        .max_decoding_message_size(1 << 30);
                let req = worker::FetchTaskLogsRequest { task_id: "bigline/task-0".into(), filter: None };
                c.fetch_task_logs(req).await.unwrap().into_inner().logs
            })
        })
        .collect();
    let mut total = 0;
    for f in fetches {
        let lines = f.await.unwrap();
        let bytes: usize = lines.iter().map(|l| l.data.len()).sum();
        assert!(!lines.is_empty());
        assert!(bytes <= iris_worker::logs::MAX_RESULT_BYTES + (64 << 10), "an answer of {bytes} bytes");
        total += lines.len();
    }
    let after = peak_rss(pid);
    println!(
        "16 fetches of 100 MB in 64 KiB lines: {total} lines; worker peak RSS {} → {} MiB",
        before >> 20,
        after >> 20
    );
    assert!(after < 200 << 20, "the worker's peak RSS reached {} MiB", after >> 20);
    // Paging on gets the rest: the answers are bounded, not the log.
    let all = logs(&mut c, "bigline/task-0", worker::FetchLogsFilter { start_line: -1, ..Default::default() }).await;
    assert!(all[0].line_number >= 1525, "{} lines of 64 KiB", all[0].line_number + 1);
}
