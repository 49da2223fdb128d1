//! A task's root filesystem: an overlay of the image's layer directories (shared, read-only)
//! with the task's own upper and work directories. Mounting is the whole cost of a second task
//! of an image: nothing is copied.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::ImageError;

/// Mounts `layers` (bottom first) at `target`, writing into `upper` through `work`.
pub fn mount(layers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<(), ImageError> {
    let err = |reason: String| ImageError::Mount { target: target.to_path_buf(), reason };
    for dir in [upper, work, target] {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    }
    let paths: Vec<&Path> = layers.iter().rev().map(PathBuf::as_path).collect();
    if paths.is_empty() {
        return Err(err("the image has no layers".into()));
    }
    // overlayfs takes no escapes for these in its options.
    for p in paths.iter().chain([&upper, &work]) {
        let s = p.to_string_lossy();
        if s.contains([':', ',', '\\']) {
            return Err(err(format!("the path {s} contains ':', ',' or '\\', which overlayfs options cannot carry")));
        }
    }
    let lower = paths.iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>().join(":");
    let options = format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display());
    // The kernel takes one page of options.
    if options.len() >= 4096 {
        return Err(err(format!(
            "{} layers make overlay options of {} bytes, more than the kernel's 4096",
            layers.len(),
            options.len()
        )));
    }
    nix::mount::mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
        .map_err(|e| err(format!("mount -t overlay: {e}")))
}

/// Unmounts `target` if something is mounted there.
pub fn unmount(target: &Path) -> Result<(), ImageError> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(ImageError::Mount { target: target.to_path_buf(), reason: format!("umount: {e}") }),
    }
}

/// Every directory some overlay mount on this host uses as a lower layer: those layers are in
/// use, whoever mounted them (this worker, a previous run of it, another worker).
pub fn lower_dirs_in_use() -> HashSet<PathBuf> {
    let mut used = HashSet::new();
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return used };
    for line in info.lines() {
        let Some((_, after)) = line.split_once(" - ") else { continue };
        let mut fields = after.split(' ');
        if fields.next() != Some("overlay") {
            continue;
        }
        let options = fields.nth(1).unwrap_or_default();
        for opt in options.split(',') {
            if let Some(lower) = opt.strip_prefix("lowerdir=") {
                used.extend(lower.split(':').map(|p| PathBuf::from(unescape(p))));
            }
        }
    }
    used
}

/// mountinfo writes space, tab, newline and backslash as octal escapes; the rest are the
/// path's own bytes (not necessarily UTF-8).
fn unescape(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    std::ffi::OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/caf\u{e9}"), "/caf\u{e9}", "UTF-8 paths stay UTF-8");
    }
}
