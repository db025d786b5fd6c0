//! Unmodified programs from Debian packages, served by the kernel NSM.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn python_http_server_serves_100mib_to_curl() {
    let python = require("python3");
    let curl = require("curl");
    let engine = TestEngine::start();
    let www = engine.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let file = www.join("blob.bin");
    write_random(&file, 100 << 20);
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

/// Sockets inherited across exec, with real programs, NetKernel against native: a supervisor
/// that execs itself with a listening fd in argv; inetd-style hand-offs of a connection as
/// stdin/stdout through python's subprocess (vfork+exec, the child closing every other fd) to
/// python, sed (C stdio) and socat; fexecve; posix_spawn of a program given a socket's fd number; a daemon() child
/// (glibc forks internally, the parent exits at once) serving a listener; and a program exec'd
/// without GuestLib, whose exit ends its copy of the connection.
const EXEC_SCRIPT: &str = r#"
import ctypes, os, socket, subprocess, sys, time
if sys.argv[1:2] == ['child']:
    l = socket.socket(fileno=int(sys.argv[2]))
    for i in range(2):
        c, _ = l.accept()
        c.sendall(b'served by the exec\'d supervisor %d\n' % i)
        c.close()
    sys.exit(0)
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()
port = l.getsockname()[1]
def conn():
    c = socket.create_connection(('127.0.0.1', port))
    s, _ = l.accept()
    return c, s
def drain(c):
    data = b''
    while True:
        d = c.recv(100)
        if not d: return data
        data += d
c, s = conn()
p = subprocess.Popen([sys.executable, '-c', 'import sys; d=sys.stdin.buffer.readline(); sys.stdout.buffer.write(b"python child got " + d)'], stdin=s, stdout=s)
s.close(); c.sendall(b'hello\n')
print(drain(c).decode().strip(), p.wait())
c, s = conn()
p = subprocess.Popen(['sed', 's/hello/bonjour/'], stdin=s, stdout=s)
s.close(); c.sendall(b'hello from C stdio\n'); c.shutdown(socket.SHUT_WR)
print(drain(c).decode().strip(), p.wait())
c, s = conn()
if os.fork() == 0:
    os.dup2(s.fileno(), 0)
    os.execve(os.open(sys.executable, os.O_RDONLY), [sys.executable, '-c', "import os; os.write(0, b'via fexecve')"], dict(os.environ))
s.close()
print(drain(c).decode(), os.wait()[1])
c, s = conn()
p = subprocess.Popen(['socat', 'STDIO', 'EXEC:cat'], stdin=s, stdout=s)
s.close(); c.sendall(b'through socat\n'); c.shutdown(socket.SHUT_WR)
print(drain(c).decode().strip(), p.wait())
c, s = conn()
s.set_inheritable(True)
pid = os.posix_spawn(sys.executable, [sys.executable, '-c', 'import socket,sys; s=socket.socket(fileno=int(sys.argv[1])); s.sendall(b"spawned says hi")', str(s.fileno())], os.environ)
s.close()
print(drain(c).decode(), os.waitpid(pid, 0)[1])
c, s = conn()
env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
p = subprocess.Popen(['sleep', '0.5'], stdin=s, env=env)
s.close()
c.settimeout(0.2)
try: print('early', c.recv(10))
except socket.timeout: print('open while the program without GuestLib runs')
p.wait(); c.settimeout(5)
print('after it exits', c.recv(10))
r, w = os.pipe()
a = os.fork()
if a == 0:
    d = socket.socket(); d.bind(('127.0.0.1', 0)); d.listen()
    os.write(w, b'%d' % d.getsockname()[1])
    ctypes.CDLL(None).daemon(1, 1)
    x, _ = d.accept(); x.sendall(b'daemon says hi'); x.close()
    os._exit(0)
dport = int(os.read(r, 16)); os.waitpid(a, 0)
print(drain(socket.create_connection(('127.0.0.1', dport))).decode())
if os.fork() == 0:
    for i in range(2):
        print(drain(socket.create_connection(('127.0.0.1', port))).decode().strip(), flush=True)
    os._exit(0)
l.set_inheritable(True)
sys.stdout.flush()
os.execv(sys.executable, [sys.executable, sys.argv[0], 'child', str(l.fileno())])
"#;

