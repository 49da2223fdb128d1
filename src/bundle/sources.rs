//! Where bundles may come from: the operator's choice, since the worker reads them as root.
//!
//! - `file://` (or an absolute path) only below a directory given with `--allow-bundle-path`
//!   (none by default): any other host path is refused before it is touched, so a request can
//!   neither read a file the operator did not offer nor learn whether one exists. The file is
//!   opened once, relative to a handle on the allowed directory, by `openat2` with
//!   `RESOLVE_BENEATH`: the kernel refuses any `..` or symlink (absolute, or relative and
//!   leading out) that would leave the directory, at the moment of the open, so no link
//!   planted before or after a check is followed out; the open does not block (a FIFO cannot
//!   hang a thread) and only a regular file is read, from that same handle.
//! - `http(s)://` only to public addresses unless `--allow-private-bundle-hosts`: an address
//!   literal is checked as given; a name is checked where it resolves, by the HTTP client's own
//!   resolver, so the address checked is the address connected to (no rebinding between
//!   check and use), for the first request and for every redirect. Proxies from the
//!   environment are not used then: a proxy would connect on our behalf to an address we never
//!   see.
//! - The worker's own controller is trusted whatever its address, for the inline bundles it
//!   serves only (`<controller>/bundles/<sha256>.zip`, Iris's `bundle_blob`, and the newest
//!   Iris's `<controller>/blobs/<sha256>`): those are fetched
//!   from it with the worker's token and CA; where it redirects is checked as any URL.
//! - "Public" leaves out this host's own addresses, whatever they are.
//! - `gs://` and `s3://` are unchanged: their clients reach only their services (and the cloud's
//!   metadata endpoint, for credentials).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// The operator's rules for bundle locations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Directories `file://` bundles may be read from (and below).
    pub allowed_dirs: Vec<PathBuf>,
    /// http(s) bundles may come from loopback, private, link-local and other non-public
    /// addresses.
    pub allow_private_hosts: bool,
    /// The worker's controller, trusted as a bundle source.
    pub controller: Option<ControllerSource>,
}

/// The controller a worker reports to, as a bundle source: its URL's scheme, host and port,
/// the addresses the host had when the worker started (a controller may advertise an address
/// where workers name it), and what to present to it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ControllerSource {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub addresses: Vec<IpAddr>,
    /// The worker's token, when it has one (sent as `Bearer <token>`; renewed in place).
    pub authorization: Option<iris_wire::auth::AuthToken>,
    /// PEM roots for an https controller (the worker's `--tls-ca`).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ControllerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerSource")
            .field("origin", &format!("{}://{}:{}", self.scheme, self.host, self.port))
            .field("addresses", &self.addresses)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ControllerSource {
    /// The controller at `url` (`http(s)://host:port` or `host:port`); its host resolved now.
    pub fn new(
        url: &str,
        authorization: Option<iris_wire::auth::AuthToken>,
        ca_pem: Option<Vec<u8>>,
    ) -> Option<ControllerSource> {
        let url = url::Url::parse(url)
            .ok()
            .filter(|u| u.host_str().is_some())
            .or_else(|| url::Url::parse(&format!("http://{url}")).ok())?;
        let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = url.port_or_known_default()?;
        let addresses = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map(|a| a.map(|a| a.ip()).collect())
            .unwrap_or_default();
        Some(ControllerSource { scheme: url.scheme().to_string(), host, port, addresses, authorization, ca_pem })
    }

    /// Whether `url` is an inline bundle this controller serves (`…/bundles/<sha256>.zip`, or
    /// the newest wire's `…/blobs/<sha256>`):
    /// only those get the worker's token and skip the public-address check. Any other path on
    /// the controller's host (another service behind the same address, an open redirect) is an
    /// ordinary URL.
    pub fn serves(&self, url: &url::Url) -> bool {
        self.is_host_of(url) && is_inline_bundle_path(url.path()) && url.query().is_none()
    }

    /// Whether `url` is on this controller's scheme, host and port, whatever its path.
    fn is_host_of(&self, url: &url::Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        url.scheme() == self.scheme
            && url.port_or_known_default() == Some(self.port)
            && (host == self.host || literal(&host).is_some_and(|ip| self.addresses.contains(&ip)))
    }

    /// Whether a name the HTTP client resolves is this controller's (its addresses may be
    /// connected to whatever they are).
    pub fn is_named(&self, name: &str) -> bool {
        name.trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(&self.host)
    }
}

