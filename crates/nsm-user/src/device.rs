//! The two devices the stack's interfaces run on: the NSM's one fd to the wire (a TAP device or
//! an AF_PACKET socket) and an in-memory loopback for 127.0.0.1, ::1 and the stack's own
//! addresses. Both queue received frames where the stack can look at their headers before
//! smoltcp does (see `frame.rs`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::config::Link;

/// Largest Ethernet frame without FCS at a 1500-byte MTU.
pub const ETH_FRAME: usize = 1514;
/// The loopback device's IP MTU, as Linux's lo (65536).
pub const LO_MTU: usize = 65535;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const PACKET_AUXDATA: libc::c_int = 8;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// struct ifreq with the ifr_flags member: the only shape TUNSETIFF reads.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it if needed) the TAP device `name` in the caller's network namespace,
/// non-blocking and close-on-exec, frames without the packet-information header.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("TAP name {name:?}: 1 to 15 bytes")));
    }
    // SAFETY: the path is a NUL-terminated literal; open has no other preconditions.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReqFlags has its size (40 bytes) and
    // layout for the name and flags members, and lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Opens an AF_PACKET socket on interface `name` (a veth end the NSM holds in a namespace of
/// its own): every frame in and out, non-blocking and close-on-exec, without our own outgoing
/// frames echoed back.
pub fn open_packet(name: &str) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: cname is a live NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket has no memory preconditions.
    let fd = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(proto))
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a live sockaddr_ll and the length passed is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let one: libc::c_int = 1;
    // PACKET_IGNORE_OUTGOING (Linux 4.20): best effort, read_frames filters them anyway.
    // SAFETY: one is a live c_int and the length passed is its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// The hardware address of the interface an AF_PACKET socket is bound to, if `fd` is one: the
/// stack then uses the veth's own MAC, so the kernel on the other end and the veth agree.
pub fn packet_mac(fd: BorrowedFd<'_>) -> Option<[u8; 6]> {
    // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: sll and len are live and writable; len holds sll's size.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&mut sll as *mut libc::sockaddr_ll).cast(), &mut len) };
    if r < 0 || i32::from(sll.sll_family) != libc::AF_PACKET || sll.sll_halen != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&sll.sll_addr[..6]);
    // Only a unicast address can be an interface's.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// Opens the NSM's link: a TAP device `name`, or an AF_PACKET socket on interface `name`.
pub fn open_link(link: Link, name: &str) -> io::Result<OwnedFd> {
    match link {
        Link::Tap => open_tap(name),
        Link::Packet => open_packet(name),
    }
}

/// What reading the wire fd found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    pub frames: usize,
    /// Stopped at the per-poll cap with frames possibly left: poll again soon.
    pub more: bool,
}

/// The wire: frames in through `read_frames` (into `rx`, where the stack peeks at them), out
/// through smoltcp's TxToken straight to the fd.
pub struct FdDevice {
    fd: OwnedFd,
    link: Link,
    pub rx: VecDeque<Vec<u8>>,
    scratch: Vec<u8>,
    /// Frames the fd refused (EAGAIN/ENOBUFS): TCP retransmits them, UDP loses them as on a
    /// full qdisc.
    pub tx_dropped: u64,
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Headers of the TCP segments sent since the stack last looked, for its meters.
    pub sent: Vec<crate::frame::Peek>,
    pub marks: Marks,
}

