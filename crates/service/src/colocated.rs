//! The co-located short cut (DESIGN.md D4): when a guest connects to a listener this NSM serves,
//! ServiceLib joins the two sockets with a pipe of its own instead of a TCP connection. Bytes go
//! from the sender's region into the pipe and from the pipe into the receiver's region; no
//! kernel socket carries them. Both programs still see TCP: addresses, half-close, reset,
//! readiness and errno follow what Linux does for a loopback TCP connection.
//!
//! Each direction holds at most [`CAPACITY`] bytes (the receiver's window). Each end's socket
//! state models the parts of a TCP socket a program can observe: a FIN received, its own
//! shutdowns, a pending error (`sk_err`), and the reset that leaves it closed.

use crate::stack::Errno;
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Bytes one direction of a pipe holds before the sender must wait.
pub(crate) const CAPACITY: usize = 1 << 20;

const IN: u32 = (libc::POLLIN | libc::POLLRDNORM) as u32;
const OUT: u32 = (libc::POLLOUT | libc::POLLWRNORM) as u32;
const RDHUP: u32 = libc::POLLRDHUP as u32;
const ERR: u32 = libc::POLLERR as u32;
const HUP: u32 = libc::POLLHUP as u32;

/// TCP states as TCP_INFO reports them.
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;

/// Where a socket's readiness goes: its slot in its guest's region, and the attachment's flag
/// that asks for its doorbell to be rung.
pub(crate) struct Owner {
    pub region: Arc<Region>,
    pub slot: u32,
    pub bell: Rc<Cell<bool>>,
}

/// Stores a socket's readiness in its slot. `wakeup` marks a new edge (a stack wakeup, or the
/// co-located peer did something): it bumps the sequence and wakes sleepers. A refresh after the
/// guest's own call only corrects the mask, as that call would cause no wakeup on Linux either.
pub(crate) fn publish(region: &Region, slot: u32, mask: u32, wakeup: bool, bell: &Cell<bool>) {
    let s = region.slot(slot);
    s.mask.store(mask, Ordering::Release);
    if !wakeup {
        return;
    }
    s.seq.fetch_add(1, Ordering::Release);
    fence(Ordering::SeqCst);
    if s.waiters.load(Ordering::Relaxed) != 0 {
        sys::futex_wake(&s.seq);
    }
    if region.header().bell_waiters.load(Ordering::Relaxed) != 0 {
        bell.set(true);
    }
}

/// One end's TCP-visible state.
#[derive(Default)]
struct Side {
    /// Bytes sent to this end, not read yet.
    rx: VecDeque<u8>,
    owner: Option<Owner>,
    /// The socket exists in a guest (an accepted end waits in its listener's queue until then).
    accepted: bool,
    /// The socket is gone (closed, or its guest exited).
    closed: bool,
    /// The peer shut down its sending side: reads end after `rx`.
    fin: bool,
    /// shutdown(SHUT_RD) on this end.
    rd_shut: bool,
    /// shutdown(SHUT_WR) on this end.
    wr_shut: bool,
    /// A reset reached this end: both directions are shut, the state is CLOSE.
    reset: bool,
    /// The error the next call reports once (a kernel socket's sk_err).
    err: Option<Errno>,
}

struct Pipe {
    sides: [Side; 2],
}

impl Pipe {
    fn mask(&self, i: usize) -> u32 {
        let (s, peer) = (&self.sides[i], &self.sides[1 - i]);
        let mut m = 0;
        if !s.rx.is_empty() {
            m |= IN;
        }
        let rcv_shut = s.fin || s.rd_shut || s.reset;
        let snd_shut = s.wr_shut || s.reset;
        if rcv_shut {
            m |= IN | RDHUP;
        }
        // A closed peer takes (and drops) whatever comes until its reset arrives, as a TCP peer
        // in CLOSE answers with RST; Linux's threshold for writable is a third of the buffer.
        if snd_shut || peer.closed || CAPACITY.saturating_sub(peer.rx.len()) >= CAPACITY / 3 {
            m |= OUT;
        }
        if s.err.is_some() {
            m |= ERR;
        }
        if snd_shut && rcv_shut {
            m |= HUP;
        }
        m
    }

    /// End `i`'s readiness changed because of its peer (or another thread): a new edge.
    fn notify(&self, i: usize) {
        if let Some(o) = &self.sides[i].owner {
            publish(&o.region, o.slot, self.mask(i), true, &o.bell);
        }
    }

