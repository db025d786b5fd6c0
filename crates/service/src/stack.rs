//! The one trait ServiceLib calls a network stack through: the seam between NetKernel's
//! plumbing (regions, validation, policy, telemetry) and whatever moves the packets.

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

/// A Linux errno value (positive).
pub type Errno = i32;

/// What a recvmsg returned: bytes, source address length, msg_controllen and msg_flags.
pub struct Received {
    pub len: usize,
    pub from_len: usize,
    pub control_len: usize,
    pub flags: i32,
}

/// A socket's readiness changed: the key ServiceLib gave it in [`Stack::watch`] and the events
/// (poll(2)/epoll bits: POLLIN, POLLOUT, POLLPRI, POLLRDHUP, POLLHUP, POLLERR) that became
/// true. Edge semantics: a socket is reported again only after something new happened on it
/// (bytes arrived, space freed, a connection completed or broke), as with EPOLLET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub key: u64,
    pub events: u32,
}

/// A TCP connection's state as the stack sees it, for telemetry (`ctl conns`, /metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Linux's TCP state number (TCP_ESTABLISHED = 1 ... TCP_CLOSING = 11).
    pub state: u8,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    /// Congestion window, segments.
    pub cwnd: u32,
    /// Segments retransmitted over the connection's life.
    pub retrans: u32,
    /// The stack's estimate of the delivery rate, bytes per second (0: none).
    pub delivery_rate: u64,
}

/// A network stack an NSM runs: the kernel's (sockets are fds in the NSM's namespace) or one in
/// the NSM process (sockets are entries in its own table). All sockets are non-blocking:
/// blocking is the guest's business. Return values and errors must be what Linux returns for
/// the same call, since guests hand them unchanged to applications.
///
/// The driver sleeps on [`wait_fd`](Stack::wait_fd) and the deadline [`poll`](Stack::poll)
/// returns; after every round of requests and whenever the fd is readable it calls `poll`,
/// which reports readiness changes of watched sockets.
/// A user stack's link handed to a successor process (`Stack::hand_link`).
pub struct HandedLink {
    /// The wire fd (a copy) and the successor's end of the frame channel.
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// (protocol, port)s the old process's sockets hold.
    pub ports: Vec<(u8, u16)>,
}

/// How a socket travels to another NSM process (`Stack::export`).
#[derive(Debug, Default)]
pub struct Exported {
    /// An fd to pass (the stack keeps owning it until `exported`).
    pub fd: Option<RawFd>,
    /// What the other stack needs besides.
    pub desc: Option<Vec<u8>>,
}

pub trait Stack {
    /// A socket of this stack. Dropping it closes the socket (a stack that needs its own state
    /// to close one collects dropped handles on the next `poll`).
    type Handle;

    /// Short name for telemetry ("kernel", "user").
    fn kind(&self) -> &'static str;
    /// The congestion control new TCP sockets use.
    fn congestion(&self) -> String;
    /// New TCP sockets use `cc` from now on (sockets that exist keep theirs).
    fn set_congestion(&mut self, cc: &str) -> Result<(), String> {
        Err(format!("the {} stack's congestion control is set when its NSM starts, not {cc:?} now", self.kind()))
    }

