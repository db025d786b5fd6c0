//! The same socket scenarios run against Linux (real sockets on 127.0.0.1 of this machine) and
//! against a UserStack (which serves 127.0.0.1 itself): the transcripts of results, errnos and
//! poll masks must be identical.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use netkernel_nsm_user::seam::{Ready, Stack};
use netkernel_nsm_user::sockaddr::{self, Family, Parsed};
use netkernel_nsm_user::{Handle, Link, UserConfig, UserStack};

type R<T> = Result<T, i32>;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn to_sa(a: &str) -> Vec<u8> {
    let a: SocketAddr = a.parse().unwrap();
    let fam = if a.is_ipv4() { Family::V4 } else { Family::V6 };
    let mut b = vec![0u8; 28];
    let n = sockaddr::write(fam, a, &mut b);
    b.truncate(n);
    b
}

fn from_sa(b: &[u8]) -> SocketAddr {
    let fam = if b.len() == 16 { Family::V4 } else { Family::V6 };
    match sockaddr::parse(fam, b) {
        Ok(Parsed::Addr(a)) => a,
        r => panic!("{r:?}"),
    }
}

/// What the scenarios do, on either stack. Sockets are non-blocking.
trait Api {
    type S;
    fn socket(&mut self, domain: i32, ty: i32) -> R<Self::S>;
    fn bind(&mut self, s: &Self::S, a: &str) -> R<()>;
    fn listen(&mut self, s: &Self::S, n: i32) -> R<()>;
    fn accept(&mut self, s: &Self::S) -> R<Self::S>;
    fn connect(&mut self, s: &Self::S, a: &str) -> R<()>;
    fn send(&mut self, s: &Self::S, d: &[u8], to: Option<&str>) -> R<usize>;
    fn recv(&mut self, s: &Self::S, n: usize, flags: i32) -> R<Vec<u8>>;
    fn shutdown(&mut self, s: &Self::S, how: i32) -> R<()>;
    fn mask(&mut self, s: &Self::S) -> u32;
    fn getsockopt(&mut self, s: &Self::S, level: i32, name: i32) -> R<i32>;
    fn setsockopt(&mut self, s: &Self::S, level: i32, name: i32, v: &[u8]) -> R<()>;
    fn name(&mut self, s: &Self::S, peer: bool) -> R<SocketAddr>;
    fn ioctl(&mut self, s: &Self::S, req: u64) -> R<i64>;
    fn close(&mut self, s: Self::S);
    /// Lets asynchronous things (handshakes, ACKs, FINs) finish.
    fn settle(&mut self);
}

struct Kernel;

fn rc(r: i32) -> R<()> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

