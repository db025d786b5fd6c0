//! GuestLib: loaded with LD_PRELOAD by `netkernel run`, it serves the program's AF_INET and
//! AF_INET6 TCP and UDP sockets through a NetKernel NSM over shared memory, with Linux socket
//! semantics, and sends every other fd straight to libc.
//!
//! Every interposed function starts with one load from the fd table; an fd GuestLib does not
//! own goes to the next libc definition with no lock and no allocation (programs call write()
//! from signal handlers). GuestLib's own system calls use `libc::syscall`, never the
//! interposed wrappers, so it cannot re-enter itself. Panics are caught at every hook and turn
//! into EIO.

mod exec_l;
mod inherit;
mod readiness;
mod real;
mod resolve;
mod sock;
mod state;
mod stdio;

use libc::{c_int, c_ulong, c_void, iovec, msghdr, nfds_t, pollfd, size_t, sockaddr, socklen_t, ssize_t};
use state::{lookup, Errno, Fd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

fn set_errno(e: Errno) {
    // SAFETY: errno is thread-local and always valid to write.
    unsafe { *libc::__errno_location() = e };
}

/// Runs a NetKernel operation: catches panics, maps Err(errno) to -1 with errno set.
fn guard<T: From<i8>>(f: impl FnOnce() -> Result<T, Errno>) -> T {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_errno(e);
            T::from(-1)
        }
        Err(_) => {
            set_errno(libc::EIO);
            T::from(-1)
        }
    }
}

/// Dispatches on what `fd` is: NetKernel socket, a stale one (its NSM died), or plain.
macro_rules! on_fd {
    ($fd:expr, |$slot:ident| $ours:expr, $plain:expr) => {
        match lookup($fd) {
            Fd::Plain => $plain,
            Fd::Sock($slot) => guard(|| $ours),
            Fd::Stale => guard(|| Err(libc::ECONNRESET)),
        }
    };
}

/// Whether GuestLib serves sockets at all in this process (`netkernel run` sets the socket).
fn enabled() -> bool {
    static ON: AtomicU8 = AtomicU8::new(0);
    match ON.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var_os("NETKERNEL_SOCKET").is_some();
            ON.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

fn served(domain: c_int, ty: c_int, proto: c_int) -> bool {
    let base = ty & 0xf;
    (domain == libc::AF_INET || domain == libc::AF_INET6)
        && ((base == libc::SOCK_STREAM && (proto == 0 || proto == libc::IPPROTO_TCP))
            || (base == libc::SOCK_DGRAM && (proto == 0 || proto == libc::IPPROTO_UDP)))
        && enabled()
}

fn isize_of(r: Result<usize, Errno>) -> Result<isize, Errno> {
    r.map(|n| n as isize)
}

/// # Safety
/// `iov` is null or valid for `n` entries.
unsafe fn iov_slice<'a>(iov: *const iovec, n: c_int) -> Result<&'a [iovec], Errno> {
    if !(0..=libc::UIO_MAXIOV).contains(&n) {
        return Err(libc::EINVAL);
    }
    if n == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: iov is non-null and valid for n entries, n in 1..=UIO_MAXIOV (this function's
    // contract, checked above).
    Ok(unsafe { std::slice::from_raw_parts(iov, n as usize) })
}

// ---- creation and connection management ----

/// # Safety
/// Interposes socket(2).
#[no_mangle]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int {
    if served(domain, ty, proto) {
        guard(|| sock::socket(domain, ty, proto))
    } else {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::socket(domain, ty, proto) }
    }
}

/// # Safety
/// Interposes bind(2).
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    on_fd!(fd, |s| sock::bind(s, addr, len), unsafe { real::bind(fd, addr, len) })
}

/// # Safety
/// Interposes listen(2).
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    on_fd!(fd, |s| sock::listen(s, backlog), unsafe { real::listen(fd, backlog) })
}

/// # Safety
/// Interposes accept(2).
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's pointers go unchanged to GuestLib's version or to the function this one
    // interposes; both have the contract of the interposed call, which the caller meets by calling
    // it.
    on_fd!(fd, |s| unsafe { sock::accept(s, addr, len, 0) }, unsafe { real::accept(fd, addr, len) })
}

/// # Safety
/// Interposes accept4(2).
#[no_mangle]
pub unsafe extern "C" fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    // SAFETY: the caller's pointers go unchanged to GuestLib's version or to the function this one
    // interposes; both have the contract of the interposed call, which the caller meets by calling
    // it.
    on_fd!(fd, |s| unsafe { sock::accept(s, addr, len, flags) }, unsafe { real::accept4(fd, addr, len, flags) })
}

/// # Safety
/// Interposes connect(2).
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    on_fd!(fd, |s| sock::connect(s, addr, len), unsafe { real::connect(fd, addr, len) })
}

/// # Safety
/// Interposes shutdown(2).
#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    on_fd!(fd, |s| sock::shutdown(s, how), unsafe { real::shutdown(fd, how) })
}

/// # Safety
/// Interposes close(2).
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    match lookup(fd) {
        Fd::Plain => {
            if readiness::is_mixed(fd) && !state::vfork_child() {
                readiness::forget_epoll(fd);
            }
        }
        // A vfork child's fd table is its own but GuestLib's tables are its parent's.
        _ if state::vfork_child() => {}
        _ => {
            if let Some(slot) = state::unmap_fd(fd) {
                let _ = std::panic::catch_unwind(|| sock::close_slot(slot));
            }
        }
    }
    // SAFETY: forwarding; the reserved fd of a NetKernel socket is a real fd to close.
    unsafe { real::close(fd) }
}

/// # Safety
/// Interposes getsockname(2).
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's pointers go unchanged to GuestLib's version or to the function this one
    // interposes; both have the contract of the interposed call, which the caller meets by calling
    // it.
    on_fd!(fd, |s| unsafe { sock::name(s, false, addr, len) }, unsafe { real::getsockname(fd, addr, len) })
}

