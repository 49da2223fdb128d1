//! The VM tier: the worker this build made, on a pure cgroup v2 kernel. `scripts/vm test`
//! boots Debian's kernel in qemu (software emulation) with a busybox initramfs, whose init runs
//! `iris-worker serve` and vm-images/tests.sh against it (memory.max and OOM, memory.peak,
//! pids.max, cpu.max, cgroup.kill, seccomp, restart adoption, no leftovers), and reports one
//! PASS or FAIL line per test over the serial console.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "vm: boots a qemu VM with pure cgroup v2"]
fn vm_tier_the_worker_passes_its_tests_on_pure_cgroup_v2() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm");
    let out = Command::new(&script)
        .args(["test", "--binary", env!("CARGO_BIN_EXE_iris-worker")])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The script ends with its figures and verdict: the boot time, and the FAIL lines or the
    // console's last lines when no summary came.
    let verdict: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("vm| ")).collect();
    println!("{}", verdict.join("\n"));
    assert!(
        out.status.success(),
        "the VM tier failed ({}):\n{}",
        out.status,
        verdict.iter().rev().take(40).rev().copied().collect::<Vec<_>>().join("\n")
    );
}
