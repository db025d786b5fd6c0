//! Two testbed hosts (scripts/testbed), each with its own engine and NSM, joined by a veth with
//! a 50 Mbit/s bottleneck: a guest of one host sends to a guest of the other through both NSMs.

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
    if !is_root() {
        eprintln!("SKIP two_hosts_through_a_bottleneck: the testbed needs root");
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
