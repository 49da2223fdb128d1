//! An image's `User` (`uid`, `uid:gid`, `name`, `name:group`) as numbers, names looked up in
//! the image's own /etc/passwd and /etc/group.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::runtime::TaskUser;

/// Resolves `user` against the image mounted at `rootfs`.
pub fn resolve(user: &str, rootfs: &Path) -> Result<TaskUser, String> {
    let (name, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_etc(rootfs, "passwd");
    let (uid, primary_gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, lookup(&passwd, |f| f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(uid), 3)),
        Err(_) => {
            let uid = lookup(&passwd, |f| f.first() == Some(&name), 2)
                .ok_or_else(|| format!("the image's user {name:?} is not in its /etc/passwd"))?;
            (uid, lookup(&passwd, |f| f.first() == Some(&name), 3))
        }
    };
    let groups = read_etc(rootfs, "group");
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&groups, |f| f.first() == Some(&g), 2)
                .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?,
        },
        None => primary_gid.unwrap_or(0),
    };
    // Supplementary groups: those listing the user by name.
    let additional_gids = if group.is_none() && name.parse::<u32>().is_err() {
        groups
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|f| f.get(3).is_some_and(|m| m.split(',').any(|m| m == name)))
            .filter_map(|f| f.get(2).and_then(|s| s.parse::<u32>().ok()))
            .filter(|g| *g != gid)
            .collect()
    } else {
        Vec::new()
    };
    Ok(TaskUser { uid, gid, additional_gids })
}

/// The number in `field` of the first line of `table` that `pred` picks.
fn lookup(table: &str, pred: impl Fn(&[&str]) -> bool, field: usize) -> Option<u32> {
    table
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| pred(f))
        .and_then(|f| f.get(field).and_then(|s| s.parse().ok()))
}

/// `/etc/<name>` of the image; never through a symlink, which could point into the host.
fn read_etc(rootfs: &Path, name: &str) -> String {
    let etc = rootfs.join("etc");
    if std::fs::symlink_metadata(&etc).map(|m| !m.is_dir()).unwrap_or(true) {
        return String::new();
    }
    let mut out = String::new();
    if let Ok(mut f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(etc.join(name)) {
        let _ = f.by_ref().take(1 << 20).read_to_string(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n")
            .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\napp:x:1001:\nextra:x:1002:app\n").unwrap();
        let u = resolve("app", dir.path()).unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 1001, vec![1002]));
        let u = resolve("1000:extra", dir.path()).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1002));
        let u = resolve("4242", dir.path()).unwrap();
        assert_eq!((u.uid, u.gid), (4242, 0));
        assert!(resolve("nobody-here", dir.path()).unwrap_err().contains("/etc/passwd"));
    }
}