/// Makes `fd` non-blocking: the stack sleeps in the driver's epoll, never in a read.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a live fd; no memory is passed.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl FdDevice {
    pub fn new(fd: OwnedFd, link: Link) -> io::Result<FdDevice> {
        set_nonblocking(fd.as_fd())?;
        if link == Link::Packet {
            // Ask which received frames a veth peer left with a partial checksum (its tx
            // offload): the stack completes those. Not a packet socket (a test's socketpair):
            // nothing to ask.
            let one: libc::c_int = 1;
            // SAFETY: one is a live c_int and the length passed is its size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    PACKET_AUXDATA,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok(FdDevice {
            fd,
            link,
            rx: VecDeque::new(),
            // Room for a 64 KiB GSO frame from a veth peer with TSO on, as well as for MTU frames.
            scratch: vec![0; 128 * 1024],
            tx_dropped: 0,
            tx_frames: 0,
            rx_frames: 0,
            sent: Vec::new(),
            marks: Marks::default(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads up to `max` frames without blocking.
    pub fn read_frames(&mut self, max: usize) -> io::Result<ReadOutcome> {
        let mut out = ReadOutcome::default();
        while out.frames < max {
            let n = match self.link {
                // SAFETY: scratch is a live, writable buffer of the length passed.
                Link::Tap => unsafe {
                    libc::read(self.fd.as_raw_fd(), self.scratch.as_mut_ptr().cast(), self.scratch.len())
                },
                Link::Packet => {
                    let (n, outgoing, partial) = self.recv_packet();
                    // A packet socket also sees the frames we sent: they are not for us.
                    if outgoing {
                        continue;
                    }
                    if n > 0 && partial {
                        crate::frame::complete_checksum(&mut self.scratch[..n as usize]);
                    }
                    n
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(out),
                    Some(libc::EINTR) => continue,
                    // The peer of a test socketpair went away, or the link is down: nothing to read.
                    Some(libc::ENETDOWN) | Some(libc::ECONNRESET) => return Ok(out),
                    _ => return Err(e),
                }
            }
            if n == 0 {
                // EOF on a socketpair whose other end closed.
                return Ok(out);
            }
            self.rx.push_back(self.scratch[..n as usize].to_vec());
            self.rx_frames += 1;
            out.frames += 1;
        }
        out.more = true;
        Ok(out)
    }

    /// One recvmsg on a packet socket: (length or -1, our own outgoing frame, checksum left
    /// to offload).
    fn recv_packet(&mut self) -> (isize, bool, bool) {
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec { iov_base: self.scratch.as_mut_ptr().cast(), iov_len: self.scratch.len() };
        // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at sll, iov (over scratch) and control, all live and writable for
        // the lengths it states.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return (n, false, false);
        }
        // A frame cut short (MSG_TRUNC) is dropped like our own outgoing ones: half a segment
        // with a recomputed checksum must not look valid.
        let outgoing = (msg.msg_namelen as usize >= std::mem::size_of::<libc::sockaddr_ll>()
            && sll.sll_pkttype == libc::PACKET_OUTGOING)
            || msg.msg_flags & libc::MSG_TRUNC != 0;
        let mut partial = false;
        // SAFETY: msg was filled by recvmsg; the CMSG macros walk its control buffer within
        // msg_controllen, and the auxdata is read unaligned from inside it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    partial = aux.tp_status & TP_STATUS_CSUMNOTREADY != 0;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        (n, outgoing, partial)
    }

    fn send_frame(&mut self, frame: &[u8]) {
        let n = match self.link {
            // SAFETY: frame is a live buffer of the length passed.
            Link::Tap => unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) },
            // SAFETY: as above; MSG_NOSIGNAL keeps a closed socketpair from raising SIGPIPE.
            Link::Packet => unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            },
        };
        if n < 0 {
            self.tx_dropped += 1;
        } else {
            self.tx_frames += 1;
        }
    }
}

/// A frame and the id smoltcp hands back in a datagram's metadata (PacketMeta::id).
pub struct FdRx(pub(crate) Vec<u8>, pub(crate) u32);
/// The device and the id of the datagram being sent (PacketMeta::id; 0: none).
pub struct FdTx<'a>(pub(crate) &'a mut FdDevice, pub(crate) u32);

impl phy::RxToken for FdRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }

    fn meta(&self) -> phy::PacketMeta {
        packet_meta(self.1)
    }
}

impl phy::TxToken for FdTx<'_> {
    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.1 = meta.id;
    }

    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = std::mem::take(&mut self.0.scratch);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let r = f(&mut buf[..len]);
        if let Some(ip) = buf.get_mut(14..len) {
            if let Some(m) = self.0.marks.take(self.1, ip) {
                m.apply(ip);
            }
        }
        self.0.send_frame(&buf[..len]);
        if let Some(p) = crate::frame::peek_ethernet(&buf[..len]).filter(|p| p.proto == crate::frame::TCP) {
            self.0.sent.push(p);
        }
        self.0.scratch = buf;
        r
    }
}

impl phy::Device for FdDevice {
    type RxToken<'a> = FdRx;
    type TxToken<'a> = FdTx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(FdRx, FdTx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((FdRx(f, 0), FdTx(self, 0)))
    }

    fn transmit(&mut self, _: Instant) -> Option<FdTx<'_>> {
        Some(FdTx(self, 0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = ETH_FRAME;
        // No offloads assumed (the least common denominator): compute and verify everything.
        c.checksum = ChecksumCapabilities::default();
        c
    }
}

