//! Unmodified programs through a user NSM (`kind = "user"`: smoltcp in the NSM process on a TAP
//! device): to and from the host across the TAP, inside the user stack's own loopback, and to
//! a guest of a kernel NSM. Every test needs root (the engine makes the TAP device).

mod common;
use common::*;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root_or_skip(what: &str) -> bool {
    !lacks_root(&format!("{what}: a user NSM's TAP device needs root"))
}

/// The engine and its user NSM's address; the host's side of the link is `.1` of its subnet.
fn engine(extra: &str) -> (TestEngine, Ipv4Addr) {
    let (toml, addr) = user_nsm_config(extra);
    (TestEngine::with_config(&toml), addr)
}

fn gateway(nsm: Ipv4Addr) -> Ipv4Addr {
    let o = nsm.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

struct Killed(Child);

impl Drop for Killed {
    /// SIGTERM first, so that a master (nginx) takes its workers down with it.
    fn drop(&mut self) {
        // SAFETY: signalling our own child; no pointers.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts TCP connections at `addr` (natively, across the TAP).
fn wait_listening(addr: SocketAddr, server: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(server.try_wait().unwrap().is_none(), "the server at {addr} exited");
        assert!(Instant::now() < deadline, "nothing listens at {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_fetches_100mib_from_a_server_on_the_host() {
    if !root_or_skip("the 100 MiB fetch") {
        return;
    }
    let (engine, nsm) = engine("colocate = false");
    let www = engine.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let file = www.join("blob.bin");
    write_random(&file, 100 << 20);
    // A native server on the host's end of the TAP.
    let port = free_port();
    let gw = gateway(nsm);
    let mut server = Command::new(require("python3"));
    server.args(["-m", "http.server", &port.to_string(), "--bind", &gw.to_string()]);
    server.current_dir(&www).stdout(Stdio::null()).stderr(Stdio::null());
    let mut server = Killed(server.spawn().unwrap());
    wait_listening(SocketAddr::from((gw, port)), &mut server.0);
    let got = engine.dir.path().join("got.bin");
    let start = Instant::now();
    run_ok(engine.run(
        require("curl").to_str().unwrap(),
        &["-sS", "-o", got.to_str().unwrap(), &format!("http://{gw}:{port}/blob.bin")],
    ));
    let took = start.elapsed();
    assert_eq!(sha256_file(&got), sha256_file(&file), "content differs");
    let nsm = engine.nsm();
    assert!(nsm["bytes_in"].as_u64().unwrap() >= 100 << 20, "the NSM did not carry it: {nsm}");
    eprintln!("100 MiB from the host through the user NSM in {took:?}");
}

#[test]
fn nginx_with_workers_as_a_guest_answers_native_clients() {
    if !root_or_skip("nginx") {
        return;
    }
    let nginx = require("nginx");
    let (engine, nsm) = engine("colocate = false");
    let dir = engine.dir.path().join("nginx");
    let port = free_port();
    let args = nginx_site(&dir, &format!("0.0.0.0:{port}"), "hello from nginx on a user stack\n");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = engine.run(nginx.to_str().unwrap(), &args);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut server = Killed(c.spawn().unwrap());
    wait_listening(SocketAddr::from((nsm, port)), &mut server.0);
    // Native clients on the host reach the guest at the NSM's address.
    for _ in 0..20 {
        let body = run_ok({
            let mut c = Command::new(require("curl"));
            c.args(["-sS", "--max-time", "10", &format!("http://{nsm}:{port}/")]);
            c
        });
        assert_eq!(body, "hello from nginx on a user stack\n");
    }
    let out = run_ok({
        let mut c = Command::new(require("wrk"));
        c.args(["-t1", "-c8", "-d1s", &format!("http://{nsm}:{port}/")]);
        c
    });
    assert!(out.contains("Requests/sec") && !out.contains("Non-2xx"), "{out}");
}

#[test]
fn redis_server_and_redis_benchmark_as_guests() {
    if !root_or_skip("redis") {
        return;
    }
    let (engine, _) = engine("colocate = false");
    let port = free_port().to_string();
    let mut c = engine.run(
        require("redis-server").to_str().unwrap(),
        &["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    );
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let _server = Killed(c.spawn().unwrap());
    let cli = require("redis-cli");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = output_within(engine.run(cli.to_str().unwrap(), &["-p", &port, "ping"]), Duration::from_secs(10));
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            break;
        }
        assert!(Instant::now() < deadline, "redis never answered through the user NSM's loopback");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = run_ok(engine.run(
        require("redis-benchmark").to_str().unwrap(),
        &["-p", &port, "-n", "5000", "-c", "20", "-P", "4", "-t", "set,get", "-q"],
    ));
    assert!(out.contains("SET") && out.contains("GET") && out.contains("requests per second"), "{out}");
    let nsm = engine.nsm();
    assert!(nsm["conns_total"].as_u64().unwrap() >= 20, "{nsm}");
}

#[test]
fn iperf3_between_a_native_client_and_a_guest_both_ways() {
    if !root_or_skip("iperf3") {
        return;
    }
    let iperf = require("iperf3");
    let (engine, nsm) = engine("colocate = false");
    let port = free_port();
    let p = port.to_string();
    let mut c = engine.run(iperf.to_str().unwrap(), &["-s", "-p", &p]);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut server = Killed(c.spawn().unwrap());
    wait_listening(SocketAddr::from((nsm, port)), &mut server.0);
    for reverse in [false, true] {
        let target = nsm.to_string();
        let mut args = vec!["-c", &target, "-p", &p, "-t", "2", "-J"];
        if reverse {
            args.push("-R");
        }
        let mut bytes = 0;
        let mut out = String::new();
        // The readiness probe above may still hold the server for a moment.
        for _ in 0..5 {
            let o = output_within(
                {
                    let mut c = Command::new(&iperf);
                    c.args(&args);
                    c
                },
                Duration::from_secs(60),
            );
            out = String::from_utf8_lossy(&o.stdout).into_owned();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
            if bytes > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(bytes > 10 << 20, "iperf3 (reverse: {reverse}) moved only {bytes} bytes: {out}");
    }
}

#[test]
fn a_user_nsm_guest_talks_to_a_kernel_nsm_guest() {
    if !root_or_skip("user to kernel NSM") {
        return;
    }
    let (user, nsm) = user_nsm_config("colocate = false");
    let toml = format!("{user}\n[[nsm]]\nname = \"kernel\"\n\n[[tenant]]\nname = \"k\"\nnsm = \"kernel\"\n");
    let engine = TestEngine::with_config(&toml);
    let python = require("python3");
    let port = free_port();
    // An echo server, a guest of the kernel NSM (in the host's namespace).
    let script = format!(
        "import socket\nl=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('0.0.0.0',{port})); l.listen()\nprint('ready', flush=True)\n\
         while True:\n    c,_=l.accept(); d=b''\n    while not d.endswith(b'\\n'): d+=c.recv(100)\n    c.sendall(b'echo '+d); c.close()\n"
    );
    let mut c = Command::new(NETKERNEL);
    c.args(["run", "--socket", engine.socket.to_str().unwrap(), "--tenant", "k", "--"]);
    c.args([python.to_str().unwrap(), "-c", &script]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut server = Killed(c.spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // The user NSM's guest reaches it through the host, at the gateway.
    let gw = gateway(nsm);
    let client = format!(
        "import socket\ns=socket.create_connection(('{gw}',{port}), timeout=10)\ns.sendall(b'from the user stack\\n')\n\
         print(s.recv(100).decode().strip())\n"
    );
    let out = run_ok(engine.run(python.to_str().unwrap(), &["-c", &client]));
    assert_eq!(out.trim(), "echo from the user stack");
    let nsms = engine.ctl("nsms");
    let by_name = |n: &str| nsms.as_array().unwrap().iter().find(|x| x["name"] == n).cloned().unwrap();
    assert!(by_name("user")["conns_total"].as_u64().unwrap() >= 1, "{nsms}");
    assert!(by_name("kernel")["conns_total"].as_u64().unwrap() >= 1, "{nsms}");
}

#[test]
fn an_idle_engine_user_nsm_and_guest_use_under_one_percent_of_a_core() {
    if root_or_skip("the idle test") {
        assert_idle_under_one_percent(&engine("colocate = false").0);
    }
}

/// A guest echo server holds 10,000 connections from a native client at once, all open until
/// every one has echoed its byte.
#[test]
fn ten_thousand_concurrent_connections_through_one_user_nsm() {
    if !root_or_skip("10,000 connections") {
        return;
    }
    const N: usize = 10_000;
    let (engine, nsm) = engine("colocate = false");
    let python = require("python3");
    let port = free_port();
    let server = format!(
        "import resource, selectors, socket\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))\n\
         l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('0.0.0.0', {port})); l.listen(4096); l.setblocking(False)\n\
         sel = selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ)\n\
         print('ready', flush=True)\n\
         while True:\n\
         \x20   for key, _ in sel.select():\n\
         \x20       if key.fileobj is l:\n\
         \x20           while True:\n\
         \x20               try: c, _ = l.accept()\n\
         \x20               except BlockingIOError: break\n\
         \x20               c.setblocking(False); sel.register(c, selectors.EVENT_READ)\n\
         \x20       else:\n\
         \x20           d = key.fileobj.recv(16)\n\
         \x20           if d: key.fileobj.send(d)\n\
         \x20           else: sel.unregister(key.fileobj); key.fileobj.close()\n"
    );
    let mut c = engine.run(python.to_str().unwrap(), &["-c", &server]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut server = Killed(c.spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let client = format!(
        "import resource, selectors, socket, time\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))\n\
         socks = []\n\
         for i in range({N}):\n\
         \x20   s = socket.socket(); s.setblocking(False)\n\
         \x20   s.connect_ex(('{nsm}', {port})); socks.append(s)\n\
         \x20   if i % 500 == 499: time.sleep(0.05)\n\
         sel = selectors.DefaultSelector()\n\
         for s in socks: sel.register(s, selectors.EVENT_WRITE)\n\
         pending, echoed, deadline = set(socks), 0, time.time() + 120\n\
         while pending and time.time() < deadline:\n\
         \x20   for key, ev in sel.select(1):\n\
         \x20       s = key.fileobj\n\
         \x20       if ev & selectors.EVENT_WRITE:\n\
         \x20           s.send(b'x'); sel.modify(s, selectors.EVENT_READ)\n\
         \x20       elif s.recv(16) == b'x':\n\
         \x20           echoed += 1; pending.discard(s); sel.unregister(s)\n\
         print(echoed, sum(1 for s in socks if s.fileno() >= 0))\n"
    );
    let start = Instant::now();
    let out = run_ok({
        let mut c = Command::new(&python);
        c.args(["-c", &client]);
        c
    });
    eprintln!("{N} connections through the user NSM, each echoing a byte, in {:?}", start.elapsed());
    assert_eq!(out.trim(), format!("{N} {N}"), "echoed, still open");
}

/// A DNS server for the test, on the host's end of the link: A records for `*.example.test`
/// (the gateway's address), no AAAA, NXDOMAIN for anything else; it prints each question.
const DNS_SERVER: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
print('ready', flush=True)
while True:
    q, peer = s.recvfrom(512)
    qid, flags = struct.unpack('!HH', q[:4])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i+1:i+1+q[i]].decode()); i += 1 + q[i]
    qtype = struct.unpack('!H', q[i+1:i+3])[0]
    question = q[12:i+5]
    name = '.'.join(labels).lower()
    print(name, qtype, flush=True)
    ok = name.endswith('.example.test')
    answers = b''
    if ok and qtype == 1:
        answers = b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, 60, 4) + socket.inet_aton(sys.argv[1])
    rcode = 0 if ok else 3
    head = struct.pack('!HHHHHH', qid, 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
    s.sendto(head + question + answers, peer)
"#;

#[test]
fn names_resolve_through_the_user_stack_from_hosts_and_dns() {
    if !root_or_skip("DNS through the user stack") {
        return;
    }
    let (engine, nsm) =
        engine("colocate = false\nnameservers = [\"{gateway}\"]\nhosts = { \"configured.name\" = \"10.9.8.7\" }");
    let gw = gateway(nsm);
    let python = require("python3");
    let mut dns = Command::new(&python);
    dns.args(["-c", DNS_SERVER, &gw.to_string()]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut dns = Killed(dns.spawn().unwrap());
    let mut questions = std::io::BufReader::new(dns.0.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut questions, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let script = "import socket\n\
        print(sorted({a[4][0] for a in socket.getaddrinfo('www.example.test', 80, type=socket.SOCK_STREAM)}))\n\
        print(socket.getaddrinfo('configured.name', 'http', socket.AF_INET, socket.SOCK_STREAM)[0][4])\n\
        try:\n    socket.getaddrinfo('nothing.invalid', 80)\nexcept socket.gaierror as e:\n    print('gaierror', e.errno == socket.EAI_NONAME)\n";
    let out = run_ok(engine.run(python.to_str().unwrap(), &["-c", script]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [format!("['{gw}']").as_str(), "('10.9.8.7', 80)", "gaierror True"], "{out}");
    // The server saw the questions: both families for www, and none for the configured name.
    drop(dns);
    let mut asked = String::new();
    std::io::Read::read_to_string(&mut questions, &mut asked).unwrap();
    assert!(asked.contains("www.example.test 1") && asked.contains("www.example.test 28"), "{asked}");
    assert!(!asked.contains("configured.name"), "{asked}");
}

/// `ctl conns` and /metrics show a user NSM's connections with the RTT, cwnd and retransmits its
/// stack measures.
#[test]
fn ctl_conns_and_metrics_show_user_connections_with_rtt_and_cwnd() {
    if !root_or_skip("user-NSM telemetry") {
        return;
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    let (user, nsm) = user_nsm_config("colocate = false");
    let engine = TestEngine::with_config(&format!("[engine]\nmetrics = \"{metrics}\"\n\n{user}"));
    let port = free_port();
    // A guest server that reads 20 MB from a native client across the TAP, then holds the
    // connection open until its stdin closes.
    let script = format!(
        "import socket,sys\nl=socket.create_server(('0.0.0.0',{port}))\nprint('ready',flush=True)\n\
         s,_=l.accept()\nn=0\nwhile n<20000000: n+=len(s.recv(1<<20))\ns.sendall(b'done')\nsys.stdin.read()\n"
    );
    let mut guest = engine.python_ready(&script);
    let mut c = TcpStream::connect((nsm, port)).unwrap();
    std::io::Write::write_all(&mut c, &vec![7u8; 20_000_000]).unwrap();
    let mut done = [0u8; 4];
    std::io::Read::read_exact(&mut c, &mut done).unwrap();
    let conns = engine.ctl("conns");
    let conn = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["nsm"] == "user" && c["state"] == "ESTABLISHED")
        .unwrap_or_else(|| panic!("no established user-NSM connection: {conns}"))
        .clone();
    assert_eq!(conn["path"], "user", "{conn}");
    assert!(conn["bytes_in"].as_u64().unwrap() >= 20_000_000, "{conn}");
    assert!(conn["rtt_us"].as_u64().unwrap() > 0 && conn["cwnd"].as_u64().unwrap() > 0, "{conn}");
    let body = metrics_response(&metrics);
    let rtt = body
        .lines()
        .find(|l| l.starts_with("netkernel_connection_rtt_seconds{") && l.contains("nsm=\"user\""))
        .unwrap_or_else(|| panic!("no user-NSM RTT in /metrics:\n{body}"));
    assert!(rtt.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > 0.0, "{rtt}");
    drop(guest.stdin.take());
    let _ = guest.wait();
}

/// A user NSM on a veth (`link = "veth"`, an AF_PACKET socket in the NSM's namespace) serves a
/// native client, and a tenant's rate limit holds on the user stack as on the kernel's.
#[test]
fn a_user_nsm_on_a_veth_sends_at_its_tenants_rate() {
    if !root_or_skip("the veth link") {
        return;
    }
    let (toml, nsm) = user_nsm_config("link = \"veth\"\ncolocate = false");
    let engine = TestEngine::with_config(&format!("{toml}rate_limit = 50000000\n"));
    let port = free_port();
    // The guest sends for 4 s as fast as its tenant may.
    let script = format!(
        "import socket,time\nl=socket.create_server(('0.0.0.0',{port}))\nprint('ready',flush=True)\n\
         c,_=l.accept()\nb=b'x'*65536\nt=time.time()\ntry:\n    while time.time()-t<4:\n        c.sendall(b)\n\
         except OSError:\n    pass\n"
    );
    let mut guest = engine.python_ready(&script);
    let mut c = TcpStream::connect_timeout(&SocketAddr::from((nsm, port)), Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = std::io::Read::read(&mut c, &mut buf).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        n += std::io::Read::read(&mut c, &mut buf).unwrap();
    }
    let bps = n as f64 * 8.0 / start.elapsed().as_secs_f64();
    eprintln!("a tenant capped at 50 Mbit/s on a user NSM over a veth: {:.1} Mbit/s", bps / 1e6);
    assert!((35e6..57e6).contains(&bps), "{:.1} Mbit/s", bps / 1e6);
    drop(c);
    drop(guest.stdin.take());
    let _ = guest.wait();
}
