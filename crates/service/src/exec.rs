//! One validated request run against the stack, or against a co-located socket's pipe: the
//! semantics of each socket call (policy, rate limits, queued sends, Linux's errnos).

use crate::colocated::colocated_op;
use crate::control::{self, NsmStats};
use crate::core::{tok, Limits, TOK_SOCK};
use crate::sock::{close_slot, publish, retire, Attachment, Sock};
use crate::stack::{Errno, Stack};
use crate::{cmsg, colocated, policy, ratelimit, sendq};
use netkernel_abi::validate::{Call, Request};
use netkernel_abi::{ADDR_MAX, SLOT_COUNT};
use std::sync::atomic::Ordering;

/// Not an errno: `execute`'s way of saying the guest broke the ABI (see Violation::SendFlood).
pub(crate) const OVERFLOW: Errno = i32::MAX;

/// Whether a call's effect on other sockets must be published before it completes (see
/// `settle`). Not after EAGAIN: the guest then waits for a wakeup after the completion's `seq`,
/// and one consumed before it would be lost.
pub(crate) fn settles(req: &Request, result: i64) -> bool {
    let call = match req.call {
        Call::Send { nowait, .. } => !nowait,
        Call::Shutdown { .. } | Call::Close | Call::Connect { .. } => true,
        _ => false,
    };
    call && (result >= 0 || result == -(libc::EINPROGRESS as i64))
}

/// Counts and logs an operation the tenant's policy refused; returns the errno to answer.
pub(crate) fn refused<H>(stats: &mut NsmStats, a: &Attachment<H>, what: &str, e: Errno) -> Errno {
    tenant(stats, &a.tenant).refused += 1;
    eprintln!("netkernel nsm {}: tenant {} (pid {}): refused {what}", stats.nsm, a.tenant, a.pid);
    e
}

/// A tenant's totals, created on first use.
pub(crate) fn tenant<'a>(stats: &'a mut NsmStats, name: &str) -> &'a mut control::TenantTotals {
    if !stats.tenants.contains_key(name) {
        stats.tenants.insert(name.to_string(), Default::default());
    }
    stats.tenants.get_mut(name).expect("inserted above")
}

/// Socket options a guest may not set through a privileged NSM: Linux refuses them to an
/// unprivileged process with EPERM, and the provider, not the tenant, picks congestion control.
pub(crate) fn privileged_option(level: i32, name: i32) -> bool {
    match level {
        libc::SOL_SOCKET => matches!(
            name,
            libc::SO_BINDTODEVICE | libc::SO_MARK | libc::SO_RCVBUFFORCE | libc::SO_SNDBUFFORCE | libc::SO_DEBUG
        ),
        libc::IPPROTO_IP => matches!(name, libc::IP_TRANSPARENT | libc::IP_FREEBIND),
        libc::IPPROTO_IPV6 => matches!(name, libc::IPV6_TRANSPARENT),
        libc::IPPROTO_TCP => matches!(name, libc::TCP_CONGESTION | libc::TCP_REPAIR),
        _ => false,
    }
}

