//! Tasks cannot drive the worker: no process of a task may open a connection to the worker's
//! port on any address (every worker of a cluster listens on the same port, so a task here
//! must not reach another host's worker either; `--isolate-remote-workers false` narrows this
//! to this host's addresses), nor to the local controller's port with `--isolate-controller`,
//! nor bind either port on any address (so a task can neither answer in the worker's place on
//! another address family nor take the port while the worker restarts); host processes outside
//! the tasks and other hosts still reach the worker, and tasks keep the host network and their
//! ports.
//!
//! The mechanism is four programs, `BPF_CGROUP_INET4_CONNECT` / `INET6_CONNECT` /
//! `INET4_BIND` / `INET6_BIND`, attached to the cgroup v2 directory that holds every task of
//! this worker (the worker's parent cgroup; on a hybrid host its twin in the unified tree,
//! which tasks join too). The kernel runs them on every `connect()` (and TCP Fast Open
//! `sendto`) and every `bind()` of a socket made in that subtree, before any packet leaves or
//! the port is taken: a (port, address) in the program's map gets EPERM. The connect maps hold
//! the protected ports either on every address (a key covering the port alone) or on every
//! local address (`127.0.0.0/8`, `0.0.0.0`, `::`, `::1`, each address of each interface, and
//! their IPv4-mapped IPv6 forms), kept current as addresses come and go (rtnetlink address
//! events, and a rescan every 30 s); the bind maps hold the protected ports on every address.
//! See docs/ARCHITECTURE.md ("Who can reach the worker") for why this and not a firewall rule.
//!
//! What is reported is checked, not assumed ([`probe`]): at start and every
//! `--isolation-check-interval`, a process the worker forks into a child cgroup of the tasks'
//! parent must get EPERM connecting to and binding each protected port, and every key must be
//! in its map; otherwise HealthCheck and the dashboard say the isolation is failing.
//!
//! The programs stay attached when the worker exits (tasks outlive it); a restarted worker
//! attaches fresh ones — before it adopts any task or binds its port — and then detaches the
//! earlier ones (found by name), and `iris-worker cleanup` detaches them. Removing the cgroup
//! removes them too.

mod bpf;
mod probe;

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use bpf::Hook;
pub use probe::PROBE_CGROUP;

/// How often the local addresses are rescanned even without an rtnetlink event.
const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// Entries per map: protected ports × local prefixes.
const MAX_ENTRIES: u32 = 8192;
/// The first kernel whose cgroup v2 socket matching survives net_cls/net_prio use on a hybrid
/// host (Linux commit 8520e224f547, "bpf, cgroups: Fix cgroup v2 fallback on v1/v2 mixed
/// mode"). Before it, the first process anywhere on the host that joins a net_prio cgroup or
/// gets a net_cls classid turns off cgroup v2 socket matching for the whole host
/// (`cgroup_sk_alloc_disable()`): the hook would stay attached and silently do nothing.
pub const HYBRID_MIN_KERNEL: (u32, u32) = (5, 15);

/// Why the hook could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// Connect hooks attach to cgroup v2 directories only.
    #[error("the tasks' cgroup has no cgroup v2 directory (no cgroup2 filesystem is mounted)")]
    NoCgroup2,
    /// Tasks run without cgroups here (the process runtime on a host without usable ones).
    #[error("tasks run without a cgroup on this host")]
    NoCgroup,
    /// A hybrid host whose kernel can turn cgroup v2 socket matching off behind our back.
    #[error(
        "a hybrid cgroup v1/v2 host with kernel {0}: before {min_major}.{min_minor}, any process on the host that uses          net_cls or net_prio turns off the cgroup v2 socket hooks host-wide",
        min_major = HYBRID_MIN_KERNEL.0,
        min_minor = HYBRID_MIN_KERNEL.1
    )]
    OldHybridKernel(String),
    /// A bpf(2) call or the cgroup directory failed.
    #[error("{op}: {source}")]
    Bpf { op: &'static str, source: io::Error },
}

fn bpf_err(op: &'static str) -> impl FnOnce(io::Error) -> IsolationError {
    move |source| IsolationError::Bpf { op, source }
}

