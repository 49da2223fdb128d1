//! The newest wire's RunTaskRequest as a [`TaskSpec`], and task views as its TaskStatus.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use prost::Message;

use crate::env::ContainerProfile;
use crate::proto::newest::iris::job::{self, RunTaskRequest};
use crate::proto::newest::iris::time::Timestamp;
use crate::rpc::figures::{WireBuild, WireUsage};
use crate::task::{Command, TaskError, TaskSpec, TaskView};

fn invalid(field: &str, reason: impl Into<String>) -> TaskError {
    TaskError::Invalid { field: field.to_string(), reason: reason.into() }
}

/// The controller bundles come from (`<controller>/blobs/<sha256>`), set once at start: a task
/// accepted before a restart is read back from its `request.pb` through a plain function.
static CONTROLLER: OnceLock<String> = OnceLock::new();

/// Sets the controller's URL for [`decode_request`] (the first call wins).
pub fn set_controller(url: &str) {
    let _ = CONTROLLER.set(url.trim_end_matches('/').to_string());
}

/// A task's `request.pb` (the newest RunTaskRequest as received) as its spec again.
pub fn decode_request(raw: &[u8]) -> Result<TaskSpec, TaskError> {
    let req = RunTaskRequest::decode(raw).map_err(|e| invalid("request", format!("cannot be decoded: {e}")))?;
    task_spec(req, CONTROLLER.get().map(String::as_str))
}

/// The request's `container_profile` (already authorized by the controller). GVISOR is refused:
/// this worker does not run tasks under gVisor's `runsc`.
fn container_profile(value: i32) -> Result<ContainerProfile, TaskError> {
    use job::ContainerProfile as Wire;
    match Wire::try_from(value) {
        Ok(Wire::Unspecified | Wire::Default) => Ok(ContainerProfile::Default),
        Ok(Wire::Restricted) => Ok(ContainerProfile::Restricted),
        Ok(Wire::DockerAccess) => Ok(ContainerProfile::DockerAccess),
        Ok(Wire::Privileged) => Ok(ContainerProfile::Privileged),
        Ok(Wire::Sandbox) => Ok(ContainerProfile::Sandbox),
        Ok(Wire::Gvisor) if crate::env::find_runsc().is_some() => Ok(ContainerProfile::Gvisor),
        Ok(Wire::Gvisor) => Err(invalid(
            "container_profile",
            "GVISOR needs gVisor's runsc, which is not installed on this worker (Debian: apt-get install runsc)",
        )),
        Err(_) => Err(invalid("container_profile", format!("{value} is not a ContainerProfile"))),
    }
}

/// The attempt's network, from its `egress_policy` as Iris resolves it (UNSPECIFIED is
/// CLUSTER, SANDBOX's is INTERNET; SANDBOX may not have CLUSTER): `(none, internet only)`.
/// INTERNET — public addresses only — is a network namespace of the task's own with a filtered
/// way out (`runtime::container::egress`), whose rules live in that namespace: a PRIVILEGED
/// task (CAP_NET_ADMIN) could lift them, and gVisor has a network stack of its own, so those
/// two are refused INTERNET rather than given more than asked.
fn network(value: i32, profile: ContainerProfile) -> Result<(bool, bool), TaskError> {
    use job::EgressPolicy as Wire;
    let sandbox = profile == ContainerProfile::Sandbox;
    let internet = || match profile {
        ContainerProfile::Privileged => {
            Err(invalid("egress_policy", "INTERNET cannot be kept for a PRIVILEGED task (it could lift the filter)"))
        }
        ContainerProfile::Gvisor => Err(invalid("egress_policy", "INTERNET is not served under GVISOR by this worker")),
        _ => Ok((false, true)),
    };
    match Wire::try_from(value) {
        Ok(Wire::Unspecified) if sandbox => internet(),
        Ok(Wire::Unspecified) => Ok((false, false)),
        Ok(Wire::Cluster) if sandbox => {
            Err(invalid("egress_policy", "CLUSTER is not allowed with container_profile SANDBOX"))
        }
        Ok(Wire::Cluster) => Ok((false, false)),
        Ok(Wire::None) => Ok((true, false)),
        Ok(Wire::Internet) => internet(),
        Err(_) => Err(invalid("egress_policy", format!("{value} is not an EgressPolicy"))),
    }
}

