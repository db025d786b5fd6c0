//! `netkernel bench --apps`: real servers and load generators from Debian packages (redis with
//! redis-benchmark, nginx with wrk), natively and under NetKernel in one run (through the kernel
//! NSM, and co-located), with CPU per request counted over every process involved (servers,
//! clients and, for NetKernel, the NSM).

use super::{check_served, command, cpu, nsm_stats};
use crate::guestlib::{self, which};
use crate::tempengine::TempEngine;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process and all its descendants (nginx workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let kids = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        all.extend(kids.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
        i += 1;
    }
    all
}

/// CPU seconds of reaped children of this process (the load generators).
fn children_cpu() -> f64 {
    cpu::rusage(libc::RUSAGE_CHILDREN)
}

/// A server, stopped (SIGTERM, then SIGKILL after 5 s) and reaped on drop.
pub(super) struct Killed(pub(super) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; nginx's master stops its workers on SIGTERM.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}

/// Waits until a TCP socket listens on 127.0.0.1:`port` (/proc/net/tcp), without connecting: a
/// probe connection would count as a client (iperf3 takes it for a test) and as an NSM connection.
/// A guest's listener is the NSM's kernel socket, so this works for guest servers too.
fn wait_listening(port: u16) -> Result<(), String> {
    let local = format!("0100007F:{port:04X}");
    let listening = || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        // Fields: slot, local address, remote address, state (0A: LISTEN), ...
        table
            .lines()
            .any(|l| matches!(l.split_whitespace().collect::<Vec<_>>()[..], [_, addr, _, "0A", ..] if addr == local))
    };
    let end = Instant::now() + Duration::from_secs(10);
    while !listening() {
        if Instant::now() > end {
            return Err(format!("no server listening on 127.0.0.1:{port} after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts server `c` (output discarded) and waits until it listens on `port`.
pub(super) fn server(mut c: Command, port: u16) -> Result<Killed, String> {
    let name = c.get_program().to_string_lossy().into_owned();
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut s = Killed(c.spawn().map_err(|e| format!("starting {name}: {e}"))?);
    wait_listening(port).map_err(|e| match s.0.try_wait() {
        Ok(Some(status)) => format!("{name} exited ({status}) instead of listening on port {port}"),
        _ => format!("{name}: {e}"),
    })?;
    Ok(s)
}

/// Everything one side (native or NetKernel) needs to start programs.
struct Side<'a> {
    /// GuestLib, the engine, the NSM's pid and the tenant (which picks the NSM).
    nk: Option<(&'a Path, &'a TempEngine, u32, &'a str)>,
}

impl Side<'_> {
    fn cmd(&self, program: &str, args: &[&str]) -> Command {
        command(self.nk.map(|(lib, e, _, tenant)| (lib, e, tenant)), program, args)
    }

    fn nsm(&self) -> Vec<u32> {
        self.nk.map(|(_, _, pid, _)| vec![pid]).unwrap_or_default()
    }

    /// Runs a load generator against server `server`; returns its output, and the CPU seconds
    /// of server, load generator and NSM together.
    fn load(&self, server: u32, program: &str, args: &[&str]) -> Result<(String, f64), String> {
        let watched: Vec<u32> = tree(server).into_iter().chain(self.nsm()).collect();
        let (s0, c0) = (cpu::processes(&watched), children_cpu());
        let out = self.cmd(program, args).stderr(Stdio::null()).output().map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{program} failed: {}", String::from_utf8_lossy(&out.stdout)));
        }
        let cpu = cpu::processes(&watched) - s0 + children_cpu() - c0;
        Ok((String::from_utf8_lossy(&out.stdout).replace('\r', "\n"), cpu))
    }
}

/// (test, requests per second) of redis-benchmark --csv: `"SET","605693.50",...` after a header.
pub(super) fn redis_rates(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .filter_map(|l| {
            let mut fields = l.split(',').map(|f| f.trim().trim_matches('"'));
            let name = fields.next()?.to_string();
            Some((name, fields.next()?.parse::<f64>().ok()?))
        })
        .collect()
}

/// redis-server on 127.0.0.1:`port`, without persistence, started by `cmd`.
pub(super) fn redis_server(cmd: impl Fn(&str, &[&str]) -> Command, port: u16) -> Result<Killed, String> {
    let p = port.to_string();
    server(
        cmd(&which("redis-server")?, &["--port", &p, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]),
        port,
    )
}

fn redis(side: &Side, requests: u32) -> Result<Vec<(String, f64, f64)>, String> {
    let port = free_port()?;
    let p = port.to_string();
    let server = redis_server(|prog, args| side.cmd(prog, args), port)?;
    let n = requests.to_string();
    let mut rows = Vec::new();
    for (label, extra) in [("", &[][..]), (" -P 16", &["-P", "16"][..])] {
        let mut args = vec!["-h", "127.0.0.1", "-p", &p, "-c", "50", "-n", &n, "-t", "get,set", "--csv"];
        args.extend_from_slice(extra);
        let (out, cpu) = side.load(server.0.id(), &which("redis-benchmark")?, &args)?;
        let rates = redis_rates(&out);
        if rates.len() != 2 {
            return Err(format!("unexpected redis-benchmark output: {out}"));
        }
        // Both tests ran `requests` requests; CPU is shared between them in proportion to time.
        let total_time: f64 = rates.iter().map(|(_, r)| requests as f64 / r).sum();
        for (name, rate) in rates {
            let share = requests as f64 / rate / total_time;
            rows.push((format!("redis {name}{label}"), rate, cpu * share / requests as f64 * 1e6));
        }
    }
    Ok(rows)
}

/// nginx (master and 2 workers) in directory `d`, on 127.0.0.1:`port`, answering every request
/// with `location` (an nginx location body), started by `cmd`.
pub(super) fn nginx_server(
    cmd: impl Fn(&str, &[&str]) -> Command,
    d: &Path,
    port: u16,
    location: &str,
) -> Result<Killed, String> {
    std::fs::create_dir_all(d.join("logs")).map_err(|e| e.to_string())?;
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{ access_log off; keepalive_requests 100000;\n server {{ listen 127.0.0.1:{port}; location / {{ {location} }} }} }}\n",
            p = d.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    server(
        cmd(&which("nginx")?, &["-c", &conf.display().to_string(), "-p", &d.display().to_string(), "-e", "stderr"]),
        port,
    )
}

/// wrk's (requests/s, requests) from its report; responses other than 2xx or 3xx are an error,
/// not a rate.
pub(super) fn wrk_rate(out: &str) -> Result<(f64, f64), String> {
    if out.contains("Non-2xx or 3xx responses") {
        return Err(format!("wrk got error responses:\n{out}"));
    }
    let rate = out.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse::<f64>().ok());
    let total = out.lines().find(|l| l.contains("requests in")).and_then(|l| l.split_whitespace().next()?.parse().ok());
    match (rate, total) {
        (Some(rate), Some(total)) => Ok((rate, total)),
        _ => Err(format!("unexpected wrk output:\n{out}")),
    }
}

fn nginx(side: &Side, dir: &Path, seconds: u32) -> Result<(String, f64, f64), String> {
    let port = free_port()?;
    let d = dir.join(format!("nginx-{}", if side.nk.is_some() { "nk" } else { "native" }));
    let server = nginx_server(|prog, args| side.cmd(prog, args), &d, port, "return 200 'hello';")?;
    let url = format!("http://127.0.0.1:{port}/");
    let (out, cpu) = side.load(server.0.id(), &which("wrk")?, &["-t2", "-c50", &format!("-d{seconds}s"), &url])?;
    let (rate, total) = wrk_rate(&out)?;
    Ok(("nginx + wrk (50 conns)".into(), rate, cpu / total * 1e6))
}

fn side_rows(side: &Side, dir: &Path, requests: u32, seconds: u32) -> Result<Vec<(String, f64, f64)>, String> {
    let mut rows = redis(side, requests)?;
    rows.push(nginx(side, dir, seconds)?);
    Ok(rows)
}

pub fn run(requests: u32, seconds: u32) -> Result<Value, String> {
    let lib = guestlib::find()?;
    let engine = TempEngine::with_config(Some(&super::engine_config()))?;
    // The bench's engine has an NSM and a tenant of the same name per path.
    eprintln!("netkernel bench --apps: native ...");
    let native = side_rows(&Side { nk: None }, &engine.dir, requests, seconds)?;
    let mut paths = Vec::new();
    for path in ["kernel", "colocated"] {
        eprintln!("netkernel bench --apps: netkernel, {path} path ...");
        let before = nsm_stats(&engine, path)?;
        let pid = before["pid"].as_u64().ok_or("NSM without a pid")? as u32;
        paths.push(side_rows(&Side { nk: Some((&lib, &engine, pid, path)) }, &engine.dir, requests, seconds)?);
        check_served(&engine, path, &before, path == "colocated")?;
    }
    let rows: Vec<Value> = native
        .iter()
        .zip(&paths[0])
        .zip(&paths[1])
        .map(|(((name, nr, nc), (_, kr, kc)), (_, cr, cc))| {
            json!({"test": name, "native_rps": nr, "kernel_rps": kr, "kernel_ratio": kr / nr,
                   "colocated_rps": cr, "colocated_ratio": cr / nr,
                   "native_cpu_us_per_req": nc, "kernel_cpu_us_per_req": kc, "colocated_cpu_us_per_req": cc})
        })
        .collect();
    Ok(json!({"requests": requests, "wrk_seconds": seconds, "rows": rows}))
}

pub fn print(v: &Value) {
    println!("{}", super::warm_line(v));
    println!(
        "redis-benchmark: 50 clients, {} requests per test; wrk: 2 threads, 50 connections, {} s",
        v["requests"], v["wrk_seconds"]
    );
    println!(
        "{:<24} {:>10} {:>10} {:>7} {:>10} {:>7}   {:>20}",
        "test", "native rps", "NK kernel", "ratio", "NK coloc", "ratio", "us/req nat/ker/col"
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<24} {:>10.0} {:>10.0} {:>6.2}x {:>10.0} {:>6.2}x   {:>6.1} {:>6.1} {:>6.1}",
            r["test"].as_str().unwrap_or("?"),
            f("native_rps"),
            f("kernel_rps"),
            f("kernel_ratio"),
            f("colocated_rps"),
            f("colocated_ratio"),
            f("native_cpu_us_per_req"),
            f("kernel_cpu_us_per_req"),
            f("colocated_cpu_us_per_req")
        );
    }
    println!("CPU per request counts server, load generator and (for NetKernel) the NSM of the path.");
}
