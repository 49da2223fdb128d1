//! One layer's tar stream → one directory, in the form overlayfs reads as a lower layer.
//!
//! Each layer is unpacked on its own (not onto the layers below it), so a whiteout cannot be
//! applied by deleting: `.wh.<name>` becomes overlayfs's whiteout (a 0/0 character device) and
//! `.wh..wh..opq` the `trusted.overlay.opaque` attribute of its directory. The layer is
//! hostile until proven otherwise: `..`, absolute paths, paths through a symlink and hard
//! links out of the layer are refused before anything is written outside `dest`.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, mknod};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::archive::{Separators, entry_parts};

/// A layer that is not a well-formed, harmless tar of its own tree.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {path:?}: {reason}")]
    Hostile { path: String, reason: &'static str },
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("{op} {path}: {source}")]
    Write { op: &'static str, path: PathBuf, source: io::Error },
    /// The content did not unpack; the whole blob hashes to `blob_sha256`.
    #[error("{cause}")]
    Broken { blob_sha256: String, cause: Box<UnpackError> },
}

fn write_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Write { op, path: path.to_path_buf(), source }
}

/// How a layer blob is compressed (told by its first bytes, not trusted from its media type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What unpacking read and wrote.
#[derive(Debug, Clone, Default)]
pub struct Unpacked {
    /// sha256 (hex) of the blob as read, compressed.
    pub blob_sha256: String,
    pub blob_bytes: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    pub entries: u64,
    /// Device nodes left out (only a privileged store creates them).
    pub skipped_devices: u64,
}

/// Counts and hashes what passes through it: the blob's digest is checked after the last byte.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Unpacks the layer blob read from `blob` into `dest` (an empty directory). Reads the blob to
/// its end, so the digest covers every byte even when the tar ends early.
///
/// Two threads, like `tar -xz`: one reads, hashes and decompresses, the other writes files;
/// on this kind of host writing costs as much as decompressing, and they overlap.
pub fn unpack(blob: impl Read + Send, dest: &Path, devices: bool) -> Result<Unpacked, UnpackError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    std::thread::scope(|scope| {
        let decoder = scope.spawn(move || decode(blob, tx));
        let mut out = Unpacked::default();
        let mut tar = ChannelReader { rx, chunk: Vec::new(), pos: 0 };
        let content = unpack_tar(&mut tar, dest, devices, &mut out)
            .and_then(|()| io::copy(&mut tar, &mut io::sink()).map(|_| ()).map_err(UnpackError::Read));
        // Hanging up tells the decoder to stop decompressing and only hash the rest.
        drop(tar);
        let decoded = decoder
            .join()
            .map_err(|_| UnpackError::Read(io::Error::other("the layer's decompressing thread panicked")))?;
        match (content, decoded) {
            // Refused for what it says, whatever its digest.
            (Err(e @ UnpackError::Hostile { .. }), _) => Err(e),
            // A blob that does not decode may simply not be the blob the manifest names: the
            // caller tells a wrong digest from a broken layer by the digest of all of it.
            (_, Decoded { blob_sha256, decode_error: Some(e), .. }) => {
                Err(UnpackError::Broken { blob_sha256, cause: Box::new(UnpackError::Read(e)) })
            }
            (Err(cause), Decoded { blob_sha256, .. }) => {
                Err(UnpackError::Broken { blob_sha256, cause: Box::new(cause) })
            }
            (Ok(()), Decoded { blob_sha256, blob_bytes, decode_error: None }) => {
                out.blob_sha256 = blob_sha256;
                out.blob_bytes = blob_bytes;
                Ok(out)
            }
        }
    })
}

/// What the decompressing thread saw of the blob.
struct Decoded {
    /// sha256 (hex) of the whole blob, or why it could not be read to its end (in parentheses,
    /// so it never equals a digest).
    blob_sha256: String,
    blob_bytes: u64,
    /// The blob did not decompress (or could not be read).
    decode_error: Option<io::Error>,
}

