//! Tenant policy enforced where the stack runs (DESIGN.md D7): a tenant's virtual addresses
//! (wildcard and loopback binds land on them, loopback connects reach the tenant's own address,
//! other tenants' addresses are unreachable), its socket limit and the ports it may listen on.

use crate::control::TenantPolicy;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Decodes a sockaddr_in/sockaddr_in6 a guest passed.
pub(crate) fn decode(b: &[u8]) -> Option<SocketAddr> {
    crate::telemetry::sockaddr_to_std(b)
}

/// Encodes as the kernel wants it.
pub(crate) fn encode(a: &SocketAddr) -> Vec<u8> {
    match a {
        SocketAddr::V4(a) => {
            let mut b = vec![0u8; 16];
            b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            b
        }
        SocketAddr::V6(a) => {
            let mut b = vec![0u8; 28];
            b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            b
        }
    }
}

/// The addresses that stand in for wildcard and loopback ones: the tenant's own, else its
/// private loopback.
fn local_addresses(p: &TenantPolicy) -> &[IpAddr] {
    if p.addresses.is_empty() {
        p.loopback.as_slice()
    } else {
        &p.addresses
    }
}

/// The address of the tenant's that stands in for `ip` (a wildcard or loopback address), in
/// the same family (IPv4 addresses as v4-mapped for IPv6 sockets).
fn own(p: &TenantPolicy, v6: bool) -> Option<IpAddr> {
    own_of(local_addresses(p), v6)
}

fn own_of(addresses: &[IpAddr], v6: bool) -> Option<IpAddr> {
    let v4 = addresses.iter().find_map(|a| match a {
        IpAddr::V4(a) => Some(*a),
        _ => None,
    });
    if !v6 {
        return v4.map(IpAddr::V4);
    }
    addresses.iter().find(|a| a.is_ipv6()).copied().or(v4.map(|a| IpAddr::V6(a.to_ipv6_mapped())))
}

fn with_ip(a: &SocketAddr, ip: IpAddr) -> SocketAddr {
    match (a, ip) {
        (SocketAddr::V6(a6), IpAddr::V6(ip)) => {
            SocketAddr::V6(SocketAddrV6::new(ip, a6.port(), a6.flowinfo(), a6.scope_id()))
        }
        (_, ip) => SocketAddr::new(ip, a.port()),
    }
}

fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_loopback(),
        IpAddr::V6(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback() || m.is_unspecified())
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
        v4 => v4,
    }
}

/// The address to bind instead of `addr`, or the errno Linux gives for an address the host
/// does not have. Tenants without addresses bind as asked.
pub(crate) fn bind(p: &TenantPolicy, addr: &[u8]) -> Result<Option<Vec<u8>>, i32> {
    let mine = local_addresses(p);
    let Some(a) = decode(addr).filter(|_| !mine.is_empty()) else { return Ok(None) };
    if mine.iter().any(|x| canonical(*x) == canonical(a.ip())) {
        return Ok(None);
    }
    // Tenant addresses may themselves be loopback ones (127.0.1.1): another tenant's is not
    // "loopback" for this one.
    if is_local(a.ip()) && !p.foreign.iter().any(|x| canonical(*x) == canonical(a.ip())) {
        let ip = own(p, a.is_ipv6()).ok_or(libc::EADDRNOTAVAIL)?;
        return Ok(Some(encode(&with_ip(&a, ip))));
    }
    Err(libc::EADDRNOTAVAIL)
}

/// The address to connect to instead of `addr`: loopback means the tenant's own address, and
/// another tenant's address is unreachable (ECONNREFUSED, as a closed port).
pub(crate) fn connect(p: &TenantPolicy, addr: &[u8]) -> Result<Option<Vec<u8>>, i32> {
    let Some(a) = decode(addr) else { return Ok(None) };
    if p.foreign.iter().any(|x| canonical(*x) == canonical(a.ip())) {
        return Err(libc::ECONNREFUSED);
    }
    let local = local_addresses(p);
    let mine = local.iter().any(|x| canonical(*x) == canonical(a.ip()));
    if !local.is_empty() && !mine && is_local(a.ip()) {
        let ip = own(p, a.is_ipv6()).ok_or(libc::ENETUNREACH)?;
        return Ok(Some(encode(&with_ip(&a, ip))));
    }
    Ok(None)
}