impl Api for Kernel {
    type S = OwnedFd;
    fn socket(&mut self, domain: i32, ty: i32) -> R<OwnedFd> {
        // SAFETY: socket has no memory preconditions.
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    fn bind(&mut self, s: &OwnedFd, a: &str) -> R<()> {
        let b = to_sa(a);
        // SAFETY: b is a live buffer of the length passed.
        rc(unsafe { libc::bind(raw(s), b.as_ptr().cast(), b.len() as u32) })
    }
    fn listen(&mut self, s: &OwnedFd, n: i32) -> R<()> {
        // SAFETY: plain syscall on an fd we own.
        rc(unsafe { libc::listen(raw(s), n) })
    }
    fn accept(&mut self, s: &OwnedFd) -> R<OwnedFd> {
        // SAFETY: null address pointers are allowed by accept4.
        let fd = unsafe { libc::accept4(raw(s), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    fn connect(&mut self, s: &OwnedFd, a: &str) -> R<()> {
        let b = to_sa(a);
        // SAFETY: b is a live buffer of the length passed.
        rc(unsafe { libc::connect(raw(s), b.as_ptr().cast(), b.len() as u32) })
    }
    fn send(&mut self, s: &OwnedFd, d: &[u8], to: Option<&str>) -> R<usize> {
        let b = to.map(to_sa).unwrap_or_default();
        let (p, l) = if b.is_empty() { (std::ptr::null(), 0) } else { (b.as_ptr(), b.len() as u32) };
        // SAFETY: d and b are live buffers of the lengths passed.
        let n = unsafe { libc::sendto(raw(s), d.as_ptr().cast(), d.len(), libc::MSG_NOSIGNAL, p.cast(), l) };
        if n < 0 {
            Err(errno())
        } else {
            Ok(n as usize)
        }
    }
    fn recv(&mut self, s: &OwnedFd, n: usize, flags: i32) -> R<Vec<u8>> {
        let mut b = vec![0u8; n];
        // SAFETY: b is a live writable buffer of the length passed.
        let r = unsafe { libc::recv(raw(s), b.as_mut_ptr().cast(), n, flags) };
        if r < 0 {
            return Err(errno());
        }
        b.truncate((r as usize).min(n));
        Ok(b)
    }
    fn shutdown(&mut self, s: &OwnedFd, how: i32) -> R<()> {
        // SAFETY: plain syscall on an fd we own.
        rc(unsafe { libc::shutdown(raw(s), how) })
    }
    fn mask(&mut self, s: &OwnedFd) -> u32 {
        let mut p = libc::pollfd {
            fd: raw(s),
            events: libc::POLLIN | libc::POLLOUT | libc::POLLPRI | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents as u16 as u32
    }
    fn getsockopt(&mut self, s: &OwnedFd, level: i32, name: i32) -> R<i32> {
        let mut v = 0i32;
        let mut l = 4u32;
        // SAFETY: v and l are live and writable.
        rc(unsafe { libc::getsockopt(raw(s), level, name, (&mut v as *mut i32).cast(), &mut l) })?;
        Ok(v)
    }
    fn setsockopt(&mut self, s: &OwnedFd, level: i32, name: i32, v: &[u8]) -> R<()> {
        // SAFETY: v is a live buffer of the length passed.
        rc(unsafe { libc::setsockopt(raw(s), level, name, v.as_ptr().cast(), v.len() as u32) })
    }
    fn name(&mut self, s: &OwnedFd, peer: bool) -> R<SocketAddr> {
        let mut b = [0u8; 28];
        let mut l = 28u32;
        // SAFETY: b and l are live and writable; l holds b's size.
        let r = unsafe {
            if peer {
                libc::getpeername(raw(s), b.as_mut_ptr().cast(), &mut l)
            } else {
                libc::getsockname(raw(s), b.as_mut_ptr().cast(), &mut l)
            }
        };
        rc(r)?;
        Ok(from_sa(&b[..l as usize]))
    }
    fn ioctl(&mut self, s: &OwnedFd, req: u64) -> R<i64> {
        let mut v: libc::c_int = 0;
        // SAFETY: these ioctls write one int into v.
        rc(unsafe { libc::ioctl(raw(s), req, &mut v as *mut libc::c_int) })?;
        Ok(i64::from(v))
    }
    fn close(&mut self, s: OwnedFd) {
        drop(s);
    }
    fn settle(&mut self) {
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn raw(s: &OwnedFd) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(s)
}

struct User {
    st: UserStack,
    now: Instant,
}

impl User {
    fn new() -> User {
        let mut fds = [0; 2];
        // SAFETY: fds is a live array for socketpair to fill.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds nobody else owns; the other end is closed at once (no wire needed).
        let (a, _b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let cfg = UserConfig { link: Link::Packet, ..UserConfig::default_tap() };
        User { st: UserStack::new(cfg, a).unwrap(), now: Instant::now() }
    }
}

impl Api for User {
    type S = Handle;
    fn socket(&mut self, domain: i32, ty: i32) -> R<Handle> {
        self.st.socket(domain, ty, 0)
    }
    fn bind(&mut self, s: &Handle, a: &str) -> R<()> {
        self.st.bind(s, &to_sa(a))
    }
    fn listen(&mut self, s: &Handle, n: i32) -> R<()> {
        self.st.listen(s, n)
    }
    fn accept(&mut self, s: &Handle) -> R<Handle> {
        self.st.accept(s, &mut [0; 28]).map(|(h, _)| h)
    }
    fn connect(&mut self, s: &Handle, a: &str) -> R<()> {
        self.st.connect(s, &to_sa(a))
    }
    fn send(&mut self, s: &Handle, d: &[u8], to: Option<&str>) -> R<usize> {
        self.st.send(s, d, libc::MSG_NOSIGNAL, &to.map(to_sa).unwrap_or_default())
    }
    fn recv(&mut self, s: &Handle, n: usize, flags: i32) -> R<Vec<u8>> {
        let mut b = vec![0u8; n];
        let (k, _) = self.st.recv(s, &mut b, flags, &mut [0; 28])?;
        b.truncate(k.min(n));
        Ok(b)
    }
    fn shutdown(&mut self, s: &Handle, how: i32) -> R<()> {
        self.st.shutdown(s, how)
    }
    fn mask(&mut self, s: &Handle) -> u32 {
        self.st.poll_mask(s)
    }
    fn getsockopt(&mut self, s: &Handle, level: i32, name: i32) -> R<i32> {
        let mut v = [0u8; 4];
        self.st.getsockopt(s, level, name, &mut v)?;
        Ok(i32::from_ne_bytes(v))
    }
    fn setsockopt(&mut self, s: &Handle, level: i32, name: i32, v: &[u8]) -> R<()> {
        self.st.setsockopt(s, level, name, v)
    }
    fn name(&mut self, s: &Handle, peer: bool) -> R<SocketAddr> {
        let mut b = [0u8; 28];
        let n = if peer { self.st.getpeername(s, &mut b)? } else { self.st.getsockname(s, &mut b)? };
        Ok(from_sa(&b[..n]))
    }
    fn ioctl(&mut self, s: &Handle, req: u64) -> R<i64> {
        self.st.ioctl(s, req)
    }
    fn close(&mut self, s: Handle) {
        self.st.close(s);
    }
    fn settle(&mut self) {
        let mut ready: Vec<Ready> = Vec::new();
        for _ in 0..30 {
            self.now += Duration::from_millis(1);
            self.st.poll(self.now, false, &mut ready);
        }
    }
}

/// A port free on this machine for TCP and UDP on every address, below the ephemeral range
/// so that no connect() of a test running alongside takes it meanwhile.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 5_000) as u16;
    loop {
        let p = base + NEXT.fetch_add(7, Ordering::Relaxed) % 12_000;
        let t = std::net::TcpListener::bind(("::", p));
        let u = std::net::UdpSocket::bind(("::", p));
        let t4 = std::net::TcpListener::bind(("0.0.0.0", p));
        // [::] may be v6-only on some systems: then the IPv4 wildcard must be free too.
        if t.is_ok() && u.is_ok() && (t4.is_ok() || t4.err().and_then(|e| e.raw_os_error()) == Some(libc::EADDRINUSE)) {
            return p;
        }
    }
}

fn masks(m: u32) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (libc::POLLIN, "IN"),
        (libc::POLLPRI, "PRI"),
        (libc::POLLOUT, "OUT"),
        (libc::POLLERR, "ERR"),
        (libc::POLLHUP, "HUP"),
        (libc::POLLRDHUP, "RDHUP"),
    ] {
        if m & bit as u32 != 0 {
            v.push(name);
        }
    }
    v.join("|")
}

fn tcp_scenarios<A: Api>(a: &mut A, port: u16, six: bool) -> Vec<String> {
    let mut t = Vec::new();
    let (at, refused) = if six {
        (format!("[::1]:{port}"), format!("[::1]:{}", free_port()))
    } else {
        (format!("127.0.0.1:{port}"), format!("127.0.0.1:{}", free_port()))
    };
    macro_rules! log {
        ($what:expr, $v:expr) => {
            t.push(format!("{}: {:?}", $what, $v))
        };
    }
    let (inet, stream) = (if six { libc::AF_INET6 } else { libc::AF_INET }, libc::SOCK_STREAM);

    // A fresh socket.
    let s = a.socket(inet, stream).unwrap();
    log!("fresh mask", masks(a.mask(&s)));
    log!("fresh send", a.send(&s, b"x", None));
    log!("fresh recv", a.recv(&s, 4, 0));
    log!("fresh accept", a.accept(&s).err());
    log!("fresh shutdown", a.shutdown(&s, libc::SHUT_WR));
    log!("fresh peer", a.name(&s, true));
    log!("fresh name", a.name(&s, false));
    log!("fresh SO_TYPE", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_TYPE));
    log!("fresh SO_ERROR", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_ERROR));
    log!("fresh nodelay", a.getsockopt(&s, libc::IPPROTO_TCP, libc::TCP_NODELAY));
    log!("fresh rcvbuf", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_RCVBUF));
    log!("bad shutdown", a.shutdown(&s, 9));
    let int = |v: i32| v.to_ne_bytes();
    for (what, level, name, v) in [
        ("rcvbuf 100000", libc::SOL_SOCKET, libc::SO_RCVBUF, 100_000),
        ("rcvbuf 1", libc::SOL_SOCKET, libc::SO_RCVBUF, 1),
        ("sndbuf 1", libc::SOL_SOCKET, libc::SO_SNDBUF, 1),
        ("sndbuf 50000", libc::SOL_SOCKET, libc::SO_SNDBUF, 50_000),
        ("keepalive", libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        ("reuseaddr", libc::SOL_SOCKET, libc::SO_REUSEADDR, 1),
        ("nodelay", libc::IPPROTO_TCP, libc::TCP_NODELAY, 1),
        ("keepidle 0", libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 0),
        ("keepidle 30", libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        ("keepintvl 5", libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        ("keepcnt 3", libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        ("keepcnt 200", libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 200),
    ] {
        log!(format!("set {what}"), a.setsockopt(&s, level, name, &int(v)));
        log!(format!("get {what}"), a.getsockopt(&s, level, name));
    }
    log!("short int option", a.setsockopt(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &[1]));
    log!("SO_PROTOCOL", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_PROTOCOL));
    log!("SO_DOMAIN", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_DOMAIN));
    log!("SO_ACCEPTCONN", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN));
    log!("unknown option", a.getsockopt(&s, libc::SOL_SOCKET, 4242));
    if six {
        log!("v6only", a.getsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
        log!("hops", a.getsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS));
    } else {
        log!("ttl", a.getsockopt(&s, libc::IPPROTO_IP, libc::IP_TTL));
        log!("ttl 0", a.setsockopt(&s, libc::IPPROTO_IP, libc::IP_TTL, &int(0)));
        log!("v6only on v4", a.getsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
    }
    log!("bind non-local", a.bind(&s, if six { "[2001:db8::1]:1" } else { "192.0.2.1:1" }));
    log!("bind other family", a.bind(&s, if six { "192.0.2.1:1" } else { "[::1]:1" }));
    a.close(s);

    // Refused.
    let s = a.socket(inet, stream).unwrap();
    log!("connect refused", a.connect(&s, &refused));
    a.settle();
    log!("refused mask", masks(a.mask(&s)));
    log!("refused SO_ERROR", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_ERROR));
    log!("refused SO_ERROR again", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_ERROR));
    log!("refused mask after", masks(a.mask(&s)));
    log!("refused recv", a.recv(&s, 4, 0));
    log!("refused send", a.send(&s, b"x", None));
    a.close(s);
    let s = a.socket(inet, stream).unwrap();
    let _ = a.connect(&s, &refused);
    a.settle();
    log!("refused reconnect", a.connect(&s, &refused));
    a.close(s);

    // A connection.
    let l = a.socket(inet, stream).unwrap();
    log!("bind", a.bind(&l, &at));
    let l2 = a.socket(inet, stream).unwrap();
    log!("bind in use", a.bind(&l2, &at));
    a.close(l2);
    log!("listen", a.listen(&l, 4));
    log!("listener mask", masks(a.mask(&l)));
    log!("listener accept", a.accept(&l).err());
    log!("listener recv", a.recv(&l, 4, 0));
    log!("listener connect", a.connect(&l, &refused));
    let c = a.socket(inet, stream).unwrap();
    log!("connect", a.connect(&c, &at));
    a.settle();
    log!("listener mask pending", masks(a.mask(&l)));
    log!("connected mask", masks(a.mask(&c)));
    log!("connect again", a.connect(&c, &at));
    log!("connect again 2", a.connect(&c, &at));
    let s = a.accept(&l).unwrap();
    log!("accepted mask", masks(a.mask(&s)));
    log!("accepted peer ip", a.name(&s, true).map(|p| p.ip()));
    log!("accepted name", a.name(&s, false));
    log!("empty recv", a.recv(&s, 4, 0));
    log!("send", a.send(&c, b"hello", None));
    a.settle();
    log!("readable mask", masks(a.mask(&s)));
    log!("FIONREAD", a.ioctl(&s, 0x541b));
    log!("TIOCOUTQ settled", a.ioctl(&c, 0x5411));
    log!("listener FIONREAD", a.ioctl(&l, 0x541b));
    log!("SIOCATMARK", a.ioctl(&s, 0x8905));
    log!("peek", a.recv(&s, 3, libc::MSG_PEEK));
    log!("recv", a.recv(&s, 16, 0));
    log!("recv oob", a.recv(&s, 16, libc::MSG_OOB));
    log!("SO_ERROR", a.getsockopt(&s, libc::SOL_SOCKET, libc::SO_ERROR));
    log!("shutdown rd", a.shutdown(&s, libc::SHUT_RD));
    log!("shut rd mask", masks(a.mask(&s)));
    log!("shut rd recv", a.recv(&s, 4, 0));
    log!("shutdown wr", a.shutdown(&c, libc::SHUT_WR));
    log!("send after shut wr", a.send(&c, b"x", None));
    a.settle();
    log!("shut wr mask", masks(a.mask(&c)));
    log!("peer fin mask", masks(a.mask(&s)));
    log!("eof", a.recv(&s, 4, 0));
    log!("send after fin", a.send(&s, b"late", None));
    a.settle();
    log!("half-closed recv", a.recv(&c, 16, 0));
    a.close(s);
    a.settle();
    log!("closed mask", masks(a.mask(&c)));
    log!("closed recv", a.recv(&c, 4, 0));
    log!("closed peer", a.name(&c, true).err());
    log!("closed shutdown", a.shutdown(&c, libc::SHUT_RDWR));
    a.close(c);

    // Peer closes; the first send succeeds and draws a reset, the next is EPIPE.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    let s = a.accept(&l).unwrap();
    a.close(s);
    a.settle();
    log!("peer closed mask", masks(a.mask(&c)));
    log!("send to closed", a.send(&c, b"x", None));
    a.settle();
    log!("after rst mask", masks(a.mask(&c)));
    log!("send after rst", a.send(&c, b"x", None));
    log!("recv after rst", a.recv(&c, 4, 0));
    a.close(c);

    // Reset by SO_LINGER 0.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    let s = a.accept(&l).unwrap();
    let mut lg = [0u8; 8];
    lg[..4].copy_from_slice(&1i32.to_ne_bytes());
    log!("linger", a.setsockopt(&s, libc::SOL_SOCKET, libc::SO_LINGER, &lg));
    a.close(s);
    a.settle();
    log!("reset mask", masks(a.mask(&c)));
    log!("reset recv", a.recv(&c, 4, 0));
    log!("reset recv again", a.recv(&c, 4, 0));
    log!("reset send", a.send(&c, b"x", None));
    log!("reset SO_ERROR", a.getsockopt(&c, libc::SOL_SOCKET, libc::SO_ERROR));
    a.close(c);

    // Reset before accept: the connection is still accepted, and its first recv says so.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    log!("client linger", a.setsockopt(&c, libc::SOL_SOCKET, libc::SO_LINGER, &lg));
    a.close(c);
    a.settle();
    log!("listener mask after reset", masks(a.mask(&l)));
    match a.accept(&l) {
        Ok(s) => {
            log!("reset-before-accept mask", masks(a.mask(&s)));
            log!("reset-before-accept recv", a.recv(&s, 4, 0));
            log!("reset-before-accept peer", a.name(&s, true).err());
            a.close(s);
        }
        Err(e) => log!("reset-before-accept accept", e),
    }

    // Data and FIN before accept.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    log!("early send", a.send(&c, b"early", None));
    log!("early shutdown", a.shutdown(&c, libc::SHUT_WR));
    a.settle();
    let s = a.accept(&l).unwrap();
    log!("early mask", masks(a.mask(&s)));
    log!("early recv", a.recv(&s, 16, 0));
    log!("early eof", a.recv(&s, 16, 0));
    a.close(s);
    a.close(c);
    log!("SO_ACCEPTCONN listener", a.getsockopt(&l, libc::SOL_SOCKET, libc::SO_ACCEPTCONN));

    // Closing with unread data resets the connection.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    let s = a.accept(&l).unwrap();
    log!("unread send", a.send(&c, b"never read", None));
    a.settle();
    a.close(s);
    a.settle();
    log!("unread-close mask", masks(a.mask(&c)));
    log!("unread-close recv", a.recv(&c, 16, 0));
    a.close(c);

    // shutdown(SHUT_RDWR) on one side.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    let s = a.accept(&l).unwrap();
    log!("shutdown rdwr", a.shutdown(&c, libc::SHUT_RDWR));
    a.settle();
    log!("rdwr mask", masks(a.mask(&c)));
    log!("rdwr peer mask", masks(a.mask(&s)));
    log!("rdwr peer send", a.send(&s, b"x", None));
    a.settle();
    log!("rdwr recv", a.recv(&c, 4, 0));
    log!("rdwr mask after", masks(a.mask(&c)));
    a.close(s);
    a.close(c);

    // TIME_WAIT: the side that closes first keeps the port; SO_REUSEADDR gets past it.
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at);
    a.settle();
    let s = a.accept(&l).unwrap();
    a.close(l);
    a.close(s);
    a.settle();
    a.close(c);
    a.settle();
    let x = a.socket(inet, stream).unwrap();
    log!("bind over time-wait", a.bind(&x, &at));
    log!("reuseaddr", a.setsockopt(&x, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32.to_ne_bytes()));
    log!("bind over time-wait with reuseaddr", a.bind(&x, &at));
    log!("listen over time-wait", a.listen(&x, 1));
    a.close(x);