#[test]
fn sockets_survive_exec_in_real_programs() {
    let python = require("python3");
    require("socat");
    let engine = TestEngine::start();
    let script = engine.dir.path().join("exec.py");
    std::fs::write(&script, EXEC_SCRIPT).unwrap();
    let native = output_within(
        {
            let mut c = std::process::Command::new(&python);
            c.arg(&script);
            c
        },
        Duration::from_secs(60),
    );
    assert!(native.status.success(), "native: {}", String::from_utf8_lossy(&native.stderr));
    let nk = output_within(engine.run(python.to_str().unwrap(), &[script.to_str().unwrap()]), Duration::from_secs(60));
    let (n, k) = (String::from_utf8_lossy(&native.stdout), String::from_utf8_lossy(&nk.stdout));
    assert!(nk.status.success(), "under NetKernel: {}\n{k}\n{}", String::from_utf8_lossy(&nk.stderr), engine.log());
    assert_eq!(n, k, "native and NetKernel differ");
    assert!(k.contains("daemon says hi") && k.contains("served by the exec'd supervisor 1"), "{k}");
    assert!(!String::from_utf8_lossy(&nk.stderr).contains("netkernel:"), "{}", String::from_utf8_lossy(&nk.stderr));
    assert!(engine.nsm()["conns_total"].as_u64().unwrap() >= 8, "not through the NSM: {}", engine.nsm());
    // socat as an inetd: it forks per connection and execs the service with the connection as
    // its stdin and stdout (nofork: no relay process in between). tr answers through C stdio.
    let socat = require("socat");
    let port = free_port();
    let mut server = engine
        .run(
            socat.to_str().unwrap(),
            &[&format!("TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1"), "EXEC:tr a-z A-Z,nofork"],
        )
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..3 {
        let line = format!("inetd request {i}\n");
        let mut client = engine.run(socat.to_str().unwrap(), &["-t", "2", "-", &format!("TCP:127.0.0.1:{port}")]);
        client.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = client.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), line.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), line.to_uppercase(), "{}", engine.log());
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// A program that cannot rejoin what it inherited (here: a handoff naming a region fd it does
/// not have) gets ECONNRESET on those sockets at once and one line on stderr, never a hang.
#[test]
fn unservable_inherited_sockets_fail_at_once() {
    let python = require("python3");
    let engine = TestEngine::start();
    let script = r#"
import os, socket, sys
a, b = socket.socketpair()
os.set_inheritable(a.fileno(), True)
env = dict(os.environ, NETKERNEL_INHERIT='7,1,999,-1;%d:0,' % os.fstat(a.fileno()).st_ino)
child = "import os,sys\ntry: os.read(int(sys.argv[1]), 10)\nexcept OSError as e: print(e.errno, 'NETKERNEL_INHERIT' in os.environ)"
os.execve(sys.executable, [sys.executable, '-c', child, str(a.fileno())], env)
"#;
    let out = output_within(engine.run(python.to_str().unwrap(), &["-c", script]), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{} False\n", libc::ECONNRESET));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("netkernel: inherited sockets are not served")).count(),
        1,
        "{err}"
    );
}

/// The 65th process of a guest (64 was once the limit): when it execs (dropping its
/// close-on-exec copies of the parent's sockets) the parent's sockets stay open, and the
/// program it becomes serves the connection it inherited.
#[test]
fn the_65th_process_execs_and_serves_what_it_inherited() {
    let python = require("python3");
    let engine = TestEngine::start();
    let script = r#"
import os, socket, sys, time
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()
c = socket.create_connection(l.getsockname()); s, _ = l.accept()
kids = []
for i in range(63):
    p = os.fork()
    if p == 0:
        time.sleep(0.5); os._exit(0)
    kids.append(p)
x = os.fork()
if x == 0:
    time.sleep(1.5); os.dup2(s.fileno(), 0)
    os.execv(sys.executable, [sys.executable, '-c', "import os; os.write(0, b'from the 65th process')"])
os.waitpid(x, 0)
print(c.recv(100))
c2 = socket.create_connection(l.getsockname()); s2, _ = l.accept()
c2.sendall(b'listener still open'); print(s2.recv(100))
c.sendall(b'connection still open'); print(s.recv(100))
for p in kids: os.waitpid(p, 0)
"#;
    let native = output_within(
        {
            let mut c = std::process::Command::new(&python);
            c.args(["-c", script]);
            c
        },
        Duration::from_secs(30),
    );
    let nk = output_within(engine.run(python.to_str().unwrap(), &["-c", script]), Duration::from_secs(30));
    assert!(nk.status.success(), "{}\n{}", String::from_utf8_lossy(&nk.stderr), engine.log());
    assert_eq!(String::from_utf8_lossy(&nk.stdout), String::from_utf8_lossy(&native.stdout));
}
