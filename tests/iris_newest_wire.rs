//! Our newest-generation protos (proto/newest, `iris_worker::proto::newest`) against the
//! installed newest Iris package (marin-iris 0.2.227 and finelog 0.2.71 in the venv
//! scripts/setup builds): the package's own generated classes are the peer, run in that venv's
//! Python by tests/iris_newest/wire_check.py.
//!
//! - every message, enum and RPC we declare has the package's names, numbers, types, oneofs
//!   and reserved numbers;
//! - the messages a worker exchanges (RunTaskRequest, ReconcileRequest/Response,
//!   AttemptObservation, TaskStatus, RegisterRequest, PushLogsRequest), filled in every field,
//!   encoded by our types decode in the package's classes to the same values field by field,
//!   and the package's encoding of those values decodes in our types to the same message.
//!
//! No root needed; the venv is (the tests say how to make it when it is missing).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use iris_worker::proto::newest::FILE_DESCRIPTOR_SET;
use iris_worker::proto::newest::finelog::logging as finelog;
use iris_worker::proto::newest::iris::cluster::{controller, worker};
use iris_worker::proto::newest::iris::{job, time};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, SerializeOptions, Value};

/// The newest-Iris venv's interpreter: `$IRIS_CACHE_DIR/iris-newest-venv` (scripts/setup).
fn newest_python() -> PathBuf {
    let cache =
        std::env::var_os("IRIS_CACHE_DIR").map_or_else(|| PathBuf::from("/var/cache/iris-worker"), PathBuf::from);
    let python = cache.join("iris-newest-venv/bin/python");
    assert!(
        python.exists(),
        "no newest-Iris venv at {}: run scripts/setup, which installs tests/iris_newest/requirements.txt \
         (marin-iris 0.2.227, finelog 0.2.71) into a Python 3.12 venv there",
        python.display()
    );
    python
}

fn wire_check() -> Command {
    let mut cmd = Command::new(newest_python());
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/iris_newest/wire_check.py"));
    cmd
}

