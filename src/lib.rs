//! iris-worker: a daemonless OCI worker for the Iris cluster.
//!
//! The data path, one module per step (see docs/ARCHITECTURE.md):
//! - [`rpc`]: WorkerService over gRPC and Connect on one port; decodes requests into typed
//!   specs. The wire itself ([`proto`], Connect, TLS, tokens) is the `iris-wire` crate, which
//!   the controller (the `iris-controller` crate) shares.
//! - [`task`]: the TaskManager — states, attempts, concurrency, ports, kill, adoption.
//! - [`buildkit`]: a BuildKit gRPC client that builds Dockerfiles into root filesystems.
//! - [`archive`]: the one check of archive entry paths (bundles, image layers, BuildKit).
//! - [`bundle`]: code bundles fetched from object stores, verified, safely unzipped, cached.
//! - [`cache`]: what every cache shares: entry kinds, records, sizes, the budget, disk pressure.
//! - [`janitor`]: one budget over every cache (scan, evict, the janitor loop, `cache ls|prune`).
//! - [`env`]: a task's Python environment: the venv built for its bundle, pickled entrypoints.
//! - [`runtime`]: how a task's processes are made (libcontainer container or plain process).
//! - [`supervisor`]: the per-task process that owns the task's stdio, log and exit record.
//! - [`exec`]: a command run inside a running task (its container's namespaces and cgroup).
//! - [`logs`]: the append-only, indexed log of each task, and its filters.
//! - [`cgroup`]: cgroup v2/v1 paths, limits, kills and the stats read from them.
//! - [`heartbeat`]: the worker's side of a controller (RegisterWorker, ReportTaskState).
//! - [`join`]: the worker's side of the newest Iris controller (Register, the keep-alive).
//! - [`isolation`]: the cgroup connect hook that keeps tasks off the worker's own port.
//! - [`web`]: the pages and JSON on the same port.
//! - [`server`]: the one port: [`rpc`]'s WorkerService and [`web`]'s pages together.
//! - [`worker`]: the front door, `Worker::builder(config).build().await?.run(shutdown)`.
//!
//! Embedding: a whole worker through [`Worker::builder`] and a plain [`WorkerConfig`]
//! (`examples/embed.rs`), or a bare [`task::TaskManager`] with [`task::ManagerConfig`] and no
//! server (`examples/run_task.rs`).

pub mod archive;
pub mod background;
#[cfg(feature = "buildkit")]
pub mod buildkit;
pub mod bundle;
pub mod cache;
pub mod cachelock;
pub mod cgroup;
pub mod devices;
pub mod env;
pub mod exec;
pub mod heartbeat;
pub mod isolation;
pub mod janitor;
pub mod join;
pub mod logs;
/// The wire types of both Iris generations (the `iris-wire` crate's, under their old path).
pub use iris_wire::proto;
pub mod rpc;
pub mod runtime;
pub mod server;
pub mod supervisor;
pub mod task;
pub mod taskdir;
pub mod web;
pub mod worker;

pub use worker::{Worker, WorkerBuilder, WorkerConfig, WorkerError};
