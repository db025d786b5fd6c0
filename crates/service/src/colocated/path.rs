//! The co-located path (DESIGN.md D4): a connect from a guest of this NSM to a listener of this
//! NSM is joined by a pipe of the NSM's own instead of TCP through the stack, and the requests on
//! such a socket are answered by its pipe end, as a connected loopback TCP socket answers them.

use crate::control::NsmStats;
use crate::core::Core;
use crate::exec::{tenant, OVERFLOW};
use crate::sock::{publish, Attachment, ListenerRef};
use crate::stack::{Errno, Stack};
use crate::{cmsg, colocated, policy, ratelimit, sendq, SIOCATMARK};
use netkernel_abi::validate::{Call, Request};
use netkernel_abi::ADDR_MAX;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

impl<S: Stack> Core<S> {
    /// A listening socket becomes findable by co-located connects (once; a second listen()
    /// only changes the backlog).
    pub(crate) fn register_listener(&mut self, ai: usize, slot: u32, backlog: i32) {
        let Some(a) = self.atts[ai].as_mut() else { return };
        let Ok(s) = a.sock_mut(slot) else { return };
        let somaxconn = self.limits.somaxconn;
        let limit = if backlog < 0 { somaxconn } else { (backlog as usize).min(somaxconn) };
        if let Some(b) = s.backlog.as_mut() {
            b.limit = limit;
            return;
        }
        let mut local = [0u8; ADDR_MAX];
        let Some(addr) = s
            .handle()
            .ok()
            .and_then(|h| self.stack.getsockname(h, &mut local).ok())
            .and_then(|n| policy::decode(&local[..n]))
        else {
            return;
        };
        s.backlog = Some(colocated::Backlog { limit, v6: addr.is_ipv6(), queue: Default::default() });
        self.listeners.entry(addr).or_default().push(ListenerRef { ai, slot, serial: s.serial });
    }

    /// Makes attachment `ai`'s listening sockets findable again (after a handover brought them
    /// with their backlogs).
    pub(crate) fn find_listeners(&mut self, ai: usize) {
        let Some(a) = self.atts.get(ai).and_then(|a| a.as_ref()) else { return };
        for (slot, s) in a.socks.iter().enumerate() {
            let Some(s) = s.as_ref().filter(|s| s.backlog.is_some()) else { continue };
            let mut local = [0u8; ADDR_MAX];
            let addr = s.handle().ok().and_then(|h| self.stack.getsockname(h, &mut local).ok());
            if let Some(addr) = addr.and_then(|n| policy::decode(&local[..n])) {
                let l = ListenerRef { ai, slot: slot as u32, serial: s.serial };
                self.listeners.entry(addr).or_default().push(l);
            }
        }
    }

