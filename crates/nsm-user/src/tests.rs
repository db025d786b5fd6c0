//! Two UserStacks wired back to back through a SOCK_SEQPACKET socketpair (one frame per
//! message, like a TAP), on a virtual clock; each check compares with what Linux does.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::config::{Link, UserConfig};
use crate::seam::{Ready, Stack};
use crate::sockaddr::{self, Family};
use crate::stack::Handle;
use crate::UserStack;

const IN: u32 = libc::POLLIN as u32;
const OUT: u32 = libc::POLLOUT as u32;
const HUP: u32 = libc::POLLHUP as u32;
const ERR: u32 = libc::POLLERR as u32;
const RDHUP: u32 = libc::POLLRDHUP as u32;

struct Net {
    a: UserStack,
    b: UserStack,
    now: Instant,
    ra: Vec<Ready>,
    rb: Vec<Ready>,
}

fn cfg(link: Link, last: u8) -> UserConfig {
    UserConfig {
        link,
        address: (format!("10.77.0.{last}").parse().unwrap(), 24),
        address6: Some((format!("fd77::{last}").parse().unwrap(), 64)),
        gateway: "10.77.0.1".parse().unwrap(),
        gateway6: Some("fd77::1".parse().unwrap()),
        congestion: None,
    }
}

fn wire() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a live array of two ints for socketpair to fill.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Net {
    /// A at 10.77.0.2 (AF_PACKET-style recv/send), B at 10.77.0.3 (TAP-style read/write).
    fn new() -> Net {
        let (x, y) = wire();
        Net {
            a: UserStack::new(cfg(Link::Packet, 2), x).unwrap(),
            b: UserStack::new(cfg(Link::Tap, 3), y).unwrap(),
            now: Instant::now(),
            ra: Vec::new(),
            rb: Vec::new(),
        }
    }

    /// Runs both stacks for `ms` virtual milliseconds, 1 ms a step.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.now += Duration::from_millis(1);
            self.a.poll(self.now, true, &mut self.ra);
            self.b.poll(self.now, true, &mut self.rb);
        }
    }
}

fn sa(s: &str) -> Vec<u8> {
    let a: SocketAddr = s.parse().unwrap();
    let fam = if a.is_ipv4() { Family::V4 } else { Family::V6 };
    let mut b = vec![0u8; 28];
    let n = sockaddr::write(fam, a, &mut b);
    b.truncate(n);
    b
}

fn sa6(s: &str) -> Vec<u8> {
    let a: SocketAddr = s.parse().unwrap();
    let mut b = vec![0u8; 28];
    sockaddr::write(Family::V6, a, &mut b);
    b
}

fn read_sa(fam: Family, b: &[u8]) -> SocketAddr {
    match sockaddr::parse(fam, b).unwrap() {
        sockaddr::Parsed::Addr(a) => a,
        sockaddr::Parsed::Unspec => panic!("unspec"),
    }
}

fn tcp(s: &mut UserStack) -> Handle {
    s.socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0).unwrap()
}

fn tcp6(s: &mut UserStack) -> Handle {
    s.socket(libc::AF_INET6, libc::SOCK_STREAM, 0).unwrap()
}

fn udp(s: &mut UserStack) -> Handle {
    s.socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0).unwrap()
}

fn listener(s: &mut UserStack, addr: &str, backlog: i32) -> Handle {
    let l = if addr.starts_with('[') { tcp6(s) } else { tcp(s) };
    s.bind(&l, &sa(addr)).unwrap();
    s.listen(&l, backlog).unwrap();
    l
}

fn int_opt(s: &mut UserStack, h: &Handle, level: i32, name: i32) -> i32 {
    let mut v = [0u8; 4];
    assert_eq!(s.getsockopt(h, level, name, &mut v).unwrap(), 4);
    i32::from_ne_bytes(v)
}

fn set_int(s: &mut UserStack, h: &Handle, level: i32, name: i32, v: i32) {
    s.setsockopt(h, level, name, &v.to_ne_bytes()).unwrap();
}

fn send_all(s: &mut UserStack, h: &Handle, d: &[u8]) {
    assert_eq!(s.send(h, d, 0, &[]).unwrap(), d.len());
}

fn recv_str(s: &mut UserStack, h: &Handle) -> Result<String, i32> {
    let mut b = [0u8; 4096];
    let (n, _) = s.recv(h, &mut b, 0, &mut [])?;
    Ok(String::from_utf8_lossy(&b[..n]).into_owned())
}

/// Connects A to B at `to` and returns (A's socket, B's accepted socket, peer seen by B).
fn connect_pair(n: &mut Net, l: &Handle, to: &str) -> (Handle, Handle, SocketAddr) {
    let c = if to.starts_with('[') { tcp6(&mut n.a) } else { tcp(&mut n.a) };
    assert_eq!(n.a.connect(&c, &sa(to)), Err(libc::EINPROGRESS));
    // smoltcp sends one neighbour request a second per interface: a second family's first
    // contact can wait that long.
    for _ in 0..1500 {
        n.run(1);
        if n.a.poll_mask(&c) != 0 {
            break;
        }
    }
    assert_eq!(n.a.connect(&c, &sa(to)), Ok(()));
    let mut pa = [0u8; 28];
    let (s, len) = n.b.accept(l, &mut pa).unwrap();
    let fam = if len == 16 { Family::V4 } else { Family::V6 };
    (c, s, read_sa(fam, &pa[..len]))
}

#[test]
fn tcp_v4_connect_accept_bytes_and_fin() {
    let mut n = Net::new();
    assert_eq!(n.a.kind(), "user");
    assert_eq!(n.a.congestion(), "reno");
    let l = listener(&mut n.b, "0.0.0.0:80", 8);
    let mut pa = [0u8; 16];
    assert_eq!(n.b.accept(&l, &mut pa).err(), Some(libc::EAGAIN));
    assert_eq!(n.b.poll_mask(&l), 0);

    let c = tcp(&mut n.a);
    assert_eq!(n.a.poll_mask(&c), OUT | HUP, "an unconnected TCP socket is TCP_CLOSE");
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:80")), Err(libc::EINPROGRESS));
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:80")), Err(libc::EALREADY));
    assert_eq!(n.a.poll_mask(&c), 0);
    let mut name = [0u8; 16];
    assert_eq!(n.a.getpeername(&c, &mut name), Err(libc::ENOTCONN));
    n.run(20);
    assert_eq!(n.a.poll_mask(&c), OUT);
    assert_eq!(n.b.poll_mask(&l), IN);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:80")), Ok(()));
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:80")), Err(libc::EISCONN));

    let (s, len) = n.b.accept(&l, &mut pa).unwrap();
    assert_eq!(len, 16);
    let peer = read_sa(Family::V4, &pa);
    assert_eq!(peer.ip().to_string(), "10.77.0.2");
    assert!(crate::stack::EPHEMERAL.contains(&peer.port()), "{peer}");
    assert_eq!(n.a.getsockname(&c, &mut name), Ok(16));
    assert_eq!(read_sa(Family::V4, &name), peer);
    assert_eq!(n.a.getpeername(&c, &mut name), Ok(16));
    assert_eq!(read_sa(Family::V4, &name).to_string(), "10.77.0.3:80");
    assert_eq!(n.b.getsockname(&s, &mut name), Ok(16));
    assert_eq!(read_sa(Family::V4, &name).to_string(), "10.77.0.3:80");

    assert_eq!(recv_str(&mut n.b, &s), Err(libc::EAGAIN));
    send_all(&mut n.a, &c, b"hello");
    n.run(5);
    assert_eq!(n.b.poll_mask(&s), IN | OUT);
    assert_eq!(n.b.ioctl(&s, 0x541b), Ok(5));
    let mut b = [0u8; 3];
    assert_eq!(n.b.recv(&s, &mut b, libc::MSG_PEEK, &mut []), Ok((3, 0)));
    assert_eq!(&b, b"hel");
    assert_eq!(recv_str(&mut n.b, &s).unwrap(), "hello");
    send_all(&mut n.b, &s, b"world");
    assert!(n.b.ioctl(&s, 0x5411).unwrap() > 0, "TIOCOUTQ counts bytes not yet acknowledged");
    n.run(5);
    assert_eq!(recv_str(&mut n.a, &c).unwrap(), "world");
    n.run(50);
    assert_eq!(n.b.ioctl(&s, 0x5411), Ok(0));

    // shutdown(SHUT_WR): the peer reads EOF and may still send.
    n.a.shutdown(&c, libc::SHUT_WR).unwrap();
    assert_eq!(n.a.send(&c, b"x", 0, &[]), Err(libc::EPIPE));
    n.run(5);
    assert_eq!(n.b.poll_mask(&s), IN | OUT | RDHUP);
    assert_eq!(recv_str(&mut n.b, &s).unwrap(), "");
    send_all(&mut n.b, &s, b"late");
    n.run(5);
    assert_eq!(recv_str(&mut n.a, &c).unwrap(), "late");
    n.b.close(s);
    n.run(20);
    assert_eq!(n.a.poll_mask(&c), IN | OUT | RDHUP | HUP);
    assert_eq!(recv_str(&mut n.a, &c).unwrap(), "");
    assert_eq!(n.a.getpeername(&c, &mut name), Err(libc::ENOTCONN));
    assert_eq!(int_opt(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_ERROR), 0);
}

#[test]
fn connection_refused_by_rst() {
    let mut n = Net::new();
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(n.a.poll_mask(&c), IN | OUT | ERR | HUP | RDHUP);
    assert_eq!(int_opt(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_ERROR), libc::ECONNREFUSED);
    assert_eq!(int_opt(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_ERROR), 0);
    assert_eq!(n.a.poll_mask(&c) & ERR, 0);

    // Without SO_ERROR, the second connect reports it (what a blocking connect returns).
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::ECONNREFUSED));
    assert_eq!(n.a.recv(&c, &mut [0; 4], 0, &mut []), Ok((0, 0)));
    // The socket may try again (same port, same peer), and be refused again.
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::ECONNREFUSED));
    // And succeed once someone listens.
    let l = listener(&mut n.b, "0.0.0.0:81", 1);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Ok(()));
    assert!(n.b.accept(&l, &mut [0; 16]).is_ok());
}

