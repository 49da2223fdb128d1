//! The self-test: a process in a child cgroup of the tasks' parent must be refused (EPERM)
//! each protected port — `connect()` to it on loopback (IPv4 and IPv6), on a remote address for
//! the ports refused everywhere, and `bind()` of it on every address of both families. An
//! attached hook proves nothing by itself: on a hybrid host with an older kernel, cgroup v2
//! socket matching can be off host-wide; another program (or a process-runtime task, which is
//! root on the host) can detach the programs. So what HealthCheck says is what this saw.
//!
//! The worker forks; the child moves itself into [`PROBE_CGROUP`] below the hooked directory,
//! tries each call on a non-blocking socket (no connection is ever waited for), writes one
//! errno per call to a pipe and exits. Between fork and exit the child makes only raw system
//! calls on memory prepared before the fork (no allocation, no lock), as a child of a
//! multi-threaded process must.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The probe's cgroup, below the directory the hooks are attached to.
pub const PROBE_CGROUP: &str = "iris-isolation-probe";

/// A remote address for the "on any address" check: TEST-NET-1 (RFC 5737), never routed. With
/// the hook working no packet is sent; without it, one SYN may leave before the socket closes.
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// Calls at most (a bound for the child's fixed-size answer).
const MAX_CALLS: usize = 64;

/// One call the child makes.
struct Call {
    bind: bool,
    addr: SocketAddr,
}

impl Call {
    fn describe(&self) -> String {
        format!("{} {}", if self.bind { "bind" } else { "connect to" }, self.addr)
    }
}

/// A socket address as the kernel reads it.
struct Raw {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
    family: libc::c_int,
}

fn raw(addr: &SocketAddr) -> Raw {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid (unspecified) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (len, family) = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in>(), sin) };
            (std::mem::size_of::<libc::sockaddr_in>(), libc::AF_INET)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            (std::mem::size_of::<libc::sockaddr_in6>(), libc::AF_INET6)
        }
    };
    Raw { storage, len: len as libc::socklen_t, family }
}

/// The calls that must fail with EPERM for `everywhere` ports (refused on any address) and
/// `local` ones (refused on this host's addresses).
fn calls(everywhere: &[u16], local: &[u16]) -> Vec<Call> {
    let mut out = Vec::new();
    for (port, any) in everywhere.iter().map(|p| (*p, true)).chain(local.iter().map(|p| (*p, false))) {
        out.push(Call { bind: false, addr: (Ipv4Addr::LOCALHOST, port).into() });
        out.push(Call { bind: false, addr: (Ipv6Addr::LOCALHOST, port).into() });
        if any {
            out.push(Call { bind: false, addr: (REMOTE, port).into() });
        }
        out.push(Call { bind: true, addr: (Ipv4Addr::UNSPECIFIED, port).into() });
        out.push(Call { bind: true, addr: (Ipv6Addr::UNSPECIFIED, port).into() });
    }
    out.truncate(MAX_CALLS);
    out
}

/// Runs the self-test below the hooked directory `dir`: `Ok` when every call was refused,
/// else what got through. IPv6 calls are skipped on a host without IPv6.
pub fn run(dir: &Path, everywhere: &[u16], local: &[u16]) -> Result<(), String> {
    let calls = calls(everywhere, local);
    let cgroup = dir.join(PROBE_CGROUP);
    match std::fs::create_dir(&cgroup) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("the self-test could not make its cgroup: {e}")),
    }
    let result = fork_and_try(&cgroup, &calls);
    remove_cgroup(dir);
    let errnos = result.map_err(|e| format!("the self-test could not run: {e}"))?;
    let mut through = Vec::new();
    for (call, errno) in calls.iter().zip(errnos) {
        match errno {
            libc::EPERM => {}
            // No IPv6 on this host: nothing to reach that way.
            libc::EAFNOSUPPORT if call.addr.is_ipv6() => {}
            0 | libc::EINPROGRESS => through.push(format!("{} was allowed", call.describe())),
            e => through.push(format!("{} was not refused ({})", call.describe(), io::Error::from_raw_os_error(e))),
        }
    }
    if through.is_empty() {
        Ok(())
    } else {
        Err(format!("the self-test's process in the tasks' cgroup: {}", through.join("; ")))
    }
}

