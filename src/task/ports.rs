//! Host ports for tasks: handed out from a range, never twice while held — also across the
//! worker processes of one host, and across a worker's restart.
//!
//! Each port a task holds has a lock file in a host-wide directory (`--port-lock-dir`,
//! [`DEFAULT_PORT_LOCKS`]; see [`crate::cachelock`]):
//! - a worker hands a port out only when it can lock it **exclusively** (no worker and no task
//!   holds it) and nothing is bound to it; it then keeps the lock **shared** for as long as the
//!   task holds the port;
//! - the task's supervisor takes it shared too (a [`Lease`] in its launch spec) and keeps it
//!   until it exits, so the port stays reserved while the task runs even when its worker is
//!   killed: no other worker can lock it exclusively meanwhile;
//! - a restarted worker takes back the ports of the tasks it adopts ([`PortAllocator::hold`]),
//!   and says which ones someone else (another worker, another task) holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use crate::cachelock::{EntryLock, EntryLocks, Lease};

/// Where the workers of a host lock the ports they hand out by default (a tmpfs: gone at
/// boot, as are the tasks that held them).
pub const DEFAULT_PORT_LOCKS: &str = "/run/iris-worker/ports";

/// A port of an adopted task that another process holds: two tasks may now share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConflict {
    pub port: u16,
    /// The processes holding its lock (none known when the lock is being taken right now).
    pub holders: Vec<i32>,
}

impl std::fmt::Display for PortConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.holders.as_slice() {
            [] => write!(f, "port {} is being handed out by another worker", self.port),
            pids => write!(f, "port {} is held by process {pids:?}", self.port),
        }
    }
}

/// Hands out host ports from `[first, last]`.
#[derive(Debug)]
pub struct PortAllocator {
    first: u16,
    last: u16,
    held: BTreeSet<u16>,
    /// Where the next search starts: spreading allocations out keeps a just-released port
    /// (maybe still in TIME_WAIT for a client) from being handed out again at once.
    next: u16,
    /// Host-wide locks of the held ports (none without a lock directory).
    locks: Option<EntryLocks>,
    dir: Option<PathBuf>,
    leases: BTreeMap<u16, EntryLock>,
    /// Whether nothing is bound to a port (a bind; unit tests give their own).
    probe: fn(u16) -> bool,
    /// The lock directory failed once (said once in the log, not per port).
    lock_failed: bool,
}

/// What locking a port found.
enum Claim {
    Ours,
    Taken,
}

impl PortAllocator {
    pub fn new(first: u16, last: u16) -> PortAllocator {
        PortAllocator {
            first,
            last,
            held: BTreeSet::new(),
            next: first,
            locks: None,
            dir: None,
            leases: BTreeMap::new(),
            probe: is_free,
            lock_failed: false,
        }
    }

