//! Moving bytes: read/write and their vector forms, send/recv and their msg and mmsg forms.

use crate::state::Errno;
use crate::*;
use libc::{c_int, c_void, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};
use std::time::Instant;

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
