//! Shared test harness: a real engine (with its real NSM) on a private socket, and programs
//! started under GuestLib through `netkernel run`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NETKERNEL: &str = env!("CARGO_BIN_EXE_netkernel");
pub const PROBE: &str = env!("CARGO_BIN_EXE_nk-probe");

/// A running `netkernel serve`, stopped and cleaned up on drop.
pub struct TestEngine {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
    /// `serve` arguments beyond --socket, for a restart.
    args: Vec<String>,
    /// Where with_config's configuration lives while the engine may be restarted with it.
    config_dir: Option<tempfile::TempDir>,
}

impl TestEngine {
    pub fn start() -> TestEngine {
        Self::start_with(&[])
    }

    /// Starts an engine with this TOML configuration.
    pub fn with_config(toml: &str) -> TestEngine {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("netkernel.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut e = Self::start_with(&["--config", cfg.to_str().unwrap()]);
        e.config_dir = Some(dir);
        e
    }

    /// Starts an engine with extra `serve` arguments (e.g. --config).
    pub fn start_with(args: &[&str]) -> TestEngine {
        Self::start_in(None, args)
    }

    /// Starts an engine (and so its NSMs) inside network namespace `netns` (a testbed host).
    pub fn start_in(netns: Option<&str>, args: &[&str]) -> TestEngine {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("engine.sock");
        // Appending: NSMs outlive an engine that is restarted, and all write to this log.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("engine.log")).unwrap();
        let cmd = match netns {
            // `ip netns exec` execs the engine, so the child's pid is the engine's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, NETKERNEL]);
                c
            }
            None => Command::new(NETKERNEL),
        };
        let child = spawn_serve(cmd, &socket, args, log);
        let args = args.iter().map(|a| a.to_string()).collect();
        let e = TestEngine { dir, socket, child, args, config_dir: None };
        e.wait_until_answering();
        e
    }

    fn wait_until_answering(&self) {
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "engine did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends the engine process `signal` and waits for it to end.
    pub fn stop_with(&mut self, signal: i32) {
        // SAFETY: integers only, no memory passed; the child is reaped only after this, so its pid
        // cannot name another process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let status = self.child.wait().unwrap();
        assert!(signal == libc::SIGKILL || status.success(), "engine exited with {status}: {}", self.log());
    }

    /// The configuration file given by with_config (rewrite it before `restart` to change it).
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_dir.as_ref().map(|d| d.path().join("netkernel.toml"))
    }

