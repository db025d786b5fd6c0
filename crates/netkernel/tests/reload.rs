//! `netkernel ctl reload` and SIGHUP: an edited configuration applied to a running engine, with
//! guests attached; a broken or not-live edit refused with the old configuration still serving.

mod common;
use common::*;

use std::process::Command;
use std::time::Duration;

const NSM: &str = "[[nsm]]\nname = \"k\"\nscheduler = \"fair\"\ncolocate = false\n\n";

fn tenant(name: &str, extra: &str) -> String {
    format!("[[tenant]]\nname = \"{name}\"\nnsm = \"k\"\n{extra}\n")
}

/// `netkernel ctl reload`: its exit status and output (stdout and stderr).
fn reload(engine: &TestEngine) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_netkernel"))
        .args(["ctl", "--socket"])
        .arg(&engine.socket)
        .arg("reload")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn tenants(engine: &TestEngine) -> Vec<serde_json::Value> {
    engine.ctl("tenants").as_array().unwrap().clone()
}

#[test]
fn reload_adds_reweights_and_removes_tenants_under_running_guests() {
    require("python3");
    let engine = TestEngine::with_config(&format!("{NSM}{}", tenant("blue", "cpu_weight = 1")));
    let cfg = engine.config_path().unwrap();
    let mut blue = echo_guest(&engine, "blue");
    assert_eq!(blue.ask("hello"), "ok");

    // A tenant added, a weight changed: applied without a restart, the running guest unharmed.
    std::fs::write(&cfg, format!("{NSM}{}{}", tenant("blue", "cpu_weight = 4"), tenant("green", ""))).unwrap();
    let (ok, text) = reload(&engine);
    assert!(ok, "{text}");
    assert!(text.contains("added    green") && text.contains("changed  blue"), "{text}");
    let t = tenants(&engine);
    assert_eq!(t.iter().find(|t| t["name"] == "blue").unwrap()["cpu_weight"], 4, "{t:?}");
    let mut green = echo_guest(&engine, "green");
    assert_eq!(green.ask("hi"), "ok", "the new tenant attaches");
    assert_eq!(blue.ask("still there"), "ok", "blue's connection went on through the reload");

    // A broken edit is refused, naming file, line and field; the running configuration stays.
    std::fs::write(&cfg, format!("{NSM}{}{}", tenant("blue", "cpu_weight = 0"), tenant("green", ""))).unwrap();
    let (ok, text) = reload(&engine);
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("{}:9: tenant.cpu_weight", cfg.display())), "{text}");
    assert_eq!(tenants(&engine).iter().find(|t| t["name"] == "blue").unwrap()["cpu_weight"], 4);
    // So is an edit to an NSM's make-up, which cannot change under running guests.
    std::fs::write(&cfg, format!("{NSM}executors = 2\n{}{}", tenant("blue", ""), tenant("green", ""))).unwrap();
    let (ok, text) = reload(&engine);
    assert!(!ok && text.contains("[[nsm]] k changed") && text.contains("nothing applied"), "{text}");
    // A kernel NSM's congestion control changes live, for new connections.
    std::fs::write(&cfg, format!("{NSM}congestion = \"reno\"\n{}{}", tenant("blue", ""), tenant("green", ""))).unwrap();
    let (ok, text) = reload(&engine);
    assert!(ok && text.contains("-> reno"), "{text}");
    let cc = Command::new(env!("CARGO_BIN_EXE_netkernel"))
        .args(["run", "--tenant", "blue", "--socket"])
        .arg(&engine.socket)
        .args(["--", "python3", "-c", "import socket\ns=socket.socket()\nprint(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b'\\0')[0].decode())"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cc.stdout).trim(), "reno", "{}", String::from_utf8_lossy(&cc.stderr));
    assert_eq!(engine.ctl("nsms")[0]["congestion"], "reno");
    assert_eq!(blue.ask("after the switch"), "ok", "blue's connection (opened before) goes on");

    // SIGHUP, as `ctl reload`: green removed, its guest's sockets reset; blue goes on.
    std::fs::write(&cfg, format!("{NSM}congestion = \"reno\"\n{}", tenant("blue", "cpu_weight = 2"))).unwrap();
    // SAFETY: a signal to our own child, the engine.
    unsafe { libc::kill(engine.pid() as i32, libc::SIGHUP) };
    let start = std::time::Instant::now();
    while tenants(&engine).iter().any(|t| t["name"] == "green") {
        assert!(start.elapsed() < Duration::from_secs(5), "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(green.ask("gone?"), format!("error {}", libc::ECONNRESET), "a removed tenant's guest is reset");
    assert_eq!(blue.ask("and blue?"), "ok");
    assert_eq!(tenants(&engine)[0]["cpu_weight"], 2);
    let denied = Command::new(env!("CARGO_BIN_EXE_netkernel"))
        .args(["run", "--tenant", "green", "--socket"])
        .arg(&engine.socket)
        .args(["--", "python3", "-c", "import socket; socket.socket()"])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && why.contains("unknown tenant \"green\""),
        "a removed tenant cannot attach: {why}"
    );
}

/// An NSM added to the file starts at the reload, supervised as the others; a tenant added on it
/// attaches there; removing an NSM is refused (its guests would lose their stack).
#[test]
fn reload_starts_an_added_nsm() {
    require("python3");
    let engine = TestEngine::with_config(&format!("{NSM}{}", tenant("blue", "")));
    let cfg = engine.config_path().unwrap();
    let mut blue = echo_guest(&engine, "blue");
    let added = format!(
        "{NSM}[[nsm]]\nname = \"k2\"\ncongestion = \"reno\"\n\n{}{}",
        tenant("blue", ""),
        "[[tenant]]\nname = \"red\"\nnsm = \"k2\"\n"
    );
    std::fs::write(&cfg, &added).unwrap();
    let (ok, text) = reload(&engine);
    assert!(ok && text.contains("nsms_added k2") && text.contains("added    red"), "{text}");
    let nsms = engine.ctl("nsms");
    let k2 = nsms.as_array().unwrap().iter().find(|n| n["name"] == "k2").unwrap_or_else(|| panic!("{nsms}"));
    assert!(k2["pid"].as_u64().unwrap() > 0 && k2["congestion"] == "reno", "{k2}");
    let mut red = echo_guest(&engine, "red");
    assert_eq!(red.ask("on the new NSM"), "ok");
    let conns = engine.ctl("conns");
    assert!(conns.as_array().unwrap().iter().any(|c| c["tenant"] == "red" && c["nsm"] == "k2"), "{conns}");
    assert_eq!(blue.ask("unharmed"), "ok");
    // Taking it away again is refused: red's guest runs on it.
    std::fs::write(&cfg, format!("{NSM}{}", tenant("blue", ""))).unwrap();
    let (ok, text) = reload(&engine);
    assert!(!ok && text.contains("[[nsm]] k2 changed or removed") && text.contains("nothing applied"), "{text}");
    assert_eq!(red.ask("still served"), "ok");
}
