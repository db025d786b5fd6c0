//! A stack for tests of the core: TCP over IPv4 between its own sockets, in memory, with a
//! receive buffer small enough that a sender runs into it. Readiness comes the way a real
//! stack's does: from `poll`, for the sockets whose mask changed.

use crate::stack::{Errno, Ready, Stack, TcpStats};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

#[derive(Default)]
struct FakeSock {
    port: u16,
    listening: bool,
    backlog: VecDeque<usize>,
    peer: Option<usize>,
    rx: VecDeque<u8>,
    /// The peer sent its FIN or closed.
    eof: bool,
    closed: bool,
    key: Option<u64>,
    reported: u32,
}

pub(crate) struct FakeStack {
    socks: Vec<FakeSock>,
    /// Bytes a socket's receive queue holds.
    pub rcvbuf: usize,
    next_port: u16,
    wait: std::fs::File,
    /// The socket of every send, in the order they came.
    pub sends: Vec<usize>,
}

pub(crate) fn sockaddr(port: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    a[2..4].copy_from_slice(&port.to_be_bytes());
    a[4..8].copy_from_slice(&[127, 0, 0, 1]);
    a
}

fn port_of(addr: &[u8]) -> Result<u16, Errno> {
    addr.get(2..4).map(|p| u16::from_be_bytes([p[0], p[1]])).ok_or(libc::EINVAL)
}

impl FakeStack {
    pub fn new() -> FakeStack {
        FakeStack {
            socks: Vec::new(),
            rcvbuf: 64 * 1024,
            next_port: 40000,
            wait: std::fs::File::open("/dev/null").unwrap(),
            sends: Vec::new(),
        }
    }

    /// Bytes that arrived at socket `h` (as the stack sees it) and were not read.
    pub fn unread(&self, h: usize) -> usize {
        self.socks[h].rx.len()
    }

    /// Takes what arrived at socket `h`, as if its reader read it.
    pub fn drain(&mut self, h: usize) -> Vec<u8> {
        self.socks[h].rx.drain(..).collect()
    }

    fn room(&self, h: usize) -> usize {
        self.socks[h].peer.map_or(0, |p| self.rcvbuf.saturating_sub(self.socks[p].rx.len()))
    }
}

impl Stack for FakeStack {
    type Handle = usize;

