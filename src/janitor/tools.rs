//! The operator's tools: `iris-worker cache ls` (every entry with its size, last use and who
//! holds it) and `iris-worker cache prune` (removes what nobody uses, says what it freed). Both
//! work on the directories directly, beside running workers: a prune takes each entry's
//! exclusive lock with `try_exclusive`, so what any task uses stays.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use super::{InUse, after_evictions, evict, scan};
use crate::cache::{CacheDirs, Entry, Kind};

/// An entry and who uses it now.
#[derive(Debug, Clone)]
pub struct Listed {
    pub entry: Entry,
    /// Who holds it: `task j/task-0`, `worker pid N`, `an overlay mount`.
    pub holders: Vec<String>,
    /// For image layers: the images that name them.
    pub images: Vec<String>,
}

/// Every entry of `kinds` (all when empty), least recently used first, each holder named by
/// `describe` (a pid → `task j/task-0`: who a supervisor works for is the task layer's to say).
pub fn list(dirs: &CacheDirs, kinds: &[Kind], describe: &dyn Fn(i32) -> String) -> Vec<Listed> {
    let in_use = InUse::now(dirs);
    let mut entries: Vec<Entry> =
        scan(dirs, false).into_iter().filter(|e| kinds.is_empty() || kinds.contains(&e.kind)).collect();
    entries.sort_by_key(|e| e.last_use);
    let references = crate::env::image::layer_references(&dirs.images);
    entries
        .into_iter()
        .map(|entry| {
            let holders = holders_of(dirs, &in_use, &entry, describe);
            let images = references.get(&entry.key).cloned().unwrap_or_default();
            Listed { entry, holders, images }
        })
        .collect()
}

fn holders_of(dirs: &CacheDirs, in_use: &InUse, e: &Entry, describe: &dyn Fn(i32) -> String) -> Vec<String> {
    let mut who: Vec<String> = in_use.pids(e).into_iter().map(describe).collect();
    who.sort();
    who.dedup();
    if in_use.mounted_layer(dirs, e) && !who.iter().any(|w| w.starts_with("task ")) {
        who.push("an overlay mount".into());
    }
    who
}

/// What to prune.
#[derive(Debug, Clone, Default)]
pub struct PruneRequest {
    /// Only these kinds (all when empty).
    pub kinds: Vec<Kind>,
    /// Only entries not used for this long.
    pub older_than: Option<Duration>,
}

/// What a prune did.
#[derive(Debug, Default)]
pub struct Pruned {
    pub removed: Vec<Entry>,
    /// Chosen but in use (by whom): never removed.
    pub in_use: Vec<Listed>,
}

impl Pruned {
    /// Freed bytes by kind.
    pub fn by_kind(&self) -> BTreeMap<Kind, (u64, u64)> {
        let mut out: BTreeMap<Kind, (u64, u64)> = BTreeMap::new();
        for e in &self.removed {
            let k = out.entry(e.kind).or_default();
            k.0 += 1;
            k.1 += e.bytes;
        }
        out
    }
}

/// Removes every entry `req` chooses that no process uses, least recently used first.
pub fn prune(dirs: &CacheDirs, req: &PruneRequest, describe: &dyn Fn(i32) -> String) -> Pruned {
    let now = SystemTime::now();
    let mut chosen: Vec<Entry> = scan(dirs, true)
        .into_iter()
        .filter(|e| req.kinds.is_empty() || req.kinds.contains(&e.kind))
        .filter(|e| req.older_than.is_none_or(|age| now.duration_since(e.last_use).is_ok_and(|d| d >= age)))
        .collect();
    chosen.sort_by_key(|e| e.last_use);
    let in_use = InUse::now(dirs);
    let mut out = Pruned::default();
    let mut kinds = HashSet::new();
    for e in chosen {
        let busy = in_use.contains(dirs, &e);
        let gone = !busy
            && match evict(dirs, &e, in_use.mounts()) {
                Ok(Some(_)) => true,
                Ok(None) => false,
                Err(err) => {
                    tracing::warn!(kind = e.kind.name(), entry = %e.name, error = %err, "pruning");
                    false
                }
            };
        if gone {
            kinds.insert(e.kind);
            out.removed.push(e);
        } else {
            let mut holders = holders_of(dirs, &InUse::now(dirs), &e, describe);
            if holders.is_empty() {
                holders.push("another process".into());
            }
            out.in_use.push(Listed { entry: e, holders, images: Vec::new() });
        }
    }
    after_evictions(dirs, &kinds);
    out
}

/// Everything of the caches no process uses (`cleanup --all`): every entry nobody holds (as
/// [`prune`] does: what a task of any worker uses stays), then the lock files nobody holds, then
/// the caches' directories that are left empty. What is not a cache's (a rootfs tree an
/// operator keeps under the cache directory) stays.
pub fn clear(dirs: &CacheDirs, describe: &dyn Fn(i32) -> String) -> Pruned {
    let pruned = prune(dirs, &PruneRequest::default(), describe);
    for kind in [Kind::Bundles, Kind::Venvs, Kind::Images] {
        let root = dirs.locks_root(kind);
        if let Err(e) = crate::cachelock::EntryLocks::new(&root).remove_unheld() {
            tracing::warn!(kind = kind.name(), error = %e, "removing unused lock files");
        }
    }
    let (bundles, venvs, images) = (dirs.bundles(), dirs.venvs(), dirs.images.clone());
    let emptied = [
        bundles.join(".tmp"),
        bundles.join(".locks"),
        bundles,
        venvs.join(".locks"),
        venvs,
        dirs.cache.join("uv"),
        images.join("tmp"),
        images.join("layers"),
        images.join("images"),
        images.join(".locks"),
        images,
        dirs.cache.clone(),
    ];
    for dir in emptied {
        // Only an empty one goes: what is still in it is someone's.
        let _ = std::fs::remove_dir(dir);
    }
    pruned
}
