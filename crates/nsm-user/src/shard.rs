//! Sharding smoltcp's socket sets. smoltcp walks every socket of a SocketSet for each packet
//! it receives (to find the one that accepts it) and on every egress pass, so one set of
//! 20,000 sockets costs about a millisecond per packet. An Interface is not tied to a set, so
//! each interface here keeps its state (addresses, neighbour cache, fragmenter) once and its
//! sockets in many small sets, a connection's set chosen by a hash of its 4-tuple. A packet is
//! handed only to the set its 4-tuple hashes to, and a poll runs only the sets that have
//! packets, guest operations or due timers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities};
use smoltcp::socket::AnySocket;
use smoltcp::time::Instant;

use crate::device::{FdDevice, FdRx, FdTx, LoopDevice, LoopRx, LoopTx};

/// Sets per interface. A power of two; 10,000 connections leave about 20 sockets per set
/// (1024 measured twice as fast as 256 with 10,000 connections; scanning the sets' flags and
/// deadlines costs a few microseconds a poll).
pub const SHARDS: usize = 1024;
/// The set for everything not hashed by 4-tuple: UDP sockets (a datagram's socket is found by
/// port, and IPv4 fragments, which carry no ports, must be reassembled where it lives) and
/// packets that are not TCP or UDP (ARP, NDP, ICMP).
pub const SHARD0: usize = 0;

/// A smoltcp socket: its set and its handle there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sk {
    pub sh: usize,
    pub h: SocketHandle,
}

pub struct Shard {
    pub set: SocketSet<'static>,
    /// Packets for this set's sockets, waiting for the set's next poll.
    /// With the id of what the stack noted about each (0: nothing), see `RxMeta`.
    pub rx: VecDeque<(Vec<u8>, u32)>,
    /// When smoltcp next needs this set polled though nothing arrives.
    pub deadline: Option<Instant>,
    /// Has packets or guest operations: poll it this round.
    pub due: bool,
    /// Sockets of this set a timer can change (handshakes, unacknowledged data, closing,
    /// keepalive): looked at when the set's deadline passes, then re-added as still needed.
    pub timed: HashSet<usize>,
}

/// One smoltcp interface and its socket sets.
pub struct Net {
    /// Boxed: with room to reassemble 64 KiB datagrams an Interface is 66 KB, too big to move
    /// around on a thread's stack.
    pub iface: Box<Interface>,
    pub shards: Vec<Shard>,
    /// The sets marked due, each once: a poll visits these rather than scanning all 1024
    /// (which, done for both interfaces and each loopback round, was most of a poll's cost
    /// once connections arrived by the thousand).
    pub due: Vec<usize>,
    /// (deadline, set) for every deadline a set was given; an entry whose set has since got
    /// another deadline is stale and skipped when it comes up.
    pub timers: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Net {
    pub fn new(iface: Box<Interface>) -> Net {
        let shards = (0..SHARDS)
            .map(|_| Shard {
                set: SocketSet::new(vec![]),
                rx: VecDeque::new(),
                deadline: None,
                due: false,
                timed: HashSet::new(),
            })
            .collect::<Vec<_>>();
        let mut net = Net { iface, shards, due: Vec::new(), timers: BinaryHeap::new() };
        // The interface has work of its own at start (IPv6 multicast reports): a first poll.
        net.mark(SHARD0);
        net
    }

    /// Makes set `sh` due for the next poll.
    pub fn mark(&mut self, sh: usize) {
        if !self.shards[sh].due {
            self.shards[sh].due = true;
            self.due.push(sh);
        }
    }

    /// Records the deadline smoltcp gave set `sh` after a poll.
    pub fn set_deadline(&mut self, sh: usize, d: Option<Instant>) {
        let s = &mut self.shards[sh];
        if s.deadline != d {
            s.deadline = d;
            if let Some(d) = d {
                self.timers.push(Reverse((d, sh)));
            }
        }
    }

    /// Takes the sets whose deadline is at or before `ts` (their deadline cleared).
    pub fn expired(&mut self, ts: Instant, out: &mut Vec<usize>) {
        while let Some(&Reverse((d, sh))) = self.timers.peek() {
            if d > ts {
                break;
            }
            self.timers.pop();
            if self.shards[sh].deadline == Some(d) {
                self.shards[sh].deadline = None;
                out.push(sh);
            }
        }
    }

    pub fn get<T: AnySocket<'static>>(&self, s: Sk) -> &T {
        self.shards[s.sh].set.get::<T>(s.h)
    }

