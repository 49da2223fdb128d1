//! Tasks cannot drive the worker: no process of a task may open a connection to the worker's
//! port (with `--isolate-controller`, the local controller's too) on any address of this host,
//! while host processes outside the tasks and other hosts still can, and tasks keep the host
//! network and their ports.
//!
//! The mechanism is a pair of `BPF_CGROUP_INET4_CONNECT` / `INET6_CONNECT` programs attached
//! to the cgroup v2 directory that holds every task of this worker (the worker's parent
//! cgroup; on a hybrid host its twin in the unified tree, which tasks join too). The kernel
//! runs them on every `connect()` (and TCP Fast Open `sendto`) of a socket made in that
//! subtree, before any packet leaves: a destination whose (port, address) is in the program's
//! map gets EPERM. The maps hold the protected ports on every local address: `127.0.0.0/8`,
//! `0.0.0.0`, `::`, `::1`, each address of each interface, and their IPv4-mapped IPv6 forms;
//! the worker keeps them current as addresses come and go (rtnetlink address events, and a
//! rescan every 30 s). See docs/ARCHITECTURE.md ("Who can reach the worker") for why this and
//! not a firewall rule.
//!
//! The programs stay attached when the worker exits (tasks outlive it); a restarted worker
//! attaches fresh ones and then detaches the earlier ones (found by name), and `iris-worker
//! cleanup` detaches them. Removing the cgroup removes them too.

mod bpf;

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use bpf::Hook;

/// How often the local addresses are rescanned even without an rtnetlink event.
const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// Entries per map: protected ports × local prefixes.
const MAX_ENTRIES: u32 = 8192;

/// Why the hook could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// Connect hooks attach to cgroup v2 directories only.
    #[error("the tasks' cgroup has no cgroup v2 directory (no cgroup2 filesystem is mounted)")]
    NoCgroup2,
    /// Tasks run without cgroups here (the process runtime on a host without usable ones).
    #[error("tasks run without a cgroup on this host")]
    NoCgroup,
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
    /// Tasks cannot connect to these ports on any local address.
    On { ports: Vec<u16> },
    /// The operator turned it off (`--task-isolation false`).
    Off,
    /// The host cannot do it; the reason.
    Unavailable(String),
}

impl IsolationStatus {
    pub fn is_on(&self) -> bool {
        matches!(self, IsolationStatus::On { .. })
    }
}

impl fmt::Display for IsolationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsolationStatus::On { ports } => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(f, "on: tasks cannot connect to port {} on this host's addresses", ports.join(", "))
            }
            IsolationStatus::Off => write!(f, "off (--task-isolation false): tasks can call this worker's API"),
            IsolationStatus::Unavailable(why) => {
                write!(f, "unavailable ({why}): tasks can call this worker's API; use --auth-token-file")
            }
        }
    }
}

/// The connect hook on one cgroup, with the maps this process keeps current.
pub struct Isolation {
    ports: Vec<u16>,
    maps: Vec<(Hook, bpf::Map)>,
    /// The keys in each map (same order as `maps`).
    installed: Mutex<Vec<BTreeSet<Vec<u8>>>>,
}

impl Isolation {
    /// Attaches the hook to `cgroup_dir` for `ports`, then detaches any hook an earlier worker
    /// left there (in that order: tasks are never without one).
    pub fn install(cgroup_dir: &Path, ports: &[u16]) -> Result<Isolation, IsolationError> {
        let cgroup = bpf::open_cgroup(cgroup_dir).map_err(bpf_err("opening the tasks' cgroup"))?;
        let mut earlier = Vec::new();
        for hook in Hook::ALL {
            let found = bpf::attached(&cgroup, hook).map_err(bpf_err("listing the cgroup's connect hooks"))?;
            earlier.extend(found.into_iter().filter(|a| a.name == hook.program_name()));
        }
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        let mut maps = Vec::new();
        for hook in Hook::ALL {
            maps.push((hook, bpf::Map::create(hook, MAX_ENTRIES).map_err(bpf_err("creating a BPF map"))?));
        }
        let isolation = Isolation { ports, installed: Mutex::new(vec![BTreeSet::new(); maps.len()]), maps };
        isolation.refresh()?;
        for (hook, map) in &isolation.maps {
            let program = bpf::Program::load(*hook, map).map_err(bpf_err("loading the connect hook"))?;
            program.attach(&cgroup).map_err(bpf_err("attaching the connect hook to the tasks' cgroup"))?;
        }
        for old in earlier {
            old.detach(&cgroup).map_err(bpf_err("detaching an earlier worker's connect hook"))?;
        }
        Ok(isolation)
    }

