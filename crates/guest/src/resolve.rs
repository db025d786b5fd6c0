//! Names served by the provider: glibc's resolver opens sockets GuestLib cannot see, and an
//! isolated guest has no network of its own, so names are resolved by the NSM (Op::Resolve),
//! with the provider's configuration: getaddrinfo, the gethostbyname family, gethostbyaddr and
//! getnameinfo (reverse lookups with RESOLVE_REVERSE). Numeric hosts never leave the guest.

use crate::state::{self, Errno};
use libc::{addrinfo, c_char, c_int};
use netkernel_abi::{Op, BUF_SIZE, RESOLVED_SIZE, RESOLVE_EAI_BASE, RESOLVE_REVERSE};
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
    // SAFETY: hints is null or a valid addrinfo (this function's contract); as_ref maps null to
    // None.
    if unsafe { hints.as_ref() }.is_some_and(|h| h.ai_flags & libc::AI_NUMERICHOST != 0) {
        return false;
    }
    // SAFETY: node is non-null here, and a valid C string by this function's contract.
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
    // SAFETY: node (non-null: a name, per wants_provider) and service (null or valid) are C strings
    // by getaddrinfo(3)'s contract, which this function has.
    let (name, serv) = unsafe {
        (CStr::from_ptr(node).to_bytes(), if service.is_null() { &[][..] } else { CStr::from_ptr(service).to_bytes() })
    };
    if name.len() + serv.len() + 2 > BUF_SIZE as usize {
        return libc::EAI_OVERFLOW;
    }
    // SAFETY: hints is null or a valid addrinfo by getaddrinfo(3)'s contract, which this function
    // has.
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
    let (n, c) = match c.and_then(|c| c.result().map(|n| (n as usize, c))) {
        Ok(x) => x,
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

/// One Resolve round trip: `node` (and no service) with `family`, `socktype` and `flags`.
/// Ok(the answer's bytes and its `result`) or Err(EAI_* code).
fn ask(node: &[u8], family: c_int, socktype: c_int, flags: u32) -> Result<(Vec<u8>, usize), c_int> {
    if node.len() + 2 > BUF_SIZE as usize {
        return Err(libc::EAI_OVERFLOW);
    }
    let a = state::attachment().map_err(|_| libc::EAI_AGAIN)?;
    let c = a
        .call(|w| {
            w.set(Op::Resolve, 0);
            w.args(family as u64, socktype as u64);
            w.flags(flags);
            // SAFETY: the nqe buffer holds BUF_SIZE bytes; the request fits (checked above).
            unsafe {
                let b = w.buf();
                std::ptr::copy_nonoverlapping(node.as_ptr(), b, node.len());
                *b.add(node.len()) = 0;
                *b.add(node.len() + 1) = 0;
            }
            w.use_buf(BUF_SIZE as usize);
        })
        .map_err(eai_of)?;
    let n = c.result().map_err(eai_of)? as usize;
    let len = if flags & RESOLVE_REVERSE != 0 { n } else { n * RESOLVED_SIZE }.min(BUF_SIZE as usize);
    let mut out = vec![0u8; len];
    // SAFETY: the NSM wrote `len` bytes into the nqe buffer.
    unsafe { std::ptr::copy_nonoverlapping(c.buf(), out.as_mut_ptr(), len) };
    Ok((out, n))
}

/// The addresses of family `af` the provider knows for `name` (raw: 4 or 16 bytes each).
fn addresses(name: &[u8], af: c_int) -> Result<Vec<Vec<u8>>, c_int> {
    let (buf, n) = ask(name, af, libc::SOCK_STREAM, 0)?;
    let mut out: Vec<Vec<u8>> = Vec::new();
    for e in buf.chunks_exact(RESOLVED_SIZE).take(n) {
        let fam = u16::from_ne_bytes([e[0], e[1]]) as c_int;
        let addr = match fam {
            libc::AF_INET if af == fam => e[8 + 4..8 + 8].to_vec(),
            libc::AF_INET6 if af == fam => e[8 + 8..8 + 24].to_vec(),
            _ => continue,
        };
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(libc::EAI_NONAME);
    }
    Ok(out)
}

/// The host name the provider gives `addr` (`len` bytes of family `af`).
fn name_of(addr: &[u8], af: c_int) -> Result<Vec<u8>, c_int> {
    let ip: std::net::IpAddr = match (af, addr.len()) {
        (libc::AF_INET, 4) => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(addr).unwrap_or_default()).into(),
        (libc::AF_INET6, 16) => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(addr).unwrap_or_default()).into(),
        _ => return Err(libc::EAI_FAMILY),
    };
    ask(ip.to_string().as_bytes(), af, 0, RESOLVE_REVERSE).map(|(name, _)| name)
}

/// h_errno for a failed lookup, as glibc's NSS reports them.
fn h_errno_of(eai: c_int) -> c_int {
    match eai {
        libc::EAI_AGAIN => 2,                     // TRY_AGAIN
        libc::EAI_NODATA => 4,                    // NO_DATA
        libc::EAI_NONAME | libc::EAI_FAMILY => 1, // HOST_NOT_FOUND
        _ => 3,                                   // NO_RECOVERY
    }
}

