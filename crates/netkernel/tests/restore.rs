//! Faults of the provider's processes, seen from the guests: an engine restart (SIGTERM or
//! SIGKILL, then a new engine that adopts the running NSMs) must be invisible to them; `ctl
//! shutdown` resets them; an NSM killed under load resets its guests within a second and serves
//! new connections again soon after (DESIGN.md D1, D3, D11).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

/// A guest echo server on 127.0.0.1:PORT, one thread per connection; it listens again if its
/// listener is reset (its NSM died), so it survives NSM restarts.
const ECHO_SERVER: &str = r#"
import socket, sys, threading, time
port = int(sys.argv[1])
def serve(c):
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
    except OSError:
        pass
    c.close()
ready = False
while True:
    l = None
    try:
        l = socket.socket()
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(('127.0.0.1', port))
        l.listen(64)
        if not ready:
            print('ready', flush=True)
            ready = True
        while True:
            c, _ = l.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    except OSError:
        if l is not None:
            l.close()
        time.sleep(0.01)
"#;

/// A guest that, for SECONDS, opens a new connection to the echo server on PORT per round, sends
/// 64 KiB of a pattern and checks what comes back. Any error or wrong byte ends it with status 1;
/// otherwise it prints the rounds and the longest gap between two rounds.
const ECHO_LOOP: &str = r#"
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
rounds, last, gap = 0, time.monotonic(), 0.0
while time.monotonic() < end:
    pat = bytes((rounds + i) % 251 for i in range(256)) * 256
    s = socket.create_connection(('127.0.0.1', port))
    s.sendall(pat)
    got = b''
    while len(got) < len(pat):
        b = s.recv(len(pat) - len(got))
        if not b:
            print('FAIL: early EOF', flush=True); sys.exit(1)
        got += b
    s.close()
    if got != pat:
        print('FAIL: corrupt bytes in round', rounds, flush=True); sys.exit(1)
    rounds += 1
    now = time.monotonic()
    gap, last = max(gap, now - last), now
print('ok', rounds, 'rounds, longest gap %.3f s' % gap, flush=True)
"#;

/// Starts a guest python `script` with `args` and waits for its first line, "ready".
fn guest_ready(engine: &TestEngine, script: &str, args: &[&str]) -> (Child, BufReader<ChildStdout>) {
    let python = require("python3");
    let mut argv = vec!["-c", script];
    argv.extend_from_slice(args);
    let mut c = engine.run(python.to_str().unwrap(), &argv);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "guest did not get ready: {}", engine.log());
    (child, out)
}

/// A native (not NetKernel) round trip through the guest echo server.
fn native_echo(port: u16, what: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the guest server");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(what).unwrap();
    let mut got = vec![0u8; what.len()];
    s.read_exact(&mut got).expect("the guest server answers");
    got
}

/// The connections `ctl conns --json` lists for process `pid`.
fn conns_of(engine: &TestEngine, pid: u32) -> Vec<serde_json::Value> {
    engine.ctl("conns").as_array().unwrap().iter().filter(|c| c["pid"] == pid).cloned().collect()
}