    /// What HealthCheck reports.
    pub fn status(&self) -> IsolationStatus {
        IsolationStatus::On { ports: self.ports.clone() }
    }

    /// Brings the maps in line with this host's addresses now.
    pub fn refresh(&self) -> Result<(), IsolationError> {
        let prefixes = local_prefixes();
        let mut installed = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        for ((hook, map), have) in self.maps.iter().zip(installed.iter_mut()) {
            let want = keys(*hook, &self.ports, &prefixes);
            for key in want.difference(have) {
                map.insert(key).map_err(bpf_err("adding a local address to the connect hook"))?;
            }
            for key in have.difference(&want) {
                map.remove(key).map_err(bpf_err("removing an address from the connect hook"))?;
            }
            *have = want;
        }
        Ok(())
    }

    /// Keeps the maps current for as long as the runtime runs: on every rtnetlink address
    /// event, and every [`RESCAN_EVERY`] in case an event was missed.
    pub fn watch(self: Arc<Self>) {
        tokio::spawn(async move {
            let events = address_events().map_err(|e| tracing::warn!(error = %e, "watching address changes")).ok();
            let mut tick = tokio::time::interval(RESCAN_EVERY);
            loop {
                match &events {
                    Some(fd) => tokio::select! {
                        ready = fd.readable() => match ready {
                            Ok(mut guard) => {
                                drain(guard.get_inner());
                                guard.clear_ready();
                            }
                            Err(_) => {
                                tick.tick().await;
                            }
                        },
                        _ = tick.tick() => {}
                    },
                    None => {
                        tick.tick().await;
                    }
                }
                if let Err(e) = self.refresh() {
                    tracing::warn!(error = %e, "updating the task connect hook's addresses");
                }
            }
        });
    }
}

/// Detaches the hooks any worker attached to `cgroup_dir`; returns how many. A missing
/// directory has none.
pub fn remove(cgroup_dir: &Path) -> Result<usize, IsolationError> {
    let cgroup = match bpf::open_cgroup(cgroup_dir) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(bpf_err("opening the tasks' cgroup")(e)),
    };
    let mut removed = 0;
    for hook in Hook::ALL {
        for a in bpf::attached(&cgroup, hook).map_err(bpf_err("listing the cgroup's connect hooks"))? {
            if a.name == hook.program_name() {
                a.detach(&cgroup).map_err(bpf_err("detaching a connect hook"))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// The names of the connect hooks attached to `cgroup_dir` (ours and any other), empty when
/// the directory does not exist.
pub fn attached(cgroup_dir: &Path) -> Result<Vec<String>, IsolationError> {
    let cgroup = match bpf::open_cgroup(cgroup_dir) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bpf_err("opening the tasks' cgroup")(e)),
    };
    let mut names = Vec::new();
    for hook in Hook::ALL {
        let found = bpf::attached(&cgroup, hook).map_err(bpf_err("listing the cgroup's connect hooks"))?;
        names.extend(found.into_iter().map(|a| a.name));
    }
    Ok(names)
}

/// Where the hook goes for the tasks' parent cgroup `parent` (the unified tree's directory).
pub fn cgroup_dir(layout: &crate::cgroup::Layout, parent: &str) -> Result<PathBuf, IsolationError> {
    layout.unified_dir(parent).ok().flatten().ok_or(IsolationError::NoCgroup2)
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
/// (IPv4 prefixes go into the IPv6 map in their IPv4-mapped form, `::ffff:a.b.c.d`).
pub fn keys(hook: Hook, ports: &[u16], prefixes: &BTreeSet<(IpAddr, u8)>) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    for port in ports {
        for (ip, len) in prefixes {
            let (octets, len): (Vec<u8>, u32) = match (hook, ip) {
                (Hook::Connect4, IpAddr::V4(a)) => (a.octets().to_vec(), u32::from(*len)),
                (Hook::Connect4, IpAddr::V6(_)) => continue,
                (Hook::Connect6, IpAddr::V4(a)) => (a.to_ipv6_mapped().octets().to_vec(), 96 + u32::from(*len)),
                (Hook::Connect6, IpAddr::V6(a)) => (a.octets().to_vec(), u32::from(*len)),
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
    fn status_lines_say_what_tasks_can_do() {
        assert!(IsolationStatus::On { ports: vec![8080] }.to_string().contains("port 8080"));
        let why = IsolationStatus::Unavailable("bpf: Operation not permitted".into()).to_string();
        assert!(why.starts_with("unavailable (bpf: Operation not permitted)"), "{why}");
    }
}
