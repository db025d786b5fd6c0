//! Conformance probe: runs one socket scenario and prints a trace of every call's return value,
//! errno and data, with nothing machine-specific (no port numbers, no timings). The conformance
//! test runs each scenario natively and under GuestLib and requires identical traces: the
//! kernel is the oracle.

use libc::{c_int, sockaddr, sockaddr_in, socklen_t};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn ename(e: c_int) -> String {
    match e {
        0 => "OK".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EINPROGRESS => "EINPROGRESS".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EADDRINUSE => "EADDRINUSE".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::EINTR => "EINTR".into(),
        libc::ENOTCONN => "ENOTCONN".into(),
        libc::EISCONN => "EISCONN".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EBADF => "EBADF".into(),
        libc::EALREADY => "EALREADY".into(),
        e => format!("errno{e}"),
    }
}

/// Prints one traced call: `label: ret errno`.
fn t(label: &str, r: isize) -> isize {
    let e = if r < 0 { errno() } else { 0 };
    println!("{label}: {} {}", if r < 0 { -1 } else { r }, ename(e));
    r
}

fn tcp() -> c_int {
    // SAFETY: integers only, no memory passed.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
}

fn loopback(port: u16) -> sockaddr_in {
    // SAFETY: libc::sockaddr_in is integers and bytes only, so all-zero bytes are a valid value.
    let mut a: sockaddr_in = unsafe { std::mem::zeroed() };
    a.sin_family = libc::AF_INET as u16;
    a.sin_port = port.to_be();
    a.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    a
}

fn sa(a: &sockaddr_in) -> (*const sockaddr, socklen_t) {
    ((a as *const sockaddr_in).cast(), std::mem::size_of::<sockaddr_in>() as socklen_t)
}

fn port_of(fd: c_int) -> u16 {
    let mut a = loopback(0);
    let mut l = std::mem::size_of::<sockaddr_in>() as socklen_t;
    // SAFETY: a/l describe a live sockaddr_in.
    unsafe { libc::getsockname(fd, (&mut a as *mut sockaddr_in).cast(), &mut l) };
    u16::from_be(a.sin_port)
}

/// A listener on an ephemeral loopback port.
fn listener() -> (c_int, u16) {
    let fd = tcp();
    let a = loopback(0);
    let (p, l) = sa(&a);
    // SAFETY: p/l describe a, a live sockaddr_in of that length; the rest are integers.
    unsafe {
        assert_eq!(libc::bind(fd, p, l), 0, "bind: {}", errno());
        assert_eq!(libc::listen(fd, 1024), 0);
    }
    (fd, port_of(fd))
}

fn connect_to(fd: c_int, port: u16) -> isize {
    let a = loopback(port);
    let (p, l) = sa(&a);
    // SAFETY: live address.
    unsafe { libc::connect(fd, p, l) as isize }
}

/// A connected pair (client, server side) on loopback.
fn pair() -> (c_int, c_int) {
    let (l, port) = listener();
    let c = tcp();
    assert_eq!(connect_to(c, port), 0, "connect: {}", errno());
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert!(s >= 0);
    close(l);
    (c, s)
}

fn close(fd: c_int) {
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
}

fn nonblock(fd: c_int) {
    // SAFETY: integers only, no memory passed; the kernel checks the fd.
    unsafe {
        let f = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, f | libc::O_NONBLOCK);
    }
}

fn send(fd: c_int, data: &[u8], flags: c_int) -> isize {
    // SAFETY: live buffer.
    unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), flags) }
}

fn recv(fd: c_int, buf: &mut [u8], flags: c_int) -> isize {
    // SAFETY: live buffer.
    unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) }
}

fn recv_trace(label: &str, fd: c_int, n: usize, flags: c_int) {
    let mut buf = vec![0u8; n];
    let r = t(label, recv(fd, &mut buf, flags));
    if r > 0 {
        println!("{label} data: {:?}", String::from_utf8_lossy(&buf[..r as usize]));
    }
}

fn poll1(fd: c_int, events: i16, timeout: c_int) -> String {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout) };
    format!("{r} revents={:#x}", p.revents)
}

fn so_error(fd: c_int) -> String {
    let mut v: c_int = 0;
    let mut l = 4 as socklen_t;
    // SAFETY: v/l describe a live int.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut v as *mut c_int).cast(), &mut l) };
    format!("{r} {}", ename(v))
}

/// A loopback port with nothing listening.
fn closed_port() -> u16 {
    let (l, port) = listener();
    close(l);
    port
}

fn connect_open() {
    let (l, port) = listener();
    let c = tcp();
    t("connect", connect_to(c, port));
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    println!("accepted: {}", s >= 0);
    t("connect again", connect_to(c, port));
    println!("peer port matches: {}", {
        let mut a = loopback(0);
        let mut len = std::mem::size_of::<sockaddr_in>() as socklen_t;
        // SAFETY: live sockaddr.
        unsafe { libc::getpeername(c, (&mut a as *mut sockaddr_in).cast(), &mut len) };
        u16::from_be(a.sin_port) == port && len == 16
    });
    let mut ty: c_int = 0;
    let mut len = 4 as socklen_t;
    // SAFETY: live int.
    unsafe { libc::getsockopt(c, libc::SOL_SOCKET, libc::SO_TYPE, (&mut ty as *mut c_int).cast(), &mut len) };
    println!("SO_TYPE: {ty} len {len}");
    // SAFETY: libc::stat is integers and bytes only, so all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: live stat buffer.
    unsafe { libc::fstat(c, &mut st) };
    println!("fstat socket: {}", st.st_mode & libc::S_IFMT == libc::S_IFSOCK);
    close(c);
    close(s);
    close(l);
}

fn connect_closed() {
    let port = closed_port();
    let c = tcp();
    t("blocking connect to closed port", connect_to(c, port));
    close(c);
    let c = tcp();
    nonblock(c);
    t("nonblocking connect to closed port", connect_to(c, port));
    println!("poll: {}", poll1(c, libc::POLLOUT, 2000));
    println!("SO_ERROR: {}", so_error(c));
    println!("SO_ERROR again: {}", so_error(c));
    close(c);
    let (l, port) = listener();
    let c = tcp();
    nonblock(c);
    let r = connect_to(c, port);
    println!("nonblocking connect to open port: {}", if r == 0 || errno() == libc::EINPROGRESS { "ok" } else { "bad" });
    println!("poll: {}", poll1(c, libc::POLLOUT, 2000));
    println!("SO_ERROR: {}", so_error(c));
    t("connect after completion", connect_to(c, port));
    close(c);
    close(l);
}

fn addr_in_use() {
    let (l, port) = listener();
    let b = tcp();
    let a = loopback(port);
    let (p, len) = sa(&a);
    // SAFETY: live address.
    t("bind in-use port", unsafe { libc::bind(b, p, len) } as isize);
    let one: c_int = 1;
    // SAFETY: live int.
    unsafe { libc::setsockopt(b, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&one as *const c_int).cast(), 4) };
    // SAFETY: live address.
    t("bind in-use port with SO_REUSEADDR (listener active)", unsafe { libc::bind(b, p, len) } as isize);
    // SAFETY: live address.
    t("bind twice", unsafe { libc::bind(l, p, len) } as isize);
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("listen on unbound second socket", unsafe { libc::listen(tcp(), 5) } as isize);
    close(b);
    close(l);
}

fn accept_nonblocking() {
    let (l, port) = listener();
    nonblock(l);
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    t("accept empty", unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) } as isize);
    // SAFETY: null address and length, which accept4(2) allows; the bad flags are an integer the
    // kernel refuses.
    t("accept4 bad flags", unsafe { libc::accept4(l, std::ptr::null_mut(), std::ptr::null_mut(), 0x1234) } as isize);
    println!("poll empty: {}", poll1(l, libc::POLLIN, 0));
    recv_trace("recv on listener", l, 10, 0);
    t("send on listener", send(l, b"x", libc::MSG_NOSIGNAL));
    let c = tcp();
    connect_to(c, port);
    println!("poll pending: {}", poll1(l, libc::POLLIN, 2000));
    let mut a = loopback(0);
    let mut len = 4 as socklen_t;
    // SAFETY: truncated address buffer: the kernel reports the full length.
    let s = unsafe { libc::accept4(l, (&mut a as *mut sockaddr_in).cast(), &mut len, libc::SOCK_NONBLOCK) };
    println!("accept4: {} addrlen={len} family={}", s >= 0, a.sin_family);
    // SAFETY: fcntl on the accepted fd.
    println!("accepted nonblocking: {}", unsafe { libc::fcntl(s, libc::F_GETFL) } & libc::O_NONBLOCK != 0);
    recv_trace("recv on new nonblocking", s, 10, 0);
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    t("accept drained", unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) } as isize);
    let c2 = tcp();
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("accept on non-listening", unsafe { libc::accept(c2, std::ptr::null_mut(), std::ptr::null_mut()) } as isize);
    close(c2);
    close(s);
    close(c);
    close(l);
}

fn half_close() {
    let (c, s) = pair();
    t("client send", send(c, b"hello", 0));
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("client shutdown WR", unsafe { libc::shutdown(c, libc::SHUT_WR) } as isize);
    t("client send after shutdown", send(c, b"x", libc::MSG_NOSIGNAL));
    recv_trace("server recv", s, 100, 0);
    recv_trace("server recv EOF", s, 100, 0);
    println!("server poll: {}", poll1(s, libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP, 1000));
    t("server send", send(s, b"world", 0));
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("server shutdown RDWR", unsafe { libc::shutdown(s, libc::SHUT_RDWR) } as isize);
    recv_trace("client recv", c, 100, 0);
    recv_trace("client recv EOF", c, 100, 0);
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("shutdown bad how", unsafe { libc::shutdown(c, 7) } as isize);
    let u = tcp();
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("shutdown unconnected", unsafe { libc::shutdown(u, libc::SHUT_RD) } as isize);
    close(u);
    close(c);
    close(s);
}

