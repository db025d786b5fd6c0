//! The `_FORTIFY_SOURCE` variants (`__read_chk`, ...), which glibc calls instead of the plain
//! functions in hardened builds.

use super::data::{read, recv, recvfrom};
use libc::{c_int, c_void, size_t, sockaddr, socklen_t, ssize_t};

/// # Safety
/// Aborts as glibc's __chk_fail does.
pub(super) unsafe fn chk_fail() -> ! {
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