#[test]
fn connect_times_out_without_an_answer() {
    // Nobody at 10.77.0.9: ARP never resolves, the SYN never leaves, ETIMEDOUT after 127 s.
    let mut n = Net::new();
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.9:80")), Err(libc::EINPROGRESS));
    n.run(10);
    assert_eq!(n.a.poll_mask(&c), 0);
    for _ in 0..130 {
        n.now += Duration::from_secs(1);
        n.a.poll(n.now, false, &mut n.ra);
    }
    assert_eq!(n.a.poll_mask(&c) & (ERR | HUP), ERR | HUP);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.9:80")), Err(libc::ETIMEDOUT));
}

#[test]
fn reset_gives_econnreset_then_epipe() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "10.77.0.3:7000", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7000");
    // SO_LINGER {on, 0}: close sends a RST.
    let mut lg = [0u8; 8];
    lg[..4].copy_from_slice(&1i32.to_ne_bytes());
    n.b.setsockopt(&s, libc::SOL_SOCKET, libc::SO_LINGER, &lg).unwrap();
    n.b.close(s);
    n.run(5);
    assert_eq!(n.a.poll_mask(&c), IN | OUT | ERR | HUP | RDHUP);
    assert_eq!(n.a.recv(&c, &mut [0; 8], 0, &mut []), Err(libc::ECONNRESET));
    assert_eq!(n.a.recv(&c, &mut [0; 8], 0, &mut []), Ok((0, 0)));
    assert_eq!(n.a.send(&c, b"x", 0, &[]), Err(libc::EPIPE));
}

#[test]
fn send_after_peer_close_succeeds_once_then_epipe() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7001", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7001");
    n.b.close(s);
    n.run(5);
    assert_eq!(n.a.poll_mask(&c), IN | OUT | RDHUP);
    assert_eq!(recv_str(&mut n.a, &c).unwrap(), "");
    // The peer's FIN only says it sends no more: this send succeeds, and draws a RST.
    assert_eq!(n.a.send(&c, b"ping", 0, &[]), Ok(4));
    n.run(5);
    assert_eq!(n.a.send(&c, b"ping", 0, &[]), Err(libc::EPIPE));
    assert_eq!(n.a.poll_mask(&c) & HUP, HUP);
}

#[test]
fn closing_with_unread_data_resets() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7002", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7002");
    send_all(&mut n.a, &c, b"unread");
    n.run(5);
    drop(s); // a dropped handle closes like close()
    n.run(5);
    assert_eq!(n.a.recv(&c, &mut [0; 8], 0, &mut []), Err(libc::ECONNRESET));
}

#[test]
fn dropped_listener_refuses() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7003", 4);
    drop(l);
    n.run(2);
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7003")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(int_opt(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_ERROR), libc::ECONNREFUSED);
    assert_eq!(n.b.socket_count(), 0);
}

#[test]
fn bulk_transfer_both_ways() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7004", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7004");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut sent, mut got) = (0, Vec::new());
    let (mut back_sent, mut back) = (0, Vec::new());
    let mut buf = vec![0u8; 65536];
    for _ in 0..20_000 {
        if sent < data.len() {
            match n.a.send(&c, &data[sent..], 0, &[]) {
                Ok(k) => sent += k,
                Err(e) => assert_eq!(e, libc::EAGAIN),
            }
        }
        if back_sent < data.len() {
            match n.b.send(&s, &data[back_sent..], 0, &[]) {
                Ok(k) => back_sent += k,
                Err(e) => assert_eq!(e, libc::EAGAIN),
            }
        }
        while let Ok((k, _)) = n.b.recv(&s, &mut buf, 0, &mut []) {
            got.extend_from_slice(&buf[..k]);
        }
        while let Ok((k, _)) = n.a.recv(&c, &mut buf, 0, &mut []) {
            back.extend_from_slice(&buf[..k]);
        }
        if got.len() == data.len() && back.len() == data.len() {
            break;
        }
        n.run(1);
    }
    assert!(got == data, "A→B bytes differ ({} of {})", got.len(), data.len());
    assert!(back == data, "B→A bytes differ ({} of {})", back.len(), data.len());
}

#[test]
fn listen_backlog_caps_the_queue() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7005", 1);
    let cs: Vec<Handle> = (0..4)
        .map(|_| {
            let c = tcp(&mut n.a);
            assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7005")), Err(libc::EINPROGRESS));
            c
        })
        .collect();
    n.run(50);
    // backlog 1 holds two connections (sk_acceptq_is_full is "more than backlog"); the other
    // SYNs were dropped, not refused, so those clients keep trying.
    let mut pa = [0u8; 16];
    let mut accepted = vec![n.b.accept(&l, &mut pa).unwrap().0, n.b.accept(&l, &mut pa).unwrap().0];
    assert_eq!(n.b.accept(&l, &mut pa).err(), Some(libc::EAGAIN));
    let pending: Vec<u32> = cs.iter().map(|c| n.a.poll_mask(c)).collect();
    assert_eq!(pending.iter().filter(|&&m| m == OUT).count(), 2, "{pending:?}");
    assert_eq!(pending.iter().filter(|&&m| m == 0).count(), 2, "{pending:?}");
    // The SYN retransmissions (RTO 1 s, then 2 s) get in once there is room.
    n.run(3500);
    accepted.push(n.b.accept(&l, &mut pa).unwrap().0);
    accepted.push(n.b.accept(&l, &mut pa).unwrap().0);
    assert!(cs.iter().all(|c| n.a.poll_mask(c) == OUT));
    assert_eq!(accepted.len(), 4);
}

