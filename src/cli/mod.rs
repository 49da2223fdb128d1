//! The `iris-worker` command line. `anyhow` lives here, at the binary's edge only.

mod cache;
mod cleanup;
mod client;
mod cluster;
mod config;
mod controller;
mod demo;
mod jobs;
mod security;
mod serve;
mod shape;
mod task;

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A daemonless OCI worker for the Iris cluster.
#[derive(Parser, Debug)]
#[command(name = "iris-worker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Run the worker: WorkerService (gRPC + Connect) and the dashboard on one port.
    Serve(config::ServeArgs),
    /// Start a worker on its defaults, run a sample task in a container, show its logs and
    /// stats, and keep the worker running until Ctrl-C.
    Demo(config::ServeArgs),
    /// Talk to a running worker: run, status, list, logs, kill.
    #[command(subcommand)]
    Task(task::TaskVerb),
    /// The caches: `cache ls` (every entry, its size, last use and who uses it), `cache prune`
    /// (removes what no task uses).
    #[command(subcommand)]
    Cache(cache::CacheVerb),
    /// Remove leftovers of a stopped worker: task processes, cgroups, container state, and
    /// (with --all) the task directories and logs.
    Cleanup(cleanup::CleanupArgs),
    /// The controller: `controller serve`.
    #[command(subcommand)]
    Controller(controller::ControllerVerb),
    /// Talk to a controller about jobs: launch, status, wait, logs, kill, list.
    #[command(subcommand)]
    Job(jobs::JobVerb),
    /// The controller's endpoint registry: list, lookup.
    #[command(subcommand)]
    Endpoint(jobs::EndpointVerb),
    /// The workers registered with a controller: list.
    #[command(subcommand)]
    Worker(jobs::WorkerVerb),
    /// A local cluster for development: `cluster up --workers N`.
    #[command(subcommand)]
    Cluster(cluster::ClusterVerb),
    /// (internal) The per-task supervisor, started by the worker.
    #[command(hide = true)]
    Supervise {
        task_dir: PathBuf,
        #[arg(long)]
        ready_fd: Option<i32>,
    },
    /// (internal) One command run inside a running task, started by the worker for the newest
    /// wire's ExecInContainer; prints its outcome as JSON.
    #[command(hide = true)]
    Exec {
        task_dir: PathBuf,
        /// Kill the command (and its session) after this many milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The supervisor must stay single-threaded (libcontainer forks): no tokio runtime here.
    if let Verb::Supervise { task_dir, ready_fd } = &cli.command {
        return supervise(task_dir, *ready_fd);
    }
    // So must an exec's helper.
    if let Verb::Exec { task_dir, timeout_ms, command } = &cli.command {
        let timeout = timeout_ms.map(std::time::Duration::from_millis);
        let outcome = crate::exec::helper::run(task_dir, command, timeout);
        return match serde_json::to_string(&outcome) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("iris-worker exec: encoding the outcome: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("iris-worker: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Verb::Serve(args) => serve::run(args).await,
            Verb::Demo(args) => demo::run(args).await,
            Verb::Task(verb) => task::run(verb).await,
            Verb::Cleanup(args) => cleanup::run(args),
            Verb::Cache(verb) => cache::run(verb),
            Verb::Controller(verb) => controller::run(verb).await,
            Verb::Job(verb) => jobs::run_job(verb).await,
            Verb::Endpoint(verb) => jobs::run_endpoint(verb).await,
            Verb::Worker(verb) => jobs::run_worker(verb).await,
            Verb::Cluster(verb) => cluster::run(verb).await,
            Verb::Supervise { .. } | Verb::Exec { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iris-worker: {}", describe_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line; a worker's status shows as its message and Connect code name
/// rather than tonic's long description.
fn describe_error(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<tonic::Status>() {
            Some(s) => format!("{} ({})", s.message(), crate::rpc::connect::code_name(s.code())),
            None => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// The supervisor's own log, created at its first line: a supervisor with nothing to say (a
/// task that ran and ended as it should) leaves no file, which on a disk where each inode
/// costs ~0.1 ms of CPU (docs/ARCHITECTURE.md, Performance) is worth not making.
struct LogOnFirstWrite {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl std::io::Write for LogOnFirstWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(crate::taskdir::PRIVATE_FILE_MODE)
                    .open(&self.path)?,
            ),
        };
        file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), std::io::Write::flush)
    }
}

fn supervise(task_dir: &std::path::Path, ready_fd: Option<i32>) -> ExitCode {
    // Log to a file in the task directory: the supervisor's stdio is /dev/null, and
    // libcontainer's tracing must never reach the task's own output.
    if crate::runtime::phases::install_from_env() {
        // Profiling (scripts/bench lifecycle --phases): the phases file takes the events.
    } else {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        // libcgroups warns, in every container, of each v1 controller the host does not mount
        // (and of net_cls/net_prio, which the supervisor hides on purpose): expected, so not
        // worth a line. Its errors still reach the file.
        let filter = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::WARN)
            .with_target("libcgroups::v1::manager", tracing::Level::ERROR);
        let log = LogOnFirstWrite { path: task_dir.join(crate::taskdir::SUPERVISOR_LOG), file: None };
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::sync::Mutex::new(log)).with_ansi(false))
            .with(filter)
            .try_init();
    }
    // Before any fork: the container's init blanks this area (its host paths) in its copy.
    #[cfg(feature = "container")]
    crate::runtime::container::record_arg_area();
    // SAFETY: the worker passes the ready pipe at this descriptor and nothing else owns it.
    let ready = ready_fd.map(|fd| unsafe { crate::supervisor::ready_fd(fd) });
    match crate::supervisor::run(task_dir, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "supervisor failed");
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging for the long-running verbs.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IRIS_WORKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libcontainer=warn,libcgroups=warn"));
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = if json { stderr.json().boxed() } else { stderr.boxed() };
    // The worker's own lines also go to Iris's log service on the newest wire.
    let _ =
        tracing_subscriber::registry().with(filter).with(stderr).with(crate::join::worker_log::CaptureLayer).try_init();
}
