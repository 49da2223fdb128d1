//! The sender side of fsutil's file transfer protocol (github.com/tonistiigi/fsutil,
//! `send.go`), which BuildKit uses to pull a local source (the build context, the Dockerfile's
//! directory) over `moby.filesync.v1.FileSync/DiffCopy`:
//!
//! 1. The sender sends one `STAT` packet per entry, depth first, a directory before its
//!    entries and the entries of each directory sorted by name (bytewise): BuildKit's receiver
//!    rejects anything out of that order. Paths are relative to the root, `/`-separated — the
//!    whole path, so nested directories' files land inside them. An empty `STAT` ends the list.
//! 2. The receiver asks for a regular file's contents with `REQ` and the file's index in that
//!    list (every entry counts, directories too); the sender answers with `DATA` packets of
//!    that id and an empty `DATA` to end the file.
//! 3. The receiver sends `FIN`; the sender answers `FIN` and the stream ends.
//!
//! Modes are Go's `os.FileMode` bits, not `st_mode`; hard links after the first carry the first
//! path in `linkname` and no data.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tonic::Status;

use super::proto::fsutil::types::{Packet, Stat, packet::PacketType};

/// The size of a DATA packet's payload (fsutil's own buffer size).
const CHUNK: usize = 32 << 10;

// Go's os.FileMode type bits.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;
const GO_MODE_DEVICE: u32 = 1 << 26;
const GO_MODE_NAMED_PIPE: u32 = 1 << 25;
const GO_MODE_SETUID: u32 = 1 << 23;
const GO_MODE_SETGID: u32 = 1 << 22;
const GO_MODE_CHAR_DEVICE: u32 = 1 << 21;
const GO_MODE_STICKY: u32 = 1 << 20;
/// The bits that make an entry not a regular file (Go's os.ModeType).
const GO_MODE_TYPE: u32 =
    GO_MODE_DIR | GO_MODE_SYMLINK | (1 << 24) | GO_MODE_NAMED_PIPE | GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE | (1 << 19);

/// `st_mode` → Go's `os.FileMode` (sockets become plain entries without data, as fsutil does).
pub fn go_mode(st_mode: u32) -> u32 {
    let mut m = st_mode & 0o777;
    if st_mode & libc::S_ISUID != 0 {
        m |= GO_MODE_SETUID;
    }
    if st_mode & libc::S_ISGID != 0 {
        m |= GO_MODE_SETGID;
    }
    if st_mode & libc::S_ISVTX != 0 {
        m |= GO_MODE_STICKY;
    }
    m | match st_mode & libc::S_IFMT {
        libc::S_IFDIR => GO_MODE_DIR,
        libc::S_IFLNK => GO_MODE_SYMLINK,
        libc::S_IFBLK => GO_MODE_DEVICE,
        libc::S_IFCHR => GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE,
        libc::S_IFIFO => GO_MODE_NAMED_PIPE,
        _ => 0,
    }
}

/// Whether the receiver may ask for the entry's data (fsutil: a regular file).
pub fn has_data(go_mode: u32) -> bool {
    go_mode & GO_MODE_TYPE == 0
}

/// Which entries of a directory are sent: BuildKit's `include-patterns`, `exclude-patterns`
/// (`.dockerignore`, with `!` re-including) as globs (`*`, `?`, `**`) on `/`-separated paths;
/// a pattern matching a directory covers everything below it.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl Filter {
    fn included(&self, path: &str) -> bool {
        if self.include.is_empty() {
            return true;
        }
        self.include.iter().any(|p| covers(p, path))
    }

    fn excluded(&self, path: &str) -> bool {
        let mut out = false;
        for p in &self.exclude {
            match p.strip_prefix('!') {
                Some(neg) if covers(neg, path) => out = false,
                None if covers(p, path) => out = true,
                _ => {}
            }
        }
        out
    }

    fn has_negations(&self) -> bool {
        self.exclude.iter().any(|p| p.starts_with('!'))
    }
}

/// Whether `pattern` matches `path` or one of its parent directories.
fn covers(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
    if pattern.is_empty() || pattern == "." {
        return true;
    }
    let pat: Vec<&str> = pattern.split('/').collect();
    let parts: Vec<&str> = path.split('/').collect();
    (1..=parts.len()).any(|n| match_parts(&pat, &parts[..n]))
}

fn match_parts(pat: &[&str], parts: &[&str]) -> bool {
    // `**` is to components what `*` is to bytes: the same linear matcher as `glob`.
    wildcard(pat.len(), parts.len(), |i| pat[i] == "**", |i, j| glob(pat[i].as_bytes(), parts[j].as_bytes()))
}