    /// The listener a connect to `target` reaches inside this NSM, if one may take a
    /// co-located connection now.
    pub(crate) fn find_listener(&mut self, target: SocketAddr) -> Option<ListenerRef> {
        let port = target.port();
        let (v4, v6) = match target.ip() {
            IpAddr::V4(ip) => (Some(ip), ip.to_ipv6_mapped()),
            IpAddr::V6(ip) => (ip.to_ipv4_mapped(), ip),
        };
        // Most specific first, as the kernel's lookup does; a v6 wildcard listener takes IPv4
        // connections unless it is IPV6_V6ONLY.
        let mut keys = vec![(SocketAddr::new(IpAddr::V6(v6), port), false)];
        if let Some(v4) = v4 {
            keys.insert(0, (SocketAddr::new(IpAddr::V4(v4), port), false));
            keys.push((SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port), true));
        }
        keys.push((SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port), true));
        let mut local: Option<bool> = None;
        for (key, wildcard) in keys {
            let Some(list) = self.listeners.get_mut(&key) else { continue };
            let atts = &self.atts;
            let live = |l: &ListenerRef| {
                atts.get(l.ai)
                    .and_then(|a| a.as_ref())
                    .and_then(|a| a.sock(l.slot).ok())
                    .is_some_and(|s| s.serial == l.serial && s.backlog.is_some())
            };
            list.retain(live);
            if list.is_empty() {
                self.listeners.remove(&key);
                continue;
            }
            if wildcard && !*local.get_or_insert_with(|| self.stack.is_local(target.ip())) {
                return None;
            }
            // SO_REUSEPORT listeners take turns.
            list.rotate_left(1);
            let l = *list.last().expect("not empty");
            let a = self.atts[l.ai].as_ref().expect("live");
            let s = a.sock(l.slot).expect("live");
            if !a.policy.colocate || s.backlog.as_ref().is_some_and(|b| b.full()) {
                return None;
            }
            if key.is_ipv6() && v4.is_some() && target.is_ipv4() {
                let mut only = [0u8; 4];
                let v6only = s
                    .handle()
                    .ok()
                    .and_then(|h| self.stack.getsockopt(h, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &mut only).ok())
                    .is_some_and(|_| only != [0; 4]);
                if v6only {
                    continue;
                }
            }
            return Some(l);
        }
        None
    }

    /// The co-located short cut (D4): a connect to a listener of this NSM is joined to it by a
    /// pipe instead of TCP. None: the stack connects as usual.
    pub(crate) fn connect_colocated(&mut self, ai: usize, req: &Request) -> Option<Result<i64, Errno>> {
        let Call::Connect { addr, blocking } = req.call else { return None };
        let a = self.atts[ai].as_ref()?;
        let s = a.sock(req.sock).ok()?;
        if !a.policy.colocate || !s.stream || s.pipe.is_some() || s.backlog.is_some() {
            return None;
        }
        let in_addr = addr.as_bytes();
        // Refusals are the stack path's to answer and log.
        let peer = policy::connect(&a.policy, in_addr).ok()?.unwrap_or_else(|| in_addr.to_vec());
        let mut target = policy::decode(&peer)?;
        // Linux takes a connect to the unspecified address for one to loopback.
        if target.ip().is_unspecified() {
            target.set_ip(if target.is_ipv6() {
                Ipv6Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            });
        }
        let peer = policy::encode(&target);
        // Only a socket that has not begun connecting: a connect in progress is the stack's.
        if s.counted {
            return None;
        }
        let l = self.find_listener(target)?;
        let a = self.atts[ai].as_ref().expect("checked");
        let fd = a.sock(req.sock).ok()?.handle().ok()?;
        let mut buf = [0u8; ADDR_MAX];
        let n = self.stack.getsockname(fd, &mut buf).ok()?;
        let mut me = policy::decode(&buf[..n])?;
        if me.port() == 0 || me.ip().is_unspecified() {
            let src = policy::source(&a.policy, me.is_ipv6(), &peer)
                .and_then(|b| policy::decode(&b))
                .map_or(target.ip(), |s| s.ip());
            if me.port() == 0 {
                // The stack picks the port, so no other connection of this NSM has it.
                if let Err(e) = self.stack.bind(fd, &policy::encode(&SocketAddr::new(src, 0))) {
                    return Some(Err(e));
                }
                let n = self.stack.getsockname(fd, &mut buf).ok()?;
                me = policy::decode(&buf[..n])?;
            }
            me.set_ip(src);
        }
        let listener_v6 = self.atts[l.ai].as_ref()?.sock(l.slot).ok()?.backlog.as_ref()?.v6;
        let as_family = |a: SocketAddr| policy::encode(&same_family(a, listener_v6));
        let (mut client, mut server) = colocated::pair(
            (policy::encode(&me), peer),
            (as_family(target), as_family(me)),
            self.limits.tcp_rmem_default,
        );
        // Options set before connect (and on the listener, which its connections inherit)
        // hold for the pipe's ends too.
        let a = self.atts[ai].as_ref().expect("checked");
        let fd = a.sock(req.sock).ok()?.handle().ok()?;
        inherit_options(&mut self.stack, &mut self.templates, fd, &mut client, me.is_ipv6());
        let lfd = self.atts[l.ai].as_ref()?.sock(l.slot).ok()?.handle().ok()?;
        inherit_options(&mut self.stack, &mut self.templates, lfd, &mut server, listener_v6);
        // The listener's guest learns of the connection (accept() will find it).
        let la = self.atts[l.ai].as_mut().expect("live");
        let ls = la.sock_mut(l.slot).expect("live");
        ls.backlog.as_mut().expect("listening").queue.push_back(server);
        let mask = ls.mask(&mut self.stack);
        publish(la, l.slot, mask, true);
        let a = self.atts[ai].as_mut().expect("checked");
        let owner = a.owner(req.sock);
        let s = a.sock_mut(req.sock).expect("checked");
        // The stack socket only holds the port now; its events would misreport the socket.
        if let Some(h) = &s.handle {
            self.stack.unwatch(h);
        }
        client.adopt(owner);
        if blocking {
            // The guest would only wait for writability and ask again.
            let _ = client.connect_again();
        }
        s.pipe = Some(client);
        s.counted = true;
        let mask = s.mask(&mut self.stack);
        self.stats.conns_total += 1;
        self.stats.conns_colocated += 1;
        tenant(&mut self.stats, &a.tenant).conns_total += 1;
        publish(a, req.sock, mask, true);
        // As a loopback TCP connect answers: the guest's next connect() reports completion.
        Some(if blocking { Ok(0) } else { Err(libc::EINPROGRESS) })
    }
}

