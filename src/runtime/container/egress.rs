//! Filtered egress for a container with a network of its own (the newest wire's
//! `egress_policy` INTERNET): public addresses only, as Iris's egress network gives — the
//! cluster's private ranges, carrier-grade NAT, link-local (the cloud metadata server) and
//! the host itself refused.
//!
//! Nothing on the host changes: no sysctl, no firewall rule, no interface. `slirp4netns`
//! gives the container's network namespace a `tap0` whose traffic it carries out through the
//! host's sockets in user space (`--disable-host-loopback`: never to the host's loopback), and
//! the rules that refuse the private ranges live in the container's own namespace (nftables,
//! set before the task runs; the task has no CAP_NET_ADMIN to change them: PRIVILEGED with
//! INTERNET is refused on the wire). DNS goes to slirp's resolver, `10.0.2.3`, which forwards
//! to the host's.
//!
//! slirp4netns is a child of the supervisor, dying with it (PR_SET_PDEATHSIG) and killed when
//! the container is removed; it runs in a sandbox of its own with its own seccomp filter
//! (`--enable-sandbox --enable-seccomp`), since it parses the task's packets as root.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::unistd::Pid;

use crate::runtime::RuntimeError;

/// slirp4netns's resolver in the container, the one address of its network the rules let
/// through.
pub const RESOLVER: &str = "10.0.2.3";

/// The rules of the container's namespace: everything out but loopback, the resolver and public
/// IPv4 addresses is refused (at once, not left to time out).
const RULES: &str = "table inet iris_egress {
  chain out {
    type filter hook output priority 0; policy accept;
    oifname \"lo\" accept
    ip daddr 10.0.2.3 accept
    ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3 } reject
    meta nfproto ipv6 reject
  }
}
";

/// How long slirp4netns may take to configure the namespace.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A container's filtered egress: its slirp4netns, stopped on drop.
pub struct Egress {
    slirp: Child,
}

impl Drop for Egress {
    fn drop(&mut self) {
        let _ = self.slirp.kill();
        let _ = self.slirp.wait();
    }
}

fn failed(why: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Spec(format!("filtered egress: {why}"))
}

/// Gives the network namespace of `pid` (the container's init, waiting) its filtered way out.
pub fn attach(pid: Pid) -> Result<Egress, RuntimeError> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed)?;
    let ready_fd = ready_w.as_raw_fd();
    let mut command = Command::new("slirp4netns");
    command
        // Its own sandbox (mount namespace, capabilities dropped) and seccomp filter: it parses
        // the task's packets as root.
        .args(["--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"])
        .arg("--ready-fd=3")
        .arg(pid.as_raw().to_string())
        .arg("tap0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec of a single-threaded parent: dup2 and prctl only.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            if libc::dup2(ready_fd, 3) < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let slirp = command.spawn().map_err(|e| failed(format!("starting slirp4netns: {e}")))?;
    drop(ready_w);
    let egress = Egress { slirp };
    // One byte on the ready pipe once tap0 is up and routed.
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&ready_r), nix::poll::PollFlags::POLLIN)];
    let timeout =
        nix::poll::PollTimeout::try_from(READY_WITHIN.as_millis() as i32).unwrap_or(nix::poll::PollTimeout::MAX);
    let mut byte = [0u8; 1];
    let ready = nix::poll::poll(&mut fds, timeout).map_err(failed)? > 0
        && nix::unistd::read(ready_r.as_raw_fd(), &mut byte).is_ok_and(|n| n == 1);
    if !ready {
        return Err(failed("slirp4netns did not configure the container's network"));
    }
    let mut nft = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", pid.as_raw()))
        .args(["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("starting nft: {e}")))?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin.write_all(RULES.as_bytes()).map_err(|e| failed(format!("writing the rules: {e}")))?;
    }
    let out = nft.wait_with_output().map_err(|e| failed(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!("nft refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(egress)
}
