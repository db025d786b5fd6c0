//! `netkernel bench`: native kernel sockets against NetKernel, side by side in one run.
//!
//! Every phase (request/response, then bulk) gets a fresh `bench-peer` server and client, so a
//! GuestLib attachment, a slow start or a leftover socket of one phase cannot colour the other.
//! Peers measure their own latency, throughput and CPU over the timed section only (process start
//! and GuestLib attach are excluded); the parent adds the NSM's CPU from /proc over the phase.

mod apps;
mod cpu;

use crate::guestlib;
use crate::tempengine::TempEngine;
use netkernel_service::control::EngineRequest;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

const RR_BYTES: usize = 64;
const BULK_WRITE: usize = 256 << 10;
/// A peer still running this long after its phase should have ended is hung, not slow.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct Args {
    /// Request/response round trips (64 bytes each way, TCP_NODELAY).
    #[arg(long, default_value_t = 20000, value_parser = clap::value_parser!(u32).range(1..))]
    rr_iters: u32,
    /// Duration of the single-flow bulk transfer, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Print all results as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Benchmark real programs instead: redis-server with redis-benchmark, nginx with wrk.
    #[arg(long)]
    apps: bool,
    /// With --apps: requests per redis-benchmark test.
    #[arg(long, default_value_t = 100000)]
    requests: u32,
}

#[derive(clap::Args)]
pub struct PeerArgs {
    #[arg(value_parser = ["server", "client"])]
    role: String,
    #[arg(value_parser = ["rr", "bulk"])]
    phase: String,
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, default_value_t = 20000)]
    rr_iters: u32,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

pub fn peer(a: PeerArgs) -> i32 {
    let r = match (a.role.as_str(), a.phase.as_str()) {
        ("server", phase) => serve(phase == "rr"),
        (_, "rr") => rr_client(a.port, a.rr_iters.max(1)),
        _ => bulk_client(a.port, a.seconds),
    };
    let code = i32::from(r.is_err());
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => eprintln!("netkernel bench-peer {} {}: {e}", a.role, a.phase),
    }
    code
}

fn self_cpu() -> f64 {
    cpu::rusage(libc::RUSAGE_SELF)
}

fn serve(rr: bool) -> io::Result<Value> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let cpu0 = self_cpu();
    let mut buf = vec![0u8; if rr { RR_BYTES } else { BULK_WRITE }];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n if rr => s.write_all(&buf[..n])?,
            n => total += n as u64,
        }
    }
    if !rr {
        // The ack tells the client when the last byte has really arrived, not just left its buffer.
        s.write_all(&total.to_le_bytes())?;
    }
    Ok(json!({"bytes": total, "cpu_s": self_cpu() - cpu0}))
}

fn rr_client(port: u16, iters: u32) -> io::Result<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
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
    let pct = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1] as f64 / 1e3;
    let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1e3;
    Ok(json!({"iters": iters, "warmup": warmup, "p50_us": pct(0.50), "p99_us": pct(0.99), "mean_us": mean,
              "max_us": pct(1.0), "cpu_s": cpu}))
}

fn bulk_client(port: u16, seconds: f64) -> io::Result<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let buf = vec![0xa5u8; BULK_WRITE];
    let cpu0 = self_cpu();
    let (start, mut sent) = (Instant::now(), 0u64);
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        s.write_all(&buf)?;
        sent += BULK_WRITE as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(ack);
    if got != sent {
        return Err(io::Error::other(format!("server received {got} bytes, client sent {sent}")));
    }
    Ok(json!({"bytes": sent, "secs": secs, "gbps": sent as f64 * 8e-9 / secs, "cpu_s": self_cpu() - cpu0}))
}

/// A child whose stdout lines arrive on a channel, so every read can have a deadline.
struct Peer {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Peer {
    fn spawn(mut cmd: Command, name: String, dir: &Path) -> Result<Peer, String> {
        let log = dir.join(name.replace(' ', "-") + ".log");
        let err = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        Ok(Peer { name, child, lines, log })
    }

    fn line(&mut self, deadline: Instant) -> Result<String, String> {
        match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(self.fail("timed out")),
            Err(_) => Err(self.wait(deadline).err().unwrap_or_else(|| self.fail("printed no result"))),
        }
    }

