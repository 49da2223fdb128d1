//! `iris-worker cluster up --workers N`: a controller (in this process) and N workers (child
//! `iris-worker serve` processes, each with its own state directory and port) on this
//! machine, for development. Ctrl-C (or SIGTERM) stops the workers, removes their tasks,
//! cgroups and state with `cleanup --all`, and removes the temporary state.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;

use super::controller::ControllerArgs;

#[derive(clap::Subcommand, Debug)]
pub enum ClusterVerb {
    /// Start a controller and N workers; Ctrl-C stops them all and leaves nothing behind.
    Up(UpArgs),
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The controller's address [default: 127.0.0.1:10000].
    #[arg(long, default_value = "127.0.0.1:10000")]
    pub listen: SocketAddr,
    /// Seconds without a heartbeat after which a worker is dead.
    #[arg(long, default_value_t = 60.0)]
    pub worker_timeout: f64,
    /// Seconds between the workers' heartbeats.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_interval: f64,
    /// The workers' controller lease in seconds; it and its kill must end within
    /// --worker-timeout [default: 30, or half the worker timeout if that is less].
    #[arg(long)]
    pub lease: Option<f64>,
    /// An extra flag for every worker's `serve` (e.g. `--worker-arg=--runtime=process`); repeatable.
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
}

/// The workers' lease: given or derived, checked against the worker timeout here, where both
/// are known.
fn lease_for(a: &UpArgs) -> anyhow::Result<f64> {
    let lease = a.lease.unwrap_or((super::config::DEFAULT_LEASE).min(a.worker_timeout / 2.0));
    let in_range = |s: f64| s > 0.0 && s < 86_400.0;
    if !in_range(lease) || !in_range(a.worker_timeout) {
        anyhow::bail!("--lease and --worker-timeout must be between 0 and 86400 seconds");
    }
    crate::supervisor::lease::check_against_worker_timeout(
        Duration::from_secs_f64(lease),
        Duration::from_secs_f64(a.worker_timeout),
    )
    .map_err(anyhow::Error::msg)?;
    if lease < 2.0 * a.heartbeat_interval {
        anyhow::bail!("--lease ({lease} s) must be at least twice --heartbeat-interval ({} s)", a.heartbeat_interval);
    }
    Ok(lease)
}

struct Child {
    state: PathBuf,
    process: tokio::process::Child,
}

pub async fn run(verb: ClusterVerb) -> anyhow::Result<()> {
    let ClusterVerb::Up(a) = verb;
    super::init_logging(false);
    let lease = lease_for(&a)?;
    let root =
        tempfile::Builder::new().prefix("iris-cluster-").tempdir().context("making the cluster's state directory")?;
    let settings = ControllerArgs {
        listen: Some(a.listen),
        state_dir: Some(root.path().join("controller")),
        worker_timeout: Some(a.worker_timeout),
        ..Default::default()
    }
    .resolve()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop = stop_rx.clone();
    let started = super::controller::start(&settings, async move {
        let _ = stop.wait_for(|s| *s).await;
    })
    .await?;
    let controller = format!("http://127.0.0.1:{}", started.addr.port());
    let exe = std::env::current_exe().context("finding this program's path")?;
    let mut children: Vec<Child> = Vec::new();
    let result = async {
        for i in 0..a.workers {
            let state = root.path().join(format!("worker-{i}"));
            std::fs::create_dir_all(&state).with_context(|| format!("making {}", state.display()))?;
            let log = std::fs::File::create(root.path().join(format!("worker-{i}.log"))).context("the worker's log")?;
            let process = tokio::process::Command::new(&exe)
                .arg("serve")
                // Port 0: each worker binds a free port and registers with it.
                .args(["--listen", "127.0.0.1:0"])
                .arg("--state-dir")
                .arg(&state)
                .args(["--controller", &controller])
                .args(["--worker-id", &format!("cluster-worker-{i}")])
                .args(["--advertise-host", "127.0.0.1"])
                .args(["--heartbeat-interval", &a.heartbeat_interval.to_string()])
                .args(["--lease", &lease.to_string()])
                .args(["--port-range", &format!("{}-{}", 40000 + i * 1000, 40999 + i * 1000)])
                .args(&a.worker_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker")?;
            children.push(Child { state, process });
        }
        // Wait for every worker to register, so the addresses printed are the real ones.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let addresses = started.controller.worker_addresses();
            if addresses.len() >= a.workers {
                for (id, address) in addresses {
                    println!("worker {id}: http://{address}/");
                }
                break;
            }
            for (i, c) in children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.process.try_wait() {
                    anyhow::bail!(
                        "worker {i} exited ({status}); see {}",
                        root.path().join(format!("worker-{i}.log")).display()
                    );
                }
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("only {} of {} workers registered within 30 s", addresses.len(), a.workers);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("controller: {controller}/  (state in {}; Ctrl-C stops everything)", root.path().display());
        let mut watch = stop_rx.clone();
        tokio::select! {
            _ = super::serve::shutdown_signal() => {}
            _ = watch.wait_for(|s| *s) => {}
        }
        anyhow::Ok(())
    }
    .await;
    println!("stopping the cluster");
    for c in &mut children {
        if let Some(pid) = c.process.id() {
            // SIGTERM first: the worker shuts its server down; cleanup below ends the tasks.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }
    for c in &mut children {
        if tokio::time::timeout(Duration::from_secs(10), c.process.wait()).await.is_err() {
            let _ = c.process.kill().await;
        }
        let status = tokio::process::Command::new(&exe)
            .arg("cleanup")
            .arg("--state-dir")
            .arg(&c.state)
            .arg("--all")
            .stdout(Stdio::null())
            .status()
            .await;
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("cleanup of {} did not succeed", c.state.display());
        }
    }
    let _ = stop_tx.send(true);
    let _ = started.server.await;
    drop(root);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(worker_timeout: f64, heartbeat_interval: f64, lease: Option<f64>) -> UpArgs {
        UpArgs {
            workers: 1,
            listen: "127.0.0.1:0".parse().unwrap(),
            worker_timeout,
            heartbeat_interval,
            lease,
            worker_args: vec![],
        }
    }

    #[test]
    fn the_lease_is_checked_against_the_worker_timeout_at_start() {
        assert_eq!(lease_for(&up(60.0, 10.0, None)).unwrap(), 30.0);
        assert_eq!(lease_for(&up(3.0, 0.3, None)).unwrap(), 1.5);
        let e = lease_for(&up(20.0, 1.0, Some(30.0))).unwrap_err();
        assert!(e.to_string().contains("worker timeout"), "{e}");
        let e = lease_for(&up(60.0, 10.0, Some(15.0))).unwrap_err();
        assert!(e.to_string().contains("heartbeat"), "{e}");
    }
}
