//! Checks a [`TaskSpec`] before anything is written: each problem names the request field.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use super::TaskError;
use crate::env::TaskSpec;

/// The most memory a task may ask for (1 PiB): more is a unit mistake, not a request.
const MAX_MEMORY: u64 = 1 << 50;
/// The least memory a task may be limited to: below this nothing starts.
const MIN_MEMORY: u64 = 4 << 20;
const MAX_MILLICORES: u32 = 1_000_000;
const MAX_PIDS: i64 = 1 << 22;
const MAX_ID_LEN: usize = 512;
/// The longest file name Linux filesystems take: a task's directory (and cgroup) is named by
/// its escaped id and attempt.
const MAX_NAME_LEN: usize = 255;

pub use iris_wire::text::short;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> TaskError {
    TaskError::Invalid { field: field.into(), reason: reason.into() }
}

fn check_id(field: &str, value: &str) -> Result<(), TaskError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(invalid(field, format!("is longer than {MAX_ID_LEN} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// A port name must make a valid environment variable name (IRIS_PORT_<NAME>).
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Validates `spec`; the error names the first offending field.
pub fn validate(spec: &TaskSpec) -> Result<(), TaskError> {
    check_id("task_id", &spec.task_id)?;
    check_id("job_id", &spec.job_id)?;
    let name = super::store::task_key(&spec.task_id, spec.attempt_id);
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            "task_id",
            format!("its escaped directory name would be {} bytes, more than {MAX_NAME_LEN}", name.len()),
        ));
    }
    if spec.attempt_id < 0 {
        return Err(invalid("attempt_id", "must not be negative"));
    }
    if spec.task_index < 0 {
        return Err(invalid("task_index", "must not be negative"));
    }
    if spec.num_tasks < 0 {
        return Err(invalid("num_tasks", "must not be negative"));
    }
    if let Some(image) = &spec.image {
        match crate::env::dockerfile_of(image) {
            // The Dockerfile is read from the bundle: a path inside it, nothing else.
            Some(path) => {
                let p = Path::new(path);
                if path.contains('\0') || !p.components().all(|c| matches!(c, Component::Normal(_))) {
                    return Err(invalid(
                        "image",
                        format!("the Dockerfile path {:?} must be relative, inside the bundle", short(path)),
                    ));
                }
            }
            None => {
                crate::env::image::ImageRef::parse(image).map_err(|e| invalid("image", e.to_string()))?;
            }
        }
    }
    // A task in an image may leave the command to the image's Entrypoint and Cmd.
    let image = spec.image.is_some();
    match (&spec.command, &spec.serialized_entrypoint) {
        (None, None) if !image => {
            return Err(invalid("command", "a task needs command.argv or a serialized_entrypoint"));
        }
        (None, None) => {}
        (Some(c), _) => {
            if (c.argv.is_empty() && !image) || c.argv.first().is_some_and(|a| a.is_empty()) {
                return Err(invalid("command.argv", "must name a program"));
            }
            if c.argv.iter().chain(&c.setup_commands).any(|a| a.contains('\0')) {
                return Err(invalid("command.argv", "contains a NUL byte"));
            }
        }
        (None, Some(_)) => {}
    }
    for (k, v) in &spec.env_vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!("environment.env_vars[{:?}]", short(k)), "is not a valid variable"));
        }
    }
    if let Some(m) = spec.limits.memory_bytes
        && (!(MIN_MEMORY..=MAX_MEMORY).contains(&m))
    {
        return Err(invalid("resources.memory_bytes", format!("{m} is outside {MIN_MEMORY}..={MAX_MEMORY}")));
    }
    if let Some(c) = spec.limits.cpu_millicores
        && (c == 0 || c > MAX_MILLICORES)
    {
        return Err(invalid("resources.cpu", format!("{c} millicores is outside 1..={MAX_MILLICORES}")));
    }
    if let Some(p) = spec.limits.pids
        && !(1..=MAX_PIDS).contains(&p)
    {
        return Err(invalid("resources.pids_limit", format!("{p} is outside 1..={MAX_PIDS}")));
    }
    if let Some(n) = spec.max_log_bytes
        && n < crate::logs::MIN_CAP
    {
        let min = crate::logs::MIN_CAP;
        return Err(invalid("resources.max_log_bytes", format!("{n} is below the least cap, {min} (0: the worker's)")));
    }
    let mut names = BTreeSet::new();
    for (i, name) in spec.ports.iter().enumerate() {
        if !is_env_name(name) {
            return Err(invalid(
                format!("ports[{i}]"),
                format!("{:?} cannot be an environment variable name", short(name)),
            ));
        }
        if !names.insert(name.to_ascii_uppercase()) {
            return Err(invalid(format!("ports[{i}]"), format!("{:?} is asked twice", short(name))));
        }
    }
    for (path, _) in &spec.workdir_files {
        let p = Path::new(path);
        let ok = !path.is_empty() && !path.contains('\0') && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(invalid(
                format!("workdir_files[{:?}]", short(path)),
                "must be a relative path inside the workdir (no '..', no leading '/')",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Command;

    fn good() -> TaskSpec {
        TaskSpec {
            task_id: "j/task-0".into(),
            job_id: "j".into(),
            command: Some(Command { argv: vec!["true".into()], setup_commands: vec![] }),
            ..Default::default()
        }
    }

    fn field_of(spec: &TaskSpec) -> String {
        match validate(spec) {
            Err(TaskError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(validate(&good()).is_ok());
        assert_eq!(field_of(&TaskSpec { task_id: String::new(), ..good() }), "task_id");
        assert_eq!(field_of(&TaskSpec { job_id: String::new(), ..good() }), "job_id");
        assert_eq!(field_of(&TaskSpec { command: None, ..good() }), "command");
        for image in ["dockerfile:/dev/zero", "dockerfile:../x", "not a ref!"] {
            assert_eq!(field_of(&TaskSpec { image: Some(image.into()), ..good() }), "image", "{image}");
        }
        let mut s = good();
        s.limits.memory_bytes = Some(1);
        assert_eq!(field_of(&s), "resources.memory_bytes");
        let mut s = good();
        s.limits.pids = Some(0);
        assert_eq!(field_of(&s), "resources.pids_limit");
        assert_eq!(field_of(&TaskSpec { max_log_bytes: Some(1000), ..good() }), "resources.max_log_bytes");
        assert_eq!(field_of(&TaskSpec { ports: vec!["http-port".into()], ..good() }), "ports[0]");
        assert_eq!(field_of(&TaskSpec { ports: vec!["a".into(), "A".into()], ..good() }), "ports[1]");
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            let s = TaskSpec { workdir_files: vec![(bad.into(), vec![])], ..good() };
            assert!(field_of(&s).starts_with("workdir_files"), "{bad}");
        }
    }

    #[test]
    fn ids_whose_directory_name_is_too_long_are_refused() {
        // 100 bytes that each escape to 3 ("_2f"): 300 bytes of directory name, under 512 of id.
        let id = "/".repeat(100);
        assert_eq!(field_of(&TaskSpec { task_id: id, ..good() }), "task_id");
        assert_eq!(field_of(&TaskSpec { task_id: "x".repeat(600), ..good() }), "task_id");
        assert!(validate(&TaskSpec { task_id: "x".repeat(240), ..good() }).is_ok());
        let long_port = "p".repeat(10_000) + "-";
        let err = validate(&TaskSpec { ports: vec![long_port], ..good() }).unwrap_err().to_string();
        assert!(err.len() < 200, "the echo is cut: {err}");
    }
}
