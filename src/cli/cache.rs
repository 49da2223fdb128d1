//! `iris-worker cache ls|prune`: the operator's view of the caches (see [`crate::cache`]),
//! working on the directories directly, beside running workers.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::cache::size::{human_age, human_bytes, parse_age};
use crate::cache::{CacheDirs, Kind};
use crate::janitor::tools::{self, PruneRequest};

#[derive(Subcommand, Debug)]
pub enum CacheVerb {
    /// Every cache entry, least recently used first: its kind, last use, size, what it is and
    /// who uses it now (a task, by its supervisor; a worker), after a summary per kind.
    Ls {
        #[command(flatten)]
        dirs: DirArgs,
        /// Only this kind (bundles, venvs, images, built, uv); repeatable.
        #[arg(long = "kind")]
        kinds: Vec<String>,
    },
    /// Removes cache entries no process uses (a running task's are never removed), least
    /// recently used first, and says what it freed. Needs --all or --older-than.
    Prune {
        #[command(flatten)]
        dirs: DirArgs,
        /// Only this kind (bundles, venvs, images, built, uv); repeatable.
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Only entries not used for this long, e.g. 7d, 12h, 30m.
        #[arg(long)]
        older_than: Option<String>,
        /// Every entry (of --kind, when given).
        #[arg(long)]
        all: bool,
    },
}

/// Where the caches are: the same flags and variables as `serve`.
#[derive(clap::Args, Debug)]
pub struct DirArgs {
    /// The worker's cache root [default: /var/cache/iris-worker].
    #[arg(long, env = "IRIS_WORKER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The image store [default: <cache-dir>/images].
    #[arg(long, env = "IRIS_WORKER_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
}

impl DirArgs {
    fn dirs(&self) -> CacheDirs {
        let cache = self.cache_dir.clone().unwrap_or_else(|| super::config::DEFAULT_CACHE_DIR.into());
        let images = self.image_dir.clone().unwrap_or_else(|| cache.join("images"));
        CacheDirs::new(cache, images)
    }
}

fn kinds(names: &[String]) -> anyhow::Result<Vec<Kind>> {
    names.iter().map(|k| Kind::parse(k).map_err(anyhow::Error::msg).context("--kind")).collect()
}

pub fn run(verb: CacheVerb) -> anyhow::Result<()> {
    match verb {
        CacheVerb::Ls { dirs, kinds: names } => {
            let listed = tools::list(&dirs.dirs(), &kinds(&names)?, &describe_holder);
            print!("{}", ls_text(&listed, SystemTime::now()));
            Ok(())
        }
        CacheVerb::Prune { dirs, kinds: names, older_than, all } => {
            let older_than = older_than.as_deref().map(parse_age).transpose().context("--older-than")?;
            if older_than.is_none() && !all {
                bail!("say what to prune: --older-than AGE or --all (--kind narrows either)");
            }
            let pruned =
                tools::prune(&dirs.dirs(), &PruneRequest { kinds: kinds(&names)?, older_than }, &describe_holder);
            print!("{}", prune_text(&pruned));
            Ok(())
        }
    }
}

/// `cache ls`'s text: a summary per kind, then one line per entry.
fn ls_text(listed: &[tools::Listed], now: SystemTime) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:<8} {:>7} {:>9} {:>6}\n", "KIND", "ENTRIES", "BYTES", "IN USE"));
    for kind in Kind::ALL {
        let of: Vec<&tools::Listed> = listed.iter().filter(|l| l.entry.kind == kind).collect();
        let bytes: u64 = of.iter().map(|l| l.entry.bytes).sum();
        let busy = of.iter().filter(|l| !l.holders.is_empty()).count();
        out.push_str(&format!("{:<8} {:>7} {:>9} {:>6}\n", kind.name(), of.len(), human_bytes(bytes), busy));
    }
    if listed.is_empty() {
        return out;
    }
    out.push('\n');
    out.push_str(&format!("{:<8} {:>8} {:>9}  {:<40} {}\n", "KIND", "LAST USE", "BYTES", "NAME", "USED BY"));
    for l in listed {
        let e = &l.entry;
        let age = now.duration_since(e.last_use).map(human_age).unwrap_or_else(|_| "now".into());
        // A layer's digest is long and says little: its images say more.
        let mut name = match e.name.strip_prefix("sha256:") {
            Some(hex) if hex.len() > 12 => format!("sha256:{}…", &hex[..12]),
            _ => e.name.clone(),
        };
        if !l.images.is_empty() {
            name = format!("{name} ({})", l.images.join(", "));
        }
        let used_by = if l.holders.is_empty() { "-".to_string() } else { l.holders.join(", ") };
        out.push_str(&format!(
            "{:<8} {:>8} {:>9}  {:<40} {}\n",
            e.kind.name(),
            age,
            human_bytes(e.bytes),
            name,
            used_by
        ));
    }
    out
}

