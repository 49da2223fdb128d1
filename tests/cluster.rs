//! The controller and the cluster: real `controller serve` and `serve` processes, jobs
//! scheduled onto the workers, retries, dead workers across network namespaces, constraints
//! and coscheduling, endpoints, a controller restart, and a Python Connect client.

#[path = "common/cluster.rs"]
mod cluster_common;
mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_common::*;
use common::*;
use iris_controller::ClusterError;
use iris_worker::proto::controller::{Constraint, ConstraintOp, CoschedulingConfig};
use iris_worker::proto::{AttributeValue, JobState, ResourceSpecProto, TaskState, attribute_value, worker};
use iris_worker::rpc::connect::ConnectError;
use tonic::Code;

const JOB: Duration = Duration::from_secs(60);

fn code_of(e: &ClusterError) -> Option<Code> {
    match e {
        ClusterError::Call(ConnectError::Status { code, .. }) => Some(*code),
        _ => None,
    }
}

fn zone(v: &str) -> Constraint {
    Constraint {
        key: "zone".into(),
        op: ConstraintOp::Eq as i32,
        value: Some(AttributeValue { value: Some(attribute_value::Value::StringValue(v.into())) }),
    }
}

async fn stdout_of(c: &iris_controller::Cluster, job_id: &str, index: i32) -> Vec<String> {
    c.logs(job_id, index, worker::FetchLogsFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.source == "stdout")
        .map(|l| l.data)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn four_replicas_on_two_workers_each_see_their_index_and_the_job_succeeds() {
    let ctl = ControllerProc::start(60.0).await;
    let a = ctl.worker("cl-rep-a", &[]).await;
    let b = ctl.worker("cl-rep-b", &[]).await;
    let c = ctl.cluster();
    let req = sh_job("rep", 4, "sleep 0.5; echo index=$IRIS_TASK_INDEX num=$IRIS_NUM_TASKS");
    let job_id = c.launch(&req).await.unwrap();
    // `job wait` returns when the job ends, with success.
    let out = Command::new(exe()).args(["job", "wait", "--controller", &ctl.url(), &job_id]).output().unwrap();
    assert!(out.status.success(), "job wait: {}", String::from_utf8_lossy(&out.stderr));
    let s = c.status(&job_id).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert_eq!((s.num_tasks, s.tasks_succeeded, s.tasks.len()), (4, 4, 4));
    for (i, t) in s.tasks.iter().enumerate() {
        assert_eq!(t.task_id, format!("{job_id}/task-{i}"));
        assert_eq!(stdout_of(&c, &job_id, i as i32).await, [format!("index={i} num=4")]);
    }
    let on = |w: &Worker| s.tasks.iter().filter(|t| t.worker_id == w.name).count();
    assert_eq!((on(&a), on(&b)), (2, 2), "spread over both workers: {s:#?}");
    // The controller's job page links each task to its page on its worker.
    let page = Command::new("curl").args(["-sf", &format!("{}/job/{job_id}", ctl.url())]).output().unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    for t in &s.tasks {
        let link = format!("href=\"http://{}/task/{}\"", t.worker_address, t.task_id);
        assert!(page.contains(&link), "{link} in {page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_task_failing_once_is_retried_and_without_retries_the_job_fails_with_its_error() {
    let ctl = ControllerProc::start(60.0).await;
    let _w = ctl.worker("cl-retry", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    let shared = tempfile::tempdir().unwrap();
    // Fails on its first attempt, succeeds on the second; the file counts attempts.
    let script = format!(
        "f={}/attempts-$IRIS_JOB_ID; n=$(( $(cat $f 2>/dev/null || echo 0) + 1 )); echo $n > $f; \
         echo attempt $n; [ $n -ge 2 ] || exit 3",
        shared.path().display()
    );
    let mut req = sh_job("retry", 1, &script);
    req.max_retries_failure = 1;
    let job_id = c.launch(&req).await.unwrap();
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert_eq!(s.failure_count, 1);
    let t = &s.tasks[0];
    assert_eq!(t.attempts.len(), 2, "{t:#?}");
    assert_eq!((t.attempts[0].state, t.attempts[0].exit_code), (TaskState::Failed as i32, 3));
    assert_eq!(t.attempts[1].state, TaskState::Succeeded as i32);
    assert_eq!(t.current_attempt_id, 1);
    let count = std::fs::read_to_string(shared.path().join(format!("attempts-{job_id}"))).unwrap();
    assert_eq!(count.trim(), "2");

    let mut req = sh_job("noretry", 1, &script);
    req.max_retries_failure = 0;
    let job_id = c.launch(&req).await.unwrap();
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Failed, "{s:#?}");
    let t = &s.tasks[0];
    assert_eq!((t.state, t.exit_code, t.attempts.len()), (TaskState::Failed as i32, 3, 1));
    assert_eq!(s.exit_code, 3);
    assert!(
        s.error.contains(&t.error) && t.error.contains("exit code 3"),
        "job error {:?}, task error {:?}",
        s.error,
        t.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: network namespaces and containers"]
async fn a_job_spans_two_hosts_and_survives_one_being_killed() {
    let ns_a = Netns::create("a", 231);
    let ns_b = Netns::create("b", 232);
    // The controller listens on host a's veth address; host b reaches it through the root
    // namespace (its default route).
    let ctl = ControllerProc::start_on(&ns_a.host_ip, 3.0).await;
    let lease = ctl.lease();
    let lease = ["--lease", lease.as_str()];
    let mut a = NsWorker::start(&ns_a, "cl-host-a", &ctl.url(), &lease).await;
    let b = NsWorker::start(&ns_b, "cl-host-b", &ctl.url(), &lease).await;
    ctl.wait_workers(&[&a.name, &b.name]).await;
    let c = ctl.cluster();
    let ws = c.workers().await.unwrap();
    assert_eq!(ws.len(), 2, "{ws:?}");
    // Each task reports the address its worker advertises: the two hosts differ.
    let mut req = sh_job("hosts", 2, "echo on $IRIS_ADVERTISE_HOST; sleep 4; echo done");
    req.max_retries_preemption = 2;
    let job_id = c.launch(&req).await.unwrap();
    let running = wait_job(&c, &job_id, JOB, |s| s.tasks_running == 2).await;
    let on_a = running.tasks.iter().find(|t| t.worker_id == a.name).expect("a task on host a").task_index;
    assert!(running.tasks.iter().any(|t| t.worker_id == b.name), "a task on host b: {running:#?}");
    a.kill9();
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{}", ctl.logs());
    let t = &s.tasks[on_a as usize];
    assert_eq!(t.attempts.len(), 2, "{t:#?}");
    assert_eq!(t.attempts[0].worker_id, a.name);
    assert_eq!(t.attempts[0].state, TaskState::WorkerFailed as i32);
    assert!(t.attempts[0].is_worker_failure);
    assert_eq!((t.attempts[1].worker_id.as_str(), t.attempts[1].state), (b.name.as_str(), TaskState::Succeeded as i32));
    assert_eq!(s.preemption_count, 1);
    assert_eq!(stdout_of(&c, &job_id, on_a).await, [format!("on {}", ns_b.ns_ip), "done".to_string()]);
    let dead = c.workers().await.unwrap().into_iter().find(|w| w.worker_id == a.name).unwrap();
    assert!(!dead.healthy);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn constraints_pick_the_zone_and_coscheduled_tasks_share_one_or_wait() {
    let ctl = ControllerProc::start(60.0).await;
    let a1 = ctl.worker("cl-zone-a1", &["--runtime", "process", "--attribute", "zone=a"]).await;
    let b1 = ctl.worker("cl-zone-b1", &["--runtime", "process", "--attribute", "zone=b"]).await;
    let c = ctl.cluster();
    let cores = c.workers().await.unwrap().len(); // every worker reports this host's CPUs
    assert!(cores > 0);
    let host_cpus = std::thread::available_parallelism().unwrap().get() as i32;

    let mut req = sh_job("zoneb", 3, "true");
    req.constraints = vec![zone("b")];
    let job_id = c.launch(&req).await.unwrap();
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert!(s.tasks.iter().all(|t| t.worker_id == b1.name), "all on zone b: {s:#?}");

    // Two tasks that each take all of a host's CPUs: one zone has room for both only once a
    // second zone-a worker joins.
    let mut req = sh_job("cosched", 2, "sleep 0.5");
    req.resources = Some(ResourceSpecProto { replicas: 2, cpu_millicores: host_cpus * 1000, ..Default::default() });
    req.coscheduling = Some(CoschedulingConfig { group_by: "zone".into() });
    let job_id = c.launch(&req).await.unwrap();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let s = c.status(&job_id).await.unwrap();
        assert_eq!(s.tasks_pending, 2, "neither task placed while no zone has room for both: {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = c.status(&job_id).await.unwrap();
    assert!(s.status_message.contains("zone"), "the wait says why: {s:#?}");
    let a2 = ctl.worker("cl-zone-a2", &["--runtime", "process", "--attribute", "zone=a"]).await;
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    let mut on: Vec<&str> = s.tasks.iter().map(|t| t.worker_id.as_str()).collect();
    on.sort_unstable();
    let mut want = vec![a1.name.as_str(), a2.name.as_str()];
    want.sort_unstable();
    assert_eq!(on, want, "both in zone a, one per worker");

    // What no registered worker could ever satisfy waits, as in Iris (an autoscaler may bring
    // a worker that fits), saying why; with a scheduling timeout it ends UNSCHEDULABLE.
    let mut req = sh_job("zonec", 1, "true");
    req.constraints = vec![zone("c")];
    let job_id = c.launch(&req).await.unwrap();
    let s = c.status(&job_id).await.unwrap();
    assert_eq!(job_state(&s), JobState::Pending, "{s:#?}");
    assert!(s.status_message.contains("constraint") && s.status_message.contains("zone"), "{s:#?}");
    // Still waiting after scheduling passes: a job that fits, launched after it, is placed and
    // ends (each pass looks at every waiting task, oldest first), and this one still waits.
    let fits = c.launch(&sh_job("zonec-later", 1, "true")).await.unwrap();
    let s = c.wait(&fits, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    let s = c.status(&job_id).await.unwrap();
    assert_eq!(job_state(&s), JobState::Pending, "{s:#?}");
    assert!(s.tasks.iter().all(|t| t.worker_id.is_empty()), "never placed: {s:#?}");
    c.terminate(&job_id).await.unwrap();
    let mut req = sh_job("huge", 1, "true");
    req.resources = Some(ResourceSpecProto { replicas: 1, memory_bytes: 1 << 50, ..Default::default() });
    req.scheduling_timeout_seconds = 1;
    let job_id = c.launch(&req).await.unwrap();
    assert_eq!(job_state(&c.status(&job_id).await.unwrap()), JobState::Pending);
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Unschedulable, "{s:#?}");
    assert!(s.error.contains("resources.memory_bytes") && s.error.contains("scheduling_timeout"), "{}", s.error);
    // A job that waits for room longer than its scheduling timeout becomes UNSCHEDULABLE.
    let mut req = sh_job("timeout", 1, "true");
    req.resources = Some(ResourceSpecProto { replicas: 1, cpu_millicores: host_cpus * 1000, ..Default::default() });
    req.constraints = vec![zone("b")];
    req.scheduling_timeout_seconds = 1;
    let blocker = {
        let mut r = sh_job("blocker", 1, "sleep 30");
        r.resources = req.resources.clone();
        r.constraints = vec![zone("b")];
        c.launch(&r).await.unwrap()
    };
    wait_job(&c, &blocker, JOB, |s| s.tasks_running == 1).await;
    let job_id = c.launch(&req).await.unwrap();
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Unschedulable, "{s:#?}");
    assert!(s.error.contains("scheduling_timeout_seconds"), "{}", s.error);
    c.terminate(&blocker).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_task_whose_dispatch_fails_says_why() {
    let ctl = ControllerProc::start(60.0).await;
    // A healthy worker (its heartbeats arrive) that registers an address where nothing listens
    // (it listens on 127.0.0.1 only): every RunTask to it fails.
    let url = ctl.url();
    let args = ["--controller", &url, "--heartbeat-interval", "0.3", "--advertise-host", "127.0.0.9"];
    let w = Worker::start("cl-unreachable", &[&args[..], &["--runtime", "process"]].concat()).await;
    ctl.wait_workers(&[&w.name]).await;
    let c = ctl.cluster();
    let mut req = sh_job("unreachable", 1, "true");
    req.scheduling_timeout_seconds = 3;
    let job_id = c.launch(&req).await.unwrap();
    let why = format!("dispatch to worker {} failed", w.name);
    let s = wait_job(&c, &job_id, JOB, |s| s.status_message.contains(&why) || job_terminal(s)).await;
    assert_eq!(job_state(&s), JobState::Pending, "{s:#?}");
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Unschedulable, "{s:#?}");
    assert!(s.error.contains(&why), "the error says why: {}", s.error);
    assert!(!s.error.contains("no healthy worker"), "{}", s.error);
    let attempt = &s.tasks[0].attempts[0];
    assert!(attempt.error.contains(&why), "{attempt:#?}");
}

fn job_terminal(s: &iris_worker::proto::controller::JobStatus) -> bool {
    !matches!(job_state(s), JobState::Pending | JobState::Building | JobState::Running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn endpoints_live_as_long_as_their_job() {
    let ctl = ControllerProc::start(60.0).await;
    let w = ctl.worker("cl-endpoints", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    let job_id = c.launch(&sh_job("ep-long", 1, "sleep 60")).await.unwrap();
    wait_job(&c, &job_id, JOB, |s| s.tasks_running == 1).await;
    let e1 = c.register_endpoint("svc/api", "10.0.0.1:80", &job_id, HashMap::new()).await.unwrap();
    let _e2 = c.register_endpoint("svc/api", "10.0.0.2:80", &job_id, HashMap::new()).await.unwrap();
    let meta = HashMap::from([("role".to_string(), "metrics".to_string())]);
    let e3 = c.register_endpoint("svc/metrics", "10.0.0.1:9090", &job_id, meta).await.unwrap();
    assert_eq!(c.lookup_endpoint("svc/metrics").await.unwrap().endpoint_id, e3);
    assert_eq!(c.lookup_endpoint("svc/metrics").await.unwrap().metadata["role"], "metrics");
    assert!(c.lookup_endpoint("svc/api").await.unwrap().address.starts_with("10.0.0."));
    assert_eq!(c.list_endpoints("svc/").await.unwrap().len(), 3);
    assert_eq!(c.list_endpoints("svc/api").await.unwrap().len(), 2);
    assert_eq!(c.list_endpoints("other").await.unwrap().len(), 0);
    c.unregister_endpoint(&e1).await.unwrap();
    assert_eq!(c.list_endpoints("svc/api").await.unwrap().len(), 1);
    let e = c.unregister_endpoint(&e1).await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::NotFound), "{e}");

    c.terminate(&job_id).await.unwrap();
    let s = c.status(&job_id).await.unwrap();
    assert_eq!(job_state(&s), JobState::Killed);
    assert_eq!(s.tasks[0].state, TaskState::Killed as i32);
    assert!(c.list_endpoints("").await.unwrap().is_empty());
    assert_eq!(code_of(&c.lookup_endpoint("svc/metrics").await.unwrap_err()), Some(Code::NotFound));
    // The task itself is killed on its worker.
    let mut wc = w.client().await;
    let task = wait_end(&mut wc, &format!("{job_id}/task-0"), JOB).await;
    assert_eq!(state_of(&task), iris_worker::task::TaskState::Killed);

    let job_id = c.launch(&sh_job("ep-short", 1, "sleep 1")).await.unwrap();
    c.register_endpoint("short/one", "10.0.0.3:1", &job_id, HashMap::new()).await.unwrap();
    assert_eq!(c.list_endpoints("short/").await.unwrap().len(), 1);
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded);
    assert!(c.list_endpoints("short/").await.unwrap().is_empty());
    let e = c.register_endpoint("late", "10.0.0.4:1", &job_id, HashMap::new()).await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::FailedPrecondition), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_restarted_controller_resumes_and_the_job_ends_right() {
    let mut ctl = ControllerProc::start(60.0).await;
    let _w = ctl.worker("cl-restart", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    let job_id = c.launch(&sh_job("restart", 2, "sleep 3; echo finished $IRIS_TASK_INDEX")).await.unwrap();
    wait_job(&c, &job_id, JOB, |s| s.tasks_running == 2).await;
    ctl.kill9();
    // While the controller is down the tasks end; the worker retries its reports.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctl.spawn().await;
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{}", ctl.logs());
    assert_eq!(s.tasks_succeeded, 2);
    for t in &s.tasks {
        assert_eq!(t.attempts.len(), 1, "no spurious retry: {t:#?}");
        assert_eq!(stdout_of(&c, &job_id, t.task_index).await, [format!("finished {}", t.task_index)]);
    }
    // A job launched after the restart runs too.
    let again = c.launch(&sh_job("after", 1, "true")).await.unwrap();
    assert_eq!(job_state(&c.wait(&again, JOB).await.unwrap()), JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field() {
    let ctl = ControllerProc::start(60.0).await;
    let c = ctl.cluster();
    let mut req = sh_job("bad", 1, "true");
    req.command = None;
    let e = c.launch(&req).await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("serialized_entrypoint"), "{e}");
    let mut req = sh_job("bad", 1, "true");
    req.resources = Some(ResourceSpecProto { replicas: -1, ..Default::default() });
    let e = c.launch(&req).await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("resources.replicas"), "{e}");
    // replicas 0 is what Iris's client sends by default (its ResourceSpec's default): one task.
    let mut req = sh_job("zero", 1, "true");
    req.resources = Some(ResourceSpecProto { replicas: 0, ..Default::default() });
    let zero = c.launch(&req).await.unwrap();
    let s = c.status(&zero).await.unwrap();
    assert_eq!((s.num_tasks, s.tasks.len()), (1, 1), "{s:#?}");
    let mut req = sh_job("bad", 1, "true");
    req.constraints = vec![Constraint { key: "rank".into(), op: ConstraintOp::Gt as i32, value: None }];
    let e = c.launch(&req).await.unwrap_err();
    assert!(e.to_string().contains("constraints[0].value"), "{e}");
    let mut req = sh_job("bad", 1, "true");
    req.parent_job_id = "no-such-parent".into();
    assert_eq!(code_of(&c.launch(&req).await.unwrap_err()), Some(Code::NotFound));
    let e = c.status("no-such-job").await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::NotFound));
    assert!(e.to_string().contains("job_id"), "{e}");
    assert_eq!(code_of(&c.terminate("no-such-job").await.unwrap_err()), Some(Code::NotFound));
    let e = c.register_endpoint("x", "1.2.3.4:5", "no-such-job", HashMap::new()).await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::NotFound));
    assert!(e.to_string().contains("job_id"), "{e}");
    assert_eq!(code_of(&c.lookup_endpoint("nothing").await.unwrap_err()), Some(Code::NotFound));
    // A job's name cannot be launched again with another spec, running or finished (as in
    // Iris); the same request again is a retry and gets the same job. The controller keeps its
    // state on disk.
    let id = c.launch(&sh_job("dup", 1, "true")).await.unwrap();
    assert_eq!(code_of(&c.launch(&sh_job("dup", 1, "false")).await.unwrap_err()), Some(Code::AlreadyExists));
    assert_eq!(c.launch(&sh_job("dup", 1, "true")).await.unwrap(), id);
    c.terminate(&zero).await.unwrap();
    assert_eq!(job_state(&c.status(&zero).await.unwrap()), JobState::Killed);
    let mut req = sh_job("zero", 1, "true");
    req.resources = None;
    let e = c.launch(&req).await.unwrap_err();
    assert_eq!(code_of(&e), Some(Code::AlreadyExists));
    assert!(e.to_string().contains(&format!("Job {zero} already exists")), "{e}");
    assert!(ctl.state.path().join("controller.db").exists());
    // The same service over gRPC (tonic's generated client) and Connect JSON, on the same port.
    let mut grpc =
        iris_worker::proto::controller_service_client::ControllerServiceClient::connect(ctl.url()).await.unwrap();
    let jobs = grpc.list_jobs(iris_worker::proto::controller::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert!(jobs.iter().any(|j| j.job_id == id), "{jobs:?}");
    let e = grpc
        .get_job_status(iris_worker::proto::controller::GetJobStatusRequest {
            job_id: "nope".into(),
            include_result: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let json = Command::new("curl")
        .args(["-s", "-H", "content-type: application/json", "-d", &format!("{{\"jobId\":\"{id}\"}}")])
        .arg(format!("{}/iris.cluster.ControllerService/GetJobStatus", ctl.url()))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["job"]["jobId"], id.as_str(), "{v}");
    // The pages answer on the same port.
    let page = Command::new("curl").args(["-sf", &format!("{}/", ctl.url())]).output().unwrap();
    assert!(String::from_utf8_lossy(&page.stdout).contains(&id));
}

/// The Python stubs of cluster.proto (protoc through grpcio-tools) in a temp dir.
fn python_stubs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", dir.path().display()))
        .arg(proto.join("iris/cluster.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

const PY_CLIENT: &str = r#"
import sys, time, cloudpickle
from connectrpc.client import ConnectClientSync
from connectrpc.method import MethodInfo, IdempotencyLevel
from iris import cluster_pb2 as pb

def method(name, req, resp):
    return MethodInfo(name=name, service_name="iris.cluster.ControllerService", input=req, output=resp,
                      idempotency_level=IdempotencyLevel.UNKNOWN)

def greet(who, punct="!"):
    print(f"hello {who}{punct}", flush=True)
    return 42

client = ConnectClientSync(sys.argv[1], timeout_ms=10000)
launch = method("LaunchJob", pb.Controller.LaunchJobRequest, pb.Controller.LaunchJobResponse)
status = method("GetJobStatus", pb.Controller.GetJobStatusRequest, pb.Controller.GetJobStatusResponse)
req = pb.Controller.LaunchJobRequest(
    name=sys.argv[2],
    serialized_entrypoint=cloudpickle.dumps((greet, ("iris",), {"punct": "?"})),
    resources=pb.ResourceSpecProto(replicas=1),
    max_retries_preemption=10,
)
job_id = client.execute_unary(request=req, method=launch).job_id
deadline = time.time() + 240
while True:
    job = client.execute_unary(request=pb.Controller.GetJobStatusRequest(job_id=job_id), method=status).job
    if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED,
                     pb.JOB_STATE_WORKER_FAILED, pb.JOB_STATE_UNSCHEDULABLE):
        break
    if time.time() > deadline:
        sys.exit("timed out in " + pb.JobState.Name(job.state))
    time.sleep(0.2)
print(job_id, pb.JobState.Name(job.state), job.error)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers (python rootfs and venv fixtures)"]
async fn a_python_connect_client_launches_a_pickled_callable_and_waits_for_it() {
    let ctl = ControllerProc::start(60.0).await;
    let cache =
        std::path::PathBuf::from(std::env::var("IRIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/iris-worker".into()));
    let own_cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let _w = ctl
        .worker(
            "cl-python",
            &[
                "--cache-dir",
                own_cache.path().to_str().unwrap(),
                "--python-rootfs",
                cache.join("rootfs/python").to_str().unwrap(),
                "--uv-find-links",
                cache.join("wheels").to_str().unwrap(),
                "--uv-offline",
                "true",
            ],
        )
        .await;
    let stubs = python_stubs();
    let name = format!("{TEST_PREFIX}py-{}", std::process::id());
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PY_CLIENT)
        .arg(ctl.url())
        .arg(&name)
        .env("PYTHONPATH", stubs.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), format!("{name} JOB_STATE_SUCCEEDED"));
    let c = ctl.cluster();
    assert_eq!(stdout_of(&c, &name, 0).await, ["hello iris?"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn stray_tasks_never_run_and_a_forgotten_worker_is_reset() {
    let mut ctl = ControllerProc::start(60.0).await;
    let w = ctl.worker("cl-stray", &["--runtime", "process"]).await;
    let mut wc = w.client().await;
    // A task the controller never launched never starts: the worker asks the controller
    // first (and the controller answers a heartbeat listing it with a KillTask).
    let log = AttemptLog::new();
    wc.run_task(sh("stray/task-0", &log.script("sleep 60"))).await.unwrap();
    let s = wait_end(&mut wc, "stray/task-0", JOB).await;
    assert!(
        matches!(state_of(&s), iris_worker::task::TaskState::Killed | iris_worker::task::TaskState::WorkerFailed),
        "{s:?}"
    );
    assert!(log.records().is_empty(), "{:?}", log.records());

    // A controller that lost its state does not know the worker: it answers should_reset,
    // and the worker kills every task and forgets them.
    let c = ctl.cluster();
    let job = c.launch(&sh_job("stray2", 1, "sleep 60")).await.unwrap();
    let task = format!("{job}/task-0");
    wait_job(&c, &job, JOB, |s| s.tasks_running == 1).await;
    ctl.kill9();
    for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
        let _ = std::fs::remove_file(ctl.state.path().join(f));
    }
    ctl.spawn().await;
    let deadline = Instant::now() + JOB;
    loop {
        let r = wc.get_task_status(worker::GetTaskStatusRequest { task_id: task.clone(), include_result: false }).await;
        if matches!(&r, Err(s) if s.code() == Code::NotFound) {
            break;
        }
        assert!(Instant::now() < deadline, "the worker did not forget its tasks: {r:?}\n{}", w.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn terminating_a_job_terminates_its_children() {
    let ctl = ControllerProc::start(60.0).await;
    let _w = ctl.worker("cl-children", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    let parent = c.launch(&sh_job("parent", 1, "sleep 60")).await.unwrap();
    let mut child = sh_job("child", 2, "sleep 60");
    child.parent_job_id = parent.clone();
    let child = c.launch(&child).await.unwrap();
    wait_job(&c, &child, JOB, |s| s.tasks_running == 2).await;
    c.terminate(&parent).await.unwrap();
    let s = c.status(&child).await.unwrap();
    assert_eq!(job_state(&s), JobState::Killed, "{s:#?}");
    assert!(s.error.contains(&parent), "{}", s.error);
    assert!(s.tasks.iter().all(|t| t.state == TaskState::Killed as i32));
    let list = Command::new(exe()).args(["job", "list", "--controller", &ctl.url()]).output().unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&format!("{parent}  KILLED")) && text.contains(&format!("{child}  KILLED")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn cluster_up_runs_jobs_and_ctrl_c_leaves_nothing_behind() {
    struct Guard(Option<std::process::Child>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut guard = Guard(None);
    // Port 0: the controller takes a free port and prints it.
    let up = std::process::Command::new(exe())
        .args(["cluster", "up", "--workers", "2", "--listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval", "0.3", "--worker-arg=--runtime=process"])
        .arg(format!("--worker-arg=--rootfs={}", rootfs().display()))
        .stdout(std::fs::OpenOptions::new().append(true).open(log.path()).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(log.path()).unwrap())
        .spawn()
        .unwrap();
    guard.0 = Some(up);
    let deadline = Instant::now() + JOB;
    let port: u16 = loop {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        if text.contains("Ctrl-C stops everything") {
            let port = text.split("controller: http://127.0.0.1:").nth(1).and_then(|r| r.split('/').next());
            break port.and_then(|p| p.parse().ok()).expect("the controller's port");
        }
        let exited = guard.0.as_mut().is_some_and(|up| up.try_wait().unwrap().is_some());
        assert!(!exited && Instant::now() < deadline, "cluster up did not start: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pid = guard.0.as_ref().map(|up| up.id() as i32).unwrap();
    let c = iris_controller::Cluster::new(&format!("127.0.0.1:{port}"));
    let deadline = Instant::now() + JOB;
    loop {
        let workers = c.workers().await.unwrap();
        if workers.iter().filter(|w| w.healthy).count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{workers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(log.path()).unwrap();
    let state = text.split("state in ").nth(1).and_then(|s| s.split(';').next()).unwrap().to_string();
    let mut req = sh_job("up", 2, "echo up-$IRIS_TASK_INDEX; sleep 60");
    req.name = format!("{TEST_PREFIX}cluster-up-{}", std::process::id());
    let job_id = c.launch(&req).await.unwrap();
    let s = wait_job(&c, &job_id, JOB, |s| s.tasks_running == 2).await;
    assert_eq!(s.tasks.iter().map(|t| t.worker_id.as_str()).collect::<std::collections::BTreeSet<_>>().len(), 2);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + JOB;
    while guard.0.as_mut().is_some_and(|up| up.try_wait().unwrap().is_none()) {
        assert!(Instant::now() < deadline, "cluster up did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    guard.0 = None;
    assert!(!std::path::Path::new(&state).exists(), "{state} is removed");
    assert!(processes_with(&state).is_empty(), "no process of the cluster is left: {:?}", processes_with(&state));
    assert!(processes_with("echo up-").is_empty(), "the tasks are gone: {:?}", processes_with("echo up-"));
    assert!(cgroups_named("cluster-worker-").is_empty(), "{:?}", cgroups_named("cluster-worker-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_failed_dispatch_makes_the_worker_suspect_and_the_task_goes_elsewhere_at_once() {
    let ctl = ControllerProc::start(60.0).await;
    let mut a = ctl.worker("cl-suspect-a", &["--runtime", "process"]).await;
    let b = ctl.worker("cl-suspect-b", &["--runtime", "process"]).await;
    // The controller still counts `a` healthy for a minute; its RunTask fails at once.
    a.kill9();
    let c = ctl.cluster();
    let mut req = sh_job("suspect", 2, "true");
    req.max_retries_preemption = 0; // a dispatch that never reached a worker is no preemption
    let job_id = c.launch(&req).await.unwrap();
    let s = c.wait(&job_id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert!(s.tasks.iter().all(|t| t.worker_id == b.name), "{s:#?}");
    let failed: Vec<_> = s.tasks.iter().flat_map(|t| &t.attempts).filter(|a| a.is_worker_failure).collect();
    assert!(
        !failed.is_empty() && failed.iter().all(|x| x.worker_id == a.name && x.error.contains("dispatch")),
        "{s:#?}"
    );
    let ws = c.workers().await.unwrap();
    let suspect = ws.iter().find(|w| w.worker_id == a.name).unwrap();
    assert!(suspect.consecutive_failures >= 1, "{ws:?}");
}

// ----- faults: the join-reset race, fencing, clients across a controller restart -----

/// Where `needle` first shows in a log: for checking what happened first.
fn position(logs: &str, needle: &str) -> Option<usize> {
    logs.find(needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_joining_worker_keeps_the_tasks_it_is_sent_before_its_reset_answer() {
    // Test seam: the controller holds its answers to RegisterWorker (here: should_reset to a
    // joining worker) back 1.5 s after waking the scheduler, so the RunTask of a waiting job
    // reaches the worker first — the window a real join hits about one time in twenty.
    let ctl = ControllerProc::start_with(60.0, &["--test-register-reply-delay-ms", "1500"]).await;
    let c = ctl.cluster();
    // The tasks outlast the held-back answer: a reset that reached them would kill them.
    let mut req = sh_job("join", 2, "sleep 3; echo done");
    req.max_retries_preemption = 0;
    let job_id = c.launch(&req).await.unwrap();
    // No worker yet: the job waits for one.
    assert_eq!(job_state(&c.status(&job_id).await.unwrap()), JobState::Pending);
    let w = ctl.worker("cl-join", &["--runtime", "process"]).await;
    let s = c.wait(&job_id, JOB).await.unwrap();
    let logs = w.logs();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{logs}");
    for t in &s.tasks {
        assert_eq!((t.attempts.len(), t.worker_id.as_str()), (1, w.name.as_str()), "{t:#?}");
        assert_eq!(stdout_of(&c, &job_id, t.task_index).await, ["done"]);
    }
    // The race was on: both tasks were accepted before the reset was heard.
    let accepted = position(&logs, "task accepted").expect("tasks accepted");
    let reset = position(&logs, "the controller asked for a reset").expect("the reset was heard");
    assert!(accepted < reset, "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_reset_neither_holds_up_heartbeats_nor_forgets_the_tasks_sent_since() {
    let mut ctl = ControllerProc::start(3.0).await;
    let w = ctl.worker("cl-reset", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    // A task that ignores SIGTERM (and so do its children): a reset waits out its 5 s grace,
    // longer than the controller's 3 s worker timeout.
    let old = c.launch(&sh_job("reset-old", 1, "trap '' TERM; sleep 60")).await.unwrap();
    wait_job(&c, &old, JOB, |s| s.tasks_running == 1).await;
    // The controller loses its state: it answers the worker's next heartbeat should_reset.
    ctl.kill9();
    for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
        let _ = std::fs::remove_file(ctl.state.path().join(f));
    }
    ctl.spawn().await;
    let mut req = sh_job("reset-new", 1, "sleep 8; echo done");
    req.max_retries_preemption = 0;
    let job_id = c.launch(&req).await.unwrap();
    let deadline = Instant::now() + JOB;
    let s = loop {
        let ws = c.workers().await.unwrap();
        assert!(ws.iter().all(|x| x.healthy), "the worker kept beating during the reset: {ws:?}\n{}", w.logs());
        let s = c.status(&job_id).await.unwrap();
        if iris_worker::proto::JobState::try_from(s.state).is_ok_and(|s| s.is_terminal()) {
            break s;
        }
        assert!(Instant::now() < deadline, "{s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{}", w.logs());
    assert_eq!(s.tasks[0].attempts.len(), 1, "never forgotten, never run again: {s:#?}");
    assert_eq!(stdout_of(&c, &job_id, 0).await, ["done"]);
    // The task from before the reset was ended (as a worker failure) and forgotten.
    let mut wc = w.client().await;
    let r = wc
        .get_task_status(worker::GetTaskStatusRequest { task_id: format!("{old}/task-0"), include_result: false })
        .await;
    assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::NotFound);
    assert!(w.logs().contains("the controller asked for a reset"), "{}", w.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_worker_down_longer_than_its_lease_never_runs_a_task_twice() {
    let ctl = ControllerProc::start(3.0).await; // workers' lease: 1.5 s
    let mut a = ctl.worker("cl-fence-a", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    let log = AttemptLog::new();
    let mut req = sh_job("fence", 1, &log.script("echo working; sleep 8"));
    req.max_retries_preemption = 3;
    let job_id = c.launch(&req).await.unwrap();
    let task_id = format!("{job_id}/task-0");
    wait_job(&c, &job_id, JOB, |s| s.tasks_running == 1).await;
    let first = wait_started(&log, &task_id, 0).await;
    let b = ctl.worker("cl-fence-b", &["--runtime", "process"]).await;
    // Down for 5 s, longer than the controller's 3 s worker timeout.
    a.kill9();
    let down = Instant::now();
    let gone_ms = wait_gone(first.pid, Duration::from_secs(10)).await;
    let second = wait_started(&log, &task_id, 1).await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(down.elapsed())).await;
    a.spawn().await;
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{}", ctl.logs());
    assert!(log.overlaps().is_empty(), "two attempts alive at once: {}", log.overlaps());
    assert!(
        gone_ms <= second.at_ms,
        "attempt 0 lived until {gone_ms}, attempt 1 started at {}: {:?}",
        second.at_ms,
        log.records()
    );
    let t = &s.tasks[0];
    assert_eq!(t.attempts.len(), 2, "{t:#?}");
    assert_eq!((t.attempts[0].state, t.attempts[0].is_worker_failure), (TaskState::WorkerFailed as i32, true));
    assert_eq!(t.attempts[1].worker_id, b.name);
    // The restarted worker tells why its attempt ended, and kept its log.
    let mut ac = a.client().await;
    let mine = wait_end(&mut ac, &task_id, JOB).await;
    assert_eq!(state_of(&mine), iris_worker::task::TaskState::WorkerFailed, "{mine:?}");
    assert_eq!(mine.error, "lost contact with the controller for 1.5 s");
    let lines: Vec<String> = all_logs(&mut ac, &task_id).await.into_iter().map(|l| l.data).collect();
    assert_eq!(lines, ["working"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: network namespaces and cgroups"]
async fn a_worker_cut_off_from_the_controller_ends_its_tasks_before_they_run_elsewhere() {
    let ns_c = Netns::create("c", 233);
    let ns_a = Netns::create("a", 234);
    let ns_b = Netns::create("b", 235);
    // The controller's address is on a link no test cuts.
    let ctl = ControllerProc::start_on(&ns_c.host_ip, 3.0).await;
    let lease = ["--runtime", "process", "--lease", "1.5"];
    let a = NsWorker::start(&ns_a, "cl-cut-a", &ctl.url(), &lease).await;
    ctl.wait_workers(&[&a.name]).await;
    let c = ctl.cluster();
    let log = AttemptLog::new();
    let mut req = sh_job("cut", 1, &log.script("echo working; sleep 6"));
    req.max_retries_preemption = 3;
    let job_id = c.launch(&req).await.unwrap();
    let task_id = format!("{job_id}/task-0");
    let first = wait_started(&log, &task_id, 0).await;
    let b = NsWorker::start(&ns_b, "cl-cut-b", &ctl.url(), &lease).await;
    ctl.wait_workers(&[&b.name]).await;
    ns_a.cut();
    let gone_ms = wait_gone(first.pid, Duration::from_secs(10)).await;
    let second = wait_started(&log, &task_id, 1).await;
    let s = c.wait(&job_id, JOB).await.unwrap();
    ns_a.heal();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{}", ctl.logs());
    assert!(log.overlaps().is_empty(), "two attempts alive at once: {}", log.overlaps());
    assert!(gone_ms <= second.at_ms, "attempt 0 lived until {gone_ms}, attempt 1 started at {}", second.at_ms);
    let t = &s.tasks[0];
    assert_eq!(t.attempts.len(), 2, "{t:#?}");
    assert!(t.attempts[0].is_worker_failure && t.attempts[0].worker_id == a.name, "{t:#?}");
    assert_eq!(t.attempts[1].worker_id, b.name);
    // Back on the network, the worker reports why it ended its attempt; its log is whole.
    let mut ac = iris_worker::proto::worker_service_client::WorkerServiceClient::connect(format!("http://{}", a.addr))
        .await
        .unwrap();
    let mine = wait_end(&mut ac, &task_id, JOB).await;
    assert_eq!(state_of(&mine), iris_worker::task::TaskState::WorkerFailed, "{mine:?}");
    assert_eq!(mine.error, "lost contact with the controller for 1.5 s");
    let lines: Vec<String> = all_logs(&mut ac, &task_id).await.into_iter().map(|l| l.data).collect();
    assert_eq!(lines, ["working"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_worker_restarted_within_its_lease_keeps_its_tasks() {
    let ctl = ControllerProc::start(20.0).await; // workers' lease: 10 s
    let mut w = ctl.worker("cl-within", &["--runtime", "process"]).await;
    let c = ctl.cluster();
    let job_id = c.launch(&sh_job("within", 1, "echo before; sleep 3; echo after")).await.unwrap();
    wait_job(&c, &job_id, JOB, |s| s.tasks_running == 1).await;
    w.kill9();
    w.spawn().await;
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}\n{}", w.logs());
    assert_eq!(s.tasks[0].attempts.len(), 1, "{s:#?}");
    assert_eq!(stdout_of(&c, &job_id, 0).await, ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_worker_killed_as_it_spawns_a_supervisor_adopts_it_after_a_restart() {
    // Test seam: supervisors hold their pid file back 1.5 s, the window in which a worker
    // killed right after spawning one used to take its task for dead on restart (and the
    // controller ran it again elsewhere, while the supervisor started it anyway).
    let env = [("IRIS_TEST_SUPERVISOR_PID_DELAY_MS", "1500")];
    let mut w = Worker::start_with_env("cl-spawn", &["--runtime", "process"], &env).await;
    let mut wc = w.client().await;
    wc.run_task(sh("spawn/task-0", "echo ran; sleep 1")).await.unwrap();
    let tasks = format!("{}/tasks/", w.state_dir().display());
    let deadline = Instant::now() + JOB;
    while processes_with(&format!("supervise {tasks}")).is_empty() {
        assert!(Instant::now() < deadline, "no supervisor started: {}", w.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dirs: Vec<_> = std::fs::read_dir(&tasks).unwrap().flatten().map(|e| e.path()).collect();
    assert!(dirs.iter().all(|d| !d.join("supervisor.pid").exists()), "the window is open");
    w.kill9();
    w.spawn().await;
    let mut wc = w.client().await;
    let s = wait_end(&mut wc, "spawn/task-0", JOB).await;
    assert_eq!(state_of(&s), iris_worker::task::TaskState::Succeeded, "adopted, not given up: {s:?}\n{}", w.logs());
    let out: Vec<String> = all_logs(&mut wc, "spawn/task-0").await.into_iter().map(|l| l.data).collect();
    assert_eq!(out, ["ran"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_runtask_that_arrives_after_contact_was_lost_runs_only_if_the_controller_still_means_it() {
    // A RunTask sent before a partition may be delivered once it heals, after the controller
    // ran the task elsewhere. Here the worker loses its lease (the controller is down longer
    // than it), then gets a RunTask the controller never made.
    let mut ctl = ControllerProc::start(3.0).await; // workers' lease: 1.5 s
    let w = ctl.worker("cl-late", &["--runtime", "process"]).await;
    ctl.kill9();
    // Back up, the controller holds its heartbeat answers back 1 s (test seam): the answer
    // that renews the lease comes for a heartbeat sent before the RunTask arrived, and the
    // controller's KillTask of the unknown task comes only after the next heartbeat, so
    // nothing but asking the controller keeps the task from starting.
    ctl.extra = vec!["--test-register-reply-delay-ms".into(), "1000".into()];
    let lease_file = w.state_dir().join("lease.json");
    let deadline = Instant::now() + JOB;
    while iris_worker::supervisor::lease::read(&lease_file)
        .is_some_and(|l| l.expires_ms() > iris_worker::supervisor::lease::boottime_ms())
    {
        assert!(Instant::now() < deadline, "the lease did not lapse");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = AttemptLog::new();
    let task_id = format!("{TEST_PREFIX}late-{}/task-0", std::process::id());
    ctl.spawn().await;
    // The controller has taken a heartbeat of the worker in (its answer is on hold).
    let since = epoch_ms();
    let c = ctl.cluster();
    let deadline = Instant::now() + JOB;
    while !c.workers().await.unwrap().iter().any(|x| x.worker_id == w.name && x.last_heartbeat_ms > since) {
        assert!(Instant::now() < deadline, "no heartbeat from the worker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut wc = w.client().await;
    wc.run_task(sh(&task_id, &log.script("echo ran"))).await.unwrap();
    // In contact again, the worker asks the controller, which knows no such attempt.
    let s = wait_end(&mut wc, &task_id, JOB).await;
    assert!(
        matches!(state_of(&s), iris_worker::task::TaskState::WorkerFailed | iris_worker::task::TaskState::Killed),
        "{s:?}"
    );
    assert!(log.records().is_empty(), "it never ran: {:?}\n{}", log.records(), w.logs());
    assert!(all_logs(&mut wc, &task_id).await.is_empty());
}

/// Polls the attempt log until the attempt has started.
async fn wait_started(log: &AttemptLog, task_id: &str, attempt_id: i32) -> AttemptRecord {
    let deadline = Instant::now() + JOB;
    loop {
        if let Some(r) = log.started(task_id, attempt_id) {
            return r;
        }
        assert!(Instant::now() < deadline, "attempt {attempt_id} of {task_id} did not start: {:?}", log.records());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn clients_ride_out_a_controller_restart() {
    let mut ctl = ControllerProc::start(60.0).await;
    let _w = ctl.worker("cl-client", &["--runtime", "process"]).await;
    let name = format!("{TEST_PREFIX}client-{}", std::process::id());
    // The controller is down when the CLI launches; it comes back a second later.
    ctl.kill9();
    let launch = tokio::process::Command::new(exe())
        .args(["job", "launch", "--controller", &ctl.url(), "--name", &name, "--wait", "--", "echo", "hi"])
        .output();
    let restart = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ctl.spawn().await;
    };
    let (out, ()) = tokio::join!(launch, restart);
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{name}\n")));
    // With retries off it fails at once.
    ctl.kill9();
    let out =
        Command::new(exe()).args(["job", "list", "--controller", &ctl.url(), "--retry-for", "0"]).output().unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: uses cgroups"]
async fn a_retried_launch_whose_first_try_landed_is_the_same_job() {
    let ctl = ControllerProc::start(60.0).await;
    let _w = ctl.worker("cl-idem", &["--runtime", "process"]).await;
    // The first LaunchJob reaches the controller, but its answer is lost on the way back.
    let proxy = LossyProxy::start(&ctl.url(), 1).await;
    let c = iris_controller::Cluster::new(&proxy.addr);
    let req = sh_job("idem", 2, "echo once; sleep 2");
    let job_id = c.launch(&req).await.unwrap();
    assert_eq!(job_id, req.name);
    // The same name with another spec is still refused.
    let mut other = req.clone();
    other.resources = Some(ResourceSpecProto { replicas: 3, ..Default::default() });
    assert_eq!(code_of(&c.launch(&other).await.unwrap_err()), Some(Code::AlreadyExists));
    let s = c.wait(&job_id, JOB).await.unwrap();
    assert_eq!(job_state(&s), JobState::Succeeded, "{s:#?}");
    assert_eq!(s.num_tasks, 2);
    assert!(s.tasks.iter().all(|t| t.attempts.len() == 1), "{s:#?}");
    let jobs = c.list_jobs().await.unwrap();
    assert_eq!(jobs.iter().filter(|j| j.job_id == job_id).count(), 1);
    // A launch without a name gets one from the client, so its retry is idempotent too.
    let proxy = LossyProxy::start(&ctl.url(), 1).await;
    let c = iris_controller::Cluster::new(&proxy.addr);
    let mut unnamed = sh_job("unnamed", 1, "true");
    unnamed.name.clear();
    let id = c.launch(&unnamed).await.unwrap();
    assert_eq!(job_state(&c.wait(&id, JOB).await.unwrap()), JobState::Succeeded);
    let before = c.list_jobs().await.unwrap().len();
    assert_eq!(before, 2, "one job per launch: {:?}", c.list_jobs().await.unwrap());
}