    // The same with SO_REUSEADDR on the listener (and so on its accepted sockets).
    let one = 1i32.to_ne_bytes();
    let l = a.socket(inet, stream).unwrap();
    log!("reuse listener", a.setsockopt(&l, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one));
    let at2 = if six { format!("[::1]:{}", free_port()) } else { format!("127.0.0.1:{}", free_port()) };
    log!("bind reuse listener", a.bind(&l, &at2));
    log!("listen reuse listener", a.listen(&l, 4));
    let y = a.socket(inet, stream).unwrap();
    log!("reuseaddr 2", a.setsockopt(&y, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one));
    log!("bind next to a listener with reuseaddr", a.bind(&y, &at2));
    a.close(y);
    let c = a.socket(inet, stream).unwrap();
    let _ = a.connect(&c, &at2);
    a.settle();
    let s = a.accept(&l).unwrap();
    a.close(l);
    a.close(s);
    a.settle();
    a.close(c);
    a.settle();
    let x = a.socket(inet, stream).unwrap();
    log!("bind over reusable time-wait", a.bind(&x, &at2));
    log!("reuseaddr 3", a.setsockopt(&x, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one));
    log!("bind over reusable time-wait with reuseaddr", a.bind(&x, &at2));
    log!("listen there", a.listen(&x, 1));
    a.close(x);

