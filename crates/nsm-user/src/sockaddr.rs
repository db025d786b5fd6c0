//! struct sockaddr_in / sockaddr_in6 as bytes, read and written exactly as Linux lays them out
//! (family in host order, port and address in network order).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::seam::Errno;

pub const SIN_LEN: usize = 16;
pub const SIN6_LEN: usize = 28;

/// The address family of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn domain(self) -> i32 {
        match self {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        }
    }

    /// The wildcard address:port 0 of this family (getsockname of an unbound socket).
    pub fn unspecified(self) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            Family::V6 => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        }
    }
}

/// What an address argument meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Addr(SocketAddr),
    /// AF_UNSPEC: connect's "dissolve the association".
    Unspec,
}

/// Reads an address passed to bind/connect/sendto on a socket of `family`: a short address is
/// EINVAL and another family EAFNOSUPPORT, as Linux's inet_bind/inet6_bind/connect say.
pub fn parse(family: Family, b: &[u8]) -> Result<Parsed, Errno> {
    if b.len() < 2 {
        return Err(libc::EINVAL);
    }
    let fam = i32::from(u16::from_ne_bytes([b[0], b[1]]));
    match family {
        Family::V4 => {
            if b.len() < SIN_LEN {
                return Err(libc::EINVAL);
            }
            match fam {
                libc::AF_INET => Ok(Parsed::Addr(SocketAddr::V4(read_v4(b)))),
                libc::AF_UNSPEC => Ok(Parsed::Unspec),
                _ => Err(libc::EAFNOSUPPORT),
            }
        }
        Family::V6 => {
            // Linux checks the length before the family for AF_INET6 sockets (SIN6_LEN_RFC2133
            // = 24 is the minimum it takes).
            if fam == libc::AF_UNSPEC {
                return Ok(Parsed::Unspec);
            }
            if b.len() < 24 {
                return Err(libc::EINVAL);
            }
            match fam {
                libc::AF_INET6 => {
                    let port = u16::from_be_bytes([b[2], b[3]]);
                    let flow = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&b[8..24]);
                    let scope = if b.len() >= SIN6_LEN { u32::from_ne_bytes([b[24], b[25], b[26], b[27]]) } else { 0 };
                    Ok(Parsed::Addr(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope))))
                }
                _ => Err(libc::EAFNOSUPPORT),
            }
        }
    }
}

fn read_v4(b: &[u8]) -> SocketAddrV4 {
    let port = u16::from_be_bytes([b[2], b[3]]);
    SocketAddrV4::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]), port)
}

/// Writes `a` as a socket of `family` reports it (an IPv4 peer of an AF_INET6 socket as
/// ::ffff:a.b.c.d), truncated to `out` as Linux truncates; returns the full length.
pub fn write(family: Family, a: SocketAddr, out: &mut [u8]) -> usize {
    let mut buf = [0u8; SIN6_LEN];
    let len = match (family, a) {
        (Family::V4, SocketAddr::V4(a)) => {
            buf[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            buf[2..4].copy_from_slice(&a.port().to_be_bytes());
            buf[4..8].copy_from_slice(&a.ip().octets());
            SIN_LEN
        }
        (Family::V4, SocketAddr::V6(a)) => {
            // Only reachable for a v4-mapped address; an AF_INET socket never holds real IPv6.
            let ip = a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED);
            return write(Family::V4, SocketAddr::from((ip, a.port())), out);
        }
        (Family::V6, a) => {
            let (ip, flow, scope) = match a {
                SocketAddr::V4(a) => (a.ip().to_ipv6_mapped(), 0, 0),
                SocketAddr::V6(a) => (*a.ip(), a.flowinfo(), a.scope_id()),
            };
            buf[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            buf[2..4].copy_from_slice(&a.port().to_be_bytes());
            buf[4..8].copy_from_slice(&flow.to_be_bytes());
            buf[8..24].copy_from_slice(&ip.octets());
            buf[24..28].copy_from_slice(&scope.to_ne_bytes());
            SIN6_LEN
        }
    };
    let n = len.min(out.len());
    out[..n].copy_from_slice(&buf[..n]);
    len
}

/// The IPv4 address inside a v4-mapped IPv6 address, else the address itself: the stack runs
/// an AF_INET6 socket's IPv4 traffic as IPv4.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        a => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_v4_and_v6() {
        let mut b = [0u8; 28];
        let a: SocketAddr = "10.77.0.2:8080".parse().unwrap();
        assert_eq!(write(Family::V4, a, &mut b), 16);
        assert_eq!(&b[..8], &[2, 0, 0x1f, 0x90, 10, 77, 0, 2]);
        assert_eq!(parse(Family::V4, &b[..16]), Ok(Parsed::Addr(a)));
        let a6: SocketAddr = "[fd77::2]:443".parse().unwrap();
        assert_eq!(write(Family::V6, a6, &mut b), 28);
        assert_eq!(parse(Family::V6, &b), Ok(Parsed::Addr(a6)));
        // An IPv4 peer of an AF_INET6 socket reads back v4-mapped.
        write(Family::V6, a, &mut b);
        let Ok(Parsed::Addr(m)) = parse(Family::V6, &b) else { panic!() };
        assert_eq!(m.to_string(), "[::ffff:10.77.0.2]:8080");
        assert_eq!(unmap(m), a);
    }

    #[test]
    fn linux_errors() {
        assert_eq!(parse(Family::V4, &[2, 0, 0]), Err(libc::EINVAL));
        let mut b = [0u8; 16];
        b[0] = 10; // AF_INET6 bytes on an AF_INET socket
        assert_eq!(parse(Family::V4, &b), Err(libc::EAFNOSUPPORT));
        b[0] = 2;
        assert_eq!(parse(Family::V6, &b), Err(libc::EINVAL)); // too short for sockaddr_in6
        let mut short = [0u8; 8];
        assert_eq!(write(Family::V4, "1.2.3.4:5".parse().unwrap(), &mut short), 16);
        assert_eq!(short, [2, 0, 0, 5, 1, 2, 3, 4]);
    }
}