#[test]
fn bind_conflicts_and_reuseaddr() {
    let mut n = Net::new();
    let s = &mut n.a;
    let x = tcp(s);
    s.bind(&x, &sa("0.0.0.0:8000")).unwrap();
    assert_eq!(s.bind(&x, &sa("0.0.0.0:8001")), Err(libc::EINVAL), "bound twice");
    let y = tcp(s);
    assert_eq!(s.bind(&y, &sa("10.77.0.2:8000")), Err(libc::EADDRINUSE));
    assert_eq!(s.bind(&y, &sa("10.77.0.77:8000")), Err(libc::EADDRNOTAVAIL));
    let y6 = tcp6(s);
    assert_eq!(s.bind(&y6, &sa("[::]:8000")), Err(libc::EADDRINUSE), "dual-stack :: overlaps 0.0.0.0");
    let z6 = tcp6(s);
    set_int(s, &z6, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
    assert_eq!(int_opt(s, &z6, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY), 1);
    s.bind(&z6, &sa("[::]:8000")).unwrap();

    // SO_REUSEADDR on both: two bound sockets may share a port, but only one may listen.
    let p = tcp(s);
    let q = tcp(s);
    set_int(s, &p, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    set_int(s, &q, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    assert_eq!(int_opt(s, &q, libc::SOL_SOCKET, libc::SO_REUSEADDR), 1);
    s.bind(&p, &sa("0.0.0.0:8100")).unwrap();
    s.bind(&q, &sa("0.0.0.0:8100")).unwrap();
    s.listen(&p, 5).unwrap();
    assert_eq!(s.listen(&q, 5), Err(libc::EADDRINUSE));
    let r = tcp(s);
    set_int(s, &r, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    assert_eq!(s.bind(&r, &sa("0.0.0.0:8100")), Err(libc::EADDRINUSE), "a listener blocks reuse");
}

#[test]
fn time_wait_holds_the_port_unless_reuseaddr() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7006", 4);
    let c = tcp(&mut n.a);
    // SO_REUSEADDR on the socket that will be in TIME_WAIT too: Linux wants both.
    set_int(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7006")), Err(libc::EINPROGRESS));
    n.run(20);
    let (s, _) = n.b.accept(&l, &mut [0; 16]).unwrap();
    let mut name = [0u8; 16];
    n.a.getsockname(&c, &mut name).unwrap();
    let port = read_sa(Family::V4, &name).port();
    // A closes first, so A's side ends in TIME_WAIT.
    n.a.close(c);
    n.run(5);
    n.b.close(s);
    n.run(5);
    let x = tcp(&mut n.a);
    assert_eq!(n.a.bind(&x, &sa(&format!("0.0.0.0:{port}"))), Err(libc::EADDRINUSE));
    set_int(&mut n.a, &x, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    n.a.bind(&x, &sa(&format!("0.0.0.0:{port}"))).unwrap();
}

#[test]
fn loopback_never_touches_the_wire() {
    let mut n = Net::new();
    // The interface's start-up IPv6 multicast report is the only frame allowed out.
    n.run(1);
    let before = n.a.wire_counters();
    for (listen, to) in
        [("127.0.0.1:9000", "127.0.0.1:9000"), ("0.0.0.0:9001", "10.77.0.2:9001"), ("[::]:9002", "[::1]:9002")]
    {
        let l = listener(&mut n.a, listen, 4);
        let c = if to.starts_with('[') { tcp6(&mut n.a) } else { tcp(&mut n.a) };
        assert_eq!(n.a.connect(&c, &sa(to)), Err(libc::EINPROGRESS));
        n.run(3);
        assert_eq!(n.a.connect(&c, &sa(to)), Ok(()));
        let mut pa = [0u8; 28];
        let (s, _) = n.a.accept(&l, &mut pa).unwrap();
        send_all(&mut n.a, &c, b"over lo");
        n.run(2);
        assert_eq!(recv_str(&mut n.a, &s).unwrap(), "over lo");
        send_all(&mut n.a, &s, b"and back");
        n.run(2);
        assert_eq!(recv_str(&mut n.a, &c).unwrap(), "and back");
    }
    // UDP to our own address too.
    let u = udp(&mut n.a);
    n.a.bind(&u, &sa("0.0.0.0:9003")).unwrap();
    let v = udp(&mut n.a);
    assert_eq!(n.a.send(&v, b"dgram", 0, &sa("10.77.0.2:9003")), Ok(5));
    n.run(2);
    let mut b = [0u8; 16];
    let mut from = [0u8; 16];
    assert_eq!(n.a.recv(&u, &mut b, 0, &mut from), Ok((5, 16)));
    assert_eq!(read_sa(Family::V4, &from).ip().to_string(), "10.77.0.2");
    // Refused on loopback as well.
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("127.0.0.1:9009")), Err(libc::EINPROGRESS));
    n.run(2);
    assert_eq!(int_opt(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_ERROR), libc::ECONNREFUSED);
    // All of 127/8 is local: bound on 127.0.0.5, reached from 127.0.0.1.
    let l5 = listener(&mut n.a, "127.0.0.5:9004", 4);
    let c5 = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c5, &sa("127.0.0.5:9004")), Err(libc::EINPROGRESS));
    n.run(3);
    let mut pa = [0u8; 16];
    let (s5, _) = n.a.accept(&l5, &mut pa).unwrap();
    assert_eq!(read_sa(Family::V4, &pa).ip().to_string(), "127.0.0.1");
    let mut name = [0u8; 16];
    n.a.getsockname(&s5, &mut name).unwrap();
    assert_eq!(read_sa(Family::V4, &name).to_string(), "127.0.0.5:9004");
    // Nothing of the above went out on the device (ARP included).
    assert_eq!(n.a.wire_counters().0, before.0);
}

#[test]
fn udp_sendto_recvfrom_connect() {
    let mut n = Net::new();
    let srv = udp(&mut n.b);
    n.b.bind(&srv, &sa("0.0.0.0:5000")).unwrap();
    assert_eq!(n.b.poll_mask(&srv), OUT);
    let cl = udp(&mut n.a);
    assert_eq!(n.a.send(&cl, b"x", 0, &[]), Err(libc::EDESTADDRREQ));
    assert_eq!(n.a.send(&cl, b"query", 0, &sa("10.77.0.3:5000")), Ok(5));
    let mut name = [0u8; 16];
    n.a.getsockname(&cl, &mut name).unwrap();
    let me = read_sa(Family::V4, &name);
    assert!(crate::stack::EPHEMERAL.contains(&me.port()), "autobound to an ephemeral port: {me}");
    n.run(10);
    assert_eq!(n.b.poll_mask(&srv), IN | OUT);
    assert_eq!(n.b.ioctl(&srv, 0x541b), Ok(5));
    let mut b = [0u8; 3];
    let mut from = [0u8; 16];
    // MSG_TRUNC reports the datagram's real length; the rest of it is gone.
    assert_eq!(n.b.recv(&srv, &mut b, libc::MSG_TRUNC | libc::MSG_PEEK, &mut from), Ok((5, 16)));
    let r = n.b.recvmsg(&srv, &mut b, libc::MSG_PEEK, &mut from, &mut []).unwrap();
    assert_eq!((r.len, r.from_len, r.control_len, r.flags), (3, 16, 0, libc::MSG_TRUNC));
    assert_eq!(n.b.recv(&srv, &mut b, 0, &mut from), Ok((3, 16)));
    assert_eq!(read_sa(Family::V4, &from), SocketAddr::new("10.77.0.2".parse().unwrap(), me.port()));
    assert_eq!(n.b.recv(&srv, &mut b, 0, &mut from), Err(libc::EAGAIN));
    assert_eq!(n.b.send(&srv, b"answer", 0, &from), Ok(6));
    n.run(2);
    let mut bb = [0u8; 16];
    assert_eq!(n.a.recv(&cl, &mut bb, 0, &mut from), Ok((6, 16)));
    assert_eq!(&bb[..6], b"answer");

    // A connected socket sends without an address and drops strangers' datagrams.
    n.a.connect(&cl, &sa("10.77.0.3:5000")).unwrap();
    let mut peer = [0u8; 16];
    assert_eq!(n.a.getpeername(&cl, &mut peer), Ok(16));
    n.a.getsockname(&cl, &mut name).unwrap();
    assert_eq!(read_sa(Family::V4, &name).ip().to_string(), "10.77.0.2");
    let stranger = udp(&mut n.b);
    assert_eq!(n.b.send(&stranger, b"spam", 0, &sa(&format!("10.77.0.2:{}", me.port()))), Ok(4));
    assert_eq!(n.b.send(&srv, b"ok", 0, &sa(&format!("10.77.0.2:{}", me.port()))), Ok(2));
    n.run(2);
    assert_eq!(n.a.recv(&cl, &mut bb, 0, &mut []), Ok((2, 0)));
    assert_eq!(n.a.recv(&cl, &mut bb, 0, &mut []), Err(libc::EAGAIN));
    // A stranger's datagram alone does not make a connected socket readable.
    assert_eq!(n.b.send(&stranger, b"spam", 0, &sa(&format!("10.77.0.2:{}", me.port()))), Ok(4));
    n.run(2);
    assert_eq!(n.a.poll_mask(&cl), OUT);
    assert_eq!(n.a.send(&cl, b"hi", 0, &[]), Ok(2));
    assert_eq!(n.a.send(&cl, &vec![0; 65508], 0, &[]), Err(libc::EMSGSIZE));
    assert_eq!(n.a.send(&cl, b"b", 0, &sa("10.77.0.255:9")), Err(libc::EACCES));
    // A 20 kB datagram goes out in IPv4 fragments and comes back whole.
    let big: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    n.run(2);
    let _ = n.b.recv(&srv, &mut bb, 0, &mut from);
    assert_eq!(n.a.send(&cl, &big, 0, &[]), Ok(20_000));
    n.run(5);
    let mut bigbuf = vec![0u8; 30_000];
    assert_eq!(n.b.recv(&srv, &mut bigbuf, 0, &mut from), Ok((20_000, 16)));
    assert!(bigbuf[..20_000] == big[..]);
}

#[test]
fn ipv6_tcp_and_dual_stack() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "[::]:443", 4);
    let (c, s, peer) = connect_pair(&mut n, &l, "[fd77::3]:443");
    assert_eq!(peer.ip().to_string(), "fd77::2");
    send_all(&mut n.a, &c, b"six");
    n.run(3);
    assert_eq!(recv_str(&mut n.b, &s).unwrap(), "six");
    // The same AF_INET6 listener takes IPv4 and shows the peer v4-mapped.
    let (_c4, s4, peer4) = connect_pair(&mut n, &l, "10.77.0.3:443");
    assert_eq!(peer4.to_string().split(']').next().unwrap(), "[::ffff:10.77.0.2");
    let mut name = [0u8; 28];
    assert_eq!(n.b.getsockname(&s4, &mut name), Ok(28));
    assert_eq!(read_sa(Family::V6, &name).to_string(), "[::ffff:10.77.0.3]:443");
    // An AF_INET6 client can reach IPv4 through a v4-mapped address.
    let c6 = tcp6(&mut n.a);
    assert_eq!(n.a.connect(&c6, &sa6("10.77.0.3:443")), Err(libc::EINPROGRESS));
    n.run(1500);
    assert_eq!(n.a.connect(&c6, &sa6("10.77.0.3:443")), Ok(()));
    // IPV6_V6ONLY sockets refuse v4-mapped destinations.
    let only = tcp6(&mut n.a);
    set_int(&mut n.a, &only, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
    assert_eq!(n.a.connect(&only, &sa6("10.77.0.3:443")), Err(libc::ENETUNREACH));
    // UDP over IPv6.
    let u = n.b.socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).unwrap();
    n.b.bind(&u, &sa("[fd77::3]:53")).unwrap();
    let v = n.a.socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).unwrap();
    assert_eq!(n.a.send(&v, b"aaaa", 0, &sa("[fd77::3]:53")), Ok(4));
    n.run(5);
    let mut from = [0u8; 28];
    let mut b = [0u8; 8];
    assert_eq!(n.b.recv(&u, &mut b, 0, &mut from), Ok((4, 28)));
    assert_eq!(read_sa(Family::V6, &from).ip().to_string(), "fd77::2");
}

#[test]
fn linux_errnos_for_misuse() {
    let mut n = Net::new();
    let s = &mut n.a;
    assert_eq!(s.socket(libc::AF_UNIX, libc::SOCK_STREAM, 0).err(), Some(libc::EAFNOSUPPORT));
    assert_eq!(s.socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_UDP).err(), Some(libc::EPROTONOSUPPORT));
    assert_eq!(s.socket(libc::AF_INET, 77, 0).err(), Some(libc::EINVAL));
    let t = tcp(s);
    assert_eq!(s.recv(&t, &mut [0; 4], 0, &mut []), Err(libc::ENOTCONN));
    assert_eq!(s.send(&t, b"x", 0, &[]), Err(libc::EPIPE));
    assert_eq!(s.accept(&t, &mut [0; 16]).err(), Some(libc::EINVAL));
    assert_eq!(s.shutdown(&t, libc::SHUT_WR), Err(libc::ENOTCONN));
    assert_eq!(s.shutdown(&t, 7), Err(libc::EINVAL));
    assert_eq!(s.bind(&t, &[2, 0, 0]), Err(libc::EINVAL));
    assert_eq!(s.connect(&t, &sa6("[fd77::3]:1")), Err(libc::EAFNOSUPPORT));
    let mut name = [0u8; 16];
    assert_eq!(s.getsockname(&t, &mut name), Ok(16));
    assert_eq!(read_sa(Family::V4, &name).to_string(), "0.0.0.0:0");
    assert_eq!(s.ioctl(&t, 0x1234), Err(libc::ENOTTY));
    assert_eq!(s.getsockopt(&t, libc::SOL_SOCKET, 12345, &mut [0; 4]), Err(libc::ENOPROTOOPT));
    let u = udp(s);
    assert_eq!(s.listen(&u, 1), Err(libc::EOPNOTSUPP));
    assert_eq!(s.getpeername(&u, &mut name), Err(libc::ENOTCONN));
    assert_eq!(s.shutdown(&u, libc::SHUT_RD), Err(libc::ENOTCONN));
    let l = tcp(s);
    s.listen(&l, 3).unwrap();
    s.getsockname(&l, &mut name).unwrap();
    assert!(crate::stack::EPHEMERAL.contains(&read_sa(Family::V4, &name).port()), "listen autobinds");
    assert_eq!(s.connect(&l, &sa("10.77.0.3:1")), Err(libc::EISCONN));
    assert_eq!(s.recv(&l, &mut [0; 4], 0, &mut []), Err(libc::ENOTCONN));
    assert_eq!(s.ioctl(&l, 0x541b), Err(libc::EINVAL));
    let no6 = UserStack::new(UserConfig { address6: None, gateway6: None, ..cfg(Link::Tap, 2) }, wire().0).unwrap();
    let mut no6 = no6;
    let t6 = tcp6(&mut no6);
    assert_eq!(no6.connect(&t6, &sa("[fd77::3]:1")), Err(libc::ENETUNREACH));
}

