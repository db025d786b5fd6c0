//! The user NSM's network stack: smoltcp in the NSM process, over one TAP device or AF_PACKET
//! socket (the Machnet least-common-denominator model: one queue, no offloads), serving its
//! guests' sockets through ServiceLib's `Stack` trait ([`seam::Stack`]).
//!
//! # Shape
//!
//! - Two smoltcp interfaces: the wire (Ethernet over the NSM's fd; the configured address,
//!   optional IPv6 address, default routes via the gateways) and an in-memory loopback for
//!   127.0.0.0/8, ::1 and the stack's own addresses, so traffic between two of its sockets never
//!   reaches the device.
//! - Each interface keeps its sockets in 1024 socket sets, a TCP connection's set chosen by a
//!   hash of its 4-tuple (`shard.rs`): smoltcp walks a whole set per packet and per egress pass,
//!   so a single set of 20,000 sockets cost 1.3 ms per one-segment poll; sharded, about 12 us
//!   (1.4 us with 100 connections; release build, loopback, `scale_10k_connections`). A poll
//!   visits only the sets marked due and those whose deadline (a heap) has passed.
//! - Every received packet is peeked at before smoltcp sees it (`frame.rs`): a hashed 4-tuple
//!   index (`table.rs`) names the socket it concerns, which alone is marked dirty; a SYN for a
//!   listener gets a fresh smoltcp socket listening on its address if the accept queue
//!   (backlog + 1) has room, else it is dropped as Linux drops it; RSTs are noted so a closed
//!   connection's errno is Linux's (ECONNREFUSED, ECONNRESET, EPIPE, ETIMEDOUT). A poll runs
//!   only the socket sets that have packets, guest operations or due timers, and recomputes
//!   readiness only for dirty sockets (and, when a set's deadline passes, its sockets that
//!   timers can change).
//! - Handles close their socket when dropped (a graveyard the next poll empties).
//!
//! # Compared with Linux
//!
//! `tests/parity.rs` runs the same TCP (IPv4, IPv6) and UDP scenarios on Linux's loopback
//! and on a UserStack and requires identical transcripts of results, errnos and poll masks:
//! fresh, refused, connecting, established, half-closed, reset (peer close then send,
//! SO_LINGER 0, reset before accept), data before accept, SHUT_RD/SHUT_WR, options and their
//! read-back (buffer doubling and clamping, keepalive values), bind conflicts, SO_REUSEADDR
//! with listeners and TIME_WAIT, UDP autobind, truncation, connected UDP and ICMP port
//! unreachable.
//!
//! Known differences, each answering with Linux's errno for something unsupported:
//! - No urgent data: send(MSG_OOB) is EOPNOTSUPP (recv(MSG_OOB) is EINVAL, as Linux without
//!   urgent data); SIOCATMARK is always 0.
//! - SO_RCVBUF/SO_SNDBUF, SO_RCVTIMEO/SO_SNDTIMEO read back as a scratch kernel socket of the
//!   NSM's says (Linux's clamps to rmem_max/wmem_max, jiffy rounding, EDOM), but smoltcp sizes
//!   a socket's buffers when its connection starts: set after connect/accept they apply to
//!   later connections only (a peer that never reads then holds more than on Linux). Defaults
//!   are 256 KiB each way on the wire (window scaling on) and a 128 KiB receive buffer on
//!   loopback; Linux autotunes instead.
//! - TCP_INFO and `tcp_stats` carry the state, queue sizes and RTT, cwnd and retransmissions
//!   measured passively from the segments on the wire (`meter.rs`): smoltcp keeps its own
//!   private. The cwnd is the largest flight seen over the last RTT (which the receive window
//!   or the application may have limited). No RTO, ssthresh or pacing figures; TCP_MAXSEG
//!   reads 536.
//! - One congestion control per NSM (reno, cubic or none); TCP_CONGESTION can only name it.
//! - Keepalive: smoltcp has one interval and no probe count: probes every
//!   min(TCP_KEEPIDLE, TCP_KEEPINTVL) of idleness, gives up after TCP_KEEPIDLE + TCP_KEEPCNT x
//!   TCP_KEEPINTVL of silence.
//! - TIME_WAIT lasts smoltcp's 10 s, not 60 s.
//! - smoltcp retransmits for ever; the stack sets its timeout while data or a FIN is
//!   outstanding (tcp_retries2's 924.6 s, then ETIMEDOUT), for an orphan in FIN-WAIT-2
//!   (tcp_fin_timeout, 60 s), for a handshake (127 s active, 63 s passive). The timeout counts
//!   silence since the last segment received, not retransmissions.
//! - IPv6 datagrams over the wire are not fragmented (EMSGSIZE past 1452 bytes); IPv4 ones
//!   are. No IPv6 extension headers are looked into.
//! - Options not listed in `opts.rs` are ENOPROTOOPT (IP_TOS on TCP sockets, SO_REUSEPORT,
//!   multicast, SO_BINDTODEVICE...). SOCK_RAW is EPROTONOSUPPORT.
//! - IP_TOS/IPV6_TCLASS on UDP sockets and sendmsg's IP_TOS, IP_TTL, IPV6_TCLASS and
//!   IPV6_HOPLIMIT are applied by rewriting the datagram's IP header as it leaves (smoltcp has
//!   no TOS knob); a marked IPv6 datagram is sent at once, with whatever else its socket set
//!   had queued (smoltcp passes IPv6 packets no id to tell them apart). IPv4 fragments after
//!   the first keep smoltcp's header.
//! - Ancillary data on receive: SO_TIMESTAMP/SO_TIMESTAMPNS, stamped with the time of the
//!   receive (smoltcp keeps no arrival times); for datagrams IP_PKTINFO, IP_RECVTTL,
//!   IP_RECVTOS, IPV6_RECVPKTINFO, IPV6_RECVHOPLIMIT and IPV6_RECVTCLASS, from notes taken of
//!   each datagram's IP header on arrival (PKTINFO's ifindex: 1 on loopback, 2 on the wire;
//!   spec_dst is the destination; an IPv4 datagram on an AF_INET6 socket gets none). TCP
//!   sockets store IP_RECVTOS/IP_PKTINFO, for which Linux gives no cmsg either; TCP's sendmsg
//!   ignores control messages.
//! - Datagrams (and segments) that different sockets queue between two polls leave in socket
//!   order, not in the order the sends happened; Linux sends within the call. Each socket's
//!   own order is kept.
//! - smoltcp sends one neighbour request per second per interface: the first contact with a
//!   second neighbour (the IPv6 gateway right after the IPv4 one) can wait a second.
//! - A veth peer with tx offload on hands over frames with partial checksums (completed here,
//!   via PACKET_AUXDATA) and, with TSO, 64 KiB segments (taken as they come).

