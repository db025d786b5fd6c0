//! Scale: 10,000 connections held open at once through one NSM, server and client both under
//! NetKernel (two processes: each end holds 10,000 fds, half the open-files limit). Between
//! guests of one NSM they take the co-located short cut, so the NSM holds one kernel socket per
//! connection (the client's, which keeps its port) instead of two.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

const N: usize = 10_000;

const SERVER: &str = r#"
import selectors, socket, sys
sel = selectors.DefaultSelector()
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(4096)
l.setblocking(False)
sel.register(l, selectors.EVENT_READ)
print(l.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is l:
            while True:
                try:
                    c, _ = l.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            d = c.recv(64)
        except ConnectionError:
            d = b""
        if d:
            c.send(d)
        else:
            sel.unregister(c)
            c.close()
"#;

const CLIENT: &str = r#"
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
def verify(round):
    ok = 0
    for i, s in enumerate(socks):
        msg = b"round %d conn %d" % (round, i)
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = s.recv(64)
            if not d:
                break
            got += d
        ok += got == msg
    return ok
print("open", verify(1), flush=True)
sys.stdin.readline()
print("verified", verify(2), flush=True)
"#;

fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn ten_thousand_connections_through_one_nsm() {
    let python = require("python3");
    let engine = TestEngine::start();
    let nsm_pid = engine.nsm()["pid"].as_u64().unwrap();
    let before = rss_kib(nsm_pid);
    let mut server = engine.run(python.to_str().unwrap(), &["-c", SERVER]);
    server.stdout(Stdio::piped());
    let mut server = server.spawn().unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).unwrap();
    let port = port.trim().to_string();
    assert!(port.parse::<u16>().is_ok(), "server did not start: {port:?}");

    let mut client = engine.run(python.to_str().unwrap(), &["-c", CLIENT, &port, &N.to_string()]);
    client.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut client = client.spawn().unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("open {N}"), "first round of echoes");

    // All of them open at once, as the NSM sees them.
    let nsm = engine.nsm();
    let open = nsm["conns_open"].as_u64().unwrap() as usize;
    assert!(open > 2 * N, "the NSM holds {open} sockets, not both ends of {N} connections: {nsm}");
    // Co-located, but for connects that found the listener's 4096-deep backlog full while the
    // server lagged (a loaded machine): those take the stack path, as designed (D4).
    let colocated = nsm["conns_colocated"].as_u64().unwrap();
    assert!(colocated >= (N as u64) * 9 / 10, "only {colocated} of {N} connections co-located: {nsm}");
    let held = rss_kib(nsm_pid);
    println!(
        "{N} connections held: NSM RSS {before} KiB before, {held} KiB with them: {:.1} KiB per connection",
        (held.saturating_sub(before)) as f64 / N as f64
    );

    writeln!(client.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("verified {N}"), "second round of echoes, after holding them all");
    let status = client.wait().unwrap();
    assert!(status.success());
    let _ = server.kill();
    let _ = server.wait();
}
