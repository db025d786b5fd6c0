//! Sockets that leave their process during a user NSM's upgrade (peer.rs), so that a guest's
//! attachment moves to the new process while it still has connections.
//!
//! A TCP connection's state lives in smoltcp in the old process, so the connection stays there;
//! its guest's socket moves. The old process relays the connection's bytes through a unix
//! stream socket pair: what smoltcp receives goes into its end, what it reads from its end goes
//! to smoltcp. In the new process the socket is `St::Relayed`: its end of the pair, with the
//! connection's addresses. The kernel buffers the pair, so flow control, readiness and ordering
//! come for free; what a byte stream cannot say travels as notices on the frame channel:
//! "everything is in the stream" (the peer's FIN, or a connection that ended in order), "the
//! connection failed with this errno" and its telemetry once a second (old to new), "the guest
//! closed it" and "reset it" (new to old: closed with unread bytes or SO_LINGER 0, as Linux
//! sends a RST). An end of stream is believed only after its notice: a pair that ends without
//! one (the old process died) reports ECONNRESET, never a clean end that would pass a cut
//! transfer for a whole one.
//!
//! Listeners with nothing waiting for accept, sockets not yet connected and UDP sockets with no
//! datagram queued are made anew in the new process from a description instead; what reaches
//! the old process for their ports afterwards (it was on its way) is given back to the new one.
//! Handshakes in progress and listeners with connections waiting stay until they are over (a
//! fraction of a second), and their attachment with them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use smoltcp::socket::tcp;

use crate::seam::{Errno, Exported};
use crate::sockaddr::Family;
use crate::stack::{Opts, St, UdpState, UserStack};

/// The pair's buffer each way: what a relayed connection may have in flight between the two
/// processes (on top of smoltcp's own buffers).
const PAIR_BUFFER: libc::c_int = 1 << 20;

/// How often the old process sends the new one its relayed connections' telemetry.
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A notice's code besides a positive errno.
const NOTICE_FIN: i32 = 0;
const NOTICE_ABORT: i32 = -1;
const NOTICE_CLOSED: i32 = -2;

/// A socket written down for another process of this NSM.
#[derive(serde::Serialize, serde::Deserialize)]
enum Described {
    /// Not connected (bound or not).
    Idle { v6: bool, bound: Option<SocketAddr>, opts: Opts },
    /// A listener with nothing waiting for accept.
    Listener { v6: bool, bound: SocketAddr, backlog: usize, opts: Opts },
    /// A UDP socket with no datagram queued.
    Udp { v6: bool, bound: Option<SocketAddr>, peer: Option<SocketAddr>, opts: Opts, rcv_shut: bool, snd_shut: bool },
    /// A TCP connection the old process relays (the fd travels with it).
    Conn { relay: u64, v6: bool, local: SocketAddr, remote: SocketAddr, opts: Opts, rcv_shut: bool, snd_shut: bool },
}

/// The new process's side of a relayed connection.
#[derive(Debug)]
pub struct Relayed {
    pub fd: OwnedFd,
    pub relay: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub rcv_shut: bool,
    pub snd_shut: bool,
    /// The old process said the stream holds everything: its end is a true end of stream.
    pub fin: bool,
    /// The connection failed (the error is the socket's).
    pub dead: bool,
    /// Its RTT, cwnd and retransmits as the old process last measured them (every second).
    pub stats: Option<crate::seam::TcpStats>,
}

/// The old process's side: a connection it relays for the new one.
struct Relay {
    fd: OwnedFd,
    id: u64,
    /// The new process's side will send nothing more (it shut down or closed).
    rd_done: bool,
    /// Everything the peer sent is in the pair, and its end was shut.
    wr_done: bool,
    /// The guest closed its socket (not only shut it down): once its last bytes are in
    /// smoltcp, the connection is an orphan's.
    closed: bool,
}

/// A connection readied by `export` for a handover that has not ended yet.
struct Prepared {
    sock: usize,
    ours: OwnedFd,
    theirs: OwnedFd,
    id: u64,
}

