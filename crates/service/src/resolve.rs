//! Name resolution served by the provider (Op::Resolve): the NSM resolves with its own
//! configuration (static host entries from the engine's config, then the system resolver of the
//! NSM's namespace), on a thread of its own, since a resolver may block for seconds and the
//! event loop serves every guest.

use netkernel_abi::{nqe_state, RESOLVED_SIZE, RESOLVE_EAI_BASE, RESOLVE_REVERSE};
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// ai_flags a guest may pass on; others (AI_PASSIVE, AI_CANONNAME, ...) are the guest's business.
const PASSED_FLAGS: i32 = libc::AI_ADDRCONFIG | libc::AI_V4MAPPED | libc::AI_ALL | libc::AI_NUMERICSERV;

/// What a guest asked: node, service and hints, copied out of its region.
#[derive(Clone)]
pub(crate) struct Query {
    pub node: String,
    pub service: Option<String>,
    pub family: i32,
    pub socktype: i32,
    pub flags: i32,
}

impl Query {
    /// Parses `node NUL service NUL` from the request buffer.
    pub fn parse(buf: &[u8], family: i32, socktype: i32, flags: i32) -> Option<Query> {
        let mut parts = buf.split(|&b| b == 0);
        let node = std::str::from_utf8(parts.next()?).ok()?.to_string();
        let service = std::str::from_utf8(parts.next().unwrap_or(&[])).ok()?.to_string();
        if node.is_empty() || node.len() > 1024 {
            return None;
        }
        Some(Query { node, service: (!service.is_empty()).then_some(service), family, socktype, flags })
    }
}

/// Resolves `q`: entries of RESOLVED_SIZE bytes, or the EAI_* code.
pub(crate) fn resolve(hosts: &HashMap<String, String>, q: &Query) -> Result<Vec<[u8; RESOLVED_SIZE]>, i32> {
    let (node, extra) = match hosts.get(&q.node.to_ascii_lowercase()) {
        Some(ip) => (ip.as_str(), libc::AI_NUMERICHOST),
        None => (q.node.as_str(), 0),
    };
    let node = CString::new(node).map_err(|_| libc::EAI_NONAME)?;
    let service = match &q.service {
        Some(s) => Some(CString::new(s.as_str()).map_err(|_| libc::EAI_SERVICE)?),
        None => None,
    };
    // SAFETY: addrinfo is plain data; zeroed is the documented way to fill hints.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = q.family;
    hints.ai_socktype = q.socktype;
    hints.ai_flags = (q.flags & PASSED_FLAGS) | extra;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C strings and hints; res is freed below.
    let r = unsafe {
        libc::getaddrinfo(node.as_ptr(), service.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()), &hints, &mut res)
    };
    if r != 0 {
        return Err(r);
    }
    let mut out = Vec::new();
    let mut p = res;
    // SAFETY: walking the list getaddrinfo returned, then freeing it once.
    unsafe {
        while let Some(ai) = p.as_ref() {
            let mut e = [0u8; RESOLVED_SIZE];
            let len = (ai.ai_addrlen as usize).min(RESOLVED_SIZE - 8);
            e[0..2].copy_from_slice(&(ai.ai_family as u16).to_ne_bytes());
            e[2..4].copy_from_slice(&(ai.ai_socktype as u16).to_ne_bytes());
            e[4..6].copy_from_slice(&(ai.ai_protocol as u16).to_ne_bytes());
            e[6..8].copy_from_slice(&(len as u16).to_ne_bytes());
            std::ptr::copy_nonoverlapping(ai.ai_addr as *const u8, e[8..].as_mut_ptr(), len);
            out.push(e);
            p = ai.ai_next;
        }
        libc::freeaddrinfo(res);
    }
    Ok(out)
}

