//! The engine as an operator meets it: config errors, a missing engine, ctl, NSM crashes, and
//! the cost of sitting idle.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn bad_config_exits_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("netkernel.toml");
    std::fs::write(&cfg, "[[nsm]]\nname = \"k\"\n\n[[tenant]]\nname = \"a\"\nnsm = \"missing\"\n").unwrap();
    let err = serve_refuses(&cfg);
    assert!(err.contains(&format!("{}:6: tenant.nsm:", cfg.display())), "{err}");
    std::fs::write(&cfg, "[[nsm]]\nname = \"k\"\ncongestoin = \"bbr\"\n").unwrap();
    let out = Command::new(NETKERNEL).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(":3: congestoin:"), "{err}");
    let out = Command::new(NETKERNEL).args(["serve", "--config", "/nonexistent/nk.toml"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nk.toml"));
}

#[test]
fn config_file_sets_nsm_congestion_and_tenants() {
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"cubic0\"\ncongestion = \"cubic\"\n\n[[tenant]]\nname = \"blue\"\nnsm = \"cubic0\"\n",
    );
    let nsm = engine.nsm();
    assert_eq!(nsm["name"], "cubic0");
    assert_eq!(nsm["congestion"], "cubic");
    assert_eq!(engine.ctl("tenants")[0]["name"], "blue");
    let out = output_within(engine.run(PROBE, &["connect_open"]), Duration::from_secs(60));
    assert!(out.status.success());
    let mut bad = engine.run(PROBE, &["connect_open"]);
    bad.env("NETKERNEL_TENANT", "nobody");
    // `run --tenant` is the documented way; the env var is what it sets.
    let mut c = Command::new(NETKERNEL);
    c.args(["run", "--tenant", "nobody", "--socket"]).arg(&engine.socket).args(["--", PROBE, "connect_open"]);
    let out = output_within(c, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown tenant \"nobody\""), "{:?}", out);
}

