//! The `iris-worker` binary: a thin edge over the library.

fn main() -> std::process::ExitCode {
    iris_worker::cli::main()
}