/// The name of a numeric address (`q.node`, of family `q.family`): from the configured
/// `hosts` (the first name in order, when several share the address), else from the NSM's
/// system resolver (getnameinfo with NI_NAMEREQD, so an address without a name is EAI_NONAME).
pub(crate) fn reverse(hosts: &HashMap<String, String>, q: &Query) -> Result<String, i32> {
    let ip: std::net::IpAddr = q.node.parse().map_err(|_| libc::EAI_NONAME)?;
    if let Some(n) = reverse_from_hosts(hosts, q) {
        return Ok(n);
    }
    let sa = sockaddr_of(ip);
    let mut host = [0 as libc::c_char; 1025];
    // SAFETY: sa is a live sockaddr of the length given; host is a live buffer of its length.
    let r = unsafe {
        libc::getnameinfo(
            sa.0.as_ptr().cast(),
            sa.1,
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if r != 0 {
        return Err(r);
    }
    // SAFETY: getnameinfo wrote a NUL-terminated name.
    Ok(unsafe { std::ffi::CStr::from_ptr(host.as_ptr()) }.to_string_lossy().into_owned())
}

/// The configured name of numeric address `q.node`: the first in order, when several share it.
pub(crate) fn reverse_from_hosts(hosts: &HashMap<String, String>, q: &Query) -> Option<String> {
    let ip: std::net::IpAddr = q.node.parse().ok()?;
    hosts.iter().filter(|(_, a)| a.parse::<std::net::IpAddr>().ok() == Some(ip)).map(|(n, _)| n).min().cloned()
}

/// A sockaddr for `ip` (port 0), as bytes and length.
fn sockaddr_of(ip: std::net::IpAddr) -> ([u8; 28], libc::socklen_t) {
    let mut b = [0u8; 28];
    match ip {
        std::net::IpAddr::V4(v4) => {
            b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[4..8].copy_from_slice(&v4.octets());
            (b, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        std::net::IpAddr::V6(v6) => {
            b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[8..24].copy_from_slice(&v6.octets());
            (b, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Resolves on a thread and completes nqe `idx` of `region` from there. The thread holds the
/// region, so the mapping outlives a guest that goes away meanwhile.
pub(crate) fn spawn(
    hosts: Arc<HashMap<String, String>>,
    region: Arc<Region>,
    idx: u32,
    buf_off: u64,
    buf_len: u32,
    q: Query,
) {
    IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
    std::thread::spawn(move || {
        let result = if q.flags as u32 & RESOLVE_REVERSE != 0 {
            reverse(&hosts, &q).map(Resolved::Name)
        } else {
            resolve(&hosts, &q).map(Resolved::Entries)
        };
        complete(&region, idx, buf_off, buf_len, result);
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Lookups whose threads have not answered yet.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Waits (at most `limit`) until every lookup started has been answered: a process that handed
/// its guests over must not leave one unanswered.
pub(crate) fn wait_for_lookups(limit: std::time::Duration) {
    let until = std::time::Instant::now() + limit;
    while IN_FLIGHT.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What a lookup found: getaddrinfo's entries, or getnameinfo's name.
pub(crate) enum Resolved {
    Entries(Vec<[u8; RESOLVED_SIZE]>),
    Name(String),
}

/// Writes a lookup's answer (as many entries, or as much of the name, as the guest's buffer
/// `[buf_off, +buf_len)` holds) or its EAI_* code, and completes nqe `idx`.
pub(crate) fn complete(region: &Region, idx: u32, buf_off: u64, buf_len: u32, r: Result<Resolved, i32>) {
    let result = match r {
        Ok(Resolved::Name(name)) => {
            let n = name.len().min(buf_len as usize);
            if n > 0 {
                let dst = region.pool_ptr(buf_off, n as u32);
                // SAFETY: pool_ptr checked that dst covers n bytes inside the pool.
                unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), dst, n) };
            }
            n as i64
        }
        Ok(Resolved::Entries(entries)) => {
            let fit = entries.len().min(buf_len as usize / RESOLVED_SIZE);
            if fit > 0 {
                let dst = region.pool_ptr(buf_off, (fit * RESOLVED_SIZE) as u32);
                for (i, e) in entries.iter().take(fit).enumerate() {
                    // SAFETY: pool_ptr checked that dst covers `fit` entries inside the pool.
                    unsafe { std::ptr::copy_nonoverlapping(e.as_ptr(), dst.add(i * RESOLVED_SIZE), RESOLVED_SIZE) };
                }
            }
            fit as i64
        }
        Err(eai) => RESOLVE_EAI_BASE + eai as i64,
    };
    // SAFETY: nqe idx is in bounds; the guest reads result only after DONE, which the swap
    // below orders after this write.
    unsafe { std::ptr::write_volatile(&mut (*region.nqe(idx)).result, result) };
    let old = region.nqe_state(idx).swap(nqe_state::DONE, Ordering::AcqRel);
    if old & nqe_state::WAITER != 0 {
        sys::futex_wake(region.nqe_state(idx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_hosts_and_numeric_and_failures() {
        let mut hosts = HashMap::new();
        hosts.insert("provider-name".to_string(), "127.0.0.9".to_string());
        let q = Query::parse(b"Provider-Name\0http\0", libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        let r = resolve(&hosts, &q).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(&r[0][8 + 2..8 + 8], &[0, 80, 127, 0, 0, 9]);
        let q = Query::parse(b"no-such-name.invalid\0\0", 0, 0, 0).unwrap();
        assert!(resolve(&hosts, &q).is_err());
        assert!(Query::parse(b"\0x\0", 0, 0, 0).is_none());
    }

    #[test]
    fn reverse_from_hosts_then_the_system() {
        let mut hosts = HashMap::new();
        hosts.insert("b-name".to_string(), "127.0.0.9".to_string());
        hosts.insert("a-name".to_string(), "127.0.0.9".to_string());
        let rev = RESOLVE_REVERSE as i32;
        let q = Query::parse(b"127.0.0.9\0\0", libc::AF_INET, 0, rev).unwrap();
        assert_eq!(reverse(&hosts, &q).unwrap(), "a-name");
        let q = Query::parse(b"not-an-address\0\0", libc::AF_INET, 0, rev).unwrap();
        assert_eq!(reverse(&hosts, &q), Err(libc::EAI_NONAME));
    }
}