#[test]
fn run_without_engine_fails_clearly() {
    let out = Command::new(NETKERNEL)
        .args(["run", "--socket", "/tmp/netkernel-no-such-engine.sock", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no NetKernel engine at /tmp/netkernel-no-such-engine.sock") && err.contains("netkernel serve"),
        "{err}"
    );
}

#[test]
fn program_without_sockets_is_untouched() {
    let engine = TestEngine::start();
    let out = output_within(
        engine.run("sh", &["-c", "echo hi | tr a-z A-Z; ls /proc/self/fd | wc -l"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HI\n"), "{text}");
    assert_eq!(engine.ctl("status")["attachments"], 0, "a socket-less program attached");
}

#[test]
fn ctl_reports_status_tenants_nsms_and_conns() {
    let engine = TestEngine::start();
    // A guest holding a listening socket and one connection open while we look.
    let script = "import socket,sys\nl=socket.socket();l.bind(('127.0.0.1',0));l.listen()\nc=socket.create_connection(l.getsockname())\ns,_=l.accept()\nc.sendall(b'x'*1000);s.recv(100)\nprint('ready',flush=True)\nsys.stdin.read()\n";
    let mut child = engine.python_ready(script);
    let status = engine.ctl("status");
    assert_eq!(status["attachments"], 1);
    assert!(status["region_backing"].as_str().unwrap().contains("iB"), "{status}");
    let conns = engine.ctl("conns");
    let rows = conns.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{conns}");
    assert!(rows.iter().any(|r| r["state"] == "LISTEN"));
    let est: Vec<_> = rows.iter().filter(|r| r["state"] == "ESTABLISHED").collect();
    assert_eq!(est.len(), 2, "{conns}");
    assert!(est.iter().any(|r| r["bytes_out"] == 1000) && est.iter().any(|r| r["bytes_in"] == 100), "{conns}");
    assert!(est.iter().all(|r| r["tenant"] == "default" && r["nsm"] == "kernel" && r["remote"] != "-"));
    let tenants = engine.ctl("tenants");
    assert_eq!(tenants[0]["attachments"], 1);
    assert!(tenants[0]["bytes_out"].as_u64().unwrap() >= 1000 && tenants[0]["conns_total"] == 2, "{tenants}");
    assert_eq!(tenants[0]["refused"], 0);
    // The human-readable table has the same rows.
    let out = Command::new(NETKERNEL).args(["ctl", "--socket"]).arg(&engine.socket).arg("conns").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("TENANT") && table.lines().count() == 4, "{table}");
    child.stdin.take().unwrap().write_all(b"").unwrap();
    child.wait().unwrap();
}

#[test]
fn idle_engine_nsm_and_guest_use_under_one_percent_cpu() {
    assert_idle_under_one_percent(&TestEngine::start());
}

/// A python guest with a connection to itself, blocked in recv on it once it has printed "ready";
/// it prints how the recv ended, then runs `then`. Returns it with its stdout after "ready".
fn blocked_in_recv(engine: &TestEngine, then: &str) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let python = require("python3");
    let script = format!(
        "import socket\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
         s,_=l.accept()\nprint('ready',flush=True)\ntry:\n    s.recv(10)\n    print('recv returned')\n\
         except OSError as e:\n    print('recv failed', e.errno)\n{then}"
    );
    let mut child = engine.run(python.to_str().unwrap(), &["-c", &script]);
    child.stdout(Stdio::piped());
    let mut child = child.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    (child, out)
}

#[test]
fn nsm_crash_resets_connections_and_the_engine_restarts_it() {
    let engine = TestEngine::start();
    let (mut child, mut out) = blocked_in_recv(
        &engine,
        "n=socket.socket();n2=socket.create_server(('127.0.0.1',0))\n\
         n.connect(n2.getsockname());print('new connection ok',flush=True)\n",
    );
    let nsm = engine.nsm();
    let pid = nsm["pid"].as_u64().unwrap() as i32;
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: killing the NSM child of our engine, the crash under test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "guest failed after the NSM crash: {rest}");
    assert!(rest.contains(&format!("recv failed {}", libc::ECONNRESET)), "{rest}");
    assert!(rest.contains("new connection ok"), "{rest}");
    let nsm = engine.nsm();
    assert_eq!(nsm["restarts"], 1, "{nsm}");
    assert_ne!(nsm["pid"].as_u64().unwrap() as i32, pid);
    assert!(engine.log().contains("NSM kernel exited"), "{}", engine.log());
}

/// With the engine gone, nobody supervises the NSM: if it then crashes, its guests must still
/// learn of it (the NSM's reaper marks their regions dead) instead of waiting forever.
#[test]
fn an_orphaned_nsm_that_crashes_still_resets_its_guests() {
    let engine = TestEngine::start();
    let (mut child, mut out) = blocked_in_recv(&engine, "");
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as i32;
    // SAFETY: killing the engine we started, then its NSM: the failures under test.
    unsafe { libc::kill(engine.pid() as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: integers only, no memory passed: kill has no memory-safety preconditions; nsm is the
    // NSM our engine started (the crash under test).
    unsafe { libc::kill(nsm, libc::SIGKILL) };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let _ = tx.send(rest);
    });
    let rest = rx.recv_timeout(Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    let rest = rest.expect("the guest still waits on its dead NSM");
    assert!(rest.contains(&format!("recv failed {}", libc::ECONNRESET)), "{rest}");
}

#[test]
fn isolated_guest_reaches_only_what_netkernel_serves() {
    if lacks_root("isolated_guest_reaches_only_what_netkernel_serves: --isolate needs root") {
        return;
    }
    let curl = require("curl");
    let busybox = require("busybox");
    // The server is not isolated: the isolated guests need the host's loopback to reach it.
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"kernel\"\n\n[[tenant]]\nname = \"default\"\nnsm = \"kernel\"\nhost_loopback = true\n",
    );
    let (mut server, port) = engine.http_server("hi.txt", "through netkernel\n");
    let url = format!("http://127.0.0.1:{port}/hi.txt");
    let isolated = |program: &str, args: &[&str]| {
        let mut c = Command::new(NETKERNEL);
        c.args(["run", "--isolate", "--socket"]).arg(&engine.socket).arg("--").arg(program).args(args);
        output_within(c, Duration::from_secs(30))
    };
    // Served by GuestLib: reaches the server through the NSM.
    let out = isolated(curl.to_str().unwrap(), &["-sS", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through netkernel\n");
    // A statically linked program is not interposed: in the isolated namespace it reaches nothing.
    let out = isolated(busybox.to_str().unwrap(), &["wget", "-q", "-O", "-", &url]);
    assert!(!out.status.success(), "busybox reached the server without NetKernel");
    // The same program outside the namespace does reach it, so the failure is the isolation.
    let native = Command::new(&busybox).args(["wget", "-q", "-O", "-", &url]).output().unwrap();
    assert!(native.status.success());
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn names_are_resolved_by_the_provider() {
    let python = require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\nhosts = { \"nk-provider-name\" = \"127.0.0.1\" }\n\n[[tenant]]\nname = \"t\"\nnsm = \"k\"\n\
         host_loopback = true\n",
    );
    let script = "import socket\nprint(socket.getaddrinfo('nk-provider-name', 'http', type=socket.SOCK_STREAM)[0][4])\n\
                  print(socket.getaddrinfo('127.0.0.1', 80, type=socket.SOCK_STREAM)[0][4])\n\
                  try:\n    socket.getaddrinfo('no-such-name.invalid', 80)\nexcept socket.gaierror as e:\n    print('gaierror', e.errno)\n";
    let out = output_within(engine.run(python.to_str().unwrap(), &["-c", script]), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("('127.0.0.1', 80)\n('127.0.0.1', 80)\ngaierror {}\n", libc::EAI_NONAME)
    );
    // Natively the name does not exist: it is the provider's.
    let native = output_within(
        {
            let mut c = Command::new(&python);
            c.args(["-c", "import socket\nsocket.getaddrinfo('nk-provider-name', 80)\n"]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(!native.status.success());
    if lacks_root("the isolated half of names_are_resolved_by_the_provider: --isolate needs root") {
        return;
    }
    // In a guest with no network of its own, curl reaches a server by the provider's name.
    let curl = require("curl");
    let (mut server, port) = engine.http_server("n.txt", "named\n");
    let mut c = Command::new(NETKERNEL);
    c.args(["run", "--isolate", "--socket"])
        .arg(&engine.socket)
        .arg("--")
        .arg(&curl)
        .args(["-sS", &format!("http://nk-provider-name:{port}/n.txt")]);
    let out = output_within(c, Duration::from_secs(30));
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "named\n");
}

/// gethostbyname(_ex), gethostbyaddr and getnameinfo answer from the provider like getaddrinfo:
/// names only the NSM's `hosts` knows resolve, both ways, in an isolated guest too; numeric
/// getnameinfo needs no NSM; unknown names fail with the codes glibc gives natively.
#[test]
fn host_and_reverse_names_are_the_providers() {
    let python = require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\nhosts = { \"nk-provider-name\" = \"127.0.0.9\", \"nk-v6-name\" = \"::1\" }\n\n\
         [[tenant]]\nname = \"t\"\nnsm = \"k\"\n",
    );
    let lookups = "import socket\n\
                   def t(f, *a):\n    try: print(f(*a))\n    except OSError as e: print(type(e).__name__, e.args[0])\n";
    let known = format!(
        "{lookups}t(socket.gethostbyname, 'nk-provider-name')\nt(socket.gethostbyname_ex, 'nk-provider-name')\n\
         t(socket.gethostbyaddr, '127.0.0.9')\nt(socket.getnameinfo, ('127.0.0.9', 80), 0)\n\
         t(socket.getnameinfo, ('::1', 80, 0, 0), socket.NI_NAMEREQD)\n"
    );
    let want = "127.0.0.9\n('nk-provider-name', [], ['127.0.0.9'])\n('nk-provider-name', [], ['127.0.0.9'])\n\
                ('nk-provider-name', 'http')\n('nk-v6-name', 'http')\n";
    let unknown = format!(
        "{lookups}t(socket.gethostbyname, 'no-such-name.invalid')\nt(socket.gethostbyname_ex, 'no-such-name.invalid')\n\
         t(socket.gethostbyaddr, '192.0.2.77')\nt(socket.getnameinfo, ('192.0.2.77', 80), socket.NI_NAMEREQD)\n\
         t(socket.getnameinfo, ('192.0.2.77', 80), 0)\n\
         t(socket.getnameinfo, ('127.0.0.9', 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)\n"
    );
    let python_cmd = |script: &str, isolate: bool| {
        let mut c = Command::new(NETKERNEL);
        c.arg("run");
        if isolate {
            c.arg("--isolate");
        }
        c.arg("--socket").arg(&engine.socket).arg("--").arg(&python).args(["-c", script]);
        c
    };
    let out = output_within(python_cmd(&known, false), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let native = output_within(
        {
            let mut c = Command::new(&python);
            c.args(["-c", &unknown]);
            c
        },
        Duration::from_secs(30),
    );
    let nk = output_within(python_cmd(&unknown, false), Duration::from_secs(30));
    assert!(nk.status.success(), "{}", String::from_utf8_lossy(&nk.stderr));
    assert_eq!(String::from_utf8_lossy(&nk.stdout), String::from_utf8_lossy(&native.stdout));
    assert!(String::from_utf8_lossy(&nk.stdout).contains("herror 1\n"), "{}", String::from_utf8_lossy(&nk.stdout));
    if lacks_root("the isolated half of host_and_reverse_names_are_the_providers: --isolate needs root") {
        return;
    }
    let out = output_within(python_cmd(&known, true), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let out = output_within(python_cmd(&unknown, true), Duration::from_secs(30));
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&native.stdout));
}

#[test]
fn prometheus_metrics_and_ctl_top() {
    let promtool = require("promtool");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    // TCP's own telemetry (RTT, cwnd) needs the connection to go through the kernel stack, not
    // the co-located short cut.
    let engine = TestEngine::with_config(&format!(
        "[engine]\nmetrics = \"{addr}\"\n\n[[nsm]]\nname = \"kernel\"\ncolocate = false\n\n\
         [[tenant]]\nname = \"default\"\nnsm = \"kernel\"\n"
    ));
    // A guest with a connection that has moved bytes, kept open while we look.
    let script = "import socket,sys\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
                  s,_=l.accept()\nc.sendall(b'x'*200000)\nn=0\nwhile n<200000: n+=len(s.recv(65536))\nprint('ready',flush=True)\nsys.stdin.read()\n";
    let mut child = engine.python_ready(script);
    let resp = metrics_response(&addr);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"), "{head}");
    for want in [
        "netkernel_nsm_up{nsm=\"kernel\",kind=\"kernel\"} 1",
        "netkernel_tenant_sent_bytes_total{tenant=\"default\",nsm=\"kernel\"} 200000",
        "netkernel_tenant_connections_total{tenant=\"default\",nsm=\"kernel\"} 2",
        "netkernel_connection_rtt_seconds{",
        "netkernel_connection_delivery_rate_bytes_per_second{",
    ] {
        assert!(body.contains(want), "metrics lack {want}:\n{body}");
    }
    let mut check = Command::new(&promtool);
    check.args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut check = check.spawn().unwrap();
    check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Per-connection telemetry in ctl conns, and the live view.
    let conns = engine.ctl("conns");
    let est: Vec<_> = conns.as_array().unwrap().iter().filter(|c| c["state"] == "ESTABLISHED").collect();
    assert_eq!(est.len(), 2);
    assert!(est.iter().all(|c| c["rtt_us"].as_u64().unwrap() > 0 && c["cwnd"].as_u64().unwrap() > 0), "{conns}");
    let out = Command::new(NETKERNEL)
        .args(["ctl", "top", "--iterations", "2", "--socket"])
        .arg(&engine.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(text.matches("netkernel top — 3 connection(s)").count(), 2, "{text}");
    assert!(text.contains("MBPS") && text.contains("ESTABLISHED") && text.contains("LISTEN"), "{text}");
    drop(child.stdin.take());
    child.wait().unwrap();
}

/// SO_LINGER with a timeout makes a kernel close() wait until the bytes are out: the NSM must not
/// wait with it, or every guest it serves would stall.
#[test]
fn a_lingering_close_does_not_stall_the_nsm() {
    // A native peer that accepts and never reads, so the guest's bytes cannot leave.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let keep = std::thread::spawn(move || {
        let conn = sink.accept().unwrap();
        std::thread::sleep(Duration::from_secs(8));
        drop(conn);
    });
    let engine = TestEngine::start();
    let script = format!(
        "import socket,struct,time\n\
         c=socket.create_connection(('127.0.0.1',{port}))\nc.setblocking(False)\n\
         try:\n    while True: c.send(b'x'*65536)\nexcept BlockingIOError: pass\n\
         c.setsockopt(socket.SOL_SOCKET,socket.SO_LINGER,struct.pack('ii',1,5))\n\
         t=time.time()\nc.close()\n\
         l=socket.create_server(('127.0.0.1',0))\nd=socket.create_connection(l.getsockname())\n\
         s,_=l.accept()\nd.sendall(b'ping')\nassert s.recv(4)==b'ping'\n\
         print('close and a new connection: %.3f s' % (time.time()-t))\n"
    );
    let python = require("python3");
    let out = output_within(engine.run(python.to_str().unwrap(), &["-c", &script]), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text.trim().rsplit(' ').nth(1).unwrap().parse().unwrap();
    assert!(secs < 1.0, "the NSM stalled behind a lingering close: {text}");
    keep.join().unwrap();
}

/// A level-triggered server whose NSM crashed: its listener reports the end once (accept fails
/// with ECONNRESET) and then nothing, so the server neither spins nor misses it; connected
/// sockets report their reset as before. Real servers (redis, nginx workers) keep such a
/// listener and go back to waiting after the failed accept. Under epoll, and under poll after
/// the server made a new socket (its listener's fd is then stale: the guest attached anew).
#[test]
fn a_level_triggered_server_whose_nsm_crashed_does_not_spin() {
    let engine = TestEngine::start();
    for (selector, then) in [("DefaultSelector", ""), ("PollSelector", "attach()")] {
        // attach(): a new socket, once the NSM is back (the guest attaches anew).
        let script = format!(
            "import selectors,socket,sys,time\ndef attach():\n    while True:\n        try:\n            \
             socket.socket().close(); print('attached anew',flush=True); return\n        except OSError:\n            \
             time.sleep(0.1)\nl=socket.create_server(('127.0.0.1',0))\nl.setblocking(False)\n\
             sel=selectors.{selector}()\nsel.register(l,selectors.EVENT_READ)\nprint('ready',flush=True)\n\
             errors=0\nwhile True:\n    for k,_ in sel.select():\n        try:\n            l.accept()\n        \
             except BlockingIOError:\n            pass\n        except OSError as e:\n            errors+=1\n            \
             if errors==1: print('accept failed',e.errno,flush=True); {then}\n"
        );
        let mut server = engine.python_ready(&script);
        let mut out = BufReader::new(server.stdout.take().unwrap());
        let pid = engine.nsm()["pid"].as_u64().unwrap() as i32;
        // SAFETY: killing the NSM child of our engine, the crash under test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("accept failed {}", libc::ECONNRESET), "{selector}: the server learns of it");
        if !then.is_empty() {
            line.clear();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "attached anew");
        }
        std::thread::sleep(Duration::from_millis(300));
        let before = cpu_ticks(server.id());
        let start = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let share = (cpu_ticks(server.id()) - before) as f64 / hz / start.elapsed().as_secs_f64();
        assert!(server.try_wait().unwrap().is_none(), "{selector}: the server died");
        let _ = server.kill();
        let _ = server.wait();
        assert!(share < 0.05, "{selector}: the server spins on its dead listener: {:.0}% of a core", share * 100.0);
        // The engine restarts the NSM for the next round.
        let start = std::time::Instant::now();
        while engine.nsm()["pid"].as_u64() == Some(pid as u64) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