#[test]
fn options_read_back_as_linux() {
    let mut n = Net::new();
    let s = &mut n.a;
    let t = tcp(s);
    assert_eq!(int_opt(s, &t, libc::SOL_SOCKET, libc::SO_TYPE), libc::SOCK_STREAM);
    assert_eq!(int_opt(s, &t, libc::SOL_SOCKET, libc::SO_RCVBUF), 131_072);
    set_int(s, &t, libc::SOL_SOCKET, libc::SO_RCVBUF, 100_000);
    assert_eq!(int_opt(s, &t, libc::SOL_SOCKET, libc::SO_RCVBUF), 200_000);
    set_int(s, &t, libc::SOL_SOCKET, libc::SO_SNDBUF, 1);
    assert_eq!(int_opt(s, &t, libc::SOL_SOCKET, libc::SO_SNDBUF), 4608);
    assert_eq!(int_opt(s, &t, libc::IPPROTO_TCP, libc::TCP_NODELAY), 0);
    set_int(s, &t, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    assert_eq!(int_opt(s, &t, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
    set_int(s, &t, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    assert_eq!(int_opt(s, &t, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
    set_int(s, &t, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    assert_eq!(int_opt(s, &t, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
    assert_eq!(s.setsockopt(&t, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &0i32.to_ne_bytes()), Err(libc::EINVAL));
    let mut cc = [0u8; 16];
    assert_eq!(s.getsockopt(&t, libc::IPPROTO_TCP, libc::TCP_CONGESTION, &mut cc), Ok(16));
    assert_eq!(&cc[..5], b"reno\0");
    assert_eq!(s.setsockopt(&t, libc::IPPROTO_TCP, libc::TCP_CONGESTION, b"bbr\0"), Err(libc::ENOENT));
    let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
    assert_eq!(s.getsockopt(&t, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info), Ok(info.len()));
    assert_eq!(info[0], 7, "TCP_CLOSE");
    let u = udp(s);
    assert_eq!(int_opt(s, &u, libc::SOL_SOCKET, libc::SO_TYPE), libc::SOCK_DGRAM);
    assert_eq!(s.getsockopt(&u, libc::IPPROTO_TCP, libc::TCP_NODELAY, &mut [0; 4]), Err(libc::EOPNOTSUPP));
    assert_eq!(s.tcp_stats(&u), None);
    let l = listener(&mut n.b, "0.0.0.0:7007", 4);
    let (c, _s, _) = connect_pair(&mut n, &l, "10.77.0.3:7007");
    let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
    n.a.getsockopt(&c, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info).unwrap();
    assert_eq!(info[0], 1, "TCP_ESTABLISHED");
    assert_eq!(n.a.tcp_stats(&c).unwrap().state, 1);
    assert_eq!(n.b.tcp_stats(&l).unwrap().state, 10);
}

#[test]
fn keepalive_detects_a_dead_peer() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7008", 4);
    let (c, _s, _) = connect_pair(&mut n, &l, "10.77.0.3:7008");
    set_int(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set_int(&mut n.a, &c, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
    set_int(&mut n.a, &c, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    set_int(&mut n.a, &c, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2);
    // B answers probes: the connection stays up well past the keepalive timeout.
    for _ in 0..10 {
        n.run(1000);
    }
    assert_eq!(n.a.poll_mask(&c), OUT);
    // B goes silent (we stop polling it): after idle + cnt * intvl, ETIMEDOUT.
    for _ in 0..10 {
        n.now += Duration::from_secs(1);
        n.a.poll(n.now, true, &mut n.ra);
    }
    assert_eq!(n.a.recv(&c, &mut [0; 4], 0, &mut []), Err(libc::ETIMEDOUT));
}

#[test]
fn watch_reports_changes_once() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7009", 4);
    n.b.watch(&l, 42).unwrap();
    let c = tcp(&mut n.a);
    n.a.watch(&c, 7).unwrap();
    n.ra.clear();
    n.rb.clear();
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7009")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(n.ra, vec![Ready { key: 7, events: OUT }]);
    assert_eq!(n.rb, vec![Ready { key: 42, events: IN }]);
    let mut pa = [0u8; 16];
    let (s, _) = n.b.accept(&l, &mut pa).unwrap();
    n.b.watch(&s, 43).unwrap();
    n.run(2);
    n.rb.clear();
    n.ra.clear();
    send_all(&mut n.a, &c, b"one");
    n.run(5);
    assert_eq!(n.rb, vec![Ready { key: 43, events: IN | OUT }]);
    n.rb.clear();
    // More bytes while still readable: reported again (edge semantics).
    send_all(&mut n.a, &c, b"two");
    // Nagle holds "two" until "one" is acknowledged (10 ms delayed ACK).
    n.run(30);
    assert_eq!(n.rb, vec![Ready { key: 43, events: IN | OUT }]);
    n.rb.clear();
    n.run(20);
    assert!(n.rb.is_empty(), "nothing new: {:?}", n.rb);
}

#[test]
fn many_connections_cost_little_per_packet() {
    // 1000 loopback connections; one byte on one of them must look at a handful of sockets.
    let mut n = Net::new();
    let l = listener(&mut n.a, "127.0.0.1:7010", 4096);
    let mut cs = Vec::new();
    for _ in 0..1000 {
        let c = tcp(&mut n.a);
        assert_eq!(n.a.connect(&c, &sa("127.0.0.1:7010")), Err(libc::EINPROGRESS));
        cs.push(c);
    }
    n.run(5);
    let mut ss = Vec::new();
    let mut pa = [0u8; 16];
    while let Ok((s, _)) = n.a.accept(&l, &mut pa) {
        ss.push(s);
    }
    assert_eq!(ss.len(), 1000);
    for c in &cs {
        assert_eq!(n.a.connect(c, &sa("127.0.0.1:7010")), Ok(()));
    }
    n.run(100);
    let before = n.a.refreshes();
    send_all(&mut n.a, &cs[500], b"x");
    n.run(1);
    let looked = n.a.refreshes() - before;
    assert!(looked <= 4, "one segment refreshed {looked} sockets");
    assert_eq!(n.a.socket_count(), 2001);
}

/// `cargo test --release -p netkernel-nsm-user -- --ignored --nocapture scale`: what one
/// segment costs a poll with 10,000 connections open.
#[test]
#[ignore]
fn scale_10k_connections() {
    for total in [100, 10_000] {
        scale_with(total);
    }
}

fn scale_with(total: usize) {
    let mut n = Net::new();
    let l = listener(&mut n.a, "127.0.0.1:7011", 4096);
    let mut cs = Vec::new();
    let mut ss = Vec::new();
    let mut pa = [0u8; 16];
    for _ in 0..total.div_ceil(1000) {
        for _ in 0..total.min(1000) {
            let c = tcp(&mut n.a);
            assert_eq!(n.a.connect(&c, &sa("127.0.0.1:7011")), Err(libc::EINPROGRESS));
            cs.push(c);
        }
        n.run(3);
        while let Ok((s, _)) = n.a.accept(&l, &mut pa) {
            ss.push(s);
        }
    }
    assert_eq!(ss.len(), total);
    // Accepted in SYN order, which is not connect order: pair them by port.
    let mut by_port = std::collections::HashMap::new();
    for s in &ss {
        let mut a = [0u8; 16];
        n.a.getpeername(s, &mut a).unwrap();
        by_port.insert(read_sa(Family::V4, &a).port(), s);
    }
    n.run(100);
    // The best of five batches: the machine is shared.
    let mut per = Duration::MAX;
    let mut b = [0u8; 8];
    for batch in 0..5 {
        let t = Instant::now();
        let rounds = 200;
        for i in 0..rounds {
            let c = &cs[(batch * rounds + i) * 37 % total];
            let mut a = [0u8; 16];
            n.a.getsockname(c, &mut a).unwrap();
            let s = by_port[&read_sa(Family::V4, &a).port()];
            send_all(&mut n.a, c, b"x");
            n.now += Duration::from_millis(1);
            n.a.poll(n.now, false, &mut n.ra);
            assert_eq!(n.a.recv(s, &mut b, 0, &mut []), Ok((1, 0)));
        }
        per = per.min(t.elapsed() / rounds as u32);
    }
    eprintln!("{total} connections: {per:?} per one-segment poll (send, deliver, ACK)");
}

/// Hostile traffic: random TCP/UDP/ICMP packets (valid checksums, so smoltcp looks at them
/// too) at ports with listeners, connections and UDP sockets, in between real traffic. The
/// stack must neither panic nor lose the real connection.
#[test]
fn random_packets_do_not_break_the_stack() {
    let mut n = Net::new();
    let l = listener(&mut n.a, "0.0.0.0:80", 8);
    let u = udp(&mut n.a);
    n.a.bind(&u, &sa("0.0.0.0:53")).unwrap();
    let srv = listener(&mut n.b, "0.0.0.0:81", 8);
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:81")), Err(libc::EINPROGRESS));
    n.run(20);
    let (s, _) = n.b.accept(&srv, &mut [0; 16]).unwrap();
    let mut a_port = [0u8; 16];
    n.a.getsockname(&c, &mut a_port).unwrap();
    let a_port = read_sa(Family::V4, &a_port).port();

    // A raw end on the same wire as B, speaking as 10.77.0.3 with B's MAC.
    let (x, y) = wire();
    let mut a = UserStack::new(cfg(Link::Packet, 2), x).unwrap();
    let mut b = UserStack::new(cfg(Link::Tap, 3), y).unwrap();
    std::mem::swap(&mut n.a, &mut a);
    std::mem::swap(&mut n.b, &mut b);
    // (n now holds a fresh pair; the original pair is `a` and `b`, driven by hand below.)
    let _ = n;
    let mut now = Instant::now() + Duration::from_secs(1);
    let mut ra = Vec::new();
    let mut rb = Vec::new();
    let a_mac = [0x02, 0x4e, 10, 77, 0, 2];
    let b_mac = [0x02, 0x4e, 10, 77, 0, 3];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let inject = b.wait_fd().try_clone_to_owned().unwrap();
    let mut got = Vec::new();
    for round in 0..3000 {
        let proto = [6u8, 6, 6, 17, 1][(rnd() % 5) as usize];
        let l4_len = match proto {
            6 => 20 + (rnd() % 16) as usize,
            17 => 8 + (rnd() % 16) as usize,
            _ => 36 + (rnd() % 16) as usize,
        };
        let mut f = vec![0u8; 14 + 20 + l4_len];
        f[..6].copy_from_slice(&a_mac);
        f[6..12].copy_from_slice(&b_mac);
        f[12] = 0x08;
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 77, 0, 3]);
        ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
        for b in ip[20..].iter_mut() {
            *b = rnd() as u8;
        }
        let ports = [80u16, 53, a_port, 81, (rnd() % 65536) as u16];
        let sport = if rnd() % 2 == 0 { 81 } else { ports[(rnd() % 5) as usize] };
        let dport = ports[(rnd() % 5) as usize];
        if proto != 1 {
            ip[20..22].copy_from_slice(&sport.to_be_bytes());
            ip[22..24].copy_from_slice(&dport.to_be_bytes());
        }
        if proto == 6 {
            ip[32] = 5 << 4;
            ip[33] = [0x02, 0x10, 0x04, 0x11, 0x18, 0x12, rnd() as u8][(rnd() % 7) as usize];
        }
        if proto == 17 {
            ip[24..26].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        if proto == 1 && rnd() % 2 == 0 {
            // A "port unreachable" quoting a datagram from our UDP socket.
            ip[20] = 3;
            ip[21] = 3;
            ip[28] = 0x45;
            ip[37] = 17;
            ip[40..44].copy_from_slice(&[10, 77, 0, 2]);
        }
        let mut sum = 0u32;
        for w in ip[..20].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        crate::frame::complete_checksum(&mut f);
        // SAFETY: f is a live buffer of the length passed; the fd is B's end of the wire.
        unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&inject), f.as_ptr().cast(), f.len()) };
        if round % 10 == 0 {
            let _ = a.send(&c, b"real", 0, &[]);
        }
        now += Duration::from_millis(1);
        a.poll(now, true, &mut ra);
        b.poll(now, true, &mut rb);
        let mut buf = [0u8; 64];
        while let Ok((k, _)) = b.recv(&s, &mut buf, 0, &mut []) {
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
        }
        let mut pa = [0u8; 16];
        while let Ok((h, _)) = a.accept(&l, &mut pa) {
            drop(h);
        }
        let _ = a.recv(&u, &mut buf, 0, &mut []);
    }
    // Random segments may have been in the real connection's window (its 4-tuple is one of
    // the choices): then it is legitimately reset or corrupted. Otherwise every byte arrived.
    let mask = a.poll_mask(&c);
    eprintln!("real connection: mask {mask:#x}, {} of 1200 bytes, {} sockets", got.len(), a.socket_count());
    if mask & ERR == 0 && got.len() == 300 * 4 {
        assert!(got.chunks(4).all(|w| w == b"real"));
    }
    assert!(a.socket_count() < 50, "{} sockets left", a.socket_count());
}

#[test]
fn a_stack_and_its_handles_can_move_to_another_thread() {
    fn send<T: Send>() {}
    send::<UserStack>();
    send::<Handle>();
}

#[test]
fn a_stack_is_small_to_move() {
    assert!(std::mem::size_of::<UserStack>() < 4096, "{}", std::mem::size_of::<UserStack>());
}

/// `cargo test --release -p netkernel-nsm-user -- --ignored --nocapture throughput`: bulk TCP
/// over the loopback and over the SEQPACKET wire (MTU 1500), real time.
#[test]
#[ignore]
fn throughput() {
    for (name, to, listen_on_b) in [("loopback", "127.0.0.1:7100", false), ("wire", "10.77.0.3:7100", true)] {
        let mut n = Net::new();
        let total = 200usize << 20;
        let l = if listen_on_b { listener(&mut n.b, "0.0.0.0:7100", 4) } else { listener(&mut n.a, "0.0.0.0:7100", 4) };
        let c = tcp(&mut n.a);
        assert_eq!(n.a.connect(&c, &sa(to)), Err(libc::EINPROGRESS));
        let mut s = None;
        for _ in 0..2000 {
            n.now = Instant::now();
            n.a.poll(n.now, true, &mut n.ra);
            n.b.poll(n.now, true, &mut n.rb);
            let srv = if listen_on_b { &mut n.b } else { &mut n.a };
            if let Ok((h, _)) = srv.accept(&l, &mut [0; 16]) {
                s = Some(h);
                break;
            }
        }
        let s = s.expect("connected");
        let chunk = vec![7u8; 65536];
        let mut buf = vec![0u8; 1 << 20];
        let (mut sent, mut got) = (0usize, 0usize);
        let t = Instant::now();
        while got < total {
            if sent < total {
                if let Ok(k) = n.a.send(&c, &chunk[..chunk.len().min(total - sent)], 0, &[]) {
                    sent += k;
                }
            }
            n.now = Instant::now();
            n.a.poll(n.now, true, &mut n.ra);
            n.b.poll(n.now, true, &mut n.rb);
            let srv = if listen_on_b { &mut n.b } else { &mut n.a };
            while let Ok((k, _)) = srv.recv(&s, &mut buf, 0, &mut []) {
                if k == 0 {
                    break;
                }
                got += k;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "{name}: {got} bytes in 120 s");
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{name}: {:.0} MB/s ({:.2} Gbit/s)", total as f64 / secs / 1e6, total as f64 * 8.0 / secs / 1e9);
    }
}

#[test]
fn idle_stack_sleeps() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7012", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7012");
    send_all(&mut n.a, &c, b"x");
    n.run(500);
    assert_eq!(recv_str(&mut n.b, &s).unwrap(), "x");
    n.run(500);
    // Nothing in flight: the stacks ask to be polled not before a second from now (the
    // neighbour cache's own timers), or never.
    for st in [&mut n.a, &mut n.b] {
        n.now += Duration::from_millis(1);
        let next = st.poll(n.now, false, &mut Vec::new());
        assert!(next.is_none_or(|t| t >= n.now + Duration::from_millis(900)), "{:?}", next.map(|t| t - n.now));
    }
    // A peer's close is reported once, with RDHUP.
    n.a.watch(&c, 1).unwrap();
    n.run(2);
    n.ra.clear();
    n.b.close(s);
    n.run(5);
    assert_eq!(n.ra, vec![Ready { key: 1, events: IN | OUT | RDHUP }]);
}

#[test]
fn a_vanished_peer_times_out() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7013", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7013");
    let (c2, _s2, _) = connect_pair(&mut n, &l, "10.77.0.3:7013");
    // c2 stays idle; c has data in flight when B goes silent (no more polls).
    send_all(&mut n.a, &c, b"lost");
    for _ in 0..1000 {
        n.now += Duration::from_secs(1);
        n.a.poll(n.now, false, &mut n.ra);
    }
    assert_eq!(n.a.recv(&c, &mut [0; 4], 0, &mut []), Err(libc::ETIMEDOUT));
    assert_eq!(n.a.poll_mask(&c2), OUT, "an idle connection lives on");
    drop(s);

    // An orphan in FIN-WAIT-2 (the peer acknowledged our FIN but never sends its own) is
    // gone after tcp_fin_timeout.
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7014", 4);
    let (c, _s, _) = connect_pair(&mut n, &l, "10.77.0.3:7014");
    let before = n.a.socket_count();
    n.a.close(c);
    n.run(50);
    assert_eq!(n.a.socket_count(), before, "still closing");
    // B stays alive (and answers ARP) but never closes.
    for _ in 0..70 {
        n.now += Duration::from_secs(1);
        n.a.poll(n.now, true, &mut n.ra);
        n.b.poll(n.now, true, &mut n.rb);
    }
    assert_eq!(n.a.socket_count(), before - 1);
}

#[test]
fn an_orphan_of_a_vanished_peer_is_reaped() {
    // A closes with data in flight, and B is gone for good (not even ARP): A's orphan times
    // out, cannot send its RST, and is freed anyway.
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7015", 4);
    let (c, _s, _) = connect_pair(&mut n, &l, "10.77.0.3:7015");
    send_all(&mut n.a, &c, b"lost");
    n.a.close(c);
    for _ in 0..1000 {
        n.now += Duration::from_secs(1);
        n.a.poll(n.now, true, &mut n.ra);
    }
    assert_eq!(n.a.socket_count(), 0);
}

#[test]
fn a_full_send_buffer_reports_pollout_when_it_drains() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7016", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7016");
    n.a.watch(&c, 9).unwrap();
    n.run(2);
    let big = vec![1u8; 1 << 20];
    let mut sent = 0;
    while let Ok(k) = n.a.send(&c, &big, 0, &[]) {
        sent += k;
    }
    assert_eq!(n.a.send(&c, &big, 0, &[]), Err(libc::EAGAIN));
    assert_eq!(n.a.poll_mask(&c) & OUT, 0, "full after {sent} bytes");
    n.ra.clear();
    // B reads everything; A's buffer drains and A hears of it.
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    for _ in 0..200 {
        n.run(1);
        while let Ok((k, _)) = n.b.recv(&s, &mut buf, 0, &mut []) {
            got += k;
        }
    }
    assert_eq!(got, sent);
    assert!(n.ra.iter().any(|r| r.key == 9 && r.events & OUT != 0), "{:?}", n.ra);
    assert_eq!(n.a.poll_mask(&c), OUT);
}

#[test]
fn connects_share_ephemeral_ports_binds_do_not() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7017", 4);
    let (c, _s, _) = connect_pair(&mut n, &l, "10.77.0.3:7017");
    let mut name = [0u8; 16];
    n.a.getsockname(&c, &mut name).unwrap();
    let me = read_sa(Family::V4, &name);
    assert_eq!(me.ip().to_string(), "10.77.0.2", "connect binds the source address too");
    let other: SocketAddr = "10.77.0.3:7018".parse().unwrap();
    let same: SocketAddr = "10.77.0.3:7017".parse().unwrap();
    assert!(n.a.connect_port_ok(me.port(), me.ip(), other), "another peer may share the port");
    assert!(!n.a.connect_port_ok(me.port(), me.ip(), same), "the same 4-tuple may not");
    let x = tcp(&mut n.a);
    assert_eq!(n.a.bind(&x, &sa(&format!("0.0.0.0:{}", me.port()))), Err(libc::EADDRINUSE));
    let y = tcp(&mut n.a);
    n.a.bind(&y, &sa("0.0.0.0:40000")).unwrap();
    assert!(!n.a.connect_port_ok(40000, me.ip(), other), "a bound port is not for connects");
}