/// What this worker does about tasks reaching it: shown at start, in HealthCheck and on the
/// dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IsolationStatus {
    /// Tasks can neither bind nor connect to these ports: `everywhere` on any address,
    /// `local` on this host's addresses.
    On { everywhere: Vec<u16>, local: Vec<u16> },
    /// The operator turned it off (`--task-isolation false`).
    Off,
    /// The host cannot do it; the reason.
    Unavailable(String),
    /// The hook is attached but does not hold (the self-test or a map update says so); why.
    Failing(String),
}

impl IsolationStatus {
    pub fn is_on(&self) -> bool {
        matches!(self, IsolationStatus::On { .. })
    }
}

fn port_list(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for IsolationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsolationStatus::On { everywhere, local } => {
                let mut parts = Vec::new();
                if !everywhere.is_empty() {
                    parts.push(format!("port {} on any address", port_list(everywhere)));
                }
                if !local.is_empty() {
                    parts.push(format!("port {} on this host's addresses", port_list(local)));
                }
                let one = everywhere.len() + local.len() == 1;
                write!(
                    f,
                    "on: tasks cannot connect to {}, nor bind {}",
                    parts.join(", nor to "),
                    if one { "it" } else { "them" }
                )
            }
            IsolationStatus::Off => write!(f, "off (--task-isolation false): tasks can call this worker's API"),
            IsolationStatus::Unavailable(why) => {
                write!(f, "unavailable ({why}): tasks can call this worker's API; use --auth-token-file")
            }
            IsolationStatus::Failing(why) => {
                write!(f, "failing ({why}): tasks may be able to call this worker's API; use --auth-token-file")
            }
        }
    }
}

/// What `serve` asks for.
#[derive(Debug, Clone)]
pub struct IsolationConfig {
    /// `--task-isolation`.
    pub enabled: bool,
    /// The worker's port, when known before binding (not 0); [`Isolation::protect`] adds it
    /// later otherwise.
    pub worker_port: Option<u16>,
    /// The worker's port is refused on every address, not only this host's
    /// (`--isolate-remote-workers`).
    pub everywhere: bool,
    /// Other ports refused on this host's addresses (the local controller's).
    pub local_ports: Vec<u16>,
    /// How often the self-test runs.
    pub check_every: Duration,
}

/// What keeps tasks off the worker, as the task manager holds it for HealthCheck.
#[derive(Clone)]
pub enum TaskIsolation {
    /// The hooks are attached and checked.
    Hooked(Arc<Isolation>),
    /// Not hooked: off, or the host cannot have it.
    Not(IsolationStatus),
}

impl TaskIsolation {
    /// What HealthCheck and the dashboard say, as of the last check.
    pub fn status(&self) -> IsolationStatus {
        match self {
            TaskIsolation::Hooked(i) => i.status(),
            TaskIsolation::Not(s) => s.clone(),
        }
    }

    /// Adds the worker's port once it is bound (a port chosen by the kernel).
    pub fn protect_worker_port(&self, port: u16, everywhere: bool) {
        if let TaskIsolation::Hooked(i) = self {
            i.protect(port, everywhere);
        }
    }
}

/// Sets up what `config` asks for on the tasks' parent cgroup `cgroups` (layout, path), before
/// any task runs: attaches the hooks, checks them once, and keeps them current and checked
/// from a task of the current tokio runtime. Never fails: what went wrong is the status.
pub fn start(
    config: &IsolationConfig,
    cgroups: Option<&(crate::cgroup::Layout, String)>,
    background: &crate::background::Background,
) -> TaskIsolation {
    let dir = cgroups.ok_or(IsolationError::NoCgroup).and_then(|(layout, parent)| cgroup_dir(layout, parent));
    if !config.enabled {
        // Hooks an earlier worker attached would keep fencing the port off: the operator
        // asked for none.
        if let Ok(dir) = &dir
            && let Err(e) = remove(dir)
        {
            tracing::warn!(error = %e, "removing an earlier worker's task hooks");
        }
        return TaskIsolation::Not(IsolationStatus::Off);
    }
    let install = || -> Result<Arc<Isolation>, IsolationError> {
        let (layout, _) = cgroups.ok_or(IsolationError::NoCgroup)?;
        if matches!(layout, crate::cgroup::Layout::V1 { .. }) {
            let release =
                nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
            if !hybrid_kernel_is_safe(&release) {
                return Err(IsolationError::OldHybridKernel(release));
            }
        }
        let dir = dir?;
        let mut local: BTreeSet<u16> = config.local_ports.iter().copied().collect();
        let mut everywhere = BTreeSet::new();
        if let Some(port) = config.worker_port {
            if config.everywhere {
                everywhere.insert(port)
            } else {
                local.insert(port)
            };
        }
        Isolation::install(&dir, local, everywhere)
    };
    match install() {
        Ok(isolation) => {
            isolation.check();
            isolation.clone().watch(config.check_every, background);
            TaskIsolation::Hooked(isolation)
        }
        Err(e) => TaskIsolation::Not(IsolationStatus::Unavailable(e.to_string())),
    }
}