/// # Safety
/// Interposes getpeername(2).
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's pointers go unchanged to GuestLib's version or to the function this one
    // interposes; both have the contract of the interposed call, which the caller meets by calling
    // it.
    on_fd!(fd, |s| unsafe { sock::name(s, true, addr, len) }, unsafe { real::getpeername(fd, addr, len) })
}

/// # Safety
/// Interposes getsockopt(2).
#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    on_fd!(
        fd,
        // SAFETY: the caller's pointers go unchanged to GuestLib's version or to the function this
        // one interposes; both have the contract of the interposed call, which the caller meets by
        // calling it.
        |s| unsafe { sock::getsockopt(s, level, name, val.cast(), len) },
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::getsockopt(fd, level, name, val, len) }
    )
}

/// # Safety
/// Interposes setsockopt(2).
#[no_mangle]
pub unsafe extern "C" fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int {
    on_fd!(
        fd,
        // SAFETY: the caller's pointers go unchanged to GuestLib's version or to the function this
        // one interposes; both have the contract of the interposed call, which the caller meets by
        // calling it.
        |s| unsafe { sock::setsockopt(s, level, name, val.cast(), len) },
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::setsockopt(fd, level, name, val, len) }
    )
}

// ---- data ----

/// # Safety
/// Interposes read(2).
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    let iov = [iovec { iov_base: buf, iov_len: n }];
    on_fd!(
        fd,
        // SAFETY: the caller's buffer, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| isize_of(unsafe { sock::recv(s, &iov, 0, &mut Default::default()) }),
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::read(fd, buf, n) }
    )
}

/// # Safety
/// Interposes write(2).
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    let iov = [iovec { iov_base: buf as *mut c_void, iov_len: n }];
    on_fd!(
        fd,
        // SAFETY: the caller's buffer, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| isize_of(unsafe { sock::send(s, &iov, 0, std::ptr::null(), 0) }),
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::write(fd, buf, n) }
    )
}

/// # Safety
/// Interposes readv(2).
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    on_fd!(
        fd,
        // SAFETY: the caller's iovecs, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| isize_of(unsafe { sock::recv(s, iov_slice(iov, n)?, 0, &mut Default::default()) }),
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::readv(fd, iov, n) }
    )
}

/// # Safety
/// Interposes writev(2).
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    on_fd!(
        fd,
        // SAFETY: the caller's iovecs, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| isize_of(unsafe { sock::send(s, iov_slice(iov, n)?, 0, std::ptr::null(), 0) }),
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::writev(fd, iov, n) }
    )
}

/// # Safety
/// Interposes send(2).
#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    let iov = [iovec { iov_base: buf as *mut c_void, iov_len: n }];
    on_fd!(
        fd,
        // SAFETY: the caller's buffer, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| isize_of(unsafe { sock::send(s, &iov, flags, std::ptr::null(), 0) }),
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::send(fd, buf, n, flags) }
    )
}

/// # Safety
/// Interposes sendto(2).
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    alen: socklen_t,
) -> ssize_t {
    let iov = [iovec { iov_base: buf as *mut c_void, iov_len: n }];
    on_fd!(
        fd,
        // SAFETY: the caller's buffer and address, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        |s| isize_of(unsafe { sock::send(s, &iov, flags, addr, alen) }),
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::sendto(fd, buf, n, flags, addr, alen) }
    )
}

/// # Safety
/// Interposes sendmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller's msghdr, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    on_fd!(fd, |s| unsafe { sendmsg_one(s, msg, flags) }, unsafe { real::sendmsg(fd, msg, flags) })
}

/// # Safety
/// `addr`/`alen` are null or valid as for recvfrom(2).
unsafe fn recv_into(
    s: u32,
    iov: &[iovec],
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> Result<isize, Errno> {
    let mut info = sock::RecvInfo::default();
    // SAFETY: the caller's buffers, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    let n = unsafe { sock::recv(s, iov, flags, &mut info) }?;
    // SAFETY: the caller's address buffer, valid as the contract of the call this function
    // interposes requires, which GuestLib's version shares.
    unsafe { sock::addr_out(&info.from, info.from_len, addr, alen) };
    Ok(n as isize)
}

/// # Safety
/// Interposes recv(2).
#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    let iov = [iovec { iov_base: buf, iov_len: n }];
    on_fd!(
        fd,
        // SAFETY: the caller's buffer, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| unsafe { recv_into(s, &iov, flags, std::ptr::null_mut(), std::ptr::null_mut()) },
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::recv(fd, buf, n, flags) }
    )
}

/// # Safety
/// Interposes recvfrom(2).
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    let iov = [iovec { iov_base: buf, iov_len: n }];
    on_fd!(
        fd,
        // SAFETY: the caller's buffers, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| unsafe { recv_into(s, &iov, flags, addr, alen) },
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::recvfrom(fd, buf, n, flags, addr, alen) }
    )
}

/// # Safety
/// Interposes recvmsg(2).
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller's msghdr, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    on_fd!(fd, |s| unsafe { recvmsg_one(s, msg, flags) }, unsafe { real::recvmsg(fd, msg, flags) })
}

/// One recvmsg on a NetKernel socket, with the ancillary data the NSM's recvmsg produced.
///
/// # Safety
/// `msg` is null or a valid msghdr whose buffers are valid.
unsafe fn recvmsg_one(s: u32, msg: *mut msghdr, flags: c_int) -> Result<isize, Errno> {
    // SAFETY: msg is null or a valid msghdr whose buffers are valid (this function's contract);
    // as_mut maps null to None.
    let m = unsafe { msg.as_mut() }.ok_or(libc::EFAULT)?;
    let cap = if m.msg_control.is_null() { 0 } else { m.msg_controllen };
    let mut info = sock::RecvInfo { control: Some((m.msg_control.cast(), cap)), ..Default::default() };
    // SAFETY: the caller's iovecs, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    let n = unsafe { sock::recv(s, iov_slice(m.msg_iov, m.msg_iovlen as c_int)?, flags, &mut info) }?;
    // SAFETY: the caller's address buffer, valid as the contract of the call this function
    // interposes requires, which GuestLib's version shares.
    unsafe { sock::addr_out(&info.from, info.from_len, m.msg_name.cast(), &mut m.msg_namelen) };
    m.msg_controllen = info.control_len;
    m.msg_flags = info.msg_flags | if info.truncated { libc::MSG_TRUNC } else { 0 };
    Ok(n as isize)
}