#[derive(Default)]
pub(crate) struct Relays {
    /// Epoll of the pairs (and, in the new process, the frame channel): the stack's second wait
    /// fd during an upgrade.
    pub ep: Option<OwnedFd>,
    /// Old process: socket id -> the connection it relays.
    out: HashMap<usize, Relay>,
    /// Old process: relay id -> socket id, for the new process's notices.
    out_ids: HashMap<u64, usize>,
    /// New process: relay id -> socket id.
    by_id: HashMap<u64, usize>,
    pending: Vec<Prepared>,
    next: u64,
    /// Old process: when the relayed connections' telemetry goes to the new one next.
    stats_at: Option<std::time::Instant>,
    /// Old process: (protocol, port)s of listeners and UDP sockets made anew in the new process,
    /// whose frames go there (some reach this one before the new one has them).
    given: std::collections::HashSet<(u8, u16)>,
    giving: Vec<(u8, u16)>,
}

impl Relays {
    /// Connections this process still relays for another.
    pub fn relaying(&self) -> usize {
        self.out.len()
    }

    pub fn gave_any(&self) -> bool {
        !self.given.is_empty()
    }

    pub fn gave(&self, proto: u8, port: u16) -> bool {
        self.given.contains(&(proto, port))
    }

    /// Socket `id` is relayed no more.
    fn forget(&mut self, id: usize) {
        if let Some(r) = self.out.remove(&id) {
            self.out_ids.remove(&r.id);
        }
    }

    /// Whether socket `id` is relayed for another process (its handle's drop must not close it).
    pub fn relaying_for(&self, id: usize) -> bool {
        self.out.contains_key(&id)
    }
}

/// The data value of the frame channel in the relay epoll.
const CHAN_KEY: u64 = u64::MAX;

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Watches `fd` in `ep` under `key`: a pair edge-triggered for every change, or (`edge` false)
/// the frame channel for input, level-triggered as the driver watches it.
fn watch(ep: RawFd, fd: RawFd, key: u64, edge: bool) -> std::io::Result<()> {
    let events = if edge { libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET } else { libc::EPOLLIN };
    netkernel_ring::sys::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, events as u32, key)
}

/// poll(2) bits of `fd` now.
fn poll_now(fd: RawFd) -> i16 {
    let mut p = libc::pollfd { fd, events: libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP, revents: 0 };
    // SAFETY: one live pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        return 0;
    }
    p.revents
}