#[test]
fn our_newest_protos_match_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("newest.pb");
    std::fs::write(&set, FILE_DESCRIPTOR_SET).unwrap();
    let out = wire_check().arg("descriptors").arg(&set).output().unwrap();
    assert!(
        out.status.success(),
        "proto/newest differs from the package:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- fixtures: every field set to a value that is not its default ----------------------

fn ts(epoch_ms: i64) -> time::Timestamp {
    time::Timestamp { epoch_ms }
}

fn text(v: &str) -> job::AttributeValue {
    job::AttributeValue { value: Some(job::attribute_value::Value::StringValue(v.into())) }
}

fn int(v: i64) -> job::AttributeValue {
    job::AttributeValue { value: Some(job::attribute_value::Value::IntValue(v)) }
}

fn float(v: f64) -> job::AttributeValue {
    job::AttributeValue { value: Some(job::attribute_value::Value::FloatValue(v)) }
}

fn run_task_request() -> job::RunTaskRequest {
    job::RunTaskRequest {
        task_id: "/alice/train/3".into(),
        num_tasks: 4,
        entrypoint: Some(job::RuntimeEntrypoint {
            setup_commands: vec!["uv sync --frozen".into(), "echo ready".into()],
            run_command: Some(job::CommandEntrypoint {
                argv: vec!["bash".into(), "-c".into(), "exec python -u main.py".into()],
            }),
            workdir_files: [("_callable.pkl".to_string(), vec![0x80, 0x05, 0x00, 0xff])].into(),
            workdir_file_refs: [("data/weights.bin".to_string(), "ab".repeat(32))].into(),
        }),
        environment: Some(job::EnvironmentConfig {
            env_vars: [("HF_DATASETS_TRUST_REMOTE_CODE".to_string(), "1".to_string())].into(),
            secrets: [("hf-token".to_string(), "s3cr3t".to_string())].into(),
            setup_scripts: vec!["set -euo pipefail".into()],
        }),
        bundle_id: "c0".repeat(32),
        resources: Some(job::ResourceSpecProto {
            cpu_millicores: 1500,
            memory_bytes: 3 << 30,
            disk_bytes: 20 << 30,
            device: Some(job::DeviceConfig {
                device: Some(job::device_config::Device::Gpu(job::GpuDevice { variant: "H100".into(), count: 8 })),
            }),
        }),
        timeout: Some(time::Duration { milliseconds: 3_600_000 }),
        ports: vec!["http".into(), "actor".into()],
        attempt_id: 2,
        constraints: vec![job::Constraint {
            key: "region".into(),
            op: job::ConstraintOp::In as i32,
            value: Some(text("us-central1")),
            values: vec![text("us-east1"), int(7), float(2.5)],
            mode: job::ConstraintMode::Preferred as i32,
        }],
        task_image: "ghcr.io/marin/task:2026.10".into(),
        attempt_uid: "0123456789abcdef".into(),
        coscheduling: Some(job::CoschedulingConfig { group_by: "tpu-name".into() }),
        priority: job::PriorityBand::System as i32,
        container_profile: job::ContainerProfile::Sandbox as i32,
        egress_policy: job::EgressPolicy::None as i32,
        task_token: "task-token-xyz".into(),
    }
}

fn output_archive() -> job::TaskOutputArchive {
    job::TaskOutputArchive {
        state: job::task_output_archive::State::TaskOutputArchiveStateUploaded as i32,
        uri: "gs://bucket/outputs/0123456789abcdef.tar.zst".into(),
        size_bytes: 123_456,
        sha256: "ef".repeat(32),
        error: "2 files skipped".into(),
        retention: job::task_output_archive::Retention::TaskOutputArchiveRetentionTtl as i32,
        ttl_days: 14,
        skipped_count: 2,
        skipped_sample: vec![job::TaskOutputSkippedEntry { path: "out/huge.bin".into(), reason: "too large".into() }],
    }
}

fn resource_usage() -> job::ResourceUsage {
    job::ResourceUsage { memory_mb: 512, disk_mb: 40, cpu_millicores: 950, memory_peak_mb: 700, process_count: 3 }
}

fn attempt_observation() -> worker::AttemptObservation {
    worker::AttemptObservation {
        attempt_uid: "0123456789abcdef".into(),
        state: job::TaskState::Failed as i32,
        exit_code: 3,
        error: "Exit code: 3".into(),
        container_id: "iris-0123456789abcdef".into(),
        finished_at: Some(ts(1_790_000_000_123)),
        resource_usage: Some(resource_usage()),
        output_archive: Some(output_archive()),
        status_message: "exited".into(),
    }
}

fn reconcile_request() -> worker::ReconcileRequest {
    worker::ReconcileRequest {
        worker_id: "worker-a".into(),
        desired: vec![
            worker::DesiredAttempt {
                attempt_uid: "0123456789abcdef".into(),
                intent: Some(worker::desired_attempt::Intent::Run(worker::AttemptSpec {
                    request: Some(run_task_request()),
                })),
            },
            worker::DesiredAttempt {
                attempt_uid: "fedcba9876543210".into(),
                intent: Some(worker::desired_attempt::Intent::Stop(worker::StopReason::TaskTimeout as i32)),
            },
        ],
    }
}

fn reconcile_response() -> worker::ReconcileResponse {
    worker::ReconcileResponse {
        worker_id: "worker-a".into(),
        observed: vec![
            attempt_observation(),
            worker::AttemptObservation {
                attempt_uid: "fedcba9876543210".into(),
                state: job::TaskState::Missing as i32,
                ..Default::default()
            },
        ],
        health: Some(worker::WorkerHealth {
            healthy: true,
            health_error: "disk low".into(),
            resources: Some(job::WorkerResourceSnapshot {
                timestamp: Some(ts(1_790_000_000_000)),
                host_cpu_percent: 37,
                memory_used_bytes: 5 << 30,
                memory_total_bytes: 24 << 30,
                disk_used_bytes: 80 << 30,
                disk_total_bytes: 250 << 30,
                running_task_count: 2,
                total_process_count: 9,
                net_recv_bytes: 1 << 40,
                net_sent_bytes: (1 << 33) + 5,
            }),
        }),
    }
}

fn task_status() -> job::TaskStatus {
    job::TaskStatus {
        task_id: "/alice/train/3".into(),
        state: job::TaskState::Running as i32,
        worker_id: "worker-a".into(),
        worker_address: "10.0.0.7:8080".into(),
        exit_code: 137,
        error: "previous attempt preempted".into(),
        started_at: Some(ts(1_790_000_000_001)),
        finished_at: Some(ts(1_790_000_000_002)),
        ports: [("http".to_string(), 12001)].into(),
        resource_usage: Some(resource_usage()),
        build_metrics: Some(job::BuildMetrics {
            build_started: Some(ts(1_790_000_000_003)),
            build_finished: Some(ts(1_790_000_000_004)),
            from_cache: true,
            image_tag: "venv:abc".into(),
        }),
        current_attempt_id: 2,
        attempts: vec![job::TaskAttempt {
            attempt_id: 1,
            worker_id: "worker-b".into(),
            state: job::TaskState::WorkerFailed as i32,
            exit_code: -9,
            error: "worker lost".into(),
            started_at: Some(ts(1_789_999_000_000)),
            finished_at: Some(ts(1_789_999_500_000)),
            is_worker_failure: true,
            attempt_uid: "aaaaaaaaaaaaaaaa".into(),
            pod_name: "pod-1".into(),
            pod_uid: "uid-1".into(),
            node_name: "node-1".into(),
            terminal_reason: "worker_lost_spec".into(),
            output_archive: Some(output_archive()),
        }],
        pending_reason: "waiting for a TPU".into(),
        can_be_scheduled: true,
        container_id: "iris-0123456789abcdef".into(),
        backend_id: "default".into(),
        cluster: "us-central".into(),
        submitted_at: Some(ts(1_789_998_000_000)),
        status_message: "running step 7".into(),
    }
}

fn register_request() -> controller::RegisterRequest {
    controller::RegisterRequest {
        address: "10.0.0.7:8080".into(),
        metadata: Some(job::WorkerMetadata {
            hostname: "host-a".into(),
            ip_address: "10.0.0.7".into(),
            cpu_count: 96,
            memory_bytes: 400 << 30,
            disk_bytes: 2 << 40,
            device: Some(job::DeviceConfig {
                device: Some(job::device_config::Device::Tpu(job::TpuDevice {
                    variant: "v5p-8".into(),
                    topology: "2x2x1".into(),
                    count: 4,
                })),
            }),
            tpu_name: "tpu-a".into(),
            tpu_worker_hostnames: "h0,h1".into(),
            tpu_worker_id: "1".into(),
            tpu_chips_per_host_bounds: "2,2,1".into(),
            gpu_count: 1,
            gpu_name: "none".into(),
            gpu_memory_mb: 16,
            gce_instance_name: "vm-a".into(),
            gce_zone: "us-central1-a".into(),
            attributes: [
                ("device-type".to_string(), text("tpu")),
                ("tpu-vm-count".to_string(), int(2)),
                ("weight".to_string(), float(0.5)),
            ]
            .into(),
            provenance: Some(job::Provenance {
                tree_hash: "1234abcd".into(),
                base_commit: "feedbeef".into(),
                dirty: true,
                branch: "main".into(),
                built_by: "ci".into(),
            }),
        }),
        worker_id: "worker-a".into(),
        slice_id: "slice-a".into(),
        scale_group: "tpu-v5p".into(),
    }
}

fn push_logs_request() -> finelog::PushLogsRequest {
    finelog::PushLogsRequest {
        key: "/alice/train/3:2".into(),
        entries: vec![finelog::LogEntry {
            timestamp: Some(finelog::Timestamp { epoch_ms: 1_790_000_000_005 }),
            source: "stderr".into(),
            data: "W1207 step 7: loss=1.5 ✓".into(),
            attempt_id: 2,
            level: finelog::LogLevel::Warning as i32,
            key: "/alice/train/3:2".into(),
            seq: 41,
        }],
        cluster: "us-central".into(),
    }
}

// ---- the round trip ---------------------------------------------------------------------

/// Decodes the package's bytes in our type and compares with the fixture.
type SameInOurs = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// One message of the round trip: its full proto name, our encoding, and a check that the
/// package's encoding decodes in our type to the same message.
struct Case {
    name: &'static str,
    ours: Vec<u8>,
    same_in_ours: SameInOurs,
}

fn case<M: Message + Default + PartialEq + std::fmt::Debug + 'static>(name: &'static str, msg: M) -> Case {
    let ours = msg.encode_to_vec();
    Case {
        name,
        ours,
        same_in_ours: Box::new(move |theirs| {
            let decoded = M::decode(theirs).map_err(|e| format!("{name}: the package's bytes do not decode: {e}"))?;
            if decoded == msg {
                Ok(())
            } else {
                Err(format!("{name}: the package's encoding decodes to\n{decoded:#?}\nnot\n{msg:#?}"))
            }
        }),
    }
}

