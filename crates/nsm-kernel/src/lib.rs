//! The kernel NSM's stack: Linux sockets in the NSM's own network namespace, non-blocking, with
//! the congestion control the provider configured. Every result and errno is the kernel's own,
//! which is what makes guests see Linux semantics.

use netkernel_service::stack::{Exported, Ready, Received, TcpStats};
use netkernel_service::{Errno, Stack};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

const SIOCATMARK: u64 = 0x8905;

/// Linux kernel TCP/UDP as a NetKernel stack.
pub struct KernelStack {
    congestion: Option<String>,
    /// Watches the sockets, edge-triggered: each kernel wakeup becomes one event, which is what
    /// the guest's own EPOLLET would have seen.
    epfd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

/// A kernel socket of the NSM.
pub struct KernelSocket(Option<OwnedFd>);

impl KernelSocket {
    fn raw(&self) -> RawFd {
        self.0.as_ref().expect("taken only by drop").as_raw_fd()
    }
}

impl AsFd for KernelSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_ref().expect("taken only by drop").as_fd()
    }
}

impl Drop for KernelSocket {
    /// With SO_LINGER and a timeout, close(2) blocks until the bytes are out or the time is up:
    /// that close happens on a thread of its own, so the NSM's loop and every other guest go on
    /// (the guest's close() has returned already, as Linux's returns for a non-blocking socket).
    fn drop(&mut self) {
        let Some(fd) = self.0.take() else { return };
        let mut l = libc::linger { l_onoff: 0, l_linger: 0 };
        let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
        // SAFETY: l and len describe a live linger struct of the size passed.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&mut l as *mut libc::linger).cast(),
                &mut len,
            )
        };
        if r == 0 && l.l_onoff != 0 && l.l_linger > 0 {
            if let Err(e) = std::thread::Builder::new().name("linger".into()).spawn(move || drop(fd)) {
                eprintln!("netkernel nsm: closing a lingering socket inline: {e}");
            }
        }
    }
}