/// Whether a hybrid host's kernel `release` (`uname -r`, e.g. `5.10.0-21-amd64`) keeps cgroup
/// v2 socket hooks working whatever other programs do with net_cls and net_prio.
pub fn hybrid_kernel_is_safe(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => (major, minor) >= HYBRID_MIN_KERNEL,
        // Unreadable: assume the worst.
        _ => false,
    }
}

/// The hooks on one cgroup, with the maps this process keeps current.
pub struct Isolation {
    dir: PathBuf,
    maps: Vec<(Hook, bpf::Map)>,
    state: Mutex<State>,
}

struct State {
    /// Ports refused on this host's addresses (connect) and on every address (bind).
    local: BTreeSet<u16>,
    /// Ports refused on every address (connect and bind).
    everywhere: BTreeSet<u16>,
    /// The keys in each map (same order as `maps`).
    installed: Vec<BTreeSet<Vec<u8>>>,
    /// Why the last map update left keys out (a full map), if it did.
    map_error: Option<String>,
    /// The last self-test's verdict (`None` before the first).
    probe: Option<Result<(), String>>,
    /// The status last logged, to log changes only.
    logged: Option<IsolationStatus>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Isolation {
    /// Attaches the hooks to `cgroup_dir`, then detaches any an earlier worker left there (in
    /// that order: tasks are never without them). A map that cannot take every key is not an
    /// error here: the hooks go on with what fits, and the status says it.
    pub fn install(
        cgroup_dir: &Path,
        local: BTreeSet<u16>,
        everywhere: BTreeSet<u16>,
    ) -> Result<Arc<Isolation>, IsolationError> {
        let cgroup = bpf::open_cgroup(cgroup_dir).map_err(bpf_err("opening the tasks' cgroup"))?;
        let mut earlier = Vec::new();
        for hook in Hook::ALL {
            let found = bpf::attached(&cgroup, hook).map_err(bpf_err("listing the cgroup's hooks"))?;
            earlier.extend(found.into_iter().filter(|a| a.name == hook.program_name()));
        }
        let mut maps = Vec::new();
        for hook in Hook::ALL {
            maps.push((hook, bpf::Map::create(hook, MAX_ENTRIES).map_err(bpf_err("creating a BPF map"))?));
        }
        let state = State {
            local,
            everywhere,
            installed: vec![BTreeSet::new(); maps.len()],
            map_error: None,
            probe: None,
            logged: None,
        };
        let isolation = Arc::new(Isolation { dir: cgroup_dir.to_path_buf(), maps, state: Mutex::new(state) });
        isolation.refresh();
        for (hook, map) in &isolation.maps {
            let program = bpf::Program::load(*hook, map).map_err(bpf_err("loading a task hook"))?;
            program.attach(&cgroup).map_err(bpf_err("attaching a task hook to the tasks' cgroup"))?;
        }
        for old in earlier {
            old.detach(&cgroup).map_err(bpf_err("detaching an earlier worker's task hook"))?;
        }
        Ok(isolation)
    }

    /// What HealthCheck reports: on, unless a map update left keys out or the last
    /// self-test failed.
    pub fn status(&self) -> IsolationStatus {
        let state = lock(&self.state);
        if let Some(e) = &state.map_error {
            return IsolationStatus::Failing(format!("the hook's maps could not take every local address: {e}"));
        }
        if let Some(Err(e)) = &state.probe {
            return IsolationStatus::Failing(e.clone());
        }
        IsolationStatus::On {
            everywhere: state.everywhere.iter().copied().collect(),
            local: state.local.difference(&state.everywhere).copied().collect(),
        }
    }

    /// Adds `port` (refused on every address when `everywhere`, else on this host's), and
    /// checks the hooks again.
    pub fn protect(&self, port: u16, everywhere: bool) {
        {
            let mut state = lock(&self.state);
            if everywhere {
                state.everywhere.insert(port);
            } else {
                state.local.insert(port);
            }
        }
        self.refresh();
        self.check();
    }

    /// Brings the maps in line with this host's addresses now. Keys that do not fit (a full
    /// map) are left out and remembered: the status turns to failing until they fit.
    pub fn refresh(&self) {
        let prefixes = local_prefixes();
        let anywhere = anywhere();
        let mut state = lock(&self.state);
        let local: Vec<u16> = state.local.difference(&state.everywhere).copied().collect();
        let everywhere: Vec<u16> = state.everywhere.iter().copied().collect();
        let bound: Vec<u16> = state.local.union(&state.everywhere).copied().collect();
        let mut failure = None;
        for ((hook, map), have) in self.maps.iter().zip(state.installed.iter_mut()) {
            let want = if hook.is_bind() {
                keys(*hook, &bound, &anywhere)
            } else {
                let mut want = keys(*hook, &local, &prefixes);
                want.extend(keys(*hook, &everywhere, &anywhere));
                want
            };
            // Removals first: they make room.
            for key in have.difference(&want).cloned().collect::<Vec<_>>() {
                match map.remove(&key) {
                    Ok(()) => {
                        have.remove(&key);
                    }
                    Err(e) => failure = Some(format!("removing an address: {e}")),
                }
            }
            let missing: Vec<Vec<u8>> = want.difference(have).cloned().collect();
            let mut left_out = 0usize;
            let mut why = None;
            for key in missing {
                match map.insert(&key) {
                    Ok(()) => {
                        have.insert(key);
                    }
                    Err(e) => {
                        left_out += 1;
                        why.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = why {
                failure = Some(format!(
                    "{left_out} of {} entries left out of the {} map ({e}; {MAX_ENTRIES} entries at most)",
                    want.len(),
                    hook.program_name()
                ));
            }
        }
        state.map_error = failure;
    }

    /// Runs the self-test now (a process forked into a child cgroup of the tasks' parent must
    /// get EPERM on each protected port) and records its verdict.
    pub fn check(&self) {
        let (everywhere, local) = {
            let state = lock(&self.state);
            let local: Vec<u16> = state.local.difference(&state.everywhere).copied().collect();
            (state.everywhere.iter().copied().collect::<Vec<u16>>(), local)
        };
        if everywhere.is_empty() && local.is_empty() {
            return;
        }
        let verdict = probe::run(&self.dir, &everywhere, &local);
        lock(&self.state).probe = Some(verdict);
        self.log_change();
    }

    /// Logs the status when it differs from the one logged last (after the first line, which
    /// `serve` writes).
    fn log_change(&self) {
        let now = self.status();
        let mut state = lock(&self.state);
        match &state.logged {
            None => state.logged = Some(now),
            Some(before) if *before == now => {}
            Some(_) => {
                if now.is_on() {
                    tracing::info!("task isolation {now}");
                } else {
                    tracing::warn!("task isolation {now}");
                }
                state.logged = Some(now);
            }
        }
    }

    /// Keeps the maps current and checked until the worker shuts down: the maps on every
    /// rtnetlink address event and every [`RESCAN_EVERY`] (in case an event was missed), the
    /// self-test every `check_every`.
    pub fn watch(self: Arc<Self>, check_every: Duration, background: &crate::background::Background) {
        background.spawn(async move {
            let events = address_events().map_err(|e| tracing::warn!(error = %e, "watching address changes")).ok();
            let mut rescan = tokio::time::interval(RESCAN_EVERY);
            let mut check = tokio::time::interval(check_every.max(Duration::from_millis(100)));
            // The first ticks complete at once: install() just did both.
            rescan.tick().await;
            check.tick().await;
            loop {
                let probe = match &events {
                    Some(fd) => tokio::select! {
                        ready = fd.readable() => {
                            match ready {
                                Ok(mut guard) => {
                                    drain(guard.get_inner());
                                    guard.clear_ready();
                                }
                                Err(_) => {
                                    rescan.tick().await;
                                }
                            }
                            false
                        }
                        _ = rescan.tick() => false,
                        _ = check.tick() => true,
                    },
                    None => tokio::select! {
                        _ = rescan.tick() => false,
                        _ = check.tick() => true,
                    },
                };
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if probe {
                        me.check();
                    } else {
                        me.refresh();
                        me.log_change();
                    }
                })
                .await;
            }
        });
    }
}

/// Detaches the hooks any worker attached to `cgroup_dir`, and removes the self-test's cgroup;
/// returns how many hooks. A missing directory has none.
pub fn remove(cgroup_dir: &Path) -> Result<usize, IsolationError> {
    let cgroup = match bpf::open_cgroup(cgroup_dir) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(bpf_err("opening the tasks' cgroup")(e)),
    };
    let mut removed = 0;
    for hook in Hook::ALL {
        for a in bpf::attached(&cgroup, hook).map_err(bpf_err("listing the cgroup's hooks"))? {
            if a.name == hook.program_name() {
                a.detach(&cgroup).map_err(bpf_err("detaching a task hook"))?;
                removed += 1;
            }
        }
    }
    probe::remove_cgroup(cgroup_dir);
    Ok(removed)
}

/// The names of the hooks attached to `cgroup_dir` (ours and any other), empty when the
/// directory does not exist.
pub fn attached(cgroup_dir: &Path) -> Result<Vec<String>, IsolationError> {
    let cgroup = match bpf::open_cgroup(cgroup_dir) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bpf_err("opening the tasks' cgroup")(e)),
    };
    let mut names = Vec::new();
    for hook in Hook::ALL {
        let found = bpf::attached(&cgroup, hook).map_err(bpf_err("listing the cgroup's hooks"))?;
        names.extend(found.into_iter().map(|a| a.name));
    }
    Ok(names)
}

