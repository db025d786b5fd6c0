//! `netkernel bench`: four ways for two processes on this machine to talk over a stream socket,
//! side by side in one run: native kernel TCP over loopback, NetKernel through the kernel NSM
//! (the co-located short cut off), NetKernel co-located (the short cut on, the default), and
//! AF_UNIX stream sockets; plus the raw nqe queue without sockets. `--apps` runs real servers
//! instead (apps.rs), `--tools` the standard benchmark tools (tools.rs); `--warm` keeps CPUs out of
//! deep idle during any of them.
//!
//! Every phase gets a fresh `bench-peer` server and client, so a GuestLib attachment, a slow
//! start or a leftover socket of one phase cannot colour the next. Peers measure their own
//! latency, throughput and CPU over the timed section only; the parent adds the NSM's CPU from
//! /proc over the phase and checks, on the live connection, which path NetKernel gave it.

mod apps;
mod chart;
mod cpu;
mod peer;
mod queue;
mod tools;

use crate::guestlib;
use crate::tempengine::TempEngine;
use netkernel_control::EngineRequest;
pub use peer::{main as peer, PeerArgs};
use peer::{Addr, Phase, BULK_WRITE, RR_BYTES};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A peer still running this long after its phase should have ended is hung, not slow.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// One NSM per NetKernel mode, so that each mode is charged its own NSM's CPU, and a tenant of
/// the same name on each. Tenants admit any uid: the bench runs as whoever starts it.
const ENGINE_CONFIG: &str = r#"# written by `netkernel bench`
[[nsm]]
name = "kernel"
colocate = false   # every byte through the NSM's kernel TCP, even between two of its guests

[[nsm]]
name = "colocated" # the default: guests of this NSM talk through shared memory

[[tenant]]
name = "kernel"
nsm = "kernel"

[[tenant]]
name = "colocated"
nsm = "colocated"
"#;

/// The bench engine's configuration: [`ENGINE_CONFIG`], and as root a user NSM too (its TAP
/// device needs root), on a subnet of its own for this run.
pub(crate) fn engine_config() -> String {
    if !user_mode() {
        return ENGINE_CONFIG.into();
    }
    let subnet = std::process::id() % 250;
    format!(
        "{ENGINE_CONFIG}\n[[nsm]]\nname = \"user\"   # smoltcp in the NSM process, on a TAP device\nkind = \"user\"\n\
         address = \"10.79.{subnet}.2/24\"\ngateway = \"10.79.{subnet}.1\"\ncolocate = false\n\n\
         [[tenant]]\nname = \"user\"\nnsm = \"user\"\n"
    )
}

fn user_mode() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The modes this run measures: all but the user NSM's without root.
fn modes() -> Vec<Mode> {
    MODES.into_iter().filter(|m| *m != Mode::User || user_mode()).collect()
}

#[derive(clap::Args)]
pub struct Args {
    /// Request/response round trips (64 bytes each way, TCP_NODELAY) [default: 20000, quick: 2000].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rr_iters: Option<u32>,
    /// Duration of each bulk transfer (1 flow, then 4), in seconds [default: 3, quick: 0.3]; with --apps
    /// or --tools, of each run of a tool (whole seconds).
    #[arg(long)]
    seconds: Option<f64>,
    /// Duration of the connection-rate phase, in seconds [default: 1, quick: 0.3].
    #[arg(long)]
    conn_seconds: Option<f64>,
    /// A short run that still exercises every mode and metric (a CI smoke test, not a measurement).
    #[arg(long)]
    quick: bool,
    /// Print all results as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also draw the results as an SVG chart into this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Benchmark real programs instead: redis-server with redis-benchmark, nginx with wrk.
    #[arg(long, conflicts_with = "tools")]
    apps: bool,
    /// Run the standard tools instead (sockperf, iperf3, redis-benchmark, wrk against nginx), each
    /// natively, through the kernel NSM, from a guest client to a native server, and co-located.
    #[arg(long)]
    tools: bool,
    /// With --tools: rounds, each running every tool on every path in turn.
    #[arg(long, default_value_t = 3, requires = "tools", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Keep every CPU out of deep idle during the measurements, native and NetKernel alike
    /// (holds /dev/cpu_dma_latency at 0; root).
    #[arg(long)]
    warm: bool,
    /// With --apps or --tools: requests per redis-benchmark test [default: 100000, --tools: 1000000].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    requests: Option<u32>,
}