fn peer_reset() {
    let (c, s) = pair();
    let lin = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: live linger.
    unsafe {
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lin as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    close(s);
    println!("poll: {}", poll1(c, libc::POLLIN, 2000));
    recv_trace("recv after reset", c, 10, 0);
    recv_trace("recv again", c, 10, 0);
    t("send after reset", send(c, b"x", libc::MSG_NOSIGNAL));
    println!("SO_ERROR: {}", so_error(c));
    close(c);
}

fn readiness() {
    let (c, s) = pair();
    let mut pipe = [0; 2];
    // SAFETY: live array.
    unsafe { libc::pipe(pipe.as_mut_ptr()) };
    let mut fds = [
        libc::pollfd { fd: s, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: pipe[0], events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: live array.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
    println!("poll idle: {r} {:#x} {:#x}", fds[0].revents, fds[1].revents);
    // SAFETY: one byte from a static literal; the kernel checks the fd.
    unsafe { libc::write(pipe[1], b"p".as_ptr().cast(), 1) };
    // SAFETY: live array.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
    println!("poll pipe ready: {r} {:#x} {:#x}", fds[0].revents, fds[1].revents);
    send(c, b"abc", 0);
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: live array.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
    println!("poll both ready: {r} {:#x} {:#x}", fds[0].revents, fds[1].revents);

    // select
    // SAFETY: fd_set manipulation on locals.
    unsafe {
        let mut rs: libc::fd_set = std::mem::zeroed();
        let mut ws: libc::fd_set = std::mem::zeroed();
        libc::FD_SET(s, &mut rs);
        libc::FD_SET(pipe[0], &mut rs);
        libc::FD_SET(c, &mut ws);
        let mut tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        let n = s.max(pipe[0]).max(c) + 1;
        let r = libc::select(n, &mut rs, &mut ws, std::ptr::null_mut(), &mut tv);
        println!(
            "select: {r} s={} pipe={} c_w={}",
            libc::FD_ISSET(s, &rs),
            libc::FD_ISSET(pipe[0], &rs),
            libc::FD_ISSET(c, &ws)
        );
    }

    // epoll: LT, ET, ONESHOT, with the pipe in the same set; one socket in two sets.
    // SAFETY: epoll calls on our fds with live event structs.
    unsafe {
        let ep = libc::epoll_create1(0);
        let ep2 = libc::epoll_create1(0);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 1 };
        t("epoll add s LT", libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s, &mut ev) as isize);
        t("epoll add s again", libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s, &mut ev) as isize);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 2 };
        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, pipe[0], &mut ev);
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 3 };
        t("epoll add s ET in second set", libc::epoll_ctl(ep2, libc::EPOLL_CTL_ADD, s, &mut ev) as isize);
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let show = |label: &str, n: c_int, out: &[libc::epoll_event]| {
            let mut v: Vec<(u64, u32)> = out[..n.max(0) as usize].iter().map(|e| (e.u64, e.events)).collect();
            v.sort();
            println!("{label}: {n} {v:?}");
        };
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 8, 1000);
        show("epoll LT", n, &out);
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 8, 1000);
        show("epoll LT again", n, &out);
        let n = libc::epoll_wait(ep2, out.as_mut_ptr(), 8, 1000);
        show("epoll ET", n, &out);
        let n = libc::epoll_wait(ep2, out.as_mut_ptr(), 8, 100);
        show("epoll ET no new edge", n, &out);
        send(c, b"d", 0);
        let n = libc::epoll_wait(ep2, out.as_mut_ptr(), 8, 1000);
        show("epoll ET new edge", n, &out);
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32, u64: 4 };
        t("epoll mod oneshot", libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, s, &mut ev) as isize);
        let mut pbuf = [0u8; 1];
        libc::read(pipe[0], pbuf.as_mut_ptr().cast(), 1);
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 8, 1000);
        show("epoll oneshot", n, &out);
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 8, 50);
        show("epoll oneshot disarmed", n, &out);
        t("epoll mod rearm", libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, s, &mut ev) as isize);
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 8, 1000);
        show("epoll rearmed", n, &out);
        let mut buf = [0u8; 16];
        recv(s, &mut buf, 0);
        t("epoll del", libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, s, std::ptr::null_mut()) as isize);
        t("epoll del again", libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, s, std::ptr::null_mut()) as isize);
        t("epoll mod missing", libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, s, &mut ev) as isize);
        let mut ev = libc::epoll_event { events: libc::EPOLLOUT as u32, u64: 5 };
        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c, &mut ev);
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 8, 1000);
        show("epoll writable", n, &out);
        // A socket waited on from another thread: data arrives while epoll_wait sleeps.
        let cc = c;
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            send(cc, b"late", 0);
        });
        let n = libc::epoll_wait(ep2, out.as_mut_ptr(), 8, 3000);
        show("epoll ET wakes on late data", n, &out);
        h.join().unwrap();
        close(ep);
        close(ep2);
    }
    close(pipe[0]);
    close(pipe[1]);
    close(c);
    close(s);
}

fn flags() {
    let (c, s) = pair();
    nonblock(s);
    recv_trace("MSG_DONTWAIT empty", s, 10, libc::MSG_DONTWAIT);
    send(c, b"0123456789", 0);
    std::thread::sleep(Duration::from_millis(50));
    recv_trace("MSG_PEEK", s, 4, libc::MSG_PEEK);
    recv_trace("MSG_PEEK again", s, 4, libc::MSG_PEEK);
    let mut n: c_int = 0;
    // SAFETY: live int.
    unsafe { libc::ioctl(s, libc::FIONREAD, &mut n) };
    println!("FIONREAD: {n}");
    recv_trace("recv 4", s, 4, 0);
    // Blocking MSG_WAITALL: the rest arrives in two pieces from another thread.
    // SAFETY: integers only, no memory passed; the kernel checks the fd.
    unsafe { libc::fcntl(s, libc::F_SETFL, libc::O_RDWR) };
    let cc = c;
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        send(cc, b"ab", 0);
        std::thread::sleep(Duration::from_millis(50));
        send(cc, b"cd", 0);
    });
    recv_trace("MSG_WAITALL 10", s, 10, libc::MSG_WAITALL);
    h.join().unwrap();
    let on: c_int = 1;
    // SAFETY: ioctl FIONBIO on our fd.
    unsafe { libc::ioctl(s, libc::FIONBIO, &on) };
    // SAFETY: integers only, no memory passed; the kernel checks the fd.
    println!("FIONBIO sets O_NONBLOCK: {}", unsafe { libc::fcntl(s, libc::F_GETFL) } & libc::O_NONBLOCK != 0);
    recv_trace("recv nonblocking empty", s, 10, 0);
    // readv/writev
    let parts = [b"ve".as_slice(), b"ct".as_slice(), b"or".as_slice()];
    let iov: Vec<libc::iovec> =
        parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }).collect();
    // SAFETY: live iovecs.
    t("writev", unsafe { libc::writev(c, iov.as_ptr(), 3) });
    std::thread::sleep(Duration::from_millis(50));
    let mut a = [0u8; 3];
    let mut bb = [0u8; 3];
    let riov = [
        libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: 3 },
        libc::iovec { iov_base: bb.as_mut_ptr().cast(), iov_len: 3 },
    ];
    // SAFETY: live iovecs.
    t("readv", unsafe { libc::readv(s, riov.as_ptr(), 2) });
    println!("readv data: {:?} {:?}", String::from_utf8_lossy(&a), String::from_utf8_lossy(&bb));
    // sendmsg/recvmsg
    // SAFETY: libc::msghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut _;
    msg.msg_iovlen = 3;
    // SAFETY: live msghdr.
    t("sendmsg", unsafe { libc::sendmsg(c, &msg, 0) });
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: libc::msghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut rmsg: libc::msghdr = unsafe { std::mem::zeroed() };
    rmsg.msg_iov = riov.as_ptr() as *mut _;
    rmsg.msg_iovlen = 2;
    // SAFETY: live msghdr.
    t("recvmsg", unsafe { libc::recvmsg(s, &mut rmsg, 0) });
    println!(
        "recvmsg flags {} data {:?} {:?}",
        rmsg.msg_flags,
        String::from_utf8_lossy(&a),
        String::from_utf8_lossy(&bb)
    );
    close(c);
    close(s);
}

static SIGS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(_: c_int) {
    SIGS.fetch_add(1, Ordering::SeqCst);
}

fn handle(sig: c_int, restart: bool) {
    // SAFETY: installing a handler that only touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = if restart { libc::SA_RESTART } else { 0 };
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn sigpipe() {
    handle(libc::SIGPIPE, true);
    let (c, s) = pair();
    close(s);
    std::thread::sleep(Duration::from_millis(50));
    // The first write may succeed (the peer answers with RST); then EPIPE.
    let mut results = Vec::new();
    for _ in 0..3 {
        let r = send(c, b"data", libc::MSG_NOSIGNAL);
        results.push(if r < 0 { ename(errno()) } else { "sent".into() });
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("MSG_NOSIGNAL sends: {results:?} signals {}", SIGS.load(Ordering::SeqCst));
    t("send without MSG_NOSIGNAL", send(c, b"data", 0));
    println!("signals after send: {}", SIGS.load(Ordering::SeqCst));
    // SAFETY: 4 bytes from a static literal of 4 bytes; the kernel checks the fd.
    t("write", unsafe { libc::write(c, b"data".as_ptr().cast(), 4) });
    println!("signals after write: {}", SIGS.load(Ordering::SeqCst));
    close(c);
}

fn rcvtimeo() {
    let (c, s) = pair();
    let tv = libc::timeval { tv_sec: 0, tv_usec: 150_000 };
    // SAFETY: live timeval.
    t("set SO_RCVTIMEO", unsafe {
        libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), 16)
    } as isize);
    let mut back = libc::timeval { tv_sec: 9, tv_usec: 9 };
    let mut len = 16 as socklen_t;
    // SAFETY: live timeval.
    unsafe {
        libc::getsockopt(s, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&mut back as *mut libc::timeval).cast(), &mut len)
    };
    println!("SO_RCVTIMEO readback: {}s {}us len {len}", back.tv_sec, back.tv_usec);
    let start = Instant::now();
    recv_trace("recv times out", s, 10, 0);
    let el = start.elapsed();
    println!("waited about the timeout: {}", el >= Duration::from_millis(140) && el < Duration::from_millis(1500));
    send(c, b"x", 0);
    recv_trace("recv with data", s, 10, 0);
    close(c);
    close(s);
}

