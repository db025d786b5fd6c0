//! Guests with many processes, and what they see when their NSM dies: no limit on the processes
//! that share an attachment, nothing kept after they exit, and no call left blocked or spinning
//! once the stack is gone (issue 10, items 1 and 2).

mod common;

use common::{cpu_ticks, descendants, output_within, require, TestEngine};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A native python echo server on 127.0.0.1 (one task per connection, room for thousands);
/// returns it and its port.
fn echo_server() -> (Child, u16) {
    let python = require("python3");
    let script = r#"
import asyncio, sys
async def echo(r, w):
    try:
        while True:
            b = await r.read(65536)
            if not b:
                break
            w.write(b); await w.drain()
    except ConnectionError:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(echo, '127.0.0.1', 0, backlog=4096)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"#;
    let mut child = Command::new(python).args(["-c", script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    (child, line.trim().parse().expect("echo server port"))
}

/// `socat TCP-LISTEN:P,fork` under NetKernel relays 500 native clients, all connected at once,
/// to a native echo server: one forked socat per client, 500 processes sharing the attachment.
#[test]
fn a_forking_relay_serves_500_concurrent_clients() {
    let socat = require("socat");
    let python = require("python3");
    let engine = TestEngine::start();
    let (mut backend, backend_port) = echo_server();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut relay = engine
        .run(
            socat.to_str().unwrap(),
            &[
                &format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024"),
                &format!("TCP:127.0.0.1:{backend_port}"),
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "socat did not listen\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let clients = r#"
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(('127.0.0.1', port), timeout=60) for _ in range(n)]
for i, c in enumerate(conns):
    c.sendall(b'client %05d' % i)
ok = 0
for i, c in enumerate(conns):
    want = b'client %05d' % i
    got = b''
    try:
        while len(got) < len(want):
            b = c.recv(64)
            if not b:
                break
            got += b
    except OSError as e:
        print('client', i, e, file=sys.stderr)
    ok += got == want
print(ok)
"#;
    let mut cmd = Command::new(python);
    cmd.args(["-c", clients, &port.to_string(), "500"]);
    let out = output_within(cmd, Duration::from_secs(120));
    let _ = relay.kill();
    let _ = relay.wait();
    let _ = backend.kill();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "500", "{}", String::from_utf8_lossy(&out.stderr));
}

/// One guest forks 1000 children; each opens its own connection and holds it until all 1000
/// are open, then every one echoes correctly.
#[test]
fn a_guest_forks_1000_children_each_with_its_own_connection() {
    let python = require("python3");
    let engine = TestEngine::start();
    let (mut backend, backend_port) = echo_server();
    let script = r#"
import os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
r, w = os.pipe()          # closed by the parent once every child is connected
done_r, done_w = os.pipe()  # each child reports here
kids = []
for i in range(n):
    p = os.fork()
    if p == 0:
        os.close(w)
        ok = 0
        try:
            c = socket.create_connection(('127.0.0.1', port))
            c.sendall(b'first %d.' % i)
            got = b''
            while not got.endswith(b'.'):
                got += c.recv(64)
            os.write(done_w, b'c')
            os.read(r, 1)  # everyone is connected now
            c.sendall(b'second %d.' % i)
            got2 = b''
            while not got2.endswith(b'.'):
                got2 += c.recv(64)
            ok = got == b'first %d.' % i and got2 == b'second %d.' % i
        except OSError as e:
            os.write(2, b'child %d: %s\n' % (i, str(e).encode()))
        os._exit(0 if ok else 1)
    kids.append(p)
os.close(done_w)
connected = 0
while connected < n:
    b = os.read(done_r, 4096)
    if not b:
        break
    connected += len(b)
print('connected', connected, flush=True)
os.close(w)
good = sum(os.waitpid(p, 0)[1] == 0 for p in kids)
print('echoed', good)
"#;
    let out = output_within(
        engine.run(python.to_str().unwrap(), &["-c", script, &backend_port.to_string(), "1000"]),
        Duration::from_secs(240),
    );
    let _ = backend.kill();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "connected 1000\nechoed 1000",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        engine.log()
    );
}

/// CLOCK_MONOTONIC in seconds: what python's time.monotonic() in a guest reads too.
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The NSM is killed while 100 forked children and 100 threads of one guest are blocked in
/// recv, accept, send and epoll_wait: every call returns within a second, nothing spins
/// afterwards, and a fresh guest connects through the restarted NSM.
#[test]
fn every_blocked_call_returns_within_a_second_when_the_nsm_is_killed() {
    let python = require("python3");
    let engine = TestEngine::start();
    let script = r#"
import os, select, socket, sys, threading, time
KINDS = ['recv', 'accept', 'send', 'epoll']
listener = socket.socket(); listener.bind(('127.0.0.1', 0)); listener.listen(512)
idle = socket.socket(); idle.bind(('127.0.0.1', 0)); idle.listen(8)   # nobody connects
def pair():
    c = socket.create_connection(listener.getsockname()); s, _ = listener.accept()
    return c, s
def block(kind, me):
    c, s = pair()
    try:
        if kind == 'recv':
            c.recv(10)
        elif kind == 'accept':
            idle.accept()
        elif kind == 'send':
            c.setblocking(True)
            while True:
                c.send(b'x' * 65536)
        else:
            ep = select.epoll(); ep.register(c.fileno(), select.EPOLLIN)
            ep.poll(-1)
        res = 'returned'
    except OSError as e:
        res = 'errno%d' % e.errno
    os.write(1, b'%s %s %.6f %s\n' % (me.encode(), kind.encode(), time.monotonic(), res.encode()))
    return c, s
keep = []
gate_r, gate_w = os.pipe()
kids = []
for i in range(100):
    p = os.fork()
    if p == 0:
        os.close(gate_w)
        kept = block(KINDS[i % 4], 'child')
        os.read(gate_r, 1)   # stays alive, not spinning, until the parent ends
        os._exit(0)
    kids.append(p)
def thread_body(i):
    keep.append(block(KINDS[i % 4], 'thread'))
threads = [threading.Thread(target=thread_body, args=(i,), daemon=True) for i in range(100)]
for t in threads:
    t.start()
time.sleep(2)
os.write(1, b'ready\n')
os.read(0, 1)
"#;
    let mut guest = engine.run(python.to_str().unwrap(), &["-c", script]);
    guest.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut guest = guest.spawn().unwrap();
    let mut out = BufReader::new(guest.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "{}", engine.log());
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as i32;
    let killed = monotonic();
    // SAFETY: killing our engine's NSM: the crash under test.
    unsafe { libc::kill(nsm, libc::SIGKILL) };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut returns = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while returns.len() < 200 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => returns.push(l),
            Err(_) => break,
        }
    }
    assert_eq!(returns.len(), 200, "calls still blocked 5 s after the NSM died: {returns:?}");
    for r in &returns {
        let f: Vec<&str> = r.split_whitespace().collect();
        let at: f64 = f[2].parse().unwrap();
        assert!(at - killed < 1.0, "{r}: returned {:.3} s after the kill", at - killed);
        if f[1] != "epoll" {
            assert!(f[3].starts_with("errno"), "{r}: a call on a dead NSM's socket succeeded");
        }
    }
    // Nothing spins: the guest's 201 processes use under 5% of a core over the next 3 s.
    let procs = descendants(guest.id());
    let before: u64 = procs.iter().map(|&p| cpu_ticks(p)).sum();
    std::thread::sleep(Duration::from_secs(3));
    let after: u64 = procs.iter().map(|&p| cpu_ticks(p)).sum();
    // SAFETY: an integer in and out, no memory passed; sysconf cannot misbehave on any name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = (after - before) as f64 / hz / 3.0;
    assert!(share < 0.05, "the guest used {:.1}% of a core after the NSM died", share * 100.0);
    // A fresh guest connects through the restarted NSM within 2 s.
    let (mut backend, port) = echo_server();
    let start = Instant::now();
    let probe = "import socket,sys; c=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); c.sendall(b'hi'); print(c.recv(2).decode())";
    loop {
        let o = output_within(
            engine.run(python.to_str().unwrap(), &["-c", probe, &port.to_string()]),
            Duration::from_secs(5),
        );
        if String::from_utf8_lossy(&o.stdout).trim() == "hi" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "no new connection 2 s after the NSM died\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = backend.kill();
    drop(guest.stdin.take());
    let _ = guest.wait();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 10,000 short processes of one guest (each forked, connecting, exiting without closing) and
/// 200 short guests that attach and exit: the engine's and the NSM's open files and memory are
/// where they were.
#[test]
fn ten_thousand_short_processes_leave_nothing_behind() {
    let python = require("python3");
    let engine = TestEngine::start();
    let churn = r#"
import os, socket, sys
n = int(sys.argv[1])
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1024)
done = 0
while done < n:
    kids = []
    for _ in range(min(50, n - done)):
        p = os.fork()
        if p == 0:
            c = socket.create_connection(l.getsockname())
            c.sendall(b'x')
            os._exit(0)   # exits holding its socket: the NSM releases it
        kids.append(p)
    for _ in kids:
        s, _ = l.accept(); s.recv(1); s.close()
    for p in kids:
        os.waitpid(p, 0)
    done += len(kids)
print(done)
"#;
    let guest = |n: &str| {
        let out = output_within(engine.run(python.to_str().unwrap(), &["-c", churn, n]), Duration::from_secs(600));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), n, "{}", String::from_utf8_lossy(&out.stderr));
    };
    // Warm up: the first attachments grow tables that are then reused.
    guest("500");
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as u32;
    let settle = || std::thread::sleep(Duration::from_millis(500));
    settle();
    let before = (open_fds(engine.pid()), open_fds(nsm), rss_kib(engine.pid()), rss_kib(nsm));
    guest("10000");
    for _ in 0..200 {
        let out = output_within(
            engine.run(python.to_str().unwrap(), &["-c", "import socket; socket.socket()"]),
            Duration::from_secs(30),
        );
        assert!(out.status.success());
    }
    settle();
    let after = (open_fds(engine.pid()), open_fds(nsm), rss_kib(engine.pid()), rss_kib(nsm));
    eprintln!(
        "engine fds {} -> {}, NSM fds {} -> {}, engine RSS {} -> {} KiB, NSM RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1, before.2, after.2, before.3, after.3
    );
    assert_eq!(engine.nsm()["attachments"], 0, "attachments left");
    assert!(after.0 <= before.0 + 2, "engine fds grew: {before:?} -> {after:?}");
    assert!(after.1 <= before.1 + 2, "NSM fds grew: {before:?} -> {after:?}");
    assert!(after.2 <= before.2 + 4096, "engine memory grew: {before:?} -> {after:?}");
    assert!(after.3 <= before.3 + 4096, "NSM memory grew: {before:?} -> {after:?}");
    let _ = std::io::stdout().flush();
}