/// One sendmsg on a NetKernel socket, its control messages passed to the NSM's sendmsg.
///
/// # Safety
/// `msg` is null or a valid msghdr whose buffers are valid.
unsafe fn sendmsg_one(s: u32, msg: *const msghdr, flags: c_int) -> Result<isize, Errno> {
    // SAFETY: msg is null or a valid msghdr whose buffers are valid (this function's contract);
    // as_ref maps null to None.
    let m = unsafe { msg.as_ref() }.ok_or(libc::EFAULT)?;
    let control: &[u8] = if m.msg_control.is_null() || m.msg_controllen == 0 {
        &[]
    } else {
        // SAFETY: the caller's control buffer of msg_controllen bytes, valid as the contract of the
        // call this function interposes requires, which GuestLib's version shares.
        unsafe { std::slice::from_raw_parts(m.msg_control.cast(), m.msg_controllen) }
    };
    // SAFETY: the caller's iovecs and address, valid as the contract of the call this function
    // interposes requires, which GuestLib's version shares.
    isize_of(unsafe {
        sock::send_msg(
            s,
            iov_slice(m.msg_iov, m.msg_iovlen as c_int)?,
            flags,
            m.msg_name.cast(),
            m.msg_namelen,
            control,
        )
    })
}

/// Applies `one` to each message of an mmsghdr vector, as sendmmsg/recvmmsg do: the count of
/// messages done, or the first message's error when none was.
///
/// # Safety
/// `vec` is valid for `n` entries.
unsafe fn each_msg(
    vec: *mut libc::mmsghdr,
    n: libc::c_uint,
    mut one: impl FnMut(usize, *mut msghdr) -> Result<isize, Errno>,
) -> Result<c_int, Errno> {
    if vec.is_null() {
        return Err(libc::EFAULT);
    }
    let n = n.min(libc::UIO_MAXIOV as libc::c_uint) as usize;
    for i in 0..n {
        // SAFETY: vec is non-null (checked above) and valid for the caller's n entries (this
        // function's contract), and i < n.
        let e = unsafe { &mut *vec.add(i) };
        match one(i, &mut e.msg_hdr) {
            Ok(len) => e.msg_len = len as libc::c_uint,
            Err(err) if i == 0 => return Err(err),
            Err(_) => return Ok(i as c_int),
        }
    }
    Ok(n as c_int)
}

/// # Safety
/// Interposes sendmmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(fd: c_int, vec: *mut libc::mmsghdr, n: libc::c_uint, flags: c_int) -> c_int {
    on_fd!(
        fd,
        // SAFETY: the caller's vector, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| unsafe { each_msg(vec, n, |_, m| sendmsg_one(s, m, flags)) },
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::sendmmsg(fd, vec, n, flags) }
    )
}

/// # Safety
/// Interposes recvmmsg(2). MSG_WAITFORONE makes every message after the first non-blocking;
/// the timeout, as on Linux, is only looked at between messages.
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    vec: *mut libc::mmsghdr,
    n: libc::c_uint,
    flags: c_int,
    timeout: *mut libc::timespec,
) -> c_int {
    // SAFETY: the caller's timespec, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    let deadline = unsafe { readiness::ts(timeout) }.map(|d| Instant::now() + d);
    on_fd!(
        fd,
        // SAFETY: the caller's vector, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        |s| unsafe {
            each_msg(vec, n, |i, m| {
                if i > 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(libc::EAGAIN);
                }
                let f = if i > 0 && flags & libc::MSG_WAITFORONE != 0 { flags | libc::MSG_DONTWAIT } else { flags };
                recvmsg_one(s, m, f & !libc::MSG_WAITFORONE)
            })
        },
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::recvmmsg(fd, vec, n, flags, timeout) }
    )
}

// ---- fd control ----

/// # Safety
/// Interposes fcntl(2) (variadic in C; the third argument arrives in a register either way).
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: forwarding; for a NetKernel socket this acts on its reserved fd, which keeps
    // F_GETFL and FD_CLOEXEC truthful.
    let r = unsafe { real::fcntl(fd, cmd, arg) };
    if r < 0 {
        return r;
    }
    match (lookup(fd), cmd) {
        (Fd::Sock(s), libc::F_SETFL) => {
            let st = state::sock_state(s);
            if arg as c_int & libc::O_NONBLOCK != 0 {
                st.flags.fetch_or(state::F_NONBLOCK, Ordering::Relaxed);
            } else {
                st.flags.fetch_and(!state::F_NONBLOCK, Ordering::Relaxed);
            }
        }
        (_, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) if state::vfork_child() => {}
        (Fd::Sock(s), libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => {
            state::map_fd(r, s);
        }
        (Fd::Plain, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => readiness::dup_epoll(fd, r),
        (Fd::Stale, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) => state::dup_stale(fd, r),
        _ => {}
    }
    r
}

/// # Safety
/// Interposes fcntl64.
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: fcntl64 is fcntl on 64-bit Linux: the caller meets the contract of the fcntl called
    // here.
    unsafe { fcntl(fd, cmd, arg) }
}

