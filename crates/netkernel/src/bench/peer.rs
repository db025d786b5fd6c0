//! `netkernel bench-peer`: the two ends of one measured phase. They run as processes of their own
//! so that GuestLib can serve them (or not), and measure their own latency, throughput and CPU
//! over the timed section only: process start and the GuestLib attachment are not measured.
//!
//! The same code runs over TCP on 127.0.0.1 and over AF_UNIX stream sockets, so the only
//! difference between modes is the path the bytes take.

use super::{cpu, quantile};
use serde_json::{json, Value};
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

pub const RR_BYTES: usize = 64;
pub const BULK_WRITE: usize = 256 << 10;
/// A connection-rate client stops here even if its time is not up, so that a fast path cannot
/// exhaust the ephemeral ports (TIME_WAIT) of the modes after it.
pub const MAX_CONNS: u64 = 20_000;
/// First byte of the request that tells a connection-rate server to stop.
const QUIT: u8 = b'q';

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Server,
    Client,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// 64-byte request/response round trips on one connection.
    Rr,
    /// Bulk transfer on `--flows` connections at once.
    Bulk,
    /// Connection rate: connect, one 64-byte round trip, close.
    Conn,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Rr => "rr",
            Phase::Bulk => "bulk",
            Phase::Conn => "conn",
        }
    }
}

#[derive(clap::Args)]
pub struct PeerArgs {
    #[arg(value_enum)]
    pub role: Role,
    #[arg(value_enum)]
    pub phase: Phase,
    /// Where the server listens and the client connects: tcp:IP:PORT or unix:PATH (a server
    /// given port 0 picks one and prints the address it got).
    #[arg(long, value_parser = Addr::parse)]
    pub addr: Addr,
    #[arg(long, default_value_t = 1)]
    pub flows: u32,
    #[arg(long, default_value_t = 20000)]
    pub rr_iters: u32,
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(Addr::Tcp).map_err(|e| format!("{a:?}: {e}"));
        }
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(Addr::Unix(p.into())),
            _ => Err(format!("{s:?} is neither tcp:IP:PORT nor unix:PATH")),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &Addr) -> io::Result<Stream> {
        match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                // Small requests must leave at once, as they do on an AF_UNIX socket.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Addr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn bind(addr: &Addr) -> io::Result<(Listener, Addr)> {
        match addr {
            Addr::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let bound = l.local_addr()?;
                Ok((Listener::Tcp(l), Addr::Tcp(bound)))
            }
            Addr::Unix(p) => {
                // A socket file left by an earlier run would make bind fail with EADDRINUSE.
                let _ = std::fs::remove_file(p);
                Ok((Listener::Unix(UnixListener::bind(p)?), addr.clone()))
            }
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

pub fn main(a: PeerArgs) -> i32 {
    let r = match a.role {
        Role::Server => serve(&a),
        Role::Client => client(&a),
    };
    match r {
        Ok(v) => {
            println!("{v}");
            0
        }
        Err(e) => {
            eprintln!("netkernel bench-peer {:?} {}: {e}", a.role, a.phase.name());
            1
        }
    }
}

fn self_cpu() -> f64 {
    cpu::rusage(libc::RUSAGE_SELF)
}

fn say(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn serve(a: &PeerArgs) -> io::Result<Value> {
    let (l, bound) = Listener::bind(&a.addr)?;
    say(&bound.to_string())?;
    let cpu0 = self_cpu();
    let (bytes, conns) = match a.phase {
        Phase::Rr => {
            let mut s = l.accept()?;
            // The bench checks which path the live connection takes before any byte is timed.
            say("accepted")?;
            io::stdin().lock().read_line(&mut String::new())?;
            let mut buf = [0u8; RR_BYTES];
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => s.write_all(&buf[..n])?,
                }
            }
            (0, 1)
        }
        Phase::Bulk => {
            let conns = (0..a.flows).map(|_| l.accept()).collect::<io::Result<Vec<_>>>()?;
            let counted = std::thread::scope(|sc| {
                let threads: Vec<_> = conns.into_iter().map(|s| sc.spawn(move || bulk_sink(s))).collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap_or_else(|_| Err(io::Error::other("panicked"))))
                    .sum::<io::Result<u64>>()
            });
            (counted?, a.flows as u64)
        }
        Phase::Conn => {
            let mut n = 0u64;
            let mut buf = [0u8; RR_BYTES];
            loop {
                let mut s = l.accept()?;
                s.read_exact(&mut buf)?;
                if buf[0] == QUIT {
                    break;
                }
                s.write_all(&buf)?;
                // The client closes first, so TIME_WAIT stays on its side, not on the listener's.
                while s.read(&mut buf)? > 0 {}
                n += 1;
            }
            (0, n)
        }
    };
    Ok(json!({"bytes": bytes, "conns": conns, "cpu_s": self_cpu() - cpu0}))
}

