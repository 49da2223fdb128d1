//! The task's cgroups: where they live, how they are prepared and removed, how every process
//! of a task is signalled, and the figures read from them.
//!
//! This is the only module that touches cgroup files. It knows both layouts: cgroup v2 (one
//! unified tree, the production target) and v1 (one hierarchy per controller, as on the
//! development machines). A task's cgroup is named by one absolute path, e.g.
//! `/process_api/abc/iris-worker/w1/job%2Ftask-0.1`, which exists in every v1 hierarchy we use
//! or once in the unified tree.

mod layout;
mod parents;
mod stats;

pub use layout::{CgroupError, Layout, Limits, V1_NET_CONTROLLERS};
pub use stats::{CgroupStats, StatsCache, StatsFiles};

/// The cgroup directory name below the worker's own cgroup that holds all workers' tasks.
pub const ROOT_NAME: &str = "iris-worker";