#[test]
fn a_new_syn_ends_time_wait() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7019", 4);
    let c = tcp(&mut n.a);
    set_int(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    n.a.bind(&c, &sa("0.0.0.0:45000")).unwrap();
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7019")), Err(libc::EINPROGRESS));
    n.run(20);
    let (s, _) = n.b.accept(&l, &mut [0; 16]).unwrap();
    // The server closes first: its side of the 4-tuple waits in TIME_WAIT.
    n.b.close(s);
    n.run(5);
    n.a.close(c);
    n.run(5);
    let c = tcp(&mut n.a);
    set_int(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    n.a.bind(&c, &sa("0.0.0.0:45000")).unwrap();
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7019")), Err(libc::EINPROGRESS));
    n.run(20);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7019")), Ok(()));
    assert!(n.b.accept(&l, &mut [0; 16]).is_ok());
}

fn tcp_info_state(s: &mut UserStack, h: &Handle) -> u8 {
    let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
    s.getsockopt(h, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info).unwrap();
    info[0]
}

#[test]
fn time_wait_reads_as_close_to_the_owner() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7010", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7010");
    n.a.shutdown(&c, libc::SHUT_WR).unwrap();
    n.run(5);
    n.b.shutdown(&s, libc::SHUT_WR).unwrap();
    n.run(5);
    // Linux's TIME_WAIT is a minisocket of its own; the first to shut holds a TCP_CLOSE one.
    assert_eq!(tcp_info_state(&mut n.a, &c), 7);
    assert_eq!(n.a.tcp_stats(&c).unwrap().state, 7);
    assert_eq!(tcp_info_state(&mut n.b, &s), 7);
}

