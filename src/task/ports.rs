//! Host ports for tasks: handed out from a range, never twice while held — also across the
//! worker processes of one host: each held port is locked in a host-wide directory
//! ([`HOST_PORT_LOCKS`], see [`crate::cachelock`]), so two workers that probe a free port at the
//! same moment cannot both hand it out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, TcpListener};

use crate::cachelock::{EntryLock, EntryLocks};

/// Where the workers of a host lock the ports they hand out (a tmpfs: gone at boot, as are
/// the tasks that held them).
pub const HOST_PORT_LOCKS: &str = "/run/iris-worker/ports";

/// Hands out host ports from `[first, last]`.
#[derive(Debug)]
pub struct PortAllocator {
    first: u16,
    last: u16,
    held: BTreeSet<u16>,
    /// Where the next search starts: spreading allocations out keeps a just-released port
    /// (maybe still in TIME_WAIT for a client) from being handed out again at once.
    next: u16,
    /// Host-wide locks of the held ports (none when the lock directory is unusable).
    locks: Option<EntryLocks>,
    leases: BTreeMap<u16, EntryLock>,
}

impl PortAllocator {
    pub fn new(first: u16, last: u16) -> PortAllocator {
        PortAllocator { first, last, held: BTreeSet::new(), next: first, locks: None, leases: BTreeMap::new() }
    }

    /// Also locks each port it hands out in `dir`, shared by the host's workers.
    pub fn with_host_locks(mut self, dir: &std::path::Path) -> PortAllocator {
        self.locks = Some(EntryLocks::new(dir));
        self
    }

    /// Takes the host-wide lock of `port`: false when another worker holds it.
    fn lock(&mut self, port: u16) -> bool {
        let Some(locks) = &self.locks else { return true };
        match locks.try_exclusive(&format!("port-{port}")) {
            Ok(Some(lease)) => {
                self.leases.insert(port, lease);
                true
            }
            Ok(None) => false,
            // An unusable lock directory must not stop tasks: the bind probe still guards.
            Err(_) => true,
        }
    }

    fn unlock(&mut self, port: u16) {
        if let Some(lease) = self.leases.remove(&port) {
            lease.remove();
        }
    }

    /// Allocates `n` ports that are neither held nor bound by another program, or none.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u16>> {
        let span = u32::from(self.last - self.first) + 1;
        let mut out = Vec::with_capacity(n);
        let mut tried = 0;
        while out.len() < n && tried < span {
            let port = self.next;
            self.next = if port >= self.last { self.first } else { port + 1 };
            tried += 1;
            if !self.held.contains(&port) && !out.contains(&port) && self.lock(port) {
                if is_free(port) {
                    out.push(port);
                } else {
                    self.unlock(port);
                }
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

    /// Marks ports as held (tasks found running after a restart).
    pub fn hold(&mut self, ports: impl IntoIterator<Item = u16>) {
        for p in ports {
            self.held.insert(p);
            let _ = self.lock(p);
        }
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

fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_unique_until_released() {
        let mut a = PortAllocator::new(47100, 47109);
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
        let mut a = PortAllocator::new(47120, 47123).with_host_locks(dir.path());
        let mut b = PortAllocator::new(47120, 47123).with_host_locks(dir.path());
        let x = a.allocate(2).unwrap();
        let y = b.allocate(2).unwrap();
        assert!(x.iter().all(|p| !y.contains(p)), "{x:?} {y:?}");
        assert!(b.allocate(1).is_none(), "every port is held by one of them");
        a.release(x.clone());
        assert_eq!(b.allocate(2).unwrap().len(), 2, "released ports are free for the other");
    }

    #[test]
    fn a_bound_port_is_skipped() {
        let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let mut a = PortAllocator::new(port, port);
        assert!(a.allocate(1).is_none());
    }
}
