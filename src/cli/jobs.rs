//! `iris-worker job launch|status|wait|logs|kill|list`, `endpoint list|lookup` and
//! `worker list`: the cluster's client verbs, through [`iris_controller::Cluster`].

use std::time::Duration;

use anyhow::{Context, bail};

use crate::proto::controller::{self as pc, Constraint, ConstraintOp, CoschedulingConfig};
use crate::proto::{CommandEntrypoint, EnvironmentConfig, JobState, ResourceSpecProto, TaskState, worker};
use iris_controller::Cluster;
use iris_controller::client::job_state_name;

const DEFAULT_CONTROLLER: &str = "127.0.0.1:10000";

#[derive(clap::Args, Debug, Clone)]
pub struct ControllerAddr {
    /// The controller (host:port or URL).
    #[arg(long, env = "IRIS_CONTROLLER", default_value = DEFAULT_CONTROLLER)]
    pub controller: String,
    #[command(flatten)]
    pub client: super::security::ClientArgs,
    /// Seconds to keep retrying (jittered backoff) while the controller cannot be reached,
    /// e.g. while it restarts; 0 = fail at once.
    #[arg(long, env = "IRIS_CONTROLLER_RETRY_FOR", default_value_t = iris_controller::client::DEFAULT_RETRY_FOR.as_secs_f64())]
    pub retry_for: f64,
}