/// What a kernel socket of type `ty` reads back for an option set to `val`.
fn kernel_readback(ty: i32, name: i32, val: &[u8]) -> Vec<u8> {
    // SAFETY: plain calls on a socket owned here; val and out are live buffers.
    unsafe {
        let fd = libc::socket(libc::AF_INET, ty, 0);
        assert!(fd >= 0);
        assert_eq!(libc::setsockopt(fd, libc::SOL_SOCKET, name, val.as_ptr().cast(), val.len() as u32), 0);
        let mut out = vec![0u8; val.len()];
        let mut l = out.len() as libc::socklen_t;
        assert_eq!(libc::getsockopt(fd, libc::SOL_SOCKET, name, out.as_mut_ptr().cast(), &mut l), 0);
        libc::close(fd);
        out
    }
}

#[test]
fn stored_options_read_back_as_the_kernel_rounds_and_clamps_them() {
    let mut n = Net::new();
    let s = &mut n.a;
    let t = tcp(s);
    let mut tv = [0u8; 16];
    tv[8..].copy_from_slice(&150_000i64.to_ne_bytes());
    s.setsockopt(&t, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv).unwrap();
    let mut got = [0u8; 16];
    assert_eq!(s.getsockopt(&t, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &mut got), Ok(16));
    assert_eq!(got.to_vec(), kernel_readback(libc::SOCK_STREAM, libc::SO_RCVTIMEO, &tv), "jiffies");
    let mut bad = [0u8; 16];
    bad[8..].copy_from_slice(&2_000_000i64.to_ne_bytes());
    assert_eq!(s.setsockopt(&t, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &bad), Err(libc::EDOM));
    for v in [1i32, 4096, 1 << 20, 1 << 30] {
        let b = v.to_ne_bytes();
        for name in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            s.setsockopt(&t, libc::SOL_SOCKET, name, &b).unwrap();
            let want = kernel_readback(libc::SOCK_STREAM, name, &b);
            assert_eq!(int_opt(s, &t, libc::SOL_SOCKET, name).to_ne_bytes().to_vec(), want, "{name} {v}");
        }
    }
}

#[test]
fn all_of_127_8_is_loopback_and_refuses_without_a_listener() {
    let mut n = Net::new();
    let _l = listener(&mut n.a, "127.0.0.1:9010", 4);
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("127.0.0.2:9010")), Err(libc::EINPROGRESS));
    n.run(3);
    assert_eq!(int_opt(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_ERROR), libc::ECONNREFUSED);
}

#[test]
fn a_long_accept_queue_hands_out_every_connection_once() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7011", 300);
    let cs: Vec<Handle> = (0..200)
        .map(|_| {
            let c = tcp(&mut n.a);
            assert_eq!(n.a.connect(&c, &sa("10.77.0.3:7011")), Err(libc::EINPROGRESS));
            c
        })
        .collect();
    n.run(30);
    assert_eq!(n.b.poll_mask(&l), IN);
    let mut peers = std::collections::HashSet::new();
    let mut accepted = Vec::new();
    while let Ok((s, len)) = n.b.accept(&l, &mut [0; 16]) {
        assert_eq!(len, 16);
        let mut name = [0u8; 16];
        n.b.getpeername(&s, &mut name).unwrap();
        peers.insert(read_sa(Family::V4, &name));
        accepted.push(s);
    }
    assert_eq!((accepted.len(), peers.len()), (200, 200));
    assert_eq!(n.b.poll_mask(&l), 0);
    drop(cs);
}

#[test]
fn one_poll_delivers_loopback_sends_past_nagle() {
    let mut n = Net::new();
    let l = listener(&mut n.a, "127.0.0.1:9011", 4);
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("127.0.0.1:9011")), Err(libc::EINPROGRESS));
    n.run(2);
    let (s, _) = n.a.accept(&l, &mut [0; 16]).unwrap();
    n.a.shutdown(&s, libc::SHUT_WR).unwrap();
    n.run(1);
    // ServiceLib settles each synchronous call with one poll at the same instant.
    let now = n.now;
    send_all(&mut n.a, &c, b"one");
    n.a.poll(now, false, &mut n.ra);
    send_all(&mut n.a, &c, b"two");
    n.a.poll(now, false, &mut n.ra);
    assert_eq!(recv_str(&mut n.a, &s).unwrap(), "onetwo");
}

#[test]
fn receive_timestamps_as_cmsgs() {
    let mut n = Net::new();
    let l = listener(&mut n.a, "127.0.0.1:9012", 4);
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("127.0.0.1:9012")), Err(libc::EINPROGRESS));
    n.run(2);
    let (s, _) = n.a.accept(&l, &mut [0; 16]).unwrap();
    set_int(&mut n.a, &s, libc::SOL_SOCKET, libc::SO_TIMESTAMP, 1);
    set_int(&mut n.a, &s, libc::IPPROTO_IP, libc::IP_RECVTOS, 1);
    assert_eq!(int_opt(&mut n.a, &s, libc::SOL_SOCKET, libc::SO_TIMESTAMP), 1);
    assert_eq!(int_opt(&mut n.a, &s, libc::IPPROTO_IP, libc::IP_RECVTOS), 1);
    let mut ctl = [0u8; 64];
    let mut buf = [0u8; 16];
    send_all(&mut n.a, &c, b"stamped");
    n.run(1);
    let r = n.a.recvmsg(&s, &mut buf, 0, &mut [], &mut ctl).unwrap();
    assert_eq!((r.len, r.control_len, r.flags), (7, 32, 0));
    // SAFETY: ctl holds a cmsghdr written by the stack (unaligned read).
    let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(ctl.as_ptr().cast()) };
    assert_eq!((h.cmsg_level, h.cmsg_type, h.cmsg_len), (libc::SOL_SOCKET, libc::SCM_TIMESTAMP, 32));
    let sec = i64::from_ne_bytes(ctl[16..24].try_into().unwrap());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - sec).abs() <= 1);
    // No room for it: MSG_CTRUNC, as put_cmsg says.
    send_all(&mut n.a, &c, b"again");
    n.run(1);
    let r = n.a.recvmsg(&s, &mut buf, 0, &mut [], &mut []).unwrap();
    assert_eq!((r.len, r.control_len, r.flags), (5, 0, libc::MSG_CTRUNC));
    set_int(&mut n.a, &s, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
    assert_eq!(int_opt(&mut n.a, &s, libc::SOL_SOCKET, libc::SO_TIMESTAMP), 0);
    send_all(&mut n.a, &c, b"nanos");
    n.run(1);
    let r = n.a.recvmsg(&s, &mut buf, 0, &mut [], &mut ctl).unwrap();
    // SAFETY: as above.
    let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(ctl.as_ptr().cast()) };
    assert_eq!((r.control_len, h.cmsg_type), (32, libc::SCM_TIMESTAMPNS));
    set_int(&mut n.a, &s, libc::SOL_SOCKET, libc::SO_TIMESTAMP, 0);
    send_all(&mut n.a, &c, b"plain");
    n.run(1);
    let r = n.a.recvmsg(&s, &mut buf, 0, &mut [], &mut ctl).unwrap();
    assert_eq!((r.len, r.control_len, r.flags), (5, 0, 0));
}

#[test]
fn rtt_cwnd_and_retransmits_measured_from_the_wire() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:7012", 4);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:7012");
    let st = n.a.tcp_stats(&c).unwrap();
    // The handshake is the first sample: each stack polls once per virtual millisecond.
    assert!((1000..=3000).contains(&st.rtt_us), "{st:?}");
    assert_eq!(st.retrans, 0);
    // A flight of data: the window estimate follows it.
    let data = vec![7u8; 20_000];
    send_all(&mut n.a, &c, &data);
    n.a.poll(n.now, false, &mut n.ra);
    assert!(n.a.tcp_stats(&c).unwrap().cwnd >= 1);
    let mut got = 0;
    let mut cwnd = 0;
    for _ in 0..200 {
        n.run(1);
        cwnd = cwnd.max(n.a.tcp_stats(&c).unwrap().cwnd);
        let mut b = [0u8; 65536];
        if let Ok((k, _)) = n.b.recv(&s, &mut b, 0, &mut []) {
            got += k;
        }
        if got == data.len() {
            break;
        }
    }
    assert_eq!(got, data.len());
    assert!(cwnd >= 3, "slow start opened the window: {cwnd}");
    // B falls silent for longer than the retransmission timeout: A resends, and B then gets
    // both copies. The resend counts; its ACK gives no RTT sample (Karn).
    let before = n.a.tcp_stats(&c).unwrap();
    send_all(&mut n.a, &c, b"late");
    for _ in 0..1500 {
        n.now += Duration::from_millis(1);
        n.a.poll(n.now, true, &mut n.ra);
    }
    n.run(10);
    assert_eq!(recv_str(&mut n.b, &s).unwrap(), "late");
    let after = n.a.tcp_stats(&c).unwrap();
    assert!(after.retrans >= 1, "{after:?}");
    assert_eq!(after.rtt_us, before.rtt_us, "no sample from a retransmitted segment");
    let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
    n.a.getsockopt(&c, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info).unwrap();
    // SAFETY: tcp_info is plain integers; info has its size.
    let ti: libc::tcp_info = unsafe { std::ptr::read_unaligned(info.as_ptr().cast()) };
    assert_eq!((ti.tcpi_rtt, ti.tcpi_total_retrans), (after.rtt_us, after.retrans));
}

