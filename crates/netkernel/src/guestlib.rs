//! Finding GuestLib and starting programs under it.

use std::path::{Path, PathBuf};
use std::process::Command;

const LIB: &str = "libnetkernel_guest.so";

/// Where GuestLib is: $NETKERNEL_GUESTLIB, else beside this binary (cargo's target dir, or an
/// install prefix's bin/ with the library in ../lib/).
pub fn find() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NETKERNEL_GUESTLIB") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("NETKERNEL_GUESTLIB={} does not exist", p.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating netkernel binary: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join(LIB), dir.join("../lib").join(LIB), dir.join("..").join(LIB)];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.canonicalize().unwrap_or_else(|_| p.clone()));
    }
    // `cargo run` builds only this binary's package; build GuestLib beside it once.
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = dir.ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "netkernel-guest"]);
        if release {
            cmd.arg("--release");
        }
        eprintln!("netkernel: building GuestLib ({LIB}) ...");
        if cmd.status().map(|s| s.success()).unwrap_or(false) && dir.join(LIB).is_file() {
            return Ok(dir.join(LIB));
        }
    }
    Err(format!(
        "cannot find GuestLib ({LIB}) beside {}; build it with `cargo build --release --workspace` or set NETKERNEL_GUESTLIB",
        exe.display()
    ))
}

/// The path of `program` on PATH, or an error saying which Debian package to install.
pub fn which(program: &str) -> Result<String, String> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or_else(|| format!("{program} is not installed (scripts/test installs it from Debian)"))
}

/// A command that runs `program` under GuestLib, attached to the engine at `socket`.
pub fn command(lib: &Path, socket: &Path, tenant: Option<&str>, program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(v) if !v.is_empty() => format!("{}:{v}", lib.display()),
        _ => lib.display().to_string(),
    };
    cmd.env("LD_PRELOAD", preload).env("NETKERNEL_SOCKET", socket);
    match tenant {
        Some(t) => cmd.env("NETKERNEL_TENANT", t),
        None => cmd.env_remove("NETKERNEL_TENANT"),
    };
    // Only `run --isolate` says the guest is isolated.
    cmd.env_remove("NETKERNEL_ISOLATED");
    cmd
}
