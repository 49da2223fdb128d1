//! A task's environment beyond the bare rootfs: the Python root filesystem, the venv built
//! for the task's bundle (cached, single-flight), the runner of pickled Iris entrypoints, and
//! images built from the bundle's Dockerfile through BuildKit (cached, single-flight).
//!
//! [`Environments::prepare`] owns everything between a task's acceptance and its launch: the
//! request as the worker understands it ([`TaskSpec`]), its variables, its bundle, venv, image
//! or Dockerfile build, and the launch spec that comes out. This module decides *what* a Python task runs in; builds run in containers of the same
//! runtime, each under its own supervisor, and log into the log of the task they build for.

pub mod entrypoint;
mod environments;
mod flight;
pub mod image;
#[cfg(feature = "buildkit")]
pub mod image_build;
mod prepare;
pub mod pyproject;
pub mod spec;
mod variables;
pub mod venv;

pub use environments::{EnvError, Environments, EnvironmentsConfig, FetchedBundle, PrepareConfig};
pub use prepare::{Preparing, WORKDIR_IN_TASK, dockerfile_of, find_runsc};
pub use spec::{Command, ContainerProfile, TaskSpec};
pub use variables::{WorkerEnv, task_env};
pub use venv::{PythonEnv, VenvCache, VenvConfig, VenvError, VenvRequest};

/// Where a task's bundle is mounted.
pub const APP: &str = "/app";
/// Where the task's venv is mounted (inside the bundle's mount, as Iris lays it out).
pub const VENV: &str = "/app/.venv";