    if six {
        // A dual-stack listener takes IPv4 and names it v4-mapped; IPV6_V6ONLY after bind
        // is refused.
        let port3 = free_port();
        let d = a.socket(inet, stream).unwrap();
        log!("dual bind", a.bind(&d, &format!("[::]:{port3}")));
        log!("v6only after bind", a.setsockopt(&d, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &one));
        log!("dual listen", a.listen(&d, 4));
        let c4 = a.socket(libc::AF_INET, stream).unwrap();
        log!("v4 to dual", a.connect(&c4, &format!("127.0.0.1:{port3}")));
        let c6 = a.socket(inet, stream).unwrap();
        log!("mapped to dual", a.connect(&c6, &format!("[::ffff:127.0.0.1]:{port3}")));
        a.settle();
        for _ in 0..2 {
            match a.accept(&d) {
                Ok(s) => {
                    log!("dual accepted peer", a.name(&s, true).map(|p| p.ip()));
                    log!("dual accepted name ip", a.name(&s, false).map(|n| n.ip()));
                }
                Err(e) => log!("dual accept", e),
            }
        }
        log!("mapped client name ip", a.name(&c6, false).map(|n| n.ip()));
        let o = a.socket(inet, stream).unwrap();
        log!("v6only", a.setsockopt(&o, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &one));
        log!("v6only to mapped", a.connect(&o, &format!("[::ffff:127.0.0.1]:{port3}")));
    }
    t
}