    /// A reset reaches end `i`: EPIPE if it had received a FIN (CLOSE_WAIT), else ECONNRESET,
    /// as tcp_reset() decides.
    fn reset(&mut self, i: usize) {
        let s = &mut self.sides[i];
        if s.reset || s.closed {
            return;
        }
        s.err = Some(if s.fin { libc::EPIPE } else { libc::ECONNRESET });
        s.reset = true;
        self.notify(i);
    }

    fn tcp_state(&self, i: usize) -> u8 {
        let s = &self.sides[i];
        match (s.reset, s.fin, s.wr_shut) {
            (true, _, _) => TCP_CLOSE,
            (_, true, true) => TCP_LAST_ACK,
            (_, true, false) => TCP_CLOSE_WAIT,
            (_, false, true) => TCP_FIN_WAIT2,
            _ => TCP_ESTABLISHED,
        }
    }
}

/// One end of a co-located connection, owned by its socket. Dropping it closes the socket:
/// the peer reads a FIN, or a reset when unread bytes were thrown away (or SO_LINGER said 0).
pub(crate) struct End {
    pipe: Rc<RefCell<Pipe>>,
    side: usize,
    /// sockaddr bytes getsockname and getpeername answer with.
    pub local: Vec<u8>,
    pub peer: Vec<u8>,
    /// Socket options set on this socket (level, name, value as the kernel normalised it).
    opts: Vec<(i32, i32, Vec<u8>)>,
    /// The connecting end's connect() said EINPROGRESS; the next connect() reports the outcome
    /// (0), later ones EISCONN, as for a TCP socket.
    connecting: bool,
}

/// A new connection: the connecting end and the end its listener will accept, each with its
/// (local, peer) addresses as sockaddr bytes of its own socket's family.
pub(crate) fn pair(client: (Vec<u8>, Vec<u8>), server: (Vec<u8>, Vec<u8>)) -> (End, End) {
    let pipe = Rc::new(RefCell::new(Pipe { sides: Default::default() }));
    pipe.borrow_mut().sides[0].accepted = true;
    let c = End { pipe: pipe.clone(), side: 0, local: client.0, peer: client.1, opts: vec![], connecting: true };
    let s = End { pipe, side: 1, local: server.0, peer: server.1, opts: vec![], connecting: false };
    (c, s)
}

impl End {
    /// The socket now lives in a guest's slot: readiness goes there from now on (the caller
    /// publishes the first mask).
    pub fn adopt(&mut self, owner: Owner) {
        let mut p = self.pipe.borrow_mut();
        p.sides[self.side].accepted = true;
        p.sides[self.side].owner = Some(owner);
    }

    pub fn mask(&self) -> u32 {
        self.pipe.borrow().mask(self.side)
    }

    /// Bytes waiting to be read (FIONREAD).
    pub fn unread(&self) -> usize {
        self.pipe.borrow().sides[self.side].rx.len()
    }

    /// A send of `data`. An asynchronous one (the guest did not wait for the answer) is taken
    /// whole: GuestLib sends asynchronously only while the socket is writable, so at most
    /// `slack` bytes more than the window can queue up; past that the guest is flooding.
    pub fn send(&mut self, data: &[u8], is_async: bool, slack: usize) -> Result<usize, Option<Errno>> {
        let mut p = self.pipe.borrow_mut();
        let (i, j) = (self.side, 1 - self.side);
        // A pending error is reported once, by a call whose result the guest reads: an
        // asynchronous send leaves it in place (its own bytes are dropped, as the kernel drops a
        // send that meets the error).
        if let Some(e) = if is_async { p.sides[i].err } else { p.sides[i].err.take() } {
            return Err(Some(e));
        }
        if p.sides[i].wr_shut || p.sides[i].reset {
            return Err(Some(libc::EPIPE));
        }
        if p.sides[j].closed {
            p.reset(i);
            return Ok(data.len());
        }
        let queued = p.sides[j].rx.len();
        let n = if is_async {
            if queued + data.len() > CAPACITY + slack {
                return Err(None);
            }
            data.len()
        } else {
            data.len().min(CAPACITY.saturating_sub(queued))
        };
        if n == 0 && !data.is_empty() {
            return Err(Some(libc::EAGAIN));
        }
        p.sides[j].rx.extend(&data[..n]);
        p.notify(j);
        Ok(n)
    }