/// `*` and `?` within one path component.
fn glob(p: &[u8], s: &[u8]) -> bool {
    wildcard(p.len(), s.len(), |i| p[i] == b'*', |i, j| p[i] == b'?' || p[i] == s[j])
}

/// Whether a pattern of `np` elements matches `ns` items, where a star element matches any run
/// of items and any other element one item it `matches`. Backtracks only to the last star,
/// which is enough and keeps it O(np·ns): the bundle's own .dockerignore chooses the pattern.
fn wildcard(np: usize, ns: usize, is_star: impl Fn(usize) -> bool, matches: impl Fn(usize, usize) -> bool) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut resume: Option<(usize, usize)> = None;
    while si < ns {
        if pi < np && is_star(pi) {
            resume = Some((pi + 1, si));
            pi += 1;
        } else if pi < np && matches(pi, si) {
            pi += 1;
            si += 1;
        } else if let Some((after_star, from)) = resume {
            // Let the last star take one more item and try again from there.
            pi = after_star;
            si = from + 1;
            resume = Some((after_star, from + 1));
        } else {
            return false;
        }
    }
    while pi < np && is_star(pi) {
        pi += 1;
    }
    pi == np
}

/// One entry to send: its stat and, for a regular file, where its data is.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stat: Stat,
    pub data: Option<PathBuf>,
}

/// Lists `root` in the order the protocol needs (blocking: run it off the async threads).
pub fn walk(root: &Path, filter: &Filter) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut inodes = HashMap::new();
    walk_dir(root, "", filter, &mut inodes, &mut out)?;
    Ok(out)
}

fn walk_dir(
    dir: &Path,
    rel: &str,
    filter: &Filter,
    inodes: &mut HashMap<(u64, u64), String>,
    out: &mut Vec<Entry>,
) -> std::io::Result<()> {
    let mut names: Vec<std::ffi::OsString> =
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let host = dir.join(&name);
        let path = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        let excluded = filter.excluded(&path);
        let md = std::fs::symlink_metadata(&host)?;
        if md.is_dir() {
            if excluded && !filter.has_negations() {
                continue;
            }
            // A directory goes out when it is wanted itself or holds something wanted (its
            // children need their parent before them).
            let at = out.len();
            out.push(Entry { stat: stat_of(&host, &path, &md, inodes)?, data: None });
            walk_dir(&host, &path, filter, inodes, out)?;
            let wanted = !excluded && filter.included(&path);
            if !wanted && out.len() == at + 1 {
                out.truncate(at);
            }
            continue;
        }
        if excluded || !filter.included(&path) {
            continue;
        }
        let stat = stat_of(&host, &path, &md, inodes)?;
        let data = (has_data(stat.mode) && stat.linkname.is_empty()).then(|| host.clone());
        out.push(Entry { stat, data });
    }
    Ok(())
}

fn stat_of(
    host: &Path,
    path: &str,
    md: &std::fs::Metadata,
    inodes: &mut HashMap<(u64, u64), String>,
) -> std::io::Result<Stat> {
    let mode = go_mode(md.mode()) & !(1 << 24);
    let mut stat = Stat {
        path: path.to_string(),
        mode,
        uid: md.uid(),
        gid: md.gid(),
        size: if md.is_dir() { 0 } else { md.size() as i64 },
        mod_time: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ..Default::default()
    };
    let ft = md.mode() & libc::S_IFMT;
    if ft == libc::S_IFLNK {
        stat.linkname = std::fs::read_link(host)?.to_string_lossy().into_owned();
    } else if ft == libc::S_IFBLK || ft == libc::S_IFCHR {
        let rdev = md.rdev();
        stat.devmajor = ((rdev >> 8) & 0xfff) as i64;
        stat.devminor = ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as i64;
    }
    if !md.is_dir() && md.nlink() > 1 {
        match inodes.get(&(md.dev(), md.ino())) {
            Some(first) => {
                stat.linkname = first.clone();
                stat.size = 0;
            }
            None => {
                inodes.insert((md.dev(), md.ino()), path.to_string());
            }
        }
    }
    Ok(stat)
}

