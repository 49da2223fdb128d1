//! The default seccomp profile of restricted tasks, and its program compiled once per host.
//!
//! Docker's default profile is an allow-list of ~350 syscalls; in effect, for a process
//! without CAP_SYS_ADMIN, it denies the calls below. We state that effect directly as a
//! deny-list (shorter, and new harmless syscalls keep working): each call here returns EPERM.
//!
//! The profile is not handed to libcontainer: it would have libseccomp build its rule database
//! and generate the BPF program again in every container's init (~0.3 ms of CPU a task, most
//! of the "seccomp" step of a lifecycle). [`program`] compiles it with libseccomp the way
//! libcontainer's `initialize_seccomp` does — same rules, architectures and default action —
//! but exports the program instead of loading it, and keeps it in the containers' tmpfs state
//! directory, where the next supervisor finds it; the init and an exec load it with one
//! `seccomp(2)` call ([`Program::load`]) at the point libcontainer did.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
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
pub fn default_profile(allow_tracing: bool) -> Result<LinuxSeccomp, OciSpecError> {
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

/// Errors of compiling, caching and loading a seccomp filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("defining the seccomp filter: {0}")]
    Profile(#[from] OciSpecError),
    #[error("compiling the seccomp filter: {0}")]
    Compile(#[from] libseccomp::error::SeccompError),
    /// Something libcontainer would have set when loading the filter, which a bare program
    /// does not carry (load flags, a notify listener) or this module does not translate.
    #[error("the seccomp filter uses {0}, which its compiled program cannot carry")]
    Unsupported(String),
    #[error("exporting the compiled seccomp filter: {0}")]
    Export(std::io::Error),
    #[error("naming the compiled seccomp filter: {0}")]
    Name(#[from] serde_json::Error),
    #[error("a seccomp program of {0} bytes is not a BPF program")]
    Malformed(usize),
    #[error("loading the seccomp filter: {0}")]
    Load(nix::errno::Errno),
}

/// A seccomp filter compiled to classic BPF: the instructions `seccomp(2)` takes.
#[derive(Clone)]
pub struct Program(Vec<libc::sock_filter>);

/// The size of one BPF instruction (`struct sock_filter`).
const INSTRUCTION: usize = std::mem::size_of::<libc::sock_filter>();
/// The most instructions the kernel takes in one filter (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;

impl Program {
    /// The program in `bytes`, as libseccomp exports it (the instructions in host byte order).
    pub fn from_bytes(bytes: &[u8]) -> Result<Program, SeccompError> {
        let count = bytes.len() / INSTRUCTION;
        if !bytes.len().is_multiple_of(INSTRUCTION) || count == 0 || count > MAX_INSTRUCTIONS {
            return Err(SeccompError::Malformed(bytes.len()));
        }
        let instructions = bytes
            .chunks_exact(INSTRUCTION)
            .map(|i| libc::sock_filter {
                code: u16::from_ne_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect();
        Ok(Program(instructions))
    }

    /// The program as bytes, as libseccomp exports it and the kernel reports it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * INSTRUCTION);
        for i in &self.0 {
            out.extend_from_slice(&i.code.to_ne_bytes());
            out.extend_from_slice(&[i.jt, i.jf]);
            out.extend_from_slice(&i.k.to_ne_bytes());
        }
        out
    }

    /// Puts the calling thread under this filter, as libseccomp's `seccomp_load` does for the
    /// profile (no flags: the profile sets none, and libcontainer leaves the no-new-privileges
    /// bit to the spec, which set it earlier). Without CAP_SYS_ADMIN, no_new_privs must be set.
    pub fn load(&self) -> Result<(), SeccompError> {
        let len = u16::try_from(self.0.len()).map_err(|_| SeccompError::Malformed(self.0.len() * INSTRUCTION))?;
        let program = libc::sock_fprog { len, filter: self.0.as_ptr().cast_mut() };
        // SAFETY: `program` points at `len` instructions that outlive the call; the kernel
        // copies them.
        let rc = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &program as *const libc::sock_fprog)
        };
        if rc != 0 {
            return Err(SeccompError::Load(nix::errno::Errno::last()));
        }
        Ok(())
    }
}

/// The compiled filter of a non-privileged task (`allow_tracing` when it holds
/// CAP_SYS_PTRACE), from this host's cache of compiled filters when it is there, else
/// compiled now and put there for the next task. The cache is the containers' state directory
/// on a tmpfs ([`super::memory_state_base`]): private to root and gone at reboot, so a program
/// never outlives the kernel and libseccomp it was made for. Without it, every call compiles.
pub fn program(allow_tracing: bool) -> Result<Program, SeccompError> {
    program_in(super::memory_state_base(), &default_profile(allow_tracing)?)
}

fn program_in(cache: Option<&Path>, profile: &LinuxSeccomp) -> Result<Program, SeccompError> {
    let Some(dir) = cache else { return compile(profile) };
    let path = dir.join(cache_name(profile)?);
    if let Some(program) = read_cached(&path) {
        return Ok(program);
    }
    let program = compile(profile)?;
    if let Err(e) = write_cached(&path, &program) {
        // Only the next task's time is lost: it compiles again.
        tracing::warn!(error = %e, "keeping the compiled seccomp filter");
    }
    Ok(program)
}

/// Bumped whenever [`compile`] makes a different program from the same profile: a cached
/// program is then never taken for the new one.
const CACHE_FORMAT: &str = "iris-worker seccomp bpf 1";

/// `seccomp-<16 hex digits>.bpf`: a hash of what the program is made from — the profile, the
/// libseccomp that compiles it, and this module's way of compiling — so that a program is
/// only ever found by the profile it was compiled from.
fn cache_name(profile: &LinuxSeccomp) -> Result<String, SeccompError> {
    use sha2::{Digest, Sha256};
    let version = libseccomp::ScmpVersion::current()?;
    let mut hash = Sha256::new();
    hash.update(CACHE_FORMAT);
    hash.update(format!("libseccomp {}.{}.{}\n", version.major, version.minor, version.micro));
    hash.update(serde_json::to_vec(profile)?);
    Ok(format!("seccomp-{}.bpf", hex::encode(&hash.finalize()[..8])))
}

/// The program cached at `path`, if there is one to trust: a regular file (not a link) of this
/// user that no one else may write, holding a whole program. The directory is root's alone
/// (checked when it was chosen), so only root could have put anything there; the checks
/// keep even a mistake (a file copied in with other rights) from becoming a task's filter.
fn read_cached(path: &Path) -> Option<Program> {
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    let meta = file.metadata().ok()?;
    let trusted =
        meta.file_type().is_file() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o022 == 0;
    let size = usize::try_from(meta.len()).ok()?;
    if !trusted || size > MAX_INSTRUCTIONS * INSTRUCTION {
        tracing::warn!(path = %path.display(), "not using a compiled seccomp filter that is not root's alone");
        return None;
    }
    let mut bytes = Vec::with_capacity(size);
    file.read_to_end(&mut bytes).ok()?;
    Program::from_bytes(&bytes).ok()
}

/// Writes `program` to `path` whole or not at all (a file of its own, renamed over `path`):
/// supervisors starting at the same time may each compile and write it, and a reader only
/// ever sees a complete program.
fn write_cached(path: &Path, program: &Program) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .and_then(|mut f| f.write_all(&program.to_bytes()))
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Compiles `profile` as libcontainer 0.7's `initialize_seccomp` does up to its `load` (the
/// same libseccomp calls in the same order: default action, architectures, each rule, a rule
/// whose action is the default's skipped, a name this libseccomp does not know skipped, a
/// rule comparing one argument twice split in one rule per comparison), and exports the
/// program libseccomp would have loaded. What changes how a program is loaded rather than
/// the program (filter flags, notify) is refused: the bare program could not carry it.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, SeccompError> {
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        return Err(SeccompError::Unsupported("filter flags".into()));
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default)?;
    for &arch in profile.architectures().iter().flatten() {
        ctx.add_arch(architecture(arch)?)?;
    }
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        for name in rule.names() {
            let Ok(call) = ScmpSyscall::from_name(name) else {
                // As libcontainer: a call this libseccomp does not know, the kernel has not either.
                tracing::debug!(name, "a syscall libseccomp does not know is left out of the filter");
                continue;
            };
            match rule.args() {
                Some(args) => {
                    let comparisons: Vec<ScmpArgCompare> = args
                        .iter()
                        .map(|a| ScmpArgCompare::new(a.index() as u32, operator(a.op(), a.value_two()), a.value()))
                        .collect();
                    let mut indexes: Vec<usize> = args.iter().map(|a| a.index()).collect();
                    indexes.sort_unstable();
                    indexes.dedup();
                    if indexes.len() < args.len() {
                        for c in &comparisons {
                            ctx.add_rule_conditional(act, call, std::slice::from_ref(c))?;
                        }
                    } else {
                        ctx.add_rule_conditional(act, call, &comparisons)?;
                    }
                }
                None => {
                    ctx.add_rule(act, call)?;
                }
            }
        }
    }
    export(&ctx)
}

