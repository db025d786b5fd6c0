//! Tenants on one NSM: their addresses, what they can reach, their limits.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn tenants_keep_to_their_addresses_and_limits() {
    let python = require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\n\n\
         [[tenant]]\nname = \"blue\"\nnsm = \"k\"\naddresses = [\"127.0.1.1\"]\nmax_connections = 4\n\n\
         [[tenant]]\nname = \"red\"\nnsm = \"k\"\naddresses = [\"127.0.2.1\"]\nlisten_ports = [9]\n",
    );
    // A service of the host's own loopback, which a tenant with addresses must not reach.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    let blue = format!(
        "import socket,sys\n\
         l=socket.socket();l.bind(('0.0.0.0',0));l.listen()\nport=l.getsockname()[1]\n\
         print('bound', l.getsockname()[0])\n\
         c=socket.create_connection(('127.0.0.1',port));s,_=l.accept()\n\
         print('loopback reaches', s.getsockname()[0], 'from', s.getpeername()[0])\n\
         try:\n    socket.create_connection(('127.0.0.1',{host_port}),timeout=2)\n    print('host loopback reached')\nexcept OSError as e:\n    print('host loopback', e.errno)\n\
         x=socket.socket()\n\
         try:\n    socket.socket();print('no limit')\nexcept OSError as e:\n    print('limit', e.errno)\n\
         print('port', port, flush=True)\nsys.stdin.read()\n"
    );
    let mut c = std::process::Command::new(NETKERNEL);
    c.args(["run", "--tenant", "blue", "--socket"]).arg(&engine.socket).args([
        "--",
        python.to_str().unwrap(),
        "-c",
        &blue,
    ]);
    c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut blue = c.spawn().unwrap();
    let mut out = std::io::BufReader::new(blue.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut out, &mut l).unwrap();
        assert!(!l.is_empty(), "blue ended early: {lines:?}\n{}", engine.log());
        let done = l.starts_with("port");
        lines.push(l.trim().to_string());
        if done {
            break;
        }
    }
    assert_eq!(lines[0], "bound 127.0.1.1", "a wildcard bind lands on the tenant's address");
    assert_eq!(lines[1], "loopback reaches 127.0.1.1 from 127.0.1.1", "127.0.0.1 is the tenant's own");
    assert_eq!(lines[2], format!("host loopback {}", libc::ECONNREFUSED));
    assert_eq!(lines[3], format!("limit {}", libc::EMFILE));
    let port: u16 = lines[4].strip_prefix("port ").unwrap().parse().unwrap();
    let red = format!(
        "import socket\n\
         try:\n    socket.create_connection(('127.0.1.1',{port}),timeout=2);print('reached blue')\nexcept OSError as e:\n    print('blue', e.errno)\n\
         s=socket.socket()\n\
         try:\n    s.bind(('127.0.1.1',0));print('bound blue')\nexcept OSError as e:\n    print('bind', e.errno)\n\
         s.bind(('0.0.0.0',0))\n\
         try:\n    s.listen();print('listening')\nexcept OSError as e:\n    print('listen', e.errno)\n"
    );
    let mut c = std::process::Command::new(NETKERNEL);
    c.args(["run", "--tenant", "red", "--socket"]).arg(&engine.socket).args([
        "--",
        python.to_str().unwrap(),
        "-c",
        &red,
    ]);
    let out = output_within(c, Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("blue {}\nbind {}\nlisten {}\n", libc::ECONNREFUSED, libc::EADDRNOTAVAIL, libc::EACCES)
    );
    let conns = engine.ctl("conns");
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tenant"] == "blue" && c["local"].as_str().unwrap().starts_with("127.0.1.1:")),
        "{conns}"
    );
    let log = engine.log();
    for want in [
        "tenant red",
        "refused connect to another tenant",
        "refused bind outside its addresses",
        "tenant blue",
        "socket limit reached",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    drop(blue.stdin.take());
    blue.wait().unwrap();
    drop(host);
}