/// A guest killed with SIGKILL in the middle of a transfer: its peer gets a prefix of exactly
/// what was sent, then the end of the connection, at once; the NSM keeps nothing of the dead
/// guest. On both paths: the peer a guest of the same NSM (co-located) and a native program.
#[test]
fn a_guest_killed_mid_transfer_leaves_its_peer_an_exact_prefix() {
    let python = require("python3");
    let engine = TestEngine::start();
    let receiver = r#"
import socket, sys, time
P = bytes(range(251)) * 4096
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
got, end, last = 0, 'eof', time.monotonic()
while True:
    try:
        b = c.recv(65536)
    except OSError as e:
        end = 'errno%d' % e.errno
        break
    if not b:
        break
    o = got % 251
    if b != P[o:o + len(b)]:
        print('corrupt at', got, flush=True); sys.exit(1)
    got += len(b)
    if got >= 8 << 20 and last:
        print('halfway', flush=True); last = None
print('intact', got > 0, end, flush=True)
"#;
    let sender = r#"
import socket, sys
P = bytes(range(251)) * 4096
c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
sent = 0
while True:
    o = sent % 251
    sent += c.send(P[o:o + 65536])
"#;
    for colocated in [true, false] {
        let mut recv = if colocated {
            engine.run(python.to_str().unwrap(), &["-c", receiver])
        } else {
            let mut c = Command::new(&python);
            c.args(["-c", receiver]);
            c
        };
        let mut recv = recv.stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(recv.stdout.take().unwrap()).lines();
        let port = lines.next().unwrap().unwrap();
        let mut send = engine.run(python.to_str().unwrap(), &["-c", sender, &port]).spawn().unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "halfway");
        let _ = send.kill();
        let killed = Instant::now();
        let _ = send.wait();
        let end = lines.next().unwrap().unwrap();
        let ended = killed.elapsed();
        assert!(end.starts_with("intact True "), "colocated={colocated}: {end}");
        assert!(ended < Duration::from_secs(1), "colocated={colocated}: the peer saw the end after {ended:?}");
        let _ = recv.wait();
        let start = Instant::now();
        while engine.nsm()["attachments"] != 0 {
            assert!(start.elapsed() < Duration::from_secs(2), "the dead guest's attachment stayed: {}", engine.nsm());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