/// Serves one DiffCopy of `root`: stats, then the files the receiver asks for, until `FIN`.
/// Packets go out through `tx`; `incoming` is the receiver's side of the stream.
pub async fn send<S>(
    root: PathBuf,
    filter: Filter,
    mut incoming: S,
    tx: mpsc::Sender<Result<Packet, Status>>,
) -> Result<(), String>
where
    S: futures::Stream<Item = Result<Packet, Status>> + Unpin,
{
    let walk_root = root.clone();
    let entries = tokio::task::spawn_blocking(move || walk(&walk_root, &filter))
        .await
        .map_err(|e| format!("listing {}: {e}", root.display()))?
        .map_err(|e| format!("listing {}: {e}", root.display()))?;
    let files: HashMap<u32, PathBuf> =
        entries.iter().enumerate().filter_map(|(i, e)| e.data.clone().map(|p| (i as u32, p))).collect();

    // The stats go out from their own task: the receiver starts asking for files before the
    // list ends, and its requests must be read meanwhile.
    let stats_tx = tx.clone();
    let stats = tokio::spawn(async move {
        for e in entries {
            let p = Packet { r#type: PacketType::PacketStat as i32, stat: Some(e.stat), ..Default::default() };
            if stats_tx.send(Ok(p)).await.is_err() {
                return;
            }
        }
        let _ = stats_tx.send(Ok(Packet { r#type: PacketType::PacketStat as i32, ..Default::default() })).await;
    });
    let result = async {
        while let Some(p) = incoming.next().await {
            let p = p.map_err(|s| format!("the receiver's stream: {}", s.message()))?;
            match PacketType::try_from(p.r#type) {
                Ok(PacketType::PacketReq) => {
                    let path =
                        files.get(&p.id).ok_or_else(|| format!("the receiver asked for unknown file id {}", p.id))?;
                    send_file(path, p.id, &tx).await?;
                }
                Ok(PacketType::PacketFin) => {
                    let _ = tx.send(Ok(Packet { r#type: PacketType::PacketFin as i32, ..Default::default() })).await;
                    return Ok(());
                }
                Ok(PacketType::PacketErr) => {
                    return Err(format!("the receiver failed: {}", String::from_utf8_lossy(&p.data)));
                }
                _ => {}
            }
        }
        Err("the receiver closed the stream before FIN".to_string())
    }
    .await;
    stats.abort();
    result
}

async fn send_file(path: &Path, id: u32, tx: &mpsc::Sender<Result<Packet, Status>>) -> Result<(), String> {
    let closed = || "the receiver went away".to_string();
    let mut f = tokio::fs::File::open(path).await.map_err(|e| format!("opening {}: {e}", path.display()))?;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = f.read(&mut buf).await.map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        tx.send(Ok(Packet { r#type: PacketType::PacketData as i32, id, data: buf, ..Default::default() }))
            .await
            .map_err(|_| closed())?;
    }
    tx.send(Ok(Packet { r#type: PacketType::PacketData as i32, id, ..Default::default() })).await.map_err(|_| closed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn modes_are_go_file_modes() {
        assert_eq!(go_mode(libc::S_IFREG | 0o644), 0o644);
        assert_eq!(go_mode(libc::S_IFDIR | 0o755), GO_MODE_DIR | 0o755);
        assert_eq!(go_mode(libc::S_IFLNK | 0o777), GO_MODE_SYMLINK | 0o777);
        assert_eq!(go_mode(libc::S_IFCHR | 0o666), GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE | 0o666);
        assert_eq!(go_mode(libc::S_IFREG | libc::S_ISUID | 0o755), GO_MODE_SETUID | 0o755);
        assert_eq!(go_mode(libc::S_IFDIR | libc::S_ISVTX | 0o777), GO_MODE_DIR | GO_MODE_STICKY | 0o777);
        assert!(has_data(go_mode(libc::S_IFREG | 0o600)));
        assert!(!has_data(go_mode(libc::S_IFDIR | 0o755)));
        assert!(!has_data(go_mode(libc::S_IFLNK | 0o777)));
    }

    #[test]
    fn packets_encode_with_fsutils_field_numbers() {
        // A STAT of directory "a" (mode 0o755|ModeDir, uid 1): type 0 is the default and is
        // not written; stat is field 2 (length-delimited), inside it path=1, mode=2, uid=3.
        let p = Packet {
            r#type: PacketType::PacketStat as i32,
            stat: Some(Stat { path: "a".into(), mode: GO_MODE_DIR | 0o755, uid: 1, ..Default::default() }),
            ..Default::default()
        };
        let mode = GO_MODE_DIR | 0o755; // 0x800001ed: varint ed 83 80 80 08
        assert_eq!(mode, 0x8000_01ed);
        let stat = [0x0a, 0x01, b'a', 0x10, 0xed, 0x83, 0x80, 0x80, 0x08, 0x18, 0x01];
        let mut want = vec![0x12, stat.len() as u8];
        want.extend_from_slice(&stat);
        assert_eq!(p.encode_to_vec(), want);
        // REQ of file 7: type=1 (field 1 varint), ID=7 (field 3 varint).
        let req = Packet { r#type: PacketType::PacketReq as i32, id: 7, ..Default::default() };
        assert_eq!(req.encode_to_vec(), vec![0x08, 0x01, 0x18, 0x07]);
        // DATA of file 7 with "hi": type=2, ID=7, data=4.
        let data = Packet { r#type: PacketType::PacketData as i32, id: 7, data: b"hi".to_vec(), ..Default::default() };
        assert_eq!(data.encode_to_vec(), vec![0x08, 0x02, 0x18, 0x07, 0x22, 0x02, b'h', b'i']);
        assert_eq!(Packet::decode(&data.encode_to_vec()[..]).unwrap(), data);
    }

    #[test]
    fn the_walk_lists_nested_directories_parents_first_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("b/c/d")).unwrap();
        std::fs::write(r.join("b/c/d/deep.txt"), "deep").unwrap();
        std::fs::write(r.join("b/c/x"), "x").unwrap();
        std::fs::write(r.join("b-file"), "bf").unwrap();
        std::fs::write(r.join("a"), "a").unwrap();
        std::fs::write(r.join("B"), "B").unwrap();
        std::os::unix::fs::symlink("c/x", r.join("b/link")).unwrap();
        std::fs::hard_link(r.join("a"), r.join("z-hard")).unwrap();
        let entries = walk(r, &Filter::default()).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.stat.path.as_str()).collect();
        assert_eq!(paths, ["B", "a", "b", "b/c", "b/c/d", "b/c/d/deep.txt", "b/c/x", "b/link", "b-file", "z-hard"]);
        let by = |p: &str| entries.iter().find(|e| e.stat.path == p).unwrap();
        assert_eq!(by("b/link").stat.linkname, "c/x");
        assert!(by("b/link").data.is_none());
        assert_eq!(by("z-hard").stat.linkname, "a");
        assert!(by("z-hard").data.is_none());
        assert_eq!(by("b/c/d/deep.txt").data.as_deref(), Some(r.join("b/c/d/deep.txt").as_path()));
        assert_eq!(by("b/c/d/deep.txt").stat.size, 4);
    }

    #[test]
    fn filters_follow_include_and_dockerignore_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("src/sub")).unwrap();
        std::fs::create_dir_all(r.join("target")).unwrap();
        for f in [
            "Dockerfile",
            "Dockerfile.dockerignore",
            "src/a.rs",
            "src/sub/b.rs",
            "src/sub/b.tmp",
            "target/x",
            "keep.tmp",
        ] {
            std::fs::write(r.join(f), f).unwrap();
        }
        let paths =
            |filter: Filter| -> Vec<String> { walk(r, &filter).unwrap().into_iter().map(|e| e.stat.path).collect() };
        assert_eq!(
            paths(Filter { include: vec!["Dockerfile".into(), "Dockerfile.dockerignore".into()], exclude: vec![] }),
            ["Dockerfile", "Dockerfile.dockerignore"]
        );
        assert_eq!(
            paths(Filter { include: vec!["src/sub".into()], exclude: vec![] }),
            ["src", "src/sub", "src/sub/b.rs", "src/sub/b.tmp"]
        );
        assert_eq!(
            paths(Filter { include: vec![], exclude: vec!["target".into(), "**/*.tmp".into(), "!keep.tmp".into()] }),
            ["Dockerfile", "Dockerfile.dockerignore", "keep.tmp", "src", "src/a.rs", "src/sub", "src/sub/b.rs"]
        );
    }

    #[test]
    fn patterns_match_in_linear_time() {
        // Exponential for a naive backtracking matcher.
        let name = "a".repeat(200);
        assert!(!glob(b"*a*a*a*a*a*a*a*a*a*a*a*a*b", name.as_bytes()));
        assert!(glob(b"*a*a*a*a*a*a*a*a*a*a*a*a*", name.as_bytes()));
        let deep: Vec<&str> = std::iter::repeat_n("a", 60).collect();
        assert!(!match_parts(&["**", "a", "**", "a", "**", "a", "**", "a", "**", "b"], &deep));
        assert!(match_parts(&["**", "a", "**", "a"], &deep));
        assert!(glob(b"f?o*.txt", b"foo-bar.txt") && !glob(b"f?o*.txt", b"fo.txt"));
    }
}