    /// Also locks each port it hands out in `dir`, shared by the host's workers.
    pub fn with_host_locks(mut self, dir: &Path) -> PortAllocator {
        self.locks = Some(EntryLocks::new(dir));
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// A unit-test seam: what says a port is free (the real bind is tested apart).
    #[cfg(test)]
    fn with_probe(mut self, probe: fn(u16) -> bool) -> PortAllocator {
        self.probe = probe;
        self
    }

    /// The leases a task's supervisor holds on `ports` (none without a lock directory).
    pub fn leases(&self, ports: impl IntoIterator<Item = u16>) -> Vec<Lease> {
        let Some(dir) = &self.dir else { return Vec::new() };
        ports.into_iter().map(|p| Lease { cache: dir.clone(), key: key(p), record: None }).collect()
    }

    /// An unusable lock directory must not stop tasks (the bind probe still guards this
    /// worker's own ports), but it is said, once.
    fn lock_error(&mut self, port: u16, e: std::io::Error) -> Claim {
        if !self.lock_failed {
            self.lock_failed = true;
            tracing::warn!(port, error = %e, "locking host ports failed: other workers on this host may hand out the same ports");
        }
        Claim::Ours
    }

    /// Takes `port` if no process holds it and `free` says nothing is bound to it: locked
    /// exclusively to look, then kept shared (so the task's supervisor can share it).
    fn claim(&mut self, port: u16, free: impl Fn(u16) -> bool) -> Claim {
        let Some(locks) = &self.locks else {
            return if free(port) { Claim::Ours } else { Claim::Taken };
        };
        let looking = match locks.try_exclusive(&key(port)) {
            Ok(Some(l)) => l,
            Ok(None) => return Claim::Taken,
            Err(e) => return if free(port) { self.lock_error(port, e) } else { Claim::Taken },
        };
        if !free(port) {
            looking.remove();
            return Claim::Taken;
        }
        match looking.downgrade() {
            Ok(Some(lease)) => {
                self.leases.insert(port, lease);
                Claim::Ours
            }
            Ok(None) => Claim::Taken,
            Err(e) => self.lock_error(port, e),
        }
    }

    /// Lets go of `port`'s lock, and removes its file when nobody else holds it.
    fn unlock(&mut self, port: u16) {
        if let Some(lease) = self.leases.remove(&port) {
            drop(lease);
            if let Some(locks) = &self.locks
                && let Ok(Some(unused)) = locks.try_exclusive(&key(port))
            {
                unused.remove();
            }
        }
    }

    /// Allocates `n` ports that are neither held (by this or another worker, or a task) nor
    /// bound by another program, or none.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u16>> {
        let span = u32::from(self.last - self.first) + 1;
        let mut out = Vec::with_capacity(n);
        let mut tried = 0;
        let probe = self.probe;
        while out.len() < n && tried < span {
            let port = self.next;
            self.next = if port >= self.last { self.first } else { port + 1 };
            tried += 1;
            if !self.held.contains(&port) && !out.contains(&port) && matches!(self.claim(port, probe), Claim::Ours) {
                out.push(port);
            }
        }
        if out.len() < n {
            for p in out {
                self.unlock(p);
            }
            return None;
        }
        self.held.extend(out.iter().copied());
        Some(out)
    }

    /// Takes back the ports of a task found after a restart, whose supervisor (`supervisor`,
    /// when it runs) may hold them already. Returns the ports another process holds: the task
    /// may then share them with another (they stay marked held here all the same).
    pub fn hold(&mut self, ports: impl IntoIterator<Item = u16>, supervisor: Option<i32>) -> Vec<PortConflict> {
        let mut conflicts = Vec::new();
        for p in ports {
            self.held.insert(p);
            if self.leases.contains_key(&p) {
                continue;
            }
            // Nothing is bound to it, or the task itself binds it: no probe.
            if matches!(self.claim(p, |_| true), Claim::Ours) {
                continue;
            }
            let Some(path) = self.locks.as_ref().map(|l| l.path(&key(p))) else { continue };
            let holders = crate::cache::holders::Held::read().pids(&path);
            let only_the_task = !holders.is_empty() && supervisor.is_some_and(|s| holders.iter().all(|h| *h == s));
            if only_the_task && let Some(locks) = &self.locks {
                match locks.try_shared(&key(p)) {
                    Ok(Some(lease)) => {
                        self.leases.insert(p, lease);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.lock_error(p, e);
                        continue;
                    }
                }
            }
            conflicts.push(PortConflict { port: p, holders });
        }
        conflicts
    }