    fn wait(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => return Err(self.fail(&format!("failed ({st})"))),
                Ok(None) if Instant::now() >= deadline => return Err(self.fail("timed out")),
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(format!("{}: wait: {e}", self.name)),
            }
        }
    }

    fn fail(&self, what: &str) -> String {
        format!("{} {what}{}", self.name, log_tail(&self.log))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // std's kill is a no-op once the child has been reaped, so this never hits a reused pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    match &lines[lines.len().saturating_sub(10)..] {
        [] => String::new(),
        tail => format!("; {}:\n  {}", log.display(), tail.join("\n  ")),
    }
}

/// What every phase needs: the options, the binary, GuestLib, the scratch dir and the engine.
struct Bench<'a> {
    a: &'a Args,
    exe: PathBuf,
    lib: PathBuf,
    dir: PathBuf,
    sock: PathBuf,
    nsm_pid: u32,
}

impl Bench<'_> {
    /// One phase: server and client under GuestLib (`nk`) or native. Returns the client's and
    /// server's results, plus the NSM's CPU seconds over the whole phase.
    fn phase(&self, nk: bool, phase: &str) -> Result<(Value, Value, f64), String> {
        let side = if nk { "netkernel" } else { "native" };
        let exe = self.exe.to_string_lossy();
        let cmd = |role: &str, port: u16| {
            let (iters, secs) = (self.a.rr_iters, self.a.seconds);
            let args = format!("bench-peer {role} {phase} --port {port} --rr-iters {iters} --seconds {secs}");
            let mut c =
                if nk { guestlib::command(&self.lib, &self.sock, None, &exe, &[]) } else { Command::new(&self.exe) };
            c.args(args.split(' '));
            c
        };
        let extra = if phase == "bulk" { self.a.seconds } else { 0.0 };
        let deadline = Instant::now() + PEER_TIMEOUT + Duration::from_secs_f64(extra);
        let nsm0 = cpu::process(self.nsm_pid)?;
        let mut server = Peer::spawn(cmd("server", 0), format!("{side} {phase} server"), &self.dir)?;
        let line = server.line(deadline)?;
        let port = line.trim().parse().map_err(|_| format!("{side} {phase} server printed {line:?}, not a port"))?;
        let mut client = Peer::spawn(cmd("client", port), format!("{side} {phase} client"), &self.dir)?;
        let c = client.line(deadline)?;
        client.wait(deadline)?;
        let s = server.line(deadline)?;
        server.wait(deadline)?;
        let nsm = cpu::process(self.nsm_pid)? - nsm0;
        let parse =
            |l: &str| serde_json::from_str::<Value>(l).map_err(|e| format!("{side} {phase}: bad result {l:?}: {e}"));
        Ok((parse(&c)?, parse(&s)?, nsm))
    }

    fn side(&self, nk: bool) -> Result<Value, String> {
        let (rr, rr_srv, rr_nsm) = self.phase(nk, "rr")?;
        let (bulk, bulk_srv, bulk_nsm) = self.phase(nk, "bulk")?;
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        // Natively the NSM plays no part; its (idle) CPU is still reported, but not charged.
        let charge = if nk { 1.0 } else { 0.0 };
        let rr_cpu = f(&rr, "cpu_s") + f(&rr_srv, "cpu_s") + charge * rr_nsm;
        let bulk_cpu = f(&bulk, "cpu_s") + f(&bulk_srv, "cpu_s") + charge * bulk_nsm;
        let cpu = |c: &Value, s: &Value, n: f64| json!({"client": f(c, "cpu_s"), "server": f(s, "cpu_s"), "nsm": n});
        Ok(json!({
            "rr_p50_us": f(&rr, "p50_us"), "rr_p99_us": f(&rr, "p99_us"), "rr_mean_us": f(&rr, "mean_us"),
            "rr_max_us": f(&rr, "max_us"), "rr_cpu_us_per_op": rr_cpu * 1e6 / (f(&rr, "iters") + f(&rr, "warmup")),
            "rr_cpu_s": cpu(&rr, &rr_srv, rr_nsm), "bulk_cpu_s": cpu(&bulk, &bulk_srv, bulk_nsm),
            "bulk_gbps": f(&bulk, "gbps"), "bulk_bytes": f(&bulk, "bytes"), "bulk_secs": f(&bulk, "secs"),
            "bulk_cpu_s_per_gb": bulk_cpu / (f(&bulk, "bytes") / 1e9),
        }))
    }
}

