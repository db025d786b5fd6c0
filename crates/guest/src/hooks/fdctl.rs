//! File-descriptor control: fcntl, ioctl, dup.

use crate::state::{self, lookup, Fd};
use crate::*;
use libc::{c_int, c_ulong};
use std::sync::atomic::Ordering;

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
