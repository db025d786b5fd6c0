//! The NSM's scheduler and CPU accounting, seen from outside: what `ctl` and Prometheus report
//! for tenants that did work, checked against the NSM process's own CPU time.
//! (Which tenant goes first is tested on the core with a made-up clock, core/tests.rs; how much
//! that helps is a benchmark: scripts/bench-sched, docs/PERFORMANCE.md.)

mod common;
use common::*;
use std::time::Duration;

/// A python guest that moves `mib` MiB between two of its own sockets (both through the NSM)
/// and then ping-pongs 64 B `trips` times: a fixed amount of work, however loaded the machine.
fn work(mib: usize, trips: usize) -> String {
    format!(
        "import socket\nl=socket.create_server(('127.0.0.1',0))\nc=socket.create_connection(l.getsockname())\n\
         s,_=l.accept()\nb=b'x'*(1<<20)\nfor _ in range({mib}):\n    c.sendall(b)\n    n=0\n    \
         while n<len(b): n+=len(s.recv(1<<20))\nm=b'x'*64\nfor _ in range({trips}):\n    c.sendall(m)\n    \
         s.recv(64)\n    s.sendall(m)\n    c.recv(64)\n"
    )
}

#[test]
fn the_nsms_cpu_is_accounted_to_the_tenants_that_used_it() {
    let python = require("python3");
    let metrics = free_port();
    let engine = TestEngine::with_config(&format!(
        "[engine]\nmetrics = \"127.0.0.1:{metrics}\"\n\n[[nsm]]\nname = \"k\"\nscheduler = \"fair\"\ncolocate = false\n\n\
         [[tenant]]\nname = \"busy\"\nnsm = \"k\"\ncpu_weight = 3\n\n[[tenant]]\nname = \"light\"\nnsm = \"k\"\n"
    ));
    let nsm_pid = engine.nsm()["pid"].as_u64().unwrap() as u32;
    let ticks_before = cpu_ticks(nsm_pid);
    let guest = |tenant: &str, mib: usize, trips: usize| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_netkernel"));
        c.args(["run", "--tenant", tenant, "--socket"]).arg(&engine.socket).args([
            "--",
            python.to_str().unwrap(),
            "-c",
            &work(mib, trips),
        ]);
        c
    };
    let busy = std::thread::spawn({
        let c = guest("busy", 2048, 20_000);
        move || output_within(c, Duration::from_secs(120))
    });
    let light = output_within(guest("light", 0, 1000), Duration::from_secs(60));
    let busy = busy.join().unwrap();
    for o in [&busy, &light] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    let tenants = engine.ctl("tenants");
    let nsms = engine.ctl("nsms");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let process = (cpu_ticks(nsm_pid) - ticks_before) as f64 / hz;
    let tenant = |name: &str| tenants.as_array().unwrap().iter().find(|t| t["name"] == name).unwrap().clone();
    let (b, l) = (tenant("busy"), tenant("light"));
    let cpu = |t: &serde_json::Value| t["nsm_cpu_seconds"].as_f64().unwrap();
    eprintln!(
        "NSM process CPU {process:.2} s; busy {:.3} s, light {:.3} s, overhead {:.3} s",
        cpu(&b),
        cpu(&l),
        nsms[0]["cpu_seconds"].as_f64().unwrap() - cpu(&b) - cpu(&l)
    );
    assert_eq!((b["cpu_weight"].as_u64(), l["cpu_weight"].as_u64()), (Some(3), Some(1)), "{tenants}");
    assert!(cpu(&b) > 0.2, "2 GiB and 20,000 round trips cost the NSM {:.3} s of CPU: {b}", cpu(&b));
    assert!(cpu(&l) > 0.0 && cpu(&l) < cpu(&b) / 3.0, "light {:.3} s vs busy {:.3} s", cpu(&l), cpu(&b));
    assert_eq!(nsms[0]["scheduler"], "fair");
    assert_eq!(nsms[0]["executors"], 1);
    // The tenants' sum is the NSM's CPU (within 5%, and a clock tick either way).
    let sum = cpu(&b) + cpu(&l);
    let total = nsms[0]["cpu_seconds"].as_f64().unwrap();
    assert!(sum <= total + 1e-9, "{sum} > {total}");
    assert!((sum - process).abs() <= 0.05 * process + 2.0 / hz, "tenants {sum:.3} s vs NSM process {process:.3} s");

    let text = metrics_response(&format!("127.0.0.1:{metrics}"));
    let line = text
        .lines()
        .find(|l| l.starts_with("netkernel_tenant_nsm_cpu_seconds_total{tenant=\"busy\""))
        .unwrap_or_else(|| panic!("no busy tenant CPU metric in:\n{text}"));
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v >= cpu(&b), "{line}");
    assert!(text.contains("netkernel_nsm_executors{nsm=\"k\"} 1"), "{text}");
}