#[test]
fn loopback_bulk_with_large_buffers_never_stalls() {
    for rcv in [131_072i32, 65_536, 100_000] {
        let mut n = Net::new();
        let l = listener(&mut n.a, "127.0.0.1:9013", 4);
        let c = tcp(&mut n.a);
        set_int(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_SNDBUF, rcv);
        assert_eq!(n.a.connect(&c, &sa("127.0.0.1:9013")), Err(libc::EINPROGRESS));
        // The listener's size is what accepted connections start with.
        set_int(&mut n.a, &l, libc::SOL_SOCKET, libc::SO_RCVBUF, rcv);
        n.run(2);
        let (s, _) = n.a.accept(&l, &mut [0; 16]).unwrap();
        let chunk = vec![0xa5u8; 256 * 1024];
        let mut buf = vec![0u8; 256 * 1024];
        let (mut sent, mut got) = (0usize, 0usize);
        for i in 0..20_000 {
            if i % 3 == 0 {
                n.now += Duration::from_micros(300);
            }
            let now = n.now;
            if let Ok(k) = n.a.send(&c, &chunk[sent % 1000..], 0, &[]) {
                sent += k;
            }
            n.a.poll(now, false, &mut n.ra);
            if i % 2 == 0 {
                let want = (i * 7919) % buf.len() + 1;
                if let Ok((k, _)) = n.a.recv(&s, &mut buf[..want], 0, &mut []) {
                    got += k;
                }
            }
            n.a.poll(now, false, &mut n.ra);
            assert!(i < 19_999 || got > 50 << 20, "rcvbuf {rcv}: stalled at {got} of {sent}");
            if got > 50 << 20 {
                break;
            }
        }
    }
}

#[test]
fn a_full_send_drained_within_its_own_poll_reports_pollout() {
    let mut n = Net::new();
    let l = listener(&mut n.a, "127.0.0.1:9014", 4);
    let c = tcp(&mut n.a);
    set_int(&mut n.a, &c, libc::SOL_SOCKET, libc::SO_SNDBUF, 16_384);
    assert_eq!(n.a.connect(&c, &sa("127.0.0.1:9014")), Err(libc::EINPROGRESS));
    n.run(2);
    let (_s, _) = n.a.accept(&l, &mut [0; 16]).unwrap();
    n.a.watch(&c, 9).unwrap();
    n.run(1);
    n.ra.clear();
    // The whole send buffer in one send: the guest is out of room and waits for POLLOUT.
    let big = vec![1u8; 1 << 20];
    let k = n.a.send(&c, &big, 0, &[]).unwrap();
    assert_eq!(n.a.send(&c, &big, 0, &[]), Err(libc::EAGAIN), "{k} took all the room");
    // ServiceLib's settling poll, at the same instant: the loopback peer has room for all of
    // it, so the buffer is empty again by the end of this poll; that room is news.
    let now = n.now;
    n.a.poll(now, false, &mut n.ra);
    assert_eq!(n.ra, vec![Ready { key: 9, events: OUT }]);
}

/// (level, type, payload) of each cmsg in `ctl[..len]`.
fn cmsgs(ctl: &[u8], len: usize) -> Vec<(i32, i32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= len {
        // SAFETY: a cmsghdr's worth of bytes, read unaligned.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(ctl[off..].as_ptr().cast()) };
        out.push((h.cmsg_level, h.cmsg_type, ctl[off + 16..off + h.cmsg_len as usize].to_vec()));
        off += (h.cmsg_len as usize).div_ceil(8) * 8;
    }
    out
}

#[test]
fn datagram_cmsgs_carry_pktinfo_ttl_and_tos() {
    let mut n = Net::new();
    let a = udp(&mut n.a);
    n.a.bind(&a, &sa("127.0.0.1:9015")).unwrap();
    for opt in [libc::IP_PKTINFO, libc::IP_RECVTTL, libc::IP_RECVTOS] {
        set_int(&mut n.a, &a, libc::IPPROTO_IP, opt, 1);
        assert_eq!(int_opt(&mut n.a, &a, libc::IPPROTO_IP, opt), 1);
    }
    let b = udp(&mut n.a);
    assert_eq!(n.a.send(&b, b"d0", 0, &sa("127.0.0.1:9015")), Ok(2));
    assert_eq!(n.a.send(&b, b"d1", 0, &sa("127.0.0.1:9015")), Ok(2));
    n.run(1);
    let mut ctl = [0u8; 256];
    let mut buf = [0u8; 16];
    let r = n.a.recvmsg(&a, &mut buf, 0, &mut [], &mut ctl).unwrap();
    assert_eq!((r.len, r.control_len, r.flags), (2, 80, 0));
    let lo = [127, 0, 0, 1];
    let pktinfo = [1i32.to_ne_bytes(), lo, lo].concat();
    assert_eq!(
        cmsgs(&ctl, r.control_len),
        vec![
            (libc::IPPROTO_IP, libc::IP_PKTINFO, pktinfo),
            (libc::IPPROTO_IP, libc::IP_TTL, 64i32.to_ne_bytes().to_vec()),
            (libc::IPPROTO_IP, libc::IP_TOS, vec![0]),
        ]
    );
    // Room for the first only: cut there with MSG_CTRUNC.
    let r = n.a.recvmsg(&a, &mut buf, 0, &mut [], &mut ctl[..40]).unwrap();
    assert_eq!((r.len, r.control_len, r.flags), (2, 32, libc::MSG_CTRUNC));

    let a6 = n.a.socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).unwrap();
    n.a.bind(&a6, &sa("[::1]:9016")).unwrap();
    for opt in [libc::IPV6_RECVPKTINFO, libc::IPV6_RECVHOPLIMIT, libc::IPV6_RECVTCLASS] {
        set_int(&mut n.a, &a6, libc::IPPROTO_IPV6, opt, 1);
    }
    let b6 = n.a.socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).unwrap();
    assert_eq!(n.a.send(&b6, b"six", 0, &sa("[::1]:9016")), Ok(3));
    n.run(1);
    let r = n.a.recvmsg(&a6, &mut buf, 0, &mut [], &mut ctl).unwrap();
    let mut pi = std::net::Ipv6Addr::LOCALHOST.octets().to_vec();
    pi.extend_from_slice(&1u32.to_ne_bytes());
    assert_eq!(
        cmsgs(&ctl, r.control_len),
        vec![
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, pi),
            (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, 64i32.to_ne_bytes().to_vec()),
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0i32.to_ne_bytes().to_vec()),
        ]
    );
}

/// One int control message (level, type, value), laid out as CMSG_* would.
fn int_cmsg(level: i32, ty: i32, v: i32) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[..8].copy_from_slice(&20u64.to_ne_bytes());
    c[8..12].copy_from_slice(&level.to_ne_bytes());
    c[12..16].copy_from_slice(&ty.to_ne_bytes());
    c[16..20].copy_from_slice(&v.to_ne_bytes());
    c
}

#[test]
fn datagrams_leave_with_the_tos_and_ttl_asked_for() {
    let mut n = Net::new();
    let a = udp(&mut n.a);
    n.a.bind(&a, &sa("127.0.0.1:9017")).unwrap();
    set_int(&mut n.a, &a, libc::IPPROTO_IP, libc::IP_RECVTTL, 1);
    set_int(&mut n.a, &a, libc::IPPROTO_IP, libc::IP_RECVTOS, 1);
    let b = udp(&mut n.a);
    set_int(&mut n.a, &b, libc::IPPROTO_IP, libc::IP_TOS, 0x28);
    assert_eq!(int_opt(&mut n.a, &b, libc::IPPROTO_IP, libc::IP_TOS), 0x28);
    let to = sa("127.0.0.1:9017");
    assert_eq!(n.a.send(&b, b"x", 0, &to), Ok(1));
    assert_eq!(n.a.sendmsg(&b, b"y", 0, &to, &int_cmsg(libc::IPPROTO_IP, libc::IP_TOS, 0x10)), Ok(1));
    assert_eq!(n.a.sendmsg(&b, b"z", 0, &to, &int_cmsg(libc::IPPROTO_IP, libc::IP_TTL, 9)), Ok(1));
    assert_eq!(n.a.sendmsg(&b, b"!", 0, &to, &int_cmsg(libc::IPPROTO_IP, 12345, 1)), Err(libc::EINVAL));
    n.run(1);
    let mut ctl = [0u8; 256];
    let mut buf = [0u8; 16];
    for (ttl, tos) in [(64i32, 0x28), (64, 0x10), (9, 0x28)] {
        let r = n.a.recvmsg(&a, &mut buf, 0, &mut [], &mut ctl).unwrap();
        assert_eq!(
            cmsgs(&ctl, r.control_len),
            vec![
                (libc::IPPROTO_IP, libc::IP_TTL, ttl.to_ne_bytes().to_vec()),
                (libc::IPPROTO_IP, libc::IP_TOS, vec![tos]),
            ]
        );
    }
}

#[test]
fn a_rewritten_ipv4_header_keeps_a_valid_checksum() {
    // 20-byte header, TOS 0, TTL 64, checksum filled in as smoltcp would.
    let mut ip = [0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 2, 10, 77, 0, 3];
    crate::device::Mark { tos: Some(0x28), ttl: Some(9) }.apply(&mut ip);
    let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "ones' complement sum over a valid header");
    assert_eq!((ip[1], ip[8]), (0x28, 9));
}

#[test]
fn ipv6_datagrams_leave_with_the_tclass_and_hop_limit_asked_for() {
    let mut n = Net::new();
    let a = n.a.socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).unwrap();
    n.a.bind(&a, &sa("[::1]:9018")).unwrap();
    set_int(&mut n.a, &a, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1);
    set_int(&mut n.a, &a, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 1);
    let b = n.a.socket(libc::AF_INET6, libc::SOCK_DGRAM, 0).unwrap();
    set_int(&mut n.a, &b, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0x20);
    let to = sa("[::1]:9018");
    assert_eq!(n.a.send(&b, b"x", 0, &to), Ok(1));
    assert_eq!(n.a.sendmsg(&b, b"y", 0, &to, &int_cmsg(libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, 2)), Ok(1));
    n.run(1);
    let mut ctl = [0u8; 256];
    let mut buf = [0u8; 16];
    for hop in [64i32, 2] {
        let r = n.a.recvmsg(&a, &mut buf, 0, &mut [], &mut ctl).unwrap();
        assert_eq!(
            cmsgs(&ctl, r.control_len),
            vec![
                (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, hop.to_ne_bytes().to_vec()),
                (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0x20i32.to_ne_bytes().to_vec()),
            ]
        );
    }
}