/// The options with --quick and the defaults applied.
struct Opts {
    rr_iters: u32,
    seconds: f64,
    conn_seconds: f64,
    /// Bytes streamed through the nqe queue per record size, and one-way samples per size.
    queue_bytes: u64,
    queue_samples: u64,
}

impl Opts {
    fn new(a: &Args) -> Result<Opts, String> {
        let q = a.quick;
        let o = Opts {
            rr_iters: a.rr_iters.unwrap_or(if q { 2000 } else { 20000 }),
            seconds: a.seconds.unwrap_or(if q { 0.3 } else { 3.0 }),
            conn_seconds: a.conn_seconds.unwrap_or(if q { 0.3 } else { 1.0 }),
            queue_bytes: if q { 16 << 20 } else { 1 << 30 },
            queue_samples: if q { 2000 } else { 20000 },
        };
        for (flag, v) in [("--seconds", o.seconds), ("--conn-seconds", o.conn_seconds)] {
            if !(v > 0.0 && v <= 3600.0) {
                return Err(format!("{flag} must be in (0, 3600], not {v}"));
            }
        }
        Ok(o)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Native,
    Kernel,
    Colocated,
    User,
    Unix,
}

const MODES: [Mode; 5] = [Mode::Native, Mode::Kernel, Mode::Colocated, Mode::User, Mode::Unix];

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Kernel => "nk_kernel",
            Mode::Colocated => "nk_colocated",
            Mode::User => "nk_user",
            Mode::Unix => "unix",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Native => "native TCP",
            Mode::Kernel => "NK kernel",
            Mode::Colocated => "NK coloc",
            Mode::User => "NK user",
            Mode::Unix => "AF_UNIX",
        }
    }

    /// For NetKernel modes: the NSM and tenant serving the peers, which is also the path
    /// (`ctl conns`) their connections must take.
    fn nsm(self) -> Option<&'static str> {
        match self {
            Mode::Kernel => Some("kernel"),
            Mode::Colocated => Some("colocated"),
            Mode::User => Some("user"),
            Mode::Native | Mode::Unix => None,
        }
    }
}

/// The metrics of the comparison table, in order: JSON key, label, decimals.
const METRICS: [(&str, &str, usize); 10] = [
    ("rr_p50_us", "rr p50 (us)", 2),
    ("rr_p99_us", "rr p99 (us)", 2),
    ("rr_p999_us", "rr p99.9 (us)", 2),
    ("rr_cpu_us_per_op", "rr CPU (us/round trip)", 2),
    ("bulk1_gbps", "bulk 1 flow (Gbit/s)", 2),
    ("bulk4_gbps", "bulk 4 flows (Gbit/s)", 2),
    ("bulk1_cpu_s_per_gb", "CPU, 1 flow (s/GB)", 3),
    ("bulk4_cpu_s_per_gb", "CPU, 4 flows (s/GB)", 3),
    ("conn_per_s", "connections/s", 0),
    ("conn_cpu_us_per_conn", "CPU (us/connection)", 1),
];

/// Latency at quantile `q` (0 < q <= 1) of a sorted, non-empty sample, in its own unit.
fn quantile(sorted: &[u64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1] as f64
}

