//! Two testbed hosts (scripts/testbed), each with its own engine and NSM, joined by a veth with
//! a 50 Mbit/s bottleneck: a guest of one host sends to a guest of the other through both NSMs.
//! And the plumbing of the congestion-control experiment (scripts/bench-provider cc): a guest
//! sends through a BBR NSM over linkem.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/testbed");

struct Testbed(String);

impl Testbed {
    fn up(prefix: &str, rate: &str) -> Testbed {
        let out = Command::new("bash").args([TESTBED, "up", prefix, rate]).output().unwrap();
        assert!(out.status.success(), "testbed up: {}", String::from_utf8_lossy(&out.stderr));
        Testbed(prefix.to_string())
    }

    /// The hosts joined by linkem (`netkernel linkem`) with these options.
    fn up_linkem(prefix: &str, opts: &[&str]) -> Testbed {
        let out = Command::new("bash")
            .args([TESTBED, "up-linkem", prefix])
            .args(opts)
            .env("LINKEM", format!("{NETKERNEL} linkem"))
            .output()
            .unwrap();
        assert!(out.status.success(), "testbed up-linkem: {}", String::from_utf8_lossy(&out.stderr));
        Testbed(prefix.to_string())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new("bash").args([TESTBED, "down", &self.0]).status();
    }
}

const RECEIVER: &str = r#"import socket, time, sys
l = socket.create_server(('0.0.0.0', 0))
print(l.getsockname()[1], flush=True)
c, a = l.accept()
n = len(c.recv(65536))
t = time.time()
while time.time() - t < 3:
    d = c.recv(1 << 20)
    if not d:
        break
    n += len(d)
print(a[0], int(n * 8 / (time.time() - t)), flush=True)
"#;

const SENDER: &str = r#"import socket, time
c = socket.create_connection(('10.214.0.2', PORT))
b = b'x' * 65536
t = time.time()
try:
    while time.time() - t < 4.5:
        c.sendall(b)
except OSError:
    pass
"#;

#[test]
fn two_hosts_through_a_bottleneck() {
    if lacks_root("two_hosts_through_a_bottleneck: the testbed needs root") {
        return;
    }
    let python = require("python3");
    let prefix = format!("nktb{}", std::process::id() % 100_000);
    let _tb = Testbed::up(&prefix, "50mbit");
    let h1 = TestEngine::start_in(Some(&format!("{prefix}-h1")), &[]);
    let h2 = TestEngine::start_in(Some(&format!("{prefix}-h2")), &[]);
    // The receiver is a guest of host 2: its socket lives in h2's NSM.
    let mut rx = h2.run(python.to_str().unwrap(), &["-c", RECEIVER]);
    rx.stdout(Stdio::piped());
    let mut rx = rx.spawn().unwrap();
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut port = String::new();
    std::io::BufRead::read_line(&mut out, &mut port).unwrap();
    // The sender is a guest of host 1.
    let tx = output_within(
        h1.run(python.to_str().unwrap(), &["-c", &SENDER.replace("PORT", port.trim())]),
        Duration::from_secs(30),
    );
    assert!(tx.status.success(), "{}", String::from_utf8_lossy(&tx.stderr));
    let mut result = String::new();
    std::io::BufRead::read_line(&mut out, &mut result).unwrap();
    let _ = rx.wait();
    let mut parts = result.split_whitespace();
    let (from, bps) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("0").parse::<f64>().unwrap());
    eprintln!("h1 -> h2 through a 50 Mbit/s bottleneck: {:.1} Mbit/s from {from}", bps / 1e6);
    assert_eq!(from, "10.214.0.1", "the connection should come from host 1's address");
    assert!((30e6..55e6).contains(&bps), "{:.1} Mbit/s through a 50 Mbit/s bottleneck", bps / 1e6);
    assert!(h1.nsm()["bytes_out"].as_u64().unwrap() > 1 << 20, "host 1's NSM did not carry the traffic");
    assert!(h2.nsm()["bytes_in"].as_u64().unwrap() > 1 << 20, "host 2's NSM did not carry the traffic");
}