/// Reads, hashes and decompresses `blob`, sending the tar stream in chunks until the receiver
/// hangs up or the stream ends; then hashes whatever of the blob is left.
fn decode(blob: impl Read, tx: std::sync::mpsc::SyncSender<Vec<u8>>) -> Decoded {
    let mut hashing = BufReader::with_capacity(256 << 10, Hashing { inner: blob, hash: Sha256::new(), bytes: 0 });
    let mut decode_error = None;
    let compression = match hashing.fill_buf() {
        Ok([0x1f, 0x8b, ..]) => Some(Compression::Gzip),
        Ok([0x28, 0xb5, 0x2f, 0xfd, ..]) => Some(Compression::Zstd),
        Ok(_) => Some(Compression::None),
        Err(e) => {
            decode_error = Some(e);
            None
        }
    };
    if let Some(compression) = compression {
        let decoder: io::Result<Box<dyn Read + '_>> = match compression {
            Compression::Gzip => Ok(Box::new(flate2::bufread::MultiGzDecoder::new(&mut hashing))),
            Compression::Zstd => {
                zstd::stream::read::Decoder::with_buffer(&mut hashing).map(|d| Box::new(d) as Box<dyn Read>)
            }
            Compression::None => Ok(Box::new(&mut hashing)),
        };
        match decoder {
            Ok(mut decoder) => loop {
                let mut chunk = vec![0u8; 256 << 10];
                match decoder.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.send(chunk).is_err() {
                            break; // the tar side is done (or refused the layer)
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        decode_error = Some(e);
                        break;
                    }
                }
            },
            Err(e) => decode_error = Some(e),
        }
    }
    drop(tx);
    match io::copy(&mut hashing, &mut io::sink()) {
        Ok(_) => {
            let h = hashing.into_inner();
            Decoded { blob_sha256: hex::encode(h.hash.finalize()), blob_bytes: h.bytes, decode_error }
        }
        Err(e) => {
            Decoded { blob_sha256: format!("(unreadable: {e})"), blob_bytes: 0, decode_error: decode_error.or(Some(e)) }
        }
    }
}

/// The tar stream, as the decompressing thread sends it.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // the sender is done
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn unpack_tar(tar: &mut dyn Read, dest: &Path, devices: bool, out: &mut Unpacked) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(tar);
    // Directories' modes and times are set last: a read-only directory must still take its
    // entries, and writing an entry changes its directory's mtime.
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw = entry.path().map_err(UnpackError::Read)?.into_owned();
        let Some(rel) = layer_path(&raw)? else { continue };
        out.entries += 1;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            continue;
        }
        let name = rel.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = ensure_parents(dest, parent_rel, &raw)?;
        if name == ".wh..wh..opq" {
            xattr::set(&parent, "trusted.overlay.opaque", b"y").map_err(write_err("marking opaque", &parent))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(hostile(&raw, "whiteout of '.', '..' or nothing"));
            }
            let target = parent.join(hidden);
            remove_existing(&target)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| UnpackError::Write {
                op: "writing the whiteout",
                path: target.clone(),
                source: e.into(),
            })?;
            continue;
        }
        let path = dest.join(&rel);
        let header = entry.header();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let uid = header.uid().map_err(UnpackError::Read)? as u32;
        let gid = header.gid().map_err(UnpackError::Read)? as u32;
        let mtime = header.mtime().unwrap_or(0);
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&path)?;
                        fs::create_dir(&path).map_err(write_err("creating", &path))?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(write_err("creating", &path))?,
                }
                chown(&path, uid, gid)?;
                dirs.push((path.clone(), mode, mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(write_err("creating", &path))?;
                out.bytes += io::copy(&mut entry, &mut file).map_err(UnpackError::Read)?;
                chown(&path, uid, gid)?;
                // After chown, which clears set-id bits.
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(write_err("chmod", &path))?;
                set_mtime(&path, mtime);
            }
            EntryType::Symlink => {
                let target = entry.link_name().map_err(UnpackError::Read)?.unwrap_or_default().into_owned();
                remove_existing(&path)?;
                std::os::unix::fs::symlink(&target, &path).map_err(write_err("creating the symlink", &path))?;
                chown(&path, uid, gid)?;
                set_mtime(&path, mtime);
            }
            EntryType::Link => {
                let raw_target = entry.link_name().map_err(UnpackError::Read)?.unwrap_or_default().into_owned();
                let Some(target_rel) = layer_path(&raw_target)? else {
                    return Err(hostile(&raw, "hard link to the layer's root"));
                };
                let target_parent = target_rel.parent().unwrap_or(Path::new(""));
                check_no_symlinks(dest, target_parent, &raw)?;
                let target = dest.join(&target_rel);
                if fs::symlink_metadata(&target).is_err() {
                    return Err(hostile(&raw, "hard link to a file that is not in this layer"));
                }
                remove_existing(&path)?;
                fs::hard_link(&target, &path).map_err(write_err("linking", &path))?;
            }
            EntryType::Char | EntryType::Block => {
                if !devices {
                    out.skipped_devices += 1;
                    continue;
                }
                let major = u64::from(header.device_major().ok().flatten().unwrap_or(0));
                let minor = u64::from(header.device_minor().ok().flatten().unwrap_or(0));
                let kind = if kind == EntryType::Char { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                remove_existing(&path)?;
                mknod(&path, kind, Mode::from_bits_truncate(mode), nix::sys::stat::makedev(major, minor)).map_err(
                    |e| UnpackError::Write { op: "creating the device", path: path.clone(), source: e.into() },
                )?;
                chown(&path, uid, gid)?;
            }
            EntryType::Fifo => {
                remove_existing(&path)?;
                nix::unistd::mkfifo(&path, Mode::from_bits_truncate(mode)).map_err(|e| UnpackError::Write {
                    op: "creating the fifo",
                    path: path.clone(),
                    source: e.into(),
                })?;
                chown(&path, uid, gid)?;
            }
            _ => continue,
        }
        if kind != EntryType::Symlink && kind != EntryType::Link {
            set_xattrs(&mut entry, &path);
        }
    }
    for (path, mode, mtime) in dirs.into_iter().rev() {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(write_err("chmod", &path))?;
        set_mtime(&path, mtime);
    }
    Ok(())
}

