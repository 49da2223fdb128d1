//! Choosing what to evict: least recently used first, among entries nobody uses, until every
//! limit holds. A limit counts the bytes (and files) of some kinds of entries, optionally only
//! on one filesystem: the total budget counts every kind; a per-kind override one kind; a
//! filesystem under pressure the entries on it, bounded by what it must give back.

use super::{Entry, Kind};

/// One bound the caches must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// What it is, for logs: `total`, `images`, `free space on cache`.
    pub name: String,
    /// The kinds it counts.
    pub kinds: Vec<Kind>,
    /// Only entries on this filesystem (`st_dev`), when set.
    pub dev: Option<u64>,
    pub max_bytes: u64,
    pub max_files: u64,
}

impl Limit {
    /// A bound on the bytes of `kinds`.
    pub fn bytes(name: impl Into<String>, kinds: &[Kind], max_bytes: u64) -> Limit {
        Limit { name: name.into(), kinds: kinds.to_vec(), dev: None, max_bytes, max_files: u64::MAX }
    }

    fn covers(&self, e: &Entry) -> bool {
        self.kinds.contains(&e.kind) && self.dev.is_none_or(|d| d == e.dev)
    }
}

/// What [`enforce`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Indices (into the entries given) of what was evicted, in eviction order.
    pub evicted: Vec<usize>,
    /// Bytes and files freed.
    pub bytes: u64,
    pub files: u64,
    /// Limits still over after every idle entry was considered (in-use entries keep them over).
    pub still_over: Vec<String>,
}

/// Evicts least recently used entries that are not `busy` until every limit holds: an entry
/// goes only when a limit that counts it is over. `evict` does the eviction and says whether it
/// happened (a process may have taken the entry since `busy` was read: then it stays).
pub fn enforce(
    entries: &[Entry],
    limits: &[Limit],
    busy: impl Fn(&Entry) -> bool,
    mut evict: impl FnMut(&Entry) -> bool,
) -> Outcome {
    let mut used: Vec<(u64, u64)> = limits
        .iter()
        .map(|l| entries.iter().filter(|e| l.covers(e)).fold((0u64, 0u64), |(b, f), e| (b + e.bytes, f + e.files)))
        .collect();
    let over = |used: &[(u64, u64)], i: usize| used[i].0 > limits[i].max_bytes || used[i].1 > limits[i].max_files;
    let mut out = Outcome::default();
    if !(0..limits.len()).any(|i| over(&used, i)) {
        return out;
    }
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i].last_use);
    for i in order {
        if !(0..limits.len()).any(|l| over(&used, l)) {
            break;
        }
        let e = &entries[i];
        let covering: Vec<usize> = (0..limits.len()).filter(|&l| limits[l].covers(e)).collect();
        if !covering.iter().any(|&l| over(&used, l)) || busy(e) || !evict(e) {
            continue;
        }
        for l in covering {
            used[l].0 = used[l].0.saturating_sub(e.bytes);
            used[l].1 = used[l].1.saturating_sub(e.files);
        }
        out.evicted.push(i);
        out.bytes += e.bytes;
        out.files += e.files;
    }
    out.still_over = (0..limits.len()).filter(|&l| over(&used, l)).map(|l| limits[l].name.clone()).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    fn entry(kind: Kind, key: &str, bytes: u64, age_s: u64, dev: u64) -> Entry {
        Entry {
            kind,
            key: key.into(),
            name: key.into(),
            bytes,
            files: 1,
            last_use: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            dev,
            lock: PathBuf::from(key),
        }
    }

    fn keys(entries: &[Entry], out: &Outcome) -> Vec<String> {
        out.evicted.iter().map(|&i| entries[i].key.clone()).collect()
    }

    #[test]
    fn evicts_the_least_recently_used_until_the_total_holds() {
        let entries = vec![
            entry(Kind::Bundles, "new", 10, 1, 1),
            entry(Kind::Venvs, "old", 10, 30, 1),
            entry(Kind::Images, "mid", 10, 20, 1),
        ];
        let all = Limit::bytes("total", &Kind::ALL, 15);
        let out = enforce(&entries, std::slice::from_ref(&all), |_| false, |_| true);
        assert_eq!(keys(&entries, &out), ["old", "mid"]);
        assert_eq!((out.bytes, out.files), (20, 2));
        assert!(out.still_over.is_empty());
        let fits = Limit::bytes("total", &Kind::ALL, 30);
        assert!(enforce(&entries, &[fits], |_| false, |_| panic!("nothing to evict")).evicted.is_empty());
    }

    #[test]
    fn busy_entries_stay_and_the_next_ones_go_instead() {
        let entries = vec![
            entry(Kind::Bundles, "a", 10, 30, 1),
            entry(Kind::Bundles, "b", 10, 20, 1),
            entry(Kind::Bundles, "c", 10, 10, 1),
        ];
        let limit = Limit::bytes("total", &Kind::ALL, 10);
        // "a" is in use; "b" was taken between the look and the eviction.
        let out = enforce(&entries, std::slice::from_ref(&limit), |e| e.key == "a", |e| e.key != "b");
        assert_eq!(keys(&entries, &out), ["c"]);
        assert_eq!(out.still_over, ["total"]);
    }

    #[test]
    fn a_per_kind_limit_evicts_only_its_kinds_and_a_filesystem_limit_only_its_entries() {
        let entries = vec![
            entry(Kind::Bundles, "old-bundle", 10, 40, 1),
            entry(Kind::Images, "old-layer", 10, 30, 2),
            entry(Kind::Built, "built", 10, 20, 2),
            entry(Kind::Images, "new-layer", 10, 10, 2),
        ];
        let images = Limit::bytes("images", &[Kind::Images, Kind::Built], 20);
        let out = enforce(&entries, &[Limit::bytes("total", &Kind::ALL, 1000), images], |_| false, |_| true);
        assert_eq!(keys(&entries, &out), ["old-layer"], "the bundle is older but not counted");
        let on_dev2 = Limit { dev: Some(2), ..Limit::bytes("free space", &Kind::ALL, 5) };
        let out = enforce(&entries, &[on_dev2], |_| false, |_| true);
        assert_eq!(keys(&entries, &out), ["old-layer", "built", "new-layer"]);
        let files = Limit { max_files: 2, max_bytes: u64::MAX, ..Limit::bytes("inodes", &Kind::ALL, 0) };
        let out = enforce(&entries, &[files], |_| false, |_| true);
        assert_eq!(keys(&entries, &out), ["old-bundle", "old-layer"]);
    }
}
