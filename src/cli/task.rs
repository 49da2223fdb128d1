//! `iris-worker task run|status|list|logs|kill` against a worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::client::{WorkerClient, connect_with};
use super::shape::parse_bytes;
use crate::proto::{CommandEntrypoint, EnvironmentConfig, ResourceSpecProto, TaskStatus, worker};
use crate::rpc::connect::Codec;
use crate::rpc::state_from_proto;

const DEFAULT_ADDR: &str = "127.0.0.1:8080";

#[derive(clap::Subcommand, Debug)]
pub enum TaskVerb {
    /// Run a command in a task: `iris-worker task run -- echo hello`.
    Run(RunArgs),
    /// Show a task's state, exit, ports and resource use.
    Status(IdArgs),
    /// List the worker's tasks.
    List(AddrArgs),
    /// Print a task's log.
    Logs(LogsArgs),
    /// Kill a task: SIGTERM, then SIGKILL after the grace.
    Kill(KillArgs),
}

#[derive(clap::Args, Debug)]
pub struct AddrArgs {
    /// The worker (host:port or URL).
    #[arg(long, env = "IRIS_WORKER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Print the proto3 JSON form instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: super::security::ClientArgs,
}

impl AddrArgs {
    async fn connect(&self) -> anyhow::Result<WorkerClient> {
        connect_with(&self.addr, &self.client.security()?).await
    }
}

#[derive(clap::Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    pub addr: AddrArgs,
    /// The task id, e.g. `my-job/task-0`.
    pub task_id: String,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub addr: AddrArgs,
    /// Job id [default: cli-<time>].
    #[arg(long)]
    pub job: Option<String>,
    /// Task id [default: <job>/task-<index>].
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub index: i32,
    #[arg(long, default_value_t = 0)]
    pub attempt: i32,
    #[command(flatten)]
    pub shape: super::shape::TaskShape,
    /// Most processes the task may have.
    #[arg(long)]
    pub pids: Option<i64>,
    /// Most disk the workdir and /tmp may hold together, in bytes or with a K/M/G suffix.
    #[arg(long)]
    pub disk: Option<String>,
    /// DEST=LOCAL_FILE: copy a local file to the task's workdir; repeatable.
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// Wait for the task to end, printing its log; exit with its exit code.
    #[arg(long, short)]
    pub wait: bool,
    /// Run in this OCI image: `registry/repo:tag`, `oci:/path/to/layout:tag` or
    /// `containerd:NAME`. Without a command, the image's Entrypoint and Cmd run.
    #[arg(long)]
    pub image: Option<String>,
    /// The command and its arguments (optional with --image).
    #[arg(last = true, required_unless_present = "image")]
    pub argv: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub addr: AddrArgs,
    pub task_id: String,
    /// Keep printing new lines until the task ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<i64>,
    /// Only lines matching this regex.
    #[arg(long)]
    pub grep: Option<String>,
    /// Only this source: stdout, stderr or build.
    #[arg(long)]
    pub source: Option<String>,
    /// Prefix lines with their time and source.
    #[arg(long, short)]
    pub timestamps: bool,
}

#[derive(clap::Args, Debug)]
pub struct KillArgs {
    #[command(flatten)]
    pub addr: AddrArgs,
    pub task_id: String,
    /// Milliseconds between SIGTERM and SIGKILL (0 = 5000).
    #[arg(long, default_value_t = 0)]
    pub grace_ms: i32,
}