/// `…/bundles/<64 hex digits>.zip`, as the controller serves inline bundles, or
/// `…/blobs/<64 hex digits>`, as the newest Iris controller serves bundles and the workdir
/// files it keeps as blobs.
fn is_inline_bundle_path(path: &str) -> bool {
    let Some((dir, name)) = path.rsplit_once('/') else { return false };
    let is_sha = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match name.strip_suffix(".zip") {
        Some(sha) => (dir == "/bundles" || dir.ends_with("/bundles")) && is_sha(sha),
        None => (dir == "/blobs" || dir.ends_with("/blobs")) && is_sha(name),
    }
}

/// Why a `file://` bundle could not be opened.
#[derive(Debug)]
pub enum FileOpenError {
    /// Outside the allowed directories, or leading out of them.
    Refused(Refused),
    NotFound(std::io::Error),
    /// A directory, FIFO, socket or device: never read.
    NotRegular,
    Io(std::io::Error),
}

/// Why a location is refused (the message names the flag that would allow it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("file bundles are read only below a directory given with --allow-bundle-path, and this path is not")]
    PathNotAllowed,
    #[error(
        "{host} is a non-public address ({kind}); bundles come from public addresses unless the worker runs with --allow-private-bundle-hosts"
    )]
    PrivateAddress { host: String, kind: &'static str },
    #[error(
        "{0} resolves to no public address; bundles come from public addresses unless the worker runs with --allow-private-bundle-hosts"
    )]
    NoPublicAddress(String),
    /// Bundles are fetched over http(s) only, also after a redirect.
    #[error("a redirect to a {0} URL")]
    Scheme(String),
}

impl SourcePolicy {
    /// Whether a `file://` bundle at `path` may be read: it lies below an allowed directory
    /// and does not lead out of it (see [`SourcePolicy::open_file`]). A missing file is left
    /// for the fetch to report (it is inside a directory the operator offers); a path outside
    /// them is refused before any filesystem call.
    pub fn check_file(&self, path: &Path) -> Result<(), Refused> {
        match self.open_file(path) {
            Ok(_) | Err(FileOpenError::NotFound(_) | FileOpenError::NotRegular | FileOpenError::Io(_)) => Ok(()),
            Err(FileOpenError::Refused(r)) => Err(r),
        }
    }