fn alarm_in(ms: u64) {
    // SAFETY: setitimer with a live value; SIGALRM goes to the process.
    unsafe {
        let it = libc::itimerval {
            it_interval: libc::timeval { tv_sec: 0, tv_usec: 0 },
            it_value: libc::timeval { tv_sec: 0, tv_usec: (ms * 1000) as i64 },
        };
        libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut());
    }
}

fn eintr() {
    let (c, s) = pair();
    handle(libc::SIGALRM, false);
    alarm_in(100);
    recv_trace("recv interrupted (no SA_RESTART)", s, 10, 0);
    println!("signals: {}", SIGS.load(Ordering::SeqCst));
    let mut p = libc::pollfd { fd: s, events: libc::POLLIN, revents: 0 };
    alarm_in(100);
    // SAFETY: one live pollfd.
    t("poll interrupted", unsafe { libc::poll(&mut p, 1, 5000) } as isize);
    handle(libc::SIGALRM, true);
    alarm_in(100);
    let cc = c;
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        send(cc, b"after", 0);
    });
    recv_trace("recv restarted (SA_RESTART)", s, 10, 0);
    h.join().unwrap();
    println!("signals: {}", SIGS.load(Ordering::SeqCst));
    close(c);
    close(s);
}

fn many() {
    const N: usize = 1000;
    let (l, port) = listener();
    let mut clients = Vec::with_capacity(N);
    let mut servers = Vec::with_capacity(N);
    for _ in 0..N {
        let c = tcp();
        assert_eq!(connect_to(c, port), 0, "connect: {}", errno());
        clients.push(c);
        // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so
        // no memory is passed; the kernel checks l.
        let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
        assert!(s >= 0, "accept: {}", errno());
        servers.push(s);
    }
    let mut ok = 0;
    for (i, (&c, &s)) in clients.iter().zip(&servers).enumerate() {
        let msg = format!("conn {i}");
        send(c, msg.as_bytes(), 0);
        let mut buf = [0u8; 32];
        let r = recv(s, &mut buf, 0);
        send(s, &buf[..r.max(0) as usize], 0);
        let r = recv(c, &mut buf, 0);
        if r > 0 && &buf[..r as usize] == msg.as_bytes() {
            ok += 1;
        }
    }
    println!("connections verified: {ok}/{N}");
    clients.into_iter().chain(servers).for_each(close);
    close(l);
}

/// Sends `mib` MiB (default 1 GiB) of deterministic bytes through one connection and prints
/// both sides' sha256.
fn bulk(mib: usize) {
    let total: usize = mib << 20;
    let (c, s) = pair();
    let h = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            let r = recv(s, &mut buf, 0);
            if r <= 0 {
                break;
            }
            hasher.update(&buf[..r as usize]);
            got += r as usize;
        }
        close(s);
        (got, hex(&hasher.finalize()))
    });
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sent = 0usize;
    while sent < total {
        for w in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        hasher.update(&block);
        let mut off = 0;
        while off < block.len() {
            let r = send(c, &block[off..], 0);
            assert!(r > 0, "send: {}", errno());
            off += r as usize;
        }
        sent += block.len();
    }
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    unsafe { libc::shutdown(c, libc::SHUT_WR) };
    let (got, digest) = h.join().unwrap();
    println!("sent {sent} sha256 {}", hex(&hasher.finalize()));
    println!("received {got} sha256 {digest}");
    close(c);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn dup_and_fcntl() {
    let (c, s) = pair();
    // SAFETY: dup calls on our fds.
    let d = unsafe { libc::dup(c) };
    close(c);
    t("send on dup after closing original", send(d, b"dup", 0));
    recv_trace("recv", s, 10, 0);
    // SAFETY: integers only, no memory passed; the kernel checks the fds.
    let d2 = unsafe { libc::fcntl(d, libc::F_DUPFD_CLOEXEC, 100) };
    println!("F_DUPFD_CLOEXEC >= 100: {}", d2 >= 100);
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    println!("FD_CLOEXEC: {}", unsafe { libc::fcntl(d2, libc::F_GETFD) } & libc::FD_CLOEXEC);
    let target = 150;
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("dup2", (unsafe { libc::dup2(d2, target) } == target) as isize);
    close(d);
    close(d2);
    t("send on dup2 target", send(target, b"two", 0));
    recv_trace("recv", s, 10, 0);
    close(target);
    std::thread::sleep(Duration::from_millis(50));
    recv_trace("recv EOF after last close", s, 10, 0);
    t("send on closed fd", send(target, b"x", 0));
    close(s);
}

fn udp_socket() -> (c_int, u16) {
    // SAFETY: p/l describe a, a live sockaddr_in of that length; the rest are integers.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let a = loopback(0);
        let (p, l) = sa(&a);
        assert_eq!(libc::bind(fd, p, l), 0);
        (fd, port_of(fd))
    }
}

fn sendto(fd: c_int, data: &[u8], port: u16) -> isize {
    let a = loopback(port);
    let (p, l) = sa(&a);
    // SAFETY: live buffer and address.
    unsafe { libc::sendto(fd, data.as_ptr().cast(), data.len(), 0, p, l) }
}

fn udp() {
    let (a, pa) = udp_socket();
    let (b, pb) = udp_socket();
    t("sendto one", sendto(b, b"one", pa));
    t("sendto two", sendto(b, b"two-longer", pa));
    t("sendto three", sendto(b, b"three", pa));
    println!("poll: {}", poll1(a, libc::POLLIN, 1000));
    let mut from = loopback(0);
    let mut flen = std::mem::size_of::<sockaddr_in>() as socklen_t;
    let mut buf = [0u8; 100];
    // SAFETY: live buffers.
    let r = unsafe {
        libc::recvfrom(a, buf.as_mut_ptr().cast(), 100, 0, (&mut from as *mut sockaddr_in).cast(), &mut flen)
    };
    println!(
        "recvfrom: {r} {:?} from sender: {} len {flen}",
        String::from_utf8_lossy(&buf[..r.max(0) as usize]),
        u16::from_be(from.sin_port) == pb
    );
    t("recv MSG_TRUNC into 3 bytes", recv(a, &mut buf[..3], libc::MSG_TRUNC));
    let mut small = [0u8; 2];
    let iov = [libc::iovec { iov_base: small.as_mut_ptr().cast(), iov_len: 2 }];
    // SAFETY: libc::msghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_ptr() as *mut _;
    m.msg_iovlen = 1;
    // SAFETY: live msghdr.
    t("recvmsg truncating", unsafe { libc::recvmsg(a, &mut m, 0) });
    println!("msg_flags MSG_TRUNC: {} data {:?}", m.msg_flags & libc::MSG_TRUNC != 0, String::from_utf8_lossy(&small));
    recv_trace("recv empty DONTWAIT", a, 10, libc::MSG_DONTWAIT);
    t("connect b to a", connect_to(b, pa));
    t("send connected", send(b, b"conn", 0));
    recv_trace("recv connected", a, 10, 0);
    let mut peer = loopback(0);
    let mut plen = std::mem::size_of::<sockaddr_in>() as socklen_t;
    // SAFETY: live sockaddr.
    unsafe { libc::getpeername(b, (&mut peer as *mut sockaddr_in).cast(), &mut plen) };
    println!("getpeername matches: {}", u16::from_be(peer.sin_port) == pa);
    let (c, _) = udp_socket();
    t("connect to closed port", connect_to(c, closed_port()));
    t("send to closed port", send(c, b"x", 0));
    std::thread::sleep(Duration::from_millis(50));
    recv_trace("recv after ICMP", c, 10, libc::MSG_DONTWAIT);
    println!("SO_ERROR: {}", so_error(c));
    let big = vec![7u8; 70000];
    t("sendto oversized", sendto(a, &big, pb));
    [a, b, c].into_iter().for_each(close);
}

fn wait_child(pid: libc::pid_t) -> c_int {
    let mut st = 0;
    // SAFETY: &mut st is a live c_int for the call; pid is our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    st
}

/// Prefork servers: children accept on a listener created before fork.
fn fork_accept() {
    let (l, port) = listener();
    let mut kids = Vec::new();
    for _ in 0..2 {
        // SAFETY: the child only makes socket calls and exits with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            for _ in 0..2 {
                // SAFETY: null address and length: accept(2) allows them when no peer address is
                // wanted, so no memory is passed; the kernel checks the fd.
                let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
                if s < 0 {
                    // SAFETY: _exit ends the forked child at once, without running the parent's
                    // destructors or atexit handlers on state the child only copied.
                    unsafe { libc::_exit(3) };
                }
                send(s, b"from child", 0);
                close(s);
            }
            // SAFETY: _exit ends the forked child at once, without running the parent's destructors
            // or atexit handlers on state the child only copied.
            unsafe { libc::_exit(0) };
        }
        kids.push(pid);
    }
    let mut answers = 0;
    for _ in 0..4 {
        let c = tcp();
        connect_to(c, port);
        let mut buf = [0u8; 32];
        if recv(c, &mut buf, libc::MSG_WAITALL) == 10 && &buf[..10] == b"from child" {
            answers += 1;
        }
        close(c);
    }
    let codes: Vec<c_int> = kids.into_iter().map(wait_child).collect();
    println!("answers from children: {answers}, exit statuses {codes:?}");
    close(l);
}