/// A child whose stdout lines arrive on a channel, so every read can have a deadline.
struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Peer {
    fn spawn(mut cmd: Command, name: String, dir: &Path) -> Result<Peer, String> {
        let log = dir.join(name.replace(' ', "-") + ".log");
        let err = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        Ok(Peer { name, child, stdin, lines, log })
    }

    fn line(&mut self, deadline: Instant) -> Result<String, String> {
        match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(self.fail("timed out")),
            Err(_) => Err(self.wait(deadline).err().unwrap_or_else(|| self.fail("printed no result"))),
        }
    }

    /// Everything the child prints on stdout, once it has exited successfully.
    fn output(&mut self, deadline: Instant) -> Result<String, String> {
        let mut out = String::new();
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => out += &(l + "\n"),
                Err(RecvTimeoutError::Timeout) => return Err(self.fail("timed out")),
                Err(_) => return self.wait(deadline).map(|()| out),
            }
        }
    }

    /// Tells a waiting rr server to start echoing.
    fn go(&mut self) -> Result<(), String> {
        let r = self.stdin.take().map(|mut s| s.write_all(b"go\n"));
        r.unwrap_or(Ok(())).map_err(|e| self.fail(&format!("cannot be told to start ({e})")))
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

/// What one phase measured: the peers' own reports and the CPU of the NSMs over the phase.
struct Measured {
    client: Value,
    server: Value,
    /// CPU seconds of the mode's own NSM (0 for native and AF_UNIX).
    nsm_cpu: f64,
    /// CPU seconds of NSMs serving nobody during the phase (their idle cost).
    idle_nsm_cpu: f64,
}

impl Measured {
    fn f(v: &Value, k: &str) -> f64 {
        v[k].as_f64().unwrap_or(f64::NAN)
    }

    /// Client + server (+ the mode's NSM) CPU seconds.
    fn cpu(&self) -> f64 {
        Self::f(&self.client, "cpu_s") + Self::f(&self.server, "cpu_s") + self.nsm_cpu
    }

    fn cpu_split(&self) -> Value {
        json!({"client": Self::f(&self.client, "cpu_s"), "server": Self::f(&self.server, "cpu_s"), "nsm": self.nsm_cpu})
    }
}

/// What every phase needs: the options, the binary, GuestLib and the engine (whose directory also
/// holds the peers' logs and AF_UNIX sockets).
struct Bench<'a> {
    o: &'a Opts,
    exe: PathBuf,
    lib: PathBuf,
    engine: &'a TempEngine,
    /// (name, pid) of every NSM.
    nsms: Vec<(String, u32)>,
}

