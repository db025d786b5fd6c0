//! Readiness over mixed sets: poll, ppoll, select, pselect, epoll.

use super::fortify::chk_fail;
use crate::state::{lookup, Fd};
use crate::*;
use libc::{c_int, nfds_t, pollfd, size_t};
use std::time::{Duration, Instant};

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