/// Postgres-style hand-off: the parent accepts, forks, and closes its copy; the child serves.
fn fork_handoff() {
    let (l, port) = listener();
    let c = tcp();
    connect_to(c, port);
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    // SAFETY: the child only makes socket calls and exits with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 16];
        let n = recv(s, &mut buf, 0);
        send(s, &buf[..n.max(0) as usize], 0);
        send(s, b"!", 0);
        close(s);
        // SAFETY: _exit ends the forked child at once, without running the parent's destructors or
        // atexit handlers on state the child only copied.
        unsafe { libc::_exit(0) };
    }
    close(s);
    close(l);
    t("send to child", send(c, b"ping", 0));
    recv_trace("echo from child", c, 5, libc::MSG_WAITALL);
    recv_trace("EOF after child closes", c, 5, 0);
    println!("child status {}", wait_child(pid));
    close(c);
}

/// The process that opened the sockets exits; its forked child keeps using them.
fn fork_parent_exits() {
    let mut pipe = [0; 2];
    // SAFETY: live array.
    unsafe { libc::pipe(pipe.as_mut_ptr()) };
    // SAFETY: the children only make socket calls and exit with _exit.
    let a = unsafe { libc::fork() };
    if a == 0 {
        let (c, s) = pair();
        // SAFETY: the grandchild, like its parent, only makes socket calls and leaves with _exit,
        // touching no state that fork left inconsistent (a single-threaded probe at this point).
        let b = unsafe { libc::fork() };
        if b == 0 {
            std::thread::sleep(Duration::from_millis(300));
            send(c, b"still here", 0);
            let mut buf = [0u8; 10];
            let n = recv(s, &mut buf, libc::MSG_WAITALL);
            let msg: &[u8] = if n == 10 && &buf == b"still here" { b"ok" } else { b"no" };
            // SAFETY: pipe write, then leaving.
            unsafe {
                libc::write(pipe[1], msg.as_ptr().cast(), 2);
                libc::_exit(0);
            }
        }
        // SAFETY: the attaching process leaves at once.
        unsafe { libc::_exit(0) };
    }
    wait_child(a);
    close(pipe[1]);
    let mut buf = [0u8; 2];
    // SAFETY: buf is a live local array of the 2 bytes asked for.
    let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), 2) };
    println!("grandchild after its parent exited: {n} {:?}", String::from_utf8_lossy(&buf[..n.max(0) as usize]));
    close(pipe[0]);
}

/// shutdown() from another thread wakes a blocked recv and accept, as on Linux.
fn threads() {
    let (c, s) = pair();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        recv(s, &mut buf, 0)
    });
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    unsafe { libc::shutdown(s, libc::SHUT_RD) };
    println!("blocked recv after shutdown(SHUT_RD) from another thread: {}", h.join().unwrap());
    let (l, _) = listener();
    let h = std::thread::spawn(move || {
        // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so
        // no memory is passed; the kernel checks l.
        let r = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
        (r, errno())
    });
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    unsafe { libc::shutdown(l, libc::SHUT_RDWR) };
    let (r, e) = h.join().unwrap();
    println!("blocked accept after shutdown: {r} {}", ename(e));
    // Two threads blocked on two sockets at once.
    let (c2, s2) = pair();
    let h1 = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        recv(s2, &mut b, libc::MSG_WAITALL)
    });
    let h2 = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        recv(c, &mut b, libc::MSG_WAITALL)
    });
    std::thread::sleep(Duration::from_millis(50));
    send(c2, b"abcd", 0);
    send(s, b"wxyz", 0);
    println!("two blocked threads: {} {}", h1.join().unwrap(), h2.join().unwrap());
    [c, s, l, c2, s2].into_iter().for_each(close);
}

/// sendfile from a file to a socket, with and without an explicit offset.
fn sendfile_scenario() {
    let path = std::env::temp_dir().join(format!("nk-probe-sendfile-{}", std::process::id()));
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: cpath is a NUL-terminated CString that outlives the call.
    let f = unsafe { libc::open(cpath.as_ptr(), libc::O_RDONLY) };
    let (c, s) = pair();
    let h = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        loop {
            let r = recv(s, &mut buf, 0);
            if r <= 0 {
                break;
            }
            hasher.update(&buf[..r as usize]);
            got += r;
        }
        close(s);
        (got, hex(&hasher.finalize()))
    });
    let mut off: libc::off_t = 1000;
    // SAFETY: live offset.
    t("sendfile with offset", unsafe { libc::sendfile(c, f, &mut off, 2_000_000) });
    println!("offset after: {off}");
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    println!("file position untouched: {}", unsafe { libc::lseek(f, 0, libc::SEEK_CUR) });
    // SAFETY: null offset: the file position moves.
    t("sendfile at file position", unsafe { libc::sendfile(c, f, std::ptr::null_mut(), 500_000) });
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    println!("file position after: {}", unsafe { libc::lseek(f, 0, libc::SEEK_CUR) });
    let mut end: libc::off_t = 2_999_000;
    // SAFETY: live offset; fewer bytes remain than asked.
    t("sendfile past end", unsafe { libc::sendfile(c, f, &mut end, 10_000) });
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    unsafe { libc::shutdown(c, libc::SHUT_WR) };
    let (got, digest) = h.join().unwrap();
    println!("received {got} sha256 {digest}");
    close(c);
    close(f);
    let _ = std::fs::remove_file(&path);
}

/// A close-on-exec socket leaves with the image of a child that execs: when the parent then
/// closes it, the peer sees EOF although the exec'd child still runs.
fn exec_cloexec() {
    let (c, s) = pair();
    // SAFETY: integers only, no memory passed; the kernel checks the fd.
    unsafe { libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the child only execs.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let prog = std::ffi::CString::new("/bin/sleep").unwrap();
        let arg = std::ffi::CString::new("1").unwrap();
        let argv = [prog.as_ptr(), arg.as_ptr(), std::ptr::null()];
        // SAFETY: valid argv; exits via _exit if exec fails.
        unsafe {
            libc::execv(prog.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    close(s);
    println!("peer sees EOF while the exec'd child runs: {}", poll1(c, libc::POLLIN, 500));
    recv_trace("recv", c, 10, 0);
    println!("child status {}", wait_child(pid));
    close(c);
}

/// sendmmsg/recvmmsg on UDP, and splice between pipes and a TCP connection.
fn mmsg_and_splice() {
    let (a, pa) = udp_socket();
    let (b, _) = udp_socket();
    connect_to(b, pa);
    let msgs: [&[u8]; 3] = [b"first", b"second!", b"3"];
    let mut iovs: Vec<libc::iovec> =
        msgs.iter().map(|m| libc::iovec { iov_base: m.as_ptr() as *mut _, iov_len: m.len() }).collect();
    // SAFETY: libc::mmsghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut vec: Vec<libc::mmsghdr> = (0..3).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (v, iov) in vec.iter_mut().zip(iovs.iter_mut()) {
        v.msg_hdr.msg_iov = iov;
        v.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: live vector.
    t("sendmmsg", unsafe { libc::sendmmsg(b, vec.as_mut_ptr(), 3, 0) } as isize);
    println!("sent lens: {:?}", vec.iter().map(|v| v.msg_len).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(50));
    let mut bufs = [[0u8; 16]; 5];
    let mut riovs: Vec<libc::iovec> =
        bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: 16 }).collect();
    // SAFETY: libc::mmsghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut rvec: Vec<libc::mmsghdr> = (0..5).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (v, iov) in rvec.iter_mut().zip(riovs.iter_mut()) {
        v.msg_hdr.msg_iov = iov;
        v.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: live vector.
    let n = t("recvmmsg WAITFORONE", unsafe {
        libc::recvmmsg(a, rvec.as_mut_ptr(), 5, libc::MSG_WAITFORONE, std::ptr::null_mut())
    } as isize);
    for (i, v) in rvec.iter().take(n.max(0) as usize).enumerate() {
        println!("  msg {i}: {:?}", String::from_utf8_lossy(&bufs[i][..v.msg_len as usize]));
    }
    // SAFETY: live vector.
    t("recvmmsg empty DONTWAIT", unsafe {
        libc::recvmmsg(a, rvec.as_mut_ptr(), 5, libc::MSG_DONTWAIT, std::ptr::null_mut())
    } as isize);
    close(a);
    close(b);

    let (c, s) = pair();
    let (mut p1, mut p2) = ([0; 2], [0; 2]);
    // SAFETY: live arrays; pipe I/O on our pipes.
    unsafe {
        libc::pipe(p1.as_mut_ptr());
        libc::pipe(p2.as_mut_ptr());
        libc::write(p1[1], b"spliced bytes".as_ptr().cast(), 13);
        t("splice pipe -> socket", libc::splice(p1[0], std::ptr::null_mut(), c, std::ptr::null_mut(), 100, 0));
        std::thread::sleep(Duration::from_millis(50));
        t("splice socket -> pipe", libc::splice(s, std::ptr::null_mut(), p2[1], std::ptr::null_mut(), 100, 0));
        let mut out = [0u8; 32];
        let n = libc::read(p2[0], out.as_mut_ptr().cast(), 32);
        println!("pipe got: {:?}", String::from_utf8_lossy(&out[..n.max(0) as usize]));
        nonblock(s);
        t(
            "splice empty non-blocking socket",
            libc::splice(s, std::ptr::null_mut(), p2[1], std::ptr::null_mut(), 100, 0),
        );
        for fd in p1.into_iter().chain(p2) {
            close(fd);
        }
    }
    close(c);
    close(s);
}

/// Many small writes, then an immediate close (and, in a child, an immediate exit): every byte
/// still arrives, in order.
fn small_writes() {
    let pattern = |i: usize, len: usize| -> Vec<u8> { (0..len).map(|j| ((i * 31 + j) % 251) as u8).collect() };
    let writer = |c: c_int| {
        for i in 0..3000usize {
            let len = if i % 10 == 0 { 20_000 } else { 100 + i % 400 };
            let data = pattern(i, len);
            let mut off = 0;
            while off < data.len() {
                let r = send(c, &data[off..], 0);
                assert!(r > 0, "send: {}", errno());
                off += r as usize;
            }
        }
    };
    let reader = |s: c_int| {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        loop {
            let r = recv(s, &mut buf, 0);
            if r <= 0 {
                break;
            }
            h.update(&buf[..r as usize]);
            got += r as usize;
        }
        (got, hex(&h.finalize()))
    };
    let (c, s) = pair();
    let h = std::thread::spawn(move || reader(s));
    writer(c);
    close(c);
    let (got, digest) = h.join().unwrap();
    println!("after close: received {got} sha256 {digest}");
    close(s);
    let (c, s) = pair();
    // SAFETY: the child writes and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        close(s);
        writer(c);
        // SAFETY: leaving at once, without closing: the process exit closes the socket.
        unsafe { libc::_exit(0) };
    }
    close(c);
    let (got, digest) = reader(s);
    println!("after the writer exited: received {got} sha256 {digest}");
    wait_child(pid);
    close(s);
}