extern "C" {
    fn __h_errno_location() -> *mut c_int;
}

fn set_h_errno(v: c_int) {
    // SAFETY: h_errno is thread-local and always valid to write.
    unsafe { *__h_errno_location() = v };
}

/// Whether gethostbyname must ask the provider: a name that is not a numeric address (glibc
/// answers those itself, without looking anything up).
///
/// # Safety
/// `name` is null or a C string.
pub unsafe fn is_name(name: *const c_char) -> bool {
    // SAFETY: name is a non-null C string here (this function's contract, null checked first);
    // hints may be null.
    !name.is_null() && unsafe { wants_provider(name, std::ptr::null()) }
}

/// Lays out a hostent for `name` with `addrs` in `buf` (the reentrant calls' caller-supplied
/// buffer): aliases (none), address pointers, addresses, name. Err(ERANGE) if it does not fit.
///
/// # Safety
/// `ret` is a valid hostent and `buf` holds `buflen` writable bytes.
unsafe fn fill_hostent(
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: usize,
    name: &[u8],
    af: c_int,
    addrs: &[Vec<u8>],
) -> Result<(), c_int> {
    let ptr = std::mem::size_of::<*mut c_char>();
    let align = (buf as usize).next_multiple_of(ptr) - buf as usize;
    let alen = addrs.first().map_or(0, |a| a.len());
    let need = align + ptr + (addrs.len() + 1) * ptr + addrs.len() * alen + name.len() + 1;
    if need > buflen {
        return Err(libc::ERANGE);
    }
    // SAFETY: every write below lies in buf[..need], need <= buflen, pointer slots aligned.
    unsafe {
        let aliases = buf.add(align) as *mut *mut c_char;
        *aliases = std::ptr::null_mut();
        let list = aliases.add(1);
        let mut data = list.add(addrs.len() + 1) as *mut c_char;
        for (i, a) in addrs.iter().enumerate() {
            std::ptr::copy_nonoverlapping(a.as_ptr(), data.cast::<u8>(), alen);
            *list.add(i) = data;
            data = data.add(alen);
        }
        *list.add(addrs.len()) = std::ptr::null_mut();
        std::ptr::copy_nonoverlapping(name.as_ptr(), data.cast::<u8>(), name.len());
        *data.add(name.len()) = 0;
        (*ret).h_name = data;
        (*ret).h_aliases = aliases;
        (*ret).h_addrtype = af;
        (*ret).h_length = alen as c_int;
        (*ret).h_addr_list = list;
    }
    Ok(())
}

/// What a reentrant gethostby* call returns: 0 with `*result` set, or the glibc error (ERANGE,
/// EAGAIN for TRY_AGAIN, else 0) with `*result` NULL and `*h_errnop` set.
///
/// # Safety
/// The arguments are valid as for gethostbyname_r(3).
unsafe fn finish_r(
    lookup: Result<Host, c_int>,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: usize,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: ret, buf/buflen, result and h_errnop are valid as gethostbyname_r(3) requires (this
    // function's contract), which is what fill_hostent and the writes below need.
    let filled = lookup
        .map_err(|e| (0, h_errno_of(e)))
        .and_then(|h| unsafe { fill_hostent(ret, buf, buflen, &h.name, h.af, &h.addrs).map_err(|e| (e, -1)) });
    // SAFETY: result and h_errnop are the caller's out-pointers.
    unsafe {
        match filled {
            Ok(()) => {
                *result = ret;
                0
            }
            Err((rc, he)) => {
                *result = std::ptr::null_mut();
                if !h_errnop.is_null() {
                    *h_errnop = he;
                }
                // glibc sets the thread's h_errno too, and programs (python) read that one.
                set_h_errno(he);
                if he == 2 {
                    libc::EAGAIN
                } else {
                    rc
                }
            }
        }
    }
}

/// A host found by name or address: its name, address family and addresses.
struct Host {
    name: Vec<u8>,
    af: c_int,
    addrs: Vec<Vec<u8>>,
}

fn by_name(name: *const c_char, af: c_int) -> Result<Host, c_int> {
    if af != libc::AF_INET && af != libc::AF_INET6 {
        return Err(libc::EAI_FAMILY);
    }
    // SAFETY: callers pass a C string (checked by is_name).
    let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
    let addrs = addresses(&name, af)?;
    Ok(Host { name, af, addrs })
}

fn by_addr(addr: *const libc::c_void, len: libc::socklen_t, af: c_int) -> Result<Host, c_int> {
    if addr.is_null() {
        return Err(libc::EAI_FAMILY);
    }
    // SAFETY: addr is valid for len bytes, as gethostbyaddr_r(3) requires of its caller (this
    // function's contract).
    let a = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len as usize) }.to_vec();
    let name = name_of(&a, af)?;
    Ok(Host { name, af, addrs: vec![a] })
}