#[test]
fn ctl_shows_a_user_only_the_tenants_that_admit_them() {
    if lacks_root("ctl_shows_a_user_only_the_tenants_that_admit_them: needs root to act as user nobody") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("nk.toml");
    std::fs::write(&cfg, "[[nsm]]\nname = \"k\"\n\n[[tenant]]\nname = \"admins\"\nnsm = \"k\"\nuids = [0]\n").unwrap();
    let engine = TestEngine::start_with(&["--config", cfg.to_str().unwrap()]);
    std::fs::set_permissions(engine.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut guest = engine.python_ready(
        "import socket,sys\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
         s,_=l.accept()\nprint('ready',flush=True)\nsys.stdin.read()\n",
    );
    assert_eq!(engine.ctl("conns").as_array().unwrap().len(), 3, "root sees the tenant's sockets");
    let bin = dir.path().join("netkernel");
    std::fs::copy(NETKERNEL, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&bin)
        .args(["ctl", "--json", "--socket"])
        .arg(&engine.socket)
        .arg("conns")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]), "nobody saw another tenant's connections");
    drop(guest.stdin.take());
    guest.wait().unwrap();
}

#[test]
fn a_rate_limited_tenant_sends_at_its_rate() {
    let python = require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\n\n[[tenant]]\nname = \"free\"\nnsm = \"k\"\n\n\
         [[tenant]]\nname = \"capped\"\nnsm = \"k\"\nrate_limit = 50000000\n",
    );
    // The receiver (free tenant) counts what arrives in 3 s after the first byte.
    let mut rx = std::process::Command::new(NETKERNEL);
    rx.args(["run", "--tenant", "free", "--socket"]).arg(&engine.socket).args([
        "--",
        python.to_str().unwrap(),
        "-c",
        "import socket,time\nl=socket.create_server(('127.0.0.1',0))\nprint(l.getsockname()[1],flush=True)\n\
         s,_=l.accept()\nn=len(s.recv(65536))\nt=time.time()\nwhile time.time()-t<3:\n    n+=len(s.recv(1<<20))\n\
         print(int(n*8/(time.time()-t)),flush=True)\n",
    ]);
    rx.stdout(std::process::Stdio::piped());
    let mut rx = rx.spawn().unwrap();
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut port = String::new();
    std::io::BufRead::read_line(&mut out, &mut port).unwrap();
    let mut tx = std::process::Command::new(NETKERNEL);
    tx.args(["run", "--tenant", "capped", "--socket"]).arg(&engine.socket).args([
        "--",
        python.to_str().unwrap(),
        "-c",
        &format!(
            "import socket,time\nc=socket.create_connection(('127.0.0.1',{}))\nb=b'x'*65536\nt=time.time()\n\
             try:\n    while time.time()-t<5:\n        c.sendall(b)\nexcept OSError:\n    pass\n",
            port.trim()
        ),
    ]);
    let tx = output_within(tx, Duration::from_secs(30));
    assert!(tx.status.success(), "{}", String::from_utf8_lossy(&tx.stderr));
    let mut rate = String::new();
    std::io::BufRead::read_line(&mut out, &mut rate).unwrap();
    rx.wait().unwrap();
    let bps: f64 = rate.trim().parse().unwrap();
    eprintln!("capped tenant: {:.1} Mbit/s for a 50 Mbit/s limit", bps / 1e6);
    assert!((35e6..57e6).contains(&bps), "a tenant capped at 50 Mbit/s sent {:.1} Mbit/s", bps / 1e6);
    // The waits show in the tenant's telemetry, and only in the capped tenant's.
    let tenants = engine.ctl("tenants");
    let throttled = |name: &str| {
        tenants.as_array().unwrap().iter().find(|t| t["name"] == name).unwrap()["throttled"].as_u64().unwrap()
    };
    assert!(throttled("capped") > 0 && throttled("free") == 0, "{tenants}");
}

