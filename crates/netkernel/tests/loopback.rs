//! An isolated guest (`netkernel run --isolate`) has a loopback of its own, as a network
//! namespace does: the host's 127.0.0.1 services and other tenants' are out of its reach, its
//! own 127.0.0.1 works; `host_loopback = true` gives a tenant's isolated guests the host's.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const CONFIG: &str = "[[nsm]]\nname = \"kernel\"\n\n\
    [[tenant]]\nname = \"a\"\nnsm = \"kernel\"\n\n\
    [[tenant]]\nname = \"b\"\nnsm = \"kernel\"\n\n\
    [[tenant]]\nname = \"open\"\nnsm = \"kernel\"\nhost_loopback = true\n";

/// Checks that the guest's own 127.0.0.1 listener is reachable, then tries each HOST:PORT
/// argument and prints what it got from it, or the errno.
const PROBE: &str = r#"
import socket, sys
l = socket.create_server(('127.0.0.1', 0))
c = socket.create_connection(('127.0.0.1', l.getsockname()[1]))
s, _ = l.accept()
c.sendall(b'x')
print('own', s.recv(1).decode())
for target in sys.argv[1:]:
    host, port = target.rsplit(':', 1)
    try:
        t = socket.create_connection((host, int(port)), timeout=5)
        print(target, t.recv(100).decode().strip())
    except OSError as e:
        print(target, 'errno', e.errno)
"#;

/// A host service on 127.0.0.1 (no NetKernel) that greets every connection.
fn host_service() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"host\n");
        }
    });
    port
}

fn run_as(engine: &TestEngine, tenant: &str, isolate: bool) -> Command {
    let mut c = Command::new(NETKERNEL);
    c.args(["run", "--tenant", tenant, "--socket"]).arg(&engine.socket);
    if isolate {
        c.arg("--isolate");
    }
    c.arg("--");
    c
}

/// Runs PROBE as `tenant` against `targets`; returns its lines.
fn probe(engine: &TestEngine, tenant: &str, isolate: bool, targets: &[String]) -> Vec<String> {
    let python = require("python3");
    let mut c = run_as(engine, tenant, isolate);
    c.arg(python).arg("-c").arg(PROBE).args(targets);
    let out = output_within(c, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().next(), Some("own x"), "its own loopback: {text}");
    text.lines().skip(1).map(str::to_string).collect()
}

#[test]
fn isolated_guests_have_a_loopback_of_their_own() {
    assert!(is_root(), "--isolate needs root; run the tests as root (scripts/test does)");
    let engine = TestEngine::with_config(CONFIG);
    let host = format!("127.0.0.1:{}", host_service());
    let refused = format!("errno {}", libc::ECONNREFUSED);

    // Isolated, private loopback: the host's service is not there.
    assert_eq!(probe(&engine, "a", true, std::slice::from_ref(&host)), vec![format!("{host} {refused}")]);
    // Isolated with host_loopback: it is.
    assert_eq!(probe(&engine, "open", true, std::slice::from_ref(&host)), vec![format!("{host} host")]);
    // Not isolated (the default tenant's behaviour, unchanged): it is.
    assert_eq!(probe(&engine, "a", false, std::slice::from_ref(&host)), vec![format!("{host} host")]);
    // Saying it is isolated without being so earns nothing: the engine checks the namespace.
    // (`run` clears the variable; env(1) sets it for the program itself.)
    let python = require("python3");
    let mut c = run_as(&engine, "a", false);
    c.args(["env", "NETKERNEL_ISOLATED=1"]).arg(&python).arg("-c").arg(PROBE).arg(&host);
    let out = output_within(c, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{host} host")), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(engine.log().contains("says it is isolated but shares the engine's network namespace"), "{}", engine.log());

    // Another tenant's isolated server on its 127.0.0.1: out of reach, by 127.0.0.1 and by its
    // private address; reachable for an isolated guest of its own tenant.
    let mut c = run_as(&engine, "b", true);
    c.arg(&python)
        .arg("-c")
        .arg(
            "import socket,sys\nl=socket.create_server(('127.0.0.1',0))\nprint(l.getsockname()[1],flush=True)\n\
             while True:\n    c,_=l.accept();c.sendall(b'b\\n');c.close()\n",
        )
        .stdout(Stdio::piped());
    let mut server = c.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("port");
    let conns = engine.ctl("conns");
    let private = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["pid"] == server.id() && c["state"] == "LISTEN")
        .map(|c| c["local"].as_str().unwrap().to_string())
        .expect("b's listener");
    assert!(private.starts_with("127.77."), "b's listener is on {private}");
    let by_loopback = format!("127.0.0.1:{port}");
    let got = probe(&engine, "a", true, &[by_loopback.clone(), private.clone()]);
    assert_eq!(got, vec![format!("{by_loopback} {refused}"), format!("{private} {refused}")]);
    assert_eq!(probe(&engine, "b", true, std::slice::from_ref(&by_loopback)), vec![format!("{by_loopback} b")]);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn host_loopback_with_addresses_is_a_config_error_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nk.toml");
    std::fs::write(
        &cfg,
        "[[nsm]]\nname = \"kernel\"\n\n[[tenant]]\nname = \"a\"\nnsm = \"kernel\"\naddresses = [\"127.0.1.1\"]\n\
         host_loopback = true\n",
    )
    .unwrap();
    let err = serve_refuses(&cfg);
    assert!(err.contains(&format!("{}:8: tenant.host_loopback:", cfg.display())), "{err}");
}
