//! Socket options, ioctls and TCP statistics. Unknown options are ENOPROTOOPT, as Linux says
//! for an option it does not have.

use smoltcp::socket::tcp;

use crate::seam::{Errno, TcpStats};
use crate::sockaddr::Family;
use crate::stack::{apply_tcp_opts, Proto, St, Stamp, UserStack};

const FIONREAD: u64 = 0x541b;
const TIOCOUTQ: u64 = 0x5411;
const SIOCATMARK: u64 = 0x8905;

/// Linux's bounds on SO_RCVBUF/SO_SNDBUF (SOCK_MIN_RCVBUF, SOCK_MIN_SNDBUF, rmem_max and
/// wmem_max defaults), applied before doubling.
const MIN_RCVBUF: usize = 2304;
const MIN_SNDBUF: usize = 4608;
const MAX_BUF: usize = 212_992;

/// Linux's state numbers (include/net/tcp_states.h).
pub(crate) fn linux_state(s: tcp::State) -> u8 {
    use tcp::State as T;
    match s {
        T::Established => 1,
        T::SynSent => 2,
        T::SynReceived => 3,
        T::FinWait1 => 4,
        T::FinWait2 => 5,
        T::TimeWait => 6,
        T::Closed => 7,
        T::CloseWait => 8,
        T::LastAck => 9,
        T::Listen => 10,
        T::Closing => 11,
    }
}

fn put_int(val: &mut [u8], v: i32) -> usize {
    let b = v.to_ne_bytes();
    let n = val.len().min(4);
    val[..n].copy_from_slice(&b[..n]);
    n
}

fn get_int(val: &[u8]) -> Result<i32, Errno> {
    if val.len() < 4 {
        return Err(libc::EINVAL);
    }
    Ok(i32::from_ne_bytes([val[0], val[1], val[2], val[3]]))
}

fn put_bytes(val: &mut [u8], b: &[u8]) -> usize {
    let n = val.len().min(b.len());
    val[..n].copy_from_slice(&b[..n]);
    n
}

impl UserStack {
    fn tcp_state_of(&self, id: usize) -> tcp::State {
        match self.socks.get(id).map(|s| &s.st) {
            // Linux hands TIME_WAIT to a minisocket: the socket its owner holds is TCP_CLOSE.
            Some(St::Tcp(c)) => match self.nets[c.ifx].get::<tcp::Socket>(c.h).state() {
                tcp::State::TimeWait => tcp::State::Closed,
                st => st,
            },
            Some(St::Listen { .. }) => tcp::State::Listen,
            Some(St::Relayed(r)) if !r.dead => tcp::State::Established,
            _ => tcp::State::Closed,
        }
    }