/// Where the hook goes for the tasks' parent cgroup `parent` (the unified tree's directory).
pub fn cgroup_dir(layout: &crate::cgroup::Layout, parent: &str) -> Result<PathBuf, IsolationError> {
    layout.unified_dir(parent).ok().flatten().ok_or(IsolationError::NoCgroup2)
}

/// Every address: the prefixes whose keys cover a port alone.
fn anywhere() -> BTreeSet<(IpAddr, u8)> {
    [(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)].into_iter().collect()
}

/// Every local destination: what `connect()` to reaches this host itself. Loopback
/// interfaces make their whole prefix local (`127.0.0.0/8`); other interfaces their own
/// address; connecting to the unspecified address reaches the host too.
pub fn local_prefixes() -> BTreeSet<(IpAddr, u8)> {
    let mut out: BTreeSet<(IpAddr, u8)> = BTreeSet::new();
    out.insert((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32));
    out.insert((IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8));
    out.insert((IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128));
    out.insert((IpAddr::V6(Ipv6Addr::LOCALHOST), 128));
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for a in addrs {
        let loopback = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
        let Some(addr) = a.address else { continue };
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        let full = if ip.is_ipv4() { 32 } else { 128 };
        let len = match (loopback, a.netmask) {
            (true, Some(mask)) => match (mask.as_sockaddr_in(), mask.as_sockaddr_in6()) {
                (Some(m), _) => u32::from(m.ip()).count_ones() as u8,
                (_, Some(m)) => u128::from(m.ip()).count_ones() as u8,
                _ => full,
            },
            _ => full,
        };
        out.insert((mask(ip, len), len));
    }
    out
}

