//! The stack's socket table: a slab of sockets addressed by small integers, and the hashed
//! indexes that find a socket from a packet (4-tuple) or a port without walking the table.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

/// A slab: ids stay valid until removed and are reused after.
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(v);
                i
            }
            None => {
                self.slots.push(Some(v));
                self.slots.len() - 1
            }
        }
    }

    pub fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.slots.get_mut(i)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.slots.get(i)?.as_ref()
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.slots.get_mut(i)?.as_mut()
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// (protocol, local, remote) as packets carry them, IPv4 never v4-mapped.
pub type Tuple = (u8, SocketAddr, SocketAddr);

/// Which socket owns a TCP 4-tuple (a connection, or the listener of a connection not yet
/// accepted), which sockets are bound to a (protocol, port), and which of those listen.
///
/// Sets, not lists: every accepted connection is bound to its listener's port, so with 10,000
/// of them a list made each accept (a duplicate check) and each close (a removal) cost a walk
/// of the port's sockets; and SYNs look up the listeners alone, not every socket on the port.
#[derive(Default)]
pub struct Index {
    pub tuples: HashMap<Tuple, usize>,
    ports: HashMap<(u8, u16), HashSet<usize>>,
    /// TCP sockets that called listen() on a port; a socket that stopped listening stays
    /// until unbound, so readers check the socket's state.
    listeners: HashMap<u16, Vec<usize>>,
}

impl Index {
    pub fn bind(&mut self, proto: u8, port: u16, id: usize) {
        self.ports.entry((proto, port)).or_default().insert(id);
    }

    pub fn unbind(&mut self, proto: u8, port: u16, id: usize) {
        if let Some(v) = self.ports.get_mut(&(proto, port)) {
            v.remove(&id);
            if v.is_empty() {
                self.ports.remove(&(proto, port));
            }
        }
        if let Some(v) = self.listeners.get_mut(&port).filter(|_| proto == crate::frame::TCP) {
            v.retain(|&x| x != id);
            if v.is_empty() {
                self.listeners.remove(&port);
            }
        }
    }

    /// Notes that TCP socket `id`, bound to `port`, listens.
    pub fn listen(&mut self, port: u16, id: usize) {
        let v = self.listeners.entry(port).or_default();
        if !v.contains(&id) {
            v.push(id);
        }
    }

    /// The TCP sockets on the port that listen or once did.
    pub fn listeners(&self, port: u16) -> &[usize] {
        self.listeners.get(&port).map_or(&[], Vec::as_slice)
    }

    /// The sockets bound to the port (listeners, accepted and connected sockets, orphans).
    pub fn on_port(&self, proto: u8, port: u16) -> impl Iterator<Item = &usize> + '_ {
        self.ports.get(&(proto, port)).into_iter().flatten()
    }

    pub fn port_used(&self, proto: u8, port: u16) -> bool {
        self.ports.contains_key(&(proto, port))
    }

    /// Every (protocol, port) some socket holds.
    pub fn ports_used(&self) -> Vec<(u8, u16)> {
        self.ports.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_reuses_ids() {
        let mut s = Slab::default();
        let a = s.insert('a');
        let b = s.insert('b');
        assert_eq!(s.remove(a), Some('a'));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.insert('c'), a);
        assert_eq!(s.get(b), Some(&'b'));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn ports_track_sockets() {
        let mut i = Index::default();
        i.bind(6, 80, 1);
        i.bind(6, 80, 2);
        i.bind(6, 80, 2);
        let mut on: Vec<usize> = i.on_port(6, 80).copied().collect();
        on.sort();
        assert_eq!(on, [1, 2]);
        i.listen(80, 2);
        i.listen(80, 2);
        assert_eq!(i.listeners(80), &[2]);
        i.unbind(6, 80, 1);
        i.unbind(6, 80, 2);
        assert!(!i.port_used(6, 80));
        assert!(i.listeners(80).is_empty());
    }
}