fn cstrings(args: &[&str]) -> Vec<std::ffi::CString> {
    args.iter().map(|a| std::ffi::CString::new(*a).unwrap()).collect()
}

fn ptrs(v: &[std::ffi::CString]) -> Vec<*const libc::c_char> {
    v.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

fn me() -> String {
    std::env::current_exe().unwrap().to_string_lossy().into_owned()
}

/// The exec'd side of the inetd scenarios: a program that talks over stdin/stdout, which are
/// the connection it inherited.
fn stdio_echo() {
    let mut buf = [0u8; 64];
    // SAFETY: live buffer; fd 0 is the inherited connection.
    let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    let mut reply = b"echo: ".to_vec();
    reply.extend_from_slice(&buf[..n.max(0) as usize]);
    // SAFETY: live buffer; fd 1 is the same connection.
    unsafe { libc::write(1, reply.as_ptr().cast(), reply.len()) };
    // SAFETY: leaving; the connection closes with the process.
    unsafe { libc::_exit(if n > 0 { 0 } else { 3 }) };
}

/// The same through C stdio: a line from stdin with fgets, the answer with printf.
fn c_stdio_echo() {
    extern "C" {
        static stdin: *mut libc::FILE;
        static stdout: *mut libc::FILE;
    }
    let mut buf = [0 as libc::c_char; 64];
    // SAFETY: glibc's standard streams; buf is a live buffer of its length.
    unsafe {
        if libc::fgets(buf.as_mut_ptr(), buf.len() as c_int, stdin).is_null() {
            libc::_exit(3);
        }
        libc::printf(c"stdio: %s".as_ptr(), buf.as_ptr());
        libc::fflush(stdout);
        libc::_exit(0);
    }
}

/// inetd: the server accepts, forks, the child dup2()s the connection onto 0 and 1 and execs a
/// program that talks over them (with read/write, then with C stdio); the server closes its copy
/// at once.
fn exec_inherit() {
    for helper in ["stdio_echo", "c_stdio_echo"] {
        exec_inherit_with(helper, "execv");
    }
}

/// The same hand-off through the variadic exec calls, which glibc implements on its internal
/// execve.
fn execl_family() {
    for via in ["execl", "execlp", "execle"] {
        println!("{via}:");
        exec_inherit_with("stdio_echo", via);
    }
}

extern "C" {
    static environ: *const *const libc::c_char;
}

fn exec_inherit_with(helper: &str, via: &str) {
    let (l, port) = listener();
    let c = tcp();
    connect_to(c, port);
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    let args = cstrings(&[&me(), helper]);
    let argv = ptrs(&args);
    let null: *const libc::c_char = std::ptr::null();
    // SAFETY: the child only dup2()s and execs.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: valid argv, NULL-terminated variadic lists; exits via _exit if exec fails.
        unsafe {
            libc::dup2(s, 0);
            libc::dup2(s, 1);
            libc::close(s);
            libc::close(l);
            match via {
                "execl" => libc::execl(argv[0], argv[0], argv[1], null),
                "execlp" => libc::execlp(argv[0], argv[0], argv[1], null),
                "execle" => libc::execle(argv[0], argv[0], argv[1], null, environ),
                _ => libc::execv(argv[0], argv.as_ptr()),
            };
            libc::_exit(127);
        }
    }
    close(s);
    t("send to exec'd child", send(c, b"ping\n", 0));
    recv_trace("reply", c, if helper == "stdio_echo" { 11 } else { 12 }, libc::MSG_WAITALL);
    recv_trace("EOF after the child exits", c, 10, 0);
    println!("child status {}", wait_child(pid));
    close(c);
    close(l);
}

/// The same hand-off with vfork: the child shares the parent's memory until it execs.
fn vfork_exec() {
    let (l, port) = listener();
    let c = tcp();
    connect_to(c, port);
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    let args = cstrings(&[&me(), "stdio_echo"]);
    let argv = ptrs(&args);
    // vfork is what programs (python's subprocess, shells) use; the child only dup2()s, execs
    // or _exits with everything it needs computed beforehand, so it clobbers nothing.
    // SAFETY: the vfork child shares our memory and stack until it execs, so it must not return or
    // clobber them: it only dup2()s, execs and _exits, with argv built beforehand and alive in our
    // frame.
    #[allow(deprecated)]
    let pid = unsafe { libc::vfork() };
    if pid == 0 {
        // SAFETY: argv is a NULL-terminated array of live C strings built beforehand; dup2 and
        // execv touch nothing of ours, and _exit leaves without running our destructors.
        unsafe {
            libc::dup2(s, 0);
            libc::dup2(s, 1);
            libc::execv(argv[0], argv.as_ptr());
            libc::_exit(127);
        }
    }
    close(s);
    t("send to vfork+exec'd child", send(c, b"pong", 0));
    recv_trace("reply", c, 10, libc::MSG_WAITALL);
    recv_trace("EOF after the child exits", c, 10, 0);
    println!("child status {}", wait_child(pid));
    // The parent's sockets are untouched by what the vfork child did.
    let c2 = tcp();
    t("connect again", connect_to(c2, port));
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s2 = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    t("send on a new connection", send(c2, b"x", 0));
    recv_trace("recv on it", s2, 1, 0);
    close(s2);
    close(c2);
    close(c);
    close(l);
}

fn spawn(args: &[&str], fa: *const libc::posix_spawn_file_actions_t) -> libc::pid_t {
    let args = cstrings(args);
    let argv = ptrs(&args);
    extern "C" {
        static environ: *const *mut libc::c_char;
    }
    let mut pid = 0;
    // SAFETY: valid argv and environment.
    let r = unsafe { libc::posix_spawn(&mut pid, argv[0], fa, std::ptr::null(), argv.as_ptr() as _, environ) };
    assert_eq!(r, 0, "posix_spawn: {r}");
    pid
}

/// A supervisor passes a listening socket down: posix_spawn a program that accepts on the fd
/// number it is given; the supervisor closes its copy at once.
fn spawn_listener() {
    let (l, port) = listener();
    let pid = spawn(&[&me(), "accept_on", &l.to_string()], std::ptr::null());
    close(l);
    for i in 0..2 {
        let c = tcp();
        t(&format!("connect {i}"), connect_to(c, port));
        recv_trace("greeting", c, 32, libc::MSG_WAITALL);
        close(c);
    }
    println!("child status {}", wait_child(pid));
}