/// libseccomp 2.5 exports to a file descriptor only: a memory file, read back.
fn export(ctx: &ScmpFilterContext) -> Result<Program, SeccompError> {
    let memfd = nix::sys::memfd::memfd_create(c"iris-seccomp", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(|e| SeccompError::Export(e.into()))?;
    let mut file = std::fs::File::from(memfd);
    ctx.export_bpf(&file)?;
    let mut bytes = Vec::new();
    file.rewind().and_then(|()| file.read_to_end(&mut bytes)).map_err(SeccompError::Export)?;
    Program::from_bytes(&bytes)
}

/// libcontainer's translation of an action (its errno defaults to EPERM).
fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let errno = errno.map_or(libc::EPERM, |e| e as i32);
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => ScmpAction::KillThread,
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => {
            ScmpAction::Trace(u16::try_from(errno).map_err(|_| SeccompError::Unsupported(format!("trace({errno})")))?)
        }
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Unsupported("a notify action".into())),
    })
}

/// libcontainer's translation of a comparison.
fn operator(op: LinuxSeccompOperator, mask: Option<u64>) -> ScmpCompareOp {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(mask.unwrap_or(0)),
    }
}

/// The architectures a task's filter names (the x86 family this worker runs on).
fn architecture(arch: Arch) -> Result<ScmpArch, SeccompError> {
    Ok(match arch {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX32 => ScmpArch::X32,
        other => return Err(SeccompError::Unsupported(format!("architecture {other:?}"))),
    })
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

    use super::{Program, compile, default_profile, program_in};

    /// PTRACE_SECCOMP_GET_FILTER (linux/ptrace.h).
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

    /// A child that runs `load` with no_new_privs set, then stops as our tracee: the program
    /// of each filter it is under (the kernel's copy, through PTRACE_SECCOMP_GET_FILTER, which
    /// needs CAP_SYS_ADMIN) and its `Seccomp_filters:` count.
    fn filters_of_child(load: impl FnOnce() -> bool) -> (Vec<Vec<u8>>, String) {
        // SAFETY: the child only makes syscalls, runs `load` and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain syscalls; the tracer is our parent. TRACEME comes first: the
            // filter refuses ptrace.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                if !load() {
                    libc::_exit(3);
                }
                libc::raise(libc::SIGSTOP);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSTOPPED(status), "the child stopped under its filter (status {status:#x})");
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let count = proc_status.lines().find(|l| l.starts_with("Seccomp_filters:")).unwrap().to_string();
        let mut filters = Vec::new();
        for index in 0.. {
            // SAFETY: a NULL buffer asks for the length.
            let len = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index as usize, 0usize) };
            if len < 0 {
                break;
            }
            let mut buf = vec![0u8; len as usize * 8];
            // SAFETY: `buf` has room for `len` instructions.
            let got = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index as usize, buf.as_mut_ptr()) };
            assert_eq!(got, len);
            filters.push(buf);
        }
        // SAFETY: ends and reaps our child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        (filters, count)
    }

    #[test]
    #[ignore = "root: reads filters back with PTRACE_SECCOMP_GET_FILTER (CAP_SYS_ADMIN)"]
    fn the_compiled_program_is_the_one_libcontainer_loads_and_loads_alone() {
        for tracing in [false, true] {
            let profile = default_profile(tracing).unwrap();
            let ours = compile(&profile).unwrap();
            let (by_libcontainer, count) =
                filters_of_child(|| libcontainer::seccomp::initialize_seccomp(&profile).is_ok());
            assert_eq!(count, "Seccomp_filters:\t1");
            assert_eq!(by_libcontainer, vec![ours.to_bytes()], "tracing {tracing}: libcontainer's program is ours");
            let (loaded, count) = filters_of_child(|| ours.load().is_ok());
            assert_eq!(count, "Seccomp_filters:\t1");
            assert_eq!(loaded, vec![ours.to_bytes()], "tracing {tracing}: loaded as compiled");
        }
        assert_ne!(
            compile(&default_profile(false).unwrap()).unwrap().to_bytes(),
            compile(&default_profile(true).unwrap()).unwrap().to_bytes(),
            "the two filters differ"
        );
    }

    #[test]
    fn a_program_is_compiled_once_into_the_cache_and_read_back_only_when_roots_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let restricted = default_profile(false).unwrap();
        let compiled = compile(&restricted).unwrap().to_bytes();
        let first = program_in(Some(dir.path()), &restricted).unwrap();
        assert_eq!(first.to_bytes(), compiled);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(files.len(), 1, "one program, no temporary file left: {files:?}");
        let cached = &files[0];
        assert!(cached.file_name().unwrap().to_string_lossy().starts_with("seccomp-"));
        assert_eq!(std::fs::metadata(cached).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(cached).unwrap(), compiled);

        // What is in the cache is what a task gets (a stand-in program shows it was read).
        let other = compile(&default_profile(true).unwrap()).unwrap().to_bytes();
        std::fs::write(cached, &other).unwrap();
        assert_eq!(program_in(Some(dir.path()), &restricted).unwrap().to_bytes(), other, "read from the cache");
        // The other profile has a cache entry of its own.
        let _ = program_in(Some(dir.path()), &default_profile(true).unwrap()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        // A file others may write is not trusted: compiled again, and replaced.
        std::fs::set_permissions(cached, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(program_in(Some(dir.path()), &restricted).unwrap().to_bytes(), compiled, "group/other-writable");
        assert_eq!(std::fs::read(cached).unwrap(), compiled, "replaced by the compiled program");
        assert_eq!(std::fs::metadata(cached).unwrap().permissions().mode() & 0o777, 0o600);
        // Nor a link, nor a file that is not a whole program.
        std::fs::remove_file(cached).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, &other).unwrap();
        std::os::unix::fs::symlink(&elsewhere, cached).unwrap();
        assert_eq!(program_in(Some(dir.path()), &restricted).unwrap().to_bytes(), compiled, "a symlink");
        std::fs::write(cached, &other[..other.len() - 3]).unwrap();
        assert_eq!(program_in(Some(dir.path()), &restricted).unwrap().to_bytes(), compiled, "a torn program");
        // Without a cache directory every call compiles.
        assert_eq!(program_in(None, &restricted).unwrap().to_bytes(), compiled);
    }

    #[test]
    fn a_program_round_trips_through_bytes_and_malformed_ones_are_refused() {
        let bytes = compile(&default_profile(false).unwrap()).unwrap().to_bytes();
        assert_eq!(Program::from_bytes(&bytes).unwrap().to_bytes(), bytes);
        assert!(Program::from_bytes(&bytes[..12]).is_err(), "not whole instructions");
        assert!(Program::from_bytes(&[]).is_err(), "empty");
        assert!(Program::from_bytes(&vec![0u8; 8 * 4097]).is_err(), "longer than the kernel takes");
    }
}
