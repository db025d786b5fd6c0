//! getaddrinfo served by the provider: glibc's resolver opens sockets GuestLib cannot see, and an
//! isolated guest has no network of its own, so names are resolved by the NSM (Op::Resolve),
//! with the provider's configuration. Numeric hosts never leave the guest.

use crate::state::{self, Errno};
use libc::{addrinfo, c_char, c_int};
use netkernel_abi::{Op, BUF_SIZE, RESOLVED_SIZE, RESOLVE_EAI_BASE};
use std::ffi::CStr;

/// Marks the addrinfo nodes GuestLib allocated, so freeaddrinfo knows whose they are.
const MAGIC: u64 = u64::from_le_bytes(*b"NKADDRIN");

/// One node of a list GuestLib made. The magic sits between the addrinfo and the address, so
/// `ai_addr` of our nodes points further into the node than glibc's (right after the
/// addrinfo): that tells the two apart before any byte past an addrinfo is read.
#[repr(C)]
struct Node {
    ai: addrinfo,
    magic: u64,
    addr: libc::sockaddr_in6,
}

/// Whether getaddrinfo must go to the provider: a real name (not numeric, not NULL).
///
/// # Safety
/// `node` and `hints` are null or valid.
pub unsafe fn wants_provider(node: *const c_char, hints: *const addrinfo) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: per the contract.
    if unsafe { hints.as_ref() }.is_some_and(|h| h.ai_flags & libc::AI_NUMERICHOST != 0) {
        return false;
    }
    // SAFETY: per the contract.
    match unsafe { CStr::from_ptr(node) }.to_str() {
        Ok(name) => name.parse::<std::net::IpAddr>().is_err(),
        Err(_) => false,
    }
}

fn eai_of(e: Errno) -> c_int {
    let code = -(e as i64);
    if (RESOLVE_EAI_BASE - 100..RESOLVE_EAI_BASE).contains(&code) {
        (code - RESOLVE_EAI_BASE) as c_int
    } else {
        // The NSM is gone or the attachment failed: a temporary failure, as with no DNS server.
        libc::EAI_AGAIN
    }
}

/// getaddrinfo through the NSM. Returns 0 or an EAI_* code, as getaddrinfo does.
///
/// # Safety
/// As getaddrinfo(3).
pub unsafe fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    if res.is_null() {
        return libc::EAI_SYSTEM;
    }
    // SAFETY: per the contract.
    let (name, serv) = unsafe {
        (CStr::from_ptr(node).to_bytes(), if service.is_null() { &[][..] } else { CStr::from_ptr(service).to_bytes() })
    };
    if name.len() + serv.len() + 2 > BUF_SIZE as usize {
        return libc::EAI_OVERFLOW;
    }
    // SAFETY: per the contract.
    let h = unsafe { hints.as_ref() };
    let (family, socktype, protocol, flags) =
        h.map_or((libc::AF_UNSPEC, 0, 0, 0), |h| (h.ai_family, h.ai_socktype, h.ai_protocol, h.ai_flags));
    let a = match state::attachment() {
        Ok(a) => a,
        Err(_) => return libc::EAI_AGAIN,
    };
    let c = a.call(|w| {
        w.set(Op::Resolve, 0);
        w.args(family as u64, socktype as u64);
        w.flags(flags as u32);
        // SAFETY: the nqe buffer holds BUF_SIZE bytes; the request fits (checked above).
        unsafe {
            let b = w.buf();
            std::ptr::copy_nonoverlapping(name.as_ptr(), b, name.len());
            *b.add(name.len()) = 0;
            std::ptr::copy_nonoverlapping(serv.as_ptr(), b.add(name.len() + 1), serv.len());
            *b.add(name.len() + 1 + serv.len()) = 0;
        }
        w.use_buf(BUF_SIZE as usize);
    });
    let n = match c.result() {
        Ok(n) => n as usize,
        Err(e) => return eai_of(e),
    };
    let mut head: *mut addrinfo = std::ptr::null_mut();
    let mut tail: *mut *mut addrinfo = &mut head;
    for i in 0..n {
        let mut e = [0u8; RESOLVED_SIZE];
        // SAFETY: the NSM wrote n entries into the nqe buffer.
        unsafe { std::ptr::copy_nonoverlapping(c.buf().add(i * RESOLVED_SIZE), e.as_mut_ptr(), RESOLVED_SIZE) };
        let field = |k: usize| u16::from_ne_bytes([e[2 * k], e[2 * k + 1]]) as c_int;
        if protocol != 0 && field(2) != protocol {
            continue;
        }
        // SAFETY: a fresh allocation, fully initialised below before it is linked.
        let node = unsafe { libc::calloc(1, std::mem::size_of::<Node>()) as *mut Node };
        if node.is_null() {
            // SAFETY: frees what was built so far.
            unsafe { freeaddrinfo(head) };
            return libc::EAI_MEMORY;
        }
        // SAFETY: node is a zeroed Node we own.
        unsafe {
            let len = (field(3) as usize).min(std::mem::size_of::<libc::sockaddr_in6>());
            std::ptr::copy_nonoverlapping(e[8..].as_ptr(), (&mut (*node).addr as *mut libc::sockaddr_in6).cast(), len);
            (*node).ai.ai_family = field(0);
            (*node).ai.ai_socktype = field(1);
            (*node).ai.ai_protocol = field(2);
            (*node).ai.ai_addrlen = len as libc::socklen_t;
            (*node).ai.ai_addr = (&mut (*node).addr as *mut libc::sockaddr_in6).cast();
            (*node).magic = MAGIC;
            if head.is_null() && flags & libc::AI_CANONNAME != 0 {
                (*node).ai.ai_canonname = libc::strdup(node_name(name).as_ptr());
            }
            *tail = &mut (*node).ai;
            tail = &mut (*node).ai.ai_next;
        }
    }
    if head.is_null() {
        return libc::EAI_NONAME;
    }
    // SAFETY: res is non-null (checked above).
    unsafe { *res = head };
    0
}

fn node_name(name: &[u8]) -> std::ffi::CString {
    std::ffi::CString::new(name.to_vec()).unwrap_or_default()
}

/// Whether `ai` heads a list GuestLib allocated.
///
/// # Safety
/// `ai` is null or a list from getaddrinfo.
pub unsafe fn is_ours(ai: *const addrinfo) -> bool {
    // SAFETY: only a node whose ai_addr points where ours do (past the magic, inside the node)
    // has its magic read; glibc's point right after the addrinfo.
    unsafe {
        !ai.is_null()
            && (*ai).ai_addr as usize == ai as usize + std::mem::offset_of!(Node, addr)
            && (*(ai as *const Node)).magic == MAGIC
    }
}

/// Frees a list GuestLib allocated.
///
/// # Safety
/// `ai` heads a list for which `is_ours` holds.
pub unsafe fn freeaddrinfo(mut ai: *mut addrinfo) {
    while !ai.is_null() {
        // SAFETY: every node of our lists is one calloc'd Node, canonname a strdup.
        unsafe {
            let next = (*ai).ai_next;
            libc::free((*ai).ai_canonname.cast());
            libc::free(ai.cast());
            ai = next;
        }
    }
}
