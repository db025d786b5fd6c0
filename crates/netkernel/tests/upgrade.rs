//! `netkernel ctl upgrade`: an NSM's process replaced by a new one under running guests, which
//! see no error, lose no byte and only pause (service/src/handover.rs).

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `netkernel ctl upgrade NSM [--binary PATH] --json`: Ok(report) or Err(message).
fn upgrade(engine: &TestEngine, nsm: &str, binary: Option<&std::path::Path>) -> Result<serde_json::Value, String> {
    match binary {
        Some(b) => engine.ctl_try(&["upgrade", nsm, "--binary", b.to_str().unwrap()]),
        None => engine.ctl_try(&["upgrade", nsm]),
    }
}

/// Sends 1 GiB paced over about 20 s to the port on stdin's first line and prints the sha256 of
/// what it sent.
const SENDER: &str = r#"
import hashlib, random, socket, sys, time
port = int(sys.stdin.readline())
block = random.Random(7).randbytes(1 << 20)
h = hashlib.sha256()
s = socket.create_connection(('127.0.0.1', port))
start = time.monotonic()
for i in range(1024):
    chunk = block[i % 997:] + block[:i % 997]
    s.sendall(chunk)
    h.update(chunk)
    ahead = (i + 1) / 52.0 - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
s.close()
print(h.hexdigest(), flush=True)
"#;

/// Accepts one connection, prints its port first ("ready PORT"), then the byte count and sha256
/// of everything received.
const RECEIVER: &str = r#"
import hashlib, socket
l = socket.create_server(('127.0.0.1', 0))
print('ready', l.getsockname()[1], flush=True)
c, _ = l.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"#;

