//! Command line: serve · run · ctl · nsm · bench · demo.

use crate::{bench, demo, guestlib};
use clap::{Parser, Subcommand};
use netkernel_control::EngineRequest;
use netkernel_engine::config::Config;
use netkernel_engine::{default_socket, request, Engine};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "netkernel", version, about = "NetKernel: the network stack as a service")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the CoreEngine: tenants, NSMs, attachments, control socket.
    Serve {
        /// TOML configuration (without one: one tenant, one kernel NSM).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Control socket path (default: $NETKERNEL_SOCKET, /run/netkernel/engine.sock as root,
        /// $XDG_RUNTIME_DIR/netkernel/engine.sock otherwise).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464), at /metrics.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Run an unmodified program with its sockets served by NetKernel.
    Run {
        /// Tenant to attach as (default: the first tenant that admits your uid).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Start the program in a fresh network namespace with only loopback (root), so every
        /// byte it exchanges must cross NetKernel.
        #[arg(long)]
        isolate: bool,
        /// Attach with the secret in this file (a tenant's `token_file`), whatever your uid.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        program: Vec<String>,
    },
    /// Ask the engine: status, tenants, nsms, conns; apply its configuration file anew (reload,
    /// as SIGHUP does); replace an NSM's process under its running guests (upgrade NSM
    /// [--binary PATH]); serve a tenant, running guests included, by another NSM (move TENANT
    /// --to NSM); or stop it and its NSMs (shutdown).
    Ctl {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// With top: stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        iterations: Option<u64>,
        /// With upgrade: the NSM's new binary (default: the one it runs).
        #[arg(long)]
        binary: Option<String>,
        /// With upgrade of a user NSM whose previous upgrade's old process still relays
        /// connections: stop that process first (those connections are reset).
        #[arg(long)]
        force: bool,
        /// With move: the NSM to serve the tenant.
        #[arg(long)]
        to: Option<String>,
        #[arg(value_parser = ["status", "tenants", "nsms", "conns", "top", "reload", "upgrade", "move", "shutdown"])]
        what: String,
        /// With upgrade: the NSM; with move: the tenant.
        name: Option<String>,
    },
    /// Print the region ABI version this binary speaks (an engine checks it before `ctl upgrade
    /// --binary`).
    #[command(hide = true)]
    Abi,
    /// Run an NSM (started by the engine, not by hand).
    #[command(hide = true)]
    Nsm(Box<NsmArgs>),
    /// Start an engine, serve an unmodified HTTP server and client through it, compare with native.
    Demo {
        /// Bytes to transfer.
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
    },
    /// Benchmark native TCP, NetKernel (kernel NSM, co-located), AF_UNIX and the nqe queue in one run
    /// (--apps: real servers; --tools: sockperf, iperf3, redis-benchmark and wrk side by side).
    Bench(bench::Args),
    /// Benchmark peer (used by `bench`).
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
    /// Emulate a link between two TAP devices (delay, rate, loss, queue); see scripts/testbed.
    Linkem(linkem::Args),
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("netkernel: {msg}");
    1
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { config, socket, metrics } => serve(config, socket, metrics),
        Cmd::Run { tenant, socket, isolate, token_file, program } => run(tenant, socket, isolate, token_file, program),
        Cmd::Ctl { socket, what, iterations, .. } if what == "top" => top(socket, iterations),
        Cmd::Ctl { socket, json, what, name, binary, force, to, .. } => {
            let req = match (what.as_str(), name) {
                ("status", None) => EngineRequest::Status,
                ("tenants", None) => EngineRequest::Tenants,
                ("nsms", None) => EngineRequest::Nsms,
                ("conns", None) => EngineRequest::Conns,
                ("shutdown", None) => EngineRequest::Shutdown,
                ("reload", None) => EngineRequest::Reload,
                ("upgrade", Some(nsm)) => EngineRequest::Upgrade { nsm, binary, force },
                ("upgrade", None) => {
                    return fail(
                        "ctl upgrade needs the NSM's name: netkernel ctl upgrade NSM [--binary PATH] [--force]",
                    )
                }
                ("move", Some(tenant)) if to.is_some() => EngineRequest::Move { tenant, to: to.unwrap_or_default() },
                ("move", _) => return fail("ctl move needs a tenant and an NSM: netkernel ctl move TENANT --to NSM"),
                (w, Some(extra)) => return fail(format!("ctl {w} takes no argument ({extra:?})")),
                (w, None) => return fail(format!("ctl {w}: unknown request")),
            };
            ctl(socket, json, &what, req)
        }
        Cmd::Abi => {
            println!("{}", netkernel_abi::ABI_VERSION);
            0
        }
        Cmd::Nsm(a) => nsm(*a),
        Cmd::Demo { bytes } => demo::main(bytes),
        Cmd::Bench(a) => bench::main(a),
        Cmd::BenchPeer(a) => bench::peer(a),
        Cmd::Linkem(a) => linkem::main(a),
    }
}

