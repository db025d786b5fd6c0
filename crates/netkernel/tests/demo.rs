//! `netkernel demo`, as root and as a normal user.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

fn check(out: std::process::Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches(" match").count(), 2, "{text}");
    assert!(text.contains("NSM kernel (kernel stack") && text.contains("NetKernel / native throughput"), "{text}");
}

#[test]
fn demo_runs_and_cleans_up() {
    require("python3");
    require("curl");
    let mut c = Command::new(NETKERNEL);
    c.args(["demo", "--bytes", "4194304"]);
    check(output_within(c, Duration::from_secs(120)));
}

#[test]
fn demo_runs_as_an_unprivileged_user() {
    if lacks_root("demo_runs_as_an_unprivileged_user: needs root to switch to user nobody") {
        return;
    }
    require("runuser");
    // Copy the binary and GuestLib where nobody can read them, whatever the checkout's modes.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = std::path::Path::new(NETKERNEL);
    for f in [bin.to_path_buf(), bin.with_file_name("libnetkernel_guest.so")] {
        let to = dir.path().join(f.file_name().unwrap());
        std::fs::copy(&f, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut c = Command::new("runuser");
    c.args(["-u", "nobody", "--", "env", "HOME=/tmp"])
        .arg(format!("PATH={}", std::env::var("PATH").unwrap_or_default()))
        .arg(dir.path().join("netkernel"))
        .args(["demo", "--bytes", "4194304"]);
    check(output_within(c, Duration::from_secs(120)));
}
