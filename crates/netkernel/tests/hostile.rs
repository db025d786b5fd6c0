//! Bad input: garbage on the control socket, and guests that write corrupt nqes. The NSM
//! refuses the offender, logs why, and keeps serving everyone else intact.

mod common;
use common::*;
use netkernel_abi::{Op, NQE_COUNT, STATE_DEAD};
use netkernel_ring::region::Region;
use netkernel_ring::sys;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Attaches like GuestLib does, but by hand, so the test can then break the ABI.
struct RawGuest {
    _ctl: UnixStream,
    region: Region,
    nsm_bell: i32,
}

impl RawGuest {
    fn attach(engine: &TestEngine) -> RawGuest {
        let s = UnixStream::connect(&engine.socket).unwrap();
        sys::send_frame(s.as_raw_fd(), br#"{"op":"attach"}"#, &[]).unwrap();
        let (payload, fds) = sys::recv_frame(s.as_raw_fd()).unwrap().unwrap();
        assert_eq!(fds.len(), 3, "attach failed: {}", String::from_utf8_lossy(&payload));
        let region = Region::map(fds[0]).unwrap();
        sys::close(fds[0]);
        RawGuest { _ctl: s, region, nsm_bell: fds[1] }
    }

    fn submit(&self, idx: u32) {
        self.region.ring().push(idx).unwrap();
        sys::ring_bell(self.nsm_bell);
    }

    /// Runs one op through nqe 0 and waits for it: Some(result), None if the region died.
    fn call(&self, op: Op, sock: u32, flags: u32, args: (u64, u64), buf_len: u32, addr: &[u8]) -> Option<i64> {
        let p = self.region.nqe(0);
        // SAFETY: nqe 0 of our own mapping; we are its only user.
        unsafe {
            (*p).op = op as u32;
            (*p).sock = sock;
            (*p).flags = flags;
            (*p).arg0 = args.0;
            (*p).arg1 = args.1;
            (*p).buf_off = self.region.layout().pool_off;
            (*p).buf_len = buf_len;
            (*p).addr_len = addr.len() as u32;
            std::ptr::copy_nonoverlapping(addr.as_ptr(), (*p).addr.as_mut_ptr(), addr.len());
        }
        let state = self.region.nqe_state(0);
        state.store(netkernel_abi::nqe_state::SUBMITTED, Ordering::Release);
        self.submit(0);
        let start = Instant::now();
        while state.load(Ordering::Acquire) != netkernel_abi::nqe_state::DONE {
            if self.region.header().state.load(Ordering::Acquire) == STATE_DEAD
                || start.elapsed() > Duration::from_secs(5)
            {
                return None;
            }
            std::thread::yield_now();
        }
        // SAFETY: DONE: the NSM wrote the result.
        Some(unsafe { std::ptr::read_volatile(&(*p).result) })
    }

    fn refused_within(&self, d: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < d {
            if self.region.header().state.load(Ordering::Acquire) == STATE_DEAD {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

/// A well-behaved guest moving `mib` MiB through one connection while others misbehave.
fn good_bulk(engine: &TestEngine, mib: usize) -> std::process::Child {
    let mut c = engine.run(PROBE, &["bulk", &mib.to_string()]);
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    c.spawn().unwrap()
}

/// The good guest finished, and what arrived is what was sent (sha256 of both ends).
fn assert_intact(good: std::process::Child) {
    let out = good.wait_with_output().unwrap();
    assert!(out.status.success(), "good guest failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let sums: Vec<&str> = text.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(sums.len(), 2, "{text}");
    assert_eq!(sums[0], sums[1], "good guest's bytes were corrupted: {text}");
}

fn corrupt(g: &RawGuest, kind: &str) {
    let p = g.region.nqe(0);
    let pool_end = g.region.layout().pool_off + g.region.layout().pool_size;
    // SAFETY: nqe 0 of our own mapping; the point is to write nonsense into it.
    unsafe {
        (*p).op = Op::Send as u32;
        (*p).buf_off = g.region.layout().pool_off;
        (*p).buf_len = 0;
        (*p).addr_len = 0;
        match kind {
            "opcode" => (*p).op = 999,
            "buffer-before-pool" => (*p).buf_len = 64,
            "buffer-past-pool" => {
                (*p).buf_off = pool_end - 10;
                (*p).buf_len = 64;
            }
            "buffer-overflow" => {
                (*p).buf_off = u64::MAX - 8;
                (*p).buf_len = 64;
            }
            "addr-len" => (*p).addr_len = 4096,
            _ => {}
        }
        if kind == "buffer-before-pool" {
            (*p).buf_off = 0;
        }
    }
    match kind {
        "queue-index" => g.submit(NQE_COUNT + 5),
        "queue-tail" => {
            g.region.ring().tail.store(12345, Ordering::Release);
            sys::ring_bell(g.nsm_bell);
        }
        _ => g.submit(0),
    }
}

const KINDS: [&str; 7] =
    ["opcode", "buffer-before-pool", "buffer-past-pool", "buffer-overflow", "addr-len", "queue-index", "queue-tail"];

#[test]
fn corrupt_nqes_lose_only_the_offenders_attachment() {
    let engine = TestEngine::start();
    let nsm_pid = engine.nsm()["pid"].clone();
    // A well-behaved guest moves 512 MiB while the hostile ones strike.
    let good = good_bulk(&engine, 512);
    std::thread::sleep(Duration::from_millis(200));
    for kind in KINDS {
        let g = RawGuest::attach(&engine);
        corrupt(&g, kind);
        assert!(g.refused_within(Duration::from_secs(5)), "{kind}: NSM did not refuse the guest\n{}", engine.log());
    }
    assert_intact(good);
    let nsm = engine.nsm();
    assert_eq!(nsm["pid"], nsm_pid, "the NSM restarted: {nsm}");
    assert_eq!(nsm["violations"].as_u64(), Some(KINDS.len() as u64), "{nsm}");
    let log = engine.log();
    for why in
        ["unknown opcode 999", "outside the buffer pool", "address length 4096", "past the end", "job queue corrupt"]
    {
        assert!(log.contains(why), "log does not say {why:?}:\n{log}");
    }
}

#[test]
fn garbage_on_the_control_socket_is_refused_and_the_engine_keeps_serving() {
    let engine = TestEngine::start();
    let garbage: [&[u8]; 4] = [
        b"\x07\x00\x00\x00not json",
        b"\xff\xff\xff\xffhuge frame",
        b"\x0b\x00\x00\x00{\"op\":\"x\"}",
        b"GET / HTTP/1.0\r\n\r\n",
    ];
    for g in garbage {
        let mut s = UnixStream::connect(&engine.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(g).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut reply);
        let text = String::from_utf8_lossy(&reply);
        assert!(reply.is_empty() || text.contains("\"ok\":false"), "garbage got a non-error reply: {text}");
    }
    // An attach with fds attached it did not ask for, then disconnect mid-frame.
    {
        let s = UnixStream::connect(&engine.socket).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        sys::send_with_fds(s.as_raw_fd(), b"\x40\x00\x00\x00{\"op\"", &[a.as_raw_fd()]).unwrap();
    }
    assert_eq!(engine.ctl("status")["attachments"], 0);
    let out = output_within(engine.run(PROBE, &["half_close"]), Duration::from_secs(60));
    assert!(out.status.success(), "a guest after the garbage failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(engine.log().contains("garbage on control socket"), "{}", engine.log());
}

fn loopback(port: u16) -> Vec<u8> {
    let mut a = vec![0u8; 16];
    a[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    a[2..4].copy_from_slice(&port.to_be_bytes());
    a[4..8].copy_from_slice(&[127, 0, 0, 1]);
    a
}

#[test]
fn raw_sockets_and_send_floods_are_refused() {
    let engine = TestEngine::start();
    let g = RawGuest::attach(&engine);
    let inet = libc::AF_INET as u64;
    for ty in [libc::SOCK_RAW, libc::SOCK_RAW | libc::SOCK_NONBLOCK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 10] {
        let r = g.call(Op::Socket, 0, 0, (inet, ty as u64), 0, &[]);
        assert_eq!(r, Some(-(libc::EPERM as i64)), "socket type {ty:#x} was not refused");
    }
    // A connection to a listener that never reads, then asynchronous sends past any sane limit.
    let stream = (inet, libc::SOCK_STREAM as u64);
    let l = g.call(Op::Socket, 0, 0, stream, 0, &[]).unwrap() as u32;
    assert_eq!(g.call(Op::Bind, l, 0, (0, 0), 0, &loopback(0)), Some(0));
    assert_eq!(g.call(Op::Listen, l, 16, (0, 0), 0, &[]), Some(0));
    assert_eq!(g.call(Op::GetSockName, l, 0, (0, 0), 0, &[]), Some(0));
    // SAFETY: the NSM wrote the listener's address into nqe 0.
    let port = unsafe {
        let a = std::ptr::read_volatile(&(*g.region.nqe(0)).addr);
        u16::from_be_bytes([a[2], a[3]])
    };
    let c = g.call(Op::Socket, 0, 0, stream, 0, &[]).unwrap() as u32;
    g.call(Op::Connect, c, 0, (0, 0), 0, &loopback(port));
    std::thread::sleep(Duration::from_millis(100));
    let mut sends = 0;
    while g.call(Op::Send, c, netkernel_abi::SEND_ASYNC, (0, 0), netkernel_abi::BUF_SIZE, &[]).is_some() {
        sends += 1;
        assert!(sends < 1000, "the NSM queued {sends} asynchronous sends of 256 KiB without refusing the guest");
    }
    assert!(g.refused_within(Duration::from_secs(5)));
    assert!(engine.log().contains("queues asynchronous sends past"), "{}", engine.log());
    // The NSM still serves others.
    let out = output_within(engine.run(PROBE, &["half_close"]), Duration::from_secs(60));
    assert!(out.status.success());
}

/// The co-located short cut joins two guests' sockets inside the NSM: a hostile peer on such a
/// connection gets exactly the bytes sent to it, and when it breaks the ABI it loses its own
/// attachment while the server it talked to, and everyone else, go on intact.
#[test]
fn a_hostile_colocated_peer_gets_only_its_own_bytes() {
    let engine = TestEngine::start();
    let content: String = (0..200_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let (mut server, port) = engine.http_server("page.txt", &content);
    let good = good_bulk(&engine, 256);
    let g = RawGuest::attach(&engine);
    let inet = libc::AF_INET as u64;
    let c = g.call(Op::Socket, 0, 0, (inet, libc::SOCK_STREAM as u64), 0, &[]).unwrap() as u32;
    assert_eq!(g.call(Op::Connect, c, 0, (0, 0), 0, &loopback(port)), Some(-(libc::EINPROGRESS as i64)));
    assert_eq!(g.call(Op::Connect, c, 0, (0, 0), 0, &loopback(port)), Some(0));
    let conns = engine.ctl("conns");
    let ours = conns.as_array().unwrap().iter().find(|x| x["pid"] == std::process::id() && x["proto"] == "tcp");
    assert_eq!(ours.map(|x| x["path"].clone()), Some("colocated".into()), "{conns}");
    let pool = g.region.layout().pool_off;
    let request = b"GET /page.txt HTTP/1.0\r\n\r\n";
    // SAFETY: the start of our own buffer pool.
    unsafe { std::ptr::copy_nonoverlapping(request.as_ptr(), g.region.pool_ptr(pool, 4096), request.len()) };
    assert_eq!(g.call(Op::Send, c, 0, (0, 0), request.len() as u32, &[]), Some(request.len() as i64));
    let mut reply = Vec::new();
    let start = Instant::now();
    loop {
        let r = g.call(Op::Recv, c, 0, (0, 0), 65536, &[]).unwrap();
        if r == 0 {
            break;
        }
        if r == -(libc::EAGAIN as i64) {
            assert!(start.elapsed() < Duration::from_secs(10), "no reply from the server");
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        assert!(r > 0, "recv: {r}");
        // SAFETY: the NSM wrote r bytes at the start of our pool.
        reply.extend_from_slice(unsafe { std::slice::from_raw_parts(g.region.pool_ptr(pool, r as u32), r as usize) });
    }
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.0 200"), "{}", &text[..text.len().min(200)]);
    assert!(text.ends_with(&content), "the reply is not the page");
    // Now a receive into memory outside its pool: refused, nothing copied anywhere.
    let c2 = g.call(Op::Socket, 0, 0, (inet, libc::SOCK_STREAM as u64), 0, &[]).unwrap() as u32;
    g.call(Op::Connect, c2, 0, (0, 0), 0, &loopback(port));
    g.call(Op::Send, c2, 0, (0, 0), request.len() as u32, &[]);
    let p = g.region.nqe(0);
    // SAFETY: nqe 0 of our own mapping.
    unsafe {
        (*p).op = Op::Recv as u32;
        (*p).sock = c2;
        (*p).buf_off = g.region.layout().pool_off + g.region.layout().pool_size - 10;
        (*p).buf_len = 65536;
        (*p).addr_len = 0;
    }
    g.submit(0);
    assert!(g.refused_within(Duration::from_secs(5)), "the NSM did not refuse the guest\n{}", engine.log());
    // The server and the other guests go on.
    let curl = require("curl");
    let out = output_within(
        {
            let mut c = engine.run(curl.to_str().unwrap(), &["-sS", &format!("http://127.0.0.1:{port}/page.txt")]);
            c.stdout(std::process::Stdio::piped());
            c
        },
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "curl after the hostile peer: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), content);
    assert_intact(good);
    let _ = server.kill();
    let _ = server.wait();
}

/// One request on a connection of its own making, the way ctl sends it: the reply's `ok`.
fn status_on(s: &UnixStream) -> bool {
    sys::send_frame(s.as_raw_fd(), br#"{"op":"status"}"#, &[]).unwrap();
    let (payload, _) = sys::recv_frame(s.as_raw_fd()).unwrap().expect("a reply");
    serde_json::from_slice::<serde_json::Value>(&payload).unwrap()["ok"] == true
}

/// What the engine answered a connection before closing it.
fn reply_then_close(mut s: UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut reply).expect("the engine closes the connection");
    String::from_utf8_lossy(&reply).into_owned()
}

fn engine_threads(engine: &TestEngine) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{}/status", engine.pid())).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

/// Anyone on the host may connect to the engine's control socket. Hundreds of connections that
/// never send anything, garbage, an endless length and half a frame that never finishes must not
/// keep the engine from answering `ctl status` and attaching guests promptly, nor cost a thread
/// each; the half frame is dropped after its time limit, the idle connections are still served.
#[test]
fn idle_connections_garbage_and_half_frames_do_not_stall_the_control_socket() {
    let engine = TestEngine::start();
    let threads_before = engine_threads(&engine);
    let idle: Vec<UnixStream> = (0..500).map(|_| UnixStream::connect(&engine.socket).unwrap()).collect();
    let mut slow = UnixStream::connect(&engine.socket).unwrap();
    slow.write_all(b"\x40\x00\x00\x00{\"op\"").unwrap();
    let slow_since = Instant::now();
    let mut huge = UnixStream::connect(&engine.socket).unwrap();
    huge.write_all(b"\xff\xff\xff\x7f").unwrap();
    let mut junk = UnixStream::connect(&engine.socket).unwrap();
    junk.write_all(b"\x05\x00\x00\x00junk!").unwrap();
    // File descriptors after a request's first byte: each would take a slot in the engine's
    // descriptor table, so they close the connection.
    let late_fds = UnixStream::connect(&engine.socket).unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    sys::send_with_fds(late_fds.as_raw_fd(), b"\x0f\x00\x00\x00{\"op\"", &[a.as_raw_fd()]).unwrap();
    sys::send_with_fds(late_fds.as_raw_fd(), b":\"status\"}", &[a.as_raw_fd()]).unwrap();

    let start = Instant::now();
    assert_eq!(engine.ctl("status")["attachments"], 0);
    let guest = RawGuest::attach(&engine);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "ctl status and an attach took {took:?}\n{}", engine.log());
    let out = output_within(engine.run(PROBE, &["half_close"]), Duration::from_secs(60));
    assert!(out.status.success(), "a guest beside the abuse failed: {}", String::from_utf8_lossy(&out.stderr));

    // Waiting connections cost no thread each (the attached guest keeps one, for life).
    let threads = engine_threads(&engine);
    assert!(threads < threads_before + 20, "{threads} engine threads with 500 idle connections");
    assert!(status_on(&idle[0]) && status_on(&idle[499]), "idle connections are no longer served");
    let huge = reply_then_close(huge);
    assert!(huge.contains("\"ok\":false") && huge.contains("more than the 65536"), "{huge}");
    assert!(reply_then_close(junk).contains("bad request"));
    assert_eq!(reply_then_close(late_fds), "", "a request with late file descriptors was answered");
    let cut = reply_then_close(slow);
    let after = slow_since.elapsed();
    assert!(cut.is_empty(), "{cut}");
    assert!(after >= Duration::from_secs(4) && after < Duration::from_secs(9), "half frame dropped after {after:?}");
    let log = engine.log();
    assert!(log.contains("unfinished") && log.contains("file descriptors past"), "{log}");
    assert!(!guest.refused_within(Duration::from_millis(10)), "the attached guest lost its region");
}

/// Past MAX_WAITING (4096) idle connections the engine closes the ones idle longest instead of
/// running out of file descriptors, and still answers newcomers.
#[test]
fn idle_connections_past_the_cap_make_room_for_new_ones() {
    let engine = TestEngine::start();
    let first = UnixStream::connect(&engine.socket).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let rest: Vec<UnixStream> = (0..4200).map(|_| UnixStream::connect(&engine.socket).unwrap()).collect();
    let fresh = UnixStream::connect(&engine.socket).unwrap();
    assert!(status_on(&fresh));
    assert!(reply_then_close(first).is_empty(), "the connection idle longest was not closed");
    assert!(status_on(rest.last().unwrap()));
    assert!(engine.log().contains("4096 control connections wait; closing"), "{}", engine.log());
}
