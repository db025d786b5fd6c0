//! UDP: one smoltcp socket per interface behind each guest socket, addresses checked as
//! udp_sendmsg/udp_recvmsg do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::socket::udp;

use crate::seam::Errno;
use crate::shard::SHARD0;
use crate::sockaddr::{self, Family, Parsed};
use crate::stack::{St, UserStack, EXT, LO};

/// Largest UDP payload over IPv4 and IPv6 (65535 minus the headers).
const MAX_V4: usize = 65507;
const MAX_V6: usize = 65527;
/// Largest IPv6 UDP payload on the wire at MTU 1500: smoltcp does not fragment IPv6.
const MAX_V6_WIRE: usize = 1500 - 40 - 8;

impl UserStack {
    /// Opens the smoltcp sockets of a bound UDP socket on the interfaces its address lives on.
    pub(crate) fn udp_open(&mut self, id: usize) -> Result<(), Errno> {
        let s = self.sock(id)?;
        let Some(b) = s.bound else { return Err(libc::EINVAL) };
        let opts = s.opts.clone();
        let St::Udp(u) = &s.st else { return Err(libc::EINVAL) };
        let have = u.h;
        let on_ext = !b.ip().is_loopback();
        let mut h = have;
        for (ifx, slot) in h.iter_mut().enumerate() {
            if slot.is_some() || (ifx == EXT && !on_ext) {
                continue;
            }
            let mut sk = self.make_udp(&opts);
            // A wildcard-bound AF_INET socket still binds smoltcp to "any address": datagrams
            // of the other family are dropped when read (see udp_recv).
            let ep = if b.ip().is_unspecified() {
                smoltcp::wire::IpListenEndpoint { addr: None, port: b.port() }
            } else {
                smoltcp::wire::IpListenEndpoint { addr: Some(b.ip().into()), port: b.port() }
            };
            sk.bind(ep).map_err(|_| libc::EINVAL)?;
            *slot = Some(self.nets[ifx].add(SHARD0, sk));
        }
        if let St::Udp(u) = &mut self.sock(id)?.st {
            u.h = h;
        }
        Ok(())
    }

