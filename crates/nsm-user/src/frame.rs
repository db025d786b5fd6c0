//! A look at a received frame's IP and TCP/UDP headers before smoltcp processes it, so the stack
//! knows which of its sockets the frame concerns without asking every socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// The transport 4-tuple of a packet and its TCP flags (0 for UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub flags: u8,
    /// Transport payload bytes (data a TCP segment carries, a datagram's length).
    pub payload: usize,
    /// TCP sequence and acknowledgement numbers (0 for UDP).
    pub seq: u32,
    pub ack: u32,
}

/// Peeks an Ethernet frame (IPv4 or IPv6 inside, no VLAN tag).
pub fn peek_ethernet(f: &[u8]) -> Option<Peek> {
    if f.len() < 14 {
        return None;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 | 0x86dd => peek_ip(&f[14..]),
        _ => None,
    }
}

/// Peeks an IP packet. Non-first fragments and IPv6 packets with extension headers are not
/// looked into (None): the stack then treats them as concerning no socket in particular.
pub fn peek_ip(p: &[u8]) -> Option<Peek> {
    let (proto, src, dst, l4, l4_len) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 {
                return None;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let frag_off = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            if frag_off != 0 || ihl < 20 || p.len() < ihl {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            (p[9], src, dst, &p[ihl..], total.saturating_sub(ihl))
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&p[8..24]);
            d.copy_from_slice(&p[24..40]);
            let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
            (p[6], IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)), &p[40..], len)
        }
        _ => return None,
    };
    let need = match proto {
        TCP => 14,
        UDP => 8,
        _ => return None,
    };
    if l4.len() < need {
        return None;
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let (flags, payload, seq, ack) = if proto == TCP {
        let word = |i: usize| u32::from_be_bytes([l4[i], l4[i + 1], l4[i + 2], l4[i + 3]]);
        (l4[13], l4_len.saturating_sub(usize::from(l4[12] >> 4) * 4), word(4), word(8))
    } else {
        (0, l4_len.saturating_sub(8), 0, 0)
    };
    let (src, dst) = (SocketAddr::new(src, sport), SocketAddr::new(dst, dport));
    Some(Peek { proto, src, dst, flags, payload, seq, ack })
}

/// The TOS (traffic class) and TTL (hop limit) of an IP packet.
pub fn tos_ttl(p: &[u8]) -> Option<(u8, u8)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some((p[1], p[8])),
        6 if p.len() >= 40 => Some(((p[0] << 4) | (p[1] >> 4), p[7])),
        _ => None,
    }
}

/// Whether an Ethernet frame can teach the interface a neighbour's link address (ARP, or an
/// ICMPv6 neighbour solicitation or advertisement): sockets of any set may be waiting for one.
pub fn resolves_neighbour(f: &[u8]) -> bool {
    if f.len() < 14 {
        return false;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0806 => true,
        0x86dd => f.len() > 54 && f[14 + 6] == 58 && matches!(f[14 + 40], 135 | 136),
        _ => false,
    }
}

/// An ICMP "destination unreachable" about a packet we sent: (protocol, our address, the
/// address it was sent to, the errno Linux reports for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    pub proto: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub errno: i32,
}

/// The IP packet inside an Ethernet frame.
pub fn ip_of_ethernet(f: &[u8]) -> Option<&[u8]> {
    if f.len() < 14 {
        return None;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 | 0x86dd => Some(&f[14..]),
        _ => None,
    }
}

/// Reads an ICMPv4 type 3 or ICMPv6 type 1 message and the header of the packet it quotes,
/// with the errno of Linux's icmp_err_convert / icmpv6_err_convert.
pub fn peek_icmp_error(p: &[u8]) -> Option<IcmpError> {
    let (errno, quoted) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl + 8 || p[9] != 1 || p[ihl] != 3 {
                return None;
            }
            let errno = match p[ihl + 1] {
                0 | 6 | 11 => libc::ENETUNREACH,
                1 | 7 | 12 => libc::EHOSTUNREACH,
                2 => libc::ENOPROTOOPT,
                3 => libc::ECONNREFUSED,
                4 => libc::EMSGSIZE,
                5 => libc::EOPNOTSUPP,
                _ => libc::EHOSTUNREACH,
            };
            (errno, &p[ihl + 8..])
        }
        6 => {
            if p.len() < 48 || p[6] != 58 || p[40] != 1 {
                return None;
            }
            let errno = match p[41] {
                0 => libc::ENETUNREACH,
                1 => libc::EACCES,
                3 => libc::EHOSTUNREACH,
                4 => libc::ECONNREFUSED,
                _ => libc::EPROTO,
            };
            (errno, &p[48..])
        }
        _ => return None,
    };
    // The quoted packet went from us to the remote: its source is our side.
    let q = peek_ip(quoted)?;
    Some(IcmpError { proto: q.proto, local: q.src, remote: q.dst, errno })
}