    pub(crate) fn do_getsockopt(&mut self, id: usize, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno> {
        let state = self.tcp_state_of(id);
        let cc = self.congestion_name();
        let s = self.socks.get_mut(id).ok_or(libc::EBADF)?;
        let o = &s.opts;
        let tcp = s.proto == Proto::Tcp;
        let int = |v: bool| i32::from(v);
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => std::mem::take(&mut s.error),
            (libc::SOL_SOCKET, libc::SO_TYPE) => {
                if tcp {
                    libc::SOCK_STREAM
                } else {
                    libc::SOCK_DGRAM
                }
            }
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => s.family.domain(),
            (libc::SOL_SOCKET, libc::SO_PROTOCOL) => {
                if tcp {
                    libc::IPPROTO_TCP
                } else {
                    libc::IPPROTO_UDP
                }
            }
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => int(matches!(s.st, St::Listen { .. })),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => int(o.reuseaddr),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => int(o.keepalive),
            (libc::SOL_SOCKET, libc::SO_BROADCAST) => int(o.broadcast),
            // Linux's defaults for a socket nobody sized (tcp_rmem[1], tcp_wmem[1],
            // rmem_default, wmem_default).
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rcvbuf.unwrap_or(if tcp { 131_072 } else { 212_992 }) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sndbuf.unwrap_or(if tcp { 16_384 } else { 212_992 }) as i32,
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                let l = libc::linger { l_onoff: int(o.linger.is_some()), l_linger: o.linger.unwrap_or(0) };
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&l.l_onoff.to_ne_bytes());
                b[4..].copy_from_slice(&l.l_linger.to_ne_bytes());
                return Ok(put_bytes(val, &b));
            }
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => return Ok(put_bytes(val, &o.rcvtimeo)),
            (libc::SOL_SOCKET, libc::SO_TIMESTAMP) => int(o.stamp == Stamp::Micro),
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS) => int(o.stamp == Stamp::Nano),
            (libc::IPPROTO_IP, libc::IP_RECVTOS) if s.family == Family::V4 => int(o.recvtos),
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if s.family == Family::V4 => int(o.pktinfo),
            (libc::IPPROTO_IP, libc::IP_RECVTTL) if s.family == Family::V4 => int(o.recvttl),
            (libc::IPPROTO_IP, libc::IP_TOS) if !tcp && s.family == Family::V4 => i32::from(o.tos.unwrap_or(0)),
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) if !tcp && s.family == Family::V6 => i32::from(o.tos.unwrap_or(0)),
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO) if s.family == Family::V6 => int(o.pktinfo6),
            (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT) if s.family == Family::V6 => int(o.hoplimit6),
            (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS) if s.family == Family::V6 => int(o.tclass6),
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => return Ok(put_bytes(val, &o.sndtimeo)),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if s.family == Family::V6 => int(o.v6only),
            (libc::IPPROTO_IP, libc::IP_TTL) if s.family == Family::V4 => i32::from(o.ttl.unwrap_or(64)),
            (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS) if s.family == Family::V6 => i32::from(o.ttl.unwrap_or(64)),
            (libc::IPPROTO_TCP, _) if !tcp => return Err(libc::EOPNOTSUPP),
            // An AF_INET socket has no IPv6 level at all.
            (libc::IPPROTO_IPV6, _) if s.family == Family::V4 => return Err(libc::EOPNOTSUPP),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => int(o.nodelay),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => o.keepidle as i32,
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => o.keepintvl as i32,
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => o.keepcnt as i32,
            (libc::IPPROTO_TCP, libc::TCP_MAXSEG) => 536,
            (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => {
                let name = cc.as_bytes();
                let mut b = [0u8; 16];
                b[..name.len()].copy_from_slice(name);
                return Ok(put_bytes(val, &b));
            }
            (libc::IPPROTO_TCP, libc::TCP_INFO) => {
                // smoltcp keeps RTT, RTO and cwnd private: TCP_INFO carries the state and the
                // queue sizes and leaves the rest zero.
                // SAFETY: tcp_info is plain integers; all-zero is a valid value.
                let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
                ti.tcpi_state = linux_state(state);
                if let St::Tcp(c) = &s.st {
                    let sk = self.nets[c.ifx].get::<tcp::Socket>(c.h);
                    ti.tcpi_unacked = sk.send_queue() as u32;
                    ti.tcpi_rcv_space = sk.recv_capacity() as u32;
                    ti.tcpi_snd_mss = 536;
                    ti.tcpi_rcv_mss = 536;
                    // Measured from the wire (meter.rs), not smoltcp's own estimator.
                    if let Some(m) = self.meters.get(c.local, c.remote) {
                        let (rtt, var) = m.rtt_us();
                        ti.tcpi_rtt = rtt;
                        ti.tcpi_rttvar = var;
                        ti.tcpi_snd_cwnd = m.cwnd();
                        ti.tcpi_total_retrans = m.retrans;
                        ti.tcpi_snd_mss = m.mss();
                    }
                }
                // SAFETY: ti is a live tcp_info; viewing its bytes is sound for its full size.
                let b = unsafe {
                    std::slice::from_raw_parts(
                        (&ti as *const libc::tcp_info).cast::<u8>(),
                        std::mem::size_of::<libc::tcp_info>(),
                    )
                };
                return Ok(put_bytes(val, b));
            }
            _ => return Err(libc::ENOPROTOOPT),
        };
        Ok(put_int(val, v))
    }

    pub(crate) fn do_setsockopt(&mut self, id: usize, level: i32, name: i32, val: &[u8]) -> Result<(), Errno> {
        let s = self.sock(id)?;
        let tcp = s.proto == Proto::Tcp;
        let family = s.family;
        let unbound = s.bound.is_none();
        let o = &mut s.opts;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => o.reuseaddr = get_int(val)? != 0,
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => o.keepalive = get_int(val)? != 0,
            (libc::SOL_SOCKET, libc::SO_BROADCAST) => o.broadcast = get_int(val)? != 0,
            // The buffers of a smoltcp socket are fixed when it is made: sizes set after
            // connect/listen read back as set but apply to the next connection only.
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => {
                let v = get_int(val)?.max(0) as usize;
                let linux = || v.clamp(MIN_RCVBUF / 2, MAX_BUF) * 2;
                o.rcvbuf = Some(kernel_int(tcp, name, v as i32).map_or_else(linux, |k| k as usize));
            }
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => {
                let v = get_int(val)?.max(0) as usize;
                let linux = || v.clamp(MIN_SNDBUF / 2, MAX_BUF) * 2;
                o.sndbuf = Some(kernel_int(tcp, name, v as i32).map_or_else(linux, |k| k as usize));
            }
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                if val.len() < 8 {
                    return Err(libc::EINVAL);
                }
                let on = get_int(&val[..4])?;
                let secs = get_int(&val[4..8])?;
                o.linger = (on != 0).then_some(secs.max(0));
            }
            // Linux: SO_TIMESTAMPNS sets both flags and the nanosecond one wins; turning
            // either off clears both (sock_set_timestamp).
            (libc::SOL_SOCKET, libc::SO_TIMESTAMP) => {
                o.stamp = if get_int(val)? != 0 { Stamp::Micro } else { Stamp::None };
            }
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS) => {
                o.stamp = if get_int(val)? != 0 { Stamp::Nano } else { Stamp::None };
            }
            // A datagram's cmsgs come from the notes taken of its IP header on arrival; a
            // stream socket only stores them (Linux's tcp_recvmsg gives no such cmsg).
            (libc::IPPROTO_IP, libc::IP_RECVTOS) if family == Family::V4 => o.recvtos = get_int(val)? != 0,
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if family == Family::V4 => o.pktinfo = get_int(val)? != 0,
            (libc::IPPROTO_IP, libc::IP_RECVTTL) if family == Family::V4 => o.recvttl = get_int(val)? != 0,
            // What a datagram socket's datagrams leave with (the IP header is rewritten on the
            // way out: device.rs's Mark). Not on TCP sockets, whose segments carry no mark.
            (libc::IPPROTO_IP, libc::IP_TOS) if !tcp && family == Family::V4 => o.tos = Some(get_int(val)? as u8),
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) if !tcp && family == Family::V6 => {
                o.tos = Some(tclass(get_int(val)?)?);
            }
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO) if family == Family::V6 => o.pktinfo6 = get_int(val)? != 0,
            (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT) if family == Family::V6 => o.hoplimit6 = get_int(val)? != 0,
            (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS) if family == Family::V6 => o.tclass6 = get_int(val)? != 0,
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) => {
                if val.len() < 16 {
                    return Err(libc::EINVAL);
                }
                let mut b = [0u8; 16];
                b.copy_from_slice(&val[..16]);
                // Linux keeps the timeout in jiffies (rounded up at CONFIG_HZ) and checks
                // tv_usec: its answer and its read-back come from a kernel socket.
                if let Some(k) = kernel_roundtrip(tcp, name, &b) {
                    b = k?;
                }
                if name == libc::SO_RCVTIMEO {
                    o.rcvtimeo = b;
                } else {
                    o.sndtimeo = b;
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if family == Family::V6 => {
                // Linux: only before bind.
                if !unbound {
                    return Err(libc::EINVAL);
                }
                o.v6only = get_int(val)? != 0;
            }
            (libc::IPPROTO_IP, libc::IP_TTL) if family == Family::V4 => o.ttl = ttl(get_int(val)?)?,
            (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS) if family == Family::V6 => o.ttl = ttl(get_int(val)?)?,
            (libc::IPPROTO_TCP, _) if !tcp => return Err(libc::ENOPROTOOPT),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => o.nodelay = get_int(val)? != 0,
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => o.keepidle = secs(get_int(val)?, 32767)?,
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => o.keepintvl = secs(get_int(val)?, 32767)?,
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => o.keepcnt = secs(get_int(val)?, 127)?,
            (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => {
                let want = val.split(|&b| b == 0).next().unwrap_or(&[]);
                if want != self.congestion_name().as_bytes() {
                    // One congestion control per NSM; Linux says ENOENT for one it lacks.
                    return Err(libc::ENOENT);
                }
            }
            _ => return Err(libc::ENOPROTOOPT),
        }
        // Options smoltcp has a knob for apply to the live connection at once.
        let s = self.sock(id)?;
        let opts = s.opts.clone();
        match &s.st {
            St::Tcp(c) => {
                let (ifx, h) = (c.ifx, c.h);
                self.nets[ifx].time(h, id);
                let sk = self.tcp(ifx, h);
                apply_tcp_opts(sk, &opts);
            }
            St::Udp(u) => {
                for (ifx, h) in u.h.into_iter().enumerate() {
                    if let Some(h) = h {
                        self.nets[ifx].get_mut::<smoltcp::socket::udp::Socket>(h).set_hop_limit(opts.ttl);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn do_ioctl(&mut self, id: usize, request: u64) -> Result<i64, Errno> {
        let s = self.socks.get(id).ok_or(libc::EBADF)?;
        match (request, &s.st) {
            (FIONREAD, St::Listen { .. }) | (TIOCOUTQ, St::Listen { .. }) => Err(libc::EINVAL),
            (FIONREAD, St::Tcp(c)) => Ok(self.nets[c.ifx].get::<tcp::Socket>(c.h).recv_queue() as i64),
            (TIOCOUTQ, St::Tcp(c)) => Ok(self.nets[c.ifx].get::<tcp::Socket>(c.h).send_queue() as i64),
            (FIONREAD | TIOCOUTQ, St::Idle) => Ok(0),
            (FIONREAD | TIOCOUTQ, St::Relayed(r)) => {
                Ok(crate::relay::int_ioctl(std::os::fd::AsRawFd::as_raw_fd(&r.fd), request as libc::c_ulong) as i64)
            }
            (FIONREAD, St::Udp(_)) => Ok(self.udp_next_len(id) as i64),
            (TIOCOUTQ, St::Udp(_)) => Ok(self.udp_outq(id) as i64),
            // No urgent data in this stack: never at the mark.
            (SIOCATMARK, _) if s.proto == Proto::Tcp => Ok(0),
            _ => Err(libc::ENOTTY),
        }
    }

    /// Writes the timestamp cmsg socket `id` asked for into `control` (the time of the
    /// receive: smoltcp keeps no arrival times, and the data was in the stack's buffer by the
    /// time the guest asked). Returns msg_controllen and the flags to add (MSG_CTRUNC when it
    /// does not fit, as put_cmsg truncates).
    pub(crate) fn put_stamp(&self, id: usize, control: &mut [u8]) -> (usize, i32) {
        let Some(s) = self.socks.get(id) else { return (0, 0) };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        match s.opts.stamp {
            Stamp::None => (0, 0),
            Stamp::Micro => {
                let tv = libc::timeval { tv_sec: now.as_secs() as _, tv_usec: now.subsec_micros() as _ };
                put_cmsg(control, libc::SOL_SOCKET, libc::SCM_TIMESTAMP, &tv)
            }
            Stamp::Nano => {
                let ts = libc::timespec { tv_sec: now.as_secs() as _, tv_nsec: now.subsec_nanos() as _ };
                put_cmsg(control, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &ts)
            }
        }
    }

    /// A datagram's cmsgs in Linux's order: the timestamp (sock_recv_timestamp), then
    /// ip_cmsg_recv's PKTINFO, TTL, TOS or ip6_datagram_recv_ctl's PKTINFO, HOPLIMIT, TCLASS,
    /// from the note of the datagram just received. Stops at the first that does not fit.
    pub(crate) fn put_dgram_cmsgs(&self, id: usize, control: &mut [u8]) -> (usize, i32) {
        let (mut used, flags) = self.put_stamp(id, control);
        if flags != 0 {
            return (used, flags);
        }
        let (Some(s), Some(m)) = (self.socks.get(id), self.last_rx) else { return (used, 0) };
        let o = &s.opts;
        let mut put = |on: bool, level: i32, ty: i32, data: &[u8]| -> bool {
            if !on {
                return true;
            }
            let (n, f) = crate::seam::put_cmsg(&mut control[used..], level, ty, data);
            used += n;
            f == 0
        };
        match (s.family, m.dst) {
            (Family::V4, std::net::IpAddr::V4(dst)) => {
                let mut pi = [0u8; 12];
                pi[..4].copy_from_slice(&(m.ifindex as i32).to_ne_bytes());
                pi[4..8].copy_from_slice(&dst.octets());
                pi[8..].copy_from_slice(&dst.octets());
                let ok = put(o.pktinfo, libc::IPPROTO_IP, libc::IP_PKTINFO, &pi)
                    && put(o.recvttl, libc::IPPROTO_IP, libc::IP_TTL, &i32::from(m.ttl).to_ne_bytes())
                    && put(o.recvtos, libc::IPPROTO_IP, libc::IP_TOS, &[m.tos]);
                (used, if ok { 0 } else { libc::MSG_CTRUNC })
            }
            (Family::V6, std::net::IpAddr::V6(dst)) => {
                let mut pi = [0u8; 20];
                pi[..16].copy_from_slice(&dst.octets());
                pi[16..].copy_from_slice(&m.ifindex.to_ne_bytes());
                let ok = put(o.pktinfo6, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &pi)
                    && put(o.hoplimit6, libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, &i32::from(m.ttl).to_ne_bytes())
                    && put(o.tclass6, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &i32::from(m.tos).to_ne_bytes());
                (used, if ok { 0 } else { libc::MSG_CTRUNC })
            }
            // An IPv4 datagram on an AF_INET6 socket: not looked into here.
            _ => (used, 0),
        }
    }

    pub(crate) fn do_tcp_stats(&mut self, id: usize) -> Option<TcpStats> {
        let s = self.socks.get(id)?;
        if s.proto != Proto::Tcp {
            return None;
        }
        if let St::Relayed(r) = &s.st {
            return Some(
                r.stats.unwrap_or(TcpStats { state: linux_state(self.tcp_state_of(id)), ..TcpStats::default() }),
            );
        }
        let mut st = TcpStats { state: linux_state(self.tcp_state_of(id)), ..TcpStats::default() };
        if let St::Tcp(c) = &s.st {
            if let Some(m) = self.meters.get(c.local, c.remote) {
                st.rtt_us = m.rtt_us().0;
                st.cwnd = m.cwnd();
                st.retrans = m.retrans;
            }
        }
        Some(st)
    }
}

/// A scratch kernel socket of the same type, for options the stack only stores: setting one
/// there and reading it back gives Linux's rounding, clamping (net.core.rmem_max, wmem_max)
/// and errnos without restating the kernel's rules. socket(2) works in the NSM's empty network
/// namespace. None: no kernel socket to be had (the stack then applies Linux's default rules).
fn kernel_roundtrip<const N: usize>(tcp: bool, name: i32, val: &[u8; N]) -> Option<Result<[u8; N], Errno>> {
    let ty = if tcp { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
    // SAFETY: socket(2) takes no pointers; the fd is owned here and closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: val is a live buffer of N bytes.
    let r = unsafe { libc::setsockopt(raw, libc::SOL_SOCKET, name, val.as_ptr().cast(), N as libc::socklen_t) };
    if r < 0 {
        return Some(Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)));
    }
    let mut out = [0u8; N];
    let mut len = N as libc::socklen_t;
    // SAFETY: out/len describe a live buffer of N bytes.
    let r = unsafe { libc::getsockopt(raw, libc::SOL_SOCKET, name, out.as_mut_ptr().cast(), &mut len) };
    (r == 0 && len as usize == N).then_some(Ok(out))
}

/// [`kernel_roundtrip`] for an int option; None also when the kernel refuses it.
fn kernel_int(tcp: bool, name: i32, v: i32) -> Option<i32> {
    kernel_roundtrip(tcp, name, &v.to_ne_bytes())?.ok().map(i32::from_ne_bytes)
}

/// One control message at the start of `space`, as the kernel's put_cmsg writes it: cut to
/// the space with MSG_CTRUNC, nothing if not even a header fits. Returns (bytes used, flags).
fn put_cmsg<T: Copy>(space: &mut [u8], level: i32, ty: i32, v: &T) -> (usize, i32) {
    // SAFETY: only called with timeval and timespec, plain integers without padding.
    let data = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) };
    crate::seam::put_cmsg(space, level, ty, data)
}

/// IPV6_TCLASS: -1 is the default (0), else 0..=255.
pub(crate) fn tclass(v: i32) -> Result<u8, Errno> {
    match v {
        -1 => Ok(0),
        0..=255 => Ok(v as u8),
        _ => Err(libc::EINVAL),
    }
}

/// The TOS and TTL a sendmsg's control messages give one datagram (ip_cmsg_send,
/// ip6_datagram_send_ctl): EINVAL for a malformed one or one of the IP level this stack does
/// not know; other levels are left alone.
pub(crate) fn parse_send_cmsgs(family: Family, control: &[u8]) -> Result<crate::device::Mark, Errno> {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    let mut mark = crate::device::Mark::default();
    let mut off = 0;
    while off + hdr <= control.len() {
        // SAFETY: a cmsghdr's worth of bytes inside control, read unaligned.
        let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control[off..].as_ptr().cast()) };
        let len = c.cmsg_len as usize;
        if len < hdr || off + len > control.len() {
            return Err(libc::EINVAL);
        }
        let data = &control[off + hdr..off + len];
        let int = || -> Result<i32, Errno> {
            match data.len() {
                4 => Ok(i32::from_ne_bytes([data[0], data[1], data[2], data[3]])),
                _ => Err(libc::EINVAL),
            }
        };
        match (family, c.cmsg_level, c.cmsg_type) {
            (Family::V4, libc::IPPROTO_IP, libc::IP_TTL) => mark.ttl = Some(ttl(int()?)?.ok_or(libc::EINVAL)?),
            (Family::V4, libc::IPPROTO_IP, libc::IP_TOS) => {
                // An int or, as Linux also takes, one byte.
                let v = if data.len() == 1 { i32::from(data[0]) } else { int()? };
                if !(0..=255).contains(&v) {
                    return Err(libc::EINVAL);
                }
                mark.tos = Some(v as u8);
            }
            // The source address a datagram goes from: this stack picks it by route.
            (Family::V4, libc::IPPROTO_IP, libc::IP_PKTINFO) | (Family::V6, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
            }
            (Family::V4, libc::IPPROTO_IP, _) => return Err(libc::EINVAL),
            (Family::V6, libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                let v = int()?;
                mark.ttl = match v {
                    -1 => None,
                    0..=255 => Some(v as u8),
                    _ => return Err(libc::EINVAL),
                };
            }
            (Family::V6, libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => mark.tos = Some(tclass(int()?)?),
            (Family::V6, libc::IPPROTO_IPV6, _) => return Err(libc::EINVAL),
            _ => {}
        }
        // SAFETY: CMSG_SPACE is arithmetic.
        off += unsafe { libc::CMSG_SPACE(data.len() as u32) } as usize;
    }
    Ok(mark)
}

fn ttl(v: i32) -> Result<Option<u8>, Errno> {
    match v {
        -1 => Ok(None),
        1..=255 => Ok(Some(v as u8)),
        _ => Err(libc::EINVAL),
    }
}

fn secs(v: i32, max: i32) -> Result<u32, Errno> {
    if v < 1 || v > max {
        return Err(libc::EINVAL);
    }
    Ok(v as u32)
}
