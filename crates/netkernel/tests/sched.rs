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