/// # Safety
/// Interposes ioctl(2).
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: c_ulong) -> c_int {
    let Fd::Sock(s) = lookup(fd) else {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        return unsafe { real::ioctl(fd, req, arg) };
    };
    const SIOCATMARK: c_ulong = 0x8905;
    match req {
        libc::FIONBIO => {
            // SAFETY: forwarding; mirrors O_NONBLOCK onto the reserved fd.
            let r = unsafe { real::ioctl(fd, req, arg) };
            if r == 0 {
                // SAFETY: FIONBIO's argument is an int pointer the kernel just read.
                let on = unsafe { *(arg as *const c_int) } != 0;
                let st = state::sock_state(s);
                if on {
                    st.flags.fetch_or(state::F_NONBLOCK, Ordering::Relaxed);
                } else {
                    st.flags.fetch_and(!state::F_NONBLOCK, Ordering::Relaxed);
                }
            }
            r
        }
        libc::FIONREAD | libc::TIOCOUTQ | SIOCATMARK => guard(|| {
            let v = sock::ioctl_int(s, req)?;
            let p = arg as *mut c_int;
            if p.is_null() {
                return Err(libc::EFAULT);
            }
            // SAFETY: these requests take an int pointer.
            unsafe { *p = v };
            Ok(0)
        }),
        // SAFETY: forwarding to the reserved fd (interface queries and the like).
        _ => unsafe { real::ioctl(fd, req, arg) },
    }
}

fn after_dup(old: c_int, new: c_int) {
    // A vfork child (python's subprocess dup2()s in one) must leave its parent's tables alone;
    // its exec finds the sockets it passes on by inode.
    if new < 0 || old == new || state::vfork_child() {
        return;
    }
    if let Some(slot) = state::unmap_fd(new) {
        sock::close_slot(slot);
    }
    match lookup(old) {
        Fd::Sock(s) => {
            state::map_fd(new, s);
        }
        Fd::Plain => readiness::dup_epoll(old, new),
        Fd::Stale => state::dup_stale(old, new),
    }
}

/// # Safety
/// Interposes dup(2).
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    let r = unsafe { real::dup(fd) };
    after_dup(fd, r);
    r
}

/// # Safety
/// Interposes dup2(2).
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    let r = unsafe { real::dup2(old, new) };
    after_dup(old, r);
    r
}

/// # Safety
/// Interposes dup3(2).
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    let r = unsafe { real::dup3(old, new, flags) };
    after_dup(old, r);
    r
}

// ---- processes ----

/// # Safety
/// Interposes fork(2). The child shares the parent's attachment: every NetKernel fd gains a
/// reference for it before the fork, and the parent asks the engine to keep the attachment
/// alive until the child exits too.
#[no_mangle]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    let att = state::current().filter(|a| !a.dead() && state::owns_memory());
    let holder = att.and_then(state::share_fds);
    IN_FORK.with(|f| f.set(true));
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    let pid = unsafe { real::fork() };
    IN_FORK.with(|f| f.set(false));
    match (pid, att, holder) {
        (0, _, _) => {
            state::after_fork_in_child();
            readiness::after_fork_in_child();
        }
        (p, Some(a), Some(h)) if p < 0 => state::unshare_fds(a, h),
        (p, Some(a), Some(h)) if p > 0 => {
            let _ = std::panic::catch_unwind(|| a.hold_for(p, h));
        }
        _ => {}
    }
    pid
}

thread_local! {
    /// This thread is inside the fork() wrapper, which does the sharing itself.
    static IN_FORK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// A fork inside libc (daemon(), ...) seen by the atfork handlers: the holder index reserved
    /// for the child and the pipe on which the child tells the parent its pid.
    static LIBC_FORK: std::cell::Cell<Option<(u32, [c_int; 2])>> = const { std::cell::Cell::new(None) };
}

/// pthread_atfork prepare: a fork that did not go through the fork() wrapper (libc's own, in
/// daemon() for one) shares the sockets the same way. The parent learns the child's pid from
/// the child itself, and holds the attachment for it before the fork returns, so a daemon()
/// parent that exits at once does not take the sockets with it.
extern "C" fn atfork_prepare() {
    if IN_FORK.with(|f| f.get()) {
        return;
    }
    let Some(a) = state::current().filter(|a| !a.dead() && state::owns_memory()) else { return };
    let Some(h) = state::share_fds(a) else { return };
    let mut p = [-1; 2];
    // SAFETY: p is a live array of two ints.
    if unsafe { libc::syscall(libc::SYS_pipe2, p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        state::unshare_fds(a, h);
        return;
    }
    LIBC_FORK.with(|f| f.set(Some((h, p))));
}

extern "C" fn atfork_parent() {
    let Some((h, p)) = LIBC_FORK.with(|f| f.take()) else { return };
    netkernel_ring::sys::close(p[1]);
    let mut pid = [0u8; 4];
    // The child writes at once. If the fork failed, the pipe reads EOF, unless a child another
    // thread forked meanwhile inherited its write end: hence the bound on the wait.
    let mut pfd = libc::pollfd { fd: p[0], events: libc::POLLIN, revents: 0 };
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = libc::timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos() as i64 };
        // SAFETY: one live pollfd and timespec; a raw system call, not the interposed poll.
        let r = unsafe { libc::syscall(libc::SYS_ppoll, &mut pfd, 1, &ts, std::ptr::null::<u8>(), 8) };
        let interrupted = || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
        if r == 0 || (r < 0 && !interrupted()) {
            break -1;
        }
        if r < 0 {
            continue;
        }
        // SAFETY: reading into a live 4-byte buffer; the pipe is readable.
        let n = unsafe { libc::syscall(libc::SYS_read, p[0], pid.as_mut_ptr(), 4) };
        if n >= 0 || !interrupted() {
            break n;
        }
    };
    netkernel_ring::sys::close(p[0]);
    let Some(a) = state::current() else { return };
    if n == 4 {
        let _ = std::panic::catch_unwind(|| a.hold_for(i32::from_ne_bytes(pid), h));
    } else {
        // The fork failed: no child wrote (or none within the bound: the child's sockets then
        // close with this process, as when the engine refuses a hold).
        state::unshare_fds(a, h);
    }
}

