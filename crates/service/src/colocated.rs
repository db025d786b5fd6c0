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
use std::rc::Rc;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

mod path;
pub(crate) mod state;
pub(crate) use path::colocated_op;

/// Bytes one direction of a pipe holds before the sender must wait.
pub(crate) const CAPACITY: usize = 1 << 20;

const IN: u32 = (libc::POLLIN | libc::POLLRDNORM) as u32;
const OUT: u32 = (libc::POLLOUT | libc::POLLWRNORM) as u32;
const RDHUP: u32 = libc::POLLRDHUP as u32;
const ERR: u32 = libc::POLLERR as u32;
const PRI: u32 = libc::POLLPRI as u32;
const HUP: u32 = libc::POLLHUP as u32;

/// TCP states as TCP_INFO reports them.
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;

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

/// Urgent data (MSG_OOB) sent to an end: TCP's one urgent byte and its mark.
#[derive(Clone, Copy)]
struct Urgent {
    /// Its place in the stream (counted as `Side::head`).
    seq: u64,
    byte: u8,
    /// Read with MSG_OOB; its place in the stream stays a hole until read past.
    read: bool,
}

/// Which timestamp a receive reports (SO_TIMESTAMP or SO_TIMESTAMPNS, the last one set).
#[derive(Clone, Copy, Default, PartialEq)]
pub(crate) enum Stamp {
    #[default]
    None,
    Micro,
    Nano,
}

/// One end's TCP-visible state.
#[derive(Default)]
struct Side {
    /// Bytes sent to this end, not read yet.
    rx: VecDeque<u8>,
    /// Bytes read from this end so far: the stream position of rx[0].
    head: u64,
    /// The urgent byte sent to this end, until read past.
    urg: Option<Urgent>,
    /// SO_OOBINLINE: the urgent byte stays in the stream.
    inline: bool,
    /// SO_SNDBUF and SO_RCVBUF as the kernel reads them back, once set.
    sndbuf: Option<usize>,
    rcvbuf: Option<usize>,
    stamp: Stamp,
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
    /// A fresh TCP socket's receive buffer (tcp_rmem's default) on this host.
    default_rcvbuf: usize,
}

impl Pipe {
    /// The bytes end `j` may have waiting. Linux buffers what the sender's socket and the
    /// receiver's hold, less the overhead of each packet: on loopback, with 1000-byte sends,
    /// about half of both plus 24 KiB (measured: 8 KiB each 37741 bytes, 64 KiB each 82482,
    /// 64 KiB and 128 KiB 127728). A connection with neither size set grows both, which the
    /// pipe's fixed window stands for.
    fn capacity(&self, j: usize) -> usize {
        let (snd, rcv) = (self.sides[1 - j].sndbuf, self.sides[j].rcvbuf);
        if snd.is_none() && rcv.is_none() {
            return CAPACITY;
        }
        (snd.unwrap_or(CAPACITY) + rcv.unwrap_or(self.default_rcvbuf)) / 2 + 24576
    }

    /// Whether end `i`'s next byte is its urgent byte, out of the stream (not SO_OOBINLINE).
    fn at_hole(&self, i: usize) -> bool {
        let s = &self.sides[i];
        !s.inline && s.urg.is_some_and(|u| u.seq == s.head)
    }

