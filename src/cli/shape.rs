//! The flags that shape a task, shared by `task run` (one task on a worker) and `job launch`
//! (each task of a job, through the controller).

use std::collections::HashMap;

use anyhow::Context;

/// A task's limits, deadline, ports and environment.
#[derive(clap::Args, Debug)]
pub struct TaskShape {
    /// CPU per task in millicores (1000 = one core).
    #[arg(long)]
    pub cpu_millicores: Option<i32>,
    /// Memory per task in bytes, or with a K/M/G suffix.
    #[arg(long)]
    pub memory: Option<String>,
    /// Kill a task after this many seconds.
    #[arg(long)]
    pub timeout: Option<i32>,
    /// A named host port per task (IRIS_PORT_<NAME>); repeatable.
    #[arg(long = "port")]
    pub ports: Vec<String>,
    /// KEY=VALUE in the task's environment; repeatable.
    #[arg(long = "env")]
    pub env: Vec<String>,
}

impl TaskShape {
    /// `--memory` as the wire's bytes; 0 when not given (no limit).
    pub fn memory_bytes(&self) -> anyhow::Result<i64> {
        self.memory.as_deref().map(parse_bytes).transpose().context("--memory").map(Option::unwrap_or_default)
    }

    /// `--env` as the wire's map.
    pub fn env_vars(&self) -> anyhow::Result<HashMap<String, String>> {
        self.env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--env {kv:?} is not KEY=VALUE"))
            })
            .collect()
    }
}

/// Parses `64M`, `1G`, `512K` or plain bytes, as the wire's int64.
pub fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    i64::try_from(super::config::parse_size(s)?).with_context(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_bytes("64M").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn env_is_key_value_and_memory_defaults_to_no_limit() {
        let shape = |env: &[&str], memory: Option<&str>| TaskShape {
            cpu_millicores: None,
            memory: memory.map(str::to_string),
            timeout: None,
            ports: vec![],
            env: env.iter().map(|e| e.to_string()).collect(),
        };
        assert_eq!(shape(&["A=1", "B=x=y"], None).env_vars().unwrap()["B"], "x=y");
        assert!(shape(&["NOEQ"], None).env_vars().unwrap_err().to_string().contains("--env \"NOEQ\""));
        assert_eq!(shape(&[], None).memory_bytes().unwrap(), 0);
        assert_eq!(shape(&[], Some("1K")).memory_bytes().unwrap(), 1024);
        assert!(format!("{:#}", shape(&[], Some("lots")).memory_bytes().unwrap_err()).contains("--memory"));
    }
}