extern "C" fn atfork_child() {
    if IN_FORK.with(|f| f.get()) {
        return;
    }
    let Some((_, p)) = LIBC_FORK.with(|f| f.take()) else { return };
    state::after_fork_in_child();
    readiness::after_fork_in_child();
    let pid = state::getpid().to_ne_bytes();
    // SAFETY: writes 4 bytes to the pipe the parent waits on.
    unsafe { libc::syscall(libc::SYS_write, p[1], pid.as_ptr(), 4) };
    netkernel_ring::sys::close(p[0]);
    netkernel_ring::sys::close(p[1]);
}

/// Runs when the library is loaded, before main: registers the fork handlers for forks inside
/// libc, and rejoins the attachment of NetKernel sockets inherited across exec.
extern "C" fn at_load() {
    // SAFETY: registers handlers that live as long as the process (the library is never unloaded).
    unsafe { libc::pthread_atfork(Some(atfork_prepare), Some(atfork_parent), Some(atfork_child)) };
    if enabled() {
        let _ = std::panic::catch_unwind(inherit::rejoin_at_load);
        stdio::adopt_std_streams();
    }
}

#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

type CStr = *const libc::c_char;

extern "C" {
    static environ: *const CStr;
}

/// Runs an exec: close-on-exec NetKernel fds are released first (and restored if it fails), and
/// the sockets that survive are handed to the new program (`inherit`). `f` gets the environment
/// to use: `envp` or, with a handoff, a copy with NETKERNEL_INHERIT. Nothing here allocates in a
/// vfork child.
///
/// # Safety
/// `envp` is a NULL-terminated array of C strings.
unsafe fn exec_with(envp: *const CStr, f: impl FnOnce(*const CStr) -> c_int) -> c_int {
    let vfork = state::vfork_child();
    let (dropped, last) =
        if vfork { Default::default() } else { std::panic::catch_unwind(state::before_exec).unwrap_or_default() };
    for slot in last {
        let _ = std::panic::catch_unwind(|| sock::close_slot(slot));
    }
    let to = if vfork || state::holder_shared() { inherit::To::ExecNewHolder } else { inherit::To::Exec };
    // SAFETY: envp is a NULL-terminated array of C strings, as the exec call this function serves
    // requires of its caller: prepare's contract.
    let handoff = if enabled() { unsafe { inherit::prepare(envp, to, &[]) } } else { None };
    let r = f(handoff.as_ref().map_or(envp, |h| h.envp()));
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if let Some(h) = handoff {
        h.finish(true);
    }
    state::exec_failed(dropped);
    set_errno(e);
    r
}

/// # Safety
/// Interposes execve(2).
#[no_mangle]
pub unsafe extern "C" fn execve(path: CStr, argv: *const CStr, envp: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::execve(path, argv, env)) }
}

/// # Safety
/// Interposes execv(3).
#[no_mangle]
pub unsafe extern "C" fn execv(path: CStr, argv: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and environ
    // is the process's own (valid) environment, as the execv family uses.
    unsafe { exec_with(environ, |env| real::execve(path, argv, env)) }
}

/// # Safety
/// Interposes execvp(3).
#[no_mangle]
pub unsafe extern "C" fn execvp(file: CStr, argv: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and environ
    // is the process's own (valid) environment, as the execv family uses.
    unsafe { exec_with(environ, |env| real::execvpe(file, argv, env)) }
}

/// # Safety
/// Interposes execvpe(3).
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: CStr, argv: *const CStr, envp: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::execvpe(file, argv, env)) }
}

/// # Safety
/// Interposes fexecve(3).
#[no_mangle]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const CStr, envp: *const CStr) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::fexecve(fd, argv, env)) }
}

/// # Safety
/// Interposes execveat(2) (glibc ≥ 2.34 wraps it).
#[no_mangle]
pub unsafe extern "C" fn execveat(
    dirfd: c_int,
    path: CStr,
    argv: *const CStr,
    envp: *const CStr,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { exec_with(envp, |env| real::execveat(dirfd, path, argv, env, flags)) }
}

/// Slots that posix_spawn file actions dup2 onto other fd numbers, by file-actions object: the
/// child gets them although the parent's fds may be close-on-exec.
static SPAWN_DUPS: std::sync::Mutex<Vec<(usize, u32)>> = std::sync::Mutex::new(Vec::new());

/// # Safety
/// Interposes posix_spawn_file_actions_adddup2(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn_file_actions_adddup2(
    fa: *mut libc::posix_spawn_file_actions_t,
    fd: c_int,
    newfd: c_int,
) -> c_int {
    if let Fd::Sock(s) = lookup(fd) {
        SPAWN_DUPS.lock().unwrap_or_else(|e| e.into_inner()).push((fa as usize, s));
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::posix_spawn_file_actions_adddup2(fa, fd, newfd) }
}

/// # Safety
/// Interposes posix_spawn_file_actions_destroy(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn_file_actions_destroy(fa: *mut libc::posix_spawn_file_actions_t) -> c_int {
    SPAWN_DUPS.lock().unwrap_or_else(|e| e.into_inner()).retain(|&(f, _)| f != fa as usize);
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::posix_spawn_file_actions_destroy(fa) }
}

/// posix_spawn and posix_spawnp: glibc's child never runs GuestLib's fork or exec hooks, so the
/// parent hands the sockets on itself: a holder index for the child, the handoff in the
/// environment, then `hold` for the child once its pid is known.
///
/// # Safety
/// As posix_spawn(3).
unsafe fn spawn_with(
    pid: *mut libc::pid_t,
    fa: *const libc::posix_spawn_file_actions_t,
    envp: *const CStr,
    f: impl FnOnce(*mut libc::pid_t, *const CStr) -> c_int,
) -> c_int {
    let handoff = if enabled() && state::owns_memory() {
        let extra: Vec<u32> = SPAWN_DUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|&&(f, _)| !fa.is_null() && f == fa as usize)
            .map(|&(_, s)| s)
            .collect();
        // SAFETY: envp is a NULL-terminated array of C strings, as posix_spawn requires of its
        // caller: prepare's contract.
        unsafe { inherit::prepare(envp, inherit::To::Spawn, &extra) }
    } else {
        None
    };
    let mut child: libc::pid_t = 0;
    let r = f(&mut child, handoff.as_ref().map_or(envp, |h| h.envp()));
    if !pid.is_null() {
        // SAFETY: the caller's out-pointer, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        unsafe { *pid = child };
    }
    if let Some(h) = handoff {
        let ok = r == 0;
        let holder = h.holder();
        h.finish(!ok);
        if let (true, Some(a), Some(holder)) = (ok, state::current(), holder) {
            let _ = std::panic::catch_unwind(|| a.hold_for(child, holder));
        }
    }
    r
}