impl ControllerAddr {
    fn cluster(&self) -> anyhow::Result<Cluster> {
        if !(0.0..86_400.0).contains(&self.retry_for) {
            bail!("--retry-for must be between 0 and 86400 seconds, not {}", self.retry_for);
        }
        let security = self.client.security()?;
        Ok(Cluster::with_security(&self.controller, &security).with_retry_for(Duration::from_secs_f64(self.retry_for)))
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum JobVerb {
    /// Launch a job of N replicas running a command: `iris-worker job launch --replicas 2 -- echo hi`.
    Launch(Box<LaunchArgs>),
    /// Show a job's state and its tasks.
    Status(JobIdArgs),
    /// Wait for a job to end; exit 0 only if it SUCCEEDED.
    Wait(WaitArgs),
    /// Print a task's log (read from its worker).
    Logs(JobLogsArgs),
    /// Terminate a job: kill its tasks and its child jobs.
    Kill(JobIdArgs),
    /// List the controller's jobs.
    List(ControllerAddr),
}

#[derive(clap::Subcommand, Debug)]
pub enum EndpointVerb {
    /// List endpoints whose name starts with a prefix.
    List(EndpointListArgs),
    /// Look an endpoint up by name.
    Lookup(EndpointLookupArgs),
}

#[derive(clap::Subcommand, Debug)]
pub enum WorkerVerb {
    /// List the workers registered with the controller.
    List(ControllerAddr),
}

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub addr: ControllerAddr,
    /// The job's name, which is its id [default: generated].
    #[arg(long)]
    pub name: Option<String>,
    /// Number of tasks.
    #[arg(long, default_value_t = 1)]
    pub replicas: i32,
    #[command(flatten)]
    pub shape: super::shape::TaskShape,
    /// OCI image reference of the tasks' root filesystem [default: the worker's rootfs].
    #[arg(long)]
    pub image: Option<String>,
    /// A constraint on worker attributes: KEY=V, KEY!=V, KEY>V, KEY>=V, KEY<V, KEY<=V, KEY
    /// (exists) or !KEY (does not exist); repeatable.
    #[arg(long = "constraint")]
    pub constraints: Vec<String>,
    /// Place all tasks at once on workers sharing this attribute's value.
    #[arg(long)]
    pub coschedule_by: Option<String>,
    /// Retries of a task that fails.
    #[arg(long, default_value_t = 0)]
    pub max_retries: i32,
    /// Retries of a task whose worker fails.
    #[arg(long, default_value_t = 100)]
    pub max_retries_preemption: i32,
    /// Failed tasks the job tolerates.
    #[arg(long, default_value_t = 0)]
    pub max_task_failures: i32,
    /// Seconds a task may wait for a worker before the job is UNSCHEDULABLE (0 = forever).
    #[arg(long, default_value_t = 0)]
    pub scheduling_timeout: i32,
    /// Parent job (terminated with it).
    #[arg(long)]
    pub parent: Option<String>,
    /// Wait for the job to end and exit 0 only if it SUCCEEDED.
    #[arg(long, short)]
    pub wait: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct JobIdArgs {
    #[command(flatten)]
    pub addr: ControllerAddr,
    pub job_id: String,
    /// Print the proto3 JSON form instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub addr: ControllerAddr,
    pub job_id: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 86_400)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct JobLogsArgs {
    #[command(flatten)]
    pub addr: ControllerAddr,
    pub job_id: String,
    /// The task's index.
    #[arg(long, default_value_t = 0)]
    pub task: i32,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<i64>,
}

#[derive(clap::Args, Debug)]
pub struct EndpointListArgs {
    #[command(flatten)]
    pub addr: ControllerAddr,
    /// Only names starting with this.
    #[arg(default_value = "")]
    pub prefix: String,
}

#[derive(clap::Args, Debug)]
pub struct EndpointLookupArgs {
    #[command(flatten)]
    pub addr: ControllerAddr,
    pub name: String,
}

/// Parses a `--constraint`.
pub fn parse_constraint(s: &str) -> anyhow::Result<Constraint> {
    let value = |v: &str| Some(crate::heartbeat::attribute_value(v));
    if let Some(key) = s.strip_prefix('!')
        && !key.contains(['=', '<', '>'])
    {
        return Ok(Constraint { key: key.to_string(), op: ConstraintOp::NotExists as i32, value: None });
    }
    for (sym, op) in [
        ("!=", ConstraintOp::Ne),
        (">=", ConstraintOp::Ge),
        ("<=", ConstraintOp::Le),
        ("=", ConstraintOp::Eq),
        (">", ConstraintOp::Gt),
        ("<", ConstraintOp::Lt),
    ] {
        if let Some((k, v)) = s.split_once(sym) {
            if k.is_empty() {
                bail!("constraint {s:?} has no key");
            }
            return Ok(Constraint { key: k.to_string(), op: op as i32, value: value(v) });
        }
    }
    if s.is_empty() {
        bail!("an empty constraint");
    }
    Ok(Constraint { key: s.to_string(), op: ConstraintOp::Exists as i32, value: None })
}

fn launch_request(a: &LaunchArgs) -> anyhow::Result<pc::LaunchJobRequest> {
    let env_vars = a.shape.env_vars()?;
    Ok(pc::LaunchJobRequest {
        name: a.name.clone().unwrap_or_default(),
        resources: Some(ResourceSpecProto {
            replicas: a.replicas,
            cpu_millicores: a.shape.cpu_millicores.unwrap_or(0),
            memory_bytes: a.shape.memory_bytes()?,
            ..Default::default()
        }),
        environment: Some(EnvironmentConfig { env_vars, ..Default::default() }),
        scheduling_timeout_seconds: a.scheduling_timeout,
        ports: a.shape.ports.clone(),
        parent_job_id: a.parent.clone().unwrap_or_default(),
        max_task_failures: a.max_task_failures,
        max_retries_failure: a.max_retries,
        max_retries_preemption: a.max_retries_preemption,
        constraints: a.constraints.iter().map(|c| parse_constraint(c)).collect::<anyhow::Result<_>>()?,
        coscheduling: a.coschedule_by.clone().map(|group_by| CoschedulingConfig { group_by }),
        command: Some(CommandEntrypoint { argv: a.argv.clone(), setup_commands: vec![] }),
        image: a.image.clone().unwrap_or_default(),
        timeout_seconds: a.shape.timeout.unwrap_or(0),
        ..Default::default()
    })
}

fn task_state(s: i32) -> &'static str {
    TaskState::try_from(s).map(|s| s.as_str_name().trim_start_matches("TASK_STATE_")).unwrap_or("UNKNOWN")
}

fn print_job(j: &pc::JobStatus) {
    println!(
        "{}  {}  tasks {} (pending {}, running {}, succeeded {}, failed {})  failures {}  preemptions {}",
        j.job_id,
        job_state_name(j.state),
        j.num_tasks,
        j.tasks_pending,
        j.tasks_running,
        j.tasks_succeeded,
        j.tasks_failed,
        j.failure_count,
        j.preemption_count
    );
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
    if !j.status_message.is_empty() {
        println!("  {}", j.status_message);
    }
    for t in &j.tasks {
        println!(
            "  {}  {}  worker {}  attempt {}  exit {}{}",
            t.task_id,
            task_state(t.state),
            if t.worker_id.is_empty() { "-" } else { &t.worker_id },
            t.current_attempt_id,
            t.exit_code,
            if t.error.is_empty() { String::new() } else { format!("  {}", t.error) }
        );
    }
}

fn print_json<M: prost::Message>(name: &str, m: &M) -> anyhow::Result<()> {
    let bytes = crate::rpc::connect::Codec::Json.encode(name, m).map_err(anyhow::Error::msg)?;
    println!("{}", String::from_utf8_lossy(&bytes));
    Ok(())
}

async fn wait(c: &Cluster, job_id: &str, within: Duration) -> anyhow::Result<()> {
    let j = c.wait(job_id, within).await?;
    print_job(&j);
    if j.state != JobState::Succeeded as i32 {
        bail!(
            "job {job_id} ended {}{}",
            job_state_name(j.state),
            if j.error.is_empty() { String::new() } else { format!(": {}", j.error) }
        );
    }
    Ok(())
}

pub async fn run_job(verb: JobVerb) -> anyhow::Result<()> {
    match verb {
        JobVerb::Launch(a) => {
            let c = a.addr.cluster()?;
            let job_id = c.launch(&launch_request(&a)?).await.context("LaunchJob")?;
            println!("{job_id}");
            if a.wait {
                wait(&c, &job_id, Duration::from_secs(86_400)).await?;
            }
        }
        JobVerb::Status(a) => {
            let j = a.addr.cluster()?.status(&a.job_id).await?;
            if a.json {
                print_json("iris.cluster.Controller.JobStatus", &j)?;
            } else {
                print_job(&j);
            }
        }
        JobVerb::Wait(a) => wait(&a.addr.cluster()?, &a.job_id, Duration::from_secs(a.timeout)).await?,
        JobVerb::Logs(a) => {
            let filter =
                worker::FetchLogsFilter { start_line: a.tail.map(|n| -n.abs()).unwrap_or(0), ..Default::default() };
            for l in a.addr.cluster()?.logs(&a.job_id, a.task, filter).await? {
                println!("{}", l.data);
            }
        }
        JobVerb::Kill(a) => {
            a.addr.cluster()?.terminate(&a.job_id).await?;
            println!("{} terminated", a.job_id);
        }
        JobVerb::List(a) => {
            for j in a.cluster()?.list_jobs().await? {
                print_job(&j);
            }
        }
    }
    Ok(())
}

pub async fn run_endpoint(verb: EndpointVerb) -> anyhow::Result<()> {
    let print = |e: &pc::Endpoint| println!("{}  {}  {}  job {}", e.name, e.address, e.endpoint_id, e.job_id);
    match verb {
        EndpointVerb::List(a) => a.addr.cluster()?.list_endpoints(&a.prefix).await?.iter().for_each(print),
        EndpointVerb::Lookup(a) => print(&a.addr.cluster()?.lookup_endpoint(&a.name).await?),
    }
    Ok(())
}

pub async fn run_worker(verb: WorkerVerb) -> anyhow::Result<()> {
    let WorkerVerb::List(a) = verb;
    let now = iris_wire::clock::now_ms();
    for w in a.cluster()?.workers().await? {
        println!(
            "{}  {}  last heartbeat {:.1} s ago  jobs [{}]",
            w.worker_id,
            if w.healthy { "healthy" } else { "dead" },
            (now - w.last_heartbeat_ms) as f64 / 1000.0,
            w.running_job_ids.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_every_operator() {
        let op = |s: &str| parse_constraint(s).unwrap().op;
        assert_eq!(op("zone=a"), ConstraintOp::Eq as i32);
        assert_eq!(op("zone!=a"), ConstraintOp::Ne as i32);
        assert_eq!(op("rank>=2"), ConstraintOp::Ge as i32);
        assert_eq!(op("rank<=2"), ConstraintOp::Le as i32);
        assert_eq!(op("rank>2"), ConstraintOp::Gt as i32);
        assert_eq!(op("rank<2"), ConstraintOp::Lt as i32);
        assert_eq!(op("gpu"), ConstraintOp::Exists as i32);
        assert_eq!(op("!gpu"), ConstraintOp::NotExists as i32);
        assert_eq!(parse_constraint("zone=a").unwrap().key, "zone");
        assert!(parse_constraint("=a").is_err());
    }
}