/// Whether `addr` binds a port below `start` (net.ipv4.ip_unprivileged_port_start), which a
/// non-root guest may not.
pub(crate) fn privileged_port(addr: &[u8], start: u16) -> bool {
    if addr.len() < 4 {
        return false;
    }
    let port = u16::from_be_bytes([addr[2], addr[3]]);
    port != 0 && port < start
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn execute<S: Stack>(
    stack: &mut S,
    limits: &Limits,
    stats: &mut NsmStats,
    tenant_sockets: usize,
    mut bucket: Option<&mut ratelimit::Bucket>,
    throttled: &mut bool,
    lingering: &mut Vec<Option<Sock<S::Handle>>>,
    templates: &mut [Option<S::Handle>; 2],
    ai: usize,
    a: &mut Attachment<S::Handle>,
    req: &Request,
    addr: &mut [u8; ADDR_MAX],
    addr_out: &mut Option<usize>,
) -> i64 {
    let pool = req.call.buf();
    let bufp = if pool.is_empty() { std::ptr::null_mut() } else { a.region.pool_ptr(pool.off(), pool.len()) };
    let region_buf = |_: &Attachment<S::Handle>| -> &mut [u8] {
        if bufp.is_null() {
            return &mut [];
        }
        // SAFETY: validate() checked [off, +len) lies in the pool of a region that outlives
        // this call. The guest may write the bytes concurrently; they are only copied to or
        // from the stack.
        unsafe { std::slice::from_raw_parts_mut(bufp, pool.len() as usize) }
    };
    let in_addr = match &req.call {
        Call::Bind { addr } | Call::Connect { addr, .. } | Call::Send { to: addr, .. } => addr.as_bytes(),
        _ => &[],
    };
    let colocated = a.sock(req.sock).is_ok_and(|s| s.pipe.is_some());
    let r: Result<i64, Errno> = (|| match req.call {
        Call::Send { .. }
        | Call::Recv { .. }
        | Call::Shutdown { .. }
        | Call::GetSockOpt { .. }
        | Call::SetSockOpt { .. }
        | Call::GetSockName
        | Call::GetPeerName
        | Call::Ioctl { .. }
        | Call::Bind { .. }
        | Call::Listen { .. }
        | Call::Accept
        | Call::Connect { .. }
            if colocated =>
        {
            let buf = region_buf(a);
            colocated_op(stack, stats, templates, bucket.as_deref_mut(), throttled, a, req, buf, addr, addr_out)
        }
        Call::Socket { domain, ty, protocol } => {
            if domain != libc::AF_INET && domain != libc::AF_INET6 {
                return Err(libc::EAFNOSUPPORT);
            }
            // The NSM sets its own flags; a guest's are stripped so they cannot hide a type.
            let ty = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
            const SOCK_PACKET: i32 = 10;
            if ty == libc::SOCK_RAW || ty == SOCK_PACKET {
                return Err(libc::EPERM);
            }
            if a.policy.max_sockets.is_some_and(|m| tenant_sockets >= m as usize) {
                return Err(refused(stats, a, "socket limit reached", libc::EMFILE));
            }
            let fd = stack.socket(domain, ty, protocol)?;
            let id = add_sock(stack, ai, a, req.holder, Sock::new(Some(fd), ty == libc::SOCK_STREAM), None)?;
            Ok(id as i64)
        }
        Call::Bind { .. } => {
            let local =
                policy::bind(&a.policy, in_addr).map_err(|e| refused(stats, a, "bind outside its addresses", e))?;
            let local = local.as_deref().unwrap_or(in_addr);
            if a.uid != 0 && privileged_port(local, limits.unprivileged_port_start) {
                return Err(libc::EACCES);
            }
            stack.bind(a.sock(req.sock)?.handle()?, local).map(|()| 0)
        }
        Call::Listen { backlog } => {
            let fd = a.sock(req.sock)?.handle()?;
            if a.policy.listen_ports.is_some() {
                let mut local = [0u8; ADDR_MAX];
                let n = stack.getsockname(fd, &mut local)?;
                let port = policy::decode(&local[..n]).map_or(0, |a| a.port());
                // An unbound socket (port 0) would listen on any port the stack picks.
                if !policy::may_listen(&a.policy, port) {
                    return Err(refused(stats, a, "listen on a port it may not use", libc::EACCES));
                }
            }
            stack.listen(fd, backlog).map(|()| 0)
        }
        Call::Accept => {
            if a.policy.max_sockets.is_some_and(|m| tenant_sockets >= m as usize) {
                return Err(refused(stats, a, "socket limit reached", libc::EMFILE));
            }
            let pending = a.sock_mut(req.sock)?.backlog.as_mut().and_then(|b| b.queue.pop_front());
            let (id, len) = match pending {
                Some(end) => {
                    let len = end.peer.len();
                    addr[..len].copy_from_slice(&end.peer);
                    (add_sock(stack, ai, a, req.holder, Sock::new(None, true), Some(end))?, len)
                }
                None => {
                    let (fd, len) = stack.accept(a.sock(req.sock)?.handle()?, addr)?;
                    (add_sock(stack, ai, a, req.holder, Sock::new(Some(fd), true), None)?, len)
                }
            };
            stats.conns_total += 1;
            tenant(stats, &a.tenant).conns_total += 1;
            *addr_out = Some(len);
            Ok(id as i64)
        }
        Call::Connect { .. } => {
            let peer =
                policy::connect(&a.policy, in_addr).map_err(|e| refused(stats, a, "connect to another tenant", e))?;
            let peer = peer.as_deref().unwrap_or(in_addr);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            // A tenant with addresses connects from its own address, not the NSM's.
            let mut local = [0u8; ADDR_MAX];
            let fd = s.handle()?;
            let unbound = stack.getsockname(fd, &mut local).ok().and_then(|n| policy::decode(&local[..n]));
            if let Some(src) =
                unbound.filter(|l| l.port() == 0).and_then(|l| policy::source(&a.policy, l.is_ipv6(), peer))
            {
                stack.bind(fd, &src)?;
            }
            let r = stack.connect(fd, peer);
            // GuestLib's blocking connect calls connect twice; the connection counts once.
            if matches!(r, Ok(()) | Err(libc::EINPROGRESS)) && s.stream && !s.counted {
                s.counted = true;
                stats.conns_total += 1;
                tenant(stats, &a.tenant).conns_total += 1;
            }
            r.map(|()| 0)
        }
        Call::Send { flags, nowait: is_async, .. } => {
            let data = region_buf(a);
            // A datagram's destination obeys the tenant's policy as a connect's does.
            let to = if in_addr.is_empty() {
                None
            } else {
                policy::connect(&a.policy, in_addr).map_err(|e| refused(stats, a, "send to another tenant", e))?
            };
            let in_addr = to.as_deref().unwrap_or(in_addr);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            if let Some(e) = s.sendq.deferred {
                // A send reports the pending error; an asynchronous one leaves it for a call
                // whose result the guest reads.
                if !is_async {
                    s.sendq.deferred = None;
                }
                return Err(e);
            }
            if s.sendq.queued() > 0 {
                // Bytes are still queued: later bytes go behind them.
                if !is_async {
                    return Err(libc::EAGAIN);
                }
                if s.sendq.queued() + data.len() > sendq::MAX_QUEUED {
                    // GuestLib sends asynchronously only to a socket with nothing queued: this
                    // guest is flooding the NSM's memory.
                    return Err(OVERFLOW);
                }
                s.sendq.push(data);
                return Ok(data.len() as i64);
            }
            // The tenant's rate limit: what it has tokens for goes now, the rest waits.
            let allowed = bucket.as_deref_mut().map_or(data.len(), |b| b.take(data.len()));
            if allowed == 0 && !data.is_empty() {
                *throttled = true;
                if !is_async {
                    return Err(libc::EAGAIN);
                }
                s.sendq.push(data);
                return Ok(data.len() as i64);
            }
            let control = cmsg::sent(&a.region, req);
            let r = if control.is_empty() {
                stack.send(s.handle()?, &data[..allowed], flags, in_addr)
            } else {
                stack.sendmsg(s.handle()?, &data[..allowed], flags, in_addr, control)
            };
            if let Some(b) = bucket.as_deref_mut() {
                b.refund(allowed - r.as_ref().map_or(0, |&n| n));
                *throttled = b.exhausted();
            }
            if let Ok(n) = r {
                stats.bytes_out += n as u64;
                s.bytes_out += n as u64;
                tenant(stats, &a.tenant).bytes_out += n as u64;
            }
            match r {
                Ok(n) if is_async && n < data.len() => {
                    s.sendq.push(&data[n..]);
                    return Ok(data.len() as i64);
                }
                Err(libc::EAGAIN) if is_async => s.sendq.push(data),
                Err(e) if is_async => s.sendq.fail(e),
                _ => {}
            }
            r.map(|n| n as i64)
        }
        Call::Recv { flags, .. } => {
            let buf = region_buf(a);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            let area = cmsg::area(&a.region, req);
            let (n, alen) = match cmsg::recv(stack, s.handle()?, buf, flags, addr, area) {
                // With nothing to read, a pending error from an asynchronous send is reported.
                Ok((0, _)) | Err(libc::EAGAIN) if s.sendq.deferred.is_some() => {
                    return Err(s.sendq.deferred.take().expect("checked"))
                }
                r => r?,
            };
            if flags & libc::MSG_PEEK == 0 {
                stats.bytes_in += n as u64;
                tenant(stats, &a.tenant).bytes_in += n as u64;
                if let Some(Some(s)) = a.socks.get_mut(req.sock as usize) {
                    s.bytes_in += n as u64;
                }
            }
            *addr_out = Some(alen);
            Ok(n as i64)
        }
        Call::Shutdown { how } => {
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            if s.sendq.queued() > 0 && (how == libc::SHUT_WR || how == libc::SHUT_RDWR) {
                // The FIN goes after the queued bytes.
                s.sendq.shutdown_after = Some(how);
                return Ok(0);
            }
            stack.shutdown(s.handle()?, how)?;
            // A listener whose receive side is shut down stops listening: its waiting
            // co-located connections are reset, and no new one finds it.
            if how != libc::SHUT_WR {
                s.backlog = None;
            }
            Ok(0)
        }
        Call::Close => {
            a.sock(req.sock)?;
            // Other processes holding the socket keep it open.
            if a.holders.closed(req.holder, req.sock) {
                if let Some(s) = close_slot(a, req.sock) {
                    retire(stack, lingering, s);
                }
            }
            Ok(0)
        }
        Call::Share { holder: to, all, .. } => {
            let buf = region_buf(a);
            let slots: Option<Vec<u32>> = (!all)
                .then(|| buf.chunks_exact(4).map(|c| u32::from_ne_bytes(c.try_into().expect("4 bytes"))).collect());
            let to = u32::try_from(to).map_err(|_| libc::EINVAL)?;
            a.holders.share(req.holder, to, slots.as_deref()).map(|()| 0)
        }
        Call::Unshare { holder } => {
            let holder = u32::try_from(holder).map_err(|_| libc::EINVAL)?;
            // The pidfd (if the engine tied one) leaves the epoll set when it closes: only this
            // process has it.
            let (_pidfd, unheld) = a.holders.remove(holder);
            for slot in unheld {
                if let Some(s) = close_slot(a, slot) {
                    retire(stack, lingering, s);
                }
            }
            Ok(0)
        }
        Call::GetSockOpt { level: libc::SOL_SOCKET, name: libc::SO_ERROR, .. } => {
            let buf = region_buf(a);
            let s = a.socks.get_mut(req.sock as usize).and_then(|s| s.as_mut()).ok_or(libc::EBADF)?;
            match s.sendq.deferred.take() {
                Some(e) if buf.len() >= 4 => {
                    buf[..4].copy_from_slice(&e.to_ne_bytes());
                    Ok(4)
                }
                _ => stack.getsockopt(s.handle()?, libc::SOL_SOCKET, libc::SO_ERROR, buf).map(|n| n as i64),
            }
        }
        Call::GetSockOpt { level, name, .. } => {
            let buf = region_buf(a);
            stack.getsockopt(a.sock(req.sock)?.handle()?, level, name, buf).map(|n| n as i64)
        }
        Call::SetSockOpt { level, name, .. } => {
            if privileged_option(level, name) {
                return Err(libc::EPERM);
            }
            let buf = region_buf(a);
            stack.setsockopt(a.sock(req.sock)?.handle()?, level, name, buf).map(|()| 0)
        }
        Call::GetSockName | Call::GetPeerName => {
            let fd = a.sock(req.sock)?.handle()?;
            let len = if req.call == Call::GetSockName {
                stack.getsockname(fd, addr)?
            } else {
                stack.getpeername(fd, addr)?
            };
            *addr_out = Some(len);
            Ok(0)
        }
        Call::Ioctl { request } => stack.ioctl(a.sock(req.sock)?.handle()?, request),
        // A well-formed one is answered by a resolver thread before execute().
        Call::Resolve { .. } => Ok(netkernel_abi::RESOLVE_EAI_BASE + libc::EAI_NONAME as i64),
    })();
    // Pure queries change no readiness (getsockopt can: reading SO_ERROR clears POLLERR).
    let queries = matches!(
        req.call,
        Call::GetSockName
            | Call::GetPeerName
            | Call::Ioctl { .. }
            | Call::Resolve { .. }
            | Call::Share { .. }
            | Call::Unshare { .. }
    );
    if req.call != Call::Close && !queries {
        if let Ok(s) = a.sock(req.sock) {
            let known = s.pipe.is_none() && s.stream && !s.urgent.get() && s.sendq.queued() == 0;
            let before = || a.region.slot(req.sock).mask.load(Ordering::Acquire);
            let mut mask =
                known.then(|| mask_after(&req.call, &r, before())).flatten().unwrap_or_else(|| s.mask(stack));
            if *throttled {
                mask &= !((libc::POLLOUT | libc::POLLWRNORM) as u32);
            }
            a.region.slot(req.sock).queued.store(s.sendq.queued() as u32, Ordering::Release);
            publish(a, req.sock, mask, false);
        }
    }
    match r {
        Ok(v) => v,
        Err(e) => -(e as i64),
    }
}

/// The readiness a stack TCP socket has after a recv or send that returned `result`, where it
/// follows from the readiness published before (`before`) without asking the stack: asking is
/// a poll() system call, which was a third of the kernel NSM's system calls under
/// redis-benchmark. None: ask.
///
/// - A recv that read less than it asked for emptied the receive queue (a TCP read takes what
///   is there up to its length), so the socket is no longer readable. Not when the peer's FIN,
///   an error or urgent data is known (EOF, an error and the urgent mark keep it readable or
///   stop a read short), nor for MSG_PEEK or MSG_OOB.
/// - A send the stack took whole, of a few KiB, to a writable socket leaves it writable (the
///   send buffer is far larger); a larger or partial send asks.
///
/// Readiness that changes later (more bytes, a FIN, room in the send buffer) comes as an
/// edge-triggered stack event and is published then, as before. A socket reported writable
/// whose buffer just filled costs its guest one EAGAIN, after which the mask is asked for.
pub(crate) fn mask_after(call: &Call, result: &Result<i64, Errno>, before: u32) -> Option<u32> {
    let n = *result.as_ref().ok()?;
    match *call {
        Call::Recv { buf, flags, .. } => mask_after_io(Io::Recv, buf.len(), flags, n, before),
        Call::Send { buf, flags, .. } => mask_after_io(Io::Send, buf.len(), flags, n, before),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Io {
    Recv,
    Send,
}

/// [`mask_after`] for a `len`-byte recv or send with `flags` that returned `n`.
fn mask_after_io(io: Io, len: u32, flags: i32, n: i64, before: u32) -> Option<u32> {
    const IN: u32 = (libc::POLLIN | libc::POLLRDNORM) as u32;
    const OUT: u32 = libc::POLLOUT as u32;
    const UNUSUAL: u32 = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLPRI) as u32;
    const PLAIN: i32 = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_CMSG_CLOEXEC;
    const SMALL: i64 = 16 << 10;
    if before & (UNUSUAL | netkernel_abi::MASK_AT_MARK) != 0 || flags & !(PLAIN | libc::MSG_MORE) != 0 {
        return None;
    }
    match io {
        Io::Recv if flags & libc::MSG_MORE == 0 && n > 0 && n < i64::from(len) => Some(before & !IN),
        Io::Send if before & OUT != 0 && n == i64::from(len) && n <= SMALL => Some(before),
        _ => None,
    }
}

/// Gives a new socket a slot and starts watching it: its stack socket with epoll, or its
/// co-located end by telling the pipe where the socket lives.
pub(crate) fn add_sock<S: Stack>(
    stack: &mut S,
    ai: usize,
    a: &mut Attachment<S::Handle>,
    holder: u32,
    mut sock: Sock<S::Handle>,
    pipe: Option<colocated::End>,
) -> Result<u32, Errno> {
    let id = match a.free.pop() {
        Some(id) => id,
        None if a.socks.len() < SLOT_COUNT as usize => {
            a.socks.push(None);
            (a.socks.len() - 1) as u32
        }
        None => return Err(libc::EMFILE),
    };
    if let Some(h) = &sock.handle {
        if let Err(e) = stack.watch(h, tok(TOK_SOCK, ai, id)) {
            a.free.push(id);
            return Err(e);
        }
    }
    if let Some(mut end) = pipe {
        end.adopt(a.owner(id));
        sock.pipe = Some(end);
    }
    let mask = sock.mask(stack);
    a.socks[id as usize] = Some(sock);
    a.holders.created(holder, id);
    publish(a, id, mask, true);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IN: u32 = (libc::POLLIN | libc::POLLRDNORM) as u32;
    const OUT: u32 = (libc::POLLOUT | libc::POLLWRNORM) as u32;

    #[test]
    fn a_short_read_empties_the_socket_a_full_one_asks() {
        assert_eq!(mask_after_io(Io::Recv, 100, 0, 40, IN | OUT), Some(OUT));
        assert_eq!(mask_after_io(Io::Recv, 100, libc::MSG_DONTWAIT, 40, IN | OUT), Some(OUT));
        assert_eq!(mask_after_io(Io::Recv, 100, 0, 100, IN | OUT), None, "more may wait");
        assert_eq!(mask_after_io(Io::Recv, 100, 0, 0, IN | OUT), None, "EOF");
        assert_eq!(mask_after_io(Io::Recv, 100, libc::MSG_PEEK, 40, IN | OUT), None);
        assert_eq!(mask_after_io(Io::Recv, 100, libc::MSG_OOB, 1, IN | OUT), None);
        // A FIN, an error or urgent data known: readable for other reasons, or read short at a mark.
        for unusual in [libc::POLLRDHUP, libc::POLLHUP, libc::POLLERR, libc::POLLPRI] {
            assert_eq!(mask_after_io(Io::Recv, 100, 0, 40, IN | OUT | unusual as u32), None);
        }
        assert_eq!(mask_after_io(Io::Recv, 100, 0, 40, IN | netkernel_abi::MASK_AT_MARK), None);
    }

    #[test]
    fn a_small_send_taken_whole_leaves_a_writable_socket_writable() {
        assert_eq!(mask_after_io(Io::Send, 512, libc::MSG_NOSIGNAL, 512, IN | OUT), Some(IN | OUT));
        assert_eq!(mask_after_io(Io::Send, 512, 0, 200, OUT), None, "partial: the buffer is full");
        assert_eq!(mask_after_io(Io::Send, 512, 0, 512, IN), None, "not writable before: ask");
        assert_eq!(mask_after_io(Io::Send, 1 << 20, 0, 1 << 20, OUT), None, "large: ask");
        assert_eq!(mask_after_io(Io::Send, 512, libc::MSG_OOB, 512, OUT), None);
    }
}
