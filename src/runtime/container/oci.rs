//! The OCI runtime configuration of a task: our security defaults made concrete.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpu, LinuxMemory, LinuxNamespace, LinuxNamespaceType, LinuxPids,
    LinuxResources, Mount as OciMount, PosixRlimit, PosixRlimitBuilder, PosixRlimitType, Process, Root, Spec,
};

use super::seccomp;
use crate::runtime::{LaunchSpec, Profile, RuntimeError};

/// The capabilities a `restricted` task keeps (documented in the README): enough to manage
/// files and processes it owns, bind low ports, and switch users, nothing that reaches the host.
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::NetBindService,
];

/// Paths of /proc and /sys a restricted task cannot read (runc's list plus the few we add).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> OciMount {
    let mut m = OciMount::default();
    m.set_destination(PathBuf::from(dest));
    m.set_typ(Some(typ.to_string()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(options.iter().map(|s| s.to_string()).collect()));
    m
}

fn spec_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Spec(e.to_string())
}

/// Gives the container an `/etc/hosts` of its own, as Docker does: `localhost` and its hostname
/// resolve whatever its root filesystem has (a minimal one has no `/etc/hosts`, and a program
/// that binds `localhost` — memray, a distributed trainer's rendezvous — fails).
pub(super) fn add_hosts_file(config: &mut Spec, dir: &Path, hostname: &str) -> Result<(), RuntimeError> {
    let text = format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n");
    bind_file(config, dir, crate::taskdir::HOSTS, &text, "/etc/hosts")
}

/// Points the container's `/etc/resolv.conf` at `nameserver`: the resolver of its own network,
/// not the host's, which it cannot reach.
pub(super) fn add_resolv_conf(config: &mut Spec, dir: &Path, nameserver: &str) -> Result<(), RuntimeError> {
    bind_file(config, dir, crate::taskdir::RESOLV_CONF, &format!("nameserver {nameserver}\n"), "/etc/resolv.conf")
}

/// Writes `text` to `dir/name` (the container's state directory: it lives as long as the
/// container) and binds it read-only at `target` in the container. Errors name the file, not
/// its host path.
fn bind_file(config: &mut Spec, dir: &Path, name: &str, text: &str, target: &str) -> Result<(), RuntimeError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|source| RuntimeError::Io { op: "writing", path: name.into(), source })?;
    let mut mounts = config.mounts().clone().unwrap_or_default();
    mounts.push(mount(target, "bind", &path.to_string_lossy(), &["rbind", "ro", "nosuid", "nodev", "noexec"]));
    config.set_mounts(Some(mounts));
    Ok(())
}

