//! Per-connection telemetry, read from the stack when the engine asks.

use crate::control::ConnInfo;
use crate::{Attachment, Sock, Stack};
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

pub(crate) fn conn_info<S: Stack>(stack: &mut S, a: &Attachment, s: &Sock, nsm: &str) -> ConnInfo {
    let mut buf = [0u8; 128];
    let addr = |r: Result<usize, i32>, buf: &[u8]| match r {
        Ok(n) => sockaddr_to_std(&buf[..n]).map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        Err(_) => "-".into(),
    };
    let (local, remote) = match (&s.pipe, s.fd()) {
        (Some(p), _) => (addr(Ok(p.local.len()), &p.local), addr(Ok(p.peer.len()), &p.peer)),
        (None, Ok(fd)) => {
            let r = stack.getsockname(fd, &mut buf);
            let local = addr(r, &buf);
            let r = stack.getpeername(fd, &mut buf);
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
        path: if s.pipe.is_some() { "colocated" } else { "kernel" }.into(),
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        ..Default::default()
    };
    if let Some(p) = &s.pipe {
        info.state = TCP_STATES[p.tcp_state() as usize].into();
    } else if let (true, Ok(fd)) = (s.stream, s.fd()) {
        // SAFETY: tcp_info is plain data; any byte pattern is valid.
        let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
        // SAFETY: viewing a plain-data struct as bytes for the stack to fill.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                &mut ti as *mut libc::tcp_info as *mut u8,
                std::mem::size_of::<libc::tcp_info>(),
            )
        };
        if stack.getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, bytes).is_ok() {
            info.state = TCP_STATES.get(ti.tcpi_state as usize).copied().unwrap_or("?").into();
            info.rtt_us = ti.tcpi_rtt;
            info.cwnd = ti.tcpi_snd_cwnd;
            info.retrans = ti.tcpi_total_retrans;
            info.delivery_rate = ti.tcpi_delivery_rate;
        }
    }
    info
}