    /// Opens the `file://` bundle at `path` for reading, once: below the allowed directory
    /// that holds it lexically, with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from a
    /// handle on that directory, non-blocking, and only if it is a regular file. The bundle is
    /// then read from this handle, so what was checked is what is read.
    pub fn open_file(&self, path: &Path) -> Result<std::fs::File, FileOpenError> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        use std::os::fd::{AsRawFd, FromRawFd};
        let lexical = normalize(path).ok_or(FileOpenError::Refused(Refused::PathNotAllowed))?;
        let (dir, rel) = self
            .allowed_dirs
            .iter()
            .filter_map(|d| normalize(d))
            .find_map(|d| lexical.strip_prefix(&d).ok().map(|rel| (d.clone(), rel.to_path_buf())))
            .ok_or(FileOpenError::Refused(Refused::PathNotAllowed))?;
        if rel.as_os_str().is_empty() {
            return Err(FileOpenError::NotRegular);
        }
        // The operator's directory itself may be reached through links: it is theirs.
        let dir = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&dir)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound { FileOpenError::NotFound(e) } else { FileOpenError::Io(e) }
            })?;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = nix::fcntl::openat2(dir.as_raw_fd(), &rel, how).map_err(|e| match e {
            nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR => FileOpenError::NotFound(e.into()),
            // EXDEV: a `..` or a link would leave the directory; ELOOP: a magic link, or links
            // that loop. Either way the path leads where the operator did not offer.
            nix::errno::Errno::EXDEV | nix::errno::Errno::ELOOP => FileOpenError::Refused(Refused::PathNotAllowed),
            e => FileOpenError::Io(e.into()),
        })?;
        // SAFETY: openat2 just returned this descriptor, which nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let meta = file.metadata().map_err(FileOpenError::Io)?;
        if !meta.file_type().is_file() {
            return Err(FileOpenError::NotRegular);
        }
        // A regular file ignores O_NONBLOCK; clear it anyway so reads are plain reads.
        nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
            .map_err(|e| FileOpenError::Io(e.into()))?;
        Ok(file)
    }

    /// Whether an http(s) host (an address literal, or a resolved address of a name) may be
    /// connected to.
    pub fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        if self.allow_private_hosts {
            return Ok(());
        }
        let kind = non_public(ip)
            .or_else(|| is_own(ip, &crate::isolation::local_prefixes()).then_some("this host's own address"));
        match kind {
            None => Ok(()),
            Some(kind) => Err(Refused::PrivateAddress { host: host.to_string(), kind }),
        }
    }

    /// Whether an http(s) URL — a bundle's, or where one redirects — may be fetched as far as
    /// its host is an address literal (a name is checked where it resolves).
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::Scheme(url.scheme().to_string()));
        }
        if self.trusts(url) {
            return Ok(());
        }
        let host = url.host_str().unwrap_or("");
        match literal(host) {
            Some(ip) => self.check_address(host, ip),
            None => Ok(()),
        }
    }

    /// Whether `url` is on the worker's own controller.
    pub fn trusts(&self, url: &url::Url) -> bool {
        self.controller.as_ref().is_some_and(|c| c.serves(url))
    }

    /// The addresses of `host` that may be connected to; an error if none may.
    pub fn filter_resolved(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        if self.allow_private_hosts {
            return Ok(addrs);
        }
        let own = crate::isolation::local_prefixes();
        let public: Vec<SocketAddr> =
            addrs.into_iter().filter(|a| non_public(a.ip()).is_none() && !is_own(a.ip(), &own)).collect();
        if public.is_empty() { Err(Refused::NoPublicAddress(host.to_string())) } else { Ok(public) }
    }
}

/// An absolute path without `.` or `..` (`..` is resolved lexically, never above the root);
/// `None` for a relative path.
fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// Whether `ip` reaches this host itself (one of its own addresses, public ones included:
/// services listening on them are the host's, as on loopback).
fn is_own(ip: IpAddr, own: &std::collections::BTreeSet<(IpAddr, u8)>) -> bool {
    crate::isolation::is_local(ip, own)
}

/// The IPv4 address an IPv6 one carries and delivers to, where the v6 prefix is a
/// translation or tunnelling one: 6to4 `2002:a.b.c.d::/16`, IPv4-compatible `::a.b.c.d`
/// (deprecated, but still parsed by stacks), NAT64 `64:ff9b::/96`.
fn embedded_v4(s: &[u16; 8]) -> Option<Ipv4Addr> {
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] || s[0..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(v4(s[6], s[7]))
    } else {
        None
    }
}