pub(crate) fn int_ioctl(fd: RawFd, req: libc::c_ulong) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: n is a live c_int, which FIONREAD and SIOCOUTQ write.
    let r = unsafe { libc::ioctl(fd, req, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

impl UserStack {
    /// Whether socket `id` can be served from another process now (see the module).
    pub(crate) fn can_export(&self, id: usize) -> bool {
        let Some(s) = self.socks.get(id) else { return false };
        if s.orphan || s.error != 0 {
            return false;
        }
        match &s.st {
            St::Idle => true,
            St::Listen { pending, queue, .. } => pending.is_empty() && queue.is_empty() && s.bound.is_some(),
            St::Udp(u) => u.h.iter().enumerate().all(|(ifx, h)| {
                h.is_none_or(|h| self.nets[ifx].get::<smoltcp::socket::udp::Socket>(h).recv_queue() == 0)
            }),
            // Only an old process, whose successor reads the wire, relays.
            St::Tcp(c) => {
                self.draining_old()
                    && c.established
                    && !c.saw_rst
                    && !self.relay.out.contains_key(&id)
                    && self.nets[c.ifx].get::<tcp::Socket>(c.h).state() != tcp::State::Closed
            }
            St::Relayed(_) => false,
        }
    }

    fn draining_old(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| p.old && !p.gone)
    }

    /// `Stack::export`: a description, and for a connection the fd of a pair this process will
    /// relay it through once the handover succeeds (`settle_exports`).
    pub(crate) fn export_sock(&mut self, id: usize) -> Option<Exported> {
        if !self.can_export(id) {
            return None;
        }
        let s = self.socks.get(id)?;
        let (v6, opts) = (s.family == Family::V6, s.opts.clone());
        let port = s.bound.map(|b| (s.proto.num(), b.port()));
        let desc = match &s.st {
            St::Idle => Described::Idle { v6, bound: s.bound, opts },
            St::Listen { backlog, .. } => {
                self.relay.giving.extend(port);
                Described::Listener { v6, bound: s.bound?, backlog: *backlog, opts }
            }
            St::Udp(u) => {
                self.relay.giving.extend(port);
                Described::Udp { v6, bound: s.bound, peer: u.peer, opts, rcv_shut: u.rcv_shut, snd_shut: u.snd_shut }
            }
            St::Tcp(c) => {
                let relay = self.relay.next;
                let d = Described::Conn {
                    relay,
                    v6,
                    local: c.local,
                    remote: c.remote,
                    opts,
                    rcv_shut: c.rcv_shut,
                    snd_shut: c.snd_shut,
                };
                let (ours, theirs) = crate::peer::pair(PAIR_BUFFER).ok()?;
                let fd = theirs.as_raw_fd();
                self.relay.next += 1;
                self.relay.pending.push(Prepared { sock: id, ours, theirs, id: relay });
                return Some(Exported { fd: Some(fd), desc: serde_json::to_vec(&d).ok() });
            }
            St::Relayed(_) => return None,
        };
        Some(Exported { fd: None, desc: Some(serde_json::to_vec(&desc).ok()?) })
    }

    /// `Stack::exported`: the connections readied are relayed from now on (`handed`), or stay
    /// as they were.
    pub(crate) fn settle_exports(&mut self, handed: bool) {
        let giving = std::mem::take(&mut self.relay.giving);
        if handed && self.draining_old() {
            self.relay.given.extend(giving);
        }
        for p in std::mem::take(&mut self.relay.pending) {
            // The other process has its copy; ours would keep the pair open past its close.
            drop(p.theirs);
            if !handed {
                continue;
            }
            let rd_done = match self.socks.get(p.sock).map(|s| &s.st) {
                Some(St::Tcp(c)) => c.snd_shut,
                _ => continue,
            };
            if let Some(ep) = &self.relay.ep {
                if let Err(e) = watch(ep.as_raw_fd(), p.ours.as_raw_fd(), p.sock as u64, true) {
                    eprintln!("netkernel nsm: cannot watch a relayed connection: {e}");
                }
            }
            self.relay.out.insert(p.sock, Relay { fd: p.ours, id: p.id, rd_done, wr_done: false, closed: false });
            self.relay.out_ids.insert(p.id, p.sock);
            self.dirty.insert(p.sock);
        }
    }

    /// `Stack::import`: makes anew in this process a socket another process exported.
    pub(crate) fn import_sock(&mut self, fd: Option<OwnedFd>, desc: &[u8]) -> Result<crate::Handle, Errno> {
        let d: Described = serde_json::from_slice(desc).map_err(|_| libc::EINVAL)?;
        let fam = |v6: bool| if v6 { Family::V6 } else { Family::V4 };
        let addr = |f: Family, a: SocketAddr| {
            let mut buf = [0u8; 28];
            let n = crate::sockaddr::write(f, a, &mut buf);
            (buf, n)
        };
        match d {
            Described::Idle { v6, bound, opts } => {
                let h = self.do_socket(fam(v6).domain(), libc::SOCK_STREAM, 0)?;
                self.sock(h.id)?.opts = opts;
                if let Some(b) = bound {
                    let (a, n) = addr(fam(v6), b);
                    self.do_bind(h.id, &a[..n])?;
                }
                Ok(h)
            }
            Described::Listener { v6, bound, backlog, opts } => {
                let h = self.do_socket(fam(v6).domain(), libc::SOCK_STREAM, 0)?;
                self.sock(h.id)?.opts = opts;
                let (a, n) = addr(fam(v6), bound);
                self.do_bind(h.id, &a[..n])?;
                self.do_listen(h.id, backlog as i32)?;
                Ok(h)
            }
            Described::Udp { v6, bound, peer, opts, rcv_shut, snd_shut } => {
                let h = self.do_socket(fam(v6).domain(), libc::SOCK_DGRAM, 0)?;
                self.sock(h.id)?.opts = opts;
                if let Some(b) = bound {
                    let (a, n) = addr(fam(v6), b);
                    self.do_bind(h.id, &a[..n])?;
                }
                if let Some(p) = peer {
                    let (a, n) = addr(fam(v6), p);
                    self.do_connect(h.id, &a[..n])?;
                }
                if let St::Udp(UdpState { rcv_shut: r, snd_shut: w, .. }) = &mut self.sock(h.id)?.st {
                    (*r, *w) = (rcv_shut, snd_shut);
                }
                Ok(h)
            }
            Described::Conn { relay, v6, local, remote, opts, rcv_shut, snd_shut } => {
                let fd = fd.ok_or(libc::EBADF)?;
                let h = self.do_socket(fam(v6).domain(), libc::SOCK_STREAM, 0)?;
                if snd_shut {
                    // SAFETY: integers only; the kernel checks fd.
                    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
                }
                if let Some(ep) = &self.relay.ep {
                    watch(ep.as_raw_fd(), fd.as_raw_fd(), h.id as u64, true)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                }
                let s = self.sock(h.id)?;
                s.opts = opts;
                s.st = St::Relayed(Relayed {
                    fd,
                    relay,
                    local,
                    remote,
                    rcv_shut,
                    snd_shut,
                    fin: false,
                    dead: false,
                    stats: None,
                });
                self.relay.by_id.insert(relay, h.id);
                self.dirty.insert(h.id);
                Ok(h)
            }
        }
    }

    /// Sockets whose pair had news since the last poll: looked at again.
    pub(crate) fn relay_events(&mut self) {
        let Some(ep) = &self.relay.ep else { return };
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: evs is a live buffer of the length passed; no wait.
            let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 0) };
            if n <= 0 {
                break;
            }
            for ev in &evs[..n as usize] {
                if ev.u64 != CHAN_KEY {
                    self.dirty.insert(ev.u64 as usize);
                }
            }
            if (n as usize) < evs.len() {
                break;
            }
        }
        // Notices from the peer: about what it relays for this process, or (the old process)
        // about what this process relays for it.
        let old = self.peer.as_ref().is_some_and(|p| p.old);
        self.relay_stats(old);
        let notices = self.peer.as_mut().map(|p| std::mem::take(&mut p.notices)).unwrap_or_default();
        for (relay, code) in notices {
            if old {
                self.on_guest_notice(relay, code);
            } else {
                self.on_relay_notice(relay, code);
            }
        }
        if !self.peer.as_ref().is_some_and(|p| p.gone) {
            return;
        }
        if old {
            // The new process died: what this process relayed for it is reset (`pump`).
            self.dirty.extend(self.relay.out.keys().copied());
            if self.relay.out.is_empty() {
                self.relay.ep = None;
            }
            return;
        }
        // The old process is gone: a relayed stream that did not end in order failed.
        for (_, id) in std::mem::take(&mut self.relay.by_id) {
            if let Some(s) = self.socks.get_mut(id) {
                if let St::Relayed(r) = &mut s.st {
                    if !r.fin && !r.dead {
                        r.dead = true;
                        s.error = libc::ECONNRESET;
                    }
                    self.dirty.insert(id);
                }
            }
        }
        // Nothing comes through the pairs any more, and the closed channel would keep the
        // epoll ready: it goes (no system call a poll for it from now on).
        self.relay.ep = None;
    }

    /// Telemetry of relayed connections: the old process sends each one's every second, the new
    /// one keeps the last for `ctl conns`.
    fn relay_stats(&mut self, old: bool) {
        if !old {
            let got = self.peer.as_mut().map(|p| std::mem::take(&mut p.stats)).unwrap_or_default();
            for (relay, st) in got {
                let Some(&id) = self.relay.by_id.get(&relay) else { continue };
                if let Some(St::Relayed(r)) = self.socks.get_mut(id).map(|s| &mut s.st) {
                    r.stats = Some(st);
                }
            }
            return;
        }
        let now = std::time::Instant::now();
        if self.relay.out.is_empty() || self.relay.stats_at.is_some_and(|t| now < t) {
            return;
        }
        self.relay.stats_at = Some(now + STATS_EVERY);
        let ids: Vec<(usize, u64)> = self.relay.out.iter().map(|(&id, r)| (id, r.id)).collect();
        for (id, relay) in ids {
            if let Some(st) = self.do_tcp_stats(id) {
                if let Some(p) = self.peer.as_mut() {
                    p.send_stats(relay, &st);
                }
            }
        }
        if let Some(p) = self.peer.as_mut() {
            p.flush();
        }
    }

    /// New process: the stream of relayed connection `relay` is whole, or the connection failed.
    fn on_relay_notice(&mut self, relay: u64, code: i32) {
        let Some(&id) = self.relay.by_id.get(&relay) else { return };
        let Some(s) = self.socks.get_mut(id) else { return };
        let St::Relayed(r) = &mut s.st else { return };
        if code == NOTICE_FIN {
            r.fin = true;
        } else if code > 0 {
            r.dead = true;
            s.error = code;
        }
        self.dirty.insert(id);
    }

    /// Old process: the guest of relayed connection `relay` closed or reset it.
    fn on_guest_notice(&mut self, relay: u64, code: i32) {
        let Some(&id) = self.relay.out_ids.get(&relay) else { return };
        let Some(r) = self.relay.out.get_mut(&id) else { return };
        if code == NOTICE_CLOSED {
            r.closed = true;
            self.dirty.insert(id);
        } else if code == NOTICE_ABORT {
            if let Some(St::Tcp(c)) = self.socks.get(id).map(|s| &s.st) {
                let (ifx, h) = (c.ifx, c.h);
                self.nets[ifx].get_mut::<tcp::Socket>(h).abort();
            }
            self.end_relay(id);
        }
    }

    fn notice(&mut self, relay: u64, code: i32) {
        if let Some(p) = self.peer.as_mut() {
            let mut b = [0u8; 12];
            b[..8].copy_from_slice(&relay.to_le_bytes());
            b[8..].copy_from_slice(&code.to_le_bytes());
            p.send_notice(&b);
            p.flush();
        }
    }

    /// The relay of socket `id` is over: the connection lives on in smoltcp alone, as a closed
    /// socket does, until it is over.
    fn end_relay(&mut self, id: usize) {
        self.relay.forget(id);
        if let Some(s) = self.socks.get_mut(id) {
            s.orphan = true;
            self.dirty.insert(id);
        }
    }

    /// Old process: moves what it can between connection `id` and its pair, and ends the relay
    /// when the connection is over for the guest. Returns whether smoltcp got bytes to send.
    pub(crate) fn pump(&mut self, id: usize) -> bool {
        if self.relay.out.is_empty() {
            return false;
        }
        let Some(r) = self.relay.out.get_mut(&id) else { return false };
        let Some(s) = self.socks.get(id) else {
            self.relay.forget(id);
            return false;
        };
        let St::Tcp(c) = &s.st else {
            self.relay.forget(id);
            return false;
        };
        let (ifx, h, fd, error, peer_fin) = (c.ifx, c.h, r.fd.as_raw_fd(), s.error, c.peer_fin);
        let mut broken = self.peer.as_ref().is_none_or(|p| p.gone);
        let sk = self.nets[ifx].get_mut::<tcp::Socket>(h);
        let mut fed = false;
        // The peer's bytes into the pair.
        while !r.wr_done && !broken && sk.can_recv() {
            let w = sk.recv(|buf| {
                // SAFETY: buf is a live, readable slice of the length passed.
                let n =
                    unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
                if n < 0 {
                    (0, Err(errno()))
                } else {
                    (n as usize, Ok(n as usize))
                }
            });
            match w {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Err(libc::EAGAIN)) | Ok(Ok(_)) => break,
                // The guest closed its socket: bytes arriving now draw a RST, as on Linux.
                _ => broken = true,
            }
        }
        // The guest's bytes into smoltcp.
        while !r.rd_done && !broken && sk.can_send() {
            let got = sk.send(|buf| {
                // SAFETY: buf is a live, writable slice of the length passed.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n < 0 {
                    (0, Err(errno()))
                } else {
                    (n as usize, Ok(n as usize))
                }
            });
            match got {
                Ok(Ok(0)) => {
                    r.rd_done = true;
                    sk.close();
                    fed = true;
                }
                Ok(Ok(_)) => fed = true,
                Ok(Err(libc::EAGAIN)) => break,
                _ => broken = true,
            }
        }
        let relay = r.id;
        if broken {
            sk.abort();
            self.end_relay(id);
            return true;
        }
        // refresh() gave the socket Linux's error for how it ended (0: in order).
        if sk.state() == tcp::State::Closed && error != 0 {
            self.notice(relay, error);
            self.end_relay(id);
            return fed;
        }
        if peer_fin && !sk.can_recv() && !r.wr_done {
            r.wr_done = true;
            self.notice(relay, NOTICE_FIN);
            // SAFETY: integers only; fd is the pair end this relay owns.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        }
        let r = &self.relay.out[&id];
        if r.rd_done && (r.wr_done || r.closed) {
            self.end_relay(id);
        }
        fed
    }

    /// New process: readiness of a relayed connection, as `readiness` computes a connection's.
    pub(crate) fn relayed_readiness(&self, r: &Relayed, error: i32) -> (u32, usize, usize) {
        const IN: u32 = libc::POLLIN as u32;
        const OUT: u32 = libc::POLLOUT as u32;
        let fd = r.fd.as_raw_fd();
        let ev = poll_now(fd);
        let rd = int_ioctl(fd, libc::FIONREAD);
        let eof = r.fin && ev & (libc::POLLRDHUP | libc::POLLHUP) != 0;
        let shut_rd = r.rcv_shut || eof || r.dead;
        let shut_wr = r.snd_shut || r.dead;
        let mut m = if error != 0 { libc::POLLERR as u32 } else { 0 };
        if shut_rd && shut_wr {
            m |= libc::POLLHUP as u32;
        }
        if shut_rd {
            m |= IN | libc::POLLRDHUP as u32;
        }
        if rd > 0 {
            m |= IN;
        }
        let free = if ev & libc::POLLOUT != 0 {
            (PAIR_BUFFER as usize * 2).saturating_sub(int_ioctl(fd, libc::TIOCOUTQ)).max(1)
        } else {
            0
        };
        if shut_wr || free > 0 {
            m |= OUT;
        }
        (m, rd, free)
    }

    /// New process: send on a relayed connection.
    pub(crate) fn relayed_send(&mut self, id: usize, data: &[u8]) -> Result<usize, Errno> {
        let s = self.sock(id)?;
        let St::Relayed(r) = &s.st else { return Err(libc::EPIPE) };
        if s.error != 0 {
            return Err(std::mem::take(&mut s.error));
        }
        if r.snd_shut || r.dead {
            return Err(libc::EPIPE);
        }
        // SAFETY: data is a live, readable slice of the length passed.
        let n = unsafe {
            libc::send(r.fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(match errno() {
                libc::EAGAIN => libc::EAGAIN,
                _ => libc::EPIPE,
            });
        }
        Ok(n as usize)
    }

    /// New process: recv on a relayed connection. An end of stream counts once the old process
    /// said it is one (see the module).
    pub(crate) fn relayed_recv(&mut self, id: usize, buf: &mut [u8], flags: i32) -> Result<usize, Errno> {
        let s = self.sock(id)?;
        let St::Relayed(r) = &s.st else { return Err(libc::ENOTCONN) };
        if s.error != 0 && flags & libc::MSG_PEEK == 0 {
            return Err(std::mem::take(&mut s.error));
        }
        if r.dead {
            return Ok(0);
        }
        let fl = libc::MSG_DONTWAIT | (flags & libc::MSG_PEEK);
        // SAFETY: buf is a live, writable slice of the length passed.
        let n = unsafe { libc::recv(r.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), fl) };
        // Bytes already queued are read even after shutdown(SHUT_RD), as tcp_recvmsg does.
        match n {
            n if n > 0 => Ok(n as usize),
            0 if r.fin || r.rcv_shut || buf.is_empty() => Ok(0),
            0 => Err(libc::EAGAIN),
            _ => match errno() {
                libc::EAGAIN if r.rcv_shut => Ok(0),
                e => Err(e),
            },
        }
    }

    /// New process: shutdown(2) of a relayed connection.
    pub(crate) fn relayed_shutdown(r: &mut Relayed, how: i32) {
        if how != libc::SHUT_WR {
            r.rcv_shut = true;
        }
        if how != libc::SHUT_RD && !r.snd_shut {
            r.snd_shut = true;
            // SAFETY: integers only; the fd is this socket's pair end.
            unsafe { libc::shutdown(r.fd.as_raw_fd(), libc::SHUT_WR) };
        }
    }

    /// New process: the guest closed a relayed connection. Unread bytes or SO_LINGER 0 reset
    /// it, as on Linux; otherwise the old process sees the pair close and sends the FIN.
    pub(crate) fn relayed_close(&mut self, r: Relayed, linger0: bool) {
        self.relay.by_id.remove(&r.relay);
        if !r.dead {
            let reset = linger0 || int_ioctl(r.fd.as_raw_fd(), libc::FIONREAD) > 0;
            self.notice(r.relay, if reset { NOTICE_ABORT } else { NOTICE_CLOSED });
        }
    }

    /// Makes the relay epoll (kept if there is one: a process that was an upgrade's new one and
    /// is now the old one may still hold relayed connections) and, in a new process, registers
    /// the frame channel in it, which it then stands for.
    pub(crate) fn relay_epoll_with(&mut self, chan: Option<RawFd>) -> std::io::Result<()> {
        if self.relay.ep.is_none() {
            self.relay.ep = Some(netkernel_ring::sys::epoll()?);
        }
        if let (Some(c), Some(ep)) = (chan, &self.relay.ep) {
            watch(ep.as_raw_fd(), c, CHAN_KEY, false)?;
        }
        Ok(())
    }
}