pub async fn run(verb: TaskVerb) -> anyhow::Result<()> {
    match verb {
        TaskVerb::Run(a) => run_task(a).await,
        TaskVerb::Status(a) => {
            let mut c = a.addr.connect().await?;
            let s = c
                .get_task_status(worker::GetTaskStatusRequest { task_id: a.task_id.clone(), include_result: false })
                .await
                .with_context(|| format!("task {}", a.task_id))?
                .into_inner();
            if a.addr.json {
                print_json("iris.cluster.TaskStatus", &s)
            } else {
                print!("{}", describe(&s));
                Ok(())
            }
        }
        TaskVerb::List(a) => {
            let mut c = a.connect().await?;
            let list = c.list_tasks(worker::ListTasksRequest {}).await.context("listing tasks")?.into_inner();
            if a.json {
                return print_json("iris.cluster.Worker.ListTasksResponse", &list);
            }
            println!("{:<40} {:<14} {:>6} {:>9} {:>5}  ERROR", "TASK", "STATE", "EXIT", "MEM(MiB)", "CPU%");
            for t in &list.tasks {
                let u = t.resource_usage.unwrap_or_default();
                println!(
                    "{:<40} {:<14} {:>6} {:>9} {:>5}  {}",
                    t.task_id,
                    state_name(t.state),
                    t.exit_code,
                    u.memory_mb,
                    u.cpu_percent,
                    t.error
                );
            }
            Ok(())
        }
        TaskVerb::Logs(a) => print_logs(a).await,
        TaskVerb::Kill(a) => {
            let mut c = a.addr.connect().await?;
            c.kill_task(worker::KillTaskRequest { task_id: a.task_id.clone(), term_timeout_ms: a.grace_ms })
                .await
                .with_context(|| format!("killing {}", a.task_id))?;
            println!("kill requested for {}", a.task_id);
            Ok(())
        }
    }
}

fn state_name(s: i32) -> &'static str {
    state_from_proto(s).map(|s| s.name()).unwrap_or("UNKNOWN")
}

async fn run_task(a: RunArgs) -> anyhow::Result<()> {
    let job = a.job.clone().unwrap_or_else(|| format!("cli-{}", iris_wire::clock::now_ms()));
    let task_id = a.id.clone().unwrap_or_else(|| format!("{job}/task-{}", a.index));
    let env_vars = a.shape.env_vars()?;
    let mut workdir_files = HashMap::new();
    for f in &a.files {
        let (dest, src) = f.split_once('=').with_context(|| format!("--file {f:?} is not DEST=LOCAL_FILE"))?;
        let bytes = std::fs::read(PathBuf::from(src)).with_context(|| format!("reading {src}"))?;
        workdir_files.insert(dest.to_string(), bytes);
    }
    let req = worker::RunTaskRequest {
        job_id: job,
        task_id: task_id.clone(),
        task_index: a.index,
        num_tasks: 1,
        attempt_id: a.attempt,
        environment: Some(EnvironmentConfig { env_vars, ..Default::default() }),
        resources: Some(ResourceSpecProto {
            memory_bytes: a.shape.memory_bytes()?,
            cpu_millicores: a.shape.cpu_millicores.unwrap_or(0),
            pids_limit: a.pids.unwrap_or(0),
            disk_bytes: a.disk.as_deref().map(parse_bytes).transpose()?.unwrap_or(0),
            ..Default::default()
        }),
        timeout_seconds: a.shape.timeout.unwrap_or(0),
        ports: a.shape.ports.clone(),
        command: Some(CommandEntrypoint { argv: a.argv.clone(), setup_commands: vec![] }),
        image: a.image.clone().unwrap_or_default(),
        workdir_files,
        ..Default::default()
    };
    let mut c = a.addr.connect().await?;
    let resp = c.run_task(req).await.context("RunTask")?.into_inner();
    if a.addr.json && !a.wait {
        return print_json("iris.cluster.Worker.RunTaskResponse", &resp);
    }
    eprintln!("task {} {}", resp.task_id, state_name(resp.state));
    if !a.wait {
        return Ok(());
    }
    follow_logs(&a.addr, &task_id, None, false).await?;
    let s = c
        .get_task_status(worker::GetTaskStatusRequest { task_id: task_id.clone(), include_result: false })
        .await?
        .into_inner();
    if a.addr.json {
        print_json("iris.cluster.TaskStatus", &s)?;
    } else {
        eprint!("{}", describe(&s));
    }
    if s.exit_code != 0 || state_name(s.state) != "SUCCEEDED" {
        bail!("task {task_id} ended {}: {}", state_name(s.state), s.error);
    }
    Ok(())
}

