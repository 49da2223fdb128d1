//! `iris-worker demo`: the README's first command. Starts a worker on its defaults, runs a
//! sample task in a container through the worker's own gRPC API, prints its log and stats,
//! and keeps the worker (and its dashboard) up until Ctrl-C.

use std::time::Duration;

use anyhow::{Context, bail};

use super::client::connect_with;
use super::config::ServeArgs;
use super::serve;
use crate::proto::{CommandEntrypoint, ResourceSpecProto, worker};
use crate::rpc::state_from_proto;

const SAMPLE: &str = r#"echo "hello from $IRIS_TASK_ID on $(hostname), pid $$"
echo "kernel $(uname -r), $(nproc) cpus"
i=1; while [ $i -le 5 ]; do echo "working: step $i of 5"; i=$((i+1)); sleep 0.2; done
head -c 20000000 /dev/zero | tr '\0' x > /tmp/blob; ls -l /tmp/blob
echo "this line goes to stderr" >&2
echo done"#;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    super::init_logging(config.log_json);
    if !config.worker.rootfs.join("bin/sh").exists() {
        bail!(
            "the demo's root filesystem {} is missing: run scripts/setup (or scripts/fixtures busybox)",
            config.worker.rootfs.display()
        );
    }
    let started = serve::start(&config).await?;
    let addr = format!("127.0.0.1:{}", started.addr.port());
    let mut client = connect_with(&addr, &config.worker.client).await?;
    let task_id = format!("demo-{}/task-0", iris_wire::clock::now_ms());
    let req = worker::RunTaskRequest {
        job_id: task_id.split('/').next().unwrap_or("demo").to_string(),
        task_id: task_id.clone(),
        num_tasks: 1,
        command: Some(CommandEntrypoint {
            argv: vec!["/bin/sh".into(), "-c".into(), SAMPLE.into()],
            setup_commands: vec![],
        }),
        resources: Some(ResourceSpecProto {
            memory_bytes: 256 << 20,
            cpu_millicores: 1000,
            pids_limit: 64,
            ..Default::default()
        }),
        ports: vec!["http".into()],
        ..Default::default()
    };
    client.run_task(req).await.context("RunTask of the sample task")?;
    println!("== ran {task_id} in a container; its log:");
    let status = loop {
        let s = client
            .get_task_status(worker::GetTaskStatusRequest { task_id: task_id.clone(), include_result: false })
            .await?
            .into_inner();
        if state_from_proto(s.state).is_some_and(|s| s.is_terminal()) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = client
        .fetch_task_logs(worker::FetchTaskLogsRequest { task_id: task_id.clone(), filter: None })
        .await?
        .into_inner()
        .logs;
    for l in &logs {
        println!("  {} [{}] {}", l.timestamp_ms, l.source, l.data);
    }
    println!("== its status and stats:");
    for line in super::task::describe(&status).lines() {
        println!("  {line}");
    }
    // The token is shown here, on the operator's terminal, so the dashboard can be opened;
    // it is never logged.
    let security = &config.worker.serve;
    let scheme = if security.listen.tls.is_some() { "https" } else { "http" };
    let token = security
        .gate
        .token
        .as_ref()
        .map(|t| format!("?token={}", url::form_urlencoded::byte_serialize(t.value().as_bytes()).collect::<String>()))
        .unwrap_or_default();
    println!(
        "\n== the worker keeps running on {} (dashboard: {scheme}://127.0.0.1:{}/{token}). Try:\n  \
         iris-worker task run --addr {addr} --wait -- /bin/sh -c 'echo hi'\n  \
         iris-worker task list --addr {addr}\nCtrl-C stops the worker.",
        started.addr,
        started.addr.port()
    );
    started.server.await.context("the server task")??;
    Ok(())
}
