//! Runs after the other integration test binaries (cargo runs them in name order): nothing
//! the suite's workers made may remain — no cgroup, mount, supervisor or task process, no
//! container's state, and no temporary state directory.

mod common;

use common::{TEST_PREFIX, cgroups_named, processes_with};

#[test]
#[ignore = "root: inspects cgroups and processes left by the root tests"]
fn the_suite_left_no_cgroup_mount_process_or_task_directory() {
    let cgroups = cgroups_named(TEST_PREFIX);
    assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:#?}");

    // Task rootfs overlays live in the workers' state dirs, the test peers' (registry,
    // containerd, dockerd) and image stores in `iwtest-*` temp dirs.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours: Vec<&str> =
        mounts.lines().filter(|l| l.contains("iris-worker-test-") || l.contains("/iwtest-")).collect();
    assert!(ours.is_empty(), "mounts left behind: {ours:#?}");

    let mut procs = processes_with("iris-worker-test-");
    procs.extend(processes_with("/iwtest-"));
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");

    // Containers' state lives in a tmpfs (runtime::container::state_root), one directory per
    // task directory: none of the suite's may remain (its state.json names its bundle, the
    // task directory).
    let states: Vec<_> = iris_worker::runtime::container::memory_state_base()
        .and_then(|base| std::fs::read_dir(base).ok())
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|task| std::fs::read_dir(task.path()).into_iter().flatten().flatten())
        .map(|container| container.path())
        .filter(|container| {
            let state = std::fs::read_to_string(container.join("state.json")).unwrap_or_default();
            state.contains("iris-worker-test-") || state.contains("/iwtest-")
        })
        .collect();
    assert!(states.is_empty(), "containers' state left behind: {states:#?}");

    let dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("iris-worker-test-") || name.starts_with("iwtest-")
        })
        .map(|e| e.path())
        .collect();
    assert!(dirs.is_empty(), "state directories left behind: {dirs:#?}");
}