fn wait_for_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The acceptance run of issue 13: ten upgrades two seconds apart while iperf3, redis-benchmark
/// and a 1 GiB transfer checked by sha256 run between guests of the NSM. Co-location is off, so
/// every byte crosses kernel sockets that move from process to process.
#[test]
fn ten_upgrades_under_iperf3_redis_and_a_checked_transfer() {
    let (iperf3, redis_server) = (require("iperf3"), require("redis-server"));
    require("redis-benchmark");
    require("python3");
    let metrics = free_port();
    let engine = TestEngine::with_config(&format!(
        "[engine]\nmetrics = \"127.0.0.1:{metrics}\"\n\n[[nsm]]\nname = \"k\"\ncolocate = false\n\n\
         [[tenant]]\nname = \"t\"\nnsm = \"k\"\n"
    ));

    let iperf_port = free_port().to_string();
    let mut iperf_server = engine
        .run(iperf3.to_str().unwrap(), &["-s", "-1", "--forceflush", "-p", &iperf_port])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut iperf_out = BufReader::new(iperf_server.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("Server listening") {
        line.clear();
        assert!(iperf_out.read_line(&mut line).unwrap() > 0, "iperf3 -s ended: {}", engine.log());
    }
    let redis_port = free_port().to_string();
    let mut redis = engine
        .run(redis_server.to_str().unwrap(), &["--port", &redis_port, "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(redis_port.parse().unwrap());

    let mut receiver = engine.run("python3", &["-c", RECEIVER]).stdout(Stdio::piped()).spawn().unwrap();
    let mut received = BufReader::new(receiver.stdout.take().unwrap());
    line.clear();
    received.read_line(&mut line).unwrap();
    let port = line.trim().strip_prefix("ready ").expect("receiver ready").to_string();
    let mut sender =
        engine.run("python3", &["-c", SENDER]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    writeln!(sender.stdin.take().unwrap(), "{port}").unwrap();

    let iperf_client = engine
        .run(iperf3.to_str().unwrap(), &["-c", "127.0.0.1", "-p", &iperf_port, "-t", "26", "-i", "1", "-J"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let bench = format!(
        "end=$(($(date +%s) + 23)); n=0; while [ $(date +%s) -lt $end ]; do \
         redis-benchmark -p {redis_port} -t set,get -n 20000 -P 16 -q || exit 1; n=$((n+1)); done; echo rounds $n"
    );
    let redis_bench = engine.run("sh", &["-c", &bench]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    std::thread::sleep(Duration::from_secs(2));
    let mut pid = engine.nsm()["pid"].as_u64().unwrap();
    let mut blackouts = Vec::new();
    for i in 0..10 {
        let r = upgrade(&engine, "k", None).unwrap_or_else(|e| panic!("upgrade {i}: {e}\n{}", engine.log()));
        assert_eq!(r["old_pid"].as_u64(), Some(pid), "{r}");
        let new = r["new_pid"].as_u64().unwrap();
        assert_ne!(new, pid, "{r}");
        assert_eq!(engine.nsm()["pid"].as_u64(), Some(new), "ctl nsms shows the new pid at once");
        assert!(r["sockets"].as_u64().unwrap() >= 6, "the guests' sockets moved: {r}");
        blackouts.push(r["blackout_ms"].as_f64().unwrap());
        pid = new;
        std::thread::sleep(Duration::from_secs(2));
    }

    let iperf = iperf_client.wait_with_output().unwrap();
    assert!(iperf.status.success(), "iperf3 failed: {}", String::from_utf8_lossy(&iperf.stdout));
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout).unwrap();
    let intervals = report["intervals"].as_array().unwrap();
    assert!(intervals.len() >= 25, "{report}");
    for iv in intervals {
        assert!(iv["sum"]["bytes"].as_u64().unwrap() > 0, "an iperf3 interval at zero: {iv}");
    }
    let redis_out = redis_bench.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&redis_out.stdout);
    assert!(redis_out.status.success(), "redis-benchmark failed: {text}{}", String::from_utf8_lossy(&redis_out.stderr));
    assert!(text.contains("rounds") && text.matches("GET:").count() >= 2, "{text}");

    let sent = sender.wait_with_output().unwrap();
    assert!(sent.status.success());
    line.clear();
    received.read_line(&mut line).unwrap();
    let got: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(got[0], (1u64 << 30).to_string(), "every byte arrived, once");
    assert_eq!(got[1], String::from_utf8_lossy(&sent.stdout).trim(), "sha256 of what was sent and received");
    let _ = receiver.wait();
    let _ = iperf_server.wait();
    let _ = redis.kill();
    let _ = redis.wait();

    blackouts.sort_by(f64::total_cmp);
    let median = (blackouts[4] + blackouts[5]) / 2.0;
    eprintln!("blackouts (ms, sorted): {blackouts:?}; median {median:.1}");
    assert!(median < 50.0 && blackouts[9] < 200.0, "blackouts {blackouts:?}");
    assert!(!engine.log().contains("died"), "{}", engine.log());
    // Telemetry counts them: ctl nsms and Prometheus.
    let nsm = engine.nsm();
    assert_eq!((nsm["upgrades"].as_u64(), nsm["restarts"].as_u64()), (Some(10), Some(0)), "{nsm}");
    let text = metrics_response(&format!("127.0.0.1:{metrics}"));
    assert!(text.contains("netkernel_nsm_upgrades_total{nsm=\"k\"} 10"), "{text}");
    assert!(text.contains("netkernel_nsm_upgrade_blackout_seconds{nsm=\"k\"} 0."), "{text}");
}

/// A guest that drives co-located connections from its stdin: a listener, a connection with
/// bytes in flight, one waiting in the listener's backlog.
const PIPES: &str = r#"
import socket, sys
l = socket.create_server(('127.0.0.1', 0))
port = l.getsockname()[1]
c = socket.create_connection(('127.0.0.1', port))
s, _ = l.accept()
c.sendall(b'before the upgrade')
waiting = socket.create_connection(('127.0.0.1', port))
print('ready', flush=True)
for line in sys.stdin:
    try:
        if line.startswith('check'):
            a = s.recv(100)
            c.sendall(b'after')
            b = s.recv(100)
            w, _ = l.accept()
            waiting.sendall(b'queued')
            x = w.recv(100)
            n = socket.create_connection(('127.0.0.1', port))
            m, _ = l.accept()
            n.sendall(b'new')
            print(a.decode(), b.decode(), x.decode(), m.recv(10).decode(), flush=True)
        else:
            c.sendall(b'ping')
            print(s.recv(10).decode(), flush=True)
    except OSError as e:
        print('error', e.errno, flush=True)
"#;

/// Co-located connections move with their unread bytes, a connection waiting in a listener's
/// backlog is accepted after the upgrade, the listener takes new co-located connections; the new
/// process is supervised as the old one was (killed, its guests are reset).
#[test]
fn colocated_pipes_and_backlogs_move_and_the_new_process_is_supervised() {
    require("python3");
    let engine = TestEngine::start();
    let mut c = engine.run("python3", &["-c", PIPES]);
    let mut guest = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = guest.stdin.take().unwrap();
    let mut out = BufReader::new(guest.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let mut ask = |what: &str| {
        writeln!(stdin, "{what}").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    let before = engine.nsm();
    let r = upgrade(&engine, "kernel", None).unwrap();
    assert_eq!(r["attachments"], 1, "{r}");
    assert_eq!(ask("check"), "before the upgrade after queued new");
    let after = engine.nsm();
    assert_eq!(after["pid"], r["new_pid"]);
    assert!(
        after["conns_colocated"].as_u64() > before["conns_colocated"].as_u64(),
        "counters carry over and the new connection was co-located: {before} {after}"
    );
    assert_eq!(ask("ping"), "ping");
    // The old process is gone, the new one idles (no spinning after a takeover).
    let old = std::path::PathBuf::from(format!("/proc/{}", r["old_pid"]));
    let start = Instant::now();
    while old.exists() && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!old.exists(), "the old NSM process did not exit");
    let new_pid = r["new_pid"].as_u64().unwrap() as u32;
    let before = cpu_ticks(new_pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(new_pid) - before;
    assert!(ticks <= 3, "the idle new NSM used {ticks} ticks in 3 s");

    // The new process is the NSM now: its death resets the guest, within a second.
    let start = Instant::now();
    // SAFETY: integers only; the pid is the NSM the engine reported a moment ago.
    unsafe { libc::kill(r["new_pid"].as_u64().unwrap() as i32, libc::SIGKILL) };
    let answer = ask("ping");
    assert!(answer.starts_with("error"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    drop(stdin);
    let _ = guest.wait();
}

/// A binary that speaks another region ABI is refused, and the old NSM serves on.
#[test]
fn a_binary_of_another_abi_is_refused() {
    require("python3");
    let engine = TestEngine::start();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("netkernel-next");
    std::fs::write(&other, "#!/bin/sh\n[ \"$1\" = abi ] && echo 999\n").unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut guest = engine.python_ready(
        "import socket,sys\nl=socket.create_server(('127.0.0.1',0))\nprint('ready',flush=True)\nsys.stdin.read()",
    );
    let pid = engine.nsm()["pid"].clone();
    let e = upgrade(&engine, "kernel", Some(&other)).unwrap_err();
    assert!(e.contains("region ABI 999") && e.contains("old NSM serves on"), "{e}");
    let e = upgrade(&engine, "nope", None).unwrap_err();
    assert!(e.contains("no NSM named \"nope\""), "{e}");
    assert_eq!(engine.nsm()["pid"], pid);
    assert_eq!(engine.nsm()["attachments"], 1);
    // The same binary is fine, and the upgrade keeps serving the guest.
    let r = upgrade(&engine, "kernel", Some(std::path::Path::new(env!("CARGO_BIN_EXE_netkernel")))).unwrap();
    assert_ne!(r["new_pid"], pid);
    drop(guest.stdin.take());
    let _ = guest.wait();
}

/// `netkernel ctl move TENANT --to NSM --json`: Ok(report) or Err(message).
fn move_tenant(engine: &TestEngine, tenant: &str, to: &str) -> Result<serde_json::Value, String> {
    engine.ctl_try(&["move", tenant, "--to", to])
}

/// A guest with a connection to a native server (port on argv), a listener, and, on request, a
/// co-located connection to another tenant's listener (port on stdin).
const MOVER: &str = r#"
import socket, sys
def cc(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b'\0').decode()
c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
l = socket.create_server(('127.0.0.1', 0))
print('ready', l.getsockname()[1], cc(c), flush=True)
other = None
for line in sys.stdin:
    try:
        cmd = line.split()
        if cmd[0] == 'join':
            other = socket.create_connection(('127.0.0.1', int(cmd[1])))
            print('joined', flush=True)
        elif cmd[0] == 'leave':
            other.close()
            print('left', flush=True)
        else:
            c.sendall(b'still here')
            a, _ = l.accept()
            n = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
            print(cc(c), c.getsockname()[1], a.recv(10).decode(), cc(n), flush=True)
    except OSError as e:
        print('error', e.errno, flush=True)
"#;

/// A tenant moves to another kernel NSM with its running guest: the same connection goes on
/// (same port, no reconnect) and takes the target's congestion control, the guest's listener
/// keeps accepting, new sockets use the target; a co-located connection to a tenant that stays
/// blocks the move until it is closed; `ctl tenants` and `ctl conns` say what is in effect.
#[test]
fn a_tenant_moves_to_another_nsm_with_its_connections() {
    require("python3");
    let cubic_bbr = "[[nsm]]\nname = \"c\"\ncongestion = \"cubic\"\n\n[[nsm]]\nname = \"b\"\ncongestion = \"bbr\"\n\n";
    let mut engine = TestEngine::with_config(&format!(
        "{cubic_bbr}[[tenant]]\nname = \"t\"\nnsm = \"c\"\n\n[[tenant]]\nname = \"u\"\nnsm = \"c\"\n"
    ));
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port().to_string();
    let mut c = Command::new(env!("CARGO_BIN_EXE_netkernel"));
    c.args(["run", "--tenant", "t", "--socket"]).arg(&engine.socket).args(["--", "python3", "-c", MOVER, &port]);
    let mut guest = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let (mut conn, _) = server.accept().unwrap();
    let mut stdin = guest.stdin.take().unwrap();
    let mut out = BufReader::new(guest.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let ready: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert_eq!((ready[0].as_str(), ready[2].as_str()), ("ready", "cubic"), "{line}");
    let guest_port = conn.peer_addr().unwrap().port();
    let mut ask = |what: &str| {
        writeln!(stdin, "{what}").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().to_string()
    };

    // Tenant u's guest listens; t's guest joins it by the co-located path: t cannot move alone.
    let script =
        "import socket,sys\nl=socket.create_server(('127.0.0.1',0))\nprint('ready',l.getsockname()[1],flush=True)\n\
                  c,_=l.accept()\nsys.stdin.read()";
    let mut c = Command::new(env!("CARGO_BIN_EXE_netkernel"));
    c.args(["run", "--tenant", "u", "--socket"]).arg(&engine.socket).args(["--", "python3", "-c", script]);
    let mut other = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut other_out = BufReader::new(other.stdout.take().unwrap());
    line.clear();
    other_out.read_line(&mut line).unwrap();
    let other_port = line.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(ask(&format!("join {other_port}")), "joined");
    let e = move_tenant(&engine, "t", "b").unwrap_err();
    assert!(e.contains("co-located connection") && e.contains("nothing moved"), "{e}");
    assert_eq!(engine.ctl("tenants")[0]["nsm"], "c", "a refused move changes nothing");
    assert_eq!(ask("leave"), "left");

    let r = move_tenant(&engine, "t", "b").unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str(), r["attachments"].as_u64()),
        (Some("c"), Some("b"), Some(1)),
        "{r}"
    );
    assert!(r["note"].as_str().unwrap().contains("configuration says nsm = \"c\""), "{r}");
    // The same connection (same port) goes on, with BBR now; the listener accepts; new sockets are b's.
    let mut l = std::net::TcpStream::connect(("127.0.0.1", ready[1].parse::<u16>().unwrap())).unwrap();
    l.write_all(b"to listener").unwrap();
    let answer = ask("check");
    let mut got = [0u8; 10];
    std::io::Read::read_exact(&mut conn, &mut got).unwrap();
    assert_eq!(&got, b"still here");
    assert_eq!(answer, format!("bbr {guest_port} to listene bbr"), "{}", engine.log());
    let tenants = engine.ctl("tenants");
    let t = tenants.as_array().unwrap().iter().find(|t| t["name"] == "t").unwrap();
    assert_eq!((t["nsm"].as_str(), t["configured_nsm"].as_str()), (Some("b"), Some("c")), "{t}");
    let conns = engine.ctl("conns");
    let mine: Vec<&serde_json::Value> = conns.as_array().unwrap().iter().filter(|c| c["tenant"] == "t").collect();
    assert!(!mine.is_empty() && mine.iter().all(|c| c["nsm"] == "b"), "{conns}");
    // A restarted engine keeps the move (the state directory has it).
    engine.stop_with(libc::SIGTERM);
    engine.restart();
    let tenants = engine.ctl("tenants");
    let t = tenants.as_array().unwrap().iter().find(|t| t["name"] == "t").unwrap();
    assert_eq!((t["nsm"].as_str(), t["configured_nsm"].as_str()), (Some("b"), Some("c")), "{t}");
    drop(other.stdin.take());
    let _ = other.wait();
    let _ = guest.kill();
    let _ = guest.wait();
}

/// An NSM with two executors upgrades too: the second executor's attachments come to the first,
/// then everything goes to the new process.
#[test]
fn an_nsm_with_two_executors_upgrades() {
    require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\nexecutors = 2\ncolocate = false\n\n[[tenant]]\nname = \"t\"\nnsm = \"k\"\n",
    );
    let mut guests = [echo_guest(&engine, "t"), echo_guest(&engine, "t")];
    assert_eq!(engine.nsm()["executors"], 2, "{}", engine.nsm());
    let r = upgrade(&engine, "k", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    assert_eq!((r["attachments"].as_u64(), r["sockets"].as_u64()), (Some(2), Some(6)), "{r}");
    for g in guests.iter_mut() {
        assert_eq!(g.ask("after the upgrade"), "ok");
    }
}

/// An upgraded NSM keeps the rendezvous socket: an engine killed after the upgrade is replaced
/// by one that adopts the new process, lists the guest's connections and upgrades it again.
#[test]
fn an_upgraded_nsm_is_adopted_by_a_restarted_engine() {
    require("python3");
    let mut engine = TestEngine::start();
    let mut g = echo_guest(&engine, "default");
    let first = upgrade(&engine, "kernel", None).unwrap();
    engine.stop_with(libc::SIGKILL);
    assert_eq!(g.ask("no engine"), "ok");
    engine.restart();
    let nsm = engine.nsm();
    assert_eq!(nsm["pid"], first["new_pid"], "the new engine adopted the upgraded process: {nsm}");
    assert_eq!(nsm["attachments"], 1);
    let second = upgrade(&engine, "kernel", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    assert_eq!(second["old_pid"], first["new_pid"]);
    assert_eq!(g.ask("after two upgrades and an engine restart"), "ok");
}

/// A tenant spread over two executors moves whole: the second executor's attachments come to the
/// first, then go to the target NSM with the first's.
#[test]
fn a_tenant_on_two_executors_moves() {
    require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\nexecutors = 2\ncolocate = false\n\n[[nsm]]\nname = \"k2\"\n\n\
         [[tenant]]\nname = \"t\"\nnsm = \"k\"\n",
    );
    let mut guests = [echo_guest(&engine, "t"), echo_guest(&engine, "t")];
    assert_eq!(engine.nsm()["executors"], 2, "{}", engine.nsm());
    let r = move_tenant(&engine, "t", "k2").unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    assert_eq!((r["attachments"].as_u64(), r["sockets"].as_u64()), (Some(2), Some(6)), "{r}");
    for g in guests.iter_mut() {
        assert_eq!(g.ask("on k2"), "ok");
    }
    let nsms = engine.ctl("nsms");
    let k2 = nsms.as_array().unwrap().iter().find(|n| n["name"] == "k2").unwrap();
    assert_eq!(k2["attachments"], 2, "{nsms}");
}

/// A closed socket still sending its queued bytes moves too: the old process exits at once
/// although the peer has not read, and the peer then reads every byte, in order.
#[test]
fn a_closing_socket_with_queued_bytes_moves_and_delivers_them() {
    require("python3");
    let engine =
        TestEngine::with_config("[[nsm]]\nname = \"k\"\ncolocate = false\n\n[[tenant]]\nname = \"t\"\nnsm = \"k\"\n");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let small = 4096i32;
    // SAFETY: setsockopt on our own listener with a live int of the size passed.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const i32).cast(),
            4,
        )
    };
    let port = listener.local_addr().unwrap().port().to_string();
    // Small non-blocking writes of a counting pattern until the stack pushes back, then close.
    let script = "import socket,sys\nc=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
                  c.setsockopt(socket.SOL_SOCKET,socket.SO_SNDBUF,4096)\nc.setblocking(False)\nn=0\n\
                  while True:\n    b=bytes((n+i)%251 for i in range(8192))\n    try:\n        k=c.send(b)\n    \
                  except BlockingIOError:\n        break\n    n+=k\nc.close()\nprint(n,flush=True)\n";
    let guest = engine.run("python3", &["-c", script, &port]).stdout(Stdio::piped()).spawn().unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let out = guest.wait_with_output().unwrap();
    let sent: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let r = upgrade(&engine, "k", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    let old = std::path::PathBuf::from(format!("/proc/{}", r["old_pid"]));
    let start = Instant::now();
    while old.exists() && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!old.exists(), "the old NSM waited for its closing socket instead of handing it over");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut got).unwrap();
    assert_eq!(got.len(), sent, "every byte the guest was told was sent arrives, once");
    assert!(got.iter().enumerate().all(|(i, &b)| b as usize == i % 251), "the bytes arrive in order");
}

/// A move to a user NSM (whose connections live in its process) drains: the running guest keeps
/// its connection on the kernel NSM, a new guest of the tenant attaches to the user NSM.
#[test]
fn a_move_to_a_user_nsm_drains() {
    if lacks_root("a_move_to_a_user_nsm_drains: a user NSM needs root (TAP device, namespace)") {
        return;
    }
    require("python3");
    let (user, _) = user_nsm_config("");
    let engine =
        TestEngine::with_config(&format!("[[nsm]]\nname = \"k\"\n\n{user}\n[[tenant]]\nname = \"t\"\nnsm = \"k\"\n"));
    let mut old = echo_guest(&engine, "t");
    let r = move_tenant(&engine, "t", "user").unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    assert_eq!((r["attachments"].as_u64(), r["draining"].as_u64()), (Some(0), Some(1)), "{r}");
    assert!(r["note"].as_str().unwrap().contains("stay on NSM k"), "{r}");
    assert_eq!(old.ask("still on k"), "ok");
    let mut new = echo_guest(&engine, "t");
    assert_eq!(new.ask("on the user NSM"), "ok");
    let conns = engine.ctl("conns");
    let by = |pid: u32| {
        let c = conns.as_array().unwrap().iter().filter(|c| c["pid"] == pid).cloned().collect::<Vec<_>>();
        c.iter().map(|c| c["nsm"].as_str().unwrap().to_string()).collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(by(old.pid()).into_iter().collect::<Vec<_>>(), ["k"], "{conns}");
    assert_eq!(by(new.pid()).into_iter().collect::<Vec<_>>(), ["user"], "{conns}");
}

/// A user NSM's upgrade: the new process reads the link and serves every new attachment; the
/// old process's guests follow it (their connections relayed by the old process, whose smoltcp
/// keeps them); guests reach each other's listeners across the two; an engine restarted
/// meanwhile adopts both; the old process exits once its connections are over.
#[test]
fn a_user_nsm_upgrade_drains_the_old_process() {
    if lacks_root("a_user_nsm_upgrade_drains_the_old_process: a user NSM needs root (TAP device, namespace)") {
        return;
    }
    require("python3");
    let (user, addr) = user_nsm_config("");
    let mut engine = TestEngine::with_config(&user);
    // Echoes each connection's bytes back, one thread a connection, on the NSM's address.
    let echo_server = |engine: &TestEngine, port: u16| {
        engine.python_ready(&format!(
            "import socket,threading\nl=socket.create_server(('0.0.0.0',{port}))\nprint('ready',flush=True)\n\
             def echo(s):\n    while True:\n        d=s.recv(100)\n        if not d: s.close(); return\n        s.sendall(d)\n\
             while True:\n    threading.Thread(target=echo,args=(l.accept()[0],),daemon=True).start()\n"
        ))
    };
    let round_trip = |c: &mut std::net::TcpStream, msg: &[u8]| {
        std::io::Write::write_all(c, msg).unwrap();
        let mut got = vec![0; msg.len()];
        std::io::Read::read_exact(c, &mut got).unwrap();
        assert_eq!(got, msg);
    };
    let mut old_server = echo_server(&engine, 7300);
    let mut native = std::net::TcpStream::connect((addr, 7300)).unwrap();
    native.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    round_trip(&mut native, b"before");
    let mut old_guest = echo_guest(&engine, "default");
    // A guest that closes its only connection after the upgrade and keeps running; its later
    // sockets are the new process's.
    let mut lingering = engine
        .run(
            "python3",
            &[
                "-c",
                &format!(
                    "import socket,sys\nc=socket.create_connection(('{addr}',7300))\nprint('ready',flush=True)\n\
                     sys.stdin.readline()\nc.close()\nprint('closed',flush=True)\nsys.stdin.readline()\n\
                     l=socket.create_server(('127.0.0.1',0))\nd=socket.create_connection(l.getsockname())\n\
                     s,_=l.accept()\nd.sendall(b'x')\nprint('ok' if s.recv(1)==b'x' else 'bad',flush=True)\n\
                     sys.stdin.readline()\n"
                ),
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lingering_in = lingering.stdin.take().unwrap();
    let mut lingering_out = BufReader::new(lingering.stdout.take().unwrap());
    let mut said = || {
        let mut l = String::new();
        lingering_out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    assert_eq!(said(), "ready");

    let r = upgrade(&engine, "user", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    let (old_pid, new_pid) = (r["old_pid"].as_u64().unwrap(), r["new_pid"].as_u64().unwrap());
    assert_ne!(old_pid, new_pid);
    assert_eq!(r["draining_attachments"], 3, "{r}");
    eprintln!("user NSM upgrade: blackout {} ms", r["blackout_ms"]);
    // The old process's connections go on: to the host over the link, and its own loopback.
    round_trip(&mut native, b"after the upgrade");
    assert_eq!(old_guest.ask("after the upgrade"), "ok");
    let nsm = engine.nsm();
    assert_eq!(nsm["pid"], new_pid, "{nsm}");
    assert_eq!(nsm["draining"], serde_json::json!([old_pid]), "{nsm}");
    // One drain at a time: another upgrade now is refused, and nothing changes.
    let again = upgrade(&engine, "user", None).expect_err("a second upgrade while the first drains");
    assert!(again.contains("draining"), "{again}");
    assert_eq!(engine.nsm()["pid"], new_pid);
    // An engine killed now finds both: the new process adopts it, the old one through it.
    engine.stop_with(libc::SIGKILL);
    engine.restart();
    let nsm = engine.nsm();
    assert_eq!((&nsm["pid"], &nsm["draining"]), (&serde_json::json!(new_pid), &serde_json::json!([old_pid])), "{nsm}");
    assert_eq!(engine.ctl("tenants")[0]["attachments"], 3, "the old process's attachments were adopted");
    assert_eq!(old_guest.ask("after the engine's restart"), "ok");

    // New attachments are the new process's: a loopback connection, a connection to the echo
    // server's listener, a listener the host reaches.
    let mut new_guest = echo_guest(&engine, "default");
    assert_eq!(new_guest.ask("new"), "ok");
    let out = run_ok(engine.run(
        "python3",
        &[
            "-c",
            &format!(
                "import socket\nc=socket.create_connection(('{addr}',7300))\nc.sendall(b'across')\n\
                 print(c.recv(100).decode())\n"
            ),
        ],
    ));
    assert_eq!(out.trim(), "across", "a new guest reaches the old process's listener");
    let mut new_server = echo_server(&engine, 7301);
    let mut native2 = std::net::TcpStream::connect((addr, 7301)).unwrap();
    native2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    round_trip(&mut native2, b"to the new process");
    round_trip(&mut native, b"the old connection still");
    // The echo server's listener (made anew in the new process) takes a new connection.
    let mut native3 = std::net::TcpStream::connect((addr, 7300)).unwrap();
    native3.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    round_trip(&mut native3, b"old listener, new connection");

    // Once the connections it relays are over, the old process exits; the new one serves on,
    // the echo server included.
    writeln!(lingering_in).unwrap();
    assert_eq!(said(), "closed");
    drop((native, native3, old_guest));
    let old = std::path::PathBuf::from(format!("/proc/{old_pid}"));
    let start = Instant::now();
    while old.exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!old.exists(), "the old process outlived its last connection\n{}", engine.log());
    assert!(engine.log().contains("came from the old process"), "{}", engine.log());
    assert_eq!(engine.nsm()["draining"], serde_json::json!([]));
    assert_eq!(new_guest.ask("still served"), "ok");
    writeln!(lingering_in).unwrap();
    assert_eq!(said(), "ok", "the guest that came over makes sockets in the new process");
    drop(lingering_in);
    lingering.wait().unwrap();
    let mut again = std::net::TcpStream::connect((addr, 7300)).unwrap();
    again.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    round_trip(&mut again, b"the server came over with its listener");
    round_trip(&mut native2, b"after the old one left");
    let _ = old_server.kill();
    let _ = old_server.wait();
    let _ = new_server.kill();
    let _ = new_server.wait();
}

/// The new process of a user NSM's upgrade dies while the old one drains: the old one's guests
/// get an error like any NSM crash's, and the engine starts the NSM again once the old process
/// has let go of the device.
#[test]
fn a_user_nsm_successor_crash_during_the_drain_restarts_the_nsm() {
    if lacks_root("a_user_nsm_successor_crash_during_the_drain_restarts_the_nsm: a user NSM needs root") {
        return;
    }
    require("python3");
    let (user, _) = user_nsm_config("");
    let engine = TestEngine::with_config(&user);
    let mut old_guest = echo_guest(&engine, "default");
    let r = upgrade(&engine, "user", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    let (old_pid, new_pid) = (r["old_pid"].as_u64().unwrap() as i32, r["new_pid"].as_u64().unwrap() as i32);
    assert_eq!(old_guest.ask("draining"), "ok");
    // SAFETY: integers only; the pid is the NSM's, alive (it just answered).
    unsafe { libc::kill(new_pid, libc::SIGKILL) };
    let start = Instant::now();
    let mut answer = old_guest.ask("after the crash");
    while answer == "ok" && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        answer = old_guest.ask("after the crash");
    }
    assert!(answer.starts_with("error"), "the old process's guest was not told: {answer}");
    drop(old_guest);
    let old = std::path::PathBuf::from(format!("/proc/{old_pid}"));
    let start = Instant::now();
    while (old.exists() || engine.nsm()["pid"].as_u64().is_none()) && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!old.exists(), "the old process outlived its guests\n{}", engine.log());
    let mut fresh = echo_guest(&engine, "default");
    assert_eq!(fresh.ask("the restarted NSM"), "ok", "{}", engine.log());
}

/// A guest server for `a_user_nsm_upgrade_moves_guests_with_open_connections`: each connection
/// starts with a mode byte and a u64 word count. `S`: sends that many counting u32 words
/// (big-endian) and closes. `R`: receives counting words until EOF, prints `got WORDS OK`,
/// answers `done` and closes. `Q`: answers `q` and closes. `E`: echoes until EOF (`eof`) or an
/// error (its name).
const WORDS_SERVER: &str = r#"
import socket, threading, sys
from array import array
l = socket.create_server(('0.0.0.0', 7400))
print('ready', flush=True)
def words(k, n):
    a = array('I', range(k, k + n)); a.byteswap(); return a.tobytes()
def exact(s, n):
    b = b''
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d: raise EOFError
        b += d
    return b
def serve(s):
    try:
        m = exact(s, 9); mode, n = m[:1], int.from_bytes(m[1:], 'big')
        if mode == b'S':
            k = 0
            while k < n:
                c = min(16384, n - k); s.sendall(words(k, c)); k += c
            s.close()
        elif mode == b'R':
            k, rest, ok = 0, b'', True
            while True:
                d = s.recv(1 << 16)
                if not d: break
                rest += d; whole = len(rest) // 4 * 4
                a = array('I'); a.frombytes(rest[:whole]); a.byteswap()
                ok = ok and a == array('I', range(k, k + len(a)))
                k += len(a); rest = rest[whole:]
            print('got %d %s' % (k, ok and not rest), flush=True)
            s.sendall(b'done'); s.close()
        elif mode == b'Q':
            s.sendall(b'q'); s.close()
        else:
            while True:
                d = s.recv(1 << 16)
                if not d: print('eof', flush=True); return
                s.sendall(d)
    except Exception as e:
        print(type(e).__name__, flush=True)
while True:
    threading.Thread(target=serve, args=(l.accept()[0],), daemon=True).start()
"#;

/// An engine with one user NSM whose guest runs WORDS_SERVER; the host talks to it.
struct Words {
    engine: TestEngine,
    addr: std::net::Ipv4Addr,
    /// The engine's Prometheus port.
    metrics: u16,
    server: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Words {
    /// None (and a SKIP line) without root: a user NSM needs its TAP device.
    fn start(test: &str) -> Option<Words> {
        if lacks_root(&format!("{test}: a user NSM needs root (TAP device, namespace)")) {
            return None;
        }
        let (user, addr) = user_nsm_config("");
        let metrics = free_port();
        let engine = TestEngine::with_config(&format!("[engine]\nmetrics = \"127.0.0.1:{metrics}\"\n\n{user}"));
        let mut server = engine.python_ready(WORDS_SERVER);
        let out = BufReader::new(server.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || out.lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
        Some(Words { engine, addr, metrics, server, lines })
    }

    /// The guest's next line, which must start with `want`.
    fn said(&self, want: &str) -> String {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line from the guest; wanted {want}"));
        assert!(l.starts_with(want), "the guest said {l:?}, not {want:?}");
        l
    }

    /// A connection to the guest in `mode` for `n` words.
    fn open(&self, mode: u8, n: u64) -> std::net::TcpStream {
        let mut c = std::net::TcpStream::connect((self.addr, 7400)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut head = vec![mode];
        head.extend(n.to_be_bytes());
        std::io::Write::write_all(&mut c, &head).unwrap();
        c
    }

    /// Waits up to 5 s for the NSM's `field` to read `want`.
    fn wait_nsm(&self, field: &str, want: serde_json::Value) {
        let start = Instant::now();
        while self.engine.nsm()[field] != want && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.engine.nsm()[field], want, "{field}\n{}", self.engine.log());
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Sends `msg` on `c` and reads as many bytes back.
fn try_echo(c: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    std::io::Write::write_all(c, msg)?;
    let mut got = vec![0; msg.len()];
    std::io::Read::read_exact(c, &mut got).map(|_| got)
}

fn echo(c: &mut std::net::TcpStream, msg: &[u8]) {
    assert_eq!(try_echo(c, msg).unwrap(), msg);
}

/// A user NSM's upgrade moves a guest whose connections stay open: they stay in the old
/// process's smoltcp, relayed to the new process, which serves the guest from then on. Bytes
/// cross both ways whole and in order while the upgrade happens, a reset reaches the guest as
/// ECONNRESET, the guest's listener and new connections are the new process's, and the old
/// process exits once its last relayed connection ends, the guest still running.
#[test]
fn a_user_nsm_upgrade_moves_guests_with_open_connections() {
    let Some(w) = Words::start("a_user_nsm_upgrade_moves_guests_with_open_connections") else { return };
    let (engine, addr, open) = (&w.engine, w.addr, |mode, n| w.open(mode, n));
    let words = |k: u64, n: u64| (k..k + n).flat_map(|w| (w as u32).to_be_bytes()).collect::<Vec<u8>>();
    // Reads `n` counting words from `c`, starting at `k`.
    let read_words = |c: &mut std::net::TcpStream, k: u64, n: u64| {
        let mut buf = vec![0u8; n as usize * 4];
        std::io::Read::read_exact(c, &mut buf).unwrap();
        let bad = buf.chunks(4).zip(k..).find(|(w, i)| u32::from_be_bytes((*w).try_into().unwrap()) != *i as u32);
        assert!(bad.is_none(), "word {} arrived wrong", bad.unwrap().1);
    };
    const DOWN: u64 = 16 << 20; // words the guest sends: 64 MiB
    const UP: u64 = 8 << 20; // words the host sends: 32 MiB
    let mut down = open(b'S', DOWN);
    read_words(&mut down, 0, 1 << 20);
    let mut up = open(b'R', 0);
    std::io::Write::write_all(&mut up, &words(0, 1 << 20)).unwrap();
    let mut held = open(b'E', 0);
    echo(&mut held, b"before");
    let mut reset = open(b'E', 0);
    echo(&mut reset, b"before");
    // New connections all along: the listener moves without refusing one.
    let hammering = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hammer = {
        let hammering = hammering.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while hammering.load(std::sync::atomic::Ordering::Relaxed) {
                let r = std::net::TcpStream::connect((addr, 7400)).and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(10)))?;
                    std::io::Write::write_all(&mut c, &[b'Q', 0, 0, 0, 0, 0, 0, 0, 0])?;
                    let mut q = [0u8; 1];
                    std::io::Read::read_exact(&mut c, &mut q)
                });
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    let r = upgrade(engine, "user", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    let old_pid = r["old_pid"].as_u64().unwrap();
    eprintln!("user NSM upgrade with open connections: blackout {} ms", r["blackout_ms"]);
    std::thread::sleep(Duration::from_millis(1000));
    hammering.store(false, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = hammer.join().unwrap();
    eprintln!("{ok} connections made across the upgrade");
    assert!(failed.is_empty() && ok > 50, "{ok} connections, failures: {failed:?}\n{}", engine.log());
    // The guest comes to the new process at once; its four connections stay in the old one.
    w.wait_nsm("relayed", serde_json::json!(4));
    assert_eq!(engine.nsm()["draining"], serde_json::json!([old_pid]));
    // Their telemetry comes from the old process, which measures them.
    let conns = engine.ctl("conns");
    let measured = conns.as_array().unwrap().iter().filter(|c| c["cwnd"].as_u64().unwrap_or(0) > 0).count();
    assert!(measured >= 4, "relayed connections without telemetry: {conns}");
    let text = metrics_response(&format!("127.0.0.1:{}", w.metrics));
    assert!(text.contains("netkernel_nsm_relayed_connections{nsm=\"user\"} 4"), "{text}");
    assert!(text.contains("netkernel_nsm_draining_processes{nsm=\"user\"} 1"), "{text}");
    assert!(engine.log().contains("1 attachment(s) came from the old process"), "{}", engine.log());

    // Both directions go on, whole and in order.
    read_words(&mut down, 1 << 20, DOWN - (1 << 20));
    let mut end = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut down, &mut end).unwrap(), 0, "the guest's close arrives as the end");
    for k in (1 << 20..UP).step_by(1 << 20) {
        std::io::Write::write_all(&mut up, &words(k, 1 << 20)).unwrap();
    }
    up.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(w.said("got"), format!("got {UP} True"));
    let mut done = Vec::new();
    std::io::Read::read_to_end(&mut up, &mut done).unwrap();
    assert_eq!(done, b"done");
    echo(&mut held, b"after the upgrade");
    // A reset reaches the guest as one.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on our own socket with a live linger of the size passed.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&reset),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    drop(reset);
    w.said("ConnectionResetError");
    // The guest's listener is the new process's now: a new connection is served there.
    let mut fresh = open(b'E', 0);
    echo(&mut fresh, b"a connection made after the upgrade");
    // The last relayed connection ends: the old process exits, the guest and its new
    // connection go on.
    held.shutdown(std::net::Shutdown::Write).unwrap();
    w.said("eof");
    drop(held);
    let old = std::path::PathBuf::from(format!("/proc/{old_pid}"));
    let start = Instant::now();
    while old.exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!old.exists(), "the old process outlived its relayed connections\n{}", engine.log());
    w.wait_nsm("draining", serde_json::json!([]));
    echo(&mut fresh, b"after the old process left");
    // Once the drain is over the new process idles as any NSM does.
    let nsm_pid = engine.nsm()["pid"].as_u64().unwrap() as u32;
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(nsm_pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(nsm_pid) - before;
    assert!(used <= 4, "the new process used {used} ticks in 2 s with nothing to do");
}

/// The old process of a user NSM's upgrade dies while it relays a connection for a guest the
/// new process serves: the guest gets ECONNRESET on it (never a clean end that would pass a
/// cut stream for a whole one), the host's side is reset, and the guest's other connections
/// and the new process go on.
#[test]
fn a_relaying_old_process_that_dies_resets_only_its_connections() {
    let Some(w) = Words::start("a_relaying_old_process_that_dies_resets_only_its_connections") else { return };
    let mut relayed = w.open(b'E', 0);
    echo(&mut relayed, b"before");
    let r = upgrade(&w.engine, "user", None).unwrap_or_else(|e| panic!("{e}\n{}", w.engine.log()));
    let old_pid = r["old_pid"].as_u64().unwrap() as i32;
    w.wait_nsm("relayed", serde_json::json!(1));
    let mut fresh = w.open(b'E', 0);
    echo(&mut fresh, b"new");
    // SAFETY: integers only; the pid is the old NSM process's, alive (it relays).
    unsafe { libc::kill(old_pid, libc::SIGKILL) };
    w.said("ConnectionResetError");
    // The host's side: the new process answers its next segment with a RST.
    let gone = try_echo(&mut relayed, b"anyone?");
    assert!(gone.is_err() || gone.as_ref().is_ok_and(|g| g.is_empty()), "{gone:?}");
    echo(&mut fresh, b"still served");
    w.wait_nsm("draining", serde_json::json!([]));
    assert_eq!(w.engine.nsm()["restarts"], 0, "the NSM did not restart: only the old process died");
}

/// `ctl upgrade --force` of a user NSM whose previous upgrade's old process still relays a
/// connection: that process is stopped (the connection's guest gets ECONNRESET, as if it had
/// crashed) and the upgrade goes on; without --force the upgrade is refused and nothing changes.
#[test]
fn a_forced_user_nsm_upgrade_ends_the_previous_drain() {
    let Some(w) = Words::start("a_forced_user_nsm_upgrade_ends_the_previous_drain") else { return };
    let engine = &w.engine;
    let mut long_lived = w.open(b'E', 0);
    echo(&mut long_lived, b"before");
    let first = upgrade(engine, "user", None).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    w.wait_nsm("relayed", serde_json::json!(1));
    let refused = upgrade(engine, "user", None).expect_err("an upgrade while the old process relays");
    assert!(refused.contains("draining") && refused.contains("--force"), "{refused}");
    assert_eq!(engine.nsm()["pid"], first["new_pid"]);
    echo(&mut long_lived, b"still relayed");

    let forced = engine.ctl_try(&["upgrade", "user", "--force"]).unwrap_or_else(|e| panic!("{e}\n{}", engine.log()));
    assert_eq!(forced["old_pid"], first["new_pid"], "{forced}");
    w.said("ConnectionResetError");
    // The guest follows to the newest process (a connection it accepted before that would keep
    // the one before relaying); then that one, relaying nothing, exits.
    let start = Instant::now();
    while engine.log().matches("came from the old process").count() < 2 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut fresh = w.open(b'E', 0);
    echo(&mut fresh, b"after the forced upgrade");
    w.wait_nsm("draining", serde_json::json!([]));
    assert_eq!(engine.nsm()["pid"], forced["new_pid"]);
    echo(&mut fresh, b"in the newest process");
}