/// The NSM's pid: it may come up a little after the engine's socket.
fn nsm_pid(engine: &TempEngine) -> Result<u32, String> {
    for _ in 0..250 {
        let nsms = netkernel_engine::request(engine.socket(), &EngineRequest::Nsms)?;
        if let Some(pid) = nsms[0]["pid"].as_u64().filter(|p| *p > 0) {
            return Ok(pid as u32);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("engine has no running NSM after 5 s:\n{}", engine.log()))
}

fn run(a: &Args) -> Result<Value, String> {
    if !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        return Err(format!("--seconds must be in (0, 3600], not {}", a.seconds));
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating netkernel binary: {e}"))?;
    let lib = guestlib::find()?;
    let engine = TempEngine::start()?;
    let nsm_pid = nsm_pid(&engine)?;
    let (dir, sock) = (engine.dir.clone(), engine.socket.clone());
    let b = Bench { a, exe, lib, dir, sock, nsm_pid };
    let nsm_counters = || netkernel_engine::request(&b.sock, &EngineRequest::Nsms).map(|v| v[0].clone());
    eprintln!("netkernel bench: native ...");
    let native = b.side(false)?;
    let before = nsm_counters()?;
    eprintln!("netkernel bench: netkernel ...");
    let nk = b.side(true)?;
    let after = nsm_counters()?;
    let delta = |k: &str| after[k].as_i64().unwrap_or(0) - before[k].as_i64().unwrap_or(0);
    if after["pid"] != before["pid"] || delta("restarts") != 0 {
        return Err(format!("the NSM restarted during the run (pid {} -> {})", before["pid"], after["pid"]));
    }
    // Without this, a GuestLib that failed to hook the peers would silently report native figures.
    if delta("conns_total") <= 0 {
        return Err("the NSM saw no connections: GuestLib did not serve the peers' sockets".into());
    }
    let ratio = |k: &str| nk[k].as_f64().unwrap_or(f64::NAN) / native[k].as_f64().unwrap_or(f64::NAN);
    let keys = ["rr_p50_us", "rr_p99_us", "rr_cpu_us_per_op", "bulk_gbps", "bulk_cpu_s_per_gb"];
    let ratios: serde_json::Map<String, Value> = keys.iter().map(|k| (k.to_string(), json!(ratio(k)))).collect();
    Ok(json!({
        "config": {"rr_iters": a.rr_iters, "rr_bytes": RR_BYTES, "seconds": a.seconds, "write_bytes": BULK_WRITE,
                   "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "native": native, "netkernel": nk, "ratio": ratios,
        "nsm": {"pid": nsm_pid, "congestion": after["congestion"], "conns": delta("conns_total"),
                "bytes_in": delta("bytes_in"), "bytes_out": delta("bytes_out"), "violations": delta("violations")},
    }))
}

fn print_table(r: &Value) {
    let rows = [
        ("rr p50 (us)", "rr_p50_us"),
        ("rr p99 (us)", "rr_p99_us"),
        ("rr CPU (us/round trip)", "rr_cpu_us_per_op"),
        ("bulk (Gbit/s)", "bulk_gbps"),
        ("bulk CPU (s/GB)", "bulk_cpu_s_per_gb"),
    ];
    let c = &r["config"];
    let (n, b, s, w, cpus) = (&c["rr_iters"], &c["rr_bytes"], &c["seconds"], BULK_WRITE >> 10, &c["nproc"]);
    println!("{n} x {b}-byte round trips; {s} s bulk, {w} KiB writes; {cpus} CPUs");
    println!("{:<24} {:>10} {:>10} {:>8}", "metric", "native", "netkernel", "ratio");
    for (label, k) in rows {
        let v = |s: &str| r[s][k].as_f64().unwrap_or(f64::NAN);
        println!("{label:<24} {:>10.2} {:>10.2} {:>7.2}x", v("native"), v("netkernel"), v("ratio"));
    }
    let idle = r["native"]["bulk_cpu_s"]["nsm"].as_f64().unwrap_or(f64::NAN);
    println!("CPU = client + server (+ NSM for netkernel). Idle NSM CPU during the native bulk run: {idle:.3} s");
}

pub fn main(a: Args) -> i32 {
    if a.apps {
        let secs = a.seconds.ceil().max(1.0) as u32;
        return match apps::run(a.requests, secs) {
            Ok(v) if a.json => {
                println!("{v}");
                0
            }
            Ok(v) => {
                apps::print(&v);
                0
            }
            Err(e) => {
                eprintln!("netkernel bench --apps: {e}");
                1
            }
        };
    }
    let r = run(&a);
    let code = i32::from(r.is_err());
    match r {
        Ok(r) if a.json => println!("{r}"),
        Ok(r) => print_table(&r),
        Err(e) => eprintln!("netkernel bench: {e}"),
    }
    code
}