fn hostile(raw: &Path, reason: &'static str) -> UnpackError {
    UnpackError::Hostile { path: raw.display().to_string(), reason }
}

/// The entry's path relative to the layer's root, or `None` for the root itself.
fn layer_path(raw: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let parts = entry_parts(raw.as_os_str().as_bytes(), Separators::Slash).map_err(|e| hostile(raw, e.reason()))?;
    Ok((!parts.is_empty()).then(|| parts.into_iter().map(OsStr::from_bytes).collect()))
}

/// Makes the directories above an entry, refusing to go through a symlink (an earlier entry
/// of the same layer could point it anywhere on the host).
fn ensure_parents(dest: &Path, parent_rel: &Path, raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut dir = dest.to_path_buf();
    for part in parent_rel.components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => return Err(hostile(raw, "path goes through a symlink")),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(hostile(raw, "path goes through a file")),
            Err(_) => fs::create_dir(&dir).map_err(write_err("creating", &dir))?,
        }
    }
    Ok(dir)
}

fn check_no_symlinks(dest: &Path, rel: &Path, raw: &Path) -> Result<(), UnpackError> {
    let mut dir = dest.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(hostile(raw, "hard link through a symlink"));
        }
    }
    Ok(())
}

/// Clears the way for an entry: writing over an existing symlink would follow it.
fn remove_existing(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(write_err("removing", path)),
        Ok(_) => fs::remove_file(path).map_err(write_err("removing", path)),
        Err(_) => Ok(()),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), UnpackError> {
    nix::unistd::fchownat(
        None,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| UnpackError::Write { op: "chown", path: path.to_path_buf(), source: e.into() })
}

fn set_mtime(path: &Path, mtime: u64) {
    let t = TimeSpec::new(mtime as i64, 0);
    // Best effort: a wrong mtime changes nothing a task relies on.
    let _ = nix::sys::stat::utimensat(None, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink);
}