impl Bench<'_> {
    fn peer_cmd(&self, mode: Mode, args: &[String]) -> Command {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        command(mode.nsm().map(|tenant| (&*self.lib, self.engine, tenant)), &self.exe.to_string_lossy(), &args)
    }

    fn nsm_cpus(&self) -> Result<Vec<f64>, String> {
        self.nsms.iter().map(|(name, pid)| cpu::process(*pid).map_err(|e| format!("NSM {name}: {e}"))).collect()
    }

    fn phase(&self, mode: Mode, phase: Phase, flows: u32) -> Result<Measured, String> {
        let what =
            format!("{} {}{}", mode.key(), phase.name(), if flows > 1 { format!("x{flows}") } else { "".into() });
        let secs = match phase {
            Phase::Rr => 0.0,
            Phase::Bulk => self.o.seconds,
            Phase::Conn => self.o.conn_seconds,
        };
        let args = |role: &str, addr: &str| -> Vec<String> {
            let (iters, flows) = (self.o.rr_iters.to_string(), flows.to_string());
            let a = ["bench-peer", role, phase.name(), "--addr", addr, "--flows", &flows, "--rr-iters", &iters];
            a.iter().map(|s| s.to_string()).chain(["--seconds".into(), secs.to_string()]).collect()
        };
        let listen = match mode {
            Mode::Unix => format!("unix:{}", self.engine.dir.join(format!("{}.sock", phase.name())).display()),
            _ => "tcp:127.0.0.1:0".into(),
        };
        let deadline = Instant::now() + PEER_TIMEOUT + Duration::from_secs_f64(secs);
        let cpu0 = self.nsm_cpus()?;
        let dir = &self.engine.dir;
        let mut server = Peer::spawn(self.peer_cmd(mode, &args("server", &listen)), format!("{what} server"), dir)?;
        let addr = server.line(deadline)?;
        Addr::parse(&addr).map_err(|e| format!("{what} server printed {addr:?}, not an address: {e}"))?;
        let mut client = Peer::spawn(self.peer_cmd(mode, &args("client", &addr)), format!("{what} client"), dir)?;
        if phase == Phase::Rr {
            match server.line(deadline)?.as_str() {
                "accepted" => {}
                other => return Err(format!("{what} server printed {other:?} instead of \"accepted\"")),
            }
            self.check_path(mode)?;
            server.go()?;
        }
        let c = client.line(deadline)?;
        client.wait(deadline)?;
        let s = server.line(deadline)?;
        server.wait(deadline)?;
        let cpu1 = self.nsm_cpus()?;
        let parse = |l: &str| serde_json::from_str::<Value>(l).map_err(|e| format!("{what}: bad result {l:?}: {e}"));
        let (mut nsm_cpu, mut idle_nsm_cpu) = (0.0, 0.0);
        for ((name, _), (a, b)) in self.nsms.iter().zip(cpu0.iter().zip(&cpu1)) {
            if mode.nsm() == Some(name.as_str()) {
                nsm_cpu += b - a;
            } else {
                idle_nsm_cpu += b - a;
            }
        }
        Ok(Measured { client: parse(&c)?, server: parse(&s)?, nsm_cpu, idle_nsm_cpu })
    }

    /// Checks, while the rr connection is open, that the mode's NSM serves it on the path the
    /// mode claims: a bench that silently measured the other path would be worse than none.
    fn check_path(&self, mode: Mode) -> Result<(), String> {
        match mode.nsm() {
            Some(_) => path_taken(mode, &netkernel_engine::request(self.engine.socket(), &EngineRequest::Conns)?),
            None => Ok(()),
        }
    }

    /// All phases of one mode, reduced to the table's metrics plus the details.
    fn mode(&self, mode: Mode) -> Result<(Value, f64), String> {
        let before = mode.nsm().map(|n| nsm_stats(self.engine, n)).transpose()?;
        let rr = self.phase(mode, Phase::Rr, 1)?;
        let bulk1 = self.phase(mode, Phase::Bulk, 1)?;
        let bulk4 = self.phase(mode, Phase::Bulk, 4)?;
        let conn = self.phase(mode, Phase::Conn, 1)?;
        if let (Some(name), Some(before)) = (mode.nsm(), before) {
            check_served(self.engine, name, &before, mode == Mode::Colocated)?;
        }
        let f = Measured::f;
        let gb = |m: &Measured| f(&m.client, "bytes") / 1e9;
        let idle = [&rr, &bulk1, &bulk4, &conn].iter().map(|m| m.idle_nsm_cpu).sum::<f64>();
        let v = json!({
            "rr_p50_us": f(&rr.client, "p50_us"), "rr_p99_us": f(&rr.client, "p99_us"),
            "rr_p999_us": f(&rr.client, "p999_us"), "rr_mean_us": f(&rr.client, "mean_us"),
            "rr_max_us": f(&rr.client, "max_us"),
            "rr_cpu_us_per_op": rr.cpu() * 1e6 / (f(&rr.client, "iters") + f(&rr.client, "warmup")),
            "bulk1_gbps": f(&bulk1.client, "gbps"), "bulk1_bytes": f(&bulk1.client, "bytes"),
            "bulk1_cpu_s_per_gb": bulk1.cpu() / gb(&bulk1),
            "bulk4_gbps": f(&bulk4.client, "gbps"), "bulk4_bytes": f(&bulk4.client, "bytes"),
            "bulk4_cpu_s_per_gb": bulk4.cpu() / gb(&bulk4),
            "conn_per_s": f(&conn.client, "per_s"), "conns": f(&conn.client, "conns"),
            "conn_cpu_us_per_conn": conn.cpu() * 1e6 / f(&conn.client, "conns"),
            "cpu_s": {"rr": rr.cpu_split(), "bulk1": bulk1.cpu_split(), "bulk4": bulk4.cpu_split(),
                      "conn": conn.cpu_split()},
            "path_checked": mode.nsm(),
        });
        Ok((v, idle))
    }
}

