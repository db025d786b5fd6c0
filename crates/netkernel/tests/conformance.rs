//! Differential conformance: each scenario runs natively and under GuestLib, and the traces
//! (return values, errno, bytes) must be identical. The kernel is the oracle. Every scenario
//! runs three times under GuestLib: with the co-located short cut (both ends are guests of one
//! NSM, so the NSM's pipe carries the bytes), with it off (the NSM's kernel stack carries them),
//! and through a user NSM (smoltcp in the NSM process) with it off.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

/// The embedded configuration with the co-located short cut off.
const KERNEL_PATH: &str =
    "[[nsm]]\nname = \"kernel\"\ncolocate = false\n\n[[tenant]]\nname = \"default\"\nnsm = \"kernel\"\n";

/// Scenarios the user NSM cannot run as Linux does, and why (each is listed in
/// crates/nsm-user/src/lib.rs's differences from Linux).
const USER_PATH_SKIPS: &[(&str, &str)] = &[
    ("oob", "smoltcp has no urgent pointer, so send(MSG_OOB) is EOPNOTSUPP on a user NSM"),
    (
        "sockbuf",
        "smoltcp sizes a connection's buffers when it starts: SO_RCVBUF set after accept does not bound it, so \
         the 4 KiB case can buffer more than Linux's 3x bound",
    ),
];

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Colocated,
    Kernel,
    User,
}

/// Runs `scenario` natively and under GuestLib on `path`; `tcp`: it opens a TCP connection,
/// which must go through the NSM.
fn differential(scenario: &str, tcp: bool, path: Path) {
    if path == Path::User && !is_root() {
        eprintln!("skipping {scenario} through a user NSM: its TAP device needs root");
        return;
    }
    if let (Path::User, Some((_, why))) = (path, USER_PATH_SKIPS.iter().find(|(s, _)| *s == scenario)) {
        eprintln!("skipping {scenario} through a user NSM: {why}");
        return;
    }
    let native = output_within(
        {
            let mut c = Command::new(PROBE);
            c.arg(scenario);
            c
        },
        Duration::from_secs(120),
    );
    assert!(native.status.success(), "native {scenario} failed: {}", String::from_utf8_lossy(&native.stderr));
    let engine = match path {
        Path::Colocated => TestEngine::start(),
        Path::Kernel => TestEngine::with_config(KERNEL_PATH),
        Path::User => TestEngine::with_config(&user_nsm_config("colocate = false").0),
    };
    let nk = output_within(engine.run(PROBE, &[scenario]), Duration::from_secs(120));
    assert!(
        nk.status.success(),
        "{scenario} under NetKernel failed: {}\nengine log:\n{}",
        String::from_utf8_lossy(&nk.stderr),
        engine.log()
    );
    let (n, k) = (String::from_utf8_lossy(&native.stdout), String::from_utf8_lossy(&nk.stdout));
    assert!(!n.trim().is_empty(), "{scenario} printed nothing");
    for (i, (a, b)) in n.lines().zip(k.lines()).enumerate() {
        assert_eq!(a, b, "{scenario}: line {} differs\nnative:\n{n}\nnetkernel:\n{k}", i + 1);
    }
    assert_eq!(n.lines().count(), k.lines().count(), "{scenario}: trace lengths differ\nnative:\n{n}\nnetkernel:\n{k}");
    // The traffic went through the NSM, not around it.
    let nsm = engine.nsm();
    assert!(nsm["conns_total"].as_u64().unwrap() > 0 || !tcp, "no connection through the NSM: {nsm}");
    // ... and on the path this run is about.
    let colocated = nsm["conns_colocated"].as_u64().unwrap();
    if path == Path::Colocated {
        assert!(colocated > 0 || !tcp, "no connection took the co-located path: {nsm}");
    } else {
        assert_eq!(colocated, 0, "a connection took the co-located path with it off: {nsm}");
    }
}

// The scenarios, as nk-probe declares them.
include!("../src/bin/nk-probe/scenarios.rs");

macro_rules! tests {
    ($($name:ident => $run:expr, tcp: $tcp:expr;)*) => {
        mod colocated {
            $(
                #[test]
                fn $name() {
                    super::differential(stringify!($name), $tcp, super::Path::Colocated);
                }
            )*
        }
        mod kernel_path {
            $(
                #[test]
                fn $name() {
                    super::differential(stringify!($name), $tcp, super::Path::Kernel);
                }
            )*
        }
        mod user_path {
            $(
                #[test]
                fn $name() {
                    super::differential(stringify!($name), $tcp, super::Path::User);
                }
            )*
        }
    };
}

scenarios!(tests);