    /// A receive into `buf` (MSG_PEEK leaves the bytes, MSG_TRUNC drops them uncopied).
    pub fn recv(&mut self, buf: &mut [u8], flags: i32) -> Result<usize, Errno> {
        let mut p = self.pipe.borrow_mut();
        let (i, j) = (self.side, 1 - self.side);
        if flags & libc::MSG_OOB != 0 {
            return Err(libc::EINVAL);
        }
        let s = &mut p.sides[i];
        if !s.rx.is_empty() {
            let n = buf.len().min(s.rx.len());
            if flags & libc::MSG_TRUNC == 0 {
                let (a, b) = s.rx.as_slices();
                let k = n.min(a.len());
                buf[..k].copy_from_slice(&a[..k]);
                buf[k..n].copy_from_slice(&b[..n - k]);
            }
            if flags & libc::MSG_PEEK == 0 {
                let was = p.mask(j) & OUT;
                p.sides[i].rx.drain(..n);
                if p.mask(j) & OUT != was {
                    p.notify(j);
                }
            }
            return Ok(n);
        }
        // What tcp_recvmsg checks with nothing to copy: a FIN received, then sk_err, then a
        // shut receive side.
        if s.fin {
            return Ok(0);
        }
        if let Some(e) = s.err.take() {
            return Err(e);
        }
        if s.rd_shut || s.reset {
            return Ok(0);
        }
        Err(libc::EAGAIN)
    }

    pub fn shutdown(&mut self, how: i32) -> Result<(), Errno> {
        let mut p = self.pipe.borrow_mut();
        let (i, j) = (self.side, 1 - self.side);
        if !matches!(how, libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR) {
            return Err(libc::EINVAL);
        }
        if p.sides[i].reset {
            return Err(libc::ENOTCONN);
        }
        if how != libc::SHUT_WR {
            p.sides[i].rd_shut = true;
        }
        if how != libc::SHUT_RD && !p.sides[i].wr_shut {
            p.sides[i].wr_shut = true;
            p.sides[j].fin = true;
            p.notify(j);
        }
        // A thread of the guest blocked on this socket wakes up, as sk_state_change wakes it.
        p.notify(i);
        Ok(())
    }

    /// A connect() on a connected socket: the first reports the completed connect.
    pub fn connect_again(&mut self) -> Result<(), Errno> {
        if std::mem::take(&mut self.connecting) {
            Ok(())
        } else {
            Err(libc::EISCONN)
        }
    }

    /// SO_ERROR: the pending error, cleared by reading it.
    pub fn take_error(&mut self) -> Option<Errno> {
        self.pipe.borrow_mut().sides[self.side].err.take()
    }

    pub fn tcp_state(&self) -> u8 {
        self.pipe.borrow().tcp_state(self.side)
    }

    pub fn option(&self, level: i32, name: i32) -> Option<&[u8]> {
        self.opts.iter().find(|(l, n, _)| (*l, *n) == (level, name)).map(|(_, _, v)| v.as_slice())
    }

    pub fn set_option(&mut self, level: i32, name: i32, value: Vec<u8>) {
        self.opts.retain(|(l, n, _)| (*l, *n) != (level, name));
        self.opts.push((level, name, value));
    }

    /// SO_LINGER on with a zero timeout: close resets the connection.
    fn abortive(&self) -> bool {
        self.option(libc::SOL_SOCKET, libc::SO_LINGER)
            .is_some_and(|v| v.len() >= 8 && i32::from_ne_bytes(v[..4].try_into().unwrap()) != 0 && v[4..8] == [0; 4])
    }
}

impl Drop for End {
    fn drop(&mut self) {
        let abortive = self.abortive();
        let mut p = self.pipe.borrow_mut();
        let (i, j) = (self.side, 1 - self.side);
        let s = &mut p.sides[i];
        // Like tcp_close(): unread data (or a linger of 0, or a connection no one accepted)
        // means a reset instead of a FIN.
        let reset = !s.rx.is_empty() || abortive || !s.accepted;
        let sent_fin = s.wr_shut || s.reset;
        s.closed = true;
        s.owner = None;
        s.rx = VecDeque::new();
        if reset {
            p.reset(j);
        } else {
            // A FIN, unless shutdown(SHUT_WR) sent it already.
            p.sides[j].fin |= !sent_fin;
            p.notify(j);
        }
    }
}

/// A listening socket's queue of co-located connections that wait for accept().
#[derive(Default)]
pub(crate) struct Backlog {
    pub limit: usize,
    /// The listener is an IPv6 socket: it sees addresses in that family.
    pub v6: bool,
    pub queue: VecDeque<End>,
}

impl Backlog {
    /// Linux accepts one more connection than the backlog says.
    pub fn full(&self) -> bool {
        self.queue.len() > self.limit
    }
}