/// # Safety
/// Interposes posix_spawn(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: CStr,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { spawn_with(pid, fa, envp.cast(), |p, env| real::posix_spawn(p, path, fa, attr, argv, env.cast())) }
}

/// # Safety
/// Interposes posix_spawnp(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: CStr,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { spawn_with(pid, fa, envp.cast(), |p, env| real::posix_spawnp(p, file, fa, attr, argv, env.cast())) }
}

/// # Safety
/// Interposes sendfile(2): file bytes go through the socket's ordinary send path.
#[no_mangle]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut libc::off_t, count: size_t) -> ssize_t {
    // SAFETY: the caller's offset pointer, valid as the contract of the call this function
    // interposes requires, which GuestLib's version shares.
    on_fd!(out, |s| isize_of(unsafe { sock::sendfile(s, inp, off, count) }), unsafe {
        real::sendfile(out, inp, off, count)
    })
}

/// # Safety
/// Interposes sendfile64 (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn sendfile64(out: c_int, inp: c_int, off: *mut libc::off_t, count: size_t) -> ssize_t {
    // SAFETY: sendfile64 is sendfile on 64-bit Linux: the caller meets the contract of the sendfile
    // called here.
    unsafe { sendfile(out, inp, off, count) }
}

/// # Safety
/// Interposes splice(2) where one end is a NetKernel socket: bytes are moved through a buffer
/// with the socket's own recv/send (no page moving, but the same results).
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut libc::loff_t,
    fd_out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: libc::c_uint,
) -> ssize_t {
    match (lookup(fd_in), lookup(fd_out)) {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        (Fd::Plain, Fd::Plain) => unsafe { real::splice(fd_in, off_in, fd_out, off_out, len, flags) },
        (Fd::Stale, _) | (_, Fd::Stale) => guard(|| Err(libc::ECONNRESET)),
        (Fd::Sock(_), Fd::Sock(_)) => guard(|| Err(libc::EINVAL)),
        (Fd::Sock(s), Fd::Plain) => guard(|| {
            if !off_in.is_null() {
                return Err(libc::ESPIPE);
            }
            let mut buf = vec![0u8; len.min(1 << 16)];
            let iov = [iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
            // SAFETY: iov describes buf, a live Vec of buf.len() bytes owned here.
            // SPLICE_F_NONBLOCK concerns the pipe; the socket blocks per its own O_NONBLOCK.
            let n = unsafe { sock::recv(s, &iov, 0, &mut Default::default()) }?;
            // SAFETY: writing our own buffer to the caller's fd, at the caller's offset if any.
            unsafe { write_all_to(fd_out, off_out, &buf[..n]) }?;
            Ok(n as isize)
        }),
        (Fd::Plain, Fd::Sock(s)) => guard(|| {
            if !off_out.is_null() {
                return Err(libc::ESPIPE);
            }
            let mut buf = vec![0u8; len.min(256 << 10)];
            // SAFETY: reading into our own buffer, at the caller's offset if any.
            let n = unsafe {
                match off_in.as_mut() {
                    Some(o) => libc::syscall(libc::SYS_pread64, fd_in, buf.as_mut_ptr(), buf.len(), *o),
                    None => libc::syscall(libc::SYS_read, fd_in, buf.as_mut_ptr(), buf.len()),
                }
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
            }
            let iov = [iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: n as usize }];
            // The bytes have left the pipe: send them all, blocking if need be.
            // SAFETY: iov describes the first n bytes of buf, a live Vec owned here (n <=
            // buf.len(): what the read into it returned).
            let sent = unsafe { sock::send(s, &iov, 0, std::ptr::null(), 0) }?;
            // SAFETY: off_in is null or a valid loff_t, as splice(2) requires of the caller; as_mut
            // maps null to None.
            if let Some(o) = unsafe { off_in.as_mut() } {
                *o += sent as libc::loff_t;
            }
            Ok(sent as isize)
        }),
    }
}

/// Writes all of `data` to a plain fd (at `*off`, advancing it, when given).
///
/// # Safety
/// `off` is null or valid.
unsafe fn write_all_to(fd: c_int, off: *mut libc::loff_t, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        // SAFETY: our own buffer; the offset per the contract.
        let r = unsafe {
            match off.as_mut() {
                Some(o) => libc::syscall(libc::SYS_pwrite64, fd, data.as_ptr(), data.len(), *o),
                None => libc::syscall(libc::SYS_write, fd, data.as_ptr(), data.len()),
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        // SAFETY: off is null or a valid off_t, as sendfile(2) requires of the caller; as_mut maps
        // null to None.
        if let Some(o) = unsafe { off.as_mut() } {
            *o += r as libc::loff_t;
        }
        data = &data[r as usize..];
    }
    Ok(())
}

// ---- names ----

/// # Safety
/// Interposes getaddrinfo(3): names are resolved by the NSM (the provider's resolver), numeric
/// hosts locally, as before.
#[no_mangle]
pub unsafe extern "C" fn getaddrinfo(
    node: *const libc::c_char,
    service: *const libc::c_char,
    hints: *const libc::addrinfo,
    res: *mut *mut libc::addrinfo,
) -> c_int {
    // SAFETY: the caller's arguments, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    if enabled() && unsafe { resolve::wants_provider(node, hints) } {
        // SAFETY: the caller's arguments, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        return std::panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            resolve::getaddrinfo(node, service, hints, res)
        }))
        .unwrap_or(libc::EAI_SYSTEM);
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::getaddrinfo(node, service, hints, res) }
}

