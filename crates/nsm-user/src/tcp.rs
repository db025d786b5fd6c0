//! socket/bind/listen/accept/connect and TCP's send/recv/shutdown, with Linux's errnos for
//! each situation (inet_bind, inet_listen, inet_stream_connect, tcp_sendmsg, tcp_recvmsg,
//! inet_shutdown).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::socket::tcp;

use crate::frame;
use crate::seam::Errno;
use crate::shard::shard_of;
use crate::sockaddr::{self, Family, Parsed};
use crate::stack::{Conn, Handle, Opts, Proto, Sock, St, UdpState, UserStack, EXT};

/// Linux's net.core.somaxconn default.
const SOMAXCONN: usize = 4096;
/// How long a SYN is retried before connect gives ETIMEDOUT (tcp_syn_retries = 6: 127 s).
const SYN_TIMEOUT_S: u64 = 127;

const MSG_OOB: i32 = libc::MSG_OOB;
const MSG_PEEK: i32 = libc::MSG_PEEK;
const MSG_TRUNC: i32 = libc::MSG_TRUNC;

pub(crate) fn ep(e: smoltcp::wire::IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

/// Which address families a socket bound to `ip` covers.
fn covers(fam: Family, v6only: bool, ip: IpAddr) -> (bool, bool) {
    if ip.is_unspecified() {
        match fam {
            Family::V4 => (true, false),
            Family::V6 => (!v6only, true),
        }
    } else {
        (ip.is_ipv4(), ip.is_ipv6())
    }
}

fn overlap(a: (Family, bool, IpAddr), b: (Family, bool, IpAddr)) -> bool {
    let (a4, a6) = covers(a.0, a.1, a.2);
    let (b4, b6) = covers(b.0, b.1, b.2);
    match (a.2.is_unspecified(), b.2.is_unspecified()) {
        (true, true) => (a4 && b4) || (a6 && b6),
        (true, false) => (b.2.is_ipv4() && a4) || (b.2.is_ipv6() && a6),
        (false, true) => (a.2.is_ipv4() && b4) || (a.2.is_ipv6() && b6),
        (false, false) => a.2 == b.2,
    }
}

impl UserStack {
    pub(crate) fn do_socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<Handle, Errno> {
        let family = match domain {
            libc::AF_INET => Family::V4,
            libc::AF_INET6 => Family::V6,
            _ => return Err(libc::EAFNOSUPPORT),
        };
        let proto = match (ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC), protocol) {
            (libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => Proto::Tcp,
            (libc::SOCK_DGRAM, 0 | libc::IPPROTO_UDP) => Proto::Udp,
            (libc::SOCK_STREAM | libc::SOCK_DGRAM, _) => return Err(libc::EPROTONOSUPPORT),
            // SOCK_RAW needs CAP_NET_RAW and a raw socket layer the user stack does not have;
            // SOCK_SEQPACKET is SCTP's: Linux without SCTP says EPROTONOSUPPORT too.
            (libc::SOCK_RAW, _) => return Err(libc::EPROTONOSUPPORT),
            (libc::SOCK_SEQPACKET, _) => return Err(libc::EPROTONOSUPPORT),
            _ => return Err(libc::EINVAL),
        };
        let st = match proto {
            Proto::Tcp => St::Idle,
            Proto::Udp => {
                St::Udp(UdpState { h: [None, None], peer: None, conn_local: None, rcv_shut: false, snd_shut: false })
            }
        };
        Ok(self.new_handle(Sock {
            family,
            proto,
            opts: Opts::default(),
            bound: None,
            st,
            error: 0,
            key: None,
            reported: None,
            arrived: false,
            orphan: false,
            conn_port: false,
        }))
    }

    /// Whether binding `id` to ip:port would clash with another socket (inet_csk_bind_conflict).
    fn conflicts(&self, id: usize, ip: IpAddr, port: u16, listening: bool) -> bool {
        let Some(me) = self.socks.get(id) else { return true };
        for &o in self.index.on_port(me.proto.num(), port) {
            if o == id {
                continue;
            }
            let Some(other) = self.socks.get(o) else { continue };
            let Some(ob) = other.bound else { continue };
            if !overlap((me.family, me.opts.v6only, ip), (other.family, other.opts.v6only, ob.ip())) {
                continue;
            }
            let other_listens = matches!(other.st, St::Listen { .. });
            if listening {
                // Bind already settled sharing; at listen only another listener is in the way
                // (SO_REUSEADDR never lets two TCP sockets listen on one address).
                if other_listens {
                    return true;
                }
                continue;
            }
            // Both must have asked, TIME_WAIT included (it keeps the flag of the socket it
            // was): sk_reuse && sk2->sk_reuse && sk2 not listening.
            let reuse = me.opts.reuseaddr && other.opts.reuseaddr && !other_listens;
            if !reuse {
                return true;
            }
        }
        false
    }

    pub(crate) fn do_bind(&mut self, id: usize, addr: &[u8]) -> Result<(), Errno> {
        let s = self.sock(id)?;
        let family = s.family;
        let a = match sockaddr::parse(family, addr)? {
            Parsed::Addr(a) => a,
            // Linux takes AF_UNSPEC with INADDR_ANY on an AF_INET socket, for old programs.
            Parsed::Unspec if family == Family::V4 && addr.len() >= 8 && addr[4..8] == [0; 4] => {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, u16::from_be_bytes([addr[2], addr[3]])))
            }
            Parsed::Unspec => return Err(libc::EAFNOSUPPORT),
        };
        let (v6only, proto) = (s.opts.v6only, s.proto);
        let busy = match &s.st {
            St::Idle => false,
            St::Udp(u) => u.h.iter().any(Option::is_some),
            _ => true,
        };
        if s.bound.is_some() || busy {
            return Err(libc::EINVAL);
        }
        if family == Family::V6 && v6only && sockaddr::unmap(a) != a {
            return Err(libc::EINVAL);
        }
        let a = sockaddr::unmap(a);
        if !self.bindable(a.ip()) {
            return Err(libc::EADDRNOTAVAIL);
        }
        let port = if a.port() == 0 {
            self.ephemeral(proto).ok_or(libc::EADDRINUSE)?
        } else {
            if self.conflicts(id, a.ip(), a.port(), false) {
                return Err(libc::EADDRINUSE);
            }
            a.port()
        };
        self.index.bind(proto.num(), port, id);
        let s = self.sock(id)?;
        s.bound = Some(SocketAddr::new(a.ip(), port));
        if proto == Proto::Udp {
            self.udp_open(id)?;
        }
        Ok(())
    }

    /// Binds an unbound socket to the wildcard and an ephemeral port (autobind).
    pub(crate) fn autobind(&mut self, id: usize) -> Result<SocketAddr, Errno> {
        let s = self.sock(id)?;
        if let Some(b) = s.bound {
            return Ok(b);
        }
        let (family, proto) = (s.family, s.proto);
        let port = self.ephemeral(proto).ok_or(libc::EAGAIN)?;
        let b = SocketAddr::new(family.unspecified().ip(), port);
        self.index.bind(proto.num(), port, id);
        self.sock(id)?.bound = Some(b);
        Ok(b)
    }

    pub(crate) fn do_listen(&mut self, id: usize, backlog: i32) -> Result<(), Errno> {
        let s = self.sock(id)?;
        if s.proto == Proto::Udp {
            return Err(libc::EOPNOTSUPP);
        }
        let backlog = if backlog < 0 { SOMAXCONN } else { (backlog as usize).min(SOMAXCONN) };
        match &mut s.st {
            St::Listen { backlog: b, .. } => {
                *b = backlog;
                return Ok(());
            }
            St::Idle => {}
            St::Tcp(_) | St::Udp(_) | St::Relayed(_) => return Err(libc::EINVAL),
        }
        match s.bound {
            Some(b) => {
                if self.conflicts(id, b.ip(), b.port(), true) {
                    return Err(libc::EADDRINUSE);
                }
            }
            // listen() on an unbound socket takes an ephemeral port, as inet_listen does.
            None => {
                self.autobind(id)?;
            }
        }
        let s = self.sock(id)?;
        s.st = St::Listen { backlog, pending: Vec::new(), queue: std::collections::VecDeque::new() };
        let port = s.bound.map_or(0, |b| b.port());
        self.index.listen(port, id);
        self.dirty.insert(id);
        Ok(())
    }

    pub(crate) fn do_accept(&mut self, id: usize, addr: &mut [u8]) -> Result<(Handle, usize), Errno> {
        let s = self.socks.get_mut(id).ok_or(libc::EBADF)?;
        let (family, opts) = (s.family, s.opts.clone());
        let St::Listen { queue, .. } = &mut s.st else { return Err(libc::EINVAL) };
        let Some(p) = queue.pop_front() else { return Err(libc::EAGAIN) };
        self.dirty.insert(id);
        let sk = self.nets[p.ifx].get::<tcp::Socket>(p.h);
        let local = sk.local_endpoint().map_or(p.tuple.0, ep);
        let remote = sk.remote_endpoint().map_or(p.tuple.1, ep);
        let h = self.new_handle(Sock {
            family,
            proto: Proto::Tcp,
            opts,
            bound: Some(local),
            st: St::Tcp(Conn {
                ifx: p.ifx,
                h: p.h,
                local,
                remote,
                last: tcp::State::SynReceived,
                established: true,
                connect_reported: true,
                saw_rst: p.saw_rst,
                peer_fin: false,
                dead: false,
                closed_at: None,
                rcv_shut: false,
                snd_shut: false,
            }),
            error: 0,
            key: None,
            reported: None,
            arrived: false,
            orphan: false,
            conn_port: false,
        });
        if self.index.tuples.get(&(frame::TCP, p.tuple.0, p.tuple.1)) == Some(&id) {
            self.index.tuples.remove(&(frame::TCP, p.tuple.0, p.tuple.1));
        }
        self.index.tuples.insert((frame::TCP, local, remote), h.id);
        self.index.bind(frame::TCP, local.port(), h.id);
        self.dirty.insert(h.id);
        self.refresh(h.id);
        Ok((h, sockaddr::write(family, remote, addr)))
    }

    /// Hands a live smoltcp connection to an orphan entry (the socket goes back to Idle).
    fn orphan_conn(&mut self, id: usize, c: Conn) {
        let t = (frame::TCP, c.local, c.remote);
        let (ifx, h) = (c.ifx, c.h);
        let sk = self.nets[ifx].get::<tcp::Socket>(h);
        if sk.state() == tcp::State::Closed && sk.local_endpoint().is_none() {
            // Over and with nothing left to send: no orphan needed, and the tuple is free for
            // a new attempt from the same port.
            self.nets[ifx].remove(h);
            if self.index.tuples.get(&t) == Some(&id) {
                self.index.tuples.remove(&t);
            }
            return;
        }
        let o = Sock {
            family: Family::V4,
            proto: Proto::Tcp,
            opts: Opts::default(),
            bound: None,
            st: St::Tcp(c),
            error: 0,
            key: None,
            reported: None,
            arrived: false,
            orphan: true,
            conn_port: false,
        };
        let oid = self.socks.insert(o);
        self.index.tuples.insert(t, oid);
        self.nets[ifx].time(h, oid);
        self.dirty.insert(oid);
    }

    pub(crate) fn do_connect(&mut self, id: usize, addr: &[u8]) -> Result<(), Errno> {
        let s = self.sock(id)?;
        if s.proto == Proto::Udp {
            return self.udp_connect(id, addr);
        }
        let family = s.family;
        let parsed = sockaddr::parse(family, addr)?;
        self.dirty.insert(id);
        let s = self.sock(id)?;
        match &mut s.st {
            St::Listen { .. } => {
                if parsed == Parsed::Unspec {
                    // Disconnecting a listener closes it (tcp_disconnect).
                    let St::Listen { pending, queue, .. } = std::mem::replace(&mut s.st, St::Idle) else {
                        unreachable!()
                    };
                    self.drop_pending(id, pending.into_iter().chain(queue));
                    return Ok(());
                }
                return Err(libc::EISCONN);
            }
            St::Tcp(c) => {
                if parsed == Parsed::Unspec {
                    let St::Tcp(c) = std::mem::replace(&mut s.st, St::Idle) else { unreachable!() };
                    let sk = self.tcp(c.ifx, c.h);
                    sk.abort();
                    self.orphan_conn(id, c);
                    return Ok(());
                }
                if c.dead {
                    if !c.connect_reported {
                        c.connect_reported = true;
                        let e = std::mem::take(&mut s.error);
                        return Err(if e != 0 { e } else { libc::ECONNABORTED });
                    }
                    if c.established {
                        return Err(libc::EISCONN);
                    }
                    // A failed attempt already reported: connect again from scratch. A port
                    // the failed connect chose is given back, as Linux's inet_put_port does.
                    let St::Tcp(c) = std::mem::replace(&mut s.st, St::Idle) else { unreachable!() };
                    if s.conn_port {
                        s.conn_port = false;
                        if let Some(b) = s.bound.take() {
                            self.index.unbind(frame::TCP, b.port(), id);
                        }
                    }
                    self.orphan_conn(id, c);
                } else if !c.established {
                    return Err(libc::EALREADY);
                } else if !c.connect_reported {
                    c.connect_reported = true;
                    return Ok(());
                } else {
                    return Err(libc::EISCONN);
                }
            }
            St::Idle => {
                if parsed == Parsed::Unspec {
                    return Ok(());
                }
            }
            St::Relayed(_) => return Err(libc::EISCONN),
            St::Udp(_) => unreachable!("handled above"),
        }
        let Parsed::Addr(a) = parsed else { return Ok(()) };
        let s = self.sock(id)?;
        if family == Family::V6 && s.opts.v6only && sockaddr::unmap(a) != a {
            return Err(libc::ENETUNREACH);
        }
        let mut dst = sockaddr::unmap(a);
        if dst.ip().is_unspecified() {
            // Linux connects to the wildcard as to the loopback.
            dst.set_ip(match dst.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        if dst.port() == 0 {
            return Err(libc::ECONNREFUSED);
        }
        let (ifx, src) = self.route(dst.ip())?;
        let bound = self.sock(id)?.bound;
        let local_ip = match bound {
            Some(b) if !b.ip().is_unspecified() => {
                if b.is_ipv4() != dst.is_ipv4() {
                    return Err(libc::EAFNOSUPPORT);
                }
                let ok = match ifx {
                    EXT => self.own(b.ip()),
                    _ => self.own(b.ip()) || b.ip().is_loopback(),
                };
                if !ok {
                    return Err(libc::ENETUNREACH);
                }
                b.ip()
            }
            _ => src,
        };
        let port = match bound {
            Some(b) => b.port(),
            None => {
                let p = self.ephemeral_connect(local_ip, dst).ok_or(libc::EADDRNOTAVAIL)?;
                self.index.bind(frame::TCP, p, id);
                let s = self.sock(id)?;
                s.bound = Some(SocketAddr::new(local_ip, p));
                s.conn_port = true;
                p
            }
        };
        let local = SocketAddr::new(local_ip, port);
        if self.index.tuples.contains_key(&(frame::TCP, local, dst)) {
            return Err(libc::EADDRNOTAVAIL);
        }
        let opts = self.sock(id)?.opts.clone();
        let mut sk = self.make_tcp(&opts, ifx);
        if !opts.keepalive {
            sk.set_timeout(Some(smoltcp::time::Duration::from_secs(SYN_TIMEOUT_S)));
        }
        let net = &mut self.nets[ifx];
        sk.connect(net.iface.context(), dst, local).map_err(|_| libc::EINVAL)?;
        let h = net.add(shard_of(local, dst), sk);
        net.time(h, id);
        self.index.tuples.insert((frame::TCP, local, dst), id);
        self.sock(id)?.st = St::Tcp(Conn {
            ifx,
            h,
            local,
            remote: dst,
            last: tcp::State::SynSent,
            established: false,
            connect_reported: false,
            saw_rst: false,
            peer_fin: false,
            dead: false,
            closed_at: None,
            rcv_shut: false,
            snd_shut: false,
        });
        Err(libc::EINPROGRESS)
    }

    pub(crate) fn tcp_send(&mut self, id: usize, data: &[u8], flags: i32) -> Result<usize, Errno> {
        self.dirty.insert(id);
        let s = self.sock(id)?;
        if s.error != 0 {
            return Err(std::mem::take(&mut s.error));
        }
        let c = match &s.st {
            St::Tcp(c) => c,
            St::Relayed(_) => return self.relayed_send(id, data),
            _ => return Err(libc::EPIPE),
        };
        if c.snd_shut || c.dead {
            return Err(libc::EPIPE);
        }
        if !c.established {
            return Err(libc::EAGAIN);
        }
        if flags & MSG_OOB != 0 {
            // Urgent data: smoltcp has no urgent pointer.
            return Err(libc::EOPNOTSUPP);
        }
        let (ifx, h) = (c.ifx, c.h);
        self.nets[ifx].time(h, id);
        let sk = self.tcp(ifx, h);
        if !sk.may_send() {
            return Err(libc::EPIPE);
        }
        let r = match sk.send_slice(data) {
            Ok(0) if !data.is_empty() => Err(libc::EAGAIN),
            Ok(n) => Ok(n),
            Err(_) => Err(libc::EPIPE),
        };
        // The space this send took counts as gone from what was last reported: when the
        // settling poll already drained it (a loopback peer with room took it all), the room
        // that came back is news, or a guest that filled the buffer would wait for POLLOUT
        // for ever.
        let free = sk.send_capacity() - sk.send_queue();
        if let Some(rep) = &mut self.sock(id)?.reported {
            rep.2 = rep.2.min(free);
        }
        r
    }

    pub(crate) fn tcp_recv(&mut self, id: usize, buf: &mut [u8], flags: i32) -> Result<usize, Errno> {
        self.dirty.insert(id);
        let s = self.sock(id)?;
        if flags & MSG_OOB != 0 {
            return Err(libc::EINVAL);
        }
        let c = match &s.st {
            St::Tcp(c) => c,
            St::Relayed(_) => return self.relayed_recv(id, buf, flags),
            _ => return Err(libc::ENOTCONN),
        };
        if !c.established && !c.dead {
            return Err(libc::EAGAIN);
        }
        let (ifx, h, shut) = (c.ifx, c.h, c.rcv_shut || c.peer_fin || c.dead);
        let sk = self.nets[ifx].get_mut::<tcp::Socket>(h);
        if sk.recv_queue() > 0 && !buf.is_empty() {
            let n = if flags & MSG_PEEK != 0 {
                sk.peek_slice(buf).unwrap_or(0)
            } else if flags & MSG_TRUNC != 0 {
                // MSG_TRUNC on TCP discards the bytes without copying them.
                let want = buf.len().min(sk.recv_queue());
                let mut left = want;
                while left > 0 {
                    match sk.recv(|b| {
                        let k = b.len().min(left);
                        (k, k)
                    }) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => left -= k,
                    }
                }
                want - left
            } else {
                sk.recv_slice(buf).unwrap_or(0)
            };
            return Ok(n);
        }
        let s = self.sock(id)?;
        if s.error != 0 {
            return Err(std::mem::take(&mut s.error));
        }
        if shut {
            return Ok(0);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        Err(libc::EAGAIN)
    }

    pub(crate) fn do_shutdown(&mut self, id: usize, how: i32) -> Result<(), Errno> {
        let (rd, wr) = match how {
            libc::SHUT_RD => (true, false),
            libc::SHUT_WR => (false, true),
            libc::SHUT_RDWR => (true, true),
            _ => return Err(libc::EINVAL),
        };
        self.dirty.insert(id);
        let s = self.sock(id)?;
        match &mut s.st {
            St::Idle => Err(libc::ENOTCONN),
            St::Listen { .. } => {
                if rd {
                    let St::Listen { pending, queue, .. } = std::mem::replace(&mut s.st, St::Idle) else {
                        unreachable!()
                    };
                    self.drop_pending(id, pending.into_iter().chain(queue));
                }
                Ok(())
            }
            St::Tcp(c) => {
                if c.dead {
                    return Err(libc::ENOTCONN);
                }
                if !c.established {
                    // Shutting down a connection in progress disconnects it (tcp_disconnect).
                    let St::Tcp(c) = std::mem::replace(&mut s.st, St::Idle) else { unreachable!() };
                    let sk = self.tcp(c.ifx, c.h);
                    sk.abort();
                    self.orphan_conn(id, c);
                    return Ok(());
                }
                c.rcv_shut |= rd;
                if wr && !c.snd_shut {
                    c.snd_shut = true;
                    let (ifx, h) = (c.ifx, c.h);
                    self.nets[ifx].time(h, id);
                    self.tcp(ifx, h).close();
                }
                Ok(())
            }
            St::Udp(u) => {
                u.rcv_shut |= rd;
                u.snd_shut |= wr;
                if u.peer.is_none() {
                    return Err(libc::ENOTCONN);
                }
                Ok(())
            }
            St::Relayed(r) => {
                UserStack::relayed_shutdown(r, how);
                Ok(())
            }
        }
    }

    pub(crate) fn do_getsockname(&mut self, id: usize, addr: &mut [u8]) -> Result<usize, Errno> {
        let s = self.sock(id)?;
        let a = match &s.st {
            St::Tcp(c) => c.local,
            St::Relayed(r) => r.local,
            St::Udp(UdpState { conn_local: Some(ip), .. }) => SocketAddr::new(*ip, s.bound.map_or(0, |b| b.port())),
            _ => s.bound.unwrap_or_else(|| s.family.unspecified()),
        };
        // A wildcard bound on an AF_INET6 socket is ::, not ::ffff:0.0.0.0.
        Ok(sockaddr::write(s.family, a, addr))
    }

    pub(crate) fn do_getpeername(&mut self, id: usize, addr: &mut [u8]) -> Result<usize, Errno> {
        let s = self.sock(id)?;
        let a = match &s.st {
            St::Tcp(c) if c.established && !c.dead => c.remote,
            St::Relayed(r) if !r.dead => r.remote,
            St::Udp(UdpState { peer: Some(p), .. }) => *p,
            _ => return Err(libc::ENOTCONN),
        };
        Ok(sockaddr::write(s.family, a, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_overlap_follows_linux() {
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(overlap((Family::V4, false, any4), (Family::V6, false, any6)));
        assert!(!overlap((Family::V4, false, any4), (Family::V6, true, any6)));
        assert!(overlap((Family::V6, false, any6), (Family::V4, false, lo4)));
        assert!(!overlap((Family::V6, true, any6), (Family::V4, false, lo4)));
        assert!(!overlap((Family::V4, false, lo4), (Family::V4, false, IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)))));
    }
}