#[test]
fn an_nsm_in_a_network_namespace_of_its_own() {
    if lacks_root("an_nsm_in_a_network_namespace_of_its_own: needs root to create namespaces") {
        return;
    }
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"ns0\"\nnetns = true\n\n[[tenant]]\nname = \"a\"\nnsm = \"ns0\"\n\n[[tenant]]\nname = \"b\"\nnsm = \"ns0\"\n",
    );
    let nsm = engine.nsm();
    let address = nsm["address"].as_str().unwrap().to_string();
    let (ip, ns) = address.split_once(' ').unwrap();
    let ns = ns.trim_matches(|c| c == '(' || c == ')').to_string();
    // Tenant a serves inside the NSM's namespace; the host reaches it at the NSM's address.
    let mut server = engine.python_ready(
        "import socket,sys,threading\nl=socket.create_server(('0.0.0.0',18097))\n\
         def serve():\n    while True:\n        c,a=l.accept();c.sendall(('hello '+a[0]).encode());c.close()\n\
         threading.Thread(target=serve,daemon=True).start()\nprint('ready',flush=True)\nsys.stdin.read()\n",
    );
    let mut s = std::net::TcpStream::connect((ip, 18097)).expect("the host reaches the NSM's namespace");
    let mut got = String::new();
    std::io::Read::read_to_string(&mut s, &mut got).unwrap();
    assert!(got.starts_with("hello 10.213."), "{got}");
    // Tenant b, on the same NSM process, reaches tenant a's server inside the namespace too.
    let mut c = std::process::Command::new(NETKERNEL);
    c.args(["run", "--tenant", "b", "--socket"]).arg(&engine.socket).args([
        "--",
        "python3",
        "-c",
        "import socket\nprint(socket.create_connection(('127.0.0.1',18097)).recv(100).decode())\n",
    ]);
    let out = output_within(c, Duration::from_secs(30));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello 127.0.0.1");
    // The host's own loopback is not the NSM's: nothing listens on 18097 there.
    assert!(std::net::TcpStream::connect(("127.0.0.1", 18097)).is_err());
    drop(server.stdin.take());
    server.wait().unwrap();
    drop(engine);
    let listed =
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .into_owned();
    assert!(!listed.contains(&ns), "namespace {ns} left behind: {listed}");
}

const RECEIVER: &str = r#"import socket, threading, time, collections
l = socket.create_server(('HOST', 0))
l.listen(64)
print(l.getsockname()[1], flush=True)
count = collections.Counter()
start = [None]
lock = threading.Lock()
def rd(c, a):
    while True:
        d = c.recv(1 << 16)
        if not d:
            return
        with lock:
            if start[0] is None:
                start[0] = time.time()
            if time.time() - start[0] < 3:
                count[a[0]] += len(d)
def acc():
    while True:
        c, a = l.accept()
        threading.Thread(target=rd, args=(c, a), daemon=True).start()
threading.Thread(target=acc, daemon=True).start()
time.sleep(6)
print(' '.join(f'{k}={v}' for k, v in count.items()), flush=True)
"#;

const SENDER: &str = r#"import socket, threading, time
b = b'x' * 65536
def go():
    c = socket.create_connection(('HOST', PORT))
    t = time.time()
    try:
        while time.time() - t < 4.5:
            c.sendall(b)
    except OSError:
        pass
ts = [threading.Thread(target=go) for _ in range(FLOWS)]
[t.start() for t in ts]
[t.join() for t in ts]
"#;

/// One run of the fairness experiment: tenant a sends on 1 flow, tenant b on 8, through one NSM
/// whose egress is shaped to 200 Mbit/s; a native receiver on the host counts per tenant.
/// Returns a's share of what arrived.
fn share_of_one_flow_against_eight(weights: (u32, u32), fair: bool) -> f64 {
    let python = require("python3");
    let engine = TestEngine::with_config(
        &format!(
            "[[nsm]]\nname = \"ns0\"\nnetns = true\negress_rate = 200000000\nfair = {fair}\n\n\
             [[tenant]]\nname = \"a\"\nnsm = \"ns0\"\nweight = {}\n\n[[tenant]]\nname = \"b\"\nnsm = \"ns0\"\nweight = {}\n",
            weights.0, weights.1
        ),
    );
    let address = engine.nsm()["address"].as_str().unwrap().to_string();
    let nsm_ip: std::net::Ipv4Addr = address.split(' ').next().unwrap().parse().unwrap();
    let o = nsm_ip.octets();
    let host_ip = std::net::Ipv4Addr::new(o[0], o[1], o[2], 1).to_string();
    let mut rx = std::process::Command::new(&python);
    rx.args(["-c", &RECEIVER.replace("HOST", &host_ip)]).stdout(std::process::Stdio::piped());
    let mut rx = rx.spawn().unwrap();
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut port = String::new();
    std::io::BufRead::read_line(&mut out, &mut port).unwrap();
    let sender = |tenant: &str, flows: u32| {
        let script = SENDER.replace("HOST", &host_ip).replace("PORT", port.trim()).replace("FLOWS", &flows.to_string());
        let mut c = std::process::Command::new(NETKERNEL);
        c.args(["run", "--tenant", tenant, "--socket"]).arg(&engine.socket).args([
            "--",
            python.to_str().unwrap(),
            "-c",
            &script,
        ]);
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c.spawn().unwrap()
    };
    let mut a = sender("a", 1);
    let mut b = sender("b", 8);
    let mut counts = String::new();
    std::io::BufRead::read_line(&mut out, &mut counts).unwrap();
    let _ = a.wait();
    let _ = b.wait();
    let _ = rx.wait();
    let by_ip: std::collections::HashMap<String, f64> = counts
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse::<f64>().unwrap()))
        .collect();
    assert_eq!(by_ip.len(), 2, "want two tenants' source addresses: {counts:?}");
    // Tenants are numbered in config order: a has the lower address.
    let mut ips: Vec<&String> = by_ip.keys().collect();
    ips.sort_by_key(|ip| ip.parse::<std::net::Ipv4Addr>().unwrap());
    let total: f64 = by_ip.values().sum();
    let share = by_ip[ips[0]] / total;
    eprintln!(
        "weights {weights:?}, fair={fair}: a {:.1} Mbit/s, b {:.1} Mbit/s (a's share {share:.2})",
        by_ip[ips[0]] * 8.0 / 3e6,
        by_ip[ips[1]] * 8.0 / 3e6
    );
    share
}