/// What kind of non-public address `ip` is, if it is one.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public_v4(v4);
            }
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique local")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                // 64:ff9b:1::/48, local-use NAT64 (RFC 8215): the operator's own translator.
                Some("local-use NAT64")
            } else if s[0] == 0x2001 && s[1] == 0 {
                // Teredo (2001::/32): the IPv4 address it reaches is obfuscated in the address.
                Some("Teredo")
            } else if let Some(v4) = embedded_v4(&s) {
                // 6to4, IPv4-compatible, NAT64: the IPv4 address it reaches decides.
                non_public_v4(v4)
            } else {
                None
            }
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("this network")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local, where cloud metadata services live")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// The address `host` is, when it is an address literal (`[v6]` or dotted v4).
pub fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_outside_the_allowed_dirs_are_refused_without_touching_them() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("bundles");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("b.zip"), b"zip").unwrap();
        std::fs::write(dir.path().join("secret.zip"), b"zip").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.zip"), allowed.join("link.zip")).unwrap();
        std::os::unix::fs::symlink("../secret.zip", allowed.join("relative-link.zip")).unwrap();
        std::os::unix::fs::symlink("b.zip", allowed.join("latest.zip")).unwrap();
        let policy = SourcePolicy { allowed_dirs: vec![allowed.clone()], ..Default::default() };
        assert!(policy.check_file(&allowed.join("b.zip")).is_ok());
        assert!(policy.check_file(&allowed.join("latest.zip")).is_ok(), "a link that stays inside");
        assert!(policy.check_file(&allowed.join("missing.zip")).is_ok(), "left for the fetch to report");
        let mut read = String::new();
        std::io::Read::read_to_string(&mut policy.open_file(&allowed.join("latest.zip")).unwrap(), &mut read).unwrap();
        assert_eq!(read, "zip");
        for refused in [
            dir.path().join("secret.zip"),
            allowed.join("../secret.zip"),
            allowed.join("link.zip"),
            allowed.join("relative-link.zip"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("relative.zip"),
        ] {
            assert_eq!(policy.check_file(&refused), Err(Refused::PathNotAllowed), "{}", refused.display());
        }
        assert_eq!(SourcePolicy::default().check_file(&allowed.join("b.zip")), Err(Refused::PathNotAllowed));
        assert!(Refused::PathNotAllowed.to_string().contains("--allow-bundle-path"));
    }

    #[test]
    fn only_public_addresses_pass_by_default() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "192.0.0.8",
            "198.19.255.1",
            "64:ff9b:1::1",
            "2002:c0a8:101::1",
            "::7f00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(non_public(ip).is_some(), "{private}");
            let err = SourcePolicy::default().check_address(private, ip).unwrap_err();
            assert!(err.to_string().contains("--allow-private-bundle-hosts"), "{err}");
            let open = SourcePolicy { allow_private_hosts: true, ..Default::default() };
            assert!(open.check_address(private, ip).is_ok());
        }
        for public in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "151.101.1.1", "2002:808:808::1", "198.20.0.1"] {
            assert_eq!(non_public(public.parse().unwrap()), None, "{public}");
        }
        let policy = SourcePolicy::default();
        for (url, ok) in [
            ("http://169.254.169.254/latest/meta-data/", false),
            ("https://[::1]:8443/b.zip", false),
            ("http://10.0.0.1/b.zip", false),
            ("file:///etc/passwd", false),
            ("https://8.8.8.8/b.zip", true),
            ("https://bundles.example.com/b.zip", true),
        ] {
            assert_eq!(policy.check_url(&url::Url::parse(url).unwrap()).is_ok(), ok, "{url}");
        }
        // The worker's own controller, named or by the address it advertises.
        let ctl = ControllerSource::new("http://localhost:10000", None, None).unwrap();
        let with_ctl = SourcePolicy { controller: Some(ctl), ..Default::default() };
        let sha = "ab".repeat(32);
        for (url, ok) in [
            ("http://localhost:10000/bundles/SHA.zip", true),
            ("http://127.0.0.1:10000/bundles/SHA.zip", true),
            ("http://127.0.0.1:10000/prefix/bundles/SHA.zip", true),
            ("http://127.0.0.1:10001/bundles/SHA.zip", false),
            ("https://127.0.0.1:10000/bundles/SHA.zip", false),
            // Only its inline bundles: not another path, not a short name, not a query.
            ("http://127.0.0.1:10000/admin/SHA.zip", false),
            ("http://127.0.0.1:10000/bundles/x.zip", false),
            ("http://127.0.0.1:10000/bundles/SHA.zip?next=/admin", false),
            // The newest Iris controller's blobs (bundles and large workdir files).
            ("http://127.0.0.1:10000/blobs/SHA", true),
            ("http://127.0.0.1:10000/blobs/SHA.zip", false),
            ("http://127.0.0.1:10000/blobs/x", false),
            ("http://127.0.0.1:10000/admin/SHA", false),
        ] {
            let url = url.replace("SHA", &sha);
            assert_eq!(with_ctl.check_url(&url::Url::parse(&url).unwrap()).is_ok(), ok, "{url}");
        }
        assert!(
            !format!(
                "{:?}",
                ControllerSource { authorization: iris_wire::auth::AuthToken::new("s3cret"), ..Default::default() }
            )
            .contains("s3cret")
        );
        let mixed = vec!["127.0.0.1:80".parse().unwrap(), "8.8.8.8:80".parse().unwrap()];
        assert_eq!(SourcePolicy::default().filter_resolved("h", mixed).unwrap(), vec!["8.8.8.8:80".parse().unwrap()]);
    }
}