/// # Safety
/// Interposes freeaddrinfo(3): lists GuestLib made are freed here, glibc's by glibc.
#[no_mangle]
pub unsafe extern "C" fn freeaddrinfo(ai: *mut libc::addrinfo) {
    // SAFETY: the caller's list, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    if unsafe { resolve::is_ours(ai) } {
        // SAFETY: is_ours held: ai heads a list GuestLib allocated, freeaddrinfo's contract.
        unsafe { resolve::freeaddrinfo(ai) }
    } else {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        unsafe { real::freeaddrinfo(ai) }
    }
}

/// # Safety
/// Interposes gethostbyname(3): names go to the provider, numeric addresses to glibc.
#[no_mangle]
pub unsafe extern "C" fn gethostbyname(name: *const libc::c_char) -> *mut libc::hostent {
    // SAFETY: the caller's name, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    if enabled() && unsafe { resolve::is_name(name) } {
        return std::panic::catch_unwind(|| resolve::gethostbyname2(name, libc::AF_INET))
            .unwrap_or(std::ptr::null_mut());
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::gethostbyname(name) }
}

/// # Safety
/// Interposes gethostbyname2(3).
#[no_mangle]
pub unsafe extern "C" fn gethostbyname2(name: *const libc::c_char, af: c_int) -> *mut libc::hostent {
    // SAFETY: the caller's name, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    if enabled() && unsafe { resolve::is_name(name) } {
        return std::panic::catch_unwind(|| resolve::gethostbyname2(name, af)).unwrap_or(std::ptr::null_mut());
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::gethostbyname2(name, af) }
}

/// # Safety
/// Interposes gethostbyname_r(3).
#[no_mangle]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const libc::c_char,
    ret: *mut libc::hostent,
    buf: *mut libc::c_char,
    buflen: size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: the caller's arguments, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    unsafe { gethostbyname2_r(name, libc::AF_INET, ret, buf, buflen, result, h_errnop) }
}

/// # Safety
/// Interposes gethostbyname2_r(3).
#[no_mangle]
pub unsafe extern "C" fn gethostbyname2_r(
    name: *const libc::c_char,
    af: c_int,
    ret: *mut libc::hostent,
    buf: *mut libc::c_char,
    buflen: size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: the caller's name, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    if enabled() && unsafe { resolve::is_name(name) } {
        // SAFETY: the caller's arguments, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        return std::panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            resolve::gethostbyname2_r(name, af, ret, buf, buflen, result, h_errnop)
        }))
        .unwrap_or(libc::EIO);
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::gethostbyname2_r(name, af, ret, buf, buflen, result, h_errnop) }
}

/// # Safety
/// Interposes gethostbyaddr(3): reverse lookups go to the provider.
#[no_mangle]
pub unsafe extern "C" fn gethostbyaddr(addr: *const c_void, len: socklen_t, af: c_int) -> *mut libc::hostent {
    if enabled() {
        return std::panic::catch_unwind(|| resolve::gethostbyaddr(addr, len, af)).unwrap_or(std::ptr::null_mut());
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::gethostbyaddr(addr, len, af) }
}

/// # Safety
/// Interposes gethostbyaddr_r(3).
#[no_mangle]
pub unsafe extern "C" fn gethostbyaddr_r(
    addr: *const c_void,
    len: socklen_t,
    af: c_int,
    ret: *mut libc::hostent,
    buf: *mut libc::c_char,
    buflen: size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    if enabled() {
        // SAFETY: the caller's arguments, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        return std::panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            resolve::gethostbyaddr_r(addr, len, af, ret, buf, buflen, result, h_errnop)
        }))
        .unwrap_or(libc::EIO);
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::gethostbyaddr_r(addr, len, af, ret, buf, buflen, result, h_errnop) }
}

/// # Safety
/// Interposes getnameinfo(3): a host name is the provider's; numeric hosts (NI_NUMERICHOST) and
/// services are glibc's, which looks nothing up for them.
#[no_mangle]
pub unsafe extern "C" fn getnameinfo(
    sa: *const sockaddr,
    salen: socklen_t,
    host: *mut libc::c_char,
    hostlen: socklen_t,
    serv: *mut libc::c_char,
    servlen: socklen_t,
    flags: c_int,
) -> c_int {
    if enabled() && !host.is_null() && hostlen > 0 && flags & libc::NI_NUMERICHOST == 0 && !sa.is_null() {
        // SAFETY: the caller's arguments, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        return std::panic::catch_unwind(AssertUnwindSafe(|| unsafe {
            resolve::getnameinfo(sa, salen, host, hostlen, serv, servlen, flags)
        }))
        .unwrap_or(libc::EAI_SYSTEM);
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::getnameinfo(sa, salen, host, hostlen, serv, servlen, flags) }
}

// ---- readiness ----

fn any_ours(fds: &[pollfd]) -> bool {
    fds.iter().any(|p| lookup(p.fd) != Fd::Plain)
}

/// # Safety
/// Interposes poll(2).
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int {
    if !fds.is_null() && n > 0 {
        // SAFETY: the caller's array of n pollfds, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        let s = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
        if any_ours(s) {
            return guard(|| readiness::poll(s, readiness::ms(timeout), std::ptr::null()));
        }
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::poll(fds, n, timeout) }
}

/// # Safety
/// Interposes ppoll(2).
#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    n: nfds_t,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    if !fds.is_null() && n > 0 {
        // SAFETY: the caller's array of n pollfds, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        let s = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
        if any_ours(s) {
            // SAFETY: the caller's timespec, valid as the contract of the call this function
            // interposes requires, which GuestLib's version shares.
            let t = unsafe { readiness::ts(ts) };
            return guard(|| readiness::poll(s, t, mask));
        }
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::ppoll(fds, n, ts, mask) }
}

