//! `executors = "auto"`: an NSM's executors follow the load. Alone in its test binary, so that
//! no other test's guests take the CPU the saturated NSM needs to show it is saturated.

mod common;

use common::*;
use std::time::Duration;

/// With `executors = "auto"` an NSM follows the load: iperf3 streaming as fast as it can keeps
/// executor 0 busy, so a second executor starts and attachments move there mid-stream, while a
/// sha256-checked transfer runs beside it (every byte arrives once); when the load stops the NSM
/// is back to one executor within about a second, and idles.
#[test]
fn auto_executors_split_under_load_and_compact_when_it_stops() {
    let python = require("python3");
    let iperf3 = require("iperf3");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: one core, so \"auto\" allows one executor");
        return;
    }
    let engine = TestEngine::with_config(
        "[[nsm]]\nname = \"k\"\ncolocate = false\nexecutors = \"auto\"\n\n[[tenant]]\nname = \"default\"\nnsm = \"k\"\n",
    );
    let server = engine.python_ready(
        "import socket,hashlib\nl=socket.create_server(('127.0.0.1',0))\nprint('ready',flush=True)\n\
         s,_=l.accept()\nh=hashlib.sha256()\nwhile True:\n    d=s.recv(1<<18)\n    if not d: break\n    h.update(d)\n\
         s.sendall(h.hexdigest().encode())\n",
    );
    let conns = engine.ctl("conns");
    let port =
        conns.as_array().unwrap().iter().find_map(|c| c["local"].as_str()?.rsplit(':').next()?.parse::<u16>().ok());
    let port = port.expect("the server's listener");
    let iperf_port = free_port().to_string();
    let iperf_server = engine.run(iperf3.to_str().unwrap(), &["-s", "-p", &iperf_port]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut load = engine.run(iperf3.to_str().unwrap(), &["-c", "127.0.0.1", "-p", &iperf_port, "-t", "6"]);
    load.stdout(std::process::Stdio::piped());
    let load = load.spawn().unwrap();
    // Sends for 6 s (at about 50 MB/s, so that the guests leave the NSM the CPU), then compares
    // the server's sha256 with its own.
    let client = format!(
        "import socket,hashlib,os,time\nc=socket.create_connection(('127.0.0.1',{port}))\nb=os.urandom(1<<18)\n\
         h=hashlib.sha256()\nend=time.time()+6\nn=0\nwhile time.time()<end:\n    c.sendall(b); h.update(b); n+=1; time.sleep(0.005)\n\
         c.shutdown(socket.SHUT_WR)\nr=b''\nwhile True:\n    d=c.recv(100)\n    if not d: break\n    r+=d\n\
         print(r.decode()==h.hexdigest(), n)\n"
    );
    let mut c = engine.run(python.to_str().unwrap(), &["-c", &client]);
    c.stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut most = 0;
    while child.try_wait().unwrap().is_none() {
        most = most.max(engine.ctl("nsms")[0]["executors"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let iperf = load.wait_with_output().unwrap();
    let stopped = std::time::Instant::now();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("True "), "every byte arrived once, in order: {out}");
    assert!(iperf.status.success(), "{}", String::from_utf8_lossy(&iperf.stdout));
    assert_eq!(most, 2, "a saturated executor 0 got a second executor: {}", engine.log());
    assert!(engine.log().contains("moved to executor 1"), "{}", engine.log());
    while engine.ctl("nsms")[0]["executors"] != 1 {
        assert!(stopped.elapsed() < Duration::from_secs(3), "the load stopped, the executors stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("back to one executor {:?} after the load stopped", stopped.elapsed());
    for l in engine.log().lines().filter(|l| l.contains("executor")) {
        eprintln!("{l}");
    }
    for mut c in [server, iperf_server] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_idle_under_one_percent(&engine);
}