fn serve(config: Option<PathBuf>, socket: Option<PathBuf>, metrics: Option<std::net::SocketAddr>) -> i32 {
    let cfg = match &config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => return fail(format!("bad config: {e}")),
        },
        None => Config::embedded(),
    };
    let socket = socket.or_else(|| cfg.engine.socket.clone()).unwrap_or_else(default_socket);
    // SIGINT/SIGTERM are taken by a thread that exits cleanly, leaving the NSMs that serve guests
    // to the next engine (`ctl shutdown` stops them too).
    // SAFETY: sigset manipulation on a local set, before any thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let metrics = metrics.or(cfg.engine.metrics);
    let (engine, listener) = match Engine::start(cfg, socket) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if let Some(addr) = metrics {
        match netkernel_engine::metrics::serve(engine.clone(), addr) {
            Ok(a) => eprintln!("netkernel engine: metrics on http://{a}/metrics"),
            Err(e) => {
                engine.detach();
                return fail(format!("cannot serve metrics on {addr}: {e}"));
            }
        }
    }
    let e = engine.clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        loop {
            // SAFETY: waits on the blocked set.
            unsafe { libc::sigwait(&set, &mut sig) };
            if sig != libc::SIGHUP {
                break;
            }
            // SIGHUP: the configuration file anew, as `ctl reload`.
            if let Err(e) = e.reload() {
                eprintln!("netkernel engine: SIGHUP: {e}");
            }
        }
        // Live restore: the guests keep their NSMs; the next engine adopts them.
        eprintln!("netkernel engine: signal {sig}, exiting; NSMs serving guests keep running");
        e.detach();
        std::process::exit(0);
    });
    let Err(e) = engine.serve(listener);
    fail(e)
}

/// How long `run` waits for an engine to answer (one may be restarting).
const ENGINE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn run(
    tenant: Option<String>,
    socket: Option<PathBuf>,
    isolate: bool,
    token_file: Option<PathBuf>,
    program: Vec<String>,
) -> i32 {
    let socket = socket.unwrap_or_else(default_socket);
    // Read here so a wrong path fails now, with a message, rather than at the first socket.
    let token_file = match token_file.map(|f| std::fs::canonicalize(&f).map_err(|e| (f, e))) {
        Some(Err((f, e))) => return fail(format!("--token-file {}: {e}", f.display())),
        Some(Ok(f)) => match std::fs::read_to_string(&f) {
            Ok(_) => Some(f),
            Err(e) => return fail(format!("--token-file {}: {e}", f.display())),
        },
        None => None,
    };
    let lib = match guestlib::find() {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    // An engine being restarted answers again within a second or two.
    let deadline = std::time::Instant::now() + ENGINE_WAIT;
    while let Err(e) = request(&socket, &EngineRequest::Status) {
        if std::time::Instant::now() >= deadline {
            return fail(format!("{e}; waited {} s for it", ENGINE_WAIT.as_secs()));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if isolate {
        if let Err(e) = isolate_network() {
            return fail(format!("--isolate: {e}"));
        }
    }
    let mut cmd = guestlib::command(&lib, &socket, tenant.as_deref(), &program[0], &program[1..]);
    if let Some(f) = token_file {
        cmd.env("NETKERNEL_TOKEN_FILE", f);
    }
    if isolate {
        // GuestLib says so when it attaches; the engine checks it against the namespace.
        cmd.env("NETKERNEL_ISOLATED", "1");
    }
    let err = cmd.exec();
    fail(format!("cannot run {}: {err}", program[0]))
}

/// Moves this process into a new network namespace holding only a loopback interface, up. The
/// engine's socket is a path, so it stays reachable; the guest's NetKernel sockets are served in
/// the NSM's namespace; anything GuestLib does not serve reaches nothing.
fn isolate_network() -> Result<(), String> {
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("cannot create a network namespace ({e}); --isolate needs root (CAP_SYS_ADMIN)"));
    }
    // SAFETY: a throwaway socket for the interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: libc::ifreq is integers and bytes only, so all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let ok = unsafe {
        libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0
        }
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: closing our socket.
    unsafe { libc::close(fd) };
    if ok {
        Ok(())
    } else {
        Err(format!("bringing up loopback: {e}"))
    }
}