/// What the NSM watches on a socket (EPOLLERR and EPOLLHUP come always).
const SOCK_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLET) as u32;

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, key: u64) -> Result<(), Errno> {
    netkernel_ring::sys::epoll_ctl(epfd, op, fd, events, key).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn ok(r: libc::c_int) -> Result<(), Errno> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn len(r: isize) -> Result<usize, Errno> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

/// The congestion control algorithms this kernel offers.
pub fn available_congestion() -> Vec<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

impl KernelStack {
    /// A stack whose TCP sockets use `congestion` (None: the namespace's default). Fails when the
    /// kernel does not offer that algorithm.
    pub fn new(congestion: Option<String>) -> Result<Self, String> {
        if let Some(cc) = &congestion {
            offered(cc)?;
        }
        let epfd = netkernel_ring::sys::epoll().map_err(|e| format!("epoll_create1: {e}"))?;
        Ok(KernelStack { congestion, epfd, events: vec![libc::epoll_event { events: 0, u64: 0 }; 256] })
    }
}

/// Checks that the kernel offers congestion control `cc`, loading its module if need be.
fn offered(cc: &str) -> Result<(), String> {
    let avail = available_congestion();
    if !avail.iter().any(|a| a == cc) {
        // Loading the module makes it available where the kernel has it built.
        let _ = std::process::Command::new("modprobe").arg(format!("tcp_{cc}")).status();
        if !available_congestion().iter().any(|a| a == cc) {
            return Err(format!("congestion control {cc:?} not available (kernel offers: {})", avail.join(" ")));
        }
    }
    Ok(())
}

impl Stack for KernelStack {
    type Handle = KernelSocket;

    fn set_congestion(&mut self, cc: &str) -> Result<(), String> {
        offered(cc)?;
        self.congestion = Some(cc.to_string());
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "kernel"
    }

    fn congestion(&self) -> String {
        self.congestion.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap_or_default().trim().to_string()
        })
    }

    fn socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<KernelSocket, Errno> {
        // SAFETY: no pointers; the kernel checks domain, type and protocol, and the result is checked.
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd is fresh and ours.
        let sock = KernelSocket(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        if let (Some(cc), libc::SOCK_STREAM) = (self.congestion.clone(), ty) {
            self.setsockopt(&sock, libc::IPPROTO_TCP, libc::TCP_CONGESTION, cc.as_bytes())?;
        }
        Ok(sock)
    }

    fn bind(&mut self, s: &KernelSocket, addr: &[u8]) -> Result<(), Errno> {
        // SAFETY: addr is a live buffer of the length passed.
        ok(unsafe { libc::bind(s.raw(), addr.as_ptr().cast(), addr.len() as u32) })
    }

    fn listen(&mut self, s: &KernelSocket, backlog: i32) -> Result<(), Errno> {
        // SAFETY: no pointers; s is a socket this stack owns for the call's duration.
        ok(unsafe { libc::listen(s.raw(), backlog) })
    }

    fn accept(&mut self, s: &KernelSocket, addr: &mut [u8]) -> Result<(KernelSocket, usize), Errno> {
        let mut alen = addr.len() as libc::socklen_t;
        // SAFETY: addr/alen describe a live buffer.
        let fd = unsafe {
            libc::accept4(s.raw(), addr.as_mut_ptr().cast(), &mut alen, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd is fresh and ours.
        Ok((KernelSocket(Some(unsafe { OwnedFd::from_raw_fd(fd) })), alen as usize))
    }

    fn connect(&mut self, s: &KernelSocket, addr: &[u8]) -> Result<(), Errno> {
        // SAFETY: addr is a live buffer of the length passed.
        ok(unsafe { libc::connect(s.raw(), addr.as_ptr().cast(), addr.len() as u32) })
    }

    fn send(&mut self, s: &KernelSocket, data: &[u8], flags: i32, to: &[u8]) -> Result<usize, Errno> {
        let flags = flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        let (tp, tl) = if to.is_empty() { (std::ptr::null(), 0) } else { (to.as_ptr(), to.len()) };
        // SAFETY: data and to are live buffers of the lengths passed.
        len(unsafe { libc::sendto(s.raw(), data.as_ptr().cast(), data.len(), flags, tp.cast(), tl as u32) })
    }

    fn recv(&mut self, s: &KernelSocket, buf: &mut [u8], flags: i32, from: &mut [u8]) -> Result<(usize, usize), Errno> {
        let mut flen = from.len() as libc::socklen_t;
        // SAFETY: buf and from/flen describe live buffers.
        let n = len(unsafe {
            libc::recvfrom(
                s.raw(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT,
                from.as_mut_ptr().cast(),
                &mut flen,
            )
        })?;
        Ok((n, flen as usize))
    }

    fn recvmsg(
        &mut self,
        s: &KernelSocket,
        buf: &mut [u8],
        flags: i32,
        from: &mut [u8],
        control: &mut [u8],
    ) -> Result<Received, Errno> {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is plain data.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        m.msg_name = from.as_mut_ptr().cast();
        m.msg_namelen = from.len() as u32;
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        // An empty control buffer is a null one, as the guest's was: the kernel then reports
        // MSG_CTRUNC for any control message it had.
        if !control.is_empty() {
            m.msg_control = control.as_mut_ptr().cast();
            m.msg_controllen = control.len();
        }
        // SAFETY: m describes live buffers (buf, from, control) of the lengths given.
        let n = len(unsafe { libc::recvmsg(s.raw(), &mut m, flags | libc::MSG_DONTWAIT) })?;
        Ok(Received { len: n, from_len: m.msg_namelen as usize, control_len: m.msg_controllen, flags: m.msg_flags })
    }

    fn sendmsg(
        &mut self,
        s: &KernelSocket,
        data: &[u8],
        flags: i32,
        to: &[u8],
        control: &[u8],
    ) -> Result<usize, Errno> {
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
        // The guest's bytes are copied out of the shared pool into memory of our own.
        let mut ctl = control.to_vec();
        // SAFETY: msghdr is plain data.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        if !to.is_empty() {
            m.msg_name = to.as_ptr() as *mut _;
            m.msg_namelen = to.len() as u32;
        }
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = ctl.as_mut_ptr().cast();
        m.msg_controllen = ctl.len();
        // SAFETY: m describes live buffers (data, to, ctl) of the lengths given; the kernel only
        // reads them.
        len(unsafe { libc::sendmsg(s.raw(), &m, flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
    }

    fn shutdown(&mut self, s: &KernelSocket, how: i32) -> Result<(), Errno> {
        // SAFETY: no pointers; s is a socket this stack owns for the call's duration.
        ok(unsafe { libc::shutdown(s.raw(), how) })
    }

    fn getsockopt(&mut self, s: &KernelSocket, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno> {
        let mut l = val.len() as libc::socklen_t;
        // SAFETY: val/l describe a live buffer.
        ok(unsafe { libc::getsockopt(s.raw(), level, name, val.as_mut_ptr().cast(), &mut l) })?;
        Ok(l as usize)
    }

    fn setsockopt(&mut self, s: &KernelSocket, level: i32, name: i32, val: &[u8]) -> Result<(), Errno> {
        // SAFETY: val is a live buffer of the length passed.
        ok(unsafe { libc::setsockopt(s.raw(), level, name, val.as_ptr().cast(), val.len() as u32) })
    }

    fn getsockname(&mut self, s: &KernelSocket, addr: &mut [u8]) -> Result<usize, Errno> {
        let mut l = addr.len() as libc::socklen_t;
        // SAFETY: addr/l describe a live buffer.
        ok(unsafe { libc::getsockname(s.raw(), addr.as_mut_ptr().cast(), &mut l) })?;
        Ok(l as usize)
    }

    fn getpeername(&mut self, s: &KernelSocket, addr: &mut [u8]) -> Result<usize, Errno> {
        let mut l = addr.len() as libc::socklen_t;
        // SAFETY: addr/l describe a live buffer.
        ok(unsafe { libc::getpeername(s.raw(), addr.as_mut_ptr().cast(), &mut l) })?;
        Ok(l as usize)
    }

    fn ioctl(&mut self, s: &KernelSocket, request: u64) -> Result<i64, Errno> {
        if !matches!(request, libc::FIONREAD | libc::TIOCOUTQ | SIOCATMARK) {
            return Err(libc::ENOTTY);
        }
        let mut v: libc::c_int = 0;
        // SAFETY: the three requests allowed above write one int.
        ok(unsafe { libc::ioctl(s.raw(), request as _, &mut v) })?;
        Ok(v as i64)
    }

    fn poll_mask(&mut self, s: &KernelSocket) -> u32 {
        let mut p = libc::pollfd {
            fd: s.raw(),
            events: libc::POLLIN | libc::POLLOUT | libc::POLLPRI | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents as u16 as u32
    }

    /// The kernel's sockets and the system resolver share the NSM's namespace.
    fn system_resolver(&self) -> bool {
        true
    }

    /// Loopback, or an address of an interface of the NSM's network namespace.
    fn is_local(&mut self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
            v4 => v4,
        };
        if ip.is_loopback() {
            return true;
        }
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs only writes the list head, which is freed below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return false;
        }
        let mut found = false;
        let mut cur = head;
        while !cur.is_null() && !found {
            // SAFETY: cur is a node of the list getifaddrs returned, alive until freeifaddrs;
            // ifa_addr is null or points at a sockaddr of the family it names, so reading it
            // as sockaddr_in or sockaddr_in6 after checking the family stays in bounds.
            unsafe {
                let sa = (*cur).ifa_addr;
                if !sa.is_null() {
                    found = match i32::from((*sa).sa_family) {
                        libc::AF_INET => {
                            let a = &*sa.cast::<libc::sockaddr_in>();
                            IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))) == ip
                        }
                        libc::AF_INET6 => {
                            IpAddr::V6(Ipv6Addr::from((*sa.cast::<libc::sockaddr_in6>()).sin6_addr.s6_addr)) == ip
                        }
                        _ => false,
                    };
                }
                cur = (*cur).ifa_next;
            }
        }
        // SAFETY: head came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(head) };
        found
    }

    fn tcp_stats(&mut self, s: &KernelSocket) -> Option<TcpStats> {
        // SAFETY: tcp_info is plain data; all zeroes is a valid value.
        let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: ti and len describe a live tcp_info of the size passed.
        let r = unsafe {
            libc::getsockopt(
                s.raw(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut ti as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(TcpStats {
            state: ti.tcpi_state,
            rtt_us: ti.tcpi_rtt,
            cwnd: ti.tcpi_snd_cwnd,
            retrans: ti.tcpi_total_retrans,
            delivery_rate: ti.tcpi_delivery_rate,
        })
    }

    fn watch(&mut self, s: &KernelSocket, key: u64) -> Result<(), Errno> {
        let ep = self.epfd.as_raw_fd();
        // Most sockets are watched once, when made: one system call for them.
        match epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.raw(), SOCK_EVENTS, key) {
            Err(libc::EEXIST) => epoll_ctl(ep, libc::EPOLL_CTL_MOD, s.raw(), SOCK_EVENTS, key),
            r => r,
        }
    }

    fn movable(&self, _: &KernelSocket) -> bool {
        true
    }

    fn export(&mut self, s: &KernelSocket) -> Option<Exported> {
        Some(Exported { fd: Some(s.raw()), desc: None })
    }

    /// A socket from another NSM process; with `adopt`, a TCP one takes this stack's congestion
    /// control, as a socket made here would have.
    fn import(&mut self, fd: Option<OwnedFd>, _: Option<&[u8]>, adopt: bool) -> Result<KernelSocket, Errno> {
        let sock = KernelSocket(Some(fd.ok_or(libc::EBADF)?));
        if !adopt || self.congestion.is_none() {
            return Ok(sock);
        }
        let mut ty = [0u8; 4];
        let stream = self.getsockopt(&sock, libc::SOL_SOCKET, libc::SO_TYPE, &mut ty)? == 4
            && i32::from_ne_bytes(ty) == libc::SOCK_STREAM;
        if let (Some(cc), true) = (self.congestion.clone(), stream) {
            self.setsockopt(&sock, libc::IPPROTO_TCP, libc::TCP_CONGESTION, cc.as_bytes())?;
        }
        Ok(sock)
    }

    fn unwatch(&mut self, s: &KernelSocket) {
        let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, s.raw(), 0, 0);
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }

    /// The kernel moves the packets and runs the timers; this only collects the wakeups.
    fn poll(&mut self, _now: Instant, woken: bool, ready: &mut Vec<Ready>) -> Option<Instant> {
        if woken {
            // SAFETY: events is a live buffer of the length passed.
            let n = unsafe {
                libc::epoll_wait(self.epfd.as_raw_fd(), self.events.as_mut_ptr(), self.events.len() as i32, 0)
            };
            let got = &self.events[..n.max(0) as usize];
            ready.extend(got.iter().map(|e| Ready { key: e.u64, events: e.events & !(libc::EPOLLET as u32) }));
        }
        None
    }
}