/// posix_spawn with a dup2 file action: a close-on-exec connection becomes the child's stdin
/// and stdout.
fn spawn_dup2() {
    let (c, s) = pair();
    // SAFETY: integers only, no memory passed; the kernel checks the fd.
    unsafe { libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: file actions are plain data initialised by glibc, destroyed below.
    let mut fa: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
    // SAFETY: fa is zero-initialised storage that posix_spawn_file_actions_init sets up before the
    // other calls use it; s is our fd.
    unsafe {
        libc::posix_spawn_file_actions_init(&mut fa);
        libc::posix_spawn_file_actions_adddup2(&mut fa, s, 0);
        libc::posix_spawn_file_actions_adddup2(&mut fa, s, 1);
    }
    let pid = spawn(&[&me(), "stdio_echo"], &fa);
    // SAFETY: fa was initialised above and is destroyed once, after spawn no longer needs it.
    unsafe { libc::posix_spawn_file_actions_destroy(&mut fa) };
    close(s);
    t("send to spawned child", send(c, b"spawn", 0));
    recv_trace("reply", c, 11, libc::MSG_WAITALL);
    recv_trace("EOF after the child exits", c, 10, 0);
    println!("child status {}", wait_child(pid));
    close(c);
}

/// The spawned side of spawn_listener: accepts twice on an inherited listener.
fn accept_on(fd: c_int) {
    for i in 0..2 {
        // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so
        // no memory is passed; the kernel checks the fd.
        let s = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
        if s < 0 {
            std::process::exit(3);
        }
        send(s, format!("hello {i} from the spawned child").as_bytes(), 0);
        close(s);
    }
}

/// A program exec'd without GuestLib (LD_PRELOAD removed) inherits a connection, after fork and
/// after vfork: the peer sees EOF once that program exits, not before and not never.
fn exec_no_guest() {
    let args = cstrings(&["/bin/sleep", "0.5"]);
    let argv = ptrs(&args);
    let env = cstrings(&["PATH=/usr/bin:/bin"]);
    let envp = ptrs(&env);
    for how in ["fork", "vfork"] {
        let (c, s) = pair();
        // SAFETY: the child only dup2()s and execs (or _exits), with everything computed before.
        #[allow(deprecated)]
        let pid = unsafe {
            if how == "fork" {
                libc::fork()
            } else {
                libc::vfork()
            }
        };
        if pid == 0 {
            // SAFETY: valid argv and envp; exits via _exit if exec fails.
            unsafe {
                libc::dup2(s, 0);
                libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        close(s);
        println!("{how}: while the child runs: {}", poll1(c, libc::POLLIN, 200));
        println!("{how}: child status {}", wait_child(pid));
        println!("{how}: after it exits: {}", poll1(c, libc::POLLIN, 2000));
        recv_trace("recv", c, 10, 0);
        close(c);
    }
}

/// Which addresses each end reports: a connect to the unspecified address, a dual-stack IPv6
/// listener reached over IPv4 and over IPv6, an IPv6 client of an IPv4 listener (v4-mapped).
fn addresses() {
    use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    let show = |label: &str, c: &TcpStream, s: &TcpStream, from: SocketAddr| {
        let (cl, cp) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let (sl, sp) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        println!(
            "{label}: client {} -> {}; server {} <- {} (accept said the same: {}; ports pair up: {})",
            cl.ip(),
            cp.ip(),
            sl.ip(),
            sp.ip(),
            from == sp,
            cl.port() == sp.port() && cp.port() == sl.port()
        );
    };
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let c = TcpStream::connect(("0.0.0.0", port)).unwrap();
    let (s, from) = l.accept().unwrap();
    show("connect to 0.0.0.0", &c, &s, from);
    let l6 = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
    let port6 = l6.local_addr().unwrap().port();
    let c = TcpStream::connect(("127.0.0.1", port6)).unwrap();
    let (s, from) = l6.accept().unwrap();
    show("IPv4 client, [::] listener", &c, &s, from);
    let c = TcpStream::connect((Ipv6Addr::LOCALHOST, port6)).unwrap();
    let (s, from) = l6.accept().unwrap();
    show("IPv6 client, [::] listener", &c, &s, from);
    let c = TcpStream::connect(("::ffff:127.0.0.1", port)).unwrap();
    let (s, from) = l.accept().unwrap();
    show("v4-mapped client, 0.0.0.0 listener", &c, &s, from);
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = TcpStream::connect(("127.0.0.2", l4.local_addr().unwrap().port()));
    println!("connect to 127.0.0.2 with a listener on 127.0.0.1 only: {:?}", r.map(|_| ()).map_err(|e| e.kind()));
}

include!("scenarios.rs");

/// A differential scenario (scenarios.rs): what the conformance test runs natively and under
/// GuestLib.
struct Scenario {
    name: &'static str,
    run: fn(),
}

macro_rules! table {
    ($($name:ident => $run:expr, tcp: $tcp:expr;)*) => {
        &[$(Scenario { name: stringify!($name), run: || $run }),*]
    };
}

const SCENARIOS: &[Scenario] = scenarios!(table);

/// The probe's `i`th argument as a number.
fn arg<T: std::str::FromStr>(i: usize) -> Option<T> {
    std::env::args().nth(i).and_then(|a| a.parse().ok())
}

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if let Some(s) = SCENARIOS.iter().find(|s| s.name == name) {
        return (s.run)();
    }
    // Helpers the scenarios start as programs of their own, and the list.
    match name.as_str() {
        "stdio_echo" => stdio_echo(),
        "c_stdio_echo" => c_stdio_echo(),
        "sockbuf_fill" => println!("{}", fill(arg(2).unwrap_or(0), arg(3).unwrap_or(0)).1),
        "accept_on" => accept_on(arg(2).unwrap_or(-1)),
        "list" => SCENARIOS.iter().for_each(|s| println!("{}", s.name)),
        other => {
            eprintln!("unknown scenario {other:?}");
            std::process::exit(2);
        }
    }
}

// ---- The Linux corners: ancillary data, urgent data, buffer sizes, names after a reset, the
// first send to a closed peer, loopback readiness right after a send.

fn setopt_int(fd: c_int, level: c_int, name: c_int, v: c_int) -> isize {
    // SAFETY: v is a live int.
    unsafe { libc::setsockopt(fd, level, name, (&v as *const c_int).cast(), 4) as isize }
}

fn getopt_int(fd: c_int, level: c_int, name: c_int) -> String {
    let mut v: c_int = 0;
    let mut l = 4 as socklen_t;
    // SAFETY: v/l describe a live int.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut c_int).cast(), &mut l) };
    if r < 0 {
        format!("-1 {}", ename(errno()))
    } else {
        format!("{v} len {l}")
    }
}

/// A timestamp cmsg's payload, checked against the clock instead of printed.
fn near_now(secs: i64, frac_ns: i64) -> bool {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let t = secs as f64 + frac_ns as f64 / 1e9;
    (now.as_secs_f64() - t).abs() < 1.0
}

/// Prints each control message of `m`: level, type, length and payload (timestamps as whether
/// they are present and within a second of now).
fn print_cmsgs(label: &str, m: &libc::msghdr) {
    println!(
        "{label}: controllen {} flags CTRUNC={} TRUNC={} OOB={}",
        m.msg_controllen,
        m.msg_flags & libc::MSG_CTRUNC != 0,
        m.msg_flags & libc::MSG_TRUNC != 0,
        m.msg_flags & libc::MSG_OOB != 0
    );
    // SAFETY: the kernel (or GuestLib) laid the control buffer out as cmsgs within
    // msg_controllen; CMSG_* walk it without leaving it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let n = (*c).cmsg_len as usize - (data as usize - c as usize);
            let bytes = std::slice::from_raw_parts(data, n);
            let what = match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMP) => {
                    let tv = std::ptr::read_unaligned(data.cast::<libc::timeval>());
                    format!("timestamp near now: {}", near_now(tv.tv_sec, tv.tv_usec * 1000))
                }
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                    let ts = std::ptr::read_unaligned(data.cast::<libc::timespec>());
                    format!("timestampns near now: {}", near_now(ts.tv_sec, ts.tv_nsec))
                }
                _ => hex(bytes),
            };
            println!("  cmsg level {} type {} len {}: {what}", (*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len);
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
}

/// Linux turns receive timestamps on for the whole host from a work queue after the first
/// socket asks (net_enable_timestamp): until then packets arrive unstamped and carry no cmsg.
fn timestamps_on() {
    std::thread::sleep(Duration::from_millis(50));
}

/// recvmsg into a data buffer of `n` bytes and a control buffer of `control` bytes (None: a
/// null pointer), then the trace of what came.
fn recvmsg_trace(label: &str, fd: c_int, n: usize, control: Option<usize>, flags: c_int) {
    let mut data = vec![0u8; n];
    // u64s keep the control buffer aligned for cmsghdr.
    let mut ctl = vec![0u64; control.unwrap_or(0).div_ceil(8)];
    let iov = [libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: n }];
    // SAFETY: libc::msghdr holds integers and raw pointers only: all-zero bytes are a valid value.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_ptr() as *mut _;
    m.msg_iovlen = 1;
    if let Some(c) = control {
        m.msg_control = ctl.as_mut_ptr().cast();
        m.msg_controllen = c;
    }
    // SAFETY: live msghdr and buffers.
    let r = t(label, unsafe { libc::recvmsg(fd, &mut m, flags) });
    if r >= 0 {
        println!("{label} data: {:?}", String::from_utf8_lossy(&data[..(r as usize).min(n)]));
        print_cmsgs(label, &m);
    }
}

fn udp6_socket() -> (c_int, u16) {
    // SAFETY: the zeroed sockaddr_in6 is integers and bytes only, so a valid value; bind gets a
    // pointer to it with its own length, and the rest are integers.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0);
        let mut a: libc::sockaddr_in6 = std::mem::zeroed();
        a.sin6_family = libc::AF_INET6 as u16;
        a.sin6_addr.s6_addr[15] = 1;
        let l = std::mem::size_of::<libc::sockaddr_in6>() as socklen_t;
        assert_eq!(libc::bind(fd, (&a as *const libc::sockaddr_in6).cast(), l), 0);
        let mut b = a;
        let mut bl = l;
        libc::getsockname(fd, (&mut b as *mut libc::sockaddr_in6).cast(), &mut bl);
        (fd, u16::from_be(b.sin6_port))
    }
}

fn sendto6(fd: c_int, data: &[u8], port: u16) -> isize {
    // SAFETY: sockaddr_in6 is plain data; live buffer and address.
    unsafe {
        let mut a: libc::sockaddr_in6 = std::mem::zeroed();
        a.sin6_family = libc::AF_INET6 as u16;
        a.sin6_addr.s6_addr[15] = 1;
        a.sin6_port = port.to_be();
        let l = std::mem::size_of::<libc::sockaddr_in6>() as socklen_t;
        libc::sendto(fd, data.as_ptr().cast(), data.len(), 0, (&a as *const libc::sockaddr_in6).cast(), l)
    }
}

/// sendmsg of `data` to `dest` with one int control message (level, type, value).
fn sendmsg_int(fd: c_int, data: &[u8], dest: (*const sockaddr, socklen_t), level: c_int, ty: c_int, v: c_int) -> isize {
    let mut ctl = [0u64; 4];
    let iov = [libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() }];
    // SAFETY: msghdr is plain data; ctl has room for one int cmsg (CMSG_SPACE(4) = 24 bytes),
    // which CMSG_FIRSTHDR/CMSG_DATA lay out inside it.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_name = dest.0 as *mut _;
        m.msg_namelen = dest.1;
        m.msg_iov = iov.as_ptr() as *mut _;
        m.msg_iovlen = 1;
        m.msg_control = ctl.as_mut_ptr().cast();
        m.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), v);
        libc::sendmsg(fd, &m, 0)
    }
}