    pub fn release(&mut self, ports: impl IntoIterator<Item = u16>) {
        for p in ports {
            self.held.remove(&p);
            self.unlock(p);
        }
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// The lock key of `port`.
fn key(port: u16) -> String {
    format!("port-{port}")
}

fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// Removes the port lock files in `dir` that no process holds (`cleanup --all`): a worker
/// killed while it looked at a port leaves one. Returns how many went.
pub fn remove_unheld_locks(dir: &Path) -> std::io::Result<usize> {
    EntryLocks::new(dir).remove_unheld()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every port free: these tests are about the locks, not about what the host has bound.
    fn all_free(_: u16) -> bool {
        true
    }

    fn lock_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(".locks"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn ports_are_unique_until_released() {
        let mut a = PortAllocator::new(47100, 47109).with_probe(all_free);
        let x = a.allocate(6).unwrap();
        let y = a.allocate(4).unwrap();
        let all: BTreeSet<u16> = x.iter().chain(&y).copied().collect();
        assert_eq!(all.len(), 10);
        assert!(a.allocate(1).is_none(), "the range is exhausted");
        a.release(x.clone());
        assert_eq!(a.allocate(6).unwrap().len(), 6);
        assert_eq!(a.held(), 10);
    }

    #[test]
    fn two_allocators_sharing_host_locks_never_hand_out_one_port_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = PortAllocator::new(47120, 47123).with_host_locks(dir.path()).with_probe(all_free);
        let mut b = PortAllocator::new(47120, 47123).with_host_locks(dir.path()).with_probe(all_free);
        let x = a.allocate(2).unwrap();
        let y = b.allocate(2).unwrap();
        assert!(x.iter().all(|p| !y.contains(p)), "{x:?} {y:?}");
        assert!(b.allocate(1).is_none(), "every port is held by one of them");
        a.release(x.clone());
        assert_eq!(b.allocate(2).unwrap().len(), 2, "released ports are free for the other");
        b.release(y);
        assert_eq!(lock_files(dir.path()).len(), 2, "only the held ports have lock files");
    }

    #[test]
    fn a_running_tasks_port_stays_reserved_across_its_workers_restart_and_conflicts_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let worker = || PortAllocator::new(47130, 47130).with_host_locks(dir.path()).with_probe(all_free);
        let mut a = worker();
        let port = a.allocate(1).unwrap()[0];
        // The task's supervisor takes its lease while the worker holds the port.
        let leases = a.leases([port]);
        let supervisor = leases[0].take().unwrap().expect("shared with the worker");
        drop(a); // the worker is killed; the task runs on
        let mut other = worker();
        assert!(other.allocate(1).is_none(), "another worker cannot hand out the running task's port");
        // The worker is back: the port is its task's again, without a conflict.
        let mut back = worker();
        assert_eq!(back.hold([port], Some(std::process::id() as i32)), []);
        assert!(other.allocate(1).is_none());
        // The task ends: its supervisor lets go, then the worker; the port is free again and
        // its lock file gone.
        drop(supervisor);
        back.release([port]);
        assert_eq!(lock_files(dir.path()), Vec::<String>::new());
        assert_eq!(other.allocate(1), Some(vec![port]));
        // A task found after a restart with no supervisor, whose port another worker handed
        // out meanwhile: a conflict, with who holds it.
        let mut restarted = worker();
        let conflicts = restarted.hold([port], None);
        assert_eq!(conflicts, [PortConflict { port, holders: vec![std::process::id() as i32] }]);
        assert!(conflicts[0].to_string().contains(&format!("port {port} is held by process")), "{}", conflicts[0]);
    }

    #[test]
    fn a_port_bound_by_another_program_is_skipped_and_leaves_no_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = PortAllocator::new(47140, 47141).with_host_locks(dir.path()).with_probe(|p| p != 47140);
        assert_eq!(a.allocate(1), Some(vec![47141]));
        assert_eq!(lock_files(dir.path()), ["port-47141.lock"]);
        a.release([47141]);
        assert_eq!(lock_files(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn unheld_port_lock_files_are_removed_and_held_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = PortAllocator::new(47150, 47151).with_host_locks(dir.path()).with_probe(all_free);
        let held = a.allocate(1).unwrap()[0];
        // A worker killed while it looked at a port left its lock file.
        let locks = EntryLocks::new(dir.path());
        drop(locks.exclusive("port-47151").unwrap());
        assert_eq!(lock_files(dir.path()).len(), 2);
        assert_eq!(remove_unheld_locks(dir.path()).unwrap(), 1);
        assert_eq!(lock_files(dir.path()), [format!("port-{held}.lock")]);
        assert_eq!(remove_unheld_locks(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn a_bound_port_is_skipped() {
        let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let mut a = PortAllocator::new(port, port);
        assert!(a.allocate(1).is_none());
    }
}