/// Which fields a fixture sets, over every message instance it holds: a field (or a real
/// oneof) never set anywhere would go unchecked, so it is reported.
fn unset_fields(
    msg: &DynamicMessage,
    set: &mut BTreeMap<String, BTreeSet<String>>,
    types: &mut BTreeMap<String, BTreeSet<String>>,
) {
    let desc = msg.descriptor();
    let wanted = types.entry(desc.full_name().to_string()).or_default();
    for field in desc.fields() {
        match field.containing_oneof().filter(|o| !o.is_synthetic()) {
            Some(oneof) => wanted.insert(format!("oneof {}", oneof.name())),
            None => wanted.insert(field.name().to_string()),
        };
    }
    for (field, value) in msg.fields() {
        let mark = match field.containing_oneof().filter(|o| !o.is_synthetic()) {
            Some(oneof) => format!("oneof {}", oneof.name()),
            None => field.name().to_string(),
        };
        set.entry(desc.full_name().to_string()).or_default().insert(mark);
        let mut visit = |v: &Value| {
            if let Value::Message(m) = v {
                unset_fields(m, set, types);
            }
        };
        match value {
            Value::List(items) => items.iter().for_each(&mut visit),
            Value::Map(entries) => entries.values().for_each(&mut visit),
            other => visit(other),
        }
    }
}