/// `ctl top`: the live connections every second, busiest first, with their throughput.
fn top(socket: Option<PathBuf>, iterations: Option<u64>) -> i32 {
    use std::collections::HashMap;
    use std::io::IsTerminal;
    let socket = socket.unwrap_or_else(default_socket);
    let tty = std::io::stdout().is_terminal();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut at = std::time::Instant::now();
    let mut n = 0u64;
    loop {
        let conns = match request(&socket, &EngineRequest::Conns) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        let dt = at.elapsed().as_secs_f64().max(1e-3);
        at = std::time::Instant::now();
        let mut rows: Vec<(f64, Vec<String>)> = Vec::new();
        let mut now: HashMap<String, u64> = HashMap::new();
        for c in conns.as_array().into_iter().flatten() {
            let key = format!("{}|{}|{}|{}", cell(&c["pid"]), cell(&c["proto"]), cell(&c["local"]), cell(&c["remote"]));
            let bytes = c["bytes_in"].as_u64().unwrap_or(0) + c["bytes_out"].as_u64().unwrap_or(0);
            let rate = last.get(&key).map_or(0.0, |b| bytes.saturating_sub(*b) as f64 * 8.0 / dt / 1e6);
            now.insert(key, bytes);
            let cols = ["tenant", "nsm", "pid", "local", "remote", "state", "path", "rtt_us", "cwnd", "retrans"];
            let mut row: Vec<String> = vec![format!("{rate:.1}")];
            row.extend(cols.iter().map(|k| cell(&c[*k])));
            rows.push((rate, row));
        }
        last = now;
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        println!("netkernel top — {} connection(s), Mbit/s over the last {dt:.1} s", rows.len());
        let table: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|(_, r)| {
                let keys =
                    ["mbps", "tenant", "nsm", "pid", "local", "remote", "state", "path", "rtt_us", "cwnd", "retrans"];
                serde_json::Value::Object(keys.iter().zip(r).map(|(k, v)| (k.to_string(), v.into())).collect())
            })
            .collect();
        print_table(
            &serde_json::Value::Array(table),
            &["mbps", "tenant", "nsm", "pid", "local", "remote", "state", "path", "rtt_us", "cwnd", "retrans"],
        );
        n += 1;
        if iterations.is_some_and(|i| n >= i) {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn ctl(socket: Option<PathBuf>, json: bool, what: &str, req: EngineRequest) -> i32 {
    let socket = socket.unwrap_or_else(default_socket);
    let v = match request(&socket, &req) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    match what {
        "status" => print_status(&v),
        "shutdown" => println!("engine stopped; its NSMs are stopped and their guests' sockets reset"),
        "move" => {
            println!(
                "tenant {} moved from NSM {} to {}: {} attachment(s), {} socket(s) moved; blackout {:.1} ms",
                cell(&v["tenant"]),
                cell(&v["from"]),
                cell(&v["to"]),
                v["attachments"],
                v["sockets"],
                v["blackout_ms"].as_f64().unwrap_or_default()
            );
            println!("  {}", cell(&v["note"]));
        }
        "upgrade" => {
            println!(
                "NSM {} upgraded: pid {} -> {} ({}); {} attachment(s), {} socket(s) handed over; blackout {:.1} ms",
                cell(&v["nsm"]),
                v["old_pid"],
                v["new_pid"],
                cell(&v["binary"]),
                v["attachments"],
                v["sockets"],
                v["blackout_ms"].as_f64().unwrap_or_default()
            );
            if v["draining_attachments"].as_u64().unwrap_or(0) > 0 {
                println!(
                    "  pid {} hands its {} attachment(s) ({} socket(s)) to pid {} as soon as no handshake holds them; \
                     it relays their connections until they close, then exits",
                    v["old_pid"], v["draining_attachments"], v["draining_sockets"], v["new_pid"]
                );
            }
        }
        "reload" => {
            let list =
                |k: &str| v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "));
            println!("reloaded {}", cell(&v["config"]));
            for (k, what) in [
                ("added", "may attach"),
                ("removed", "guests reset"),
                ("changed", "in effect now"),
                ("nsms", "congestion control of new connections"),
                ("nsms_added", "NSMs started"),
            ] {
                println!("  {k:8} {} ({what})", list(k).filter(|l| !l.is_empty()).unwrap_or_else(|| "-".into()));
            }
        }
        "tenants" => print_table(
            &v,
            &[
                "name",
                "nsm",
                "uids",
                "gids",
                "token",
                "attachments",
                "bytes_in",
                "bytes_out",
                "conns_total",
                "refused",
                "throttled",
                "violations",
                "cpu_weight",
                "nsm_cpu_seconds",
            ],
        ),
        "nsms" => print_table(&v, NSM_COLUMNS),
        _ => print_table(
            &v,
            &[
                "tenant",
                "nsm",
                "pid",
                "proto",
                "local",
                "remote",
                "state",
                "path",
                "bytes_in",
                "bytes_out",
                "rtt_us",
                "cwnd",
                "retrans",
            ],
        ),
    }
    0
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        serde_json::Value::Array(a) if a.is_empty() => "-".into(),
        serde_json::Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn print_table(v: &serde_json::Value, cols: &[&str]) {
    let rows: Vec<Vec<String>> =
        v.as_array().into_iter().flatten().map(|r| cols.iter().map(|c| cell(&r[*c])).collect()).collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| rows.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn print_status(v: &serde_json::Value) {
    println!(
        "engine      pid {} · version {} · up {:.0}s",
        cell(&v["pid"]),
        cell(&v["version"]),
        v["uptime_s"].as_f64().unwrap_or(0.0)
    );
    println!("socket      {}", cell(&v["socket"]));
    println!("regions     {} bytes each, {} pages", cell(&v["region_bytes"]), cell(&v["region_backing"]));
    println!("attachments {}   tenants {}", cell(&v["attachments"]), cell(&v["tenants"]));
    println!();
    print_table(&v["nsms"], NSM_COLUMNS);
}

const NSM_COLUMNS: &[&str] = &[
    "name",
    "kind",
    "congestion",
    "scheduler",
    "executors",
    "cpu_seconds",
    "pid",
    "draining",
    "relayed",
    "restarts",
    "upgrades",
    "attachments",
    "conns_open",
    "conns_total",
    "conns_colocated",
    "bytes_in",
    "bytes_out",
    "violations",
];

/// How the engine starts an NSM.
#[derive(clap::Args)]
struct NsmArgs {
    #[arg(long)]
    kind: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    control_fd: i32,
    #[arg(long)]
    congestion: Option<String>,
    /// The order tasks run in: fifo, fair or latency.
    #[arg(long, default_value = "fifo")]
    scheduler: netkernel_service::sched::Kind,
    /// Executor threads at most: a number, or "auto" (the cores this process may use).
    #[arg(long, default_value = "1")]
    executors: String,
    /// NAME=ADDRESS this NSM resolves itself (repeatable).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// A unix socket path where a restarted engine reconnects to adopt this NSM.
    #[arg(long)]
    listen: Option<PathBuf>,
    /// The new process of a user NSM's upgrade: its link and rendezvous socket come from the
    /// old process, through the engine's first message (service/src/drain.rs).
    #[arg(long)]
    successor: bool,
    #[command(flatten)]
    user: UserNsmArgs,
}

/// A user NSM's link, as the engine passes it (`kind = "user"`).
#[derive(clap::Args)]
struct UserNsmArgs {
    /// The link's device, inherited: a TAP device's fd.
    #[arg(long)]
    device_fd: Option<i32>,
    /// The link's device by name: a veth end in this NSM's namespace (AF_PACKET).
    #[arg(long)]
    device: Option<String>,
    /// "tap" or "packet".
    #[arg(long, default_value = "tap")]
    link: String,
    #[arg(long)]
    address: Option<String>,
    #[arg(long)]
    gateway: Option<String>,
    #[arg(long)]
    address6: Option<String>,
    #[arg(long)]
    gateway6: Option<String>,
    /// Where DNS queries go (repeatable; default: /etc/resolv.conf's nameservers).
    #[arg(long = "nameserver")]
    nameservers: Vec<std::net::IpAddr>,
}

impl UserNsmArgs {
    fn config(&self, congestion: Option<&str>) -> Result<netkernel_nsm_user::UserConfig, String> {
        let (Some(address), Some(gateway)) = (&self.address, &self.gateway) else {
            return Err("a user NSM needs --address and --gateway".into());
        };
        netkernel_nsm_user::UserConfig::parse(
            &self.link,
            address,
            self.address6.as_deref(),
            gateway,
            self.gateway6.as_deref(),
            congestion,
        )
        .map_err(|e| e.to_string())
    }

    fn stack(&self, congestion: Option<&str>) -> Result<netkernel_nsm_user::UserStack, String> {
        let cfg = self.config(congestion)?;
        let device = match (self.device_fd, &self.device) {
            // SAFETY: the engine passed this fd at exec for this NSM alone; nothing else owns it.
            (Some(fd), None) => unsafe { OwnedFd::from_raw_fd(fd) },
            (None, Some(name)) => netkernel_nsm_user::open_packet(name).map_err(|e| format!("{name}: {e}"))?,
            _ => return Err("a user NSM needs one of --device-fd and --device".into()),
        };
        netkernel_nsm_user::UserStack::new(cfg, device)
    }
}

fn nsm(a: NsmArgs) -> i32 {
    // SAFETY: the engine passed this fd to us at exec and nothing else owns it.
    let control = unsafe { OwnedFd::from_raw_fd(a.control_fd) };
    // SAFETY: setting FD_CLOEXEC on our own fd; no pointers.
    unsafe { libc::fcntl(a.control_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let r = match a.kind.as_str() {
        "kernel" => netkernel_nsm_kernel::KernelStack::new(a.congestion.clone()).and_then(|stack| {
            let cc = a.congestion.clone();
            let more = move || netkernel_nsm_kernel::KernelStack::new(cc.clone()).ok();
            let (max, elastic) = executors(&a.executors);
            serve_nsm(stack, &a, control, Vec::new(), |svc| Ok(svc.with_executors(max, elastic, more)))
        }),
        // The old process of an upgrade hands over its link and serves on beside this one.
        "user" if a.successor => netkernel_service::drain::await_succession(&control).and_then(|s| {
            let cfg = a.user.config(a.congestion.as_deref())?;
            let stack = netkernel_nsm_user::UserStack::successor(cfg, s.wire, s.chan, s.ports)?;
            serve_nsm(stack, &a, control, a.user.nameservers.clone(), |svc| {
                let svc = svc.with_predecessor(s.predecessor, s.rendezvous).map_err(|e| e.to_string())?;
                svc.succeeded().map_err(|e| format!("engine channel: {e}"))?;
                Ok(svc)
            })
        }),
        // One TAP device, one smoltcp interface: a user NSM has one executor.
        "user" => a
            .user
            .stack(a.congestion.as_deref())
            .and_then(|stack| serve_nsm(stack, &a, control, a.user.nameservers.clone(), Ok)),
        other => Err(format!("unknown NSM kind {other:?} (known: kernel, user)")),
    };
    match r {
        Ok(()) => 0,
        Err(e) => fail(format!("NSM {}: {e}", a.name)),
    }
}

/// The most executors `--executors` allows, and whether they follow the load ("auto": up to
/// the cores this process may use, as the work calls for them; a number: attachments spread
/// over that many).
fn executors(arg: &str) -> (usize, bool) {
    match arg {
        "auto" => (std::thread::available_parallelism().map_or(1, |n| n.get()), true),
        n => (n.parse().unwrap_or(1), false),
    }
}

/// Runs ServiceLib over `stack` until the engine and the last guest are gone.
fn serve_nsm<S: netkernel_service::Stack>(
    stack: S,
    a: &NsmArgs,
    control: OwnedFd,
    nameservers: Vec<std::net::IpAddr>,
    more: impl FnOnce(netkernel_service::Service<S>) -> Result<netkernel_service::Service<S>, String>,
) -> Result<(), String> {
    let hosts: HashMap<String, String> =
        a.hosts.iter().filter_map(|h| h.split_once('=')).map(|(n, a)| (n.to_string(), a.to_string())).collect();
    let mut svc = netkernel_service::Service::new(stack, a.name.clone(), control)
        .map_err(|e| e.to_string())?
        .with_hosts(hosts)
        .with_nameservers(nameservers)
        .with_scheduler(a.scheduler);
    svc = more(svc)?;
    if let Some(path) = &a.listen {
        // A socket left by this NSM's predecessor (which is gone: the engine starts one NSM per
        // name) is replaced.
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        // Only the engine's uid may adopt the NSM (it checks SO_PEERCRED too).
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        svc = svc.with_rendezvous(listener).map_err(|e| e.to_string())?;
    }
    svc.run().map_err(|e| e.to_string())
}