/// `program args`: natively, or with `guest` (GuestLib, the engine, a tenant) under GuestLib as a
/// guest of that tenant.
fn command(guest: Option<(&Path, &TempEngine, &str)>, program: &str, args: &[&str]) -> Command {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    match guest {
        Some((lib, engine, tenant)) => guestlib::command(lib, engine.socket(), Some(tenant), program, &args),
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

/// Checks that NSM `name` served connections since `before` (its `ctl nsms` entry then), without
/// restarting, and co-located some of them if and only if `colocated`: without this, a GuestLib
/// that failed to hook the programs, or an NSM on the other path, would silently report figures of
/// the wrong path.
fn check_served(engine: &TempEngine, name: &str, before: &Value, colocated: bool) -> Result<(), String> {
    let after = nsm_stats(engine, name)?;
    let delta = |k: &str| after[k].as_i64().unwrap_or(0) - before[k].as_i64().unwrap_or(0);
    if after["pid"] != before["pid"] || delta("restarts") != 0 {
        return Err(format!("NSM {name} restarted during the run (pid {} -> {})", before["pid"], after["pid"]));
    }
    if delta("conns_total") <= 0 {
        return Err(format!("NSM {name} saw no connections: GuestLib did not serve the programs' sockets"));
    }
    if colocated != (delta("conns_colocated") > 0) {
        return Err(format!(
            "NSM {name}: {} of {} connections were co-located, expected {}",
            delta("conns_colocated"),
            delta("conns_total"),
            if colocated { "some" } else { "none" }
        ));
    }
    Ok(())
}

/// Whether `conns` (`ctl conns`) shows the peers of NetKernel mode `mode` connected through its
/// NSM, every connection on the mode's path.
fn path_taken(mode: Mode, conns: &Value) -> Result<(), String> {
    let nsm = mode.nsm().unwrap_or("none");
    let ours: Vec<&Value> = conns
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["nsm"] == nsm && c["state"] != "LISTEN" && c["proto"] != "udp")
        .collect();
    if ours.is_empty() {
        return Err(format!(
            "{}: NSM {nsm} lists no connection while the peers are connected: GuestLib did not serve them",
            mode.key()
        ));
    }
    for c in ours {
        let path = c["path"].as_str().unwrap_or("none");
        if path != nsm {
            return Err(format!(
                "{}: connection {} -> {} took the {path:?} path, not {nsm:?}; the NSM's `colocate` setting did not \
                 take effect, so this mode would measure the wrong path",
                mode.key(),
                c["local"],
                c["remote"]
            ));
        }
    }
    Ok(())
}

/// How loaded the machine was over a run: the CPU that processes other than the bench used, and
/// the time the hypervisor stole.
struct Noise {
    host: (f64, f64),
    own: f64,
    t0: Instant,
}

impl Noise {
    fn start() -> Noise {
        Noise { host: host_cpu(), own: own_cpu(), t0: Instant::now() }
    }

    /// The noise so far, and the wall time. The engine and NSMs started within the run, so all of
    /// their CPU is the bench's.
    fn end(&self, engine: &TempEngine) -> Result<(Value, f64), String> {
        let (host, wall) = (host_cpu(), self.t0.elapsed().as_secs_f64());
        let others = (host.0 - self.host.0) - (own_cpu() - self.own) - engine_cpu(engine)?;
        let machine_s = wall * nproc() as f64;
        let steal = host.1 - self.host.1;
        let noise = json!({"other_cpu_s": others.max(0.0), "other_share": others.max(0.0) / machine_s,
                           "steal_s": steal, "steal_share": steal / machine_s, "loadavg_after": loadavg()});
        Ok((noise, wall))
    }
}

/// CPU seconds the engine and all its NSMs have used so far.
fn engine_cpu(engine: &TempEngine) -> Result<f64, String> {
    let nsms = netkernel_engine::request(engine.socket(), &EngineRequest::Nsms)?;
    let pids: Vec<u32> =
        nsms.as_array().into_iter().flatten().filter_map(|n| n["pid"].as_u64()).map(|p| p as u32).collect();
    Ok(cpu::process(engine.pid())? + cpu::processes(&pids))
}

fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// CPU seconds the whole machine has spent so far: (busy, stolen by the hypervisor).
fn host_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal; guest time is already counted in user.
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    // SAFETY: an integer in and out, no memory passed; sysconf cannot misbehave on any name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (busy as f64 / hz, field(7) as f64 / hz)
}

/// CPU seconds used by this process and its reaped children (the peers).
fn own_cpu() -> f64 {
    cpu::rusage(libc::RUSAGE_SELF) + cpu::rusage(libc::RUSAGE_CHILDREN)
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    json!({
        "nproc": nproc(),
        "cpu": model.unwrap_or("unknown"),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpuidle_driver": cpu::idle_driver(),
        "loadavg_before": loadavg(),
    })
}