/// gethostbyname2_r through the provider.
///
/// # Safety
/// As gethostbyname2_r(3), with `name` a name (`is_name`).
pub unsafe fn gethostbyname2_r(
    name: *const c_char,
    af: c_int,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: usize,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: the arguments are valid as gethostbyname2_r(3) requires (this function's contract),
    // which finish_r's contract repeats.
    unsafe { finish_r(by_name(name, af), ret, buf, buflen, result, h_errnop) }
}

/// gethostbyaddr_r through the provider.
///
/// # Safety
/// As gethostbyaddr_r(3).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gethostbyaddr_r(
    addr: *const libc::c_void,
    len: libc::socklen_t,
    af: c_int,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: usize,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: the arguments are valid as gethostbyaddr_r(3) requires (this function's contract),
    // which finish_r's contract repeats.
    unsafe { finish_r(by_addr(addr, len, af), ret, buf, buflen, result, h_errnop) }
}

thread_local! {
    /// The hostent the non-reentrant calls return (glibc keeps one per process; one per thread
    /// is as valid and safer).
    static HOSTENT: std::cell::RefCell<(libc::hostent, Vec<c_char>)> = std::cell::RefCell::new((
        libc::hostent {
            h_name: std::ptr::null_mut(),
            h_aliases: std::ptr::null_mut(),
            h_addrtype: 0,
            h_length: 0,
            h_addr_list: std::ptr::null_mut(),
        },
        vec![0; 64 * 1024],
    ));
}

/// The non-reentrant form: the thread's static hostent, or NULL with h_errno set.
fn static_hostent(lookup: Result<Host, c_int>) -> *mut libc::hostent {
    HOSTENT.with(|h| {
        let mut h = h.borrow_mut();
        let (ent, buf) = &mut *h;
        let (mut result, mut he) = (std::ptr::null_mut(), 0);
        // SAFETY: ent and buf are ours and live as long as the thread.
        unsafe { finish_r(lookup, ent, buf.as_mut_ptr(), buf.len(), &mut result, &mut he) };
        result
    })
}

/// gethostbyname2 through the provider.
pub fn gethostbyname2(name: *const c_char, af: c_int) -> *mut libc::hostent {
    static_hostent(by_name(name, af))
}

/// gethostbyaddr through the provider.
pub fn gethostbyaddr(addr: *const libc::c_void, len: libc::socklen_t, af: c_int) -> *mut libc::hostent {
    static_hostent(by_addr(addr, len, af))
}

/// getnameinfo with a host name wanted: the service (and the numeric host, and any error in the
/// arguments) comes from glibc with NI_NUMERICHOST, which looks nothing up; the name from the
/// provider.
///
/// # Safety
/// As getnameinfo(3), with `host` non-null and `hostlen` > 0.
pub unsafe fn getnameinfo(
    sa: *const libc::sockaddr,
    salen: libc::socklen_t,
    host: *mut c_char,
    hostlen: libc::socklen_t,
    serv: *mut c_char,
    servlen: libc::socklen_t,
    flags: c_int,
) -> c_int {
    let mut numeric = [0 as c_char; 64];
    // SAFETY: per the contract; numeric is a live buffer of its length.
    let r = unsafe {
        crate::real::getnameinfo(
            sa,
            salen,
            numeric.as_mut_ptr(),
            numeric.len() as libc::socklen_t,
            serv,
            servlen,
            (flags | libc::NI_NUMERICHOST) & !libc::NI_NAMEREQD,
        )
    };
    if r != 0 {
        return r;
    }
    // SAFETY: sa is valid for salen bytes (glibc accepted it above).
    let (af, addr) = unsafe {
        match (*sa).sa_family as c_int {
            libc::AF_INET => {
                let a = &*(sa as *const libc::sockaddr_in);
                (libc::AF_INET, a.sin_addr.s_addr.to_ne_bytes().to_vec())
            }
            _ => {
                let a = &*(sa as *const libc::sockaddr_in6);
                (libc::AF_INET6, a.sin6_addr.s6_addr.to_vec())
            }
        }
    };
    let name = match name_of(&addr, af) {
        Ok(mut n) => {
            if flags & libc::NI_NOFQDN != 0 {
                if let Some(dot) = n.iter().position(|&b| b == b'.') {
                    n.truncate(dot);
                }
            }
            n
        }
        Err(libc::EAI_NONAME) if flags & libc::NI_NAMEREQD == 0 => {
            // SAFETY: glibc wrote a NUL-terminated numeric host.
            unsafe { CStr::from_ptr(numeric.as_ptr()) }.to_bytes().to_vec()
        }
        Err(e) => return e,
    };
    if name.len() >= hostlen as usize {
        return libc::EAI_OVERFLOW;
    }
    // SAFETY: host holds hostlen bytes; name plus its NUL fit (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(name.as_ptr(), host.cast::<u8>(), name.len());
        *host.add(name.len()) = 0;
    }
    0
}