    fn kind(&self) -> &'static str {
        "fake"
    }
    fn congestion(&self) -> String {
        "none".into()
    }
    fn socket(&mut self, domain: i32, ty: i32, _: i32) -> Result<usize, Errno> {
        if domain != libc::AF_INET || ty != libc::SOCK_STREAM {
            return Err(libc::EAFNOSUPPORT);
        }
        self.socks.push(FakeSock::default());
        Ok(self.socks.len() - 1)
    }
    fn bind(&mut self, s: &usize, addr: &[u8]) -> Result<(), Errno> {
        let port = port_of(addr)?;
        if port != 0 && self.socks.iter().any(|x| x.port == port && !x.closed) {
            return Err(libc::EADDRINUSE);
        }
        self.socks[*s].port = if port == 0 { self.next_port } else { port };
        self.next_port += 1;
        Ok(())
    }
    fn listen(&mut self, s: &usize, _: i32) -> Result<(), Errno> {
        self.socks[*s].listening = true;
        Ok(())
    }
    fn accept(&mut self, s: &usize, addr: &mut [u8]) -> Result<(usize, usize), Errno> {
        let c = self.socks[*s].backlog.pop_front().ok_or(libc::EAGAIN)?;
        let peer_port = self.socks[self.socks[c].peer.expect("connected")].port;
        addr[..16].copy_from_slice(&sockaddr(peer_port));
        Ok((c, 16))
    }
    fn connect(&mut self, s: &usize, addr: &[u8]) -> Result<(), Errno> {
        let port = port_of(addr)?;
        let l = self.socks.iter().position(|x| x.port == port && x.listening && !x.closed).ok_or(libc::ECONNREFUSED)?;
        if self.socks[*s].port == 0 {
            self.bind(s, &sockaddr(0))?;
        }
        self.socks.push(FakeSock { port, peer: Some(*s), ..Default::default() });
        let server = self.socks.len() - 1;
        self.socks[*s].peer = Some(server);
        self.socks[l].backlog.push_back(server);
        Ok(())
    }
    fn send(&mut self, s: &usize, data: &[u8], _: i32, _: &[u8]) -> Result<usize, Errno> {
        let peer = self.socks[*s].peer.ok_or(libc::ENOTCONN)?;
        if self.socks[peer].closed {
            return Err(libc::EPIPE);
        }
        let n = data.len().min(self.room(*s));
        if n == 0 && !data.is_empty() {
            return Err(libc::EAGAIN);
        }
        self.socks[peer].rx.extend(&data[..n]);
        self.sends.push(*s);
        Ok(n)
    }
    fn recv(&mut self, s: &usize, buf: &mut [u8], _: i32, _: &mut [u8]) -> Result<(usize, usize), Errno> {
        let sock = &mut self.socks[*s];
        if sock.rx.is_empty() {
            return if sock.eof { Ok((0, 0)) } else { Err(libc::EAGAIN) };
        }
        let n = buf.len().min(sock.rx.len());
        for (b, v) in buf.iter_mut().zip(sock.rx.drain(..n)) {
            *b = v;
        }
        Ok((n, 0))
    }
    fn shutdown(&mut self, s: &usize, _: i32) -> Result<(), Errno> {
        let peer = self.socks[*s].peer.ok_or(libc::ENOTCONN)?;
        self.socks[peer].eof = true;
        Ok(())
    }
    fn getsockopt(&mut self, _: &usize, _: i32, _: i32, val: &mut [u8]) -> Result<usize, Errno> {
        let n = val.len().min(4);
        val[..n].fill(0);
        Ok(n)
    }
    fn setsockopt(&mut self, _: &usize, _: i32, _: i32, _: &[u8]) -> Result<(), Errno> {
        Ok(())
    }
    fn getsockname(&mut self, s: &usize, addr: &mut [u8]) -> Result<usize, Errno> {
        addr[..16].copy_from_slice(&sockaddr(self.socks[*s].port));
        Ok(16)
    }
    fn getpeername(&mut self, s: &usize, addr: &mut [u8]) -> Result<usize, Errno> {
        let peer = self.socks[*s].peer.ok_or(libc::ENOTCONN)?;
        addr[..16].copy_from_slice(&sockaddr(self.socks[peer].port));
        Ok(16)
    }
    fn ioctl(&mut self, s: &usize, request: u64) -> Result<i64, Errno> {
        match request {
            libc::FIONREAD => Ok(self.socks[*s].rx.len() as i64),
            _ => Err(libc::ENOTTY),
        }
    }
    fn poll_mask(&mut self, s: &usize) -> u32 {
        let x = &self.socks[*s];
        let mut m = 0;
        if !x.rx.is_empty() || x.eof || !x.backlog.is_empty() {
            m |= libc::POLLIN as u32;
        }
        if x.peer.is_some() && self.room(*s) > 0 {
            m |= libc::POLLOUT as u32;
        }
        m
    }
    fn close(&mut self, s: usize) {
        self.socks[s].closed = true;
        if let Some(p) = self.socks[s].peer {
            self.socks[p].eof = true;
        }
    }
    fn system_resolver(&self) -> bool {
        true
    }
    fn is_local(&mut self, ip: std::net::IpAddr) -> bool {
        ip.is_loopback()
    }
    fn tcp_stats(&mut self, s: &usize) -> Option<TcpStats> {
        self.socks[*s].peer.map(|_| TcpStats { state: 1, rtt_us: 50, cwnd: 10, retrans: 0, delivery_rate: 0 })
    }
    fn watch(&mut self, s: &usize, key: u64) -> Result<(), Errno> {
        self.socks[*s].key = Some(key);
        Ok(())
    }
    fn unwatch(&mut self, s: &usize) {
        self.socks[*s].key = None;
    }
    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.wait.as_fd()
    }
    fn poll(&mut self, _: Instant, _: bool, ready: &mut Vec<Ready>) -> Option<Instant> {
        for i in 0..self.socks.len() {
            let mask = self.poll_mask(&i);
            let s = &mut self.socks[i];
            if let (Some(key), false) = (s.key, s.closed) {
                if mask & !s.reported != 0 {
                    ready.push(Ready { key, events: mask });
                }
            }
            s.reported = mask;
        }
        None
    }
}
