//! The environment of a task: the request's variables, then the IRIS_* ones (which win).

use std::collections::BTreeMap;

use super::spec::TaskSpec;

/// What the worker knows that goes into every task's environment.
#[derive(Debug, Clone)]
pub struct WorkerEnv {
    pub worker_id: String,
    pub controller_address: Option<String>,
    /// The address a task's server should bind.
    pub bind_host: String,
    /// The address others reach the task at.
    pub advertise_host: String,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `KEY=VALUE` list for a task.
pub fn task_env(spec: &TaskSpec, worker: &WorkerEnv, ports: &BTreeMap<String, u16>, workdir: &str) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), "/root".into());
    for (k, v) in &spec.env_vars {
        env.insert(k.clone(), v.clone());
    }
    let mut iris = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    iris("IRIS_JOB_ID", spec.job_id.clone());
    iris("IRIS_TASK_ID", spec.task_id.clone());
    iris("IRIS_TASK_INDEX", spec.task_index.to_string());
    iris("IRIS_NUM_TASKS", spec.num_tasks.to_string());
    iris("IRIS_ATTEMPT_ID", spec.attempt_id.to_string());
    iris("IRIS_WORKER_ID", worker.worker_id.clone());
    iris("IRIS_BIND_HOST", worker.bind_host.clone());
    iris("IRIS_ADVERTISE_HOST", worker.advertise_host.clone());
    iris("IRIS_WORKDIR", workdir.to_string());
    if let Some(c) = &worker.controller_address {
        iris("IRIS_CONTROLLER_ADDRESS", c.clone());
    }
    if let Some(b) = &spec.bundle_gcs_path {
        iris("IRIS_BUNDLE_GCS_PATH", b.clone());
    }
    for (name, port) in ports {
        iris(&format!("IRIS_PORT_{}", name.to_ascii_uppercase()), port.to_string());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iris_variables_win_over_the_request() {
        let spec = TaskSpec {
            task_id: "j/task-1".into(),
            job_id: "j".into(),
            task_index: 1,
            num_tasks: 2,
            env_vars: [("IRIS_TASK_ID".to_string(), "forged".to_string()), ("A".into(), "b".into())].into(),
            ..Default::default()
        };
        let worker = WorkerEnv {
            worker_id: "w".into(),
            controller_address: None,
            bind_host: "127.0.0.1".into(),
            advertise_host: "10.0.0.1".into(),
        };
        let env = task_env(&spec, &worker, &[("http".to_string(), 4000)].into(), "/workdir");
        assert!(env.contains(&"IRIS_TASK_ID=j/task-1".to_string()));
        assert!(env.contains(&"A=b".to_string()));
        assert!(env.contains(&"IRIS_PORT_HTTP=4000".to_string()));
        assert!(env.contains(&"IRIS_NUM_TASKS=2".to_string()));
        assert!(!env.iter().any(|e| e.starts_with("IRIS_CONTROLLER_ADDRESS=")));
    }
}
