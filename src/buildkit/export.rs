//! The `tar` exporter's output → a root filesystem directory. BuildKit built the tarball from
//! a Dockerfile the bundle brought, so it is unpacked like untrusted input: the `tar` crate's
//! `unpack_in` refuses `..` and absolute paths and never writes through a symlink outside the
//! destination; device nodes are skipped (the `tar` crate would write them as empty files, and
//! containers get their own /dev). Owners, modes, times and xattrs are kept.

use std::path::Path;

use super::BuildkitError;
use super::error::io;

/// Unpacks `tarball` into `dest` (created if missing; an existing one must be empty).
/// Blocking: run it off async threads.
pub fn unpack(tarball: &Path, dest: &Path) -> Result<u64, BuildkitError> {
    match std::fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(dest).map_err(io("reading", dest))?;
            if entries.next().is_some() {
                return Err(BuildkitError::BadRequest(format!("the destination {} is not empty", dest.display())));
            }
        }
        Err(e) => return Err(io("creating", dest)(e)),
    }
    let file = std::fs::File::open(tarball).map_err(io("opening", tarball))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut count = 0u64;
    for entry in archive.entries().map_err(io("reading", tarball))? {
        let mut entry = entry.map_err(io("reading", tarball))?;
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            continue;
        }
        let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        let written = entry.unpack_in(dest).map_err(|e| BuildkitError::Io {
            op: "unpacking",
            path: dest.join(&name),
            source: e,
        })?;
        if !written {
            return Err(BuildkitError::BadRequest(format!(
                "the build's output has an entry outside the root: {name:?}"
            )));
        }
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tarball_unpacks_with_links_and_without_device_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let tarball = dir.path().join("out.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        let header = || {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h
        };
        let mut h = header();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "etc/", std::io::empty()).unwrap();
        let mut h = header();
        h.set_mode(0o640);
        h.set_size(5);
        b.append_data(&mut h, "etc/hello", &b"hello"[..]).unwrap();
        let mut h = header();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "etc/link", "hello").unwrap();
        let mut h = header();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o666);
        h.set_size(0);
        b.append_data(&mut h, "dev-null", std::io::empty()).unwrap();
        b.finish().unwrap();
        drop(b);
        let dest = dir.path().join("root");
        unpack(&tarball, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("etc/hello")).unwrap(), "hello");
        assert_eq!(std::fs::read_link(dest.join("etc/link")).unwrap(), Path::new("hello"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dest.join("etc/hello")).unwrap().permissions().mode() & 0o777, 0o640);
        assert!(!dest.join("dev-null").exists());
    }
}