/// With `executors = 2`, a server and a client (two guest processes, two attachments) are served
/// by two executor threads of one NSM: bytes arrive whole, the client's forked child sends on
/// its inherited socket on the second executor (the engine's `hold` goes there), `ctl` adds both executors up, and once the guests are gone the
/// NSM is back to one executor.
#[test]
fn executors_grow_with_attachments_and_shrink_when_they_end() {
    let python = require("python3");
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\ncolocate = false\nexecutors = 2\n\n[[tenant]]\nname = \"default\"\nnsm = \"k\"\n",
    );
    // The server answers each connection with the sha256 of what it read.
    let server = engine.python_ready(
        "import socket,os,hashlib,sys\nl=socket.create_server(('127.0.0.1',0))\n\
         print('ready',flush=True)\nwhile True:\n    s,_=l.accept()\n    if os.fork()==0:\n        h=hashlib.sha256()\n        \
         while True:\n            d=s.recv(1<<16)\n            if not d: break\n            h.update(d)\n        \
         s.sendall(h.hexdigest().encode()); os._exit(0)\n    s.close()\n",
    );
    let _ = server;
    let nsms = engine.ctl("nsms");
    assert_eq!(nsms[0]["executors"], 1, "one guest: one executor");
    let conns = engine.ctl("conns");
    let port =
        conns.as_array().unwrap().iter().find_map(|c| c["local"].as_str()?.rsplit(':').next()?.parse::<u16>().ok());
    let port = port.expect("the server's listener");
    let client = format!(
        "import socket,hashlib,os\nc=socket.create_connection(('127.0.0.1',{port}))\nb=os.urandom(1<<20)\nh=hashlib.sha256()\n\
         for _ in range(64): h.update(b)\npid=os.fork()\nif pid==0:\n    \
         for _ in range(64): c.sendall(b)\n    os._exit(0)\nos.waitpid(pid,0)\nc.shutdown(socket.SHUT_WR)\nr=b''\nwhile True:\n    \
         d=c.recv(100)\n    if not d: break\n    r+=d\nprint(r.decode()==h.hexdigest())\n"
    );
    let mut c = engine.run(python.to_str().unwrap(), &["-c", &client]);
    c.stdout(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    // While the client runs, the NSM has two executors.
    let start = std::time::Instant::now();
    let mut two = false;
    while start.elapsed() < Duration::from_secs(20) && !two {
        two = engine.ctl("nsms")[0]["executors"] == 2;
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(two, "a second attachment did not get a second executor");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True", "64 MiB through two executors, sha256 checked");
    let tenants = engine.ctl("tenants");
    assert!(tenants[0]["bytes_in"].as_u64().unwrap() >= 64 << 20, "both executors' counters add up: {tenants}");
    assert!(tenants[0]["nsm_cpu_seconds"].as_f64().unwrap() > 0.0);
    // The client is gone: its executor stops within a second.
    let start = std::time::Instant::now();
    while engine.ctl("nsms")[0]["executors"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(2), "the second executor outlived its last guest");
        std::thread::sleep(Duration::from_millis(50));
    }
}