/// The errno of each call (0 for success) as the forked child saw it.
fn fork_and_try(cgroup: &Path, calls: &[Call]) -> io::Result<Vec<i32>> {
    let procs = std::fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs"))?;
    let raws: Vec<Raw> = calls.iter().map(|c| raw(&c.addr)).collect();
    let binds: Vec<bool> = calls.iter().map(|c| c.bind).collect();
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two descriptors it returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made by pipe2 and are owned here alone.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let procs_fd = procs.as_raw_fd();
    let out_fd = write_end.as_raw_fd();
    // SAFETY: the child runs only async-signal-safe system calls on memory made before the
    // fork (`raws`, `binds`, a stack array) and leaves with _exit: no allocation, no lock, no
    // unwinding, as POSIX requires of a child of a multi-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; every pointer is into memory that lives until _exit.
        unsafe { child(procs_fd, out_fd, &raws, &binds) }
    }
    drop(write_end);
    drop(procs);
    let mut answer = vec![0u8; calls.len() * 4];
    let mut got = 0;
    let read_result = loop {
        if got == answer.len() {
            break Ok(());
        }
        // SAFETY: reading into the unfilled tail of `answer`.
        let n = unsafe { libc::read(read_end.as_raw_fd(), answer[got..].as_mut_ptr().cast(), answer.len() - got) };
        match n {
            n if n > 0 => got += n as usize,
            0 => break Err(io::Error::other("the probe process ended without answering")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    break Err(e);
                }
            }
        }
    };
    let mut status = 0;
    // SAFETY: waiting for the child forked above, which is ours alone to reap.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    read_result?;
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == JOIN_FAILED {
        return Err(io::Error::other("the probe process could not join its cgroup"));
    }
    Ok(answer.chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The child's exit code when it could not move into the probe cgroup.
const JOIN_FAILED: i32 = 3;

/// The forked child: joins the probe cgroup, makes each call, writes the errnos, exits.
///
/// # Safety
/// Only in the child of `fork()`, with `raws` and `binds` of equal length (at most
/// [`MAX_CALLS`]) and the two descriptors open.
unsafe fn child(procs_fd: i32, out_fd: i32, raws: &[Raw], binds: &[bool]) -> ! {
    // SAFETY: the caller's contract above: a forked child, the slices and descriptors valid;
    // only raw system calls follow, no allocation and no lock.
    unsafe {
        let zero = b"0";
        if libc::write(procs_fd, zero.as_ptr().cast(), 1) != 1 {
            libc::_exit(JOIN_FAILED);
        }
        let mut errnos = [0i32; MAX_CALLS];
        let n = raws.len().min(binds.len()).min(MAX_CALLS);
        for i in 0..n {
            let r = &raws[i];
            let s = libc::socket(r.family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                errnos[i] = *libc::__errno_location();
                continue;
            }
            let addr = std::ptr::from_ref(&r.storage).cast::<libc::sockaddr>();
            let rc = if binds[i] {
                if r.family == libc::AF_INET6 {
                    // [::] alone: a dual-stack bind could fail on the IPv4 side for another
                    // reason than the hook.
                    let one: libc::c_int = 1;
                    libc::setsockopt(
                        s,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
                libc::bind(s, addr, r.len)
            } else {
                libc::connect(s, addr, r.len)
            };
            errnos[i] = if rc == 0 { 0 } else { *libc::__errno_location() };
            libc::close(s);
        }
        let bytes = n * 4;
        let mut done = 0;
        let base = errnos.as_ptr().cast::<u8>();
        while done < bytes {
            let w = libc::write(out_fd, base.add(done).cast(), bytes - done);
            if w <= 0 {
                break;
            }
            done += w as usize;
        }
        libc::_exit(0)
    }
}

/// Removes the probe's cgroup below `dir` (a moment after the probe ended its cgroup may
/// still count it: retried briefly, and left for the next run or `cleanup` otherwise).
pub fn remove_cgroup(dir: &Path) {
    let cgroup = dir.join(PROBE_CGROUP);
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match std::fs::remove_dir(&cgroup) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_is_tried_both_ways_and_remote_only_when_refused_everywhere() {
        let c = calls(&[8080], &[10000]);
        let described: Vec<String> = c.iter().map(Call::describe).collect();
        assert_eq!(
            described,
            [
                "connect to 127.0.0.1:8080",
                "connect to [::1]:8080",
                "connect to 192.0.2.1:8080",
                "bind 0.0.0.0:8080",
                "bind [::]:8080",
                "connect to 127.0.0.1:10000",
                "connect to [::1]:10000",
                "bind 0.0.0.0:10000",
                "bind [::]:10000",
            ]
        );
        let r = raw(&"127.0.0.1:8080".parse().unwrap());
        assert_eq!((r.family, r.len as usize), (libc::AF_INET, std::mem::size_of::<libc::sockaddr_in>()));
    }
}