/// The entry's extended attributes (file capabilities among them), where the filesystem takes
/// them. overlayfs's own attributes are not taken from a layer: only whiteouts make them.
fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) {
    let Ok(Some(exts)) = entry.pax_extensions() else { return };
    for ext in exts.flatten() {
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else { continue };
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        if let Err(e) = xattr::set(path, OsStr::new(name), ext.value_bytes()) {
            tracing::debug!(path = %path.display(), name, error = %e, "an xattr the filesystem does not take");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // Written raw: the tar crate refuses to *write* hostile names, and we must read them.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        h
    }

    fn layer(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = header(path, *kind, data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
                h.set_cksum();
            }
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn refuses_parent_dirs_and_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../../etc/x", "a/../../x", "/etc/x"] {
            let dest = dir.path().join("layer");
            fs::create_dir_all(&dest).unwrap();
            let err = unpack(&layer(&[(bad, EntryType::Regular, b"x", None)])[..], &dest, false).unwrap_err();
            assert!(matches!(err, UnpackError::Hostile { .. }), "{bad}: {err}");
            fs::remove_dir_all(&dest).unwrap();
        }
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn refuses_writing_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = dir.path().join("layer");
        fs::create_dir(&dest).unwrap();
        let tar = layer(&[
            ("evil", EntryType::Symlink, b"", Some(outside.to_str().unwrap())),
            ("evil/x", EntryType::Regular, b"x", None),
        ]);
        let err = unpack(&tar[..], &dest, false).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!outside.join("x").exists());
        // A later file over the symlink replaces the link, it does not write through it.
        let dest2 = dir.path().join("layer2");
        fs::create_dir(&dest2).unwrap();
        let tar = layer(&[
            ("f", EntryType::Symlink, b"", Some(outside.join("y").to_str().unwrap())),
            ("f", EntryType::Regular, b"data", None),
        ]);
        unpack(&tar[..], &dest2, false).unwrap();
        assert!(!outside.join("y").exists());
        assert_eq!(fs::read(dest2.join("f")).unwrap(), b"data");
    }

    #[test]
    fn whiteouts_of_dot_dot_are_refused_before_anything_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sibling = dir.path().join("sibling");
        fs::create_dir(&sibling).unwrap();
        fs::write(sibling.join("keep"), "x").unwrap();
        for name in [".wh...", ".wh..", ".wh.", "sub/.wh.."] {
            let dest = dir.path().join("layer");
            fs::create_dir_all(&dest).unwrap();
            let err = unpack(&layer(&[(name, EntryType::Regular, b"", None)])[..], &dest, false).unwrap_err();
            assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
            assert!(dest.exists() && sibling.join("keep").exists(), "{name} removed something");
            fs::remove_dir_all(&dest).unwrap();
        }
    }

    #[test]
    fn hard_links_stay_in_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        fs::create_dir(&dest).unwrap();
        let tar = layer(&[("a", EntryType::Regular, b"same", None), ("b", EntryType::Link, b"", Some("a"))]);
        unpack(&tar[..], &dest, false).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(dest.join("a")).unwrap().ino(), fs::metadata(dest.join("b")).unwrap().ino());
        let dest2 = dir.path().join("layer2");
        fs::create_dir(&dest2).unwrap();
        let err =
            unpack(&layer(&[("b", EntryType::Link, b"", Some("../../etc/passwd"))])[..], &dest2, false).unwrap_err();
        assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        if !is_root() {
            return; // mknod and trusted.* xattrs need root; the root test tier runs this.
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        fs::create_dir(&dest).unwrap();
        let tar = layer(&[
            ("d/c", EntryType::Regular, b"c", None),
            ("d/.wh..wh..opq", EntryType::Regular, b"", None),
            ("e/.wh.gone", EntryType::Regular, b"", None),
        ]);
        unpack(&tar[..], &dest, false).unwrap();
        assert_eq!(xattr::get(dest.join("d"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));
        use std::os::unix::fs::FileTypeExt;
        let m = fs::symlink_metadata(dest.join("e/gone")).unwrap();
        assert!(m.file_type().is_char_device());
        assert!(!dest.join("e/.wh.gone").exists());
    }

    #[test]
    fn devices_are_skipped_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        fs::create_dir(&dest).unwrap();
        let out = unpack(&layer(&[("dev/sda", EntryType::Block, b"", None)])[..], &dest, false).unwrap();
        assert_eq!(out.skipped_devices, 1);
        assert!(!dest.join("dev/sda").exists());
    }

    #[test]
    fn hashes_the_compressed_blob() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        fs::create_dir(&dest).unwrap();
        let tar = layer(&[("hello", EntryType::Regular, b"world", None)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let blob = gz.finish().unwrap();
        let out = unpack(&blob[..], &dest, false).unwrap();
        assert_eq!(out.blob_sha256, hex::encode(Sha256::digest(&blob)));
        assert_eq!(out.blob_bytes, blob.len() as u64);
        assert_eq!(fs::read(dest.join("hello")).unwrap(), b"world");
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        let dest2 = dir.path().join("layer2");
        fs::create_dir(&dest2).unwrap();
        let out = unpack(&zst[..], &dest2, false).unwrap();
        assert_eq!(out.blob_sha256, hex::encode(Sha256::digest(&zst)));
        assert_eq!(fs::read(dest2.join("hello")).unwrap(), b"world");
    }
}