    fn socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<Self::Handle, Errno>;
    fn bind(&mut self, s: &Self::Handle, addr: &[u8]) -> Result<(), Errno>;
    fn listen(&mut self, s: &Self::Handle, backlog: i32) -> Result<(), Errno>;
    /// Accepts one connection; fills `addr` with the peer and returns its length.
    fn accept(&mut self, s: &Self::Handle, addr: &mut [u8]) -> Result<(Self::Handle, usize), Errno>;
    fn connect(&mut self, s: &Self::Handle, addr: &[u8]) -> Result<(), Errno>;
    fn send(&mut self, s: &Self::Handle, data: &[u8], flags: i32, to: &[u8]) -> Result<usize, Errno>;
    /// Returns bytes received and the length of the source address written to `from`.
    fn recv(&mut self, s: &Self::Handle, buf: &mut [u8], flags: i32, from: &mut [u8]) -> Result<(usize, usize), Errno>;
    /// A receive with ancillary data into `control` (recvmsg(2)); a stack without any returns
    /// none.
    fn recvmsg(
        &mut self,
        s: &Self::Handle,
        buf: &mut [u8],
        flags: i32,
        from: &mut [u8],
        control: &mut [u8],
    ) -> Result<Received, Errno> {
        let _ = control;
        let (len, from_len) = self.recv(s, buf, flags, from)?;
        Ok(Received { len, from_len, control_len: 0, flags: 0 })
    }
    /// A send with control messages (sendmsg(2)); a stack that takes none ignores them.
    fn sendmsg(
        &mut self,
        s: &Self::Handle,
        data: &[u8],
        flags: i32,
        to: &[u8],
        control: &[u8],
    ) -> Result<usize, Errno> {
        let _ = control;
        self.send(s, data, flags, to)
    }
    fn shutdown(&mut self, s: &Self::Handle, how: i32) -> Result<(), Errno>;
    /// Returns the option's length.
    fn getsockopt(&mut self, s: &Self::Handle, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno>;
    fn setsockopt(&mut self, s: &Self::Handle, level: i32, name: i32, val: &[u8]) -> Result<(), Errno>;
    fn getsockname(&mut self, s: &Self::Handle, addr: &mut [u8]) -> Result<usize, Errno>;
    fn getpeername(&mut self, s: &Self::Handle, addr: &mut [u8]) -> Result<usize, Errno>;
    /// FIONREAD, TIOCOUTQ and SIOCATMARK; others ENOTTY.
    fn ioctl(&mut self, s: &Self::Handle, request: u64) -> Result<i64, Errno>;
    /// Current poll(2) mask of the socket.
    fn poll_mask(&mut self, s: &Self::Handle) -> u32;
    /// Closes a socket the guest closed. A stack may finish the close after returning (SO_LINGER
    /// with a timeout blocks the kernel's close; the driver must not).
    fn close(&mut self, s: Self::Handle) {
        drop(s);
    }
    /// Whether the NSM's system resolver (getaddrinfo in its namespace) reaches the network this
    /// stack serves; if not, ServiceLib resolves names with DNS queries through the stack.
    fn system_resolver(&self) -> bool;
    /// Whether `ip` (IPv4 also as v4-mapped IPv6) is one of the stack's own addresses or
    /// loopback: where a connection to a wildcard listener of this stack stays.
    fn is_local(&mut self, ip: std::net::IpAddr) -> bool;
    /// TCP state, RTT, cwnd, retransmits and delivery rate of a stream socket (None: not TCP).
    fn tcp_stats(&mut self, s: &Self::Handle) -> Option<TcpStats>;

    /// Whether socket `s` can be served from another NSM process now ([`export`](Stack::export)
    /// would carry it): a user stack's handshake in progress cannot, for one.
    fn movable(&self, s: &Self::Handle) -> bool {
        let _ = s;
        false
    }
    /// Readies socket `s` to be served from another NSM process (`ctl upgrade`, `ctl move`, an
    /// executor's handover): the fd that carries it (SCM_RIGHTS), a description the other stack
    /// makes it anew from, or both. None: it cannot leave (see `movable`). What this prepares
    /// stays undone until [`exported`](Stack::exported) says how the handover ended.
    fn export(&mut self, s: &Self::Handle) -> Option<Exported> {
        let _ = s;
        None
    }
    /// The handover the last `export`s were for is over. `handed`: another process serves
    /// those sockets now, and their handles, dropped next, must not close what it serves
    /// through; else they stay here as they were.
    fn exported(&mut self, handed: bool) {
        let _ = handed;
    }
    /// Connections this process serves for another process of its NSM (a user stack's old
    /// process relaying its connections to the new one's guests): it must outlive them.
    fn relaying(&self) -> usize {
        0
    }
    /// A socket another NSM process exported: its fd (received by SCM_RIGHTS), its description,
    /// or both. With `adopt`, a TCP socket takes this stack's congestion control (a move between
    /// NSMs; an upgrade keeps the same one).
    fn import(&mut self, fd: Option<OwnedFd>, desc: Option<&[u8]>, adopt: bool) -> Result<Self::Handle, Errno> {
        let _ = (fd, desc, adopt);
        Err(libc::EOPNOTSUPP)
    }

    /// Reports readiness changes of `s` under `key` from now on (a second call changes the key).
    fn watch(&mut self, s: &Self::Handle, key: u64) -> Result<(), Errno>;
    /// Stops reporting `s` (a co-located connection's stack socket only holds its port).
    fn unwatch(&mut self, s: &Self::Handle);
    /// The fd the driver sleeps on: readable when the stack has something to do (the kernel
    /// stack's epoll fd; a userspace stack's TAP or packet socket).
    fn wait_fd(&self) -> BorrowedFd<'_>;
    /// A second fd the driver sleeps on, if any (a user stack's channel to the old process
    /// of an upgrade). The driver checks both after every poll: they may change.
    fn peer_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Gives this stack's link to a successor process that will read it, the old process
    /// keeping its connections (a user stack's upgrade; the kernel stack hands sockets over
    /// instead, `export`): the fds to send it and the (protocol, port)s in use.
    fn hand_link(&mut self) -> Result<HandedLink, String> {
        Err(format!("a {} stack hands its sockets over, not its link", self.kind()))
    }
    /// Advances the stack to `now`: moves packets, runs timers and appends to `ready` the watched
    /// sockets whose readiness changed. `woken`: the wait fd was readable. Returns when the stack
    /// next needs a `poll` though nothing arrives (None: only when the wait fd is readable).
    fn poll(&mut self, now: Instant, woken: bool, ready: &mut Vec<Ready>) -> Option<Instant>;
}

/// For a stack's `recvmsg`: writes one control message (level, type, payload) at the start of
/// `space`, as the kernel's put_cmsg does: truncated to the space with MSG_CTRUNC, nothing if not
/// even a header fits. Returns the bytes used (msg_controllen) and the flags to add.
pub fn put_cmsg(space: &mut [u8], level: i32, ty: i32, data: &[u8]) -> (usize, i32) {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    if space.len() < hdr {
        return (0, libc::MSG_CTRUNC);
    }
    // SAFETY: CMSG_LEN and CMSG_SPACE are arithmetic.
    let (full, spaced) =
        unsafe { (libc::CMSG_LEN(data.len() as u32) as usize, libc::CMSG_SPACE(data.len() as u32) as usize) };
    let len = full.min(space.len());
    let c = libc::cmsghdr { cmsg_len: len as _, cmsg_level: level, cmsg_type: ty };
    // SAFETY: space has room for a cmsghdr (checked above); control buffers give no alignment.
    unsafe { std::ptr::write_unaligned(space.as_mut_ptr().cast::<libc::cmsghdr>(), c) };
    space[hdr..len].copy_from_slice(&data[..len - hdr]);
    let flags = if len < full { libc::MSG_CTRUNC } else { 0 };
    (spaced.min(space.len()), flags)
}
