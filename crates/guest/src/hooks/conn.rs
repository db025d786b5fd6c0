//! Socket creation and connection management: socket, bind, listen, accept, connect, shutdown,
//! close, names and options.

use crate::state::{self, lookup, Fd};
use crate::*;
use libc::{c_int, c_void, sockaddr, socklen_t};

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
    on_fd!(fd, |s| unsafe { sock::accept(s, addr, len, 0) }, unsafe { real::accept(fd, addr, len) }, stale_accept(fd))
}

/// # Safety
/// Interposes accept4(2).
#[no_mangle]
pub unsafe extern "C" fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    on_fd!(
        fd,
        // SAFETY: the caller's pointers go unchanged to GuestLib's version, which has the
        // contract of accept4(2); the caller meets it by calling.
        |s| unsafe { sock::accept(s, addr, len, flags) },
        // SAFETY: as above, to the function this one interposes.
        unsafe { real::accept4(fd, addr, len, flags) },
        stale_accept(fd)
    )
}

/// accept() on a stale fd: a listener whose NSM died tells its end once (`state::dead_accept`).
fn stale_accept(fd: c_int) -> state::Errno {
    match state::stale_sock(fd) {
        Some((a, slot)) => state::dead_accept(a.region.guest_sock(slot)),
        None => libc::ECONNRESET,
    }
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
