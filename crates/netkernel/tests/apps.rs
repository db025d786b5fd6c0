//! Unmodified programs from Debian packages, served by the kernel NSM.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn sha256_file(p: &std::path::Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// A free loopback port (bound natively and released; good enough for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn python_http_server_serves_100mib_to_curl() {
    let python = require("python3");
    let curl = require("curl");
    let engine = TestEngine::start();
    let www = engine.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let file = www.join("blob.bin");
    {
        // 100 MiB of pseudo-random bytes.
        let mut data = vec![0u8; 100 << 20];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for w in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(&file, &data).unwrap();
    }
    let port = free_port();
    let mut server =
        engine.run(python.to_str().unwrap(), &["-u", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]);
    server.current_dir(&www).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut server = server.spawn().unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("Serving HTTP"), "{first}");
    let out_file = engine.dir.path().join("got.bin");
    let start = Instant::now();
    let got = output_within(
        engine.run(
            curl.to_str().unwrap(),
            &["-sS", "-o", out_file.to_str().unwrap(), &format!("http://127.0.0.1:{port}/blob.bin")],
        ),
        Duration::from_secs(120),
    );
    let took = start.elapsed();
    let _ = server.kill();
    let _ = server.wait();
    assert!(got.status.success(), "curl failed: {}\n{}", String::from_utf8_lossy(&got.stderr), engine.log());
    assert_eq!(sha256_file(&out_file), sha256_file(&file), "content differs");
    let nsm = engine.nsm();
    let out = nsm["bytes_out"].as_u64().unwrap();
    let inb = nsm["bytes_in"].as_u64().unwrap();
    assert!(out >= 100 << 20 && inb >= 100 << 20, "NSM counters do not show the transfer: {nsm}");
    eprintln!("100 MiB through the kernel NSM in {took:?}; NSM counters {nsm}");
}