/// An idle listener written down in one stack is made anew in another (a user NSM's upgrade
/// moves a server guest whose connections have closed): same address, same options, and it
/// accepts. A listener with a connection waiting, or a connection, is not written down.
#[test]
fn an_idle_listener_is_made_anew_in_another_stack() {
    let mut n = Net::new();
    let old = tcp6(&mut n.a);
    set_int(&mut n.a, &old, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    set_int(&mut n.a, &old, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    set_int(&mut n.a, &old, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0);
    n.a.bind(&old, &sa6("[::]:8080")).unwrap();
    n.a.listen(&old, 7).unwrap();
    let desc = n.a.export(&old).and_then(|e| e.desc).expect("an idle listener is written down");
    n.a.exported(true);
    let new = n.b.import(None, Some(&desc), false).unwrap();
    let mut got = [0u8; 28];
    let len = n.b.getsockname(&new, &mut got).unwrap();
    assert_eq!(read_sa(Family::V6, &got[..len]), "[::]:8080".parse().unwrap());
    assert_eq!(int_opt(&mut n.b, &new, libc::SOL_SOCKET, libc::SO_REUSEADDR), 1);
    assert_eq!(int_opt(&mut n.b, &new, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
    assert_eq!(int_opt(&mut n.b, &new, libc::SOL_SOCKET, libc::SO_ACCEPTCONN), 1);
    // It takes an IPv4 connection (not v6-only), and then is not idle any more.
    let c = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:8080")), Err(libc::EINPROGRESS));
    for _ in 0..1500 {
        n.run(1);
        if n.a.poll_mask(&c) != 0 {
            break;
        }
    }
    assert_eq!(n.a.connect(&c, &sa("10.77.0.3:8080")), Ok(()));
    assert!(!n.b.movable(&new), "a connection waits for accept");
    let mut pa = [0u8; 28];
    let (s, _) = n.b.accept(&new, &mut pa).unwrap();
    assert!(!n.b.movable(&s), "a connection stays (only an upgrade's old process relays one)");
    assert!(n.b.movable(&new), "idle again");
    assert_eq!(n.b.import(None, Some(b"not a listener"), false).err(), Some(libc::EINVAL));
}

/// B's upgrade, as the engine runs it: B hands its link to a new process NB, which reads the
/// wire from then on. Returns NB.
fn upgrade_b(n: &mut Net) -> UserStack {
    let link = n.b.hand_link().unwrap();
    let mut fds = link.fds.into_iter();
    let (wire, chan) = (fds.next().unwrap(), fds.next().unwrap());
    UserStack::successor(cfg(Link::Tap, 3), wire, chan, link.ports).unwrap()
}

/// Runs A, the old B and the new NB for `ms` virtual milliseconds.
fn run3(n: &mut Net, nb: &mut UserStack, ms: u64) {
    let mut r = Vec::new();
    for _ in 0..ms {
        n.run(1);
        nb.poll(n.now, true, &mut r);
    }
}

/// What SCM_RIGHTS does with an exported fd: a copy the other process owns.
fn received(fd: Option<std::os::fd::RawFd>) -> Option<OwnedFd> {
    // SAFETY: dup of an fd the stack keeps open until `exported`; the copy is owned here.
    fd.map(|f| unsafe { OwnedFd::from_raw_fd(libc::dup(f)) })
}

/// A user NSM's upgrade moves B's guest sockets to the new process: an established connection
/// is relayed by the old process (bytes both ways in order, the peer's FIN as an end of stream
/// once the old process says so, the guest's close as a FIN), a listener is made anew, and a
/// SYN that reached the old process after it gave the listener away is given back, not refused.
#[test]
fn an_upgrade_relays_connections_and_gives_listeners_away() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:8080", 8);
    let (c, s, _) = connect_pair(&mut n, &l, "10.77.0.3:8080");
    send_all(&mut n.a, &c, b"before");
    n.run(5);
    assert_eq!(recv_str(&mut n.b, &s).unwrap(), "before");
    assert!(!n.b.movable(&s), "only an upgrade's old process relays a connection");

    let mut nb = upgrade_b(&mut n);
    assert!(n.b.movable(&s) && n.b.movable(&l));
    // A second connection's SYN: NB has no listener yet and passes it to B, which sees it only
    // after it handed the listener over.
    let c2 = tcp(&mut n.a);
    assert_eq!(n.a.connect(&c2, &sa("10.77.0.3:8080")), Err(libc::EINPROGRESS));
    let mut r = Vec::new();
    for _ in 0..3 {
        n.now += Duration::from_millis(1);
        n.a.poll(n.now, true, &mut r);
        nb.poll(n.now, true, &mut r);
    }
    let es = n.b.export(&s).unwrap();
    let el = n.b.export(&l).unwrap();
    assert!(es.fd.is_some() && el.fd.is_none());
    let fd = received(es.fd);
    n.b.exported(true);
    let s2 = nb.import(fd, es.desc.as_deref(), false).unwrap();
    let l2 = nb.import(None, el.desc.as_deref(), false).unwrap();
    n.b.close(s);
    n.b.close(l);
    assert_eq!(n.b.relaying(), 1);

    run3(&mut n, &mut nb, 30);
    assert_eq!(n.a.connect(&c2, &sa("10.77.0.3:8080")), Ok(()), "the SYN was given back and answered");
    let mut pa = [0u8; 28];
    let (s3, _) = nb.accept(&l2, &mut pa).expect("the new process's listener accepted it");
    send_all(&mut n.a, &c2, b"new");
    run3(&mut n, &mut nb, 5);
    assert_eq!(recv_str(&mut nb, &s3).unwrap(), "new");

    // The relayed connection: same addresses, its telemetry from the old process, bytes both
    // ways in order.
    let st = nb.tcp_stats(&s2).expect("a relayed connection is TCP");
    assert_eq!(st.state, 1, "ESTABLISHED");
    assert!(st.cwnd > 0, "the old process's measurements: {st:?}");
    let mut name = [0u8; 16];
    assert_eq!(nb.getpeername(&s2, &mut name), Ok(16));
    assert_eq!(read_sa(Family::V4, &name).ip().to_string(), "10.77.0.2");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut sent, mut got) = (0, Vec::new());
    for _ in 0..3000 {
        if sent < big.len() {
            sent += n.a.send(&c, &big[sent..], 0, &[]).unwrap_or(0);
        }
        run3(&mut n, &mut nb, 1);
        let mut b = [0u8; 65536];
        while let Ok((k, _)) = nb.recv(&s2, &mut b, 0, &mut []) {
            if k == 0 {
                break;
            }
            got.extend_from_slice(&b[..k]);
        }
        if got.len() == big.len() {
            break;
        }
    }
    assert!(got == big, "{} of {} bytes, in order: {}", got.len(), big.len(), got == big[..got.len()]);
    send_all(&mut nb, &s2, b"back");
    run3(&mut n, &mut nb, 5);
    assert_eq!(recv_str(&mut n.a, &c).unwrap(), "back");

    // Bytes queued before shutdown(SHUT_RD) are still read, then the end.
    send_all(&mut n.a, &c, b"tail");
    run3(&mut n, &mut nb, 5);
    nb.shutdown(&s2, libc::SHUT_RD).unwrap();
    assert_eq!(recv_str(&mut nb, &s2).unwrap(), "tail");
    assert_eq!(recv_str(&mut nb, &s2).unwrap(), "");
    // The peer's FIN is an end of stream in the new process; the guest's close, a FIN.
    n.a.shutdown(&c, libc::SHUT_WR).unwrap();
    run3(&mut n, &mut nb, 10);
    assert_eq!(nb.poll_mask(&s2) & IN, IN);
    assert_eq!(recv_str(&mut nb, &s2).unwrap(), "", "end of stream");
    nb.close(s2);
    run3(&mut n, &mut nb, 10);
    assert_eq!(recv_str(&mut n.a, &c).unwrap(), "", "the guest's close reached the peer as a FIN");
    assert_eq!(n.b.relaying(), 0, "the relay ended with the connection");
}

/// A connection the old process relays breaks: its guest in the new process gets the error
/// (a reset), not an end of stream. And if the old process dies, what it relayed fails so too.
#[test]
fn a_relayed_connection_reports_resets_and_the_old_process_dying() {
    let mut n = Net::new();
    let l = listener(&mut n.b, "0.0.0.0:8081", 8);
    let (c1, s1, _) = connect_pair(&mut n, &l, "10.77.0.3:8081");
    let (_c2, s2, _) = connect_pair(&mut n, &l, "10.77.0.3:8081");
    let mut nb = upgrade_b(&mut n);
    let mut moved = Vec::new();
    for s in [s1, s2] {
        let e = n.b.export(&s).unwrap();
        let fd = received(e.fd);
        moved.push((s, fd, e.desc));
    }
    n.b.exported(true);
    let mut news = Vec::new();
    for (s, fd, desc) in moved {
        news.push(nb.import(fd, desc.as_deref(), false).unwrap());
        n.b.close(s);
    }
    run3(&mut n, &mut nb, 5);
    // The peer resets the first.
    let lg = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: linger is plain integers; viewed as its bytes for setsockopt.
    let lg = unsafe { std::slice::from_raw_parts((&lg as *const libc::linger).cast::<u8>(), 8) };
    n.a.setsockopt(&c1, libc::SOL_SOCKET, libc::SO_LINGER, lg).unwrap();
    n.a.close(c1);
    run3(&mut n, &mut nb, 10);
    assert_ne!(nb.poll_mask(&news[0]) & libc::POLLERR as u32, 0);
    assert_eq!(recv_str(&mut nb, &news[0]), Err(libc::ECONNRESET));
    // The old process dies: the second fails, never ends cleanly.
    drop(std::mem::replace(&mut n.b, UserStack::new(cfg(Link::Tap, 9), wire().0).unwrap()));
    run3(&mut n, &mut nb, 5);
    assert_eq!(recv_str(&mut nb, &news[1]), Err(libc::ECONNRESET));
}