/// The source address an unbound socket of the tenant connects from to `peer` (port chosen by
/// the stack). The NSM-given source address is for leaving the NSM, not for its loopback; a
/// private loopback is for the loopback only.
pub(crate) fn source(p: &TenantPolicy, v6: bool, peer: &[u8]) -> Option<Vec<u8>> {
    let to_loopback = decode(peer).is_some_and(|a| is_local(a.ip()));
    let ip = own_of(&p.addresses, v6).or(p.source.filter(|_| !to_loopback))?;
    if !v6 && ip.is_ipv6() {
        return None;
    }
    let a = if v6 {
        SocketAddr::V6(SocketAddrV6::new(
            match ip {
                IpAddr::V6(x) => x,
                IpAddr::V4(x) => x.to_ipv6_mapped(),
            },
            0,
            0,
            0,
        ))
    } else {
        SocketAddr::V4(SocketAddrV4::new(
            match ip {
                IpAddr::V4(x) => x,
                IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            },
            0,
        ))
    };
    Some(encode(&a))
}

/// Whether the tenant may listen on `port`.
pub(crate) fn may_listen(p: &TenantPolicy, port: u16) -> bool {
    p.listen_ports.as_ref().is_none_or(|r| r.iter().any(|&(lo, hi)| (lo..=hi).contains(&port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn pol() -> TenantPolicy {
        TenantPolicy {
            addresses: vec!["127.0.1.1".parse().unwrap()],
            foreign: vec!["127.0.2.1".parse().unwrap()],
            max_sockets: None,
            listen_ports: Some(vec![(8000, 8010)]),
            ..Default::default()
        }
    }

    fn sa(s: &str) -> Vec<u8> {
        encode(&s.parse().unwrap())
    }

    #[test]
    fn binds_land_on_the_tenants_address() {
        let p = pol();
        assert_eq!(bind(&p, &sa("0.0.0.0:80")), Ok(Some(sa("127.0.1.1:80"))));
        assert_eq!(bind(&p, &sa("127.0.0.1:80")), Ok(Some(sa("127.0.1.1:80"))));
        assert_eq!(bind(&p, &sa("[::]:80")), Ok(Some(sa("[::ffff:127.0.1.1]:80"))));
        assert_eq!(bind(&p, &sa("127.0.1.1:80")), Ok(None));
        assert_eq!(bind(&p, &sa("127.0.2.1:80")), Err(libc::EADDRNOTAVAIL));
        let open = TenantPolicy::default();
        assert_eq!(bind(&open, &sa("127.0.2.1:80")), Ok(None));
    }

    #[test]
    fn connects_stay_inside_the_tenant() {
        let p = pol();
        assert_eq!(connect(&p, &sa("127.0.0.1:80")), Ok(Some(sa("127.0.1.1:80"))));
        assert_eq!(connect(&p, &sa("127.0.2.1:80")), Err(libc::ECONNREFUSED));
        assert_eq!(connect(&p, &sa("[::ffff:127.0.2.1]:80")), Err(libc::ECONNREFUSED));
        assert_eq!(connect(&p, &sa("10.1.2.3:80")), Ok(None));
        assert!(may_listen(&p, 8005) && !may_listen(&p, 22));
        assert_eq!(source(&p, false, &sa("127.0.0.1:80")), Some(sa("127.0.1.1:0")));
        let auto = TenantPolicy { source: Some("10.0.0.7".parse().unwrap()), ..Default::default() };
        assert_eq!(source(&auto, false, &sa("10.0.0.1:80")), Some(sa("10.0.0.7:0")));
        assert_eq!(source(&auto, false, &sa("127.0.0.1:80")), None);
    }

    #[test]
    fn a_private_loopback_stands_in_for_loopback_only() {
        let p = TenantPolicy {
            loopback: Some("127.77.0.1".parse().unwrap()),
            foreign: vec!["127.77.0.2".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(bind(&p, &sa("127.0.0.1:80")), Ok(Some(sa("127.77.0.1:80"))));
        assert_eq!(bind(&p, &sa("0.0.0.0:80")), Ok(Some(sa("127.77.0.1:80"))));
        assert_eq!(bind(&p, &sa("[::1]:80")), Ok(Some(sa("[::ffff:127.77.0.1]:80"))));
        assert_eq!(connect(&p, &sa("127.0.0.1:80")), Ok(Some(sa("127.77.0.1:80"))));
        assert_eq!(connect(&p, &sa("127.77.0.2:80")), Err(libc::ECONNREFUSED));
        assert_eq!(connect(&p, &sa("10.1.2.3:80")), Ok(None));
        // Leaving the NSM, the stack picks the source: a loopback one could not leave.
        assert_eq!(source(&p, false, &sa("10.1.2.3:80")), None);
        // Tenant addresses take precedence over a private loopback.
        let both = TenantPolicy { addresses: vec!["127.0.1.1".parse().unwrap()], ..p };
        assert_eq!(connect(&both, &sa("127.0.0.1:80")), Ok(Some(sa("127.0.1.1:80"))));
    }

    #[test]
    fn v6_mapped_and_unspecified_are_local() {
        assert!(is_local("::".parse().unwrap()));
        assert!(is_local("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_local(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))));
    }
}
