//! The default seccomp profile of restricted tasks.
//!
//! Docker's default profile is an allow-list of ~350 syscalls; in effect, for a process
//! without CAP_SYS_ADMIN, it denies the calls below. We state that effect directly as a
//! deny-list (shorter, and new harmless syscalls keep working): each call here returns EPERM.

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscallBuilder,
};

/// Syscalls a restricted task may not make (EPERM).
pub const DENIED_SYSCALLS: &[&str] = &[
    // kernel keyrings are not namespaced
    "add_key",
    "keyctl",
    "request_key",
    // filesystems and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "setns",
    "unshare",
    "chroot",
    // tracing and introspection of other processes and the kernel
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "perf_event_open",
    "bpf",
    "lookup_dcookie",
    "syslog",
    "userfaultfd",
    // kernel and machine state
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "stime",
    "quotactl",
    "quotactl_fd",
    "iopl",
    "ioperm",
    "vhangup",
    "nfsservctl",
    "open_by_handle_at",
    "name_to_handle_at",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "uselib",
    "sysfs",
    "_sysctl",
    "ustat",
];

/// CLONE_NEWUSER: a new user namespace is how unprivileged code gets capabilities back.
const CLONE_NEWUSER: u64 = 0x1000_0000;

/// The calls a task granted CAP_SYS_PTRACE may make (Docker's default profile allows them with
/// that capability): without them the capability would be of no use to a profiler.
const TRACING_SYSCALLS: &[&str] = &["ptrace", "process_vm_readv", "process_vm_writev", "kcmp"];

/// The filter of a non-privileged task; `allow_tracing` when it holds CAP_SYS_PTRACE.
pub(super) fn default_profile(allow_tracing: bool) -> Result<LinuxSeccomp, OciSpecError> {
    let eperm = libc::EPERM as u32;
    let denied = LinuxSyscallBuilder::default()
        .names(
            DENIED_SYSCALLS
                .iter()
                .filter(|s| !(allow_tracing && TRACING_SYSCALLS.contains(s)))
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(eperm)
        .build()?;
    // clone(CLONE_NEWUSER) is refused; clone3's flags live in memory seccomp cannot read, so
    // clone3 answers ENOSYS and libc falls back to clone, which is checked (Docker does this).
    let clone_userns = LinuxSyscallBuilder::default()
        .names(vec!["clone".to_string()])
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(eperm)
        .args(vec![
            LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(CLONE_NEWUSER)
                .value_two(CLONE_NEWUSER)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()?,
        ])
        .build()?;
    let clone3 = LinuxSyscallBuilder::default()
        .names(vec!["clone3".to_string()])
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::ENOSYS as u32)
        .build()?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32])
        .syscalls(vec![denied, clone_userns, clone3])
        .build()
}

#[cfg(test)]
mod tests {
    fn denied(allow_tracing: bool) -> Vec<String> {
        let profile = super::default_profile(allow_tracing).unwrap();
        profile.syscalls().as_ref().unwrap()[0].names().clone()
    }

    #[test]
    fn tracing_calls_are_allowed_only_with_cap_sys_ptrace() {
        for call in super::TRACING_SYSCALLS {
            assert!(denied(false).iter().any(|d| d == call), "{call} denied without SYS_PTRACE");
            assert!(!denied(true).iter().any(|d| d == call), "{call} allowed with SYS_PTRACE");
        }
        assert!(denied(true).iter().any(|d| d == "mount"), "the rest stays denied");
    }
}