#[test]
fn tenants_share_a_shaped_nsm_by_weight_not_by_flows() {
    if lacks_root("tenants_share_a_shaped_nsm_by_weight_not_by_flows: needs root for namespaces and tc") {
        return;
    }
    let equal = share_of_one_flow_against_eight((1, 1), true);
    assert!((0.40..0.60).contains(&equal), "equal weights: the 1-flow tenant got {equal:.2}");
    let two_to_one = share_of_one_flow_against_eight((2, 1), true);
    assert!((0.58..0.76).contains(&two_to_one), "weights 2:1: the 1-flow tenant got {two_to_one:.2}");
    // Without fairness the split is whatever TCP and the CPUs make of it: usually the 8 flows win
    // (0.11-0.39 for the 1-flow tenant on a quiet machine), but a loaded machine starves the
    // 8-flow sender and has read 0.74. It is reported, not asserted (issue 4 asks for the report).
    let unfair = share_of_one_flow_against_eight((1, 1), false);
    assert!((0.0..=1.0).contains(&unfair), "a share must be a fraction: {unfair}");
    eprintln!("without fairness the 1-flow tenant got {unfair:.2} of the link");
}

/// Who may attach: a tenant names uids, gids, or a token file; a process is admitted by any of
/// them, and refused (with the reason in the engine's log) otherwise.
#[test]
fn tenants_admit_by_uid_group_or_token() {
    use std::os::unix::fs::PermissionsExt;
    let python = require("python3");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("tok.token");
    std::fs::write(&token, "s3cret-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token-0123456789\n").unwrap();
    // SAFETY: no arguments, no memory touched; getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let other = uid.wrapping_add(4242);
    let engine = TestEngine::with_config(&format!(
        "[[nsm]]\nname = \"k\"\n\n\
         [[tenant]]\nname = \"group\"\nnsm = \"k\"\nuids = [{other}]\ngids = [{gid}]\n\n\
         [[tenant]]\nname = \"tok\"\nnsm = \"k\"\nuids = [{other}]\ntoken_file = \"{}\"\n",
        token.display()
    ));
    let script = "import socket\ntry:\n    socket.socket().close()\n    print('attached')\nexcept OSError as e:\n    print('refused', e.errno)\n";
    let attach = |tenant: &str, token: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(NETKERNEL);
        c.args(["run", "--tenant", tenant, "--socket"]).arg(&engine.socket);
        if let Some(t) = token {
            c.arg("--token-file").arg(t);
        }
        c.args(["--", python.to_str().unwrap(), "-c", script]);
        let out = output_within(c, Duration::from_secs(30));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let refused = format!("refused {}", libc::ENETDOWN);
    assert_eq!(attach("group", None), "attached", "admitted by its group");
    assert_eq!(attach("tok", Some(&token)), "attached", "admitted by the token");
    assert_eq!(attach("tok", None), refused, "no token, uid not listed");
    assert_eq!(attach("tok", Some(&wrong)), refused, "a wrong token");
    let log = engine.log();
    assert!(log.contains("may not attach as tenant tok: its token is not the tenant's"), "{log}");
    assert!(log.contains("may not attach as tenant tok: its uid and groups are not the tenant's"), "{log}");
    // A token file the engine cannot use is a config error naming file, line and field.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[nsm]]\nname = \"k\"\n\n[[tenant]]\nname = \"t\"\nnsm = \"k\"\ntoken_file = \"/nonexistent/t\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(NETKERNEL).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml:7: tenant.token_file: cannot read /nonexistent/t"),
        "{err}"
    );
}
