//! Real programs from Debian packages, unmodified, with both ends under NetKernel, compared
//! with the same programs run natively. scripts/test installs every one of them.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Waits until something accepts on the port (probing with a native connection).
fn wait_port(port: u16, server: &mut Child) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = server.try_wait() {
            panic!("server exited early: {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(15), "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process, killed at the end of the test.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: integers only, no memory passed; the child is reaped only after this, so its pid
        // cannot name another process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Either under NetKernel (engine given) or native.
fn cmd(engine: Option<&TestEngine>, program: &str, args: &[&str]) -> Command {
    match engine {
        Some(e) => e.run(program, args),
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

fn spawn_server(engine: Option<&TestEngine>, program: &str, args: &[&str], port: u16) -> Server {
    let mut c = cmd(engine, program, args);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{program}: {e}"));
    wait_port(port, &mut child);
    Server(child)
}

/// Connections the NSM has carried so far.
fn nsm_conns(e: &TestEngine) -> u64 {
    e.nsm()["conns_total"].as_u64().unwrap()
}

#[test]
fn nginx_master_and_two_workers_with_curl_and_wrk() {
    let nginx = require("nginx");
    let curl = require("curl");
    let wrk = require("wrk");
    let engine = TestEngine::start();
    let dir = engine.dir.path().join("nginx");
    let port = free_port();
    let args = nginx_site(&dir, &format!("127.0.0.1:{port}"), "hello from nginx\n");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Workers drop to user nobody, who must read the files.
    for p in [engine.dir.path(), &dir, &dir.join("www")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let big = write_random(&dir.join("www/big.bin"), 5 << 20);
    std::fs::set_permissions(dir.join("www/big.bin"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = spawn_server(Some(&engine), nginx.to_str().unwrap(), &args, port);
    // The master listens before it forks its workers: give them a moment on a loaded machine.
    let count_workers = || {
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", server.0.id(), server.0.id()))
            .unwrap_or_default()
            .split_whitespace()
            .count()
    };
    let start = Instant::now();
    while count_workers() < 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count_workers(), 2, "nginx should run two workers");
    let conns0 = nsm_conns(&engine);
    let url = |p: &str| format!("http://127.0.0.1:{port}/{p}");
    let c = curl.to_str().unwrap();
    // Keep-alive: two requests on one connection.
    let out = run_ok(engine.run(c, &["-sS", "-v", &url("index.html"), &url("index.html")]));
    assert_eq!(out, "hello from nginx\nhello from nginx\n");
    let got = output_within(engine.run(c, &["-sS", &url("big.bin")]), Duration::from_secs(60));
    assert_eq!(sha256(&got.stdout), sha256(&big), "sendfile'd content differs");
    let report = run_ok(engine.run(wrk.to_str().unwrap(), &["-t2", "-c20", "-d2s", &url("index.html")]));
    let rps: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk output:\n{report}"));
    assert!(rps > 100.0, "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
    assert!(nsm_conns(&engine) >= conns0 + 22, "connections did not go through the NSM");
}

#[test]
fn redis_server_with_cli_and_benchmark() {
    let server = require("redis-server");
    let cli = require("redis-cli");
    let bench = require("redis-benchmark");
    let engine = TestEngine::start();
    let script = |e: Option<&TestEngine>, port: u16| {
        let p = port.to_string();
        let mut out = String::new();
        for args in [
            vec!["set", "greeting", "hello"],
            vec!["get", "greeting"],
            vec!["incrby", "counter", "41"],
            vec!["incr", "counter"],
            vec!["rpush", "list", "a", "b", "c"],
            vec!["lrange", "list", "0", "-1"],
            vec!["get", "missing"],
        ] {
            let mut a = vec!["-p", &p];
            a.extend(args);
            out += &run_ok(cmd(e, cli.to_str().unwrap(), &a));
        }
        out
    };
    let run = |e: Option<&TestEngine>| {
        let port = free_port();
        let p = port.to_string();
        let _s = spawn_server(
            e,
            server.to_str().unwrap(),
            &["--port", &p, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            port,
        );
        let out = script(e, port);
        if e.is_some() {
            for extra in
                [&["-q", "-n", "20000", "-t", "get,set"][..], &["-q", "-n", "20000", "-t", "get,set", "-P", "16"]]
            {
                let mut a = vec!["-p", &p];
                a.extend_from_slice(extra);
                let r = run_ok(cmd(e, bench.to_str().unwrap(), &a));
                assert!(r.contains("GET:") && r.contains("SET:"), "{r}");
            }
        }
        out
    };
    let native = run(None);
    let conns0 = nsm_conns(&engine);
    let nk = run(Some(&engine));
    assert_eq!(nk, native);
    assert!(native.contains("hello") && native.contains("42"), "{native}");
    assert!(nsm_conns(&engine) >= conns0 + 50, "redis-benchmark's connections did not go through the NSM");
}

#[test]
fn memcached_with_a_socat_client() {
    let memcached = require("memcached");
    let socat = require("socat");
    let engine = TestEngine::start();
    let run = |e: Option<&TestEngine>| {
        let port = free_port();
        let p = port.to_string();
        let mut args = vec!["-p", &p, "-l", "127.0.0.1", "-U", "0"];
        if is_root() {
            args.extend(["-u", "nobody"]);
        }
        let _s = spawn_server(e, memcached.to_str().unwrap(), &args, port);
        let mut c = cmd(e, socat.to_str().unwrap(), &["-", &format!("TCP:127.0.0.1:{port}")]);
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"set k 0 0 11\r\nhello world\r\nget k\r\nincr n 1\r\nset n 0 0 1\r\n5\r\nincr n 37\r\nget nope\r\nquit\r\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let native = run(None);
    let nk = run(Some(&engine));
    assert_eq!(nk, native);
    assert!(native.contains("VALUE k 0 11\r\nhello world") && native.contains("42"), "{native}");
    assert!(nsm_conns(&engine) >= 1);
}

#[test]
fn iperf3_parallel_and_reverse() {
    let iperf = require("iperf3");
    let engine = TestEngine::start();
    for mode in [&["-P", "4"][..], &["-R"][..]] {
        let port = free_port();
        let p = port.to_string();
        let _s = spawn_server(Some(&engine), iperf.to_str().unwrap(), &["-s", "-p", &p], port);
        let mut args = vec!["-c", "127.0.0.1", "-p", &p, "-t", "1", "-J"];
        args.extend_from_slice(mode);
        // The server is busy with our readiness probe for a moment; it then takes the test.
        let mut bytes = 0;
        let mut out = String::new();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(300));
            out = String::from_utf8_lossy(
                &output_within(engine.run(iperf.to_str().unwrap(), &args), Duration::from_secs(60)).stdout,
            )
            .into_owned();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
            if bytes > 0 {
                break;
            }
        }
        assert!(bytes > 10 << 20, "iperf3 {mode:?} moved only {bytes} bytes: {out}");
    }
    let nsm = engine.nsm();
    assert!(nsm["bytes_out"].as_u64().unwrap() > 20 << 20, "{nsm}");
}

#[test]
fn socat_relays_between_netkernel_peers() {
    let socat = require("socat");
    let python = require("python3");
    let engine = TestEngine::start();
    // Backend: answers each connection with the sha256 of everything it received.
    let backend = free_port();
    let script = format!(
        "import socket,hashlib\nl=socket.create_server(('127.0.0.1',{backend}))\nwhile True:\n    c,_=l.accept()\n    h=hashlib.sha256()\n\
         \n    while True:\n        d=c.recv(65536)\n        if not d: break\n        h.update(d)\n\
         \n    try: c.sendall(h.hexdigest().encode())\n    except OSError: pass\n    c.close()\n"
    );
    let _b = spawn_server(Some(&engine), python.to_str().unwrap(), &["-c", &script], backend);
    // The relay forks a child per connection (socat's fork option).
    let relay = free_port();
    let _r = spawn_server(
        Some(&engine),
        socat.to_str().unwrap(),
        &[&format!("TCP-LISTEN:{relay},bind=127.0.0.1,reuseaddr,fork"), &format!("TCP:127.0.0.1:{backend}")],
        relay,
    );
    let payload = engine.dir.path().join("payload");
    let data = write_random(&payload, 20 << 20);
    let client = format!(
        "import socket,sys\nc=socket.create_connection(('127.0.0.1',{relay}))\nc.sendall(open(sys.argv[1],'rb').read())\n\
         c.shutdown(socket.SHUT_WR)\nprint(c.recv(100).decode())\n"
    );
    for _ in 0..3 {
        let out = run_ok(engine.run(python.to_str().unwrap(), &["-c", &client, payload.to_str().unwrap()]));
        assert_eq!(out.trim(), sha256(&data));
    }
    assert!(nsm_conns(&engine) >= 6);
}

#[test]
fn python_asyncio_server_and_urllib_client() {
    let python = require("python3");
    let engine = TestEngine::start();
    let server = "import asyncio\nasync def handle(r, w):\n    data = await r.read()\n    w.write(data[::-1])\n    await w.drain()\n    w.close()\n\
                  async def main():\n    srv = await asyncio.start_server(handle, '127.0.0.1', 0)\n    print(srv.sockets[0].getsockname()[1], flush=True)\n\
                  \n    async with srv:\n        await srv.serve_forever()\nasyncio.run(main())\n";
    let mut s = engine.run(python.to_str().unwrap(), &["-c", server]);
    s.stdout(Stdio::piped());
    let mut s = s.spawn().unwrap();
    let mut port = String::new();
    BufReader::new(s.stdout.as_mut().unwrap()).read_line(&mut port).unwrap();
    let _s = Server(s);
    let client = "import asyncio,sys\nasync def one(port, i):\n    r, w = await asyncio.open_connection('127.0.0.1', port)\n\
                  \n    msg = f'hello {i}'.encode()\n    w.write(msg)\n    w.write_eof()\n    back = await r.read()\n    w.close()\n    return back == msg[::-1]\n\
                  async def main(port):\n    res = await asyncio.gather(*[one(port, i) for i in range(100)])\n    print(sum(res))\n\
                  asyncio.run(main(int(sys.argv[1])))\n";
    let out = run_ok(engine.run(python.to_str().unwrap(), &["-c", client, port.trim()]));
    assert_eq!(out.trim(), "100");
    // urllib against an http.server, both under NetKernel.
    let www = engine.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let data = write_random(&www.join("f.bin"), 3 << 20);
    let hport = free_port();
    let mut h = engine.run(python.to_str().unwrap(), &["-m", "http.server", &hport.to_string(), "--bind", "127.0.0.1"]);
    h.current_dir(&www).stdout(Stdio::null()).stderr(Stdio::null());
    let mut h = h.spawn().unwrap();
    wait_port(hport, &mut h);
    let _h = Server(h);
    let fetch = format!(
        "import urllib.request,hashlib\nprint(hashlib.sha256(urllib.request.urlopen('http://127.0.0.1:{hport}/f.bin').read()).hexdigest())\n"
    );
    let out = run_ok(engine.run(python.to_str().unwrap(), &["-c", &fetch]));
    assert_eq!(out.trim(), sha256(&data));
}

#[test]
fn node_http_server_and_client() {
    let node = require("node");
    let engine = TestEngine::start();
    let server = "const http=require('http');const s=http.createServer((q,r)=>{let b='';q.on('data',c=>b+=c);\
                  q.on('end',()=>r.end(q.method+' '+q.url+' '+b.length));});s.listen(0,'127.0.0.1',()=>console.log(s.address().port));";
    let mut s = engine.run(node.to_str().unwrap(), &["-e", server]);
    s.stdout(Stdio::piped());
    let mut s = s.spawn().unwrap();
    let mut port = String::new();
    BufReader::new(s.stdout.as_mut().unwrap()).read_line(&mut port).unwrap();
    let _s = Server(s);
    let client = "const http=require('http');const port=process.argv[1];let done=0,out=[];\
                  for(let i=0;i<20;i++){const q=http.request({port,host:'127.0.0.1',method:'POST',path:'/p'+i},r=>{let d='';\
                  r.on('data',c=>d+=c);r.on('end',()=>{out[i]=d;if(++done==20){console.log(out.join('\\n'));}});});\
                  q.on('error',e=>{console.log('ERR '+e.message);process.exit(1);});q.end('x'.repeat(1000*i));}";
    let out = run_ok(engine.run(node.to_str().unwrap(), &["-e", client, port.trim()]));
    let want: Vec<String> = (0..20).map(|i| format!("POST /p{i} {}", 1000 * i)).collect();
    assert_eq!(out.trim(), want.join("\n"));
}

#[test]
fn idle_redis_and_nginx_do_not_burn_cpu() {
    let redis = require("redis-server");
    let cli = require("redis-cli");
    let nginx = require("nginx");
    let curl = require("curl");
    let engine = TestEngine::start();
    let rport = free_port();
    let p = rport.to_string();
    let r = spawn_server(
        Some(&engine),
        redis.to_str().unwrap(),
        &["--port", &p, "--bind", "127.0.0.1", "--save", ""],
        rport,
    );
    run_ok(engine.run(cli.to_str().unwrap(), &["-p", &p, "set", "k", "v"]));
    let dir = engine.dir.path().join("ng");
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::set_permissions(engine.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let nport = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nevents {{}}\nhttp {{ access_log off;\n\
             server {{ listen 127.0.0.1:{nport}; location / {{ return 200 'ok'; }} }} }}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let n = spawn_server(
        Some(&engine),
        nginx.to_str().unwrap(),
        &["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap(), "-e", "stderr"],
        nport,
    );
    run_ok(engine.run(curl.to_str().unwrap(), &["-sS", &format!("http://127.0.0.1:{nport}/")]));
    std::thread::sleep(Duration::from_millis(500));
    let nsm = engine.nsm()["pid"].as_u64().unwrap() as u32;
    let mut pids = descendants(r.0.id());
    pids.extend(descendants(n.0.id()));
    pids.push(nsm);
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let used = pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>() - before;
    // SAFETY: an integer in and out, no memory passed; sysconf cannot misbehave on any name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = used as f64 / hz / start.elapsed().as_secs_f64();
    eprintln!("idle redis + nginx ({} processes) + NSM: {:.2}% of a core", pids.len(), share * 100.0);
    assert!(share < 0.02, "idle servers under NetKernel used {:.2}% of a core", share * 100.0);
}

/// The PostgreSQL server's binaries (Debian installs them under a versioned directory).
fn postgres_bin(name: &str) -> String {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin").join(name))
        .find(|p| p.is_file());
    found
        .unwrap_or_else(|| panic!("PostgreSQL's {name} is not installed (scripts/test installs postgresql)"))
        .display()
        .to_string()
}

/// postgres (a process per connection, forked by the postmaster) with psql and pgbench, natively
/// and with server and clients under NetKernel. PostgreSQL refuses to run as root: it runs as the
/// `postgres` user the Debian package creates.
#[test]
fn postgres_with_psql_and_pgbench() {
    if lacks_root("postgres_with_psql_and_pgbench: needs root to run PostgreSQL as user postgres") {
        return;
    }
    let (initdb, postgres) = (postgres_bin("initdb"), postgres_bin("postgres"));
    let (psql, pgbench) = (require("psql"), require("pgbench"));
    let engine = TestEngine::start();
    // The postgres user must reach the engine's socket and the data directory.
    std::fs::set_permissions(engine.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let as_postgres = |engine: Option<&TestEngine>, program: &str, args: &[&str]| {
        let mut all = vec!["-u", "postgres", "--", program];
        all.extend_from_slice(args);
        cmd(engine, "runuser", &all)
    };
    let db = data.path().join("db");
    let out =
        as_postgres(None, &initdb, &["-D", db.to_str().unwrap(), "-A", "trust", "-U", "postgres"]).output().unwrap();
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let run = |engine: Option<&TestEngine>| -> (String, String) {
        let port = free_port();
        let p = port.to_string();
        let mut server = as_postgres(
            engine,
            &postgres,
            &["-D", db.to_str().unwrap(), "-k", data.path().to_str().unwrap(), "-h", "127.0.0.1", "-p", &p],
        );
        server.stdout(Stdio::null()).stderr(Stdio::null());
        let mut server = Server(server.spawn().unwrap());
        wait_port(port, &mut server.0);
        let conn = ["-h", "127.0.0.1", "-p", &p, "-U", "postgres"];
        let sql = "create table if not exists t(k int primary key, v text); delete from t; \
                   insert into t select g, md5(g::text) from generate_series(1, 5000) g; \
                   select count(*), md5(string_agg(v, ',' order by k)) from t;";
        let query = [&conn[..], &["-At", "-c", sql]].concat();
        let out = output_within(as_postgres(engine, psql.to_str().unwrap(), &query), Duration::from_secs(60));
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        // The last line: the rows' count and checksum (the others say what each statement did).
        let result = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
        let init = [&conn[..], &["-i", "-s", "1", "-q", "postgres"]].concat();
        let out = output_within(as_postgres(engine, pgbench.to_str().unwrap(), &init), Duration::from_secs(120));
        assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
        // TPC-B-like, then select-only from one thread over 8 connections: many small writes
        // from 8 backend processes sharing one attachment at once (which once let two of them
        // share an nqe and answer on each other's connection).
        let mut processed = String::new();
        for load in [&["-c", "8", "-j", "2", "-t", "200"][..], &["-S", "-c", "8", "-j", "1", "-t", "3000"]] {
            let bench = [&conn[..], load, &["postgres"]].concat();
            let out = output_within(as_postgres(engine, pgbench.to_str().unwrap(), &bench), Duration::from_secs(120));
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(out.status.success(), "pgbench {load:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
            let line = text.lines().find(|l| l.starts_with("number of transactions actually processed"));
            processed += line.unwrap_or("none");
            processed += "; ";
        }
        (result, processed)
    };
    let native = run(None);
    let nk = run(Some(&engine));
    assert_eq!(native.0, nk.0, "psql's answer differs");
    assert!(nk.0.starts_with("5000|"), "{}", nk.0);
    assert_eq!(native.1, nk.1, "pgbench's transactions differ");
    assert!(nk.1.contains("1600/1600") && nk.1.contains("24000/24000"), "{}", nk.1);
    // Through the NSM: pgbench's 8 clients and psql, each with a backend process of its own.
    let nsm = engine.nsm();
    assert!(nsm["conns_total"].as_u64().unwrap() >= 20, "{nsm}");
}