/// The engine exits (by `signal`) in the middle of an iperf3 run and an echo loop, both between
/// guests; while it is gone an attached server still accepts; a new engine adopts the NSM and
/// lists the old connections, and new guests attach with new attachment ids.
fn engine_restart_is_invisible(signal: i32) {
    let iperf3 = require("iperf3");
    let mut engine = TestEngine::start();
    let echo_port = free_port();
    let (mut server, _server_out) = guest_ready(&engine, ECHO_SERVER, &[&echo_port.to_string()]);

    let iperf_port = free_port().to_string();
    let mut s = engine.run(iperf3.to_str().unwrap(), &["-s", "-1", "--forceflush", "-p", &iperf_port]);
    let mut iperf_server = s.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut iperf_out = BufReader::new(iperf_server.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("Server listening") {
        line.clear();
        assert!(iperf_out.read_line(&mut line).unwrap() > 0, "iperf3 -s ended: {}", engine.log());
    }
    let mut c = engine.run(iperf3.to_str().unwrap(), &["-c", "127.0.0.1", "-p", &iperf_port, "-t", "10", "--json"]);
    let iperf_client = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let python = require("python3");
    let mut l = engine.run(python.to_str().unwrap(), &["-c", ECHO_LOOP, &echo_port.to_string(), "10"]);
    let echo_loop = l.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    std::thread::sleep(Duration::from_secs(3));
    let before = conns_of(&engine, iperf_server.id());
    assert!(before.iter().any(|c| c["state"] == "ESTABLISHED"), "iperf3's connections: {before:?}");
    let old_ids: Vec<u64> =
        engine.ctl("conns").as_array().unwrap().iter().filter_map(|c| c["attachment"].as_u64()).collect();

    engine.stop_with(signal);
    // No engine now: the attached server still accepts and serves new connections.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(native_echo(echo_port, b"while the engine is down"), b"while the engine is down");

    // A program started now waits (asleep) for the engine to be back, then attaches.
    let mut l = engine.run(
        python.to_str().unwrap(),
        &[
            "-c",
            "import socket,sys\ns=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\ns.sendall(b'late')\n\
                 print(s.recv(4).decode())\n",
            &echo_port.to_string(),
        ],
    );
    let late = l.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let restarted = Instant::now();
    engine.restart();
    let adopted = loop {
        let now = conns_of(&engine, iperf_server.id());
        if now.iter().any(|c| c["state"] == "ESTABLISHED") {
            break restarted.elapsed();
        }
        assert!(restarted.elapsed() < Duration::from_secs(5), "the new engine does not list iperf3's: {now:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("engine stopped by signal {signal}: old connections listed {adopted:?} after the new engine started");
    assert!(adopted < Duration::from_secs(1), "adoption took {adopted:?}: {}", engine.log());
    assert!(engine.log().contains("adopted NSM kernel"), "{}", engine.log());

    let out = output_within_child(late, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "a program started while the engine was down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "late\n");

    let out = output_within_child(iperf_client, Duration::from_secs(30));
    assert!(out.status.success(), "iperf3 -c failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 --json");
    let intervals = report["intervals"].as_array().expect("intervals");
    assert!(intervals.len() >= 9, "{} intervals", intervals.len());
    for (i, iv) in intervals.iter().enumerate() {
        let bps = iv["sum"]["bits_per_second"].as_f64().unwrap_or(0.0);
        assert!(bps > 0.0, "interval {i} at 0 bits/s: {iv}");
    }
    assert!(iperf_server.wait().unwrap().success(), "iperf3 -s failed");

    let out = output_within_child(echo_loop, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "echo loop: {text} {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("echo loop through the restart: {}", text.trim());
    let gap: f64 = text.trim().rsplit(' ').nth(1).and_then(|g| g.parse().ok()).expect("gap");
    assert!(gap < 2.0, "the echo loop stalled {gap} s: {text}");

    // A guest attaching to the new engine gets an id no adopted attachment has.
    let (mut fresh, _out) = guest_ready(
        &engine,
        "import socket,sys\ns=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\nprint('ready',flush=True)\n\
         sys.stdin.read()",
        &[&echo_port.to_string()],
    );
    let new_ids: Vec<u64> = conns_of(&engine, fresh.id()).iter().filter_map(|c| c["attachment"].as_u64()).collect();
    assert!(!new_ids.is_empty());
    assert!(new_ids.iter().all(|id| !old_ids.contains(id)), "new {new_ids:?} reuses one of {old_ids:?}");
    let _ = fresh.kill();
    let _ = fresh.wait();
    let _ = server.kill();
    let _ = server.wait();
}

fn output_within_child(child: Child, limit: Duration) -> std::process::Output {
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // SAFETY: at worst signals a pid that has ended; the test fails on the hang either way.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    out
}

#[test]
fn an_engine_stopped_by_sigterm_and_restarted_is_invisible_to_guests() {
    engine_restart_is_invisible(libc::SIGTERM);
}

#[test]
fn an_engine_killed_and_restarted_is_invisible_to_guests() {
    engine_restart_is_invisible(libc::SIGKILL);
}

#[test]
fn ctl_shutdown_resets_guests_and_stops_the_nsms() {
    let engine = TestEngine::start();
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as i32;
    let (mut guest, mut out) = guest_ready(
        &engine,
        "import socket\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
         s,_=l.accept()\nprint('ready',flush=True)\ntry:\n    s.recv(10)\n    print('recv returned')\n\
         except OSError as e:\n    print('recv failed', e.errno, flush=True)\n",
        &[],
    );
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    let ctl = std::process::Command::new(NETKERNEL)
        .args(["ctl", "--socket"])
        .arg(&engine.socket)
        .arg("shutdown")
        .output()
        .unwrap();
    assert!(ctl.status.success(), "ctl shutdown: {}", String::from_utf8_lossy(&ctl.stderr));
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let took = asked.elapsed();
    assert_eq!(line.trim(), format!("recv failed {}", libc::ECONNRESET));
    eprintln!("ctl shutdown: guest reset after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(guest.wait().unwrap().success());
    let start = Instant::now();
    // SAFETY: signal 0 only asks whether the NSM still exists.
    while unsafe { libc::kill(nsm, 0) } == 0 {
        assert!(start.elapsed() < Duration::from_secs(2), "the NSM outlived ctl shutdown");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!engine.socket.exists(), "socket left behind");
    assert!(!std::path::Path::new(&format!("{}.d", engine.socket.display())).exists(), "state directory left");
}

#[test]
fn run_without_an_engine_fails_clearly_within_seconds() {
    let start = Instant::now();
    let out = output_within(
        {
            let mut c = std::process::Command::new(NETKERNEL);
            c.args(["run", "--socket", "/tmp/netkernel-no-engine-here.sock", "--", "true"]);
            c
        },
        Duration::from_secs(10),
    );
    let took = start.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no NetKernel engine at /tmp/netkernel-no-engine-here.sock") && err.contains("waited"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// While no engine runs, a guest that forks (and so asks the engine to `hold` its attachment for
/// the child) waits briefly, asleep, then goes on with a clear warning; its sockets still work.
#[test]
fn a_guest_that_forks_while_the_engine_is_down_waits_briefly_then_warns() {
    let mut engine = TestEngine::start();
    let echo_port = free_port();
    let (mut server, _o) = guest_ready(&engine, ECHO_SERVER, &[&echo_port.to_string()]);
    let (mut guest, mut out) = guest_ready(
        &engine,
        "import os,socket,sys,time\ns=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
         print('ready',flush=True)\nsys.stdin.readline()\nt=time.monotonic()\npid=os.fork()\n\
         if pid==0:\n    os._exit(0)\nos.waitpid(pid,0)\nprint('fork took %.2f' % (time.monotonic()-t),flush=True)\n\
         s.sendall(b'after');print(s.recv(5).decode(),flush=True)\n",
        &[&echo_port.to_string()],
    );
    engine.stop_with(libc::SIGKILL);
    let ticks = cpu_ticks(guest.id());
    guest.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let took: f64 = line.trim().strip_prefix("fork took ").and_then(|t| t.parse().ok()).expect(&line);
    assert!((1.5..4.0).contains(&took), "fork took {took} s");
    // Sleeping, not spinning: well under a second of CPU in those two seconds.
    let used = cpu_ticks(guest.id()) - ticks;
    assert!(used < 50, "{used} ticks while waiting for the engine");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "after");
    let mut err = String::new();
    guest.wait().unwrap();
    guest.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("cannot reach the NetKernel engine") && err.contains("waited 2 s"), "{err}");
    let _ = server.kill();
    let _ = server.wait();
    engine.restart();
}

/// kill -9 of the NSM while a guest streams through an echo server (both guests of it): the
/// client sees the reset within a second, its next connection succeeds on the restarted NSM
/// within two, and no byte it got back was wrong.
fn nsm_crash_under_load(colocate: bool) {
    let engine = TestEngine::with_config(&format!(
        "[[nsm]]\nname = \"kernel\"\ncolocate = {colocate}\n\n[[tenant]]\nname = \"default\"\nnsm = \"kernel\"\n"
    ));
    let port = free_port();
    let (mut server, _o) = guest_ready(&engine, ECHO_SERVER, &[&port.to_string()]);
    let (mut client, mut out) = guest_ready(
        &engine,
        r#"
import socket, sys, time
port = int(sys.argv[1])
pat = bytes(range(256)) * 256
s = socket.create_connection(('127.0.0.1', port))
print('ready', flush=True)
reset = False
while True:
    got = b''
    try:
        s.sendall(pat)
        while len(got) < len(pat):
            b = s.recv(len(pat) - len(got))
            if not b:
                raise ConnectionResetError('EOF')
            got += b
        if got != pat:
            print('corrupt', flush=True); sys.exit(1)
        if reset:
            print('back', time.monotonic(), flush=True); sys.exit(0)
    except OSError as e:
        if got != pat[:len(got)]:
            print('corrupt', flush=True); sys.exit(1)
        if not reset:
            print('reset', time.monotonic(), e.errno, flush=True)
            reset = True
        s.close()
        while True:
            try:
                s = socket.create_connection(('127.0.0.1', port)); break
            except OSError:
                time.sleep(0.01)
"#,
        &[&port.to_string()],
    );
    std::thread::sleep(Duration::from_millis(500));
    let path = conns_of(&engine, client.id())[0]["path"].clone();
    assert_eq!(path, if colocate { "colocated" } else { "kernel" });
    let bytes_before = engine.nsm()["bytes_in"].as_u64().unwrap_or(0) + engine.nsm()["bytes_out"].as_u64().unwrap();
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as i32;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: kills our engine's NSM, the crash under test; ts is a live timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        libc::kill(nsm, libc::SIGKILL);
    }
    let killed = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"reset"), "{line}");
    let reset = f[1].parse::<f64>().unwrap() - killed;
    assert!([libc::ECONNRESET.to_string(), libc::EPIPE.to_string()].contains(&f[2].to_string()), "{line}");
    line.clear();
    out.read_line(&mut line).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"back"), "{line}");
    let back = f[1].parse::<f64>().unwrap() - killed;
    eprintln!(
        "NSM kill -9 under load (colocate {colocate}, {bytes_before} bytes moved before): reset after {:.0} ms, \
         new connection after {:.0} ms",
        reset * 1e3,
        back * 1e3
    );
    assert!(reset < 1.0, "reset after {reset} s");
    assert!(back < 2.0, "new connection after {back} s");
    assert!(client.wait().unwrap().success());
    assert_eq!(engine.nsm()["restarts"], 1);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn nsm_killed_under_load_resets_and_serves_again_kernel_path() {
    nsm_crash_under_load(false);
}

#[test]
fn nsm_killed_under_load_resets_and_serves_again_colocated() {
    nsm_crash_under_load(true);
}

/// The engine blocks SIGTERM and SIGINT for its signal thread; its NSMs must not inherit that
/// mask (an NSM that ignored SIGTERM once lingered after its guests' regions were declared dead,
/// keeping their listening sockets open with nobody to accept on them).
#[test]
fn nsms_start_with_no_signal_blocked_and_sigterm_stops_them() {
    let engine = TestEngine::start();
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as i32;
    let status = std::fs::read_to_string(format!("/proc/{nsm}/status")).unwrap();
    let blocked = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap().trim();
    assert_eq!(u64::from_str_radix(blocked, 16).unwrap(), 0, "the NSM starts with signals blocked: {blocked}");
    // SAFETY: signals our engine's NSM.
    unsafe { libc::kill(nsm, libc::SIGTERM) };
    let start = Instant::now();
    while engine.nsm()["restarts"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(2), "SIGTERM did not stop the NSM: {}", engine.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A configuration change between two engines: the NSM the new configuration still has is
/// adopted (its guest goes on), the one it dropped is stopped cleanly (its guest is reset).
#[test]
fn a_restarted_engine_adopts_the_nsms_its_configuration_keeps_and_stops_the_others() {
    let both = "[[nsm]]\nname = \"keep\"\n\n[[nsm]]\nname = \"drop\"\n\n\
                [[tenant]]\nname = \"k\"\nnsm = \"keep\"\n\n[[tenant]]\nname = \"d\"\nnsm = \"drop\"\n";
    let mut engine = TestEngine::with_config(both);
    let blocked = "import socket\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
                   s,_=l.accept()\nprint('ready',flush=True)\ntry:\n    s.recv(10)\n    print('recv returned',flush=True)\n\
                   except OSError as e:\n    print('recv failed', e.errno, flush=True)\n";
    let guest = |tenant: &str| {
        let python = require("python3");
        let mut c = std::process::Command::new(NETKERNEL);
        c.args(["run", "--tenant", tenant, "--socket"]).arg(&engine.socket).arg("--").arg(python).args(["-c", blocked]);
        c.stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        (child, out)
    };
    let (mut kept, _kept_out) = guest("k");
    let (mut dropped, mut dropped_out) = guest("d");
    engine.stop_with(libc::SIGTERM);
    std::fs::write(
        engine.config_path().unwrap(),
        "[[nsm]]\nname = \"keep\"\n\n[[tenant]]\nname = \"k\"\nnsm = \"keep\"\n",
    )
    .unwrap();
    engine.restart();
    let mut line = String::new();
    dropped_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("recv failed {}", libc::ECONNRESET), "{}", engine.log());
    assert!(dropped.wait().unwrap().success());
    assert!(engine.log().contains("stopped NSM drop"), "{}", engine.log());
    assert!(engine.log().contains("adopted NSM keep"), "{}", engine.log());
    assert!(conns_of(&engine, kept.id()).iter().any(|c| c["state"] == "ESTABLISHED"), "{}", engine.ctl("conns"));
    assert_eq!(kept.try_wait().unwrap(), None, "the kept NSM's guest was disturbed");
    let _ = kept.kill();
    let _ = kept.wait();
}

/// Processes attached before an engine restart fork and exec afterwards: the new engine knows
/// them as holders (from the NSM) and the region (handed back by the NSM) proves `join`. The
/// exec'd child keeps the connection after its parent exits, which it could not had `hold` or
/// `join` failed.
#[test]
fn guests_attached_before_a_restart_fork_and_exec_after_it() {
    let mut engine = TestEngine::start();
    let port = free_port();
    let (mut server, _o) = guest_ready(&engine, ECHO_SERVER, &[&port.to_string()]);
    // The child waits until its parent has surely exited.
    let child =
        "import socket,sys,time\ntime.sleep(0.3)\ns=socket.socket(fileno=int(sys.argv[1]))\nfor i in range(3):\n    \
                 s.sendall(b'child%d' % i)\n    print(s.recv(6).decode(),flush=True)\n";
    let (mut parent, mut out) = guest_ready(
        &engine,
        &format!(
            "import os,socket,sys\ns=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
             s.set_inheritable(True)\nprint('ready',flush=True)\nsys.stdin.readline()\n\
             if os.fork()==0:\n    os.execv(sys.executable,[sys.executable,'-c',{child:?},str(s.fileno())])\n\
             print('forked',flush=True)\n"
        ),
        &[&port.to_string()],
    );
    engine.stop_with(libc::SIGKILL);
    engine.restart();
    let tenants = engine.ctl("tenants");
    assert!(tenants[0]["attachments"].as_u64().unwrap() >= 2, "the new engine's tenants: {tenants}");
    parent.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    assert!(parent.wait().unwrap().success());
    let mut err = String::new();
    parent.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(text, "forked\nchild0\nchild1\nchild2\n", "stderr: {err}\n{}", engine.log());
    assert!(!err.contains("netkernel:"), "{err}");
    let _ = server.kill();
    let _ = server.wait();
}

/// An NSM in a network namespace of its own is adopted with its namespace (recorded in the
/// state directory): the host still reaches a guest's server at the NSM's address, `ctl nsms`
/// shows that address, and `ctl shutdown` removes the namespace.
#[test]
fn a_namespaced_nsm_is_adopted_with_its_namespace() {
    assert!(is_root(), "network namespaces need root; run the tests as root (scripts/test does)");
    let mut engine =
        TestEngine::with_config("[[nsm]]\nname = \"ns0\"\nnetns = true\n\n[[tenant]]\nname = \"a\"\nnsm = \"ns0\"\n");
    let address = engine.nsm()["address"].as_str().unwrap().to_string();
    let (ip, _) = address.split_once(' ').unwrap();
    let ip = ip.to_string();
    let port = free_port();
    let (mut server, _o) = guest_ready(&engine, &ECHO_SERVER.replace("'127.0.0.1'", "'0.0.0.0'"), &[&port.to_string()]);
    let echo = |what: &[u8]| {
        let mut s = std::net::TcpStream::connect((ip.as_str(), port)).expect("the host reaches the NSM's namespace");
        s.write_all(what).unwrap();
        let mut got = vec![0u8; what.len()];
        s.read_exact(&mut got).unwrap();
        got
    };
    assert_eq!(echo(b"before"), b"before");
    engine.stop_with(libc::SIGTERM);
    assert_eq!(echo(b"between"), b"between");
    engine.restart();
    // The engine answers while it still adopts (on a loaded machine, visibly later).
    let start = Instant::now();
    while !engine.log().contains("adopted NSM ns0") && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(engine.log().contains("adopted NSM ns0"), "{}", engine.log());
    assert_eq!(engine.nsm()["address"].as_str(), Some(address.as_str()));
    assert_eq!(echo(b"after"), b"after");
    let ns = address.split_once(" (").unwrap().1.trim_end_matches(')').to_string();
    let _ = server.kill();
    let _ = server.wait();
    drop(engine);
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns), "namespace {ns} left behind");
}