    fn mask(&self, i: usize) -> u32 {
        let (s, peer) = (&self.sides[i], &self.sides[1 - i]);
        let mut m = 0;
        // tcp_poll: readable with more than an urgent byte waiting at the mark.
        if s.rx.len() > self.at_hole(i) as usize {
            m |= IN;
        }
        if s.urg.is_some_and(|u| !u.read) {
            m |= PRI;
        }
        if s.urg.is_some_and(|u| u.seq == s.head) {
            m |= netkernel_abi::MASK_AT_MARK;
        }
        let rcv_shut = s.fin || s.rd_shut || s.reset;
        let snd_shut = s.wr_shut || s.reset;
        if rcv_shut {
            m |= IN | RDHUP;
        }
        // A closed peer takes (and drops) whatever comes until its reset arrives, as a TCP peer
        // in CLOSE answers with RST; Linux's threshold for writable is a third of the buffer.
        let cap = self.capacity(1 - i);
        if snd_shut || peer.closed || cap.saturating_sub(peer.rx.len()) >= cap / 3 {
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

    /// `n` bytes ending in urgent byte `byte` are about to reach end `j` (tcp_check_urg): an
    /// earlier urgent byte still waiting at the mark, out of the stream, is dropped.
    fn mark_urgent(&mut self, j: usize, byte: u8, n: usize) {
        let seq = self.sides[j].head + (self.sides[j].rx.len() + n - 1) as u64;
        if self.at_hole(j) {
            let s = &mut self.sides[j];
            s.rx.pop_front();
            s.head += 1;
        }
        self.sides[j].urg = Some(Urgent { seq, byte, read: false });
    }

    /// recv(MSG_OOB) on end `i` (tcp_recv_urg): the urgent byte once, EINVAL otherwise.
    fn recv_urgent(&mut self, i: usize, buf: &mut [u8], flags: i32) -> Result<usize, Errno> {
        let s = &mut self.sides[i];
        let Some(u) = s.urg.as_mut().filter(|u| !u.read && !s.inline) else {
            return Err(libc::EINVAL);
        };
        if flags & libc::MSG_PEEK == 0 {
            u.read = true;
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if flags & libc::MSG_TRUNC == 0 {
            buf[0] = u.byte;
        }
        Ok(1)
    }

    fn tcp_state(&self, i: usize) -> u8 {
        let s = &self.sides[i];
        match (s.reset, s.fin, s.wr_shut) {
            // Both FINs sent and acknowledged, which loopback does at once: LAST_ACK and
            // TIME_WAIT end there, and the socket a program holds reads CLOSE.
            (true, _, _) | (_, true, true) => TCP_CLOSE,
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
/// (local, peer) addresses as sockaddr bytes of its own socket's family. `default_rcvbuf`: a fresh
/// TCP socket's receive buffer on this host.
pub(crate) fn pair(client: (Vec<u8>, Vec<u8>), server: (Vec<u8>, Vec<u8>), default_rcvbuf: usize) -> (End, End) {
    let pipe = Rc::new(RefCell::new(Pipe { sides: Default::default(), default_rcvbuf }));
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

    /// The attachment holding the other end, once it is in a guest's slot.
    pub fn peer_attachment(&self) -> Option<u64> {
        let p = self.pipe.borrow();
        p.sides[1 - self.side].owner.as_ref().map(|o| o.region.header().attachment_id)
    }

    pub fn mask(&self) -> u32 {
        self.pipe.borrow().mask(self.side)
    }

    /// Bytes waiting to be read (FIONREAD): up to the mark while an urgent byte lies ahead out
    /// of the stream, as tcp_inq counts.
    pub fn unread(&self) -> usize {
        let p = self.pipe.borrow();
        let s = &p.sides[self.side];
        match s.urg {
            Some(u) if !s.inline && u.seq >= s.head && u.seq < s.head + s.rx.len() as u64 => (u.seq - s.head) as usize,
            _ => s.rx.len(),
        }
    }

    /// SIOCATMARK: the next byte is the urgent one (read or not).
    pub fn at_mark(&self) -> bool {
        let p = self.pipe.borrow();
        let s = &p.sides[self.side];
        s.urg.is_some_and(|u| u.seq == s.head)
    }

    /// The timestamp a receive on this end reports, if any.
    pub fn stamp(&self) -> Stamp {
        self.pipe.borrow().sides[self.side].stamp
    }

    /// The connection is closed (reset, or both directions shut): no peer any more.
    pub fn closed(&self) -> bool {
        let p = self.pipe.borrow();
        let s = &p.sides[self.side];
        s.reset || (s.fin && s.wr_shut)
    }

    /// A send of `data`. An asynchronous one (the guest did not wait for the answer) is taken
    /// whole: GuestLib sends asynchronously only while the socket is writable, so at most
    /// `slack` bytes more than the window can queue up; past that the guest is flooding.
    /// With `urgent` (MSG_OOB) the last byte sent is the urgent byte.
    pub fn send(&mut self, data: &[u8], is_async: bool, slack: usize, urgent: bool) -> Result<usize, Option<Errno>> {
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
            // The send that meets the reset takes what the window would; a larger one comes
            // back short, and the next reports the error, as Linux's send into its buffer does.
            p.reset(i);
            return Ok(if is_async { data.len() } else { data.len().min(p.capacity(j)) });
        }
        let queued = p.sides[j].rx.len();
        let cap = p.capacity(j);
        let n = if is_async {
            if queued + data.len() > cap + slack {
                return Err(None);
            }
            data.len()
        } else {
            data.len().min(cap.saturating_sub(queued))
        };
        if n == 0 && !data.is_empty() {
            return Err(Some(libc::EAGAIN));
        }
        if urgent && n > 0 {
            p.mark_urgent(j, data[n - 1], n);
        }
        p.sides[j].rx.extend(&data[..n]);
        p.notify(j);
        Ok(n)
    }

    /// A receive into `buf` (MSG_PEEK leaves the bytes, MSG_TRUNC drops them uncopied, MSG_OOB
    /// takes the urgent byte). Like tcp_recvmsg, a read stops at the urgent mark once it has
    /// bytes, and skips the urgent byte itself unless SO_OOBINLINE; reading past the mark ends
    /// the urgency.
    pub fn recv(&mut self, buf: &mut [u8], flags: i32) -> Result<usize, Errno> {
        let mut p = self.pipe.borrow_mut();
        let (i, j) = (self.side, 1 - self.side);
        if flags & libc::MSG_OOB != 0 {
            return p.recv_urgent(i, buf, flags);
        }
        let s = &mut p.sides[i];
        if buf.is_empty() && !s.rx.is_empty() {
            return Ok(0);
        }
        let (mut pos, mut n) = (0usize, 0usize);
        while n < buf.len() && pos < s.rx.len() {
            let seq = s.head + pos as u64;
            let mut avail = s.rx.len() - pos;
            match s.urg {
                Some(u) if u.seq == seq => {
                    if n > 0 {
                        break;
                    }
                    if !s.inline {
                        pos += 1;
                        continue;
                    }
                }
                Some(u) if u.seq > seq => avail = avail.min((u.seq - seq) as usize),
                _ => {}
            }
            let k = avail.min(buf.len() - n);
            if flags & libc::MSG_TRUNC == 0 {
                for (d, b) in buf[n..n + k].iter_mut().zip(s.rx.range(pos..pos + k)) {
                    *d = *b;
                }
            }
            pos += k;
            n += k;
        }
        if flags & libc::MSG_PEEK == 0 && pos > 0 {
            let was = p.mask(j) & OUT;
            let s = &mut p.sides[i];
            s.rx.drain(..pos);
            s.head += pos as u64;
            if s.urg.is_some_and(|u| u.seq < s.head) {
                s.urg = None;
            }
            if p.mask(j) & OUT != was {
                p.notify(j);
            }
        }
        if n > 0 {
            return Ok(n);
        }
        let s = &mut p.sides[i];
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
        let v = value.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
        {
            let mut p = self.pipe.borrow_mut();
            let s = &mut p.sides[self.side];
            match (level, name) {
                (libc::SOL_SOCKET, libc::SO_OOBINLINE) => s.inline = v != 0,
                (libc::SOL_SOCKET, libc::SO_SNDBUF) => s.sndbuf = Some(v.max(0) as usize),
                (libc::SOL_SOCKET, libc::SO_RCVBUF) => s.rcvbuf = Some(v.max(0) as usize),
                // Turning either off turns both off, as sock_set_timestamp does.
                (libc::SOL_SOCKET, libc::SO_TIMESTAMP) => s.stamp = if v != 0 { Stamp::Micro } else { Stamp::None },
                (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS) => s.stamp = if v != 0 { Stamp::Nano } else { Stamp::None },
                _ => {}
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> (End, End) {
        let (c, s) = pair((vec![1], vec![2]), (vec![2], vec![1]), 131072);
        s.pipe.borrow_mut().sides[1].accepted = true;
        (c, s)
    }

    #[test]
    fn bytes_flow_in_order_and_fin_ends_the_stream() {
        let (mut c, mut s) = ends();
        assert_eq!(c.send(b"hello ", false, 0, false), Ok(6));
        assert_eq!(c.send(b"world", false, 0, false), Ok(5));
        let mut buf = [0u8; 4];
        assert_eq!(s.recv(&mut buf, libc::MSG_PEEK), Ok(4));
        assert_eq!(s.recv(&mut buf, 0), Ok(4));
        assert_eq!(&buf, b"hell");
        c.shutdown(libc::SHUT_WR).unwrap();
        assert_eq!(c.send(b"x", false, 0, false), Err(Some(libc::EPIPE)));
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
        assert_eq!(c.send(&big, false, 0, false), Ok(CAPACITY));
        assert_eq!(c.mask() & OUT, 0);
        assert_eq!(c.send(b"x", false, 0, false), Err(Some(libc::EAGAIN)));
        // An asynchronous send within the slack is taken; past it, the guest is flooding.
        assert_eq!(c.send(&[1; 100], true, 100, false), Ok(100));
        assert_eq!(c.send(&[1; 1], true, 100, false), Err(None));
        let mut buf = vec![0u8; CAPACITY];
        assert_eq!(s.recv(&mut buf, 0), Ok(CAPACITY));
        assert_ne!(c.mask() & OUT, 0);
    }

    #[test]
    fn urgent_data_has_a_mark_a_hole_and_one_reader() {
        let (mut c, mut s) = ends();
        c.send(b"ab", false, 0, false).unwrap();
        c.send(b"xyz", false, 0, true).unwrap();
        c.send(b"tail", false, 0, false).unwrap();
        assert_ne!(s.mask() & PRI, 0);
        assert_eq!(s.unread(), 4);
        let mut buf = [0u8; 16];
        assert_eq!(s.recv(&mut buf, 0), Ok(4));
        assert_eq!(&buf[..4], b"abxy");
        assert!(s.at_mark());
        assert_eq!(s.recv(&mut buf, libc::MSG_OOB), Ok(1));
        assert_eq!(buf[0], b'z');
        assert_eq!(s.recv(&mut buf, libc::MSG_OOB), Err(libc::EINVAL));
        assert_eq!(s.mask() & PRI, 0);
        assert_eq!(s.recv(&mut buf, 0), Ok(4));
        assert_eq!(&buf[..4], b"tail");
        assert!(!s.at_mark());
        // Only the urgent byte: not readable; a read skips it and ends the urgency.
        c.send(b"Q", false, 0, true).unwrap();
        assert_eq!(s.mask() & (IN | PRI), PRI);
        assert_eq!(s.recv(&mut buf, 0), Err(libc::EAGAIN));
        assert_eq!(s.recv(&mut buf, libc::MSG_OOB), Err(libc::EINVAL));
    }

    #[test]
    fn buffer_sizes_bound_the_window() {
        let (mut c, s) = ends();
        c.set_option(libc::SOL_SOCKET, libc::SO_SNDBUF, 8192i32.to_ne_bytes().to_vec());
        s.pipe.borrow_mut().sides[1].rcvbuf = Some(8192);
        let n = c.send(&vec![0u8; CAPACITY], false, 0, false).unwrap();
        assert_eq!(n, 8192 + 24576);
        assert_eq!(c.mask() & OUT, 0);
    }

    #[test]
    fn close_with_unread_bytes_resets_the_peer() {
        let (mut c, s) = ends();
        c.send(b"unread", false, 0, false).unwrap();
        drop(s);
        assert_ne!(c.mask() & (ERR | HUP), 0);
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut buf, 0), Err(libc::ECONNRESET));
        assert_eq!(c.recv(&mut buf, 0), Ok(0));
        assert_eq!(c.send(b"x", false, 0, false), Err(Some(libc::EPIPE)));
        assert_eq!(c.shutdown(libc::SHUT_RD), Err(libc::ENOTCONN));
    }

    #[test]
    fn writing_to_a_closed_peer_succeeds_once_then_epipe() {
        let (mut c, s) = ends();
        drop(s);
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut buf, 0), Ok(0));
        assert_eq!(c.send(b"data", false, 0, false), Ok(4));
        assert_eq!(c.send(b"data", false, 0, false), Err(Some(libc::EPIPE)));
        assert_eq!(c.send(b"data", false, 0, false), Err(Some(libc::EPIPE)));
        assert_eq!(c.tcp_state(), TCP_CLOSE);
    }

    #[test]
    fn an_asynchronous_send_leaves_a_pending_error_for_the_next_call() {
        let (mut c, s) = ends();
        c.send(b"unread", false, 0, false).unwrap();
        drop(s);
        assert_eq!(c.send(b"x", true, 0, false), Err(Some(libc::ECONNRESET)));
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut buf, 0), Err(libc::ECONNRESET));
    }

    #[test]
    fn an_end_never_accepted_resets_its_peer() {
        let (mut c, s) = pair(Default::default(), Default::default(), 131072);
        s.pipe.borrow_mut().sides[1].accepted = false;
        drop(s);
        assert_eq!(c.take_error(), Some(libc::ECONNRESET));
    }
}
