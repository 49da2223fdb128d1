//! Iris's pickled entrypoints, run unchanged.
//!
//! What Iris's client (January 2026) sends in `serialized_entrypoint` is
//! `cloudpickle.dumps(Entrypoint(callable, args, kwargs))`: an object of the dataclass
//! `iris.cluster.types.Entrypoint`, which unpickles only where the `iris` package is importable
//! (a real bundle is a workspace that depends on iris, installed by `uv sync`). Our own clients
//! and tests send the plain tuple `(fn, args, kwargs)`. The runner accepts both: an object
//! with `callable`, `args` and `kwargs` attributes, or a 3-tuple.
//!
//! The worker never unpickles anything. It writes the pickle into the task's workdir and runs
//! `python -u -c RUNNER` in the task's venv; the runner loads it, calls `fn(*args, **kwargs)`,
//! writes `cloudpickle.dumps(result)` to `_result.pkl`, and on an exception — while loading the
//! entrypoint (a module the venv lacks, a pickle of another Python, a truncated file) or inside
//! the function — prints the traceback to stderr, writes the exception's one-line summary to
//! `_error.txt` (the task's error), and exits 1.

/// File names in the workdir.
pub const PICKLE: &str = "_entrypoint.pkl";
pub const RESULT: &str = "_result.pkl";
pub const ERROR: &str = "_error.txt";

const RUNNER: &str = r#"
import os, sys, traceback
workdir = os.environ.get("IRIS_WORKDIR", "/workdir")

def fail(stage, e):
    traceback.print_exc()
    sys.stderr.flush()
    summary = "".join(traceback.format_exception_only(type(e), e)).strip()
    with open(os.path.join(workdir, "_error.txt"), "w") as f:
        f.write(stage + summary)
    sys.exit(1)

try:
    import cloudpickle
    with open(os.path.join(workdir, "_entrypoint.pkl"), "rb") as f:
        entry = cloudpickle.load(f)
    if all(hasattr(entry, a) for a in ("callable", "args", "kwargs")):
        fn, args, kwargs = entry.callable, entry.args, entry.kwargs
    elif isinstance(entry, tuple) and len(entry) == 3:
        fn, args, kwargs = entry
    else:
        raise TypeError("the entrypoint is neither an Entrypoint (callable, args, kwargs) nor a "
                        "(fn, args, kwargs) tuple but " + type(entry).__qualname__)
except BaseException as e:
    fail("loading the entrypoint: ", e)
try:
    result = fn(*(args or ()), **(kwargs or {}))
except BaseException as e:
    fail("", e)
with open(os.path.join(workdir, "_result.pkl"), "wb") as f:
    cloudpickle.dump(result, f)
"#;

/// The argv that runs the pickled entrypoint with `python`.
pub fn argv(python: &str) -> Vec<String> {
    vec![python.to_string(), "-u".into(), "-c".into(), RUNNER.trim_start().to_string()]
}
