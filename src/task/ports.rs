//! Host ports for tasks: handed out from a range, never twice while held.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};

/// Hands out host ports from `[first, last]`.
#[derive(Debug)]
pub struct PortAllocator {
    first: u16,
    last: u16,
    held: BTreeSet<u16>,
    /// Where the next search starts: spreading allocations out keeps a just-released port
    /// (maybe still in TIME_WAIT for a client) from being handed out again at once.
    next: u16,
}

impl PortAllocator {
    pub fn new(first: u16, last: u16) -> PortAllocator {
        PortAllocator { first, last, held: BTreeSet::new(), next: first }
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
            if !self.held.contains(&port) && !out.contains(&port) && is_free(port) {
                out.push(port);
            }
        }
        if out.len() < n {
            return None;
        }
        self.held.extend(out.iter().copied());
        Some(out)
    }

    /// Marks ports as held (tasks found running after a restart).
    pub fn hold(&mut self, ports: impl IntoIterator<Item = u16>) {
        self.held.extend(ports);
    }

    pub fn release(&mut self, ports: impl IntoIterator<Item = u16>) {
        for p in ports {
            self.held.remove(&p);
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
    fn a_bound_port_is_skipped() {
        let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let mut a = PortAllocator::new(port, port);
        assert!(a.allocate(1).is_none());
    }
}