/// Copies the options a program may have set on `from` (the stack socket before a co-located
/// connect, or the listener) to a pipe end, where they differ from a fresh socket's.
pub(crate) fn inherit_options<S: Stack>(
    stack: &mut S,
    templates: &mut [Option<S::Handle>; 2],
    from: &S::Handle,
    end: &mut colocated::End,
    v6: bool,
) {
    const INHERITED: [(i32, i32); 8] = [
        (libc::SOL_SOCKET, libc::SO_SNDBUF),
        (libc::SOL_SOCKET, libc::SO_RCVBUF),
        (libc::SOL_SOCKET, libc::SO_OOBINLINE),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMP),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        (libc::SOL_SOCKET, libc::SO_LINGER),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    ];
    for (level, name) in INHERITED {
        let (mut v, mut fresh) = ([0u8; 16], [0u8; 16]);
        let Ok(n) = stack.getsockopt(from, level, name, &mut v) else { continue };
        let Ok(t) = template(stack, templates, v6) else { return };
        if stack.getsockopt(t, level, name, &mut fresh).is_ok_and(|m| v[..n] != fresh[..m]) {
            end.set_option(level, name, v[..n].to_vec());
        }
    }
}

/// `a` as a socket of the other family sees it (IPv4 as v4-mapped IPv6 and back).
pub(crate) fn same_family(a: SocketAddr, v6: bool) -> SocketAddr {
    match (a.ip(), v6) {
        (IpAddr::V4(ip), true) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        (IpAddr::V6(ip), false) => ip.to_ipv4_mapped().map_or(a, |ip| SocketAddr::new(IpAddr::V4(ip), a.port())),
        _ => a,
    }
}

