//! Per-connection telemetry, read from the stack when the engine asks.

use crate::control::ConnInfo;
use crate::sock::{Attachment, Sock};
use crate::Stack;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Decodes a sockaddr_in/sockaddr_in6 as the kernel wrote it.
pub fn sockaddr_to_std(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]) as i32;
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family {
        libc::AF_INET if b.len() >= 8 => {
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]), port)))
        }
        libc::AF_INET6 if b.len() >= 24 => {
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0)))
        }
        _ => None,
    }
}

const TCP_STATES: [&str; 13] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

pub(crate) fn conn_info<S: Stack>(
    stack: &mut S,
    a: &Attachment<S::Handle>,
    s: &Sock<S::Handle>,
    nsm: &str,
) -> ConnInfo {
    let mut buf = [0u8; 128];
    let addr = |r: Result<usize, i32>, buf: &[u8]| match r {
        Ok(n) => sockaddr_to_std(&buf[..n]).map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        Err(_) => "-".into(),
    };
    let (local, remote) = match (&s.pipe, s.handle()) {
        (Some(p), _) => (addr(Ok(p.local.len()), &p.local), addr(Ok(p.peer.len()), &p.peer)),
        (None, Ok(h)) => {
            let r = stack.getsockname(h, &mut buf);
            let local = addr(r, &buf);
            let r = stack.getpeername(h, &mut buf);
            (local, addr(r, &buf))
        }
        (None, Err(_)) => ("-".into(), "-".into()),
    };
    let mut info = ConnInfo {
        tenant: a.tenant.clone(),
        nsm: nsm.into(),
        attachment: a.id,
        pid: a.pid,
        proto: if s.stream { "tcp" } else { "udp" }.into(),
        local,
        remote,
        state: if s.stream { "?" } else { "-" }.into(),
        path: if s.pipe.is_some() { "colocated" } else { stack.kind() }.into(),
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        cpu_us: s.cpu.as_micros() as u64,
        ..Default::default()
    };
    if let Some(p) = &s.pipe {
        info.state = TCP_STATES[p.tcp_state() as usize].into();
    } else if let (true, Some(t)) = (s.stream, s.handle().ok().and_then(|h| stack.tcp_stats(h))) {
        info.state = TCP_STATES.get(t.state as usize).copied().unwrap_or("?").into();
        info.rtt_us = t.rtt_us;
        info.cwnd = t.cwnd;
        info.retrans = t.retrans;
        info.delivery_rate = t.delivery_rate;
    }
    info
}
