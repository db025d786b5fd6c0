//! The stack's socket table: a slab of sockets addressed by small integers, and the hashed
//! indexes that find a socket from a packet (4-tuple) or a port without walking the table.

use std::collections::HashMap;
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
/// accepted), and which sockets are bound to a (protocol, port).
#[derive(Default)]
pub struct Index {
    pub tuples: HashMap<Tuple, usize>,
    ports: HashMap<(u8, u16), Vec<usize>>,
}

impl Index {
    pub fn bind(&mut self, proto: u8, port: u16, id: usize) {
        let v = self.ports.entry((proto, port)).or_default();
        if !v.contains(&id) {
            v.push(id);
        }
    }

    pub fn unbind(&mut self, proto: u8, port: u16, id: usize) {
        if let Some(v) = self.ports.get_mut(&(proto, port)) {
            v.retain(|&x| x != id);
            if v.is_empty() {
                self.ports.remove(&(proto, port));
            }
        }
    }

    /// The sockets bound to the port (listeners, accepted and connected sockets, orphans).
    pub fn on_port(&self, proto: u8, port: u16) -> &[usize] {
        self.ports.get(&(proto, port)).map_or(&[], Vec::as_slice)
    }

    pub fn port_used(&self, proto: u8, port: u16) -> bool {
        self.ports.contains_key(&(proto, port))
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
        assert_eq!(i.on_port(6, 80), &[1, 2]);
        i.unbind(6, 80, 1);
        i.unbind(6, 80, 2);
        assert!(!i.port_used(6, 80));
    }
}