fn run(o: &Opts) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating netkernel binary: {e}"))?;
    let lib = guestlib::find()?;
    let machine = machine();
    let noise = Noise::start();
    // First, while nothing else of the bench runs: the queue needs both CPUs to itself.
    eprintln!("netkernel bench: nqe queue ...");
    let queue = queue::run(o.queue_bytes, o.queue_samples)?;
    let engine = TempEngine::with_config(Some(&engine_config()))?;
    let mut nsms = Vec::new();
    for name in modes().iter().filter_map(|m| m.nsm()) {
        nsms.push((name.to_string(), nsm_pid(&engine, name)?));
    }
    let b = Bench { o, exe, lib, engine: &engine, nsms };
    let measured = modes();
    let mut modes = Map::new();
    let mut idle_nsm_cpu = 0.0;
    for &mode in &measured {
        eprintln!("netkernel bench: {} ...", mode.label());
        let (v, idle) = b.mode(mode)?;
        if mode.nsm().is_none() {
            idle_nsm_cpu += idle;
        }
        modes.insert(mode.key().into(), v);
    }
    let (noise, wall) = noise.end(&engine)?;
    let native = &modes[Mode::Native.key()];
    let mut ratio = Map::new();
    for mode in &measured[1..] {
        let m = &modes[mode.key()];
        let r: Map<String, Value> = METRICS
            .iter()
            .map(|(k, _, _)| {
                (k.to_string(), json!(m[k].as_f64().unwrap_or(f64::NAN) / native[k].as_f64().unwrap_or(f64::NAN)))
            })
            .collect();
        ratio.insert(mode.key().into(), Value::Object(r));
    }
    Ok(json!({
        "config": {"rr_iters": o.rr_iters, "rr_bytes": RR_BYTES, "bulk_seconds": o.seconds, "write_bytes": BULK_WRITE,
                   "conn_seconds": o.conn_seconds, "conn_kind": "connect + one 64-byte round trip + close",
                   "queue_bytes_per_size": o.queue_bytes, "queue_latency_samples": o.queue_samples},
        "machine": machine, "wall_s": wall, "noise": noise,
        "modes": modes, "ratio": ratio, "queue": queue,
        "idle_nsm_cpu_s": idle_nsm_cpu,
    }))
}

/// What the engine reports of NSM `name` (`ctl nsms`).
fn nsm_stats(engine: &TempEngine, name: &str) -> Result<Value, String> {
    let nsms = netkernel_engine::request(engine.socket(), &EngineRequest::Nsms)?;
    let found = nsms.as_array().into_iter().flatten().find(|n| n["name"] == name).cloned();
    found.ok_or_else(|| format!("the engine has no NSM {name}:\n{}", engine.log()))
}

/// The pid of NSM `name`: it may come up a little after the engine's socket.
fn nsm_pid(engine: &TempEngine, name: &str) -> Result<u32, String> {
    for _ in 0..250 {
        if let Some(pid) = nsm_stats(engine, name)?["pid"].as_u64().filter(|p| *p > 0) {
            return Ok(pid as u32);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("engine has no running NSM {name} after 5 s:\n{}", engine.log()))
}

fn print_table(r: &Value) {
    let (c, m) = (&r["config"], &r["machine"]);
    println!(
        "{} x {} B round trips; bulk {} s of {} KiB writes, 1 and 4 flows; {} s of connect + 1 round trip + close",
        c["rr_iters"],
        c["rr_bytes"],
        c["bulk_seconds"],
        BULK_WRITE >> 10,
        c["conn_seconds"]
    );
    let pct = |k: &str| r["noise"][k].as_f64().unwrap_or(f64::NAN) * 100.0;
    println!(
        "{} CPUs ({}), kernel {}; other processes used {:.1}% of the machine during the run, the hypervisor \
         stole {:.1}%",
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        pct("other_share"),
        pct("steal_share")
    );
    println!("{}", warm_line(r));
    let measured: Vec<Mode> = MODES[1..].iter().copied().filter(|m| !r["modes"][m.key()].is_null()).collect();
    print!("{:<24} {:>10}", "metric", Mode::Native.label());
    for mode in &measured {
        print!(" {:>10} {:>7}", mode.label(), "ratio");
    }
    println!();
    let modes = &r["modes"];
    for (k, label, dp) in METRICS {
        let v = |mode: Mode| modes[mode.key()][k].as_f64().unwrap_or(f64::NAN);
        print!("{label:<24} {:>10.dp$}", v(Mode::Native));
        for mode in &measured {
            print!(" {:>10.dp$} {:>6.2}x", v(*mode), r["ratio"][mode.key()][k].as_f64().unwrap_or(f64::NAN));
        }
        println!();
    }
    println!(
        "ratio = mode / native TCP. CPU = client + server (+ the mode's NSM). Each NetKernel mode's rr connection \
         took its path (ctl conns). Idle NSM CPU during the native and AF_UNIX runs: {:.3} s",
        r["idle_nsm_cpu_s"].as_f64().unwrap_or(f64::NAN)
    );
    println!();
    println!("nqe queue: record copied into a region's pool, index pushed on the job ring, popped and copied out");
    println!(
        "{:>7} {:>12} {:>9} {:>14} {:>14} {:>10} {:>12}",
        "bytes", "ns/record", "Gbit/s", "one-way p50 ns", "one-way p99 ns", "paper ns", "paper Gbit/s"
    );
    for q in r["queue"].as_array().into_iter().flatten() {
        let f = |k: &str| q[k].as_f64().unwrap_or(f64::NAN);
        let paper = |k: &str| q[k].as_f64().map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:>7} {:>12.1} {:>9.1} {:>14.0} {:>14.0} {:>10} {:>12}",
            q["bytes"].as_u64().unwrap_or(0),
            f("ns_per_record"),
            f("gbps"),
            f("one_way_p50_ns"),
            f("one_way_p99_ns"),
            paper("paper_ns"),
            paper("paper_gbps")
        );
    }
}