    pub fn get_mut<T: AnySocket<'static>>(&mut self, s: Sk) -> &mut T {
        self.mark(s.sh);
        self.shards[s.sh].set.get_mut::<T>(s.h)
    }

    pub fn add<T: AnySocket<'static>>(&mut self, sh: usize, socket: T) -> Sk {
        self.mark(sh);
        Sk { sh, h: self.shards[sh].set.add(socket) }
    }

    pub fn remove(&mut self, s: Sk) {
        self.shards[s.sh].set.remove(s.h);
    }

    pub fn time(&mut self, s: Sk, id: usize) {
        self.shards[s.sh].timed.insert(id);
    }

    /// The earliest deadline of all sets.
    pub fn deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((d, sh))) = self.timers.peek() {
            if self.shards[sh].deadline == Some(d) {
                return Some(d);
            }
            self.timers.pop();
        }
        None
    }
}

/// The set a TCP connection lives in: a hash of (local, remote), identical for the socket
/// and for the packets that reach it.
pub fn shard_of(local: SocketAddr, remote: SocketAddr) -> usize {
    fn ip_bits(ip: IpAddr) -> u64 {
        match ip {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => {
                let v = u128::from(a);
                (v as u64) ^ ((v >> 64) as u64)
            }
        }
    }
    let mut x = ip_bits(local.ip()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= ip_bits(remote.ip()).rotate_left(29);
    x ^= (u64::from(local.port()) << 16 | u64::from(remote.port())).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 29;
    (x as usize) & (SHARDS - 1)
}

/// The wire as one set sees it: its own received packets, the shared fd for sending.
pub struct ExtPort<'a> {
    pub rx: &'a mut VecDeque<(Vec<u8>, u32)>,
    pub dev: &'a mut FdDevice,
}

impl phy::Device for ExtPort<'_> {
    type RxToken<'b>
        = FdRx
    where
        Self: 'b;
    type TxToken<'b>
        = FdTx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(FdRx, FdTx<'_>)> {
        let (f, id) = self.rx.pop_front()?;
        Some((FdRx(f, id), FdTx(self.dev, 0)))
    }

    fn transmit(&mut self, _: Instant) -> Option<FdTx<'_>> {
        Some(FdTx(self.dev, 0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        phy::Device::capabilities(&*self.dev)
    }
}

/// The loopback as one set sees it: its own received packets, the shared outgoing queue.
pub struct LoPort<'a> {
    pub rx: &'a mut VecDeque<(Vec<u8>, u32)>,
    pub dev: &'a mut LoopDevice,
}

impl phy::Device for LoPort<'_> {
    type RxToken<'b>
        = LoopRx
    where
        Self: 'b;
    type TxToken<'b>
        = LoopTx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(LoopRx, LoopTx<'_>)> {
        let (f, id) = self.rx.pop_front()?;
        Some((LoopRx(f, id), LoopTx(self.dev, 0)))
    }

    fn transmit(&mut self, _: Instant) -> Option<LoopTx<'_>> {
        Some(LoopTx(self.dev, 0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        phy::Device::capabilities(&*self.dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_over_the_sets() {
        let server: SocketAddr = "10.77.0.2:80".parse().unwrap();
        let mut count = vec![0usize; SHARDS];
        for port in 32768..(32768 + 10_000u16) {
            let client = SocketAddr::new("10.77.0.1".parse().unwrap(), port);
            count[shard_of(server, client)] += 1;
        }
        let max = *count.iter().max().unwrap();
        assert!(max < 30, "10,000 connections, at most {max} in one set");
    }
}