#[test]
fn messages_round_trip_through_the_package_classes() {
    let cases = [
        case("iris.job.RunTaskRequest", run_task_request()),
        case("iris.cluster.Worker.ReconcileRequest", reconcile_request()),
        case("iris.cluster.Worker.ReconcileResponse", reconcile_response()),
        case("iris.cluster.Worker.AttemptObservation", attempt_observation()),
        case("iris.job.TaskStatus", task_status()),
        case("iris.cluster.Controller.RegisterRequest", register_request()),
        case("finelog.logging.PushLogsRequest", push_logs_request()),
    ];
    let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET).unwrap();
    let mut input = String::new();
    let (mut set, mut types) = (BTreeMap::new(), BTreeMap::new());
    for c in &cases {
        let desc = pool.get_message_by_name(c.name).unwrap_or_else(|| panic!("{} is not in proto/newest", c.name));
        let dynamic = DynamicMessage::decode(desc, c.ours.as_slice()).unwrap();
        unset_fields(&dynamic, &mut set, &mut types);
        let json = dynamic
            .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new().use_proto_field_name(true))
            .unwrap();
        let line = serde_json::json!({"type": c.name, "bytes": B64.encode(&c.ours), "json": json});
        input.push_str(&format!("{line}\n"));
    }
    let never_set: Vec<String> = types
        .iter()
        .flat_map(|(ty, fields)| {
            let set = set.get(ty).cloned().unwrap_or_default();
            fields.difference(&set).map(move |f| format!("{ty}.{f}")).collect::<Vec<_>>()
        })
        .collect();
    assert!(never_set.is_empty(), "the fixtures leave these fields unchecked: {never_set:?}");

    let mut child = wire_check()
        .arg("roundtrip")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "wire_check.py roundtrip failed: {}", String::from_utf8_lossy(&out.stderr));
    let replies: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(replies.len(), cases.len(), "one reply per message");

    let mut problems = Vec::new();
    for (c, reply) in cases.iter().zip(&replies) {
        assert_eq!(reply["type"], c.name);
        for diff in reply["diffs"].as_array().unwrap() {
            problems.push(format!("decoded by the package: {}", diff.as_str().unwrap()));
        }
        let theirs = B64.decode(reply["bytes"].as_str().unwrap()).unwrap();
        if let Err(e) = (c.same_in_ours)(&theirs) {
            problems.push(e);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