/// Sends for 3 s, then reports the congestion control its socket uses, as getsockopt tells it.
const CC_SENDER: &str = r#"import socket, time
c = socket.create_connection(('10.214.0.2', PORT))
b = b'x' * 65536
t = time.time()
while time.time() - t < 3:
    c.sendall(b)
print(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b'\0').decode(), flush=True)
"#;

#[test]
fn a_guest_sends_through_a_bbr_nsm_over_linkem() {
    if lacks_root("a_guest_sends_through_a_bbr_nsm_over_linkem: the testbed needs root") {
        return;
    }
    let python = require("python3");
    let prefix = format!("nkbb{}", std::process::id() % 100_000);
    let tb = Testbed::up_linkem(&prefix, &["--delay", "20ms", "--rate", "20mbit", "--loss", "1%"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bbr.toml");
    std::fs::write(
        &cfg,
        "[[nsm]]\nname = \"bbr0\"\ncongestion = \"bbr\"\n\n[[tenant]]\nname = \"t\"\nnsm = \"bbr0\"\n",
    )
    .unwrap();
    let h1 = TestEngine::start_in(Some(&format!("{prefix}-h1")), &["--config", cfg.to_str().unwrap()]);
    assert_eq!(h1.nsm()["congestion"], "bbr", "{}", h1.log());
    // A native receiver in host 2.
    let mut rx = Command::new("ip");
    rx.args(["netns", "exec", &format!("{prefix}-h2")]).arg(&python).args(["-c", RECEIVER]).stdout(Stdio::piped());
    let mut rx = rx.spawn().unwrap();
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut port = String::new();
    std::io::BufRead::read_line(&mut out, &mut port).unwrap();
    let mut tx = h1.run(python.to_str().unwrap(), &["-c", &CC_SENDER.replace("PORT", port.trim())]);
    tx.stdout(Stdio::piped()).stderr(Stdio::piped());
    let tx = tx.spawn().unwrap();
    // While it sends, the engine sees the connection, with the link's round-trip time.
    let remote = format!("10.214.0.2:{}", port.trim());
    let mut seen = None;
    for _ in 0..50 {
        let conns = h1.ctl("conns");
        if let Some(c) =
            conns.as_array().unwrap().iter().find(|c| c["remote"] == remote.as_str() && c["rtt_us"].as_u64() > Some(0))
        {
            seen = Some(c.clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tx = tx.wait_with_output().unwrap();
    assert!(tx.status.success(), "{}", String::from_utf8_lossy(&tx.stderr));
    let conn = seen.unwrap_or_else(|| panic!("ctl conns never showed the connection to {remote}"));
    eprintln!("ctl conns during the transfer: {conn}");
    assert_eq!(conn["nsm"], "bbr0");
    assert!(conn["rtt_us"].as_u64().unwrap() >= 40_000, "RTT below the link's 2 x 20 ms: {conn}");
    assert_eq!(String::from_utf8_lossy(&tx.stdout).trim(), "bbr", "the guest's socket should use the NSM's BBR");
    let mut result = String::new();
    std::io::BufRead::read_line(&mut out, &mut result).unwrap();
    let _ = rx.wait();
    let bps: f64 = result.split_whitespace().nth(1).unwrap_or("0").parse().unwrap();
    eprintln!("through BBR over 20 Mbit/s, 40 ms, 1% loss: {:.1} Mbit/s (not asserted)", bps / 1e6);
    assert!(bps > 0.0, "nothing arrived: {result:?}");
    drop(h1);
    drop(tb);
    let listed =
        String::from_utf8_lossy(&Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).into_owned();
    assert!(!listed.contains(&prefix), "linkem's devices left behind: {listed}");
}

/// Counts what one connection brings, per second ("SECOND BYTES"), after "PORT" and then the
/// peer's address ("from ADDR PORT").
const PER_SECOND: &str = r#"import socket, time
l = socket.create_server(('0.0.0.0', 0))
print(l.getsockname()[1], flush=True)
c, a = l.accept()
print('from', a[0], a[1], flush=True)
c.settimeout(1.0)
start, n, sec = time.time(), 0, 0
while True:
    try:
        d = c.recv(1 << 20)
        if not d:
            break
        n += len(d)
    except socket.timeout:
        pass
    now = int(time.time() - start)
    if now > sec:
        print(sec, n, flush=True)
        sec, n = now, 0
print('end', flush=True)
"#;

/// Sends for 26 s on one connection, then reports its congestion control.
const LONG_SENDER: &str = r#"import socket, time
c = socket.create_connection(('10.214.0.2', PORT))
b = b'x' * 65536
t = time.time()
while time.time() - t < 26:
    c.sendall(b)
print(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b'\0').decode(), flush=True)
"#;

/// Issue 13's move over a long fat lossy link (linkem: 350 ms RTT, 1% loss): a tenant's
/// transfer starts on a CUBIC NSM and moves, connection and all, to a BBR NSM: the receiver sees
/// one connection from one port throughout, its throughput rises to BBR's, and new connections
/// use BBR.
#[test]
fn a_long_transfer_moves_from_a_cubic_nsm_to_a_bbr_nsm() {
    if lacks_root("a_long_transfer_moves_from_a_cubic_nsm_to_a_bbr_nsm: the testbed needs root") {
        return;
    }
    let python = require("python3");
    let prefix = format!("nkmv{}", std::process::id() % 100_000);
    let _tb = Testbed::up_linkem(&prefix, &["--delay", "175ms", "--rate", "20mbit", "--loss", "1%"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("move.toml");
    std::fs::write(
        &cfg,
        "[[nsm]]\nname = \"cubic\"\ncongestion = \"cubic\"\n\n[[nsm]]\nname = \"bbr\"\ncongestion = \"bbr\"\n\n\
         [[tenant]]\nname = \"t\"\nnsm = \"cubic\"\n",
    )
    .unwrap();
    let h1 = TestEngine::start_in(Some(&format!("{prefix}-h1")), &["--config", cfg.to_str().unwrap()]);
    let mut rx = Command::new("ip");
    rx.args(["netns", "exec", &format!("{prefix}-h2")]).arg(&python).args(["-c", PER_SECOND]).stdout(Stdio::piped());
    let mut rx = rx.spawn().unwrap();
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let port = line.trim().to_string();
    let mut tx = h1.run(python.to_str().unwrap(), &["-c", &LONG_SENDER.replace("PORT", &port)]);
    let tx = tx.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let from = line.trim().to_string();
    let mut seconds = Vec::new();
    let mut moved = None;
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 || line.starts_with("end") {
            break;
        }
        let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        seconds.push(v[1]);
        if seconds.len() == 12 {
            let r = h1.ctl_try(&["move", "t", "--to", "bbr"]).unwrap_or_else(|e| panic!("{e}\n{}", h1.log()));
            eprintln!("moved: {r}");
            moved = Some(r);
        }
    }
    let tx = tx.wait_with_output().unwrap();
    let _ = rx.wait();
    assert!(tx.status.success(), "{}", String::from_utf8_lossy(&tx.stderr));
    assert_eq!(String::from_utf8_lossy(&tx.stdout).trim(), "bbr", "the moved socket uses the target's BBR");
    let moved = moved.expect("the transfer lasted 12 s");
    assert_eq!(moved["attachments"], 1, "{moved}");
    let mbit = |s: &[u64]| s.iter().sum::<u64>() as f64 * 8.0 / s.len() as f64 / 1e6;
    let (before, after) = (mbit(&seconds[4..12]), mbit(&seconds[seconds.len() - 8..]));
    eprintln!("one connection ({from}) over 350 ms RTT, 1% loss: CUBIC {before:.2} Mbit/s, after the move to BBR {after:.2} Mbit/s; per second: {seconds:?}");
    assert!(seconds.len() >= 24, "the connection broke: {seconds:?}");
    assert!(after > 2.0 * before, "BBR's throughput should be well above CUBIC's: {before:.2} -> {after:.2}");
}
