//! Embeds a whole worker through the library's front door: build a [`Worker`] on a temporary
//! state directory, run one container task through its task manager, wait for it to succeed,
//! print its log, shut the worker down and remove everything it made (cgroups, state).
//!
//! ```sh
//! cargo build --bin iris-worker --example embed && sudo target/debug/examples/embed
//! ```
//! Needs root (containers, cgroups). The supervisor binary is `iris-worker` next to this
//! example's directory (or `IRIS_WORKER_EXE`); the root filesystem is the busybox fixture
//! (`scripts/fixtures busybox`, or `IRIS_TEST_ROOTFS`). `IRIS_EMBED_WORKER_ID` names the
//! worker (its cgroups go below `iris-worker/<id>` in this process's cgroup).
//!
//! Exits 0 when the task SUCCEEDED and the cleanup went through.

use std::path::PathBuf;

use anyhow::{Context, bail};
use iris_worker::logs::LogFilter;
use iris_worker::runtime::RuntimeKind;
use iris_worker::task::{Command, TaskSpec, TaskState};
use iris_worker::{Worker, WorkerConfig};

const TASK_ID: &str = "embed/task-0";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let exe = match std::env::var_os("IRIS_WORKER_EXE") {
        Some(p) => PathBuf::from(p),
        // target/debug/examples/embed → target/debug/iris-worker
        None => std::env::current_exe()?
            .parent()
            .and_then(|d| d.parent())
            .context("locating the target directory")?
            .join("iris-worker"),
    };
    let rootfs = std::env::var_os("IRIS_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/iris-worker/rootfs/busybox".into());
    let worker_id = std::env::var("IRIS_EMBED_WORKER_ID").unwrap_or_else(|_| format!("embed-{}", std::process::id()));

    // Everything the worker writes (state, caches, port locks) goes below one temporary
    // directory, removed at the end.
    let scratch = tempfile::Builder::new().prefix("iris-worker-embed-").tempdir()?;
    let state_dir = scratch.path().join("state");
    let mut config = WorkerConfig::new(&state_dir);
    config.worker_id = worker_id;
    config.runtime = RuntimeKind::Container;
    config.rootfs = rootfs;
    config.cache_dir = scratch.path().join("cache");
    config.images.dir = config.cache_dir.join("images");
    config.port_lock_dir = scratch.path().join("port-locks");
    config.supervisor_exe = Some(exe);

    let ran = run_one_task(config).await;
    // Whatever happened: the worker's cgroups and task directories go, then the scratch dir.
    let cleaned = iris_worker::task::cleanup(&state_dir, true).context("cleaning up the worker's state");
    scratch.close().context("removing the temporary directory")?;
    let state = ran?;
    cleaned?;
    if state != TaskState::Succeeded {
        bail!("the task ended {}", state.name());
    }
    println!("task {TASK_ID} SUCCEEDED; the worker stopped and left nothing behind");
    Ok(())
}

/// Builds the worker, runs the task to its end, shuts the worker down; returns the task's state.
async fn run_one_task(config: WorkerConfig) -> anyhow::Result<TaskState> {
    let worker = Worker::builder(config).build().await.context("building the worker")?;
    println!("worker serving on {}", worker.local_addr());
    let manager = worker.manager().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let ended = async {
        manager.run(TaskSpec {
            task_id: TASK_ID.into(),
            job_id: "embed".into(),
            num_tasks: 1,
            command: Some(Command {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo hello from $IRIS_TASK_ID; uname -s".into()],
                setup_commands: vec![],
            }),
            ..Default::default()
        })?;
        let view = manager.wait(TASK_ID).await?;
        println!("== {TASK_ID} ended {} (exit {}); its log:", view.state.name(), view.exit_code);
        for line in manager.logs(TASK_ID, LogFilter::default()).await? {
            println!("[{}] {}", line.source, line.data);
        }
        anyhow::Ok(view.state)
    }
    .await;

    // Shutdown: the port closes, the worker's loops are cancelled and awaited.
    let _ = stop.send(());
    serving.await.context("the worker's task")?.context("serving")?;
    // The last handle on the state directory: cleanup needs it released.
    drop(manager);
    ended
}