/// Whether `ip` is in one of `prefixes` (those of [`local_prefixes`]).
pub fn is_local(ip: IpAddr, prefixes: &BTreeSet<(IpAddr, u8)>) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    prefixes.iter().any(|(net, len)| net.is_ipv4() == ip.is_ipv4() && mask(ip, *len) == *net)
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// The map keys of `hook` for `ports` on `prefixes`: `{32 + prefix length, port, 0, address}`
/// (IPv4 prefixes go into the IPv6 map in their IPv4-mapped form, `::ffff:a.b.c.d`). A /0
/// prefix makes a key of length 32: the port alone, on every address.
pub fn keys(hook: Hook, ports: &[u16], prefixes: &BTreeSet<(IpAddr, u8)>) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    for port in ports {
        for (ip, len) in prefixes {
            let (octets, len): (Vec<u8>, u32) = match (hook.is_v6(), ip) {
                (false, IpAddr::V4(a)) => (a.octets().to_vec(), u32::from(*len)),
                (false, IpAddr::V6(_)) => continue,
                (true, IpAddr::V4(a)) => (a.to_ipv6_mapped().octets().to_vec(), 96 + u32::from(*len)),
                (true, IpAddr::V6(a)) => (a.octets().to_vec(), u32::from(*len)),
            };
            let mut key = Vec::with_capacity(hook.key_len());
            key.extend_from_slice(&(32 + len).to_ne_bytes());
            key.extend_from_slice(&port.to_be_bytes());
            key.extend_from_slice(&[0, 0]);
            key.extend_from_slice(&octets);
            out.insert(key);
        }
    }
    out
}