/// A request on a co-located socket: the pipe answers as a connected TCP socket would.
#[allow(clippy::too_many_arguments)]
pub(crate) fn colocated_op<S: Stack>(
    stack: &mut S,
    stats: &mut NsmStats,
    templates: &mut [Option<S::Handle>; 2],
    bucket: Option<&mut ratelimit::Bucket>,
    throttled: &mut bool,
    a: &mut Attachment<S::Handle>,
    req: &Request,
    buf: &mut [u8],
    addr: &mut [u8; ADDR_MAX],
    addr_out: &mut Option<usize>,
) -> Result<i64, Errno> {
    let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
    let end = s.pipe.as_mut().expect("caller checked");
    let v6 = end.local.len() > 16;
    match req.call {
        Call::Bind { .. } | Call::Listen { .. } | Call::Accept => Err(libc::EINVAL),
        Call::Connect { .. } => end.connect_again().map(|()| 0),
        Call::Send { nowait: is_async, flags, .. } => {
            let urgent = flags & libc::MSG_OOB != 0;
            // The tenant's rate limit holds for bytes that stay on the host too. An asynchronous
            // send cannot wait: it is charged, and the tenant waits until the debt is paid.
            let (n, bucket) = match bucket {
                Some(b) if is_async => {
                    let n = end.send(buf, true, sendq::MAX_QUEUED, urgent).map_err(|e| e.unwrap_or(OVERFLOW))?;
                    b.charge(n);
                    (n, Some(b))
                }
                Some(b) => {
                    let allowed = b.take(buf.len());
                    if allowed == 0 && !buf.is_empty() {
                        *throttled = true;
                        return Err(libc::EAGAIN);
                    }
                    let r = end.send(&buf[..allowed], false, 0, urgent).map_err(|e| e.unwrap_or(OVERFLOW));
                    b.refund(allowed - r.as_ref().map_or(0, |&n| n));
                    (r?, Some(b))
                }
                None => (end.send(buf, is_async, sendq::MAX_QUEUED, urgent).map_err(|e| e.unwrap_or(OVERFLOW))?, None),
            };
            *throttled = bucket.is_some_and(|b| b.exhausted());
            s.bytes_out += n as u64;
            stats.bytes_out += n as u64;
            tenant(stats, &a.tenant).bytes_out += n as u64;
            Ok(n as i64)
        }
        Call::Recv { flags, .. } => {
            let n = end.recv(buf, flags)?;
            if let Some(area) = cmsg::area(&a.region, req) {
                cmsg::colocated(area, end.stamp(), flags & libc::MSG_OOB);
            }
            if flags & libc::MSG_PEEK == 0 {
                s.bytes_in += n as u64;
                stats.bytes_in += n as u64;
                tenant(stats, &a.tenant).bytes_in += n as u64;
            }
            // A stream socket reports no source address.
            *addr_out = Some(0);
            Ok(n as i64)
        }
        Call::Shutdown { how } => end.shutdown(how).map(|()| 0),
        Call::GetPeerName if end.closed() => Err(libc::ENOTCONN),
        Call::GetSockName | Call::GetPeerName => {
            let src = if req.call == Call::GetSockName { &end.local } else { &end.peer };
            addr[..src.len()].copy_from_slice(src);
            *addr_out = Some(src.len());
            Ok(0)
        }
        Call::GetSockOpt { level: libc::SOL_SOCKET, name: libc::SO_ERROR, .. } => {
            let e = end.take_error().unwrap_or(0);
            let n = buf.len().min(4);
            buf[..n].copy_from_slice(&e.to_ne_bytes()[..n]);
            Ok(n as i64)
        }
        Call::GetSockOpt { level, name, .. } => {
            if let Some(v) = end.option(level, name) {
                let n = buf.len().min(v.len());
                buf[..n].copy_from_slice(&v[..n]);
                return Ok(n as i64);
            }
            // Never set: the default a fresh socket of the family reports.
            let t = template(stack, templates, v6)?;
            let n = stack.getsockopt(t, level, name, buf)?;
            if (level, name) == (libc::IPPROTO_TCP, libc::TCP_INFO) && n > 0 {
                buf[0] = end.tcp_state();
            }
            Ok(n as i64)
        }
        Call::SetSockOpt { level, name, .. } => {
            // The kernel validates and normalises the value (SO_RCVBUF doubles, ...) on a
            // scratch socket; the socket keeps what it would read back.
            let scratch = stack.socket(if v6 { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_STREAM, 0)?;
            stack.setsockopt(&scratch, level, name, buf)?;
            let mut back = [0u8; 256];
            let value = match stack.getsockopt(&scratch, level, name, &mut back) {
                Ok(n) => back[..n].to_vec(),
                Err(_) => buf.to_vec(),
            };
            stack.close(scratch);
            end.set_option(level, name, value);
            Ok(0)
        }
        Call::Ioctl { request } => match request {
            libc::FIONREAD => Ok(end.unread() as i64),
            // Loopback acknowledges at once: nothing stays unsent or unacknowledged.
            libc::TIOCOUTQ => Ok(0),
            SIOCATMARK => Ok(end.at_mark() as i64),
            _ => Err(libc::ENOTTY),
        },
        Call::Socket { .. } | Call::Close | Call::Resolve { .. } | Call::Share { .. } | Call::Unshare { .. } => {
            unreachable!("not dispatched to the pipe")
        }
    }
}

/// The fresh stack socket of the family, made on first use.
pub(crate) fn template<'a, S: Stack>(
    stack: &mut S,
    templates: &'a mut [Option<S::Handle>; 2],
    v6: bool,
) -> Result<&'a S::Handle, Errno> {
    let t = &mut templates[v6 as usize];
    if t.is_none() {
        *t = Some(stack.socket(if v6 { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_STREAM, 0)?);
    }
    Ok(t.as_ref().expect("made above"))
}