    /// Starts a new engine on the same socket with the same arguments (the previous one must
    /// have ended); returns once it answers.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().append(true).open(self.dir.path().join("engine.log")).unwrap();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = spawn_serve(Command::new(NETKERNEL), &self.socket, &args, log);
        self.wait_until_answering();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("engine.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `netkernel run -- program args...` against this engine.
    pub fn run(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(NETKERNEL);
        c.arg("run").arg("--socket").arg(&self.socket).arg("--").arg(program).args(args);
        c
    }

    /// `netkernel ctl WHAT --json`, parsed.
    pub fn ctl(&self, what: &str) -> serde_json::Value {
        self.ctl_try(&[what]).unwrap_or_else(|e| panic!("ctl {what}: {e}"))
    }

    /// `netkernel ctl ARGS... --json`: the answer parsed, or what it printed on stderr.
    pub fn ctl_try(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out =
            Command::new(NETKERNEL).args(["ctl", "--json", "--socket"]).arg(&self.socket).args(args).output().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Starts a python3 guest running `script`, which prints "ready" once set up and then
    /// waits for its stdin to close (drop the child's stdin to end it).
    pub fn python_ready(&self, script: &str) -> Child {
        let python = require("python3");
        let mut c = self.run(python.to_str().unwrap(), &["-c", script]);
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the guest script did not get ready");
        child
    }

    /// A python3 http.server under NetKernel on 127.0.0.1 serving one file; returns the server
    /// (kill it when done) and its port.
    pub fn http_server(&self, file: &str, content: &str) -> (Child, u16) {
        let python = require("python3");
        let www = self.dir.path().join(format!("www-{file}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join(file), content).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c =
            self.run(python.to_str().unwrap(), &["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]);
        c.current_dir(&www).stdout(Stdio::null()).stderr(Stdio::null());
        let server = c.spawn().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "http.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (server, port)
    }

    /// The NSM's counters (first NSM).
    pub fn nsm(&self) -> serde_json::Value {
        self.ctl("nsms")[0].clone()
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        // `ctl shutdown` stops the NSMs too (SIGTERM would leave those serving guests running
        // for a next engine); SIGTERM if the engine does not answer.
        let stopped = Command::new(NETKERNEL)
            .args(["ctl", "--socket"])
            .arg(&self.socket)
            .arg("shutdown")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            // SAFETY: integers only, no memory passed; the child is reaped only after this, so its
            // pid cannot name another process.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(mut cmd: Command, socket: &Path, args: &[&str], log: std::fs::File) -> Child {
    cmd.arg("serve")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start netkernel serve")
}

/// Runs a command with a time limit; a hang fails the test instead of stalling CI.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            if start.elapsed() > limit {
                // SAFETY: killing our own child that overran its limit.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    child.stdin.take();
    let out = child.wait_with_output().expect("wait");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(!watchdog.join().unwrap(), "command exceeded {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Whether a program is on PATH; tests that need it fail with a clear message otherwise
/// (scripts/test installs everything they need).
pub fn require(program: &str) -> PathBuf {
    which(program).unwrap_or_else(|| panic!("{program} is not installed: run scripts/test, which installs it"))
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Whether the tests run as root (some scenarios need it).
pub fn is_root() -> bool {
    // SAFETY: no arguments, no memory touched; getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}

/// Whether a test that needs root cannot run here; it then says so (`SKIP what`), for the log.
pub fn lacks_root(what: &str) -> bool {
    let lacks = !is_root();
    if lacks {
        eprintln!("SKIP {what}");
    }
    lacks
}

/// User + system clock ticks a process has used (/proc/PID/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    stat.rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// A process and all its descendants (nginx workers, say).
pub fn descendants(pid: u32) -> Vec<u32> {
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

/// A configuration with one user NSM (`kind = "user"`, a TAP link) serving the default tenant,
/// on a subnet of its own (tests run engines side by side, each with its TAP on the host): the
/// TOML and the NSM's address. `extra` goes into the NSM's section, with `{gateway}` replaced by
/// the host's address on the link.
pub fn user_nsm_config(extra: &str) -> (String, std::net::Ipv4Addr) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let subnet = ((std::process::id() * 7 + n) % 250) as u8;
    let extra = extra.replace("{gateway}", &format!("10.78.{subnet}.1"));
    let toml = format!(
        "[[nsm]]\nname = \"user\"\nkind = \"user\"\naddress = \"10.78.{subnet}.2/24\"\ngateway = \"10.78.{subnet}.1\"\n{extra}\n\n\
         [[tenant]]\nname = \"default\"\nnsm = \"user\"\n"
    );
    (toml, std::net::Ipv4Addr::new(10, 78, subnet, 2))
}

/// An idle engine, its first NSM and a guest holding a listener and a connection, with a thread
/// blocked in accept and one in recv, together use under 1% of a core over 10 s.
pub fn assert_idle_under_one_percent(engine: &TestEngine) {
    let script = "import socket,threading,sys\nl=socket.socket();l.bind(('127.0.0.1',0));l.listen()\nc=socket.create_connection(l.getsockname())\ns,_=l.accept()\nthreading.Thread(target=l.accept,daemon=True).start()\nthreading.Thread(target=s.recv,args=(10,),daemon=True).start()\nprint('ready',flush=True)\nsys.stdin.read()\n";
    let mut child = engine.python_ready(script);
    std::thread::sleep(Duration::from_millis(500));
    let nsm_pid = engine.nsm()["pid"].as_u64().unwrap() as u32;
    let pids = [engine.pid(), nsm_pid, child.id()];
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (after - before) as f64 / hz;
    let share = cpu / start.elapsed().as_secs_f64();
    eprintln!("idle CPU over 10 s: {cpu:.3} s ({:.2}% of a core)", share * 100.0);
    assert!(share < 0.01, "idle NetKernel used {:.2}% of a core", share * 100.0);
    drop(child.stdin.take());
    child.wait().unwrap();
}

/// A free loopback port (bound natively and released; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `c` (within two minutes) and returns its stdout; fails the test with its output if it
/// fails.
pub fn run_ok(c: Command) -> String {
    let out = output_within(c, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "command failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Writes `len` pseudo-random bytes (xorshift, seeded by the length) to `path` and returns them.
pub fn write_random(path: &Path, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x1234_5678_9abc_def1 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// An nginx prefix in `dir` (logs/, www/ holding `index`) with a master and two workers serving
/// www/ on `listen`; returns the arguments to start it in the foreground.
pub fn nginx_site(dir: &Path, listen: &str, index: &str) -> Vec<String> {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(dir.join("www/index.html"), index).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; keepalive_timeout 30;\n\
               server {{ listen {listen}; root {d}/www; }} }}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    ["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap(), "-e", "stderr"].map(String::from).to_vec()
}

/// `netkernel serve --config cfg` must refuse to start: returns what it printed on stderr.
pub fn serve_refuses(cfg: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(NETKERNEL)
        .args(["serve", "--socket"])
        .arg(dir.path().join("engine.sock"))
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve accepted {}", cfg.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The engine's Prometheus endpoint at `addr` (host:port), fetched natively (it is the
/// operator's, not a guest's): the whole HTTP response.
pub fn metrics_response(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut s, &mut resp).unwrap();
    resp
}

/// A guest of `tenant` with a connection to itself that echoes each line `ask` gives it: "ok"
/// while the connection works, "error ERRNO" once it does not. Dropping it closes its stdin and
/// waits for it to end.
pub struct EchoGuest {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::io::BufReader<std::process::ChildStdout>,
}

pub fn echo_guest(engine: &TestEngine, tenant: &str) -> EchoGuest {
    let script = "import socket,sys\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
                  s,_=l.accept()\nprint('ready',flush=True)\nfor line in sys.stdin:\n    try:\n        c.sendall(line.encode())\n        \
                  d=s.recv(100)\n        print('ok' if d==line.encode() else 'bad',flush=True)\n    except OSError as e:\n        \
                  print('error',e.errno,flush=True)\n";
    let mut c = Command::new(NETKERNEL);
    c.args(["run", "--tenant", tenant, "--socket"]).arg(&engine.socket).args(["--", "python3", "-c", script]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stdin = child.stdin.take();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut g = EchoGuest { child, stdin, out };
    assert_eq!(g.line(), "ready");
    g
}

impl EchoGuest {
    /// Sends `msg` over the guest's connection; its answer.
    pub fn ask(&mut self, msg: &str) -> String {
        use std::io::Write;
        writeln!(self.stdin.as_mut().expect("open until drop"), "{msg}").unwrap();
        self.line()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.out, &mut line).unwrap();
        line.trim().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoGuest {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