/// Builds the OCI configuration for `spec`.
pub(super) fn build(spec: &LaunchSpec) -> Result<Spec, RuntimeError> {
    let privileged = spec.profile == Profile::Privileged;

    let mut process = Process::default();
    process.set_args(Some(spec.argv.clone()));
    process.set_env(Some(spec.env.clone()));
    process.set_cwd(PathBuf::from(&spec.cwd_in_task));
    process.set_no_new_privileges(Some(!privileged));
    if let Some(user) = &spec.user {
        let mut u = oci_spec::runtime::User::default();
        u.set_uid(user.uid);
        u.set_gid(user.gid);
        u.set_additional_gids(Some(user.additional_gids.clone()));
        process.set_user(u);
    }
    let caps: HashSet<Capability> = match spec.profile {
        Profile::Privileged => all_capabilities(),
        Profile::Restricted => DEFAULT_CAPABILITIES.iter().copied().collect(),
        Profile::NoCapabilities => HashSet::new(),
        Profile::PtraceOnly => [Capability::SysPtrace].into_iter().collect(),
    };
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(caps.clone()));
    capabilities.set_effective(Some(caps.clone()));
    capabilities.set_permitted(Some(caps));
    capabilities.set_inheritable(Some(HashSet::new()));
    capabilities.set_ambient(Some(HashSet::new()));
    process.set_capabilities(Some(capabilities));
    // As many open files as this host lets us give (raising past our own hard limit fails).
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024);
    let mut rlimits = vec![rlimit(PosixRlimitType::RlimitNofile, nofile)];
    if privileged {
        // Unlimited when this host lets us raise it (CAP_SYS_RESOURCE); as much as we have
        // otherwise (asking for more would fail the container's creation).
        let memlock = if bounding_set() & (1 << 24) != 0
        /* CAP_SYS_RESOURCE */
        {
            u64::MAX
        } else {
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).map_or(0, |(_, hard)| hard)
        };
        rlimits.push(rlimit(PosixRlimitType::RlimitMemlock, memlock));
    }
    process.set_rlimits(Some(rlimits));

    let mut root = Root::default();
    root.set_path(spec.rootfs.clone());
    // A shared rootfs is read-only; an image's overlay has the task's own upper layer.
    root.set_readonly(Some(!spec.rootfs_overlay));

    let shm = format!("size={}", spec.shm_bytes.max(1 << 20));
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        mount("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", &shm]),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
    ];
    // /tmp is a tmpfs: bounded (its pages count in the task's memory, and by its size), and
    // gone with the task.
    let tmp_size = spec.tmp_bytes().map(|b| format!("size={}", b.max(1 << 20)));
    let mut tmp_options = vec!["nosuid", "nodev", "mode=1777"];
    tmp_options.extend(tmp_size.as_deref());
    mounts.push(mount("/tmp", "tmpfs", "tmpfs", &tmp_options));
    for m in &spec.mounts {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        opts.push(if m.read_only { "ro" } else { "rw" });
        mounts.push(mount(&m.target, "bind", &m.host.to_string_lossy(), &opts));
    }

    let mut resources = LinuxResources::default();
    if let Some(bytes) = spec.limits.memory_bytes {
        let bytes = i64::try_from(bytes).map_err(spec_err)?;
        let mut memory = LinuxMemory::default();
        memory.set_limit(Some(bytes));
        // No swap beyond the limit: an OOM must be an OOM, not a crawl.
        memory.set_swap(Some(bytes));
        resources.set_memory(Some(memory));
    }
    if let Some(mc) = spec.limits.cpu_millicores {
        let mut cpu = LinuxCpu::default();
        cpu.set_period(Some(100_000));
        cpu.set_quota(Some(i64::from(mc) * 100));
        resources.set_cpu(Some(cpu));
    }
    if let Some(max) = spec.limits.pids {
        let mut pids = LinuxPids::default();
        pids.set_limit(max);
        resources.set_pids(Some(pids));
    }

    let mut kinds =
        vec![LinuxNamespaceType::Pid, LinuxNamespaceType::Mount, LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts];
    if spec.own_network {
        // A new, empty network namespace: no interface but `lo`, no route anywhere.
        kinds.push(LinuxNamespaceType::Network);
    }
    let namespaces = kinds
        .into_iter()
        .map(|typ| {
            let mut ns = LinuxNamespace::default();
            ns.set_typ(typ);
            ns
        })
        .collect::<Vec<_>>();

    let mut linux = oci_spec::runtime::Linux::default();
    if privileged {
        // The host's devices, as `docker run --privileged` gives them: each one made in the
        // container's own /dev, and every device allowed by the devices cgroup. Never the
        // host's /dev itself: libcontainer writes its default links and nodes into the
        // container's /dev, which would then be the host's.
        linux.set_devices(Some(host_devices()));
        let mut all = oci_spec::runtime::LinuxDeviceCgroup::default();
        all.set_allow(true);
        all.set_typ(Some(oci_spec::runtime::LinuxDeviceType::A));
        all.set_access(Some("rwm".to_string()));
        resources.set_devices(Some(vec![all]));
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_resources(Some(resources));
    linux.set_cgroups_path(spec.cgroup.as_ref().map(|(_, path)| PathBuf::from(path)));
    if privileged {
        linux.set_masked_paths(Some(vec![]));
        linux.set_readonly_paths(Some(vec![]));
    } else {
        linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|s| s.to_string()).collect()));
        linux.set_readonly_paths(Some(READONLY_PATHS.iter().map(|s| s.to_string()).collect()));
        // No `seccomp` here: libcontainer would compile it in every init. The init and an exec
        // load the compiled filter of `seccomp_program` themselves.
    }

    let mut out = Spec::default();
    out.set_hostname(Some(spec.hostname.clone()));
    out.set_process(Some(process));
    out.set_root(Some(root));
    out.set_mounts(Some(mounts));
    out.set_linux(Some(linux));
    Ok(out)
}