/// Completes the TCP/UDP checksum of an Ethernet frame whose sender left it to "hardware"
/// (CHECKSUM_PARTIAL: a veth peer with tx offload on, reported by PACKET_AUXDATA as
/// TP_STATUS_CSUMNOTREADY). Frames of other kinds are left alone.
pub fn complete_checksum(f: &mut [u8]) {
    if f.len() < 14 {
        return;
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let p = &mut f[14..];
    let (proto, l4_off, l4_len, mut sum) = match ethertype {
        0x0800 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            if ihl < 20 || total < ihl {
                return;
            }
            let l4_len = total - ihl;
            let mut sum = add(0, &p[12..20]);
            sum += u32::from(p[9]) + l4_len as u32;
            (p[9], ihl, l4_len, sum)
        }
        0x86dd if p.len() >= 40 => {
            let l4_len = usize::from(u16::from_be_bytes([p[4], p[5]])).min(p.len() - 40);
            let mut sum = add(0, &p[8..40]);
            sum += u32::from(p[6]) + l4_len as u32;
            (p[6], 40, l4_len, sum)
        }
        _ => return,
    };
    let field = match proto {
        TCP if l4_len >= 20 => 16,
        UDP if l4_len >= 8 => 6,
        _ => return,
    };
    let l4 = &mut p[l4_off..l4_off + l4_len];
    l4[field] = 0;
    l4[field + 1] = 0;
    sum = add(sum, l4);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut c = !(sum as u16);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// Adds `b` as big-endian 16-bit words (an odd last byte padded with zero) to `sum`.
fn add(mut sum: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_syn_in_ethernet() {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08;
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[3] = 40;
        ip[32] = 5 << 4;
        ip[9] = TCP;
        ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
        ip[20..22].copy_from_slice(&40000u16.to_be_bytes());
        ip[22..24].copy_from_slice(&80u16.to_be_bytes());
        ip[33] = SYN;
        let p = peek_ethernet(&f).unwrap();
        assert_eq!(p.src.to_string(), "10.77.0.1:40000");
        assert_eq!(p.dst.to_string(), "10.77.0.2:80");
        assert_eq!(p.flags, SYN);
        assert_eq!(p.payload, 0);
        assert_eq!(peek_ethernet(&f[..30]), None);
    }

    #[test]
    fn hostile_frames_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let len = (rnd() % 120) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            // Bias towards headers that get past the first checks.
            if len > 14 && rnd() % 2 == 0 {
                f[12] = 0x08;
                f[13] = 0;
                f[14] = 0x40 | (rnd() % 16) as u8;
                if len > 23 {
                    f[23] = [1, 6, 17][(rnd() % 3) as usize];
                }
            }
            let _ = peek_ethernet(&f);
            let _ = ip_of_ethernet(&f).map(peek_icmp_error);
            let _ = peek_ip(&f);
            let _ = peek_icmp_error(&f);
            let _ = resolves_neighbour(&f);
            complete_checksum(&mut f);
        }
    }

    #[test]
    fn completes_a_partial_checksum_as_smoltcp_checks_it() {
        use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};
        let mut f = vec![0u8; 14 + 20 + 20 + 5];
        f[12] = 0x08;
        {
            let ip = &mut f[14..];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&45u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = TCP;
            ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
            ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
            ip[32] = 5 << 4;
            ip[33] = ACK;
            ip[40..45].copy_from_slice(b"hello");
            ip[36..38].copy_from_slice(&[0x12, 0x34]); // whatever a NIC was to overwrite
        }
        complete_checksum(&mut f);
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    }
}