    fn udp_dst(&self, family: Family, v6only: bool, a: SocketAddr) -> Result<SocketAddr, Errno> {
        if family == Family::V6 && v6only && sockaddr::unmap(a) != a {
            return Err(libc::ENETUNREACH);
        }
        let mut dst = sockaddr::unmap(a);
        if dst.ip().is_unspecified() {
            dst.set_ip(match dst.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Ok(dst)
    }

    pub(crate) fn udp_connect(&mut self, id: usize, addr: &[u8]) -> Result<(), Errno> {
        let s = self.sock(id)?;
        let (family, v6only) = (s.family, s.opts.v6only);
        let a = match sockaddr::parse(family, addr)? {
            Parsed::Unspec => {
                if let St::Udp(u) = &mut s.st {
                    u.peer = None;
                    u.conn_local = None;
                }
                return Ok(());
            }
            Parsed::Addr(a) => a,
        };
        let dst = self.udp_dst(family, v6only, a)?;
        let (_, src) = self.route(dst.ip())?;
        let b = self.autobind(id)?;
        self.udp_open(id)?;
        if let St::Udp(u) = &mut self.sock(id)?.st {
            u.peer = Some(dst);
            u.conn_local = Some(if b.ip().is_unspecified() { src } else { b.ip() });
        }
        self.dirty.insert(id);
        Ok(())
    }

    /// sendto(2); `mark`: the TOS and TTL a sendmsg's control messages gave this datagram.
    pub(crate) fn udp_send(
        &mut self,
        id: usize,
        data: &[u8],
        flags: i32,
        to: &[u8],
        mark: crate::device::Mark,
    ) -> Result<usize, Errno> {
        self.dirty.insert(id);
        let s = self.sock(id)?;
        let tos = mark.tos.or(s.opts.tos);
        let mark = crate::device::Mark { tos, ttl: mark.ttl };
        if s.error != 0 {
            return Err(std::mem::take(&mut s.error));
        }
        let (family, v6only, broadcast) = (s.family, s.opts.v6only, s.opts.broadcast);
        let St::Udp(u) = &s.st else { return Err(libc::EINVAL) };
        if u.snd_shut {
            return Err(libc::EPIPE);
        }
        if flags & libc::MSG_OOB != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let (peer, conn_local) = (u.peer, u.conn_local);
        // Linux binds an unbound socket before it looks at the destination
        // (inet_send_prepare), so even a send that fails leaves it bound.
        self.autobind(id)?;
        self.udp_open(id)?;
        let dst = if to.is_empty() {
            peer.ok_or(libc::EDESTADDRREQ)?
        } else {
            match sockaddr::parse(family, to)? {
                Parsed::Addr(a) => self.udp_dst(family, v6only, a)?,
                Parsed::Unspec => peer.ok_or(libc::EDESTADDRREQ)?,
            }
        };
        if dst.port() == 0 {
            return Err(libc::EINVAL);
        }
        let max = if dst.is_ipv4() { MAX_V4 } else { MAX_V6 };
        if data.len() > max {
            return Err(libc::EMSGSIZE);
        }
        if let IpAddr::V4(v) = dst.ip() {
            let (IpAddr::V4(me), p) = self.cfg.address else { return Err(libc::EINVAL) };
            let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
            let subnet_bcast = u32::from(me) | !mask;
            if (v.is_broadcast() || u32::from(v) == subnet_bcast) && !broadcast {
                return Err(libc::EACCES);
            }
        }
        let (ifx, src) = self.route(dst.ip())?;
        if ifx == EXT && dst.is_ipv6() && data.len() > MAX_V6_WIRE {
            return Err(libc::EMSGSIZE);
        }
        let b = self.autobind(id)?;
        let src_port = b.port();
        self.udp_open(id)?;
        let src = if !b.ip().is_unspecified() { b.ip() } else { conn_local.filter(|_| to.is_empty()).unwrap_or(src) };
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(libc::EAFNOSUPPORT);
        }
        let St::Udp(u) = &self.sock(id)?.st else { return Err(libc::EINVAL) };
        let Some(h) = u.h[ifx] else { return Err(libc::ENETUNREACH) };
        let marked = mark != crate::device::Mark::default();
        let mut pm = smoltcp::phy::PacketMeta::default();
        if marked && dst.is_ipv4() {
            pm.id = if ifx == EXT { self.ext_dev.marks.add(mark) } else { self.lo_dev.marks.add(mark) };
        }
        let sk = self.nets[ifx].get_mut::<udp::Socket>(h);
        let meta = udp::UdpMetadata { endpoint: dst.into(), local_address: Some(src.into()), meta: pm };
        match sk.send_slice(data, meta) {
            Ok(()) => {
                self.fragmenting |= ifx == EXT && data.len() > 1500 - 28;
                // As for TCP: room this send took and the settling poll gives back is news.
                let free = sk.payload_send_capacity() - sk.send_queue();
                if let Some(rep) = &mut self.sock(id)?.reported {
                    rep.2 = rep.2.min(free);
                }
                if marked && dst.is_ipv6() {
                    self.send_marked_now(ifx, h, src_port, mark);
                }
                Ok(data.len())
            }
            Err(udp::SendError::BufferFull) => Err(libc::EAGAIN),
            Err(udp::SendError::Unaddressable) => Err(libc::EINVAL),
        }
    }

    /// The next datagram this socket accepts, dropping those it must not see (the other
    /// family on an AF_INET socket, strangers on a connected one). Returns (interface, size).
    fn udp_next(&mut self, id: usize) -> Option<(usize, usize)> {
        let s = self.socks.get(id)?;
        let St::Udp(u) = &s.st else { return None };
        let (family, v6only, peer, hs) = (s.family, s.opts.v6only, u.peer, u.h);
        for ifx in [LO, EXT] {
            let Some(h) = hs[ifx] else { continue };
            let sk = self.nets[ifx].get_mut::<udp::Socket>(h);
            while let Ok((data, meta)) = sk.peek() {
                let src = SocketAddr::new(meta.endpoint.addr.into(), meta.endpoint.port);
                let wrong_family = match family {
                    Family::V4 => src.is_ipv6(),
                    Family::V6 => v6only && src.is_ipv4(),
                };
                if wrong_family || peer.is_some_and(|p| p != src) {
                    let _ = sk.recv();
                    continue;
                }
                return Some((ifx, data.len()));
            }
        }
        None
    }

    pub(crate) fn udp_recv(
        &mut self,
        id: usize,
        buf: &mut [u8],
        flags: i32,
        from: &mut [u8],
    ) -> Result<(usize, usize), Errno> {
        self.dirty.insert(id);
        if flags & libc::MSG_OOB != 0 {
            return Err(libc::EINVAL);
        }
        let family = self.sock(id)?.family;
        if let Some((ifx, _)) = self.udp_next(id) {
            let St::Udp(u) = &self.sock(id)?.st else { return Err(libc::EINVAL) };
            let h = u.h[ifx].expect("udp_next found a datagram there");
            let sk = self.nets[ifx].get_mut::<udp::Socket>(h);
            let (data, meta) = if flags & libc::MSG_PEEK != 0 {
                let (d, m) = sk.peek().map_err(|_| libc::EAGAIN)?;
                (d, *m)
            } else {
                sk.recv().map_err(|_| libc::EAGAIN)?
            };
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            let full = data.len();
            self.last_rx = self.rx_meta_of(meta.meta.id, flags & libc::MSG_PEEK != 0);
            let src = SocketAddr::new(meta.endpoint.addr.into(), meta.endpoint.port);
            let from_len = if from.is_empty() { 0 } else { sockaddr::write(family, src, from) };
            return Ok((if flags & libc::MSG_TRUNC != 0 { full } else { n }, from_len));
        }
        let s = self.sock(id)?;
        if s.error != 0 {
            return Err(std::mem::take(&mut s.error));
        }
        // Even after SHUT_RD: a non-blocking datagram receive with nothing queued is EAGAIN
        // on Linux (only a blocking one returns 0).
        Err(libc::EAGAIN)
    }

    /// Drops the unwanted datagrams at the head of the socket's queues.
    pub(crate) fn udp_purge(&mut self, id: usize) {
        let _ = self.udp_next(id);
    }

    /// FIONREAD on a datagram socket: the size of the next datagram.
    pub(crate) fn udp_next_len(&mut self, id: usize) -> usize {
        self.udp_next(id).map_or(0, |(_, n)| n)
    }

    /// TIOCOUTQ on a datagram socket: bytes not yet sent.
    pub(crate) fn udp_outq(&self, id: usize) -> usize {
        let Some(St::Udp(u)) = self.socks.get(id).map(|s| &s.st) else { return 0 };
        u.h.iter().enumerate().filter_map(|(ifx, h)| h.map(|h| self.nets[ifx].get::<udp::Socket>(h).send_queue())).sum()
    }
}
