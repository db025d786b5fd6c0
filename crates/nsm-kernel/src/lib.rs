//! The kernel NSM's stack: Linux sockets in the NSM's own network namespace, non-blocking, with
//! the congestion control the provider configured. Every result and errno is the kernel's own,
//! which is what makes guests see Linux semantics.

use netkernel_service::stack::Received;
use netkernel_service::{Errno, Stack};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const SIOCATMARK: u64 = 0x8905;

/// Linux kernel TCP/UDP as a NetKernel stack.
pub struct KernelStack {
    congestion: Option<String>,
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
            let avail = available_congestion();
            if !avail.iter().any(|a| a == cc) {
                // Loading the module makes it available where the kernel has it built.
                let _ = std::process::Command::new("modprobe").arg(format!("tcp_{cc}")).status();
                if !available_congestion().iter().any(|a| a == cc) {
                    return Err(format!(
                        "congestion control {cc:?} not available (kernel offers: {})",
                        avail.join(" ")
                    ));
                }
            }
        }
        Ok(KernelStack { congestion })
    }
}

impl Stack for KernelStack {
    fn kind(&self) -> &'static str {
        "kernel"
    }

    fn congestion(&self) -> String {
        self.congestion.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap_or_default().trim().to_string()
        })
    }

    fn socket(&mut self, domain: i32, ty: i32, protocol: i32) -> Result<OwnedFd, Errno> {
        // SAFETY: plain system call.
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if let (Some(cc), libc::SOCK_STREAM) = (self.congestion.clone(), ty) {
            self.setsockopt(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, cc.as_bytes())?;
        }
        Ok(fd)
    }

    fn bind(&mut self, s: BorrowedFd, addr: &[u8]) -> Result<(), Errno> {
        // SAFETY: addr is a live buffer of the length passed.
        ok(unsafe { libc::bind(s.as_raw_fd(), addr.as_ptr().cast(), addr.len() as u32) })
    }

    fn listen(&mut self, s: BorrowedFd, backlog: i32) -> Result<(), Errno> {
        // SAFETY: plain system call.
        ok(unsafe { libc::listen(s.as_raw_fd(), backlog) })
    }

    fn accept(&mut self, s: BorrowedFd, addr: &mut [u8]) -> Result<(OwnedFd, usize), Errno> {
        let mut alen = addr.len() as libc::socklen_t;
        // SAFETY: addr/alen describe a live buffer.
        let fd = unsafe {
            libc::accept4(s.as_raw_fd(), addr.as_mut_ptr().cast(), &mut alen, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd is fresh and ours.
        Ok((unsafe { OwnedFd::from_raw_fd(fd) }, alen as usize))
    }

    fn connect(&mut self, s: BorrowedFd, addr: &[u8]) -> Result<(), Errno> {
        // SAFETY: addr is a live buffer of the length passed.
        ok(unsafe { libc::connect(s.as_raw_fd(), addr.as_ptr().cast(), addr.len() as u32) })
    }

    fn send(&mut self, s: BorrowedFd, data: &[u8], flags: i32, to: &[u8]) -> Result<usize, Errno> {
        let flags = flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        let (tp, tl) = if to.is_empty() { (std::ptr::null(), 0) } else { (to.as_ptr(), to.len()) };
        // SAFETY: data and to are live buffers of the lengths passed.
        len(unsafe { libc::sendto(s.as_raw_fd(), data.as_ptr().cast(), data.len(), flags, tp.cast(), tl as u32) })
    }

    fn recv(&mut self, s: BorrowedFd, buf: &mut [u8], flags: i32, from: &mut [u8]) -> Result<(usize, usize), Errno> {
        let mut flen = from.len() as libc::socklen_t;
        // SAFETY: buf and from/flen describe live buffers.
        let n = len(unsafe {
            libc::recvfrom(
                s.as_raw_fd(),
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
        s: BorrowedFd,
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
        let n = len(unsafe { libc::recvmsg(s.as_raw_fd(), &mut m, flags | libc::MSG_DONTWAIT) })?;
        Ok(Received { len: n, from_len: m.msg_namelen as usize, control_len: m.msg_controllen, flags: m.msg_flags })
    }

    fn sendmsg(&mut self, s: BorrowedFd, data: &[u8], flags: i32, to: &[u8], control: &[u8]) -> Result<usize, Errno> {
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
        len(unsafe { libc::sendmsg(s.as_raw_fd(), &m, flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
    }

    fn shutdown(&mut self, s: BorrowedFd, how: i32) -> Result<(), Errno> {
        // SAFETY: plain system call.
        ok(unsafe { libc::shutdown(s.as_raw_fd(), how) })
    }

    fn getsockopt(&mut self, s: BorrowedFd, level: i32, name: i32, val: &mut [u8]) -> Result<usize, Errno> {
        let mut l = val.len() as libc::socklen_t;
        // SAFETY: val/l describe a live buffer.
        ok(unsafe { libc::getsockopt(s.as_raw_fd(), level, name, val.as_mut_ptr().cast(), &mut l) })?;
        Ok(l as usize)
    }

    fn setsockopt(&mut self, s: BorrowedFd, level: i32, name: i32, val: &[u8]) -> Result<(), Errno> {
        // SAFETY: val is a live buffer of the length passed.
        ok(unsafe { libc::setsockopt(s.as_raw_fd(), level, name, val.as_ptr().cast(), val.len() as u32) })
    }

    fn getsockname(&mut self, s: BorrowedFd, addr: &mut [u8]) -> Result<usize, Errno> {
        let mut l = addr.len() as libc::socklen_t;
        // SAFETY: addr/l describe a live buffer.
        ok(unsafe { libc::getsockname(s.as_raw_fd(), addr.as_mut_ptr().cast(), &mut l) })?;
        Ok(l as usize)
    }

    fn getpeername(&mut self, s: BorrowedFd, addr: &mut [u8]) -> Result<usize, Errno> {
        let mut l = addr.len() as libc::socklen_t;
        // SAFETY: addr/l describe a live buffer.
        ok(unsafe { libc::getpeername(s.as_raw_fd(), addr.as_mut_ptr().cast(), &mut l) })?;
        Ok(l as usize)
    }

    fn ioctl(&mut self, s: BorrowedFd, request: u64) -> Result<i64, Errno> {
        if !matches!(request, libc::FIONREAD | libc::TIOCOUTQ | SIOCATMARK) {
            return Err(libc::ENOTTY);
        }
        let mut v: libc::c_int = 0;
        // SAFETY: the three requests allowed above write one int.
        ok(unsafe { libc::ioctl(s.as_raw_fd(), request as _, &mut v) })?;
        Ok(v as i64)
    }

    fn poll_mask(&mut self, s: BorrowedFd) -> u32 {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN | libc::POLLOUT | libc::POLLPRI | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents as u16 as u32
    }
}