fn cmsg_udp() {
    let (a, pa) = udp_socket();
    let (b, _) = udp_socket();
    for (name, opt) in
        [("IP_RECVTOS", libc::IP_RECVTOS), ("IP_PKTINFO", libc::IP_PKTINFO), ("IP_RECVTTL", libc::IP_RECVTTL)]
    {
        t(&format!("setsockopt {name}"), setopt_int(a, libc::IPPROTO_IP, opt, 1));
        println!("getsockopt {name}: {}", getopt_int(a, libc::IPPROTO_IP, opt));
    }
    t("setsockopt SO_TIMESTAMP", setopt_int(a, libc::SOL_SOCKET, libc::SO_TIMESTAMP, 1));
    timestamps_on();
    t("sender IP_TOS 0x28", setopt_int(b, libc::IPPROTO_IP, libc::IP_TOS, 0x28));
    for i in 0..5 {
        t(&format!("sendto {i}"), sendto(b, format!("datagram {i}").as_bytes(), pa));
    }
    recvmsg_trace("recvmsg with room", a, 100, Some(256), 0);
    recvmsg_trace("recvmsg control 24 bytes", a, 100, Some(24), 0);
    recvmsg_trace("recvmsg no control", a, 100, None, 0);
    recvmsg_trace("recvmsg data truncated", a, 4, Some(256), 0);
    recv_trace("plain recv", a, 100, 0);
    t("setsockopt SO_TIMESTAMPNS", setopt_int(a, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1));
    t("sendto 5", sendto(b, b"nanoseconds", pa));
    recvmsg_trace("recvmsg timestampns", a, 100, Some(256), 0);
    recvmsg_trace("recvmsg empty DONTWAIT", a, 100, Some(256), libc::MSG_DONTWAIT);
    // Control messages sent: TOS and TTL for one datagram.
    let dest = loopback(pa);
    t("sendmsg IP_TOS 0x10", sendmsg_int(b, b"tos", sa(&dest), libc::IPPROTO_IP, libc::IP_TOS, 0x10));
    t("sendmsg IP_TTL 9", sendmsg_int(b, b"ttl", sa(&dest), libc::IPPROTO_IP, libc::IP_TTL, 9));
    t("sendmsg bad cmsg", sendmsg_int(b, b"bad", sa(&dest), libc::IPPROTO_IP, 12345, 1));
    recvmsg_trace("recvmsg of sendmsg IP_TOS", a, 100, Some(256), 0);
    recvmsg_trace("recvmsg of sendmsg IP_TTL", a, 100, Some(256), 0);
    [a, b].into_iter().for_each(close);

    let (a, pa) = udp6_socket();
    let (b, _) = udp6_socket();
    for (name, opt) in [
        ("IPV6_RECVHOPLIMIT", libc::IPV6_RECVHOPLIMIT),
        ("IPV6_RECVTCLASS", libc::IPV6_RECVTCLASS),
        ("IPV6_RECVPKTINFO", libc::IPV6_RECVPKTINFO),
    ] {
        t(&format!("setsockopt {name}"), setopt_int(a, libc::IPPROTO_IPV6, opt, 1));
        println!("getsockopt {name}: {}", getopt_int(a, libc::IPPROTO_IPV6, opt));
    }
    t("sender IPV6_TCLASS 0x20", setopt_int(b, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0x20));
    t("sendto6 one", sendto6(b, b"six one", pa));
    t("sendto6 two", sendto6(b, b"six two", pa));
    recvmsg_trace("recvmsg6 with room", a, 100, Some(256), 0);
    recvmsg_trace("recvmsg6 control 40 bytes", a, 100, Some(40), 0);
    // SAFETY: libc::sockaddr_in6 is integers and bytes only, so all-zero bytes are a valid value.
    let mut d6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    d6.sin6_family = libc::AF_INET6 as u16;
    d6.sin6_addr.s6_addr[15] = 1;
    d6.sin6_port = pa.to_be();
    let dest = ((&d6 as *const libc::sockaddr_in6).cast(), std::mem::size_of::<libc::sockaddr_in6>() as socklen_t);
    t("sendmsg IPV6_HOPLIMIT 2", sendmsg_int(b, b"hop", dest, libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, 2));
    recvmsg_trace("recvmsg6 of sendmsg IPV6_HOPLIMIT", a, 100, Some(256), 0);
    [a, b].into_iter().for_each(close);
}

fn cmsg_tcp() {
    let (c, s) = pair();
    t("setsockopt SO_TIMESTAMP", setopt_int(s, libc::SOL_SOCKET, libc::SO_TIMESTAMP, 1));
    t("setsockopt IP_RECVTOS", setopt_int(s, libc::IPPROTO_IP, libc::IP_RECVTOS, 1));
    t("setsockopt IP_PKTINFO", setopt_int(s, libc::IPPROTO_IP, libc::IP_PKTINFO, 1));
    timestamps_on();
    t("send", send(c, b"stamped", 0));
    println!("poll: {}", poll1(s, libc::POLLIN, 1000));
    recvmsg_trace("recvmsg with room", s, 100, Some(256), 0);
    t("send", send(c, b"again", 0));
    println!("poll: {}", poll1(s, libc::POLLIN, 1000));
    recvmsg_trace("recvmsg no control", s, 100, None, 0);
    t("setsockopt SO_TIMESTAMP off", setopt_int(s, libc::SOL_SOCKET, libc::SO_TIMESTAMP, 0));
    t("send", send(c, b"plain", 0));
    println!("poll: {}", poll1(s, libc::POLLIN, 1000));
    recvmsg_trace("recvmsg without timestamps", s, 100, Some(256), 0);
    t("setsockopt SO_TIMESTAMPNS", setopt_int(s, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1));
    t("send", send(c, b"nanos", 0));
    println!("poll: {}", poll1(s, libc::POLLIN, 1000));
    recvmsg_trace("recvmsg timestampns", s, 100, Some(256), 0);
    close(c);
    close(s);
}

fn ioctl_int(fd: c_int, req: u64) -> String {
    let mut v: c_int = -1;
    // SAFETY: these requests write one int.
    let r = unsafe { libc::ioctl(fd, req as _, &mut v) };
    if r < 0 {
        format!("-1 {}", ename(errno()))
    } else {
        format!("{v}")
    }
}

const SIOCATMARK: u64 = 0x8905;

/// poll, epoll and select on `fd` for urgent data, with timeout 0.
fn urgent_readiness(label: &str, fd: c_int) {
    println!("{label} poll: {}", poll1(fd, libc::POLLIN | libc::POLLPRI, 0));
    // SAFETY: a fresh epoll set of our own and live event buffers.
    unsafe {
        let ep = libc::epoll_create1(0);
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLPRI) as u32, u64: 7 };
        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 2];
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 2, 0);
        println!("{label} epoll: {n} events={:#x}", if n > 0 { out[0].events } else { 0 });
        libc::close(ep);
        let mut e: libc::fd_set = std::mem::zeroed();
        libc::FD_ZERO(&mut e);
        libc::FD_SET(fd, &mut e);
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let n = libc::select(fd + 1, std::ptr::null_mut(), std::ptr::null_mut(), &mut e, &mut tv);
        println!("{label} select exceptfds: {n} {}", libc::FD_ISSET(fd, &e));
    }
    println!("{label} SIOCATMARK: {}", ioctl_int(fd, SIOCATMARK));
}

fn oob() {
    let (c, s) = pair();
    t("send ab", send(c, b"ab", 0));
    t("send xyz OOB", send(c, b"xyz", libc::MSG_OOB));
    t("send tail", send(c, b"tail", 0));
    urgent_readiness("urgent pending", s);
    println!("FIONREAD: {}", ioctl_int(s, libc::FIONREAD));
    recv_trace("recv stops at the mark", s, 100, 0);
    urgent_readiness("at the mark", s);
    recv_trace("recv OOB peek", s, 10, libc::MSG_OOB | libc::MSG_PEEK);
    recvmsg_trace("recvmsg OOB", s, 10, Some(64), libc::MSG_OOB);
    recv_trace("recv OOB again", s, 10, libc::MSG_OOB);
    urgent_readiness("urgent read", s);
    recv_trace("recv past the mark", s, 100, 0);
    urgent_readiness("past the mark", s);
    recv_trace("recv OOB with none", s, 10, libc::MSG_OOB);
    nonblock(s);
    t("send Q OOB alone", send(c, b"Q", libc::MSG_OOB));
    urgent_readiness("only the urgent byte", s);
    recv_trace("recv at the mark skips it", s, 10, 0);
    recv_trace("recv OOB after the skip", s, 10, libc::MSG_OOB);
    urgent_readiness("after the skip", s);
    t("send 12", send(c, b"12", 0));
    t("send 3 OOB", send(c, b"3", libc::MSG_OOB));
    t("send 45", send(c, b"45", 0));
    recv_trace("recv to the mark", s, 100, 0);
    recv_trace("recv over the mark", s, 100, 0);
    recv_trace("recv OOB once passed", s, 10, libc::MSG_OOB);
    t("send A OOB", send(c, b"A", libc::MSG_OOB));
    t("send B OOB", send(c, b"B", libc::MSG_OOB));
    urgent_readiness("two urgent bytes", s);
    recv_trace("recv OOB of two", s, 10, libc::MSG_OOB);
    recv_trace("recv after two", s, 10, 0);
    t("SO_OOBINLINE", setopt_int(s, libc::SOL_SOCKET, libc::SO_OOBINLINE, 1));
    println!("getsockopt SO_OOBINLINE: {}", getopt_int(s, libc::SOL_SOCKET, libc::SO_OOBINLINE));
    t("send ab", send(c, b"ab", 0));
    t("send c OOB", send(c, b"c", libc::MSG_OOB));
    t("send d", send(c, b"d", 0));
    urgent_readiness("inline pending", s);
    recv_trace("inline recv to the mark", s, 100, 0);
    urgent_readiness("inline at the mark", s);
    recv_trace("inline recv OOB", s, 10, libc::MSG_OOB);
    recv_trace("inline recv over the mark", s, 100, 0);
    urgent_readiness("inline past the mark", s);
    t("send OOB on the listener side", send(s, b"!", libc::MSG_OOB));
    recv_trace("client recv OOB without SO_OOBINLINE", c, 10, libc::MSG_OOB);
    recv_trace("client recv", c, 10, libc::MSG_DONTWAIT);
    close(c);
    recv_trace("recv OOB after FIN", s, 10, libc::MSG_OOB);
    recv_trace("recv EOF", s, 10, 0);
    close(s);
}

fn addr_trace(label: &str, fd: c_int, peer: bool) {
    let mut a = loopback(0);
    let mut l = std::mem::size_of::<sockaddr_in>() as socklen_t;
    // SAFETY: live sockaddr.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, (&mut a as *mut sockaddr_in).cast(), &mut l)
        } else {
            libc::getsockname(fd, (&mut a as *mut sockaddr_in).cast(), &mut l)
        }
    };
    let e = if r < 0 { errno() } else { 0 };
    println!("{label}: {r} {} len {l} loopback {}", ename(e), a.sin_addr.s_addr == u32::from_ne_bytes([127, 0, 0, 1]));
}

/// tcpi_state, the first byte of TCP_INFO.
fn tcp_state(fd: c_int) -> String {
    let mut info = [0u8; 256];
    let mut l = info.len() as socklen_t;
    // SAFETY: info/l describe a live buffer.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut l) };
    if r < 0 {
        format!("-1 {}", ename(errno()))
    } else {
        info[0].to_string()
    }
}