/// Counts one flow's bytes, then acknowledges the total: the client's clock stops only when the
/// last byte has really arrived, not when it left the client's buffer.
fn bulk_sink(mut s: Stream) -> io::Result<u64> {
    let mut buf = vec![0u8; BULK_WRITE];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    s.write_all(&total.to_le_bytes())?;
    Ok(total)
}

fn client(a: &PeerArgs) -> io::Result<Value> {
    match a.phase {
        Phase::Rr => rr_client(&a.addr, a.rr_iters.max(1)),
        Phase::Bulk => bulk_client(&a.addr, a.flows.max(1), a.seconds),
        Phase::Conn => conn_client(&a.addr, a.seconds),
    }
}

fn rr_client(addr: &Addr, iters: u32) -> io::Result<Value> {
    let mut s = Stream::connect(addr)?;
    let warmup = (iters / 10).min(1000);
    let mut lat = Vec::with_capacity((warmup + iters) as usize);
    let (mut out, mut back) = ([0x5au8; RR_BYTES], [0u8; RR_BYTES]);
    let cpu0 = self_cpu();
    for i in 0..warmup + iters {
        // A sequence number in every request catches a data path that loses, reorders or mixes up bytes.
        out[..4].copy_from_slice(&i.to_le_bytes());
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        lat.push(t.elapsed().as_nanos() as u64);
        if back != out {
            return Err(io::Error::other(format!("round trip {i}: echo differs from request")));
        }
    }
    let cpu = self_cpu() - cpu0;
    lat.drain(..warmup as usize);
    lat.sort_unstable();
    let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1e3;
    let us = |sorted: &[u64], q: f64| quantile(sorted, q) / 1e3;
    Ok(json!({"iters": iters, "warmup": warmup, "p50_us": us(&lat, 0.50), "p99_us": us(&lat, 0.99),
              "p999_us": us(&lat, 0.999), "mean_us": mean, "max_us": us(&lat, 1.0), "cpu_s": cpu}))
}

fn bulk_client(addr: &Addr, flows: u32, seconds: f64) -> io::Result<Value> {
    let streams = (0..flows).map(|_| Stream::connect(addr)).collect::<io::Result<Vec<_>>>()?;
    let cpu0 = self_cpu();
    let start_line = &Barrier::new(flows as usize + 1);
    let (start, flows_done) = std::thread::scope(|sc| {
        let threads: Vec<_> =
            streams.into_iter().map(|s| sc.spawn(move || bulk_source(s, seconds, start_line))).collect();
        start_line.wait();
        let start = Instant::now();
        let done: Vec<io::Result<(u64, Instant)>> =
            threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(io::Error::other("panicked")))).collect();
        (start, done)
    });
    let flows_done = flows_done.into_iter().collect::<io::Result<Vec<_>>>()?;
    let bytes: u64 = flows_done.iter().map(|(b, _)| b).sum();
    // Throughput is over the time until the last flow's bytes all arrived.
    let end = flows_done.iter().map(|(_, t)| *t).max().unwrap_or(start);
    let secs = end.duration_since(start).as_secs_f64();
    Ok(json!({"flows": flows, "bytes": bytes, "secs": secs, "gbps": bytes as f64 * 8e-9 / secs,
              "cpu_s": self_cpu() - cpu0}))
}

/// One flow: writes for `seconds` once every flow is connected, then waits for the server's count.
fn bulk_source(mut s: Stream, seconds: f64, start_line: &Barrier) -> io::Result<(u64, Instant)> {
    let buf = vec![0xa5u8; BULK_WRITE];
    start_line.wait();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        s.write_all(&buf)?;
        sent += BULK_WRITE as u64;
    }
    s.shutdown_write()?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let done = Instant::now();
    let got = u64::from_le_bytes(ack);
    if got != sent {
        return Err(io::Error::other(format!("server received {got} bytes, client sent {sent}")));
    }
    Ok((sent, done))
}

fn conn_client(addr: &Addr, seconds: f64) -> io::Result<Value> {
    let (mut req, mut back) = ([0x5au8; RR_BYTES], [0u8; RR_BYTES]);
    let cpu0 = self_cpu();
    let start = Instant::now();
    let mut n = 0u64;
    while n < MAX_CONNS && start.elapsed().as_secs_f64() < seconds {
        let mut s = Stream::connect(addr)?;
        // After the first byte, which says whether this is the last connection.
        req[1..9].copy_from_slice(&n.to_le_bytes());
        s.write_all(&req)?;
        s.read_exact(&mut back)?;
        if back != req {
            return Err(io::Error::other(format!("connection {n}: echo differs from request")));
        }
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = self_cpu() - cpu0;
    let mut s = Stream::connect(addr)?;
    req[0] = QUIT;
    s.write_all(&req)?;
    Ok(json!({"conns": n, "secs": secs, "per_s": n as f64 / secs, "cpu_s": cpu}))
}
