//! Names: getaddrinfo, gethostbyname and gethostbyaddr (and their `_r` forms), getnameinfo,
//! answered by the NSM.

use crate::*;
use libc::{c_int, c_void, size_t, sockaddr, socklen_t};

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