/// Whether `ip` is an address of this NSM's network namespace, so a wildcard listener here
/// is what a connection to it would reach.
pub(crate) fn is_local_address(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
        v4 => v4,
    };
    if ip.is_loopback() {
        return true;
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return false;
    }
    let mut found = false;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned; ifa_addr is null or a sockaddr
        // of the family it names.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                let family = (*sa).sa_family as i32;
                let len = match family {
                    libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
                    libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
                    _ => 0,
                };
                if len > 0 {
                    let bytes = std::slice::from_raw_parts(sa.cast::<u8>(), len);
                    if crate::telemetry::sockaddr_to_std(bytes).is_some_and(|a: SocketAddr| a.ip() == ip) {
                        found = true;
                    }
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> (End, End) {
        let (c, s) = pair((vec![1], vec![2]), (vec![2], vec![1]));
        s.pipe.borrow_mut().sides[1].accepted = true;
        (c, s)
    }

    #[test]
    fn bytes_flow_in_order_and_fin_ends_the_stream() {
        let (mut c, mut s) = ends();
        assert_eq!(c.send(b"hello ", false, 0), Ok(6));
        assert_eq!(c.send(b"world", false, 0), Ok(5));
        let mut buf = [0u8; 4];
        assert_eq!(s.recv(&mut buf, libc::MSG_PEEK), Ok(4));
        assert_eq!(s.recv(&mut buf, 0), Ok(4));
        assert_eq!(&buf, b"hell");
        c.shutdown(libc::SHUT_WR).unwrap();
        assert_eq!(c.send(b"x", false, 0), Err(Some(libc::EPIPE)));
        let mut rest = [0u8; 64];
        assert_eq!(s.recv(&mut rest, 0), Ok(7));
        assert_eq!(&rest[..7], b"o world");
        assert_eq!(s.recv(&mut rest, 0), Ok(0));
        assert_ne!(s.mask() & RDHUP, 0);
        assert_eq!(s.mask() & HUP, 0);
        s.shutdown(libc::SHUT_WR).unwrap();
        assert_ne!(s.mask() & HUP, 0);
    }

    #[test]
    fn the_window_holds_back_a_sender() {
        let (mut c, mut s) = ends();
        let big = vec![7u8; CAPACITY + 10];
        assert_eq!(c.send(&big, false, 0), Ok(CAPACITY));
        assert_eq!(c.mask() & OUT, 0);
        assert_eq!(c.send(b"x", false, 0), Err(Some(libc::EAGAIN)));
        // An asynchronous send within the slack is taken; past it, the guest is flooding.
        assert_eq!(c.send(&[1; 100], true, 100), Ok(100));
        assert_eq!(c.send(&[1; 1], true, 100), Err(None));
        let mut buf = vec![0u8; CAPACITY];
        assert_eq!(s.recv(&mut buf, 0), Ok(CAPACITY));
        assert_ne!(c.mask() & OUT, 0);
    }

    #[test]
    fn close_with_unread_bytes_resets_the_peer() {
        let (mut c, s) = ends();
        c.send(b"unread", false, 0).unwrap();
        drop(s);
        assert_ne!(c.mask() & (ERR | HUP), 0);
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut buf, 0), Err(libc::ECONNRESET));
        assert_eq!(c.recv(&mut buf, 0), Ok(0));
        assert_eq!(c.send(b"x", false, 0), Err(Some(libc::EPIPE)));
        assert_eq!(c.shutdown(libc::SHUT_RD), Err(libc::ENOTCONN));
    }

    #[test]
    fn writing_to_a_closed_peer_succeeds_once_then_epipe() {
        let (mut c, s) = ends();
        drop(s);
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut buf, 0), Ok(0));
        assert_eq!(c.send(b"data", false, 0), Ok(4));
        assert_eq!(c.send(b"data", false, 0), Err(Some(libc::EPIPE)));
        assert_eq!(c.send(b"data", false, 0), Err(Some(libc::EPIPE)));
        assert_eq!(c.tcp_state(), TCP_CLOSE);
    }

    #[test]
    fn an_asynchronous_send_leaves_a_pending_error_for_the_next_call() {
        let (mut c, s) = ends();
        c.send(b"unread", false, 0).unwrap();
        drop(s);
        assert_eq!(c.send(b"x", true, 0), Err(Some(libc::ECONNRESET)));
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut buf, 0), Err(libc::ECONNRESET));
    }

    #[test]
    fn an_end_never_accepted_resets_its_peer() {
        let (mut c, s) = pair(Default::default(), Default::default());
        s.pipe.borrow_mut().sides[1].accepted = false;
        drop(s);
        assert_eq!(c.take_error(), Some(libc::ECONNRESET));
    }
}
