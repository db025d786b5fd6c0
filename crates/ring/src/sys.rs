//! Raw system calls used on both sides of a region. They go through `libc::syscall` so that
//! GuestLib, which interposes the libc wrappers of read/write/close/sendmsg/..., can use them
//! without re-entering itself.

use crate::frame;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

fn check(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. Returns Ok(false) on timeout.
/// The word lives in a MAP_SHARED region, so this is a shared (not PRIVATE) futex.
/// A signal without SA_RESTART surfaces as EINTR, as it would from a blocking socket call.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<bool> {
    let ts;
    let tsp = match timeout {
        Some(d) => {
            ts = libc::timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ };
            &ts as *const libc::timespec
        }
        None => std::ptr::null(),
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; `tsp` is null or
    // points at `ts`, which outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, tsp, 0, 0) };
    match check(r) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Wakes every waiter on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; `word` is valid.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0, 0, 0);
    }
}

/// A new non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<RawFd> {
    // SAFETY: plain system call with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_eventfd2, 0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    check(r).map(|fd| fd as RawFd)
}

/// Rings a doorbell: adds 1 to an eventfd. A full counter (never in practice) is ignored.
pub fn ring_bell(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local.
    unsafe {
        libc::syscall(libc::SYS_write, fd, &one as *const u64, 8);
    }
}

/// Drains an eventfd; returns the counter (0 when it was not readable).
pub fn drain_bell(fd: RawFd) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local.
    let r = unsafe { libc::syscall(libc::SYS_read, fd, &mut v as *mut u64, 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// A new epoll instance (close-on-exec).
pub fn epoll() -> io::Result<OwnedFd> {
    // SAFETY: integer flags only; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// epoll_ctl(2) with `events` under `token`.
pub fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a live local the kernel only reads; it checks both fds.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// close(2) without going through libc's (possibly interposed) wrapper.
pub fn close(fd: RawFd) {
    // SAFETY: closing an fd the caller owns.
    unsafe {
        libc::syscall(libc::SYS_close, fd);
    }
}

/// The most fds one message carries, well within what `recv_with_fds`'s control buffer (128
/// bytes) holds.
pub const MAX_FDS: usize = 24;

/// Sends `data` and `fds` as one message (SCM_RIGHTS) on a unix socket.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut cbuf = [0u64; 16];
    // SAFETY: libc::msghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at cbuf, which has room for one cmsg of `space` bytes
        // (128 bytes >= CMSG_SPACE(MAX_FDS * 4) = 112); the data pointer stays inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: msg and everything it points to is alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_sendmsg, sock, &msg as *const libc::msghdr, libc::MSG_NOSIGNAL) };
    check(r)
}

/// Receives one message and its fds (close-on-exec; at most 28 fit) from a unix socket.
/// Returns the byte count (0 at end of stream) and the fds.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<RawFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cbuf = [0u64; 16];
    // SAFETY: libc::msghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at live buffers for the call.
    let r = unsafe { libc::syscall(libc::SYS_recvmsg, sock, &mut msg as *mut libc::msghdr, libc::MSG_CMSG_CLOEXEC) };
    let n = check(r)?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed cmsgs within msg_controllen;
    // CMSG_FIRSTHDR/NXTHDR stay inside it and we copy out only whole fds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..bytes / 4 {
                    fds.push(std::ptr::read_unaligned(p.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, fds))
}

/// Largest control frame accepted; anything bigger is garbage, not a message.
pub const MAX_FRAME: usize = 64 << 20;

fn write_all(sock: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: data is a live slice for the call.
        let r = unsafe { libc::syscall(libc::SYS_sendto, sock, data.as_ptr(), data.len(), libc::MSG_NOSIGNAL, 0, 0) };
        match check(r) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One read of at most `buf.len()` bytes; 0 at end of stream.
fn read_some(sock: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a live, writable slice for the call.
    check(unsafe { libc::syscall(libc::SYS_recvfrom, sock, buf.as_mut_ptr(), buf.len(), 0, 0, 0) })
}

/// Sends one control frame on a unix stream socket: a u32 little-endian length, the payload,
/// and `fds` attached to the frame's first byte.
pub fn send_frame(sock: RawFd, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let first = frame::encode(payload);
    let n = loop {
        match send_with_fds(sock, &first, fds) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    write_all(sock, &first[n..])
}

/// Receives one control frame sent by [`send_frame`]. `Ok(None)` at a clean end of stream.
/// A frame longer than [`MAX_FRAME`] is refused with `InvalidData`.
pub fn recv_frame(sock: RawFd) -> io::Result<Option<(Vec<u8>, Vec<RawFd>)>> {
    recv_frame_max(sock, MAX_FRAME)
}

/// [`recv_frame`] refusing frames longer than `max` bytes. On any error the fds that came
/// with the frame are closed.
pub fn recv_frame_max(sock: RawFd, max: usize) -> io::Result<Option<(Vec<u8>, Vec<RawFd>)>> {
    let mut decoder = frame::Decoder::new(max);
    let mut fds = Vec::new();
    let fail = |fds: &[RawFd], e: io::Error| {
        fds.iter().for_each(|&fd| close(fd));
        Err(e)
    };
    loop {
        let first = !decoder.in_frame();
        let buf = decoder.buffer();
        // The fds ride on the frame's first byte: only that read needs recvmsg.
        let r = if first {
            recv_with_fds(sock, buf).map(|(n, got)| {
                fds.extend(got);
                n
            })
        } else {
            read_some(sock, buf)
        };
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(&fds, e),
        };
        if n == 0 {
            if decoder.in_frame() {
                return fail(&fds, io::ErrorKind::UnexpectedEof.into());
            }
            fds.iter().for_each(|&fd| close(fd));
            return Ok(None);
        }
        match decoder.filled(n) {
            Ok(Some(payload)) => return Ok(Some((payload, fds))),
            Ok(None) => {}
            Err(e) => return fail(&fds, io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// One step of a bounded busy-wait. Mostly a CPU pause; every 16th step yields, so that when
/// the peer we wait for (app, NSM) shares this CPU it runs at once instead of after our whole
/// spin budget.
pub fn relax(step: u32) {
    if step % 16 == 15 {
        // SAFETY: no arguments, no memory touched.
        unsafe { libc::syscall(libc::SYS_sched_yield) };
    } else {
        std::hint::spin_loop();
    }
}

/// The credentials of the process at the other end of unix socket `sock` (SO_PEERCRED), which
/// the engine and an NSM trust to decide who may attach or adopt.
pub fn peer_cred(sock: RawFd) -> io::Result<libc::ucred> {
    // SAFETY: libc::ucred is integers only, so all-zero bytes are a valid value.
    let mut c: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: c and len describe a live ucred of the size passed, which the kernel fills.
    let r = unsafe {
        libc::getsockopt(sock, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut c as *mut libc::ucred).cast(), &mut len)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(c)
}
