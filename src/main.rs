//! The `iris-worker` binary: a thin edge over the library. The command line (`cli/`) is
//! compiled into the binary only; the library does not export it.

mod cli;

// `cli/` names the library's modules as `crate::…`: these imports make them the binary
// crate's paths too.
#[cfg(feature = "buildkit")]
use iris_worker::buildkit;
use iris_worker::{
    Worker, WorkerConfig, bundle, cache, env, exec, heartbeat, janitor, join, logs, proto, rpc, runtime, supervisor,
    task, taskdir,
};

fn main() -> std::process::ExitCode {
    cli::main()
}