/// The in-memory loopback: IP packets (no link header). What smoltcp sends goes to `tx`; the
/// stack moves it to `rx` between polls, after peeking at it, so that no packet reaches a socket
/// without the stack knowing which one.
#[derive(Default)]
pub struct LoopDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    pub marks: Marks,
}

/// The TOS (traffic class) and TTL (hop limit) one datagram leaves with: smoltcp has no TOS
/// knob and one hop limit per socket, so its IP header is rewritten on the way out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    pub tos: Option<u8>,
    pub ttl: Option<u8>,
}

impl Mark {
    /// Rewrites the IP header at the start of `ip` (the IPv4 header checksum included; the
    /// UDP checksum's pseudo-header has neither field).
    pub fn apply(&self, ip: &mut [u8]) {
        match ip.first().map(|b| b >> 4) {
            Some(4) if ip.len() >= 20 => {
                if let Some(t) = self.tos {
                    ip[1] = t;
                }
                if let Some(t) = self.ttl {
                    ip[8] = t;
                }
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                if ihl < 20 || ip.len() < ihl {
                    return;
                }
                ip[10] = 0;
                ip[11] = 0;
                let mut sum: u32 = ip[..ihl].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
                while sum > 0xffff {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            }
            Some(6) if ip.len() >= 40 => {
                if let Some(t) = self.tos {
                    ip[0] = 0x60 | (t >> 4);
                    ip[1] = (t << 4) | (ip[1] & 0x0f);
                }
                if let Some(t) = self.ttl {
                    ip[7] = t;
                }
            }
            _ => {}
        }
    }
}

/// Marks of datagrams queued but not yet sent, by PacketMeta::id.
#[derive(Default)]
pub struct Marks {
    map: std::collections::HashMap<u32, Mark>,
    next: u32,
    /// smoltcp hands no packet id to an IPv6 packet's TxToken: a marked IPv6 datagram is sent
    /// at once, with this (source port, mark) set for the frames of that egress pass.
    pub live: Option<(u16, Mark)>,
}

impl Marks {
    /// Files a mark; returns the id to send the datagram with.
    pub fn add(&mut self, m: Mark) -> u32 {
        // Marks of datagrams smoltcp never sent (dropped with their socket) are not kept for
        // ever.
        if self.map.len() >= 1 << 16 {
            self.map.clear();
        }
        self.next = self.next.wrapping_add(1).max(1);
        self.map.insert(self.next, m);
        self.next
    }

    /// The mark of a frame about to leave (`ip`: its IP packet).
    fn take(&mut self, id: u32, ip: &[u8]) -> Option<Mark> {
        if id != 0 {
            return self.map.remove(&id);
        }
        let (port, m) = self.live?;
        let p = crate::frame::peek_ip(ip)?;
        (p.proto == crate::frame::UDP && p.src.port() == port && p.src.is_ipv6()).then_some(m)
    }
}

fn packet_meta(id: u32) -> phy::PacketMeta {
    let mut m = phy::PacketMeta::default();
    m.id = id;
    m
}

pub struct LoopRx(pub(crate) Vec<u8>, pub(crate) u32);
pub struct LoopTx<'a>(pub(crate) &'a mut LoopDevice, pub(crate) u32);

impl phy::RxToken for LoopRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }

    fn meta(&self) -> phy::PacketMeta {
        packet_meta(self.1)
    }
}

impl phy::TxToken for LoopTx<'_> {
    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.1 = meta.id;
    }

    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        if let Some(m) = self.0.marks.take(self.1, &buf) {
            m.apply(&mut buf);
        }
        self.0.tx.push_back(buf);
        r
    }
}

impl phy::Device for LoopDevice {
    type RxToken<'a> = LoopRx;
    type TxToken<'a> = LoopTx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(LoopRx, LoopTx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((LoopRx(f, 0), LoopTx(self, 0)))
    }

    fn transmit(&mut self, _: Instant) -> Option<LoopTx<'_>> {
        Some(LoopTx(self, 0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = LO_MTU;
        // Nothing between two sockets of this process can corrupt a packet; Linux's lo skips
        // checksums the same way (CHECKSUM_UNNECESSARY).
        c.checksum = ChecksumCapabilities::ignored();
        c
    }
}