fn udp_scenarios<A: Api>(a: &mut A, port: u16, six: bool) -> Vec<String> {
    let mut t = Vec::new();
    macro_rules! log {
        ($what:expr, $v:expr) => {
            t.push(format!("{}: {:?}", $what, $v))
        };
    }
    let host = if six { "[::1]" } else { "127.0.0.1" };
    let at = format!("{host}:{port}");
    let inet = if six { libc::AF_INET6 } else { libc::AF_INET };
    let u = a.socket(inet, libc::SOCK_DGRAM).unwrap();
    log!("fresh mask", masks(a.mask(&u)));
    log!("send no addr", a.send(&u, b"x", None));
    log!("recv empty", a.recv(&u, 4, 0));
    log!("listen", a.listen(&u, 1));
    log!("shutdown", a.shutdown(&u, libc::SHUT_RD));
    log!("peer", a.name(&u, true).err());
    log!("bind after send", a.bind(&u, &at));
    log!("autobound", a.name(&u, false).map(|n| n.port() != 0));
    log!("shut rd mask", masks(a.mask(&u)));
    log!("shut rd recv", a.recv(&u, 4, 0));
    a.close(u);
    let u = a.socket(inet, libc::SOCK_DGRAM).unwrap();
    log!("bind", a.bind(&u, &at));
    let w = a.socket(inet, libc::SOCK_DGRAM).unwrap();
    log!("bind in use", a.bind(&w, &at));
    let v = a.socket(inet, libc::SOCK_DGRAM).unwrap();
    log!("sendto", a.send(&v, b"datagram", Some(&at)));
    a.settle();
    log!("readable mask", masks(a.mask(&u)));
    log!("recv trunc", a.recv(&u, 4, libc::MSG_TRUNC | libc::MSG_PEEK).map(|b| b.len()));
    log!("recv short", a.recv(&u, 4, 0));
    log!("recv again", a.recv(&u, 4, 0));
    log!("connect", a.connect(&v, &at));
    log!("connected peer", a.name(&v, true));
    log!("connected name ip", a.name(&v, false).map(|n| n.ip()));
    log!("send connected", a.send(&v, b"abc", None));
    a.settle();
    log!("recv", a.recv(&u, 16, 0));
    log!("too big", a.send(&v, &vec![0; 70_000], None));
    log!("FIONREAD-less empty recv", a.recv(&u, 16, 0));
    // Nobody at the port: the ICMP port unreachable becomes the connected socket's error.
    let nobody = format!("{host}:{}", free_port());
    let x = a.socket(inet, libc::SOCK_DGRAM).unwrap();
    log!("connect nobody", a.connect(&x, &nobody));
    log!("send nobody", a.send(&x, b"anyone?", None));
    a.settle();
    log!("refused mask", masks(a.mask(&x)));
    log!("refused recv", a.recv(&x, 16, 0));
    log!("refused recv again", a.recv(&x, 16, 0));
    log!("send nobody again", a.send(&x, b"anyone?", None));
    a.settle();
    log!("refused SO_ERROR", a.getsockopt(&x, libc::SOL_SOCKET, libc::SO_ERROR));
    log!("refused mask after", masks(a.mask(&x)));
    // An unconnected socket ignores the ICMP error.
    let y = a.socket(inet, libc::SOCK_DGRAM).unwrap();
    log!("sendto nobody", a.send(&y, b"anyone?", Some(&nobody)));
    a.settle();
    log!("unconnected mask", masks(a.mask(&y)));
    log!("unconnected recv", a.recv(&y, 16, 0));
    log!("disconnect", a.connect(&v, if six { "[::]:0" } else { "0.0.0.0:0" }).err());
    if six {
        // A dual-stack socket hears IPv4 and names its source v4-mapped.
        let v4 = a.socket(libc::AF_INET, libc::SOCK_DGRAM).unwrap();
        let d = a.socket(inet, libc::SOCK_DGRAM).unwrap();
        let p2 = free_port();
        log!("dual bind", a.bind(&d, &format!("[::]:{p2}")));
        log!("v4 to dual", a.send(&v4, b"four", Some(&format!("127.0.0.1:{p2}"))));
        log!("mapped to dual", a.send(&d, b"self", Some(&format!("[::ffff:127.0.0.1]:{p2}"))));
        a.settle();
        // Sorted: smoltcp sends the queued datagrams of different sockets in socket order,
        // not in the order they were sent (see the crate docs).
        let mut got = vec![a.recv(&d, 8, 0), a.recv(&d, 8, 0)];
        got.sort();
        log!("dual recv", got);
    }
    t
}

