//! Runs one container task through the library, with no server: open a TaskManager, run a
//! command, wait, print its log and figures.
//!
//! ```sh
//! cargo build && sudo target/debug/examples/run_task -- /bin/sh -c 'echo hello from $IRIS_TASK_ID'
//! ```
//! The supervisor binary is `iris-worker` next to this example's directory (or `IRIS_WORKER_EXE`);
//! the rootfs is the busybox fixture (or `IRIS_WORKER_ROOTFS`).

use std::path::PathBuf;

use anyhow::Context;
use iris_worker::logs::LogFilter;
use iris_worker::runtime::{Profile, RuntimeKind};
use iris_worker::task::{Command, ManagerConfig, PythonConfig, TaskManager, TaskSpec, WorkerEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip_while(|a| a != "--").skip(1).collect();
    let argv = if argv.is_empty() { vec!["/bin/sh".into(), "-c".into(), "echo hello; uname -a".into()] } else { argv };
    let exe = match std::env::var_os("IRIS_WORKER_EXE") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?
            .parent()
            .and_then(|d| d.parent())
            .context("locating target dir")?
            .join("iris-worker"),
    };
    let state = tempfile::tempdir()?;
    let manager = TaskManager::open(ManagerConfig {
        state_dir: state.path().to_path_buf(),
        runtime: RuntimeKind::Container,
        profile: Profile::Restricted,
        rootfs: std::env::var_os("IRIS_WORKER_ROOTFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/cache/iris-worker/rootfs/busybox".into()),
        default_task_image: None,
        max_concurrent_tasks: 1,
        port_range: (30000, 30099),
        port_lock_dir: iris_worker::task::DEFAULT_PORT_LOCKS.into(),
        env: WorkerEnv {
            worker_id: "example".into(),
            controller_address: None,
            bind_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
        },
        supervisor_exe: exe,
        shm_bytes: 64 << 20,
        cache_dir: "/var/cache/iris-worker".into(),
        workdir_retention: None,
        buildkit: None,
        images: iris_worker::env::image::ImageStoreConfig {
            dir: state.path().join("images"),
            insecure_registries: vec![],
            auth_file: None,
            containerd: None,
            max_bytes: 1 << 30,
            devices: false,
            pull: Default::default(),
        },
        bundle_sources: Default::default(),
        bounds: Default::default(),
        request_decoder: None,
        isolation: None,
        cache: Default::default(),
        lease: None,
        python: PythonConfig {
            rootfs: "/var/cache/iris-worker/rootfs/python".into(),
            find_links: None,
            offline: false,
            build_memory_bytes: 4 << 30,
            ca_bundle: None,
            build_env: vec![],
        },
    })
    .await?;
    manager.run(TaskSpec {
        task_id: "example/task-0".into(),
        job_id: "example".into(),
        num_tasks: 1,
        command: Some(Command { argv, setup_commands: vec![] }),
        ..Default::default()
    })?;
    let view = manager.wait("example/task-0").await?;
    for line in manager.logs("example/task-0", LogFilter::default()).await? {
        println!("[{}] {}", line.source, line.data);
    }
    println!("{} exit={} error={:?} usage={:?}", view.state.name(), view.exit_code, view.error, view.usage);
    drop(manager);
    iris_worker::task::cleanup(state.path(), true)?;
    Ok(())
}