/// Whether the run kept CPUs out of deep idle (--warm), for the table's header.
fn warm_line(r: &Value) -> String {
    let driver = r["machine"]["cpuidle_driver"].as_str().unwrap_or("none");
    match r["warm"].as_bool() {
        Some(true) => format!("--warm: CPUs kept out of deep idle (/dev/cpu_dma_latency held at 0; cpuidle {driver})"),
        _ => format!("warm: off (CPUs may enter deep idle between packets; cpuidle {driver})"),
    }
}

/// One bench run of the kind `a` asks for, with the CPUs kept awake throughout if `--warm`.
fn measure(a: &Args) -> Result<Value, String> {
    let _awake = a.warm.then(cpu::keep_awake).transpose()?;
    let secs = a.seconds.unwrap_or(3.0).ceil().max(1.0) as u32;
    let mut r = if a.tools {
        tools::run(a.repeat, secs, a.requests.unwrap_or(1_000_000))?
    } else if a.apps {
        let machine = machine();
        let mut r = apps::run(a.requests.unwrap_or(100_000), secs)?;
        r["machine"] = machine;
        r
    } else {
        let r = run(&Opts::new(a)?)?;
        if let Some(p) = &a.svg {
            chart::write(&r, p)?;
        }
        r
    };
    r["warm"] = json!(a.warm);
    Ok(r)
}

pub fn main(a: Args) -> i32 {
    match measure(&a) {
        Ok(r) if a.json => println!("{r}"),
        Ok(r) if a.tools => tools::print(&r),
        Ok(r) if a.apps => apps::print(&r),
        Ok(r) => print_table(&r),
        Err(e) => {
            eprintln!("netkernel bench: {e}");
            return 1;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(nsm: &str, state: &str, path: &str) -> Value {
        json!({"nsm": nsm, "proto": "tcp", "state": state, "path": path, "local": "127.0.0.1:1", "remote": "127.0.0.1:2"})
    }

    #[test]
    fn a_connection_on_the_other_path_fails_the_mode() {
        let listener = conn("colocated", "LISTEN", "kernel");
        let good =
            json!([listener, conn("colocated", "ESTABLISHED", "colocated"), conn("kernel", "ESTABLISHED", "kernel")]);
        assert_eq!(path_taken(Mode::Colocated, &good), Ok(()));
        assert_eq!(path_taken(Mode::Kernel, &good), Ok(()));
        let wrong = json!([conn("colocated", "ESTABLISHED", "colocated"), conn("colocated", "ESTABLISHED", "kernel")]);
        let e = path_taken(Mode::Colocated, &wrong).unwrap_err();
        assert!(e.contains("took the \"kernel\" path"), "{e}");
        let unreported = json!([{"nsm": "kernel", "proto": "tcp", "state": "ESTABLISHED"}]);
        assert!(path_taken(Mode::Kernel, &unreported).is_err());
        assert!(path_taken(Mode::Kernel, &json!([])).unwrap_err().contains("did not serve them"));
    }
}