/// `cache prune`'s text: what went, by kind, and what stayed because it is in use.
fn prune_text(p: &tools::Pruned) -> String {
    let mut out = String::new();
    if p.removed.is_empty() {
        out.push_str("removed nothing\n");
    } else {
        let total: u64 = p.removed.iter().map(|e| e.bytes).sum();
        let parts: Vec<String> = p
            .by_kind()
            .into_iter()
            .map(|(k, (n, bytes))| format!("{} {n} ({})", k.name(), human_bytes(bytes)))
            .collect();
        out.push_str(&format!("removed {} entries, {}: {}\n", p.removed.len(), human_bytes(total), parts.join(", ")));
    }
    for l in &p.in_use {
        out.push_str(&format!("kept {} {}: in use by {}\n", l.entry.kind.name(), l.entry.name, l.holders.join(", ")));
    }
    out
}

/// Who process `pid` is, for an operator: `task j/task-0` for a task's supervisor (or its
/// environment build's), `worker pid N` for a worker, `pid N` otherwise.
pub(crate) fn describe_holder(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    if let Some(i) = args.iter().position(|a| a == "supervise")
        && let Some(dir) = args.get(i + 1)
    {
        let dir = std::path::Path::new(dir);
        // A venv build runs in `<task dir>/build`.
        for d in [Some(dir), dir.parent()].into_iter().flatten() {
            if let Ok(Some(meta)) =
                crate::taskdir::read_json::<crate::task::store::TaskMeta>(d, crate::task::store::TASK)
            {
                return format!("task {}", meta.task_id);
            }
        }
        return format!("a supervisor (pid {pid})");
    }
    if args.iter().any(|a| a == "serve") {
        return format!("worker pid {pid}");
    }
    format!("pid {pid}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Entry;
    use std::time::Duration;

    #[test]
    fn a_holder_that_is_no_supervisor_is_named_by_its_pid() {
        let me = std::process::id() as i32;
        let d = describe_holder(me);
        assert!(d.starts_with("pid ") || d.starts_with("worker"), "{d}");
    }

    fn entry(kind: Kind, name: &str, bytes: u64, age_s: u64, now: SystemTime) -> Entry {
        Entry {
            kind,
            key: name.into(),
            name: name.into(),
            bytes,
            files: 1,
            last_use: now - Duration::from_secs(age_s),
            dev: 1,
            lock: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn ls_and_prune_say_what_there_is_and_what_went() {
        let now = SystemTime::now();
        let listed = vec![
            tools::Listed {
                entry: entry(Kind::Venvs, "venv:0123456789abcdef", 120 << 20, 3 * 86_400, now),
                holders: vec!["task j/task-0".into()],
                images: vec![],
            },
            tools::Listed {
                entry: entry(Kind::Images, &format!("sha256:{}", "ab".repeat(32)), 5 << 20, 60, now),
                holders: vec![],
                images: vec!["reg/busybox:1".into()],
            },
        ];
        let text = ls_text(&listed, now);
        assert!(text.contains("venvs          1   120 MiB      1\n"), "{text}");
        assert!(text.contains("venvs          3d   120 MiB  venv:0123456789abcdef"), "{text}");
        assert!(text.contains("task j/task-0\n"), "{text}");
        assert!(text.contains("sha256:abababababab… (reg/busybox:1)"), "{text}");
        let pruned = tools::Pruned {
            removed: vec![
                entry(Kind::Bundles, "file:///a.zip", 2 << 20, 9, now),
                entry(Kind::Bundles, "file:///b.zip", 1 << 20, 9, now),
            ],
            in_use: vec![listed[0].clone()],
        };
        assert_eq!(
            prune_text(&pruned),
            "removed 2 entries, 3 MiB: bundles 2 (3 MiB)\nkept venvs venv:0123456789abcdef: in use by task j/task-0\n"
        );
        assert_eq!(prune_text(&tools::Pruned::default()), "removed nothing\n");
    }
}