pub mod config;
pub mod device;
mod frame;
mod meter;
mod opts;
mod peer;
mod relay;
pub mod seam;
mod shard;
pub mod sockaddr;
mod stack;
mod table;
mod tcp;
mod udp;

#[cfg(test)]
mod tests;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

pub use config::{ConfigError, Link, UserConfig};
pub use device::{open_link, open_packet, open_tap};
pub use stack::{Handle, UserStack};

use seam::{Errno, Ready, Received, Stack, TcpStats};
use stack::Proto;

impl Stack for UserStack {
    type Handle = Handle;

    fn kind(&self) -> &'static str {
        "user"
    }

    fn congestion(&self) -> String {
        self.congestion_name().to_owned()
    }

    fn socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<Handle, Errno> {
        self.do_socket(domain, ty, protocol)
    }

    fn bind(&mut self, s: &Handle, addr: &[u8]) -> Result<(), Errno> {
        self.do_bind(s.id, addr)
    }

    fn listen(&mut self, s: &Handle, backlog: i32) -> Result<(), Errno> {
        self.do_listen(s.id, backlog)
    }

    fn accept(&mut self, s: &Handle, addr: &mut [u8]) -> Result<(Handle, usize), Errno> {
        self.do_accept(s.id, addr)
    }

    fn connect(&mut self, s: &Handle, addr: &[u8]) -> Result<(), Errno> {
        self.do_connect(s.id, addr)
    }

    fn send(&mut self, s: &Handle, data: &[u8], flags: i32, to: &[u8]) -> Result<usize, Errno> {
        match self.sock(s.id)?.proto {
            Proto::Tcp => self.tcp_send(s.id, data, flags),
            Proto::Udp => self.udp_send(s.id, data, flags, to, device::Mark::default()),
        }
    }

    /// A datagram's control messages set its TOS and TTL; a stream socket ignores them, as
    /// Linux's tcp_sendmsg does all but SCM_* ones.
    fn sendmsg(&mut self, s: &Handle, data: &[u8], flags: i32, to: &[u8], control: &[u8]) -> Result<usize, Errno> {
        let sock = self.sock(s.id)?;
        match sock.proto {
            Proto::Tcp => self.tcp_send(s.id, data, flags),
            Proto::Udp => {
                let mark = opts::parse_send_cmsgs(sock.family, control)?;
                self.udp_send(s.id, data, flags, to, mark)
            }
        }
    }

    fn recv(&mut self, s: &Handle, buf: &mut [u8], flags: i32, from: &mut [u8]) -> Result<(usize, usize), Errno> {
        match self.sock(s.id)?.proto {
            // A stream socket reports no source address (msg_namelen 0).
            Proto::Tcp => self.tcp_recv(s.id, buf, flags).map(|n| (n, 0)),
            Proto::Udp => self.udp_recv(s.id, buf, flags, from),
        }
    }

    /// Ancillary data: the receive timestamp (SO_TIMESTAMP, SO_TIMESTAMPNS) and, for a
    /// datagram, the IP header's cmsgs the socket asked for; msg_flags carries MSG_TRUNC for a datagram cut short and
    /// MSG_CTRUNC for a cmsg that did not fit, as Linux's does.
    fn recvmsg(
        &mut self,
        s: &Handle,
        buf: &mut [u8],
        flags: i32,
        from: &mut [u8],
        control: &mut [u8],
    ) -> Result<Received, Errno> {
        match self.sock(s.id)?.proto {
            Proto::Tcp => {
                let (len, from_len) = self.recv(s, buf, flags, from)?;
                // tcp_recvmsg stamps only a receive that copied bytes.
                let (control_len, cf) =
                    if len > 0 && flags & libc::MSG_TRUNC == 0 { self.put_stamp(s.id, control) } else { (0, 0) };
                Ok(Received { len, from_len, control_len, flags: cf })
            }
            Proto::Udp => {
                let (full, from_len) = self.udp_recv(s.id, buf, flags | libc::MSG_TRUNC, from)?;
                let cut = full > buf.len();
                let len = if flags & libc::MSG_TRUNC != 0 { full } else { full.min(buf.len()) };
                let (control_len, cf) = self.put_dgram_cmsgs(s.id, control);
                Ok(Received { len, from_len, control_len, flags: cf | if cut { libc::MSG_TRUNC } else { 0 } })
            }
        }
    }

    fn shutdown(&mut self, s: &Handle, how: i32) -> Result<(), Errno> {
        self.do_shutdown(s.id, how)
    }

    fn getsockopt(&mut self, s: &Handle, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno> {
        self.do_getsockopt(s.id, level, name, val)
    }

    fn setsockopt(&mut self, s: &Handle, level: i32, name: i32, val: &[u8]) -> Result<(), Errno> {
        self.do_setsockopt(s.id, level, name, val)
    }

    fn getsockname(&mut self, s: &Handle, addr: &mut [u8]) -> Result<usize, Errno> {
        self.do_getsockname(s.id, addr)
    }

    fn getpeername(&mut self, s: &Handle, addr: &mut [u8]) -> Result<usize, Errno> {
        self.do_getpeername(s.id, addr)
    }

    fn ioctl(&mut self, s: &Handle, request: u64) -> Result<i64, Errno> {
        self.do_ioctl(s.id, request)
    }

    fn poll_mask(&mut self, s: &Handle) -> u32 {
        self.refresh(s.id);
        self.readiness(s.id).0
    }

    fn close(&mut self, s: Handle) {
        // Dropping queues the id for the next poll; closing now lets the FIN go out with it.
        let id = s.id;
        drop(s);
        self.close_now(id);
    }

    fn tcp_stats(&mut self, s: &Handle) -> Option<TcpStats> {
        self.do_tcp_stats(s.id)
    }

    fn watch(&mut self, s: &Handle, key: u64) -> Result<(), Errno> {
        let st = self.sock(s.id)?;
        st.key = Some(key);
        st.reported = None;
        self.dirty.insert(s.id);
        Ok(())
    }

    fn unwatch(&mut self, s: &Handle) {
        if let Ok(st) = self.sock(s.id) {
            st.key = None;
        }
    }

    /// The NSM's namespace has nothing in it: names are resolved through this stack.
    fn system_resolver(&self) -> bool {
        false
    }

    fn is_local(&mut self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(std::net::IpAddr::V6(a)),
            v4 => v4,
        };
        ip.is_loopback() || self.own(ip)
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.rx_fd()
    }

    fn movable(&self, s: &Handle) -> bool {
        self.can_export(s.id)
    }

    fn export(&mut self, s: &Handle) -> Option<seam::Exported> {
        self.export_sock(s.id)
    }

    fn relaying(&self) -> usize {
        self.relay.relaying()
    }

    fn exported(&mut self, handed: bool) {
        self.settle_exports(handed)
    }

    fn import(&mut self, fd: Option<OwnedFd>, desc: Option<&[u8]>, _: bool) -> Result<Handle, Errno> {
        self.import_sock(fd, desc.ok_or(libc::EINVAL)?)
    }

    fn peer_fd(&self) -> Option<BorrowedFd<'_>> {
        UserStack::peer_fd(self)
    }

    fn hand_link(&mut self) -> Result<seam::HandedLink, String> {
        UserStack::hand_link(self)
    }

    fn poll(&mut self, now: Instant, woken: bool, ready: &mut Vec<Ready>) -> Option<Instant> {
        self.run(now, woken, ready)
    }
}