/// The VMs (hosts) of one slice of TPU `variant`, by Google Cloud's published shapes: v4 and
/// v5p are named by TensorCores (two a chip, four chips a VM), v5litepod (v5e) and v6e by chips
/// (up to eight on one VM, four a VM beyond). `None` for a variant not of these families.
fn vms_per_slice(variant: &str) -> Option<i32> {
    let (family, size) = variant.rsplit_once('-')?;
    let size: i32 = size.parse().ok().filter(|s| *s > 0)?;
    match family {
        "v4" | "v5p" => Some((size / 8).max(1)),
        "v5litepod" | "v6e" if size <= 8 => Some(1),
        "v5litepod" | "v6e" => Some(size / 4),
        _ => None,
    }
}

/// `/user/job/0` → (`/user/job`, 0).
fn job_and_index(task_id: &str) -> (String, i32) {
    match task_id.rsplit_once('/') {
        Some((job, index)) if !job.is_empty() => (job.to_string(), index.parse().unwrap_or(0)),
        _ => (task_id.to_string(), 0),
    }
}

/// A RunTaskRequest (from a Reconcile's AttemptSpec) as a TaskSpec of the newest layout. The
/// IRIS_* variables the request determines go into the spec's variables, after the request's
/// own (they win); the worker adds its own at launch (`env/prepare/newest.rs`).
pub fn task_spec(req: RunTaskRequest, controller: Option<&str>) -> Result<TaskSpec, TaskError> {
    if req.task_id.is_empty() {
        return Err(invalid("task_id", "must not be empty"));
    }
    if req.attempt_uid.is_empty() {
        return Err(invalid("attempt_uid", "must not be empty"));
    }
    let raw_request = req.encode_to_vec();
    let entrypoint = req.entrypoint.unwrap_or_default();
    let environment = req.environment.unwrap_or_default();
    for name in environment.secrets.keys() {
        // Each becomes a file of that name: a path could write anywhere.
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) || name.len() > 255 {
            let field = format!("environment.secrets[{:?}]", crate::task::short(name));
            return Err(invalid(&field, "must be a file name (no '/', not '.' or '..', at most 255 bytes)"));
        }
    }
    // Iris's task images are registry references; a local layout or the host's containerd is
    // the operator's to name (`--default-task-image`), not a request's.
    let task_image = match req.task_image.as_str() {
        "" => None,
        image => match crate::env::image::ImageRef::parse(image) {
            Ok(crate::env::image::ImageRef::Registry(_)) => Some(image.to_string()),
            Ok(_) => return Err(invalid("task_image", "must be a registry reference (registry/repository:tag)")),
            Err(e) => return Err(invalid("task_image", e.to_string())),
        },
    };
    let container_profile = container_profile(req.container_profile)?;
    let (no_network, internet_only) = network(req.egress_policy, container_profile)?;
    let res = req.resources.unwrap_or_default();
    for (field, value) in [("resources.memory_bytes", res.memory_bytes), ("resources.disk_bytes", res.disk_bytes)] {
        if value < 0 {
            return Err(invalid(field, "must not be negative"));
        }
    }
    if res.cpu_millicores < 0 {
        return Err(invalid("resources.cpu_millicores", "must not be negative"));
    }
    let bundle = if req.bundle_id.is_empty() {
        None
    } else {
        if !is_sha256(&req.bundle_id) {
            return Err(invalid("bundle_id", "must be a SHA-256 in hex"));
        }
        let Some(controller) = controller else {
            return Err(invalid("bundle_id", "this worker has no controller to fetch bundles from"));
        };
        let controller = controller.trim_end_matches('/');
        Some((format!("{controller}/blobs/{}", req.bundle_id), req.bundle_id.to_ascii_lowercase()))
    };
    let mut refs = Vec::with_capacity(entrypoint.workdir_file_refs.len());
    for (path, blob) in &entrypoint.workdir_file_refs {
        let field = format!("entrypoint.workdir_file_refs[{:?}]", crate::task::short(path));
        let relative = !path.is_empty()
            && !path.contains('\0')
            && std::path::Path::new(path).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !relative {
            return Err(invalid(&field, "must be a relative path inside the workdir (no '..', no leading '/')"));
        }
        if !is_sha256(blob) {
            return Err(invalid(&field, "must name a blob by its SHA-256 in hex"));
        }
        let Some(controller) = controller else {
            return Err(invalid(&field, "this worker has no controller to fetch blobs from"));
        };
        let controller = controller.trim_end_matches('/');
        let blob = blob.to_ascii_lowercase();
        refs.push((path.clone(), format!("{controller}/blobs/{blob}"), blob));
    }
    refs.sort();
    let user_env: BTreeMap<String, String> = environment.env_vars.into_iter().collect();
    let mut env_vars = user_env.clone();
    let mut set = |k: &str, v: String| {
        env_vars.insert(k.to_string(), v);
    };
    // Always with the attempt suffix, even `:0` (Iris PR #6951): the log key matches it.
    set("IRIS_TASK_ID", format!("{}:{}", req.task_id, req.attempt_id));
    set("IRIS_ATTEMPT_UID", req.attempt_uid.clone());
    if !req.bundle_id.is_empty() {
        set("IRIS_BUNDLE_ID", req.bundle_id.clone());
    }
    if !req.task_token.is_empty() {
        set("IRIS_TASK_TOKEN", req.task_token.clone());
    }
    set("IRIS_JOB_SETUP_SCRIPTS", serde_json::Value::from(environment.setup_scripts.clone()).to_string());
    set("IRIS_JOB_ENV", serde_json::to_string(&user_env).unwrap_or_else(|_| "{}".into()));
    set("UV_LINK_MODE", "copy".into());
    let tpu_device = match res.device.as_ref().and_then(|d| d.device.as_ref()) {
        Some(job::device_config::Device::Tpu(t)) => Some(t),
        _ => None,
    };
    let tpu = tpu_device.is_some();
    if tpu && matches!(container_profile, ContainerProfile::Sandbox | ContainerProfile::Gvisor) {
        // A TPU needs a privileged container; a sandbox must not be one (Iris's controller
        // refuses this pair too: its sandboxes are CPU-only).
        return Err(invalid("container_profile", "SANDBOX and GVISOR are CPU-only: a TPU task cannot run in one"));
    }
    if tpu && internet_only {
        // A TPU task is privileged: it could lift the filter.
        return Err(invalid("egress_policy", "INTERNET cannot be kept for a TPU task (it runs privileged)"));
    }
    if let Some(device) = tpu_device {
        // JAX's platform for a TPU task, as Iris sets it; the request's own values win.
        for (k, v) in [("JAX_PLATFORMS", "tpu,cpu"), ("PJRT_DEVICE", "TPU"), ("JAX_FORCE_TPU_INIT", "1")] {
            env_vars.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
        // A job over several slices learns their number and size, as Iris tells it.
        if let Some(per_slice) = vms_per_slice(&device.variant)
            && req.num_tasks > 1
        {
            if req.num_tasks % per_slice != 0 {
                let why =
                    format!("{} tasks do not fill whole {} slices of {per_slice} VMs", req.num_tasks, device.variant);
                return Err(invalid("resources.device.tpu", &why));
            }
            let slices = req.num_tasks / per_slice;
            // Iris's own values replace the request's.
            env_vars.remove("IRIS_SLICE_COUNT");
            env_vars.remove("IRIS_TASKS_PER_SLICE");
            if slices > 1 {
                env_vars.insert("IRIS_SLICE_COUNT".into(), slices.to_string());
                env_vars.insert("IRIS_TASKS_PER_SLICE".into(), per_slice.to_string());
            }
        }
    }
    let (job_id, task_index) = job_and_index(&req.task_id);
    let mut spec = TaskSpec {
        task_id: req.task_id,
        job_id,
        task_index,
        num_tasks: req.num_tasks,
        attempt_id: req.attempt_id,
        command: Some(Command {
            argv: entrypoint.run_command.map(|c| c.argv).unwrap_or_default(),
            setup_commands: entrypoint.setup_commands,
        }),
        env_vars,
        bundle_gcs_path: bundle.as_ref().map(|(url, _)| url.clone()),
        bundle_sha256: bundle.map(|(_, sha)| sha),
        // The controller enforces the timeout (a stop with TASK_TIMEOUT), not the worker.
        timeout: None,
        ports: req.ports,
        disk_bytes: (res.disk_bytes > 0).then_some(res.disk_bytes as u64),
        workdir_files: entrypoint.workdir_files.into_iter().collect(),
        raw_request,
        attempt_uid: Some(req.attempt_uid),
        workdir_file_refs: refs,
        secrets: crate::env::spec::Secrets(environment.secrets.into_iter().collect()),
        container_profile: Some(container_profile),
        image: task_image,
        tpu,
        no_network,
        internet_only,
        ..Default::default()
    };
    spec.limits.cpu_millicores = (res.cpu_millicores > 0).then_some(res.cpu_millicores as u32);
    spec.limits.memory_bytes = (res.memory_bytes > 0).then_some(res.memory_bytes as u64);
    Ok(spec)
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn ts(ms: i64) -> Option<Timestamp> {
    (ms > 0).then_some(Timestamp { epoch_ms: ms })
}

/// A task as the newest TaskStatus (what Iris's worker fills: not worker_id, not
/// status_message).
pub fn task_status(v: TaskView) -> job::TaskStatus {
    let build = WireBuild::of(&v);
    let attempts = v.attempts.into_iter().map(|a| job::TaskAttempt {
        attempt_id: a.attempt_id,
        state: super::reconcile::wire_state(a.state) as i32,
        exit_code: a.exit_code,
        error: a.error,
        started_at: ts(a.started_at_ms),
        finished_at: ts(a.finished_at_ms),
        is_worker_failure: a.is_worker_failure,
        ..Default::default()
    });
    job::TaskStatus {
        task_id: v.task_id,
        state: super::reconcile::wire_state(v.state) as i32,
        exit_code: v.exit_code,
        error: v.error,
        started_at: ts(v.started_at_ms),
        finished_at: ts(v.finished_at_ms),
        ports: v.ports.into_iter().map(|(k, p)| (k, i32::from(p))).collect(),
        resource_usage: v.usage.as_ref().map(WireUsage::from).map(|u| job::ResourceUsage {
            memory_mb: u.memory_mb,
            disk_mb: u.disk_mb,
            cpu_millicores: u.cpu_millicores,
            memory_peak_mb: u.memory_peak_mb,
            process_count: u.process_count,
        }),
        build_metrics: build.map(|b| job::BuildMetrics {
            build_started: ts(b.started_ms),
            build_finished: ts(b.finished_ms),
            from_cache: b.from_cache,
            image_tag: b.image_tag,
        }),
        current_attempt_id: v.current_attempt_id,
        attempts: attempts.collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::newest::iris::job::{CommandEntrypoint, EnvironmentConfig, RuntimeEntrypoint};

    fn request() -> RunTaskRequest {
        RunTaskRequest {
            task_id: "/alice/job/1".into(),
            attempt_id: 2,
            attempt_uid: "00112233aabbccdd".into(),
            num_tasks: 3,
            entrypoint: Some(RuntimeEntrypoint {
                setup_commands: vec!["echo setup".into()],
                run_command: Some(CommandEntrypoint { argv: vec!["bash".into(), "-c".into(), "echo hi".into()] }),
                workdir_files: [("_callable.pkl".to_string(), b"x".to_vec())].into(),
                workdir_file_refs: [("big/data.bin".to_string(), "CD".repeat(32))].into(),
            }),
            environment: Some(EnvironmentConfig {
                env_vars: [("A".to_string(), "1".to_string()), ("IRIS_TASK_ID".into(), "forged".into())].into(),
                setup_scripts: vec!["uv sync".into()],
                ..Default::default()
            }),
            bundle_id: "ab".repeat(32),
            task_token: "secret-token".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_request_becomes_a_spec_of_the_newest_layout() {
        let spec = task_spec(request(), Some("http://127.0.0.1:10000/")).unwrap();
        assert_eq!((spec.job_id.as_str(), spec.task_index, spec.attempt_id), ("/alice/job", 1, 2));
        assert_eq!(spec.attempt_uid.as_deref(), Some("00112233aabbccdd"));
        let command = spec.command.as_ref().unwrap();
        assert_eq!(command.argv, ["bash", "-c", "echo hi"]);
        assert_eq!(command.setup_commands, ["echo setup"]);
        assert_eq!(spec.env_vars["IRIS_TASK_ID"], "/alice/job/1:2", "the wire's id wins over the request's");
        assert_eq!(spec.env_vars["A"], "1");
        assert_eq!(spec.env_vars["IRIS_TASK_TOKEN"], "secret-token");
        assert_eq!(spec.env_vars["IRIS_JOB_SETUP_SCRIPTS"], r#"["uv sync"]"#);
        let sha = "ab".repeat(32);
        assert_eq!(spec.bundle_gcs_path, Some(format!("http://127.0.0.1:10000/blobs/{sha}")));
        assert_eq!(spec.bundle_sha256, Some(sha));
        assert_eq!(spec.workdir_files, [("_callable.pkl".to_string(), b"x".to_vec())]);
        let blob = "cd".repeat(32);
        let want_ref = ("big/data.bin".to_string(), format!("http://127.0.0.1:10000/blobs/{blob}"), blob.clone());
        assert_eq!(spec.workdir_file_refs, [want_ref]);
        // The request is kept, and reads back to the same spec (map order aside, the bytes too).
        set_controller("http://127.0.0.1:10000");
        let mut again = decode_request(&spec.raw_request).unwrap();
        assert_eq!(
            RunTaskRequest::decode(again.raw_request.as_slice()),
            RunTaskRequest::decode(spec.raw_request.as_slice())
        );
        again.raw_request = spec.raw_request.clone();
        assert_eq!(again, spec);
    }

    #[test]
    fn a_tpu_request_is_marked_and_gets_jax_tpu_variables_unless_it_sets_them() {
        let mut req = request();
        req.resources = Some(job::ResourceSpecProto {
            device: Some(job::DeviceConfig {
                device: Some(job::device_config::Device::Tpu(job::TpuDevice {
                    variant: "v5litepod-8".into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        });
        req.environment.get_or_insert_default().env_vars.insert("JAX_PLATFORMS".into(), "tpu".into());
        let spec = task_spec(req, Some("http://c")).unwrap();
        assert!(spec.tpu);
        assert_eq!(spec.env_vars["JAX_PLATFORMS"], "tpu", "the request's own value wins");
        assert_eq!((spec.env_vars["PJRT_DEVICE"].as_str(), spec.env_vars["JAX_FORCE_TPU_INIT"].as_str()), ("TPU", "1"));
        let plain = task_spec(request(), Some("http://c")).unwrap();
        assert!(!plain.tpu && !plain.env_vars.contains_key("PJRT_DEVICE"));
        for profile in [job::ContainerProfile::Sandbox, job::ContainerProfile::Gvisor] {
            let mut sandboxed = request();
            sandboxed.resources = Some(job::ResourceSpecProto {
                device: Some(job::DeviceConfig { device: Some(job::device_config::Device::Tpu(Default::default())) }),
                ..Default::default()
            });
            sandboxed.container_profile = profile as i32;
            // GVISOR is refused first where runsc is missing; either way, by container_profile.
            assert!(
                matches!(task_spec(sandboxed, Some("http://c")), Err(TaskError::Invalid { field, .. }) if field == "container_profile"),
                "{profile:?}"
            );
        }
    }

    #[test]
    fn the_egress_policy_decides_the_network_as_iris_resolves_it() {
        use job::{ContainerProfile as P, EgressPolicy as E};
        let network = |profile: P, egress: E| {
            let mut req = request();
            req.container_profile = profile as i32;
            req.egress_policy = egress as i32;
            task_spec(req, Some("http://c")).map(|s| (s.no_network, s.internet_only))
        };
        assert_eq!(network(P::Default, E::Unspecified).unwrap(), (false, false), "CLUSTER: the host's network");
        assert_eq!(network(P::Default, E::Cluster).unwrap(), (false, false));
        assert_eq!(network(P::Default, E::None).unwrap(), (true, false));
        assert_eq!(network(P::Default, E::Internet).unwrap(), (false, true));
        assert_eq!(network(P::Sandbox, E::Unspecified).unwrap(), (false, true), "SANDBOX's default: INTERNET");
        assert_eq!(network(P::Sandbox, E::Internet).unwrap(), (false, true));
        assert_eq!(network(P::Sandbox, E::None).unwrap(), (true, false));
        for (profile, egress) in [(P::Sandbox, E::Cluster), (P::Privileged, E::Internet)] {
            match network(profile, egress) {
                Err(TaskError::Invalid { field, .. }) => assert_eq!(field, "egress_policy"),
                other => panic!("{profile:?} {egress:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_multi_slice_tpu_job_learns_its_slices() {
        assert_eq!(
            ["v4-8", "v4-32", "v5p-128", "v5litepod-8", "v5litepod-16", "v6e-256", "v6e-1", "h100-8", "v4"]
                .map(vms_per_slice),
            [Some(1), Some(4), Some(16), Some(1), Some(4), Some(64), Some(1), None, None]
        );
        let tpu = |variant: &str, num_tasks: i32| {
            let mut req = request();
            req.num_tasks = num_tasks;
            req.resources = Some(job::ResourceSpecProto {
                device: Some(job::DeviceConfig {
                    device: Some(job::device_config::Device::Tpu(job::TpuDevice {
                        variant: variant.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            });
            task_spec(req, Some("http://c"))
        };
        let two_slices = tpu("v5litepod-16", 8).unwrap().env_vars;
        assert_eq!((two_slices["IRIS_SLICE_COUNT"].as_str(), two_slices["IRIS_TASKS_PER_SLICE"].as_str()), ("2", "4"));
        assert!(!tpu("v5litepod-16", 4).unwrap().env_vars.contains_key("IRIS_SLICE_COUNT"), "one slice");
        assert!(
            matches!(tpu("v5litepod-16", 6), Err(TaskError::Invalid { field, .. }) if field == "resources.device.tpu")
        );
    }

    #[test]
    fn a_task_image_is_the_attempts_image() {
        let mut req = request();
        req.task_image = "ghcr.io/marin/iris-task:1".into();
        assert_eq!(task_spec(req, Some("http://c")).unwrap().image.as_deref(), Some("ghcr.io/marin/iris-task:1"));
        assert_eq!(task_spec(request(), Some("http://c")).unwrap().image, None);
    }

    #[test]
    fn what_this_worker_refuses_is_refused_naming_the_field() {
        type Break = fn(&mut RunTaskRequest);
        let cases: [(&str, Break); 7] = [
            ("attempt_uid", |r| r.attempt_uid.clear()),
            ("entrypoint.workdir_file_refs[\"../x\"]", |r| {
                r.entrypoint.as_mut().unwrap().workdir_file_refs.insert("../x".into(), "ab".repeat(32));
            }),
            ("entrypoint.workdir_file_refs[\"y\"]", |r| {
                r.entrypoint.as_mut().unwrap().workdir_file_refs.insert("y".into(), "not-a-sha".into());
            }),
            ("bundle_id", |r| r.bundle_id = "../../etc".into()),
            ("task_image", |r| r.task_image = "oci:/var/lib/layout:x".into()),
            ("task_image", |r| r.task_image = "Not A Reference".into()),
            ("environment.secrets[\"../K\"]", |r| {
                r.environment.as_mut().unwrap().secrets.insert("../K".into(), "v".into());
            }),
        ];
        for (field, break_it) in cases {
            let mut req = request();
            break_it(&mut req);
            match task_spec(req, Some("http://c")) {
                Err(TaskError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(matches!(task_spec(request(), None), Err(TaskError::Invalid { field, .. }) if field == "bundle_id"));
    }
}