/// # Safety
/// Interposes __poll_chk (poll with _FORTIFY_SOURCE).
#[no_mangle]
pub unsafe extern "C" fn __poll_chk(fds: *mut pollfd, n: nfds_t, timeout: c_int, fdslen: size_t) -> c_int {
    if fdslen / std::mem::size_of::<pollfd>() < n as usize {
        // SAFETY: the fortify failure path, as glibc's.
        unsafe { chk_fail() }
    }
    // SAFETY: same contract as poll.
    unsafe { poll(fds, n, timeout) }
}

fn sets_hold_ours(n: c_int, sets: [*mut libc::fd_set; 3]) -> bool {
    (0..n.min(libc::FD_SETSIZE as c_int)).any(|fd| {
        // SAFETY: each set is null or valid for n bits (select's contract).
        lookup(fd) != Fd::Plain && sets.iter().any(|&s| !s.is_null() && unsafe { libc::FD_ISSET(fd, s) })
    })
}

/// # Safety
/// Interposes select(2).
#[no_mangle]
pub unsafe extern "C" fn select(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    if !sets_hold_ours(n, [r, w, e]) {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        return unsafe { real::select(n, r, w, e, tv) };
    }
    // SAFETY: the caller's timeval, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    let t = unsafe { tv.as_ref() }
        .map(|t| Duration::from_micros(t.tv_sec.max(0) as u64 * 1_000_000 + t.tv_usec.max(0) as u64));
    let start = Instant::now();
    // SAFETY: the caller's sets, valid as the contract of the call this function interposes
    // requires, which GuestLib's version shares.
    let res = guard(|| unsafe { readiness::select(n, r, w, e, t, std::ptr::null()) });
    // SAFETY: the caller's timeval, null or valid.
    if let (Some(t), Some(tv)) = (t, unsafe { tv.as_mut() }) {
        // Linux reports the time not slept.
        let left = t.saturating_sub(start.elapsed());
        tv.tv_sec = left.as_secs() as _;
        tv.tv_usec = left.subsec_micros() as _;
    }
    res
}

/// # Safety
/// Interposes pselect(2).
#[no_mangle]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    if !sets_hold_ours(n, [r, w, e]) {
        // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
        // caller meets that function's contract by calling it.
        return unsafe { real::pselect(n, r, w, e, ts, mask) };
    }
    // SAFETY: the caller's timespec and sets, valid as the contract of the call this function
    // interposes requires, which GuestLib's version shares.
    guard(|| unsafe { readiness::select(n, r, w, e, readiness::ts(ts), mask) })
}

/// # Safety
/// Interposes epoll_ctl(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int {
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    on_fd!(fd, |s| readiness::epoll_ctl(epfd, op, fd, s, ev), unsafe { real::epoll_ctl(epfd, op, fd, ev) })
}

/// # Safety
/// Interposes epoll_wait(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_wait(epfd: c_int, evs: *mut libc::epoll_event, max: c_int, timeout: c_int) -> c_int {
    if readiness::is_mixed(epfd) {
        // SAFETY: the caller's buffer, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        return guard(|| unsafe { readiness::epoll_wait(epfd, evs, max, readiness::ms(timeout), std::ptr::null()) });
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::epoll_wait(epfd, evs, max, timeout) }
}

/// # Safety
/// Interposes epoll_pwait(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    evs: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    if readiness::is_mixed(epfd) {
        // SAFETY: the caller's buffer, valid as the contract of the call this function interposes
        // requires, which GuestLib's version shares.
        return guard(|| unsafe { readiness::epoll_wait(epfd, evs, max, readiness::ms(timeout), mask) });
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::epoll_pwait(epfd, evs, max, timeout, mask) }
}

/// # Safety
/// Interposes epoll_pwait2(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    evs: *mut libc::epoll_event,
    max: c_int,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    if readiness::is_mixed(epfd) {
        // SAFETY: the caller's buffer and timespec, valid as the contract of the call this function
        // interposes requires, which GuestLib's version shares.
        return guard(|| unsafe { readiness::epoll_wait(epfd, evs, max, readiness::ts(ts), mask) });
    }
    // SAFETY: the caller's arguments go unchanged to the function this one interposes, and the
    // caller meets that function's contract by calling it.
    unsafe { real::epoll_pwait2(epfd, evs, max, ts, mask) }
}

// ---- _FORTIFY_SOURCE variants ----

/// # Safety
/// Aborts as glibc's __chk_fail does.
unsafe fn chk_fail() -> ! {
    const MSG: &[u8] = b"*** buffer overflow detected ***: terminated\n";
    // SAFETY: writes a static buffer to stderr, then aborts.
    unsafe {
        libc::syscall(libc::SYS_write, 2, MSG.as_ptr(), MSG.len());
        libc::abort()
    }
}

/// # Safety
/// Interposes __read_chk.
#[no_mangle]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t) -> ssize_t {
    if n > buflen {
        // SAFETY: chk_fail writes a static message and aborts; it touches no caller memory (the
        // fortify check failed, as glibc's __chk_fail would report).
        unsafe { chk_fail() }
    }
    // SAFETY: same contract as read.
    unsafe { read(fd, buf, n) }
}

/// # Safety
/// Interposes __recv_chk.
#[no_mangle]
pub unsafe extern "C" fn __recv_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int) -> ssize_t {
    if n > buflen {
        // SAFETY: chk_fail writes a static message and aborts; it touches no caller memory (the
        // fortify check failed, as glibc's __chk_fail would report).
        unsafe { chk_fail() }
    }
    // SAFETY: same contract as recv.
    unsafe { recv(fd, buf, n, flags) }
}

/// # Safety
/// Interposes __recvfrom_chk.
#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: chk_fail writes a static message and aborts; it touches no caller memory (the
        // fortify check failed, as glibc's __chk_fail would report).
        unsafe { chk_fail() }
    }
    // SAFETY: same contract as recvfrom.
    unsafe { recvfrom(fd, buf, n, flags, addr, alen) }
}