/// A non-blocking rtnetlink socket that hears every IPv4 and IPv6 address change.
fn address_events() -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket};
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))?;
    // SAFETY: `fd` is an open socket the AsyncFd owns from here on, so it stays open and the
    // same for the AsyncFd's whole life.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}

/// Reads every pending event (their content does not matter: the maps are rebuilt from a
/// fresh scan).
fn drain(fd: &std::os::fd::OwnedFd) {
    let mut buf = [0u8; 8192];
    while let Ok(n) =
        nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(fd), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
    {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_port_then_address_with_the_prefix_length() {
        let prefixes: BTreeSet<(IpAddr, u8)> =
            [("127.0.0.0".parse().unwrap(), 8), ("::1".parse().unwrap(), 128)].into_iter().collect();
        let v4 = keys(Hook::Connect4, &[8080], &prefixes);
        let mut want = (32u32 + 8).to_ne_bytes().to_vec();
        want.extend([0x1f, 0x90, 0, 0, 127, 0, 0, 0]);
        assert_eq!(v4.into_iter().collect::<Vec<_>>(), vec![want]);
        let v6 = keys(Hook::Connect6, &[8080, 10000], &prefixes);
        assert_eq!(v6.len(), 4, "two ports × (::1 and ::ffff:127.0.0.0/104)");
        for k in &v6 {
            assert_eq!(k.len(), Hook::Connect6.key_len());
        }
        let mapped = v6.iter().find(|k| k[4..6] == [0x1f, 0x90] && k[20] == 127).unwrap();
        assert_eq!(u32::from_ne_bytes(mapped[..4].try_into().unwrap()), 32 + 96 + 8);
        assert_eq!(&mapped[8..20], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    }

    #[test]
    fn this_host_has_loopback_and_unspecified_prefixes() {
        let p = local_prefixes();
        assert!(p.contains(&("127.0.0.0".parse().unwrap(), 8)), "{p:?}");
        assert!(p.contains(&("0.0.0.0".parse().unwrap(), 32)), "{p:?}");
        assert!(p.contains(&("::".parse().unwrap(), 128)), "{p:?}");
        assert_eq!(mask("10.1.2.3".parse().unwrap(), 8), "10.0.0.0".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_port_everywhere_is_one_key_of_the_port_alone() {
        let v4 = keys(Hook::Bind4, &[8080], &anywhere());
        let mut want = 32u32.to_ne_bytes().to_vec();
        want.extend([0x1f, 0x90, 0, 0, 0, 0, 0, 0]);
        assert_eq!(v4.into_iter().collect::<Vec<_>>(), vec![want]);
        // ::/0, and ::ffff:0:0/96 (covered by it).
        let v6 = keys(Hook::Connect6, &[8080], &anywhere());
        assert!(v6.iter().any(|k| u32::from_ne_bytes(k[..4].try_into().unwrap()) == 32), "{v6:?}");
    }

    #[test]
    fn status_lines_say_what_tasks_can_do() {
        let on = IsolationStatus::On { everywhere: vec![8080], local: vec![] }.to_string();
        assert_eq!(on, "on: tasks cannot connect to port 8080 on any address, nor bind it");
        let both = IsolationStatus::On { everywhere: vec![8080], local: vec![10000] }.to_string();
        assert_eq!(
            both,
            "on: tasks cannot connect to port 8080 on any address, nor to port 10000 on this host's addresses, nor \
             bind them"
        );
        let why = IsolationStatus::Unavailable("bpf: Operation not permitted".into()).to_string();
        assert!(why.starts_with("unavailable (bpf: Operation not permitted)"), "{why}");
        assert!(IsolationStatus::Failing("x".into()).to_string().starts_with("failing (x)"));
    }

    #[test]
    fn hybrid_hosts_need_5_15() {
        for (release, safe) in [
            ("6.18.44-fc-v1300", true),
            ("5.15.0-91-generic", true),
            ("5.14.21-150400.24.46-default", false),
            ("5.10.0-21-amd64", false),
            ("4.19.0", false),
            ("garbage", false),
        ] {
            assert_eq!(hybrid_kernel_is_safe(release), safe, "{release}");
        }
    }
}