fn names_after_reset() {
    let (c, s) = pair();
    // SAFETY: integers only, no memory passed; the kernel checks the fds.
    unsafe {
        libc::shutdown(c, libc::SHUT_WR);
        libc::shutdown(s, libc::SHUT_WR);
    }
    println!("poll after both FINs: {}", poll1(c, libc::POLLIN, 1000));
    addr_trace("getpeername after both FINs, first to shut", c, true);
    addr_trace("getpeername after both FINs, second to shut", s, true);
    println!("TCP_INFO state after both FINs: {} {}", tcp_state(c), tcp_state(s));
    [c, s].into_iter().for_each(close);
    let (c, s) = pair();
    addr_trace("getpeername connected", c, true);
    let lin = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: live linger.
    unsafe { libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_LINGER, (&lin as *const libc::linger).cast(), 8) };
    close(s);
    println!("poll after the reset: {}", poll1(c, libc::POLLIN, 1000));
    addr_trace("getpeername after the peer reset", c, true);
    addr_trace("getsockname after the peer reset", c, false);
    println!("TCP_INFO state after the peer reset: {}", tcp_state(c));
    recv_trace("recv after the reset", c, 10, 0);
    addr_trace("getpeername after reading the error", c, true);
    close(c);
    // A send into a reset: the same.
    let (c, s) = pair();
    t("send to be left unread", send(s, b"unread", 0));
    println!("poll: {}", poll1(c, libc::POLLIN, 1000));
    close(c);
    println!("poll after the reset: {}", poll1(s, libc::POLLIN, 1000));
    addr_trace("getpeername after unread bytes reset", s, true);
    close(s);
}

fn send_after_close() {
    let (c, s) = pair();
    close(s);
    t("first send after the peer closed", send(c, b"first", libc::MSG_NOSIGNAL));
    t("second send", send(c, b"second", libc::MSG_NOSIGNAL));
    t("third send", send(c, b"third", libc::MSG_NOSIGNAL));
    println!("SO_ERROR: {}", so_error(c));
    close(c);
    // A larger first send, and the same with write().
    let (c, s) = pair();
    close(s);
    let big = vec![1u8; 100_000];
    t("first large send", send(c, &big, libc::MSG_NOSIGNAL));
    t("then", send(c, b"x", libc::MSG_NOSIGNAL));
    close(c);
    // A half-closed peer (shutdown SHUT_WR) still reads: every send succeeds.
    let (c, s) = pair();
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("peer shutdown SHUT_WR", unsafe { libc::shutdown(s, libc::SHUT_WR) } as isize);
    t("send to a half-closed peer", send(c, b"one", libc::MSG_NOSIGNAL));
    t("send again", send(c, b"two", libc::MSG_NOSIGNAL));
    recv_trace("peer reads", s, 10, libc::MSG_DONTWAIT);
    close(c);
    close(s);
}

fn loopback_sync() {
    let (c, s) = pair();
    // Nagle would hold small sends back while earlier bytes wait for their ACK.
    setopt_int(c, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    setopt_int(s, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    t("small send", send(c, b"ping", 0));
    println!("peer poll 0: {}", poll1(s, libc::POLLIN, 0));
    recv_trace("peer recv DONTWAIT", s, 10, libc::MSG_DONTWAIT);
    println!("peer poll 0 drained: {}", poll1(s, libc::POLLIN, 0));
    t("reply", send(s, b"pong", 0));
    println!("client poll 0: {}", poll1(c, libc::POLLIN, 0));
    recv_trace("client recv DONTWAIT", c, 10, libc::MSG_DONTWAIT);
    let big = vec![2u8; 100_000];
    t("large send", send(c, &big, 0));
    println!("peer poll 0 after a large send: {}", poll1(s, libc::POLLIN, 0));
    let mut buf = vec![0u8; 200_000];
    let mut got = 0;
    while got < big.len() {
        let r = recv(s, &mut buf, 0);
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    println!("peer read {got}");
    for i in 0..20 {
        send(c, format!("m{i:02}").as_bytes(), 0);
        let p = poll1(s, libc::POLLIN, 0);
        let r = recv(s, &mut buf, libc::MSG_DONTWAIT);
        if i % 5 == 0 || r != 3 {
            println!("round {i}: poll {p} recv {r}");
        }
    }
    // select(0) too.
    t("send", send(c, b"sel", 0));
    // SAFETY: libc::fd_set is integers and bytes only, so all-zero bytes are a valid value.
    unsafe {
        let mut r: libc::fd_set = std::mem::zeroed();
        libc::FD_ZERO(&mut r);
        libc::FD_SET(s, &mut r);
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let n = libc::select(s + 1, &mut r, std::ptr::null_mut(), std::ptr::null_mut(), &mut tv);
        println!("select 0: {n} {}", libc::FD_ISSET(s, &r));
    }
    recv_trace("recv", s, 10, 0);
    // epoll_wait(0) too.
    // SAFETY: a fresh epoll set of our own and live event buffers.
    unsafe {
        let ep = libc::epoll_create1(0);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 1 };
        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s, &mut ev);
        t("send", send(c, b"epo", 0));
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 2];
        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 2, 0);
        println!("epoll_wait 0: {n} events={:#x}", if n > 0 { out[0].events } else { 0 });
        libc::close(ep);
    }
    recv_trace("recv", s, 10, 0);
    // shutdown and close are seen at once too.
    // SAFETY: integers and null pointers only (null where no peer address is wanted, which the call
    // allows); no memory passed, and the kernel checks the fds.
    t("shutdown SHUT_WR", unsafe { libc::shutdown(c, libc::SHUT_WR) } as isize);
    println!("peer poll 0 after shutdown: {}", poll1(s, libc::POLLIN | libc::POLLRDHUP, 0));
    close(s);
    println!("client poll 0 after the peer closed: {}", poll1(c, libc::POLLIN | libc::POLLRDHUP, 0));
    close(c);
}

/// Non-blocking sends of 1000 bytes to a peer that never reads, until EAGAIN (or 64 MiB):
/// the total sent. Sender SO_SNDBUF and receiver SO_RCVBUF are set to `snd`/`rcv` if non-zero.
fn fill(snd: c_int, rcv: c_int) -> (bool, usize) {
    let (l, port) = listener();
    let c = tcp();
    if snd > 0 {
        setopt_int(c, libc::SOL_SOCKET, libc::SO_SNDBUF, snd);
    }
    assert_eq!(connect_to(c, port), 0);
    // SAFETY: null address and length: accept(2) allows them when no peer address is wanted, so no
    // memory is passed; the kernel checks l.
    let s = unsafe { libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut()) };
    if rcv > 0 {
        setopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF, rcv);
    }
    nonblock(c);
    let chunk = [3u8; 1000];
    let mut total = 0usize;
    let mut eagain = false;
    while total < 64 << 20 {
        let r = send(c, &chunk, 0);
        if r < 0 {
            eagain = errno() == libc::EAGAIN;
            break;
        }
        total += r as usize;
    }
    [c, s, l].into_iter().for_each(close);
    (eagain, total)
}

fn sockbuf() {
    let fd = tcp();
    println!("SO_SNDBUF fresh: {}", getopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF));
    println!("SO_RCVBUF fresh: {}", getopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF));
    for v in [32768, 4096, 1, 1 << 20] {
        t(&format!("SO_SNDBUF {v}"), setopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v));
        println!("SO_SNDBUF reads: {}", getopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF));
        t(&format!("SO_RCVBUF {v}"), setopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v));
        println!("SO_RCVBUF reads: {}", getopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF));
    }
    close(fd);
    let (c, s) = pair();
    t("connected SO_SNDBUF 32768", setopt_int(c, libc::SOL_SOCKET, libc::SO_SNDBUF, 32768));
    println!("connected SO_SNDBUF reads: {}", getopt_int(c, libc::SOL_SOCKET, libc::SO_SNDBUF));
    t("accepted SO_RCVBUF 32768", setopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF, 32768));
    println!("accepted SO_RCVBUF reads: {}", getopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF));
    [c, s].into_iter().for_each(close);
    // How much a sender gets buffered before EAGAIN, here and natively (a child without
    // GuestLib): the point need not match to the byte, but it must come and be comparable.
    // GuestLib's asynchronous sends may have a few dozen KiB on their way when the NSM's
    // published mask stops them, which at 8 KiB buffers is about Linux's total again.
    for (snd, rcv) in [(32768, 32768), (32768, 0), (4096, 4096)] {
        let (eagain, total) = fill(snd, rcv);
        let native = std::process::Command::new(me())
            .args(["sockbuf_fill", &snd.to_string(), &rcv.to_string()])
            .env_remove("LD_PRELOAD")
            .output()
            .expect("run the native fill");
        let n: usize = String::from_utf8_lossy(&native.stdout).trim().parse().expect("native total");
        println!(
            "SO_SNDBUF {snd} SO_RCVBUF {rcv}: EAGAIN {eagain}, buffered within [native/3, native*3]: {}",
            total * 3 >= n && total <= n * 3
        );
        if std::env::var_os("NK_PROBE_VERBOSE").is_some() {
            eprintln!("sockbuf {snd}/{rcv}: {total} here, {n} native");
        }
    }
    // A blocking sender blocks: with a send timeout it comes back with what went.
    let (c, s) = pair();
    setopt_int(c, libc::SOL_SOCKET, libc::SO_SNDBUF, 32768);
    let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    // SAFETY: live timeval.
    unsafe { libc::setsockopt(c, libc::SOL_SOCKET, libc::SO_SNDTIMEO, (&tv as *const libc::timeval).cast(), 16) };
    let big = vec![4u8; 8 << 20];
    let start = Instant::now();
    let r = send(c, &big, 0);
    println!(
        "blocking send of 8 MiB: partial {}, waited for the timeout {}",
        r > 0 && (r as usize) < big.len(),
        start.elapsed() >= Duration::from_millis(150)
    );
    [c, s].into_iter().for_each(close);
}