/// Prints log lines from `start` on until the task has ended and no line is left.
async fn follow_logs(
    addr: &AddrArgs,
    task_id: &str,
    filter: Option<worker::FetchLogsFilter>,
    timestamps: bool,
) -> anyhow::Result<()> {
    let mut c = addr.connect().await?;
    let mut filter = filter.unwrap_or_default();
    loop {
        let ended = {
            let s = c
                .get_task_status(worker::GetTaskStatusRequest { task_id: task_id.to_string(), include_result: false })
                .await
                .with_context(|| format!("task {task_id}"))?
                .into_inner();
            state_from_proto(s.state).is_some_and(|s| s.is_terminal())
        };
        let logs = c
            .fetch_task_logs(worker::FetchTaskLogsRequest {
                task_id: task_id.to_string(),
                filter: Some(filter.clone()),
            })
            .await
            .context("FetchTaskLogs")?
            .into_inner()
            .logs;
        for l in &logs {
            print_line(l, timestamps);
        }
        if let Some(last) = logs.last() {
            filter.start_line = last.line_number + 1;
        }
        if logs.is_empty() {
            if ended {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn print_line(l: &worker::LogEntry, timestamps: bool) {
    if timestamps {
        println!("{} {:<6} {}", l.timestamp_ms, l.source, l.data);
    } else if l.source == "stderr" {
        eprintln!("{}", l.data);
    } else {
        println!("{}", l.data);
    }
}

async fn print_logs(a: LogsArgs) -> anyhow::Result<()> {
    let filter = worker::FetchLogsFilter {
        regex: a.grep.clone().unwrap_or_default(),
        start_line: a.tail.map(|n| -n.abs()).unwrap_or(0),
        source: a.source.clone().unwrap_or_default(),
        ..Default::default()
    };
    if a.follow {
        // Start from the tail's first line, then follow by line number.
        let mut first = filter.clone();
        if a.tail.is_some() {
            let mut c = a.addr.connect().await?;
            let logs = c
                .fetch_task_logs(worker::FetchTaskLogsRequest {
                    task_id: a.task_id.clone(),
                    filter: Some(filter.clone()),
                })
                .await?
                .into_inner()
                .logs;
            first.start_line = logs.first().map(|l| l.line_number).unwrap_or(0);
        }
        return follow_logs(&a.addr, &a.task_id, Some(first), a.timestamps).await;
    }
    let mut c = a.addr.connect().await?;
    let resp = c
        .fetch_task_logs(worker::FetchTaskLogsRequest { task_id: a.task_id.clone(), filter: Some(filter) })
        .await
        .with_context(|| format!("logs of {}", a.task_id))?
        .into_inner();
    if a.addr.json {
        return print_json("iris.cluster.Worker.FetchTaskLogsResponse", &resp);
    }
    for l in &resp.logs {
        print_line(l, a.timestamps);
    }
    Ok(())
}

fn print_json<M: prost::Message>(name: &str, msg: &M) -> anyhow::Result<()> {
    let bytes = Codec::Json.encode(name, msg).map_err(anyhow::Error::msg)?;
    println!("{}", String::from_utf8_lossy(&bytes));
    Ok(())
}

/// A task status as text.
pub fn describe(s: &TaskStatus) -> String {
    let u = s.resource_usage.unwrap_or_default();
    let ports: Vec<String> = s.ports.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut out = format!("task       {}\nstate      {}\nexit code  {}\n", s.task_id, state_name(s.state), s.exit_code);
    if !s.error.is_empty() {
        out.push_str(&format!("error      {}\n", s.error));
    }
    if !s.status_message.is_empty() {
        out.push_str(&format!("phase      {}\n", s.status_message));
    }
    out.push_str(&format!(
        "memory     {} MiB (peak {} MiB)\ncpu        {}%\nprocesses  {}\ndisk       {} MiB\n",
        u.memory_mb, u.memory_peak_mb, u.cpu_percent, u.process_count, u.disk_mb
    ));
    if !ports.is_empty() {
        out.push_str(&format!("ports      {}\n", ports.join(" ")));
    }
    if s.started_at_ms > 0 && s.finished_at_ms >= s.started_at_ms {
        out.push_str(&format!("duration   {} ms\n", s.finished_at_ms - s.started_at_ms));
    }
    out
}
