//! Iris's pickled entrypoints: `cloudpickle.dumps((fn, args, kwargs))`, run unchanged.
//!
//! The worker never unpickles anything. It writes the pickle into the task's workdir and runs
//! `python -u -c RUNNER` in the task's venv; the runner loads it, calls `fn(*args, **kwargs)`,
//! writes `cloudpickle.dumps(result)` to `_result.pkl`, and on an exception prints the
//! traceback to stderr, writes the exception's one-line summary to `_error.txt` (the task's
//! error), and exits 1.

/// File names in the workdir.
pub const PICKLE: &str = "_entrypoint.pkl";
pub const RESULT: &str = "_result.pkl";
pub const ERROR: &str = "_error.txt";

const RUNNER: &str = r#"
import os, sys, traceback
import cloudpickle
workdir = os.environ.get("IRIS_WORKDIR", "/workdir")
with open(os.path.join(workdir, "_entrypoint.pkl"), "rb") as f:
    fn, args, kwargs = cloudpickle.load(f)
try:
    result = fn(*args, **kwargs)
except BaseException as e:
    traceback.print_exc()
    sys.stderr.flush()
    with open(os.path.join(workdir, "_error.txt"), "w") as f:
        f.write("".join(traceback.format_exception_only(type(e), e)).strip())
    sys.exit(1)
with open(os.path.join(workdir, "_result.pkl"), "wb") as f:
    cloudpickle.dump(result, f)
"#;

/// The argv that runs the pickled entrypoint with `python`.
pub fn argv(python: &str) -> Vec<String> {
    vec![python.to_string(), "-u".into(), "-c".into(), RUNNER.trim_start().to_string()]
}