fn compare(name: &str, kernel: Vec<String>, user: Vec<String>) {
    if std::env::var_os("PARITY_SHOW").is_some() {
        eprintln!("{name}, Linux's transcript:\n  {}", kernel.join("\n  "));
    }
    let mut bad = Vec::new();
    for (k, u) in kernel.iter().zip(&user) {
        if k != u {
            bad.push(format!("  linux: {k}\n  user:  {u}"));
        }
    }
    if kernel.len() != user.len() {
        bad.push(format!("  linux has {} lines, user {}", kernel.len(), user.len()));
    }
    assert!(bad.is_empty(), "{name}: the user stack differs from Linux in {} places:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn tcp_matches_linux() {
    let port = free_port();
    let k = tcp_scenarios(&mut Kernel, port, false);
    let u = tcp_scenarios(&mut User::new(), port, false);
    compare("tcp", k, u);
}

#[test]
fn tcp6_matches_linux() {
    let port = free_port();
    let k = tcp_scenarios(&mut Kernel, port, true);
    let u = tcp_scenarios(&mut User::new(), port, true);
    compare("tcp6", k, u);
}

#[test]
fn udp_matches_linux() {
    let port = free_port();
    let k = udp_scenarios(&mut Kernel, port, false);
    let u = udp_scenarios(&mut User::new(), port, false);
    compare("udp", k, u);
}

#[test]
fn udp6_matches_linux() {
    let port = free_port();
    let k = udp_scenarios(&mut Kernel, port, true);
    let u = udp_scenarios(&mut User::new(), port, true);
    compare("udp6", k, u);
}