/// The seccomp filter every process of `spec`'s container runs under (none for a privileged
/// task), compiled once per host (see [`seccomp::program`]).
pub(super) fn seccomp_program(spec: &LaunchSpec) -> Result<Option<seccomp::Program>, RuntimeError> {
    if spec.profile == Profile::Privileged {
        return Ok(None);
    }
    seccomp::program(caps_allow_tracing(spec.profile)).map(Some).map_err(spec_err)
}

/// Whether a profile's tasks hold CAP_SYS_PTRACE (and so may make the tracing syscalls).
fn caps_allow_tracing(profile: Profile) -> bool {
    matches!(profile, Profile::PtraceOnly | Profile::Privileged)
}

fn rlimit(typ: PosixRlimitType, value: u64) -> PosixRlimit {
    PosixRlimitBuilder::default().typ(typ).hard(value).soft(value).build().unwrap_or_default()
}

/// The character and block devices below the host's /dev (its pts, shm and mqueue mounts
/// aside: the container has its own), as OCI devices to create in a privileged container.
fn host_devices() -> Vec<oci_spec::runtime::LinuxDevice> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from("/dev")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            let kind = meta.file_type();
            if kind.is_dir() {
                if !["/dev/pts", "/dev/shm", "/dev/mqueue"].iter().any(|p| path == Path::new(p)) {
                    stack.push(path);
                }
                continue;
            }
            let typ = if kind.is_char_device() {
                oci_spec::runtime::LinuxDeviceType::C
            } else if kind.is_block_device() {
                oci_spec::runtime::LinuxDeviceType::B
            } else {
                continue;
            };
            let mut d = oci_spec::runtime::LinuxDevice::default();
            d.set_path(path);
            d.set_typ(typ);
            d.set_major(i64::from(libc::major(meta.rdev())));
            d.set_minor(i64::from(libc::minor(meta.rdev())));
            d.set_file_mode(Some(meta.mode() & 0o7777));
            d.set_uid(Some(meta.uid()));
            d.set_gid(Some(meta.gid()));
            out.push(d);
        }
    }
    out
}

/// This process's capability bounding set (`CapBnd` of /proc/self/status): what any process it
/// starts can hold at most. Everything when it cannot be read.
fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapBnd:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .unwrap_or(u64::MAX)
}

/// Every capability this host can grant: the known ones within our bounding set (a host may
/// withhold some, e.g. CAP_SYS_RESOURCE, and asking for one it withholds fails the container).
fn all_capabilities() -> HashSet<Capability> {
    use libcontainer::capabilities::CapabilityExt;
    let bounding = bounding_set();
    known_capabilities().into_iter().filter(|c| bounding & (1u64 << c.to_cap().index()) != 0).collect()
}

fn known_capabilities() -> HashSet<Capability> {
    use Capability::*;
    [
        AuditControl,
        AuditRead,
        AuditWrite,
        BlockSuspend,
        Bpf,
        CheckpointRestore,
        Chown,
        DacOverride,
        DacReadSearch,
        Fowner,
        Fsetid,
        IpcLock,
        IpcOwner,
        Kill,
        Lease,
        LinuxImmutable,
        MacAdmin,
        MacOverride,
        Mknod,
        NetAdmin,
        NetBindService,
        NetBroadcast,
        NetRaw,
        Perfmon,
        Setgid,
        Setfcap,
        Setpcap,
        Setuid,
        SysAdmin,
        SysBoot,
        SysChroot,
        SysModule,
        SysNice,
        SysPacct,
        SysPtrace,
        SysRawio,
        SysResource,
        SysTime,
        SysTtyConfig,
        Syslog,
        WakeAlarm,
    ]
    .into_iter()
    .collect()
}
